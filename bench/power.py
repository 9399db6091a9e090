"""Power loss, end to end: real daemons (`python -m supervisord_llm`, as tests/helpers.Daemon
runs them), a real upsd + dummy-ups (tests/nutserver.NutServer), simulated GPUs, fake model
servers (tests/fakebackend.py) behind gates.

    .venv/bin/python bench/power.py [--trials 10] [--polls 0.5,2] [--seq-trials 3]
                                    [--streams 0,8,32] [--parts abc]

a. Reaction: the dummy driver's file is replaced with `OB LB` at t0 (at a random phase of
   both pollers); the bench polls upsd itself (`GET VAR dummy ups.status` in a loop on one
   connection) and every gate (`GET /v1/models` in a loop on each) and reports
   (1) file -> upsd: dummy-ups re-reads its file once per `pollinterval` (1 s), not ours;
   (2) upsd -> every gate answering 503: the supervisor's part, target one
       `[power] poll_interval_s` + 20 ms; split with the daemon's own log (JSON, ms
       timestamps) into upsd -> the power-down decision and the decision -> gates closed.
   A fresh daemon per trial (2 gated services, 2 simulated GPUs), started at a random
   moment: a daemon's NUT polls keep one phase against dummy-ups' 1 s loop for its whole
   life, so one daemon would sample a single delay again and again.
b. The whole sequence with N streams in flight (stream: true through the gates, 60 tokens
   50 ms apart, 3 s): power-down start -> powered_down (the daemon's log) and each step
   (`power.power_down.steps[].duration_s` in the status: drain, checkpoint (one command hook,
   /bin/true), stop); the drain is mostly the streams' remaining time, so also the time from
   the last stream's end (at the client) to the drain step's end, and how many streams ended
   whole (`data: [DONE]`).
c. The battery ceiling: scripts/ups_model.py plays the UPS (200 Wh, 150 W base load, the GPUs'
   draw from the daemon's status); 2 simulated GPUs whose load would draw 280 W each (default
   limit 300 W). The model's control file goes OL -> OB DISCHRG; battery.runtime as upsd
   reports it, with `on_battery_power_fraction` 1.0 (off) and 0.6, the grace (600 s) long
   enough that nothing stops.

Every process (daemons, services, upsd, dummy-ups) is stopped at the end, also on an error
(then one line says what failed and exit status 1). Takes about 3 minutes with the defaults
on 2 cores; `--keep` keeps the working directory (configs, the daemons' logs).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nutserver import NutServer, NutServerError, nut_missing

from helpers import SIM_UUID, Daemon, base_config, fake_service, free_port, wait_until
from scripts.ups_model import UpsModel

GATES = 2
GPU_LOAD_W = 280.0
BASE_W = 150.0
BATTERY_WH = 200.0
STREAM_TOKENS = 60
TOKEN_DELAY_S = 0.05
GATE_POLL_S = 0.003  # between two requests of one gate poller
UPSD_POLL_S = 0.002


# --- small clients ---------------------------------------------------------------------------


class Poller(threading.Thread):
    """A loop in a thread until `stop` is set or it has seen what it waits for."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()


class UpsdPoller(Poller):
    """`GET VAR dummy ups.status` in a loop on one connection; `seen` is the wall time of the
    first answer equal to `want`."""

    def __init__(self, ups: NutServer, want: str) -> None:
        super().__init__()
        self.ups, self.want = ups, want
        self.seen: float | None = None
        self.seen_event = threading.Event()
        self.polls = 0

    def run(self) -> None:
        query = f"GET VAR {self.ups.name} ups.status\n".encode()
        expect = f'VAR {self.ups.name} ups.status "{self.want}"'
        with (socket.create_connection((self.ups.host, self.ups.port), timeout=2) as sock,
              sock.makefile("rwb") as f):
            while not self.stop.is_set():
                f.write(query)
                f.flush()
                line = f.readline().decode(errors="replace").rstrip("\r\n")
                self.polls += 1
                if line == expect:
                    self.seen = time.time()
                    self.seen_event.set()
                    return
                time.sleep(UPSD_POLL_S)


class GatePoller(Poller):
    """`GET /v1/models` on a gate in a loop (keep-alive) once `start` is set (the gate cannot
    close before upsd has the change: polling only then keeps the load on the gate's thread,
    and so on the daemon's GIL, low); `closed` is the wall time of the first 503."""

    def __init__(self, listen: str, start: threading.Event) -> None:
        super().__init__()
        host, port = listen.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.start_event = start
        self.closed: float | None = None
        self.requests = 0
        self.errors = 0

    def run(self) -> None:
        while not self.start_event.wait(0.05):
            if self.stop.is_set():
                return
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            while not self.stop.is_set():
                try:
                    conn.request("GET", "/v1/models")
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    conn.close()
                    time.sleep(GATE_POLL_S)
                    continue
                self.requests += 1
                if resp.status == 503:
                    self.closed = time.time()
                    return
                time.sleep(GATE_POLL_S)
        finally:
            conn.close()


def gate_code(listen: str) -> int:
    host, port = listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


@dataclass
class Stream:
    listen: str
    first: threading.Event = field(default_factory=threading.Event)
    ended: float | None = None
    whole: bool = False
    status: int = 0
    error: str | None = None

    def run(self) -> None:
        host, port = self.listen.rsplit(":", 1)
        body = json.dumps({"model": "fake", "stream": True, "max_tokens": STREAM_TOKENS,
                           "fake_token_delay_s": TOKEN_DELAY_S,
                           "messages": [{"role": "user", "content": "hi"}]})
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            while True:
                line = resp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    self.first.set()
                if line.startswith(b"data: [DONE]"):
                    self.whole = True
            self.ended = time.time()
        except (OSError, http.client.HTTPException) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.ended = time.time()
        finally:
            self.first.set()
            conn.close()


# --- the daemon's side ---------------------------------------------------------------------


def power_doc(tmp: Path, ups: NutServer, services: list[dict[str, Any]], **power: Any
              ) -> dict[str, Any]:
    doc = base_config(tmp, services, gpus=2, power={
        "source": "nut", "ups": ups.ups, "poll_interval_s": 0.5, "on_battery_grace_s": 600,
        "deadtime_s": 30, "low_runtime_s": 60, "low_charge_pct": 5, "drain_timeout_s": 30,
        "stop_timeout_s": 10, **power})
    doc["supervisor"]["log_format"] = "json"  # ms timestamps to read the sequence from
    return doc


# Each return of the power is a `power` restart that spends the service's restart budget like
# a crash (lifecycle.come_back): tests/helpers' 5 within 60 s would leave the services failed
# after the 5th trial, so the bench gives them room.
RESTART = {"max_restarts": 1000, "window_s": 60}
# tests/helpers' health timeout of 0.1 s (2 failures) restarts a fake server mid-stream when the
# 2 cores are busy (other work on the machine): looser, so only the power acts
HEALTH = {"interval_s": 0.25, "timeout_s": 0.25, "failures": 8}


def gated_services() -> list[dict[str, Any]]:
    return [fake_service(f"chat{i}", free_port(), gpus=[i % 2], restart=RESTART, health=HEALTH,
                         gate={"listen": f"127.0.0.1:{free_port()}", "max_concurrency": 64,
                               "max_queue": 64, "drain_timeout_s": 30})
            for i in range(GATES)]


@contextlib.contextmanager
def daemon(tmp: Path, doc: dict[str, Any]) -> Iterator[Daemon]:
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, doc)
    try:
        yield d.start()
    finally:
        d.stop()


def mode(d: Daemon) -> str:
    return str(d.status()["supervisor"]["mode"])


def listens(d: Daemon) -> list[str]:
    return [s["gate"]["listen"] for s in d.doc["service"] if "gate" in s]


def wait_serving(d: Daemon, ups: NutServer, timeout: float = 30.0) -> None:
    """On line, mode normal, every service ready, every gate answering 200."""
    ups.wait_status("OL", timeout)

    def ok() -> bool:
        st = d.status()
        return (st["supervisor"]["mode"] == "normal" and st["power"]["state"] == "online"
                and all(s["state"] == "ready" and s.get("gate", "open") == "open"
                        for s in st["services"])
                and all(gate_code(g) == 200 for g in listens(d)))

    wait_until(ok, timeout, 0.05, what=f"serving again (log: {d.logtext()[-2000:]})")


class LogTail:
    """The daemon's JSON log from an offset on: (wall ts, message) of each record."""

    def __init__(self, d: Daemon) -> None:
        self.path = d.log
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def records(self) -> list[tuple[float, str]]:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        out = []
        for line in data.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("ts"), (int, float)):
                out.append((float(doc["ts"]), str(doc.get("msg", ""))))
        return out

    def first(self, prefix: str) -> float | None:
        return next((ts for ts, msg in self.records() if msg.startswith(prefix)), None)

    def nth(self, text: str, n: int) -> float | None:
        """The n-th record (from 1) that holds `text`."""
        hits = [ts for ts, msg in self.records() if text in msg]
        return hits[n - 1] if len(hits) >= n else None


def online(ups: NutServer) -> None:
    """upsd says OL (before a daemon starts: on LB it would start its services held)."""
    if ups.query("ups.status") != "OL":
        ups.set(status="OL", charge=100, runtime=1200)
    ups.wait_status("OL", 10)


def power_back(d: Daemon, ups: NutServer) -> None:
    wait_until(lambda: mode(d) == "powered_down", 60, 0.05,
               what=f"powered down (log: {d.logtext()[-2000:]})")
    ups.set(status="OL", charge=100, runtime=1200)
    wait_serving(d, ups, 60)


# --- a. reaction -----------------------------------------------------------------------------


@dataclass
class Reaction:
    file_upsd: float
    upsd_decision: float  # upsd -> the daemon's log line "powering down"
    decision_draining: float  # -> the daemon's log line of the last gate draining
    decision_closed: float  # -> every gate answering 503 (at the bench's pollers)
    upsd_closed: float
    spread: float  # between the first and the last gate answering 503


def reaction_trial(tmp: Path, ups: NutServer, poll_s: float) -> Reaction:
    """One daemon per trial: the daemon's NUT polls keep their phase against dummy-ups' 1 s
    loop for its whole life (0.5 s and 2 s are multiples of it), so one daemon for all trials
    would measure the same delay again and again; a fresh one started at a random moment
    samples the phases."""
    online(ups)
    time.sleep(random.uniform(0.0, 1.0))  # the daemon's poll phase against dummy-ups' loop
    doc = power_doc(tmp, ups, gated_services(), poll_interval_s=poll_s)
    with daemon(tmp, doc) as d:
        wait_serving(d, ups)
        tail = LogTail(d)
        upsd = UpsdPoller(ups, "OB LB")
        gates = [GatePoller(g, start=upsd.seen_event) for g in listens(d)]
        pollers: list[Poller] = [upsd, *gates]
        for t in pollers:
            t.start()
        time.sleep(random.uniform(0.0, 1.0))  # the file's change against dummy-ups' loop
        ups.set(status="OB LB", charge=10, runtime=100)
        t0 = time.time()
        try:
            wait_until(lambda: upsd.seen is not None
                       and all(g.closed is not None for g in gates),
                       poll_s + 10, 0.01, what="OB LB in upsd and every gate closed")
        finally:
            for t in pollers:
                t.stop.set()
                t.join(5)
        closed = [g.closed for g in gates if g.closed is not None]
        assert upsd.seen is not None and len(closed) == len(gates)
        decision = wait_until(lambda: tail.first("power: powering down"), 5, 0.02,
                              what="the power-down in the log")
        draining = wait_until(lambda: tail.nth("-> draining (gate draining)", len(gates)), 5,
                              0.02, what="the gates draining in the log")
        wait_until(lambda: mode(d) == "powered_down", 30, 0.05, what="powered down")
    return Reaction(upsd.seen - t0, decision - upsd.seen, draining - decision,
                    max(closed) - decision, max(closed) - upsd.seen, max(closed) - min(closed))


def ms(values: list[float]) -> str:
    v = sorted(x * 1000 for x in values)
    return (f"median {statistics.median(v):7.1f}   min {v[0]:7.1f}   max {v[-1]:7.1f} ms")


def bench_reaction(base: Path, ups: NutServer, polls: list[float], trials: int) -> None:
    for poll_s in polls:
        results = [reaction_trial(base / f"a-{poll_s:g}" / f"t{i}", ups, poll_s)
                   for i in range(trials)]
        target = poll_s + 0.020
        worst = max(r.upsd_closed for r in results)
        print(f"OB LB -> every gate closed ({GATES} gates), poll_interval_s {poll_s:g}, "
              f"{trials} trials (a daemon each):")
        print(f"  (1) file -> upsd                 {ms([r.file_upsd for r in results])}")
        print(f"  (2) upsd -> every gate 503       {ms([r.upsd_closed for r in results])}"
              f"   target <= {target * 1000:.0f} ms: {'met' if worst <= target else 'MISSED'}")
        print(f"      upsd -> power-down decision  {ms([r.upsd_decision for r in results])}")
        print(f"      decision -> gates draining   {ms([r.decision_draining for r in results])}"
              "   (the daemon's log)")
        print(f"      decision -> every gate 503   {ms([r.decision_closed for r in results])}")
        print(f"      first -> last gate 503       {ms([r.spread for r in results])}")
        print(f"  file -> every gate 503          "
              f" {ms([r.file_upsd + r.upsd_closed for r in results])}", flush=True)


# --- b. the sequence ---------------------------------------------------------------------------


@dataclass
class Sequence:
    total: float  # power-down start -> powered_down (log)
    steps: dict[str, float]
    last_stream_to_drain_end: float | None
    whole: int
    streams: int
    in_flight_at_start: int
    problems: list[str]


def sequence_trial(d: Daemon, ups: NutServer, n: int) -> Sequence:
    wait_serving(d, ups)
    tail = LogTail(d)
    gates = listens(d)
    streams = [Stream(gates[i % len(gates)]) for i in range(n)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        if not s.first.wait(10):
            raise AssertionError("a stream did not start within 10 s")
    ups.set(status="OB LB", charge=50, runtime=600)
    done = wait_until(lambda: tail.first("power: powered down in"), 60, 0.02,
                      what=f"powered down (log: {d.logtext()[-2000:]})")
    for t in threads:
        t.join(30)
    start = tail.first("power: powering down")
    drain_end = tail.first("power: step drain done")
    assert start is not None and drain_end is not None
    steps = {s["step"]: s["duration_s"] for s in d.status()["power"]["power_down"]["steps"]}
    ends = [s.ended for s in streams if s.ended is not None]
    in_flight = sum(1 for s in streams if s.ended is not None and s.ended > start)
    problems = [s.error or f"HTTP {s.status}" + ("" if s.whole else ", no [DONE]")
                for s in streams if not (s.whole and s.status == 200)]
    power_back(d, ups)
    return Sequence(done - start, steps, drain_end - max(ends) if ends else None,
                    n - len(problems), n, in_flight, problems)


def bench_sequence(base: Path, ups: NutServer, counts: list[int], trials: int) -> None:
    cp = [{"name": "noop", "kind": "command", "command": ["/bin/true"], "timeout_s": 10}]
    doc = power_doc(base / "b", ups, gated_services(), poll_interval_s=0.5)
    doc["checkpoint"] = cp
    online(ups)
    with daemon(base / "b", doc) as d:
        results = {n: [sequence_trial(d, ups, n) for _ in range(trials)] for n in counts}
    print(f"power-down sequence (OB LB; {GATES} gated services, 1 command checkpoint; "
          f"streams of {STREAM_TOKENS} tokens {TOKEN_DELAY_S * 1000:.0f} ms apart), "
          f"{trials} trials each; ms, median (max):")
    print(f"  {'streams':>7s} {'start->powered_down':>19s} {'drain':>13s} {'checkpoint':>13s} "
          f"{'stop':>13s} {'last stream end->drain end':>26s} {'whole':>7s}")

    def col(values: list[float], width: int, digits: int = 0) -> str:
        if not values:
            return "-".rjust(width)
        return (f"{statistics.median(values) * 1000:.{digits}f} "
                f"({max(values) * 1000:.{digits}f})").rjust(width)

    for n, rs in results.items():
        tail = [r.last_stream_to_drain_end for r in rs if r.last_stream_to_drain_end is not None]
        print(f"  {n:>7d} {col([r.total for r in rs], 19)} "
              f"{col([r.steps.get('drain', 0.0) for r in rs], 13)} "
              f"{col([r.steps.get('checkpoint', 0.0) for r in rs], 13)} "
              f"{col([r.steps.get('stop', 0.0) for r in rs], 13)} {col(tail, 26, 1)} "
              f"{sum(r.whole for r in rs):>3d}/{sum(r.streams for r in rs)}")
        problems = [p for r in rs for p in r.problems]
        if problems:
            print(f"  (streams not whole: {'; '.join(sorted(set(problems)))[:300]}; the "
                  "daemon's log says why)")
        early = sum(r.streams - r.in_flight_at_start for r in rs)
        if early:
            print(f"  ({early} streams ended before the power-down started: make them longer)")
    print("  drain = the streams' remaining time; the next column is what the drain adds to "
          "it (the log's ms timestamps against the client's clock)", flush=True)


# --- c. the battery ceiling -------------------------------------------------------------------


@dataclass
class Runtime:
    fraction: float
    online_runtime: float
    ob_first: float  # battery.runtime as upsd first shows OB
    ob_settled: float  # ... SETTLE_S after OB
    gpu_w: float  # what the daemon reads then, both GPUs
    limit_w: float
    to_ceiling: float | None  # OB in the control file -> the higher runtime in upsd
    model_writes: int
    model_errors: list[str]


SETTLE_S = 8.0


def runtime_run(base: Path, ups: NutServer, fraction: float) -> Runtime:
    tmp = base / f"c-{fraction:g}"
    tmp.mkdir(parents=True, exist_ok=True)
    svc = [fake_service("chat0", free_port(), gpus=[0], restart=RESTART, health=HEALTH)]
    doc = power_doc(tmp, ups, svc, poll_interval_s=0.5, on_battery_power_fraction=fraction,
                    low_runtime_s=60, low_charge_pct=5)
    (tmp / "sim.json").write_text(json.dumps({SIM_UUID.format(i): {"power_w": GPU_LOAD_W}
                                              for i in range(2)}))
    control = tmp / "ups.control"
    control.write_text("OL\n")
    online(ups)
    with daemon(tmp, doc) as d:
        d.wait_state("chat0", "ready")
        wait_until(lambda: all(g["power_w"] == GPU_LOAD_W for g in d.status()["gpus"]), 10,
                   0.05, what="the GPUs' readings")
        model = UpsModel(ups.datafile, BATTERY_WH, BASE_W, control=control,
                         socket_path=d.socket)
        thread = model.start_thread()
        try:
            full = BATTERY_WH * 3600 / (BASE_W + 2 * GPU_LOAD_W)
            wait_until(lambda: abs(float(ups.query("battery.runtime")) - full) < 2, 10, 0.05,
                       what="the model's runtime in upsd")
            on_line = float(ups.query("battery.runtime"))
            control.write_text("OB DISCHRG\n")
            t0 = time.monotonic()
            wait_until(lambda: ups.query("ups.status") == "OB DISCHRG", 10, 0.01,
                       what="OB in upsd")
            first = float(ups.query("battery.runtime"))
            to_ceiling = None
            while time.monotonic() - t0 < SETTLE_S:
                rt = float(ups.query("battery.runtime"))
                if to_ceiling is None and rt > first + 10:
                    to_ceiling = time.monotonic() - t0
                time.sleep(0.02)
            settled = float(ups.query("battery.runtime"))
            st = d.status()
            assert st["supervisor"]["mode"] == "on_battery", st["supervisor"]["mode"]
            gpu_w = sum(g["power_w"] or 0.0 for g in st["gpus"])
            limit = st["gpus"][0]["power_limit_w"]
            errors = [e for e in (model.gpu_error, model.control_error, model.write_error)
                      if e is not None]
        finally:
            # back on line through the model itself: NutServer.set() makes its mtime greater
            # than its own last one only, and dummy-ups ignores a file whose whole-second
            # mtime it has seen already (the model may have run a second ahead)
            control.write_text("OL\n")
            with contextlib.suppress(AssertionError, NutServerError):
                ups.wait_status("OL", 5)
            model.stop()
            thread.join(5)
    return Runtime(fraction, on_line, first, settled, gpu_w, limit, to_ceiling, model.writes,
                   errors)


def bench_runtime(base: Path, ups: NutServer) -> None:
    runs = [runtime_run(base, ups, f) for f in (1.0, 0.6)]
    print(f"battery.runtime in upsd on battery (ups_model: {BATTERY_WH:g} Wh, base "
          f"{BASE_W:g} W, 2 sim GPUs whose load would draw {GPU_LOAD_W:g} W each, "
          f"default limit 300 W; {SETTLE_S:g} s after OB):")
    for r in runs:
        gained = "" if r is runs[0] else \
            f"   +{r.ob_settled - runs[0].ob_settled:.0f} s " \
            f"(+{(r.ob_settled / runs[0].ob_settled - 1) * 100:.0f} %)"
        when = "-" if r.to_ceiling is None else f"{r.to_ceiling:.2f} s"
        print(f"  on_battery_power_fraction {r.fraction:g}: on line {r.online_runtime:.0f} s, "
              f"at OB {r.ob_first:.0f} s, after {SETTLE_S:g} s {r.ob_settled:.0f} s; GPUs "
              f"draw {r.gpu_w:.0f} W (limit {r.limit_w:.0f} W each); runtime up after: "
              f"{when}{gained}")
        if r.model_errors:
            print(f"    ups_model: {'; '.join(r.model_errors)}")
    print("  (OB in the control file -> the higher runtime in upsd: the ceiling set at the "
          "next NUT poll, the GPU reading at the next GPU poll (0.2 s), the model's tick "
          "(0.5 s) and dummy-ups' file poll (1 s))", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10, help="reaction trials per poll interval")
    ap.add_argument("--polls", default="0.5,2", help="[power] poll_interval_s values")
    ap.add_argument("--seq-trials", type=int, default=3, help="sequence trials per N")
    ap.add_argument("--streams", default="0,8,32", help="N in-flight streams")
    ap.add_argument("--parts", default="abc", help="which parts: a, b, c")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (configs, the daemons' logs)")
    a = ap.parse_args()
    try:
        polls = [float(p) for p in a.polls.split(",")]
        counts = [int(n) for n in a.streams.split(",")]
    except ValueError as exc:
        ap.error(f"--polls / --streams: {exc}")
    if not all(0 < p <= 60 for p in polls) or not all(0 <= n <= 256 for n in counts) \
            or not 1 <= a.trials <= 1000 or not 1 <= a.seq_trials <= 100 \
            or set(a.parts) - set("abc"):
        ap.error("--polls in (0, 60], --streams in [0, 256], --trials 1-1000, "
                 "--seq-trials 1-100, --parts of a, b, c")
    missing = nut_missing()
    if missing:
        sys.exit(f"bench/power.py: {missing}")
    try:
        run(a, polls, counts)
    except (AssertionError, NutServerError, OSError) as exc:
        sys.exit(f"bench/power.py: failed: {exc}")


def run(a: argparse.Namespace, polls: list[float], counts: list[int]) -> None:
    started = time.monotonic()
    workdir: contextlib.AbstractContextManager[str] = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="llmsup-power-")) if a.keep
        else tempfile.TemporaryDirectory(prefix="llmsup-power-"))
    with workdir as dname, NutServer(Path(dname) / "nut") as ups:
        base = Path(dname)
        if a.keep:
            print(f"working directory (kept): {base}")
        print(f"upsd + dummy-ups up in {ups.startup_s:.1f} s", flush=True)
        if "a" in a.parts:
            bench_reaction(base, ups, polls, a.trials)
        if "b" in a.parts:
            bench_sequence(base, ups, counts, a.seq_trials)
        if "c" in a.parts:
            bench_runtime(base, ups)
    print(f"bench/power.py took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
