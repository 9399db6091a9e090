"""Chaos soak: everything that goes wrong on a GPU box, at once, under steady streaming load.

    .venv/bin/python bench/soak.py [--seconds 300] [--seed N] [--clients 12] [--json]

The daemon runs as a real process with a fake systemd (NOTIFY_SOCKET, WATCHDOG_USEC), a real
upsd + dummy-ups, four simulated GPUs of 16 GiB and 8 services behind gates and the router:
two real llama-server processes on a generated tiny model (one always, one on demand) and
six fake backends (three always, three on demand, so that models swap on GPU1 and GPU3).
Clients stream completions through the router without pause. Faults, one every 0.3-1.2 s:
kill -9 of a server, SIGSTOP for a few seconds, /health failing, a wedged engine (health
fine, no tokens), a GPU warm, throttled or critical, a GPU lost and back, the UPS on battery
for a moment (within the grace), the UPS on low battery (a real power-down, then the power
returns), and llmctl swap, reload and drain/resume. Then everything is put right, and the
invariants are checked:
- every `always` service is ready again, every on-demand one ready or unloaded (`idle`);
- no orphan: after the daemon's stop no process of any launch remains;
- no request admitted and then lost, except by a documented cause: a stream cut while its
  server was killed, stopped, wedged, its GPU lost or critical, or a power-down happened;
- no power-down that was not asked for (only the injected low batteries);
- the supervisor never restarted (one pid throughout, exit 0 at the end);
- no watchdog ping late (never more than WATCHDOG_USEC/2 + 0.5 s apart);
- memory and file descriptors flat (after the faults against after the warm-up).
Prints the counts of faults injected and requests by outcome, and the invariants; exits 1 if
one fails. docs/reliability.md records a run; tests/test_chaos.py runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from nutserver import NutServer  # noqa: E402

from helpers import (  # noqa: E402
    SIM_UUID,
    Daemon,
    NotifyListener,
    base_config,
    fake_service,
    free_port,
    llama_server_binary,
    make_tiny_model,
    wait_until,
)

GIB = 1024**3
WATCHDOG_USEC = 2_000_000
# what may cut a stream in flight, and says so (documented): not swap, reload or drain,
# which must lose nothing
CUTTING = ("kill9", "sigstop", "gen_hang", "gpu_lost", "gpu_critical", "power_low",
           "health_fail")


class Soak:
    def __init__(self, tmp: Path, seconds: float, seed: int, clients: int) -> None:
        self.tmp = tmp
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.clients = clients
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.lost: list[dict[str, Any]] = []
        # service -> [(start, end, kind)]: when a fault that may cut a stream touched it
        self.touched: dict[str, list[tuple[float, float, str]]] = {}
        self.power_lows = 0
        self.stop_faults = asyncio.Event()
        self.sim_state: dict[str, dict[str, Any]] = {}

    # --- the set-up -------------------------------------------------------------------------

    def config(self, ups: NutServer) -> dict[str, Any]:
        tmp = self.tmp
        llama = llama_server_binary()
        model = make_tiny_model(tmp / "tiny.gguf") if llama else None

        def fake(name: str, gpu: int, **extra: Any) -> dict[str, Any]:
            svc = fake_service(name, free_port(), gpus=[gpu], metrics_url="", **extra)
            svc["health"] = {"interval_s": 0.3, "timeout_s": 0.3, "failures": 3,
                             "startup_timeout_s": 15}
            svc["restart"] = {"backoff_initial_s": 0.2, "backoff_max_s": 1,
                              "max_restarts": 10000, "window_s": 60}
            svc["probe"] = {"kind": "completion", "interval_s": 1, "timeout_s": 1,
                            "failures": 2, "endpoint": "chat"}
            return svc

        def real(name: str, gpu: int, **extra: Any) -> dict[str, Any]:
            assert llama is not None and model is not None
            return {"name": name, "gpus": [gpu], "port": free_port(), "metrics_url": "",
                    "command": [llama, "-m", str(model), "--host", "127.0.0.1", "--port",
                                "{port}", "-c", "512", "-t", "1", "--no-webui",
                                "--threads-http", "8"],
                    "health": {"interval_s": 0.3, "timeout_s": 0.3, "failures": 3,
                               "startup_timeout_s": 30},
                    "restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1,
                                "max_restarts": 10000, "window_s": 60},
                    "stop": {"timeout_s": 3},
                    # llama-server holds an HTTP thread per open connection (the gate keeps
                    # some alive, the health checks one) and closes new ones beyond
                    # --threads-http: more threads than the gate admits at once
                    "gate": {"max_concurrency": 4, **extra.pop("gate", {})}, **extra}

        od = {"start": "on-demand", "vram_gb": 10, "gate": {"queue_timeout_s": 20}}
        services = [fake("alpha", 0, gate={"listen": f"127.0.0.1:{free_port()}"}),
                    fake("beta", 2), fake("gamma", 2),
                    fake("delta", 1, **od), fake("eps", 3, **od), fake("zeta", 3, **od)]
        if llama:
            services += [real("coder", 0), real("writer", 1, **od)]
        else:
            services += [fake("coder", 0), fake("writer", 1, **od)]
        doc = base_config(tmp, services, gpus=4, router={"listen": f"127.0.0.1:{free_port()}"},
                          thermal={"step_interval_s": 0.5, "pause_timeout_s": 30},
                          power={"source": "nut", "ups": ups.ups, "poll_interval_s": 0.2,
                                 "on_battery_grace_s": 2.0, "deadtime_s": 5,
                                 "drain_timeout_s": 3, "stop_timeout_s": 5,
                                 "on_battery_power_fraction": 0.8})
        doc["gpu"]["poll_interval_s"] = 0.2
        for g in doc["gpu"]["sim"]:
            g["memory_total_bytes"] = 16 * GIB
        return doc

    def write_sim(self) -> None:
        path = Path(self.doc["gpu"]["sim_state_file"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.sim_state))
        os.replace(tmp, path)

    # --- load ----------------------------------------------------------------------------------

    async def client(self, session: aiohttp.ClientSession, router: str, models: list[str]
                     ) -> None:
        while not self.stop_faults.is_set():
            model = self.rng.choice(models)
            started = time.monotonic()
            body = {"model": model, "stream": True, "max_tokens": 12,
                    "messages": [{"role": "user", "content": "hi"}]}
            if model not in ("coder", "writer"):
                body["fake_token_delay_s"] = 0.02
            head = False
            try:
                async with session.post(f"{router}/v1/chat/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(total=60)) as r:
                    head = True
                    data = await r.read()
                    if r.status == 502:  # the server failed before it answered
                        self._lost(model, started, "502", what="502")
                        await asyncio.sleep(0.05)
                        continue
                    if r.status in (429, 503):
                        self.outcomes[f"refused {r.status}"] += 1  # never admitted: fine
                        await asyncio.sleep(0.05)
                        continue
                    if r.status != 200:  # anything else is wrong
                        self.outcomes[f"unexpected {r.status}"] += 1
                        self.lost.append({"model": model, "how": f"HTTP {r.status}",
                                          "at": round(time.monotonic() - self.t0, 2)})
                        await asyncio.sleep(0.05)
                        continue
                    if b"[DONE]" in data and b"upstream_cut" not in data:
                        self.outcomes["complete"] += 1
                        continue
                    self._lost(model, started, "cut")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._lost(model, started, f"{'after' if head else 'before'} the head: "
                           f"{type(exc).__name__}: {exc}"[:160])

    def _lost(self, model: str, started: float, how: str, what: str = "lost") -> None:
        """A request admitted and not completed (or a 502: its server failed before it
        answered): explained if a fault that can do that touched its service meanwhile."""
        end = time.monotonic()
        causes = {k for s, e, k in self.touched.get(model, []) + self.touched.get("*", [])
                  if s <= end and e >= started - 1.0}
        if causes & set(CUTTING):
            self.outcomes[f"{what}, explained ({'/'.join(sorted(causes & set(CUTTING)))})"] += 1
        else:
            self.outcomes[f"{what}, unexplained"] += 1
            self.lost.append({"model": model, "how": how, "at": round(end - self.t0, 2),
                              "wall": time.strftime("%H:%M:%S", time.localtime())})

    def touch(self, service: str, kind: str, duration: float = 1.0) -> None:
        now = time.monotonic()
        self.touched.setdefault(service, []).append((now, now + duration + 2.0, kind))

    # --- faults ----------------------------------------------------------------------------

    def pid_of(self, d: Daemon, name: str) -> int | None:
        try:
            pid = d.service(name)["pid"]
        except Exception:
            return None
        return int(pid) if pid else None

    async def fault(self, d: Daemon, names: list[str], gpus_of: dict[str, int]) -> None:
        kind = self.rng.choices(
            ["kill9", "sigstop", "health_fail", "gen_hang", "gpu_warm", "gpu_critical",
             "gpu_lost", "ups_flap", "power_low", "swap", "reload", "drain"],
            weights=[6, 3, 3, 2, 3, 2, 2, 3, 1, 2, 1, 2])[0]
        if kind == "power_low" and self.power_lows >= max(1, int(self.seconds // 120)):
            kind = "ups_flap"
        name = self.rng.choice(names)
        fakes = [n for n in names if n not in ("coder", "writer") or not llama_server_binary()]
        if kind in ("health_fail", "gen_hang"):
            name = self.rng.choice(fakes)
        self.faults[kind] += 1
        loop = asyncio.get_running_loop()
        if kind == "kill9":
            pid = self.pid_of(d, name)
            if not pid:
                self.faults[kind] -= 1  # nothing running to kill: not a fault
            else:
                self.touch(name, kind)
                fd = _ours(pid, name)
                if fd is not None:
                    _send(fd, signal.SIGKILL)
                    os.close(fd)
        elif kind == "sigstop":
            pid = self.pid_of(d, name)
            if not pid:
                self.faults[kind] -= 1
            else:
                hold = self.rng.uniform(0.5, 3.0)
                self.touch(name, kind, hold)
                fd = _ours(pid, name)
                if fd is not None:
                    _send(fd, signal.SIGSTOP)
                    loop.call_later(hold, lambda: _cont(fd))
        elif kind in ("health_fail", "gen_hang"):
            port = self.doc_port(name)
            key = "health_status" if kind == "health_fail" else "gen_hang"
            bad, good = ("500", "200") if kind == "health_fail" else ("1", "0")
            hold = self.rng.uniform(0.5, 3.0)
            self.touch(name, kind, hold)
            await _ctl(port, key, bad)
            await asyncio.sleep(hold)
            await _ctl(port, key, good)
        elif kind in ("gpu_warm", "gpu_critical", "gpu_lost"):
            gpu = self.rng.randrange(4)
            uuid = SIM_UUID.format(gpu)
            hold = self.rng.uniform(0.5, 3.0)
            for svc, g in gpus_of.items():
                if g == gpu and kind != "gpu_warm":
                    self.touch(svc, kind, hold)
            entry = self.sim_state.setdefault(uuid, {})
            if kind == "gpu_lost":
                entry["lost"] = True
            else:
                entry["temperature_c"] = 86 if kind == "gpu_warm" else 90
            self.write_sim()
            await asyncio.sleep(hold)
            entry.pop("lost", None)
            entry["temperature_c"] = 40
            self.write_sim()
        elif kind == "ups_flap":
            self.ups.set(status="OB DISCHRG")
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # within the 2 s grace
            self.ups.set(status="OL")
        elif kind == "power_low":
            self.power_lows += 1
            self.touch("*", kind, 15)
            self.ups.set(status="OB DISCHRG LB", charge=5)
            await asyncio.sleep(6)
            self.ups.set(status="OL CHRG", charge=80)
            self.touch("*", kind, 15)
        elif kind == "swap":
            r = await asyncio.to_thread(d.llmctl, "swap", name, timeout=60)
            if r.returncode != 0:  # refused (not ready, unloaded): no swap happened
                self.faults[kind] -= 1
                self.faults["swap refused (not ready)"] += 1
        elif kind == "reload":
            r = await asyncio.to_thread(d.llmctl, "reload", timeout=120)
            if r.returncode != 0:
                self.faults["reload failed"] += 1
        elif kind == "drain":
            await asyncio.to_thread(d.llmctl, "drain", name, "--timeout", "2", timeout=30)
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await asyncio.to_thread(d.llmctl, "resume", name, timeout=30)

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        notify = NotifyListener(self.tmp / "notify.sock")
        with NutServer(self.tmp / "nut") as ups:
            self.ups = ups
            doc = self.config(ups)
            self.doc = doc
            names = [s["name"] for s in doc["service"]]
            gpus_of = {s["name"]: s["gpus"][0] for s in doc["service"]}
            on_demand = {s["name"] for s in doc["service"] if s.get("start") == "on-demand"}
            env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
            d = Daemon(self.tmp, doc, env)
            d.start()
            try:
                return await self._run(d, names, gpus_of, on_demand, notify)
            finally:
                d.stop()
                notify.close()

    async def _run(self, d: Daemon, names: list[str], gpus_of: dict[str, int],
                   on_demand: set[str], notify: NotifyListener) -> dict[str, Any]:
        assert d.proc is not None
        pid = d.proc.pid
        router = f"http://{self.doc['router']['listen']}"
        for n in names:
            if n not in on_demand:
                await asyncio.to_thread(d.wait_state, n, "ready", 60)
        proc = psutil.Process(pid)
        self.t0 = time.monotonic()
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(self.client(session, router, names))
                       for _ in range(self.clients)]
            await asyncio.sleep(min(10.0, self.seconds / 5))  # warm-up: every model loaded
            base_rss, base_fds = proc.memory_info().rss, proc.num_fds()
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                try:
                    await asyncio.wait_for(self.fault(d, names, gpus_of), 120)
                except Exception as exc:  # the rig's own trouble: counted, not hidden
                    self.faults[f"injection error ({type(exc).__name__})"] += 1
                await asyncio.sleep(self.rng.uniform(0.3, 1.2))
            # put everything right, and let the load run on a little
            self.sim_state.clear()
            self.write_sim()
            self.ups.set(status="OL", charge=100)
            for n in names:
                if n not in ("coder", "writer") or not llama_server_binary():
                    port = self.doc_port(n)
                    await _ctl(port, "health_status", "200")
                    await _ctl(port, "gen_hang", "0")
            await asyncio.sleep(5)
            self.stop_faults.set()
            await asyncio.gather(*clients, return_exceptions=True)
        settled = await asyncio.to_thread(self._settled, d, names, on_demand)
        end_rss, end_fds = proc.memory_info().rss, proc.num_fds()
        status = d.status()
        text = d.logtext()
        power_downs = sum(1 for line in text.splitlines()
                          if "mode on_battery -> powering_down" in line)
        pings = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        launched = {int(line.split("launched pid ")[1].split()[0])
                    for line in text.splitlines() if "launched pid " in line}
        if os.environ.get("SOAK_KEEP_LOG"):
            Path(os.environ["SOAK_KEEP_LOG"]).write_text(text)
        d.stop()
        alive = [p for p in launched if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        exit_code = d.proc.returncode
        invariants = {
            "services back": settled,
            "no orphan": not alive,
            "no request lost unexplained": not self.lost,
            "no false power-down": power_downs == self.power_lows,
            "supervisor never restarted": status["supervisor"]["pid"] == pid and exit_code == 0,
            "watchdog never late": bool(gaps) and max(gaps) < WATCHDOG_USEC / 2e6 + 0.5,
            "memory flat": end_rss - base_rss < 40 * 1024 * 1024,
            "fds flat": end_fds - base_fds < 20,
        }
        return {
            "seconds": self.seconds, "faults": {k: v for k, v in self.faults.items() if v},
            "llama_server": bool(llama_server_binary()),
            "faults_total": sum(v for k, v in self.faults.items()
                                if " " not in k),  # not "swap refused", "injection error"
            "requests": dict(self.outcomes),
            "lost_unexplained": self.lost[:10], "power_downs": power_downs,
            "power_lows_injected": self.power_lows,
            "watchdog_max_gap_s": round(max(gaps), 3) if gaps else None,
            "rss_mb": [round(base_rss / 2**20, 1), round(end_rss / 2**20, 1)],
            "fds": [base_fds, end_fds], "orphans": alive, "exit_code": exit_code,
            "restarts": {s["name"]: s["restarts"] for s in status["services"]},
            "invariants": invariants,
            "ok": all(invariants.values()) and not any(k.startswith(("injection error",
                                                                     "reload failed"))
                                                       for k in self.faults),
        }

    def doc_port(self, name: str) -> int:
        return int(next(s for s in self.doc["service"] if s["name"] == name)["port"])

    def _settled(self, d: Daemon, names: list[str], on_demand: set[str]) -> bool:
        def ok() -> bool:
            for s in d.status()["services"]:
                if s["name"] in on_demand:
                    if s["state"] != "ready" and s["holds"] != ["idle"]:
                        return False
                elif s["state"] != "ready":
                    return False
                if s["state"] == "ready" and s.get("gate") not in (None, "none", "open"):
                    return False  # a gate left draining: not back
            return True

        try:
            wait_until(ok, 90, interval=0.2)
        except AssertionError:
            return False
        return True


def _ours(pid: int, name: str) -> int | None:
    """A pidfd of `pid` if it is still this soak's service `name` (its launch marker), read
    after the pidfd was opened: a pid read from status a moment ago may be a stranger's now
    (another suite's daemon on this machine), and a stranger is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        env = []
    if f"LLM_SUPERVISOR_SERVICE={name}".encode() not in env:
        os.close(fd)
        return None
    return fd


def _send(fd: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(fd, sig)


def _cont(fd: int) -> None:
    _send(fd, signal.SIGCONT)
    os.close(fd)


async def _ctl(port: int, key: str, value: str) -> None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/_ctl?{key}={value}",
                timeout=aiohttp.ClientTimeout(total=2)) as r:
            await r.read()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsup-soak-") as tmp:
        report = asyncio.run(Soak(Path(tmp), a.seconds, a.seed, a.clients).run())
    if a.json:
        print(json.dumps(report))
    else:
        print(f"chaos soak: {report['seconds']:g} s, real llama-server: "
              f"{report['llama_server']}, {report['faults_total']} faults "
              f"injected: {json.dumps(report['faults'], sort_keys=True)}")
        print(f"requests: {json.dumps(report['requests'], sort_keys=True)}")
        print(f"power-downs {report['power_downs']} (low batteries injected "
              f"{report['power_lows_injected']}), watchdog max gap "
              f"{report['watchdog_max_gap_s']} s, RSS {report['rss_mb']} MB, fds "
              f"{report['fds']}, orphans {report['orphans']}, exit {report['exit_code']}")
        for name, ok in report["invariants"].items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}")
        if report["lost_unexplained"]:
            print(f"  unexplained: {report['lost_unexplained']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
