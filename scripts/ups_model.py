#!/usr/bin/env python3
"""A small UPS model for the demo and the benchmarks: the battery behind a NUT dummy-ups
driver, drained by what the box draws.

    python3 scripts/ups_model.py --device ETC/dummy.dev --control CTL \\
        --battery-wh 200 --base-w 150 --socket /run/llm-supervisor/control.sock

Every `--interval` (0.5 s) it
  - reads the UPS status from the control file (one line of NUT flags: `OL`, `OB DISCHRG`,
    `OB LB`, ...; written by the demo or the bench; missing: `--status`, OL by default);
  - reads the GPUs' draw from the supervisor: the sum of `gpus[].power_w` in its status, over
    its control socket (one request of the control protocol, 1 s at most; the last good value
    is kept while the daemon does not answer), or `--gpu-w` without `--socket`;
  - on battery (OB in the flags), takes (base + GPUs) x the time since the last tick from the
    battery; on line, gives `--recharge-w` back to it;
  - rewrites the driver's file, atomically (temp file + os.replace), with `ups.status`,
    `battery.charge` (remaining energy / capacity, in %), `battery.runtime` (remaining energy /
    (base + GPUs), in s), `ups.load` (% of `--nominal-w`) and `ups.realpower` (W). `LB` is
    added to the status on battery when the charge or the runtime falls under
    `--low-charge-pct` / `--low-runtime-s` (0: never) or the battery is empty.

dummy-ups (`mode = dummy-once`) re-reads its file only when the file's mtime changes, in
whole seconds, once per its `pollinterval` (1 s): every write here gets a whole-second mtime
strictly greater than the last one (at most one second ahead of the clock; a write that would
need more waits for the next tick, unless the status changed), so no change is ever lost, and
upsd shows a change within about a second.

Importable: `UpsModel(...).tick()` does one step and returns what it wrote (`UpsSnapshot`);
`run()` loops. Standard library only; errors in the inputs are logged (once per distinct
error) and never stop the loop; bad arguments are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger("ups_model")

NUT_FLAGS = frozenset({
    "OL", "OB", "LB", "HB", "RB", "CHRG", "DISCHRG", "BYPASS", "CAL", "OFF", "OVER", "TRIM",
    "BOOST", "FSD", "ALARM", "TEST", "WAIT",
})
MAX_CONTROL_BYTES = 256
MAX_REPLY_BYTES = 8 * 1024 * 1024
SOCKET_TIMEOUT_S = 1.0
MAX_RUNTIME_S = 10 * 86400  # what the supervisor takes as plausible
MAX_INTERVAL_S = 60.0


class ModelError(ValueError):
    """A bad argument to the model (a message fit for one line on stderr)."""


def _finite(name: str, value: float, *, low: float = 0.0, low_ok: bool = True,
            high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{name} must be a number, not {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ModelError(f"{name} must be a finite number, not {value!r}")
    if v < low or (v == low and not low_ok) or v > high:
        bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}"
                                                        if high != math.inf else "")
        raise ModelError(f"{name} must be {bound}, not {v:g}")
    return v


def parse_status(text: str) -> str:
    """The NUT flags of a status line, checked and upper-cased ("ob dischrg" -> "OB DISCHRG").
    Raises ModelError for anything else, so that a typo never becomes a status."""
    flags = text.upper().split()
    if not flags:
        raise ModelError("the status is empty")
    bad = [f for f in flags if f not in NUT_FLAGS]
    if bad:
        raise ModelError(f"not a NUT status flag: {' '.join(bad)[:60]!r} "
                         f"(expected some of {' '.join(sorted(NUT_FLAGS))})")
    return " ".join(dict.fromkeys(flags))  # in order, once each


def supervisor_gpu_watts(path: str, timeout_s: float = SOCKET_TIMEOUT_S) -> float:
    """The sum of `gpus[].power_w` in the supervisor's status, asked over its control socket
    (one request of the control protocol). GPUs without a fresh reading count 0 W. Raises
    OSError (unreachable, too slow) or ValueError (a reply that is not the status)."""
    req = json.dumps({"v": 1, "id": 1, "cmd": "status", "args": {}}).encode() + b"\n"
    deadline = time.monotonic() + timeout_s
    buf = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(req)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole reply within {timeout_s:g} s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the supervisor closed the connection "
                                           "without a whole reply")
            buf += chunk
            if len(buf) > MAX_REPLY_BYTES:
                raise ValueError(f"reply larger than {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(buf)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable reply: {exc}") from None
    if not isinstance(reply, dict):
        raise ValueError("unreadable reply: not a JSON object")
    if reply.get("ok") is not True:
        err = reply.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        raise ValueError(f"status refused: {str(msg)[:200]}")
    data = reply.get("data")
    gpus = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(gpus, list):
        raise ValueError("the status has no gpus list")
    total = 0.0
    for gpu in gpus:
        w = gpu.get("power_w") if isinstance(gpu, dict) else None
        if isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) \
                and 0 <= w < 100_000:
            total += float(w)
    return total


@dataclass(frozen=True)
class UpsSnapshot:
    """What one tick computed (and wrote, unless `written` is False)."""

    status: str
    charge_pct: float
    runtime_s: float
    load_w: float
    gpu_w: float
    energy_wh: float
    written: bool

    def variables(self, nominal_w: float) -> dict[str, str]:
        return {
            "ups.status": self.status,
            "battery.charge": str(round(self.charge_pct)),
            "battery.runtime": str(round(self.runtime_s)),
            "ups.load": str(round(100.0 * self.load_w / nominal_w)),
            "ups.realpower": str(round(self.load_w)),
        }


class UpsModel:
    """The battery. `device` is the dummy-ups data file (its directory must exist)."""

    def __init__(self, device: str | Path, battery_wh: float, base_w: float, *,
                 control: str | Path | None = None, status: str = "OL",
                 socket_path: str | None = None, gpu_w: float = 0.0,
                 charge_pct: float = 100.0, nominal_w: float = 1500.0,
                 recharge_w: float = 0.0, low_charge_pct: float = 0.0,
                 low_runtime_s: float = 0.0, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.device = Path(device)
        if not self.device.parent.is_dir():
            raise ModelError(f"--device {self.device}: directory {self.device.parent} "
                             "does not exist")
        if self.device.exists() and not self.device.is_file():
            raise ModelError(f"--device {self.device}: not a regular file")
        self.capacity_wh = _finite("battery_wh", battery_wh, low=0.0, low_ok=False,
                                   high=1e7)
        self.base_w = _finite("base_w", base_w, low=0.0, low_ok=False, high=1e6)
        self.fixed_gpu_w = _finite("gpu_w", gpu_w, high=1e6)
        self.nominal_w = _finite("nominal_w", nominal_w, low=0.0, low_ok=False, high=1e7)
        self.recharge_w = _finite("recharge_w", recharge_w, high=1e7)
        self.low_charge_pct = _finite("low_charge_pct", low_charge_pct, high=100.0)
        self.low_runtime_s = _finite("low_runtime_s", low_runtime_s, high=MAX_RUNTIME_S)
        self.interval_s = _finite("interval_s", interval_s, low=0.05, high=MAX_INTERVAL_S)
        self.energy_wh = self.capacity_wh * _finite("charge_pct", charge_pct, high=100.0) / 100
        self.control = Path(control) if control is not None else None
        self.socket_path = socket_path
        self.status = parse_status(status)  # the control file's, without the model's LB
        self.gpu_w = self.fixed_gpu_w if socket_path is None else 0.0
        self.gpu_error: str | None = None  # the last error reading the supervisor, if any
        self.control_error: str | None = None
        self.write_error: str | None = None
        self.writes = 0
        self._clock = clock
        self._wall = wall
        self._last_tick: float | None = None
        self._mtime = 0  # whole seconds of our last write
        self._written: dict[str, str] | None = None
        self._stop = threading.Event()

    # --- inputs -------------------------------------------------------------------------------

    def read_control(self) -> str:
        """The status the control file asks for; the last one while it is unreadable or
        wrong (said once per distinct problem)."""
        if self.control is None:
            return self.status
        try:
            with self.control.open("rb") as fh:
                raw = fh.read(MAX_CONTROL_BYTES + 1)
            if len(raw) > MAX_CONTROL_BYTES:
                raise ModelError(f"longer than {MAX_CONTROL_BYTES} bytes")
            line = next((ln for ln in raw.decode("utf-8").splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")), "")
            self.status = parse_status(line)
            self._clear("control_error", f"control file {self.control}: readable again")
        except FileNotFoundError:
            pass  # not written yet: the initial status
        except (OSError, UnicodeDecodeError, ModelError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._problem("control_error", f"control file {self.control}: {text}; keeping "
                          f"{self.status!r}")
        return self.status

    def read_gpu_w(self) -> float:
        if self.socket_path is None:
            return self.fixed_gpu_w
        try:
            self.gpu_w = supervisor_gpu_watts(self.socket_path)
            self._clear("gpu_error", "the supervisor answers again")
        except (OSError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._problem("gpu_error", f"GPU draw from {self.socket_path}: "
                          f"{text or type(exc).__name__}; keeping {self.gpu_w:g} W")
        return self.gpu_w

    def _problem(self, attr: str, message: str) -> None:
        if getattr(self, attr) != message:
            log.error("%s", message)
        setattr(self, attr, message)

    def _clear(self, attr: str, message: str) -> None:
        if getattr(self, attr) is not None:
            log.warning("%s", message)
        setattr(self, attr, None)

    # --- one step -----------------------------------------------------------------------------

    def tick(self) -> UpsSnapshot:
        now = self._clock()
        status = self.read_control()
        gpu_w = self.read_gpu_w()
        load_w = self.base_w + gpu_w
        flags = status.split()
        on_battery = "OB" in flags
        if self._last_tick is not None:
            dt_h = max(0.0, min(now - self._last_tick, MAX_INTERVAL_S)) / 3600.0
            if on_battery:
                self.energy_wh = max(0.0, self.energy_wh - load_w * dt_h)
            else:
                self.energy_wh = min(self.capacity_wh, self.energy_wh + self.recharge_w * dt_h)
        self._last_tick = now
        charge = 100.0 * self.energy_wh / self.capacity_wh
        runtime = min(MAX_RUNTIME_S, self.energy_wh * 3600.0 / load_w)
        if on_battery and "LB" not in flags and (
                self.energy_wh <= 0.0 or charge < self.low_charge_pct
                or runtime < self.low_runtime_s):
            flags.append("LB")
        snap = UpsSnapshot(" ".join(flags), charge, runtime, load_w, gpu_w, self.energy_wh,
                           False)
        written = self._write(snap.variables(self.nominal_w))
        return UpsSnapshot(snap.status, charge, runtime, load_w, gpu_w, self.energy_wh,
                           written)

    def _write(self, values: dict[str, str]) -> bool:
        """Write the device file if anything changed, with a strictly greater whole-second
        mtime than any before (see the module's text). False when nothing was written."""
        if values == self._written:
            return False
        wall = self._wall()
        last = self._mtime
        with contextlib.suppress(OSError):
            last = max(last, int(self.device.stat().st_mtime))  # also another writer's
        mtime = max(int(wall), last + 1)
        status_changed = self._written is None or \
            self._written.get("ups.status") != values["ups.status"]
        if mtime > wall + 1.0 and not status_changed:
            return False  # the clock catches up; the next tick writes
        text = "".join(f"{k}: {v}\n" for k, v in values.items())
        tmp = self.device.with_name(f".{self.device.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.utime(tmp, (mtime, mtime))
            os.replace(tmp, self.device)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._problem("write_error", f"cannot write {self.device}: "
                          f"{exc.strerror or exc}")
            return False
        self._clear("write_error", f"{self.device} written again")
        self._mtime = mtime
        self._written = values
        self.writes += 1
        return True

    # --- the loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, duration_s: float | None = None,
            on_tick: Callable[[UpsSnapshot], None] | None = None) -> None:
        """Tick every interval_s until stop() (from another thread or a signal handler) or
        for duration_s."""
        end = None if duration_s is None else self._clock() + duration_s
        while not self._stop.is_set():
            started = self._clock()
            snap = self.tick()
            if on_tick is not None:
                on_tick(snap)
            if end is not None and self._clock() >= end:
                return
            self._stop.wait(max(0.0, self.interval_s - (self._clock() - started)))

    def start_thread(self) -> threading.Thread:
        """run() in a daemon thread (for the bench); stop() ends it."""
        thread = threading.Thread(target=self.run, name="ups-model", daemon=True)
        thread.start()
        return thread


# --- command line ---------------------------------------------------------------------------------


def _number(low: float, low_ok: bool = True, high: float = math.inf
            ) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return _finite("value", value, low=low, low_ok=low_ok, high=high)
        except ModelError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None
    return parse


def _status_arg(text: str) -> str:
    try:
        return parse_status(text)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ups_model.py", description="A UPS battery behind a NUT dummy-ups driver, drained "
        "by the box's base load and its GPUs' draw (from llm-supervisor's status).")
    ap.add_argument("--device", required=True, help="the dummy-ups data file to rewrite")
    ap.add_argument("--control", default=None,
                    help="a file with the UPS status (OL, OB DISCHRG, ...); re-read each tick")
    ap.add_argument("--status", type=_status_arg, default="OL",
                    help="the status while the control file is missing (default OL)")
    ap.add_argument("--battery-wh", type=_number(0, False, 1e7), default=200.0,
                    help="battery energy when full, Wh (default 200)")
    ap.add_argument("--charge", type=_number(0, True, 100), default=100.0,
                    help="initial charge, %% (default 100)")
    ap.add_argument("--base-w", type=_number(0, False, 1e6), default=150.0,
                    help="the box's draw besides the GPUs, W (default 150)")
    ap.add_argument("--socket", default=None,
                    help="llm-supervisor's control socket, for the GPUs' draw")
    ap.add_argument("--gpu-w", type=_number(0, True, 1e6), default=0.0,
                    help="a fixed GPU draw, W, without --socket (default 0)")
    ap.add_argument("--nominal-w", type=_number(0, False, 1e7), default=1500.0,
                    help="the UPS's rating, for ups.load (default 1500 W)")
    ap.add_argument("--recharge-w", type=_number(0, True, 1e7), default=0.0,
                    help="power into the battery while on line, W (default 0)")
    ap.add_argument("--low-charge-pct", type=_number(0, True, 100), default=0.0,
                    help="add LB under this charge on battery (default 0: only when empty)")
    ap.add_argument("--low-runtime-s", type=_number(0, True, MAX_RUNTIME_S), default=0.0,
                    help="add LB under this runtime on battery (default 0)")
    ap.add_argument("--interval", type=_number(0.05, True, MAX_INTERVAL_S), default=0.5,
                    help="seconds between ticks (default 0.5)")
    ap.add_argument("--duration", type=_number(0, False, 365 * 86400), default=None,
                    help="stop after this many seconds (default: until SIGTERM/SIGINT)")
    ap.add_argument("--once", action="store_true", help="one tick, print it, exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every write")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="ups_model: %(message)s")
    try:
        model = UpsModel(a.device, a.battery_wh, a.base_w, control=a.control, status=a.status,
                         socket_path=a.socket, gpu_w=a.gpu_w, charge_pct=a.charge,
                         nominal_w=a.nominal_w, recharge_w=a.recharge_w,
                         low_charge_pct=a.low_charge_pct, low_runtime_s=a.low_runtime_s,
                         interval_s=a.interval)
    except ModelError as exc:
        print(f"ups_model.py: error: {exc}", file=sys.stderr)
        return 2

    def show(snap: UpsSnapshot) -> None:
        if snap.written or a.once:
            log.info("%s  charge %.1f %%  runtime %.0f s  load %.0f W (GPUs %.0f W)",
                     snap.status, snap.charge_pct, snap.runtime_s, snap.load_w, snap.gpu_w)

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        model.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if a.once:
        snap = model.tick()
        print(json.dumps({**snap.variables(model.nominal_w), "written": snap.written}))
        return 0 if snap.written or model.write_error is None else 1
    model.run(a.duration, show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
