"""llmctl: control llm-supervisor over its Unix socket. Imports only the protocol.

Exit codes: 0 done; 1 the daemon refused or the command failed; 2 usage error;
3 cannot reach the daemon; 4 permission denied.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from typing import Any, NoReturn

from . import __version__
from . import protocol as P

DEFAULT_SOCKET = "/run/llm-supervisor/control.sock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED = 0, 1, 2, 3, 4
CONNECT_TIMEOUT_S = 5.0
CONNECT_RETRY_S = 2.0  # how long a refused or EAGAIN connect is retried
POWER_EVENTS = P.POWER_EVENTS


class CtlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _connect(path: str) -> socket.socket:
    """A connected socket. A refused connect (nothing listens yet) or EAGAIN (the daemon's
    listen backlog is full: it is busy or out of file descriptors) is retried for
    CONNECT_RETRY_S with short sleeps; then, or on any other error, CtlError."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    pause = 0.02
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(path)
            return sock
        except FileNotFoundError:
            sock.close()
            raise CtlError(EXIT_UNREACHABLE, f"is llm-supervisor running? socket {path} not "
                           "found (systemctl status llm-supervisor)") from None
        except PermissionError:
            sock.close()
            raise CtlError(EXIT_DENIED, f"permission denied opening {path}: run as root or "
                           "as a member of the supervisor's control_group") from None
        except (ConnectionRefusedError, BlockingIOError) as exc:
            sock.close()
            if time.monotonic() + pause > deadline:
                if isinstance(exc, ConnectionRefusedError):
                    raise CtlError(EXIT_UNREACHABLE, f"is llm-supervisor running? nothing "
                                   f"listens on {path} (a stale socket)") from None
                raise CtlError(EXIT_UNREACHABLE, f"llm-supervisor does not accept "
                               f"connections on {path} (for {CONNECT_RETRY_S:g} s: too busy, "
                               "or out of file descriptors? see its log)") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        except TimeoutError:
            sock.close()
            raise CtlError(EXIT_UNREACHABLE, f"connecting to {path} timed out after "
                           f"{CONNECT_TIMEOUT_S:g} s (is llm-supervisor hung?)") from None
        except OSError as exc:
            sock.close()
            raise CtlError(EXIT_UNREACHABLE, f"cannot connect to {path}: "
                           f"{exc.strerror or exc}") from None


def call(path: str, cmd: str, args: dict[str, Any], timeout_s: float | None) -> Any:
    """One request, one reply. Raises CtlError with the exit code to use."""
    sock = _connect(path)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(P.request(cmd, args))
        except OSError:  # closed by the daemon (busy, stopping): read what it said, if any
            timeout_s = 1.0
            sock.settimeout(timeout_s)
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise CtlError(EXIT_FAILED, f"no answer from llm-supervisor within "
                               f"{timeout_s:g} s") from None
            except OSError as exc:
                raise CtlError(EXIT_UNREACHABLE, f"connection to {path} failed: "
                               f"{os.strerror(exc.errno or errno.EIO)}") from None
            if not chunk:
                raise CtlError(EXIT_UNREACHABLE, "llm-supervisor closed the connection "
                               "without answering (did it stop?)")
            buf += chunk
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise CtlError(EXIT_FAILED, "llm-supervisor sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise CtlError(EXIT_FAILED, "llm-supervisor sent an unreadable reply")
    if reply.get("ok") is True:
        return reply.get("data")
    err = reply.get("error") or {}
    code = err.get("code", "failed") if isinstance(err, dict) else "failed"
    code = code if isinstance(code, str) else "failed"
    message = err.get("message", "") if isinstance(err, dict) else str(err)
    exit_code = {P.PERMISSION_DENIED: EXIT_DENIED, P.BUSY: EXIT_UNREACHABLE}.get(
        code, EXIT_FAILED)
    raise CtlError(exit_code, f"{message} ({code})")


# --- rendering ---------------------------------------------------------------------------------


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _num(value: Any, fmt: str, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}{unit}"


def render_status(data: dict[str, Any]) -> str:
    out: list[str] = []
    s = data.get("supervisor", {})
    out.append(f"llm-supervisor {s.get('version')}  pid {s.get('pid')}  up "
               f"{_dur(s.get('uptime_s'))}  mode {s.get('mode')}  config {s.get('config_path')}")
    for op in s.get("operations") or []:
        out.append(f"in progress: {op}")
    front = data.get("front")
    if isinstance(front, dict):
        bits = [f"front (gates and router) pid {front.get('pid') or '-'}"]
        if not front.get("attached"):
            bits.append("NOT ATTACHED (being started again)")
        if front.get("adopted"):
            bits.append("taken over from an earlier supervisor")
        if front.get("restarts"):
            bits.append(f"started again {front['restarts']} time(s), "
                        f"{front.get('cut_requests', 0)} request(s) cut")
        out.append(", ".join(bits))
    services = data.get("services", [])
    gpu_index = {g["uuid"]: g["index"] for g in data.get("gpus", [])}
    if services:
        rows = [["SERVICE", "STATE", "PID", "PORT", "GPUS", "NUMA", "RESTARTS", "UPTIME",
                 "GATE", "HEALTH", "LAST EXIT"]]
        for svc in services:
            h = svc.get("health") or {}
            if h.get("ok") is True:
                health = "ok"
            elif h.get("ok") is False:
                health = h.get("last_error") or "failing"
            else:
                health = "-"
            gpus = ",".join(f"GPU{gpu_index[u]}" if u in gpu_index else u
                            for u in svc.get("gpus", [])) or "-"
            state = svc.get("state", "?")
            if state == "backoff" and svc.get("backoff_s") is not None:
                state = f"backoff {svc['backoff_s']:.1f}s"
            if svc.get("holds"):
                state += f" (held: {','.join(svc['holds'])})"
            rows.append([
                svc.get("name", "?"), state, str(svc.get("pid") or "-"),
                str(svc.get("port") or "-"), gpus,
                "-" if svc.get("numa_node") is None else str(svc["numa_node"]),
                str(svc.get("restarts", 0)), _dur(svc.get("uptime_s")),
                "-" if svc.get("gate", "none") == "none" else
                f"{svc['gate']} {svc.get('inflight', 0)}",
                health[:40],
                (svc.get("last_exit") or "-")[:40],
            ])
        out.append("")
        out.append(_table(rows))
        for svc in services:
            swap = svc.get("swap")
            if isinstance(swap, dict):
                out.append(f"  {svc['name']}: hot swap in progress, {swap.get('role')} instance "
                           f"pid {swap.get('pid') or '-'} port {swap.get('port')} "
                           f"({swap.get('state')})")
            if svc.get("drain_reasons"):
                out.append(f"  {svc['name']}: gate closed to new requests for "
                           f"{', '.join(svc['drain_reasons'])}")
            if svc.get("escaped"):
                out.append(f"  {svc['name']}: processes that escaped its process group and "
                           f"are not proven ours: {', '.join(map(str, svc['escaped']))}")
            od = svc.get("on_demand")
            if isinstance(od, dict) and od.get("message") and svc.get("state") != "ready":
                out.append(f"  {svc['name']}: {od['message']}")
        for svc in services:
            if svc.get("failed_reason"):
                out.append(f"  {svc['name']} failed: {svc['failed_reason']} "
                           f"(`llmctl reset {svc['name']}` starts it again)")
    models = data.get("models") or []
    if models:
        router = data.get("router") or {}
        rows = [["MODEL", "SERVICE", "STATE", "START", "REQUESTS", "TTFT", "COLD STARTS",
                 "SWAPS"]]
        by_name = {s.get("name"): s for s in services}
        for m in models:
            state = str(m.get("state"))
            od = (by_name.get(m.get("service")) or {}).get("on_demand") or {}
            if od.get("pinned"):
                state += " (pinned)"
            elif od.get("draining_for"):  # making room for a model that waits
                state += f" (draining for {od['draining_for']})"
            ttft = m.get("ttft_mean_s")
            rows.append([str(m.get("model"))[:48], str(m.get("service")), state,
                         str(m.get("start")), str(m.get("requests", 0)),
                         "-" if not isinstance(ttft, (int, float)) else f"{ttft * 1000:.0f}ms",
                         str(m.get("cold_starts", 0)), str(m.get("swaps", 0))])
        out.append("")
        if router.get("listen"):
            out.append(f"router: http://{router['listen']}/v1")
        out.append(_table(rows))
    gpus_data = data.get("gpus", [])
    if gpus_data:
        rows = [["GPU", "NAME", "TEMP", "MEMTEMP", "POWER", "LIMIT", "UTIL", "MEMORY", "STATE"]]
        for g in gpus_data:
            total = g.get("memory_total_bytes")
            used = g.get("memory_used_bytes")
            mem = "-" if total is None else (
                f"{(used or 0) / 2**30:.1f}/{total / 2**30:.0f} GiB used")
            committed = g.get("memory_committed_bytes")
            if total is not None and committed:  # the models' own figure (vram_gb, learned)
                mem += f", {committed / 2**30:.1f} committed"
            # the temperature the thermal policy acts on: the junction (hot spot) where the
            # board reports one (AMD), else the GPU's own (as in STATUS= and the STATE column)
            temp = g.get("hotspot_c")
            if temp is None:
                temp = g.get("temperature_c")
            rows.append([
                str(g.get("index")), str(g.get("name"))[:28],
                _num(temp, ".0f", "C"),
                _num(g.get("memory_temperature_c"), ".0f", "C"),
                _num(g.get("power_w"), ".0f", "W"), _num(g.get("power_limit_w"), ".0f", "W"),
                _num(g.get("utilization_pct"), ".0f", "%"), mem, str(g.get("thermal_state")),
            ])
        out.append("")
        out.append(_table(rows))
        for g in gpus_data:
            h = g.get("health") or {}
            notes = []
            if h.get("memory_trouble"):
                notes.append(f"memory errors (uncorrected ECC {h.get('ecc_uncorrected') or 0}"
                             f"{', retirement pending' if h.get('retirement_pending') else ''}"
                             f"{', remap failed' if h.get('remap_failed') else ''}): plan a "
                             "reset of this GPU")
            if h.get("link_degraded"):  # lanes missing (a lower gen alone is power saving)
                notes.append(f"PCIe link gen{h.get('pcie_gen')} x{h.get('pcie_width')} below "
                             f"gen{h.get('pcie_gen_max')} x{h.get('pcie_width_max')}: "
                             f"{h.get('pcie_width')} of {h.get('pcie_width_max')} lanes")
            if h.get("clock_trouble"):
                notes.append("clocks slowed: " + ", ".join(h["clock_trouble"]))
            if g.get("lost"):
                notes.append(f"lost: {g['lost']}")
            for note in notes:
                out.append(f"  GPU{g.get('index')}: {note}")
    p = data.get("power") or {}
    if p:
        line = f"power: source {p.get('source')}, state {p.get('state')}"
        if p.get("source") not in (None, "none"):
            line += (f", ups {p.get('ups')} status {p.get('status')}, charge "
                     f"{_num(p.get('charge_pct'), '.0f', '%')}, runtime "
                     f"{_dur(p.get('runtime_s'))}")
        out.append("")
        out.append(line)
        if p.get("phase") not in (None, "online"):
            extra = f"  {p['phase']}"
            if p.get("on_battery_for_s") is not None:
                extra += f", on battery for {_dur(p['on_battery_for_s'])}"
            if p.get("power_ceiling") is not None:
                extra += f", GPU power capped at {p['power_ceiling']:.0%} of default"
            out.append(extra)
        if p.get("error"):
            out.append(f"  error: {p['error']}")
        ov = p.get("override")
        if isinstance(ov, dict):
            who = ("the operator (power-event on-line --force)" if ov.get("by") == "operator"
                   else "fsd_stale_s (an aborted shutdown)" if ov.get("by") == "fsd_stale_s"
                   else "a record of this boot")
            out.append(f"  override: FSD not believed, by {who}, until upsd clears its flag")
        pd = p.get("power_down")
        if isinstance(pd, dict) and pd.get("reason"):
            out.append(f"  last power-down: {pd['reason']}")
            for st in pd.get("steps") or []:
                took = "running" if st.get("duration_s") is None else f"{st['duration_s']:.1f} s"
                out.append(f"    {st.get('step')}: {took}  {st.get('detail') or ''}".rstrip())
        for c in p.get("checkpoints") or []:
            out.append(f"  checkpoint {c.get('name')}: {c.get('result')} "
                       f"{_dur(c.get('age_s'))} ago" + (f": {c['error']}" if c.get("error")
                                                         else ""))
    return "\n".join(out)


def render_checkpoints(data: Any) -> str:
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        return json.dumps(data, indent=2)
    lines = []
    for c in data["checkpoints"]:
        if isinstance(c, dict):
            lines.append(f"{c.get('name')} ({c.get('kind')}): {c.get('result')} in "
                         f"{c.get('duration_s')} s" + (f": {c['error']}" if c.get("error")
                                                       else ""))
    return "\n".join(lines) or "no checkpoint ran"


def _brief_line(s: dict[str, Any]) -> str:
    """`name: state`, the gate, and what holds the service down: a `start` of a service held
    by the daemon (cooling, gpu_lost, powered_down) is taken, but the service starts only
    when that is released, and the operator is told so."""
    line = f"{s.get('name')}: {s.get('state')}"
    if "gate" in s:
        line += f" (gate {s['gate']}, {s.get('inflight', 0)} in flight)"
    every = [str(h) for h in s.get("holds") or []]
    holds = [h for h in every if h != "operator" and not (h == "idle" and "operator" in every)]
    if holds == ["idle"]:
        line += " (on demand: loads on its first request)"
    elif holds:
        line += f" (held: {', '.join(holds)}; starts when released)"
    return line


def render_power_event(data: Any) -> str:
    """One line for upsmon's and upssched's logs: the event, applied or why not, and where
    the power policy stands."""
    ev = data.get("event") if isinstance(data, dict) else None
    if not isinstance(ev, dict):
        return json.dumps(data, indent=2)
    name = f"{ev.get('name')}{' --force' if ev.get('forced') else ''}"
    where = f"UPS {data.get('state')}, phase {data.get('phase')}"
    if ev.get("applied"):
        return f"{name}: applied ({where})" + (f"; {ev['why']}" if ev.get("why") else "")
    return f"{name}: not applied: {ev.get('why')} ({where})"


def render_brief(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("services"), list):
        return "\n".join(_brief_line(s) for s in data["services"] if isinstance(s, dict))
    if isinstance(data, dict) and "restarted" in data:
        lines = []
        for key in ("added", "removed", "restarted", "swapped", "updated", "unchanged"):
            lines.append(f"{key}: {', '.join(data.get(key) or []) or '-'}")
        for name, state in (data.get("not_ready") or {}).items():
            lines.append(f"not ready: {name} ({state})")
        lines += [f"warning: {w}" for w in data.get("warnings") or []]
        return "\n".join(lines)
    if isinstance(data, dict) and "old_port" in data:
        return (f"{data.get('service')}: swapped, port {data.get('old_port')} -> "
                f"{data.get('port')} ({data.get('state')})")
    return json.dumps(data, indent=2)


# --- argument parsing ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"llmctl: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmctl", description="Control llm-supervisor.")
    p.add_argument("--socket", metavar="PATH",
                   default=os.environ.get("LLMCTL_SOCKET", DEFAULT_SOCKET),
                   help=f"control socket (default {DEFAULT_SOCKET}, or $LLMCTL_SOCKET)")
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.add_argument("--version", action="version", version=f"llmctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    st = sub.add_parser("status", help="services, GPUs, power, mode")
    # `llmctl status --json` as well as `llmctl --json status` (what people type)
    st.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print the daemon's reply as JSON")
    st.add_argument("service", nargs="?")

    def services(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("services", nargs="*", metavar="SERVICE")
        sp.add_argument("--all", action="store_true", help="every configured service")
        return sp

    services("start", "start services")
    stop = services("stop", "stop services (waits until they are stopped)")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop is sent")
    rs = services("restart", "restart services (waits until ready)")
    rs.add_argument("--no-wait", action="store_true", help="return once the restart is sent")
    rs.add_argument("--timeout", type=float, metavar="S", help="how long to wait for ready")
    dr = services("drain", "close the gate and wait for in-flight requests")
    dr.add_argument("--timeout", type=float, metavar="S")
    services("resume", "reopen the gate")
    sw = sub.add_parser("swap", help="hot swap: replacement instance, then switch the gate")
    sw.add_argument("service", metavar="SERVICE")
    sw.add_argument("--timeout", type=float, metavar="S",
                    help="how long the replacement may take to become ready")
    rst = sub.add_parser("reset", help="clear failed and start again")
    rst.add_argument("services", nargs="+", metavar="SERVICE")
    sub.add_parser("reload", help="re-read the config; restart only what changed")
    sub.add_parser("handover", help="exit the daemon and leave the models running for the "
                   "next one (an upgrade without systemd)",
                   description="The daemon exits; each model keeps running under its keeper "
                   "and is adopted by the next llm-supervisor started with the same config "
                   "within [supervisor] adopt_grace_s (else it is stopped).")
    cp = sub.add_parser("checkpoint", help="run the checkpoint hooks now")
    cp.add_argument("name", nargs="?", help="only this hook (default: all, in order)")
    pe = sub.add_parser("power-event", help="a power event (for upsmon NOTIFYCMD)",
                        description="Feed a power event to the daemon's power policy. "
                        "upsmon's notify types are taken too: ONLINE, ONBATT, LOWBATT, FSD.")
    pe.add_argument("event", type=_power_event, metavar="{" + ",".join(POWER_EVENTS) + "}")
    pe.add_argument("--force", action="store_true",
                    help="with on-line: the operator says the power is back, whatever upsd "
                    "or an FSD says (an override, shown in status and logged)")
    key = sub.add_parser("key", help="API keys: new, revoke, rotate, list",
                         description="API keys of [auth] keys_file, changed live (no restart, "
                         "no stream cut).")
    ks = key.add_subparsers(dest="key_command", metavar="ACTION", parser_class=_Parser)
    ks.required = True
    kn = ks.add_parser("new", help="make a key: its secret is printed once")
    kn.add_argument("id", metavar="ID")
    kn.add_argument("--models", nargs="+", metavar="MODEL", default=None,
                    help="the models it may use (default: all)")
    kn.add_argument("--rpm", type=int, metavar="N", help="requests per minute at most")
    kn.add_argument("--tpm", type=int, metavar="N", help="tokens per minute at most")
    kn.add_argument("--concurrency", type=int, metavar="N", help="requests at once at most")
    kn.add_argument("--expires", metavar="WHEN",
                    help="a date-time with its offset (2027-01-01T00:00:00Z), a date, or a "
                    "duration from now (30d, 12h)")
    kr = ks.add_parser("revoke", help="remove a key: its next request is refused")
    kr.add_argument("id", metavar="ID")
    kt = ks.add_parser("rotate", help="a new secret for a key (printed once)")
    kt.add_argument("id", metavar="ID")
    kt.add_argument("--overlap", metavar="DURATION", default="1h",
                    help="how long the old secret stays valid (default 1h; 0: not at all)")
    ks.add_parser("list", help="ids, models, limits, last use, requests and tokens")
    return p


_UPSMON_EVENTS = {"online": "on-line", "onbatt": "on-battery", "lowbatt": "low-battery",
                  "fsd": "fsd", "on-line": "on-line", "on-battery": "on-battery",
                  "low-battery": "low-battery"}


def _power_event(text: str) -> str:
    event = _UPSMON_EVENTS.get(text.strip().lower())
    if event is None:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text[:40]!r} (choose from {', '.join(POWER_EVENTS)}, or "
            "upsmon's ONLINE, ONBATT, LOWBATT, FSD)")
    return event


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any], float | None]:
    cmd: str = args.command
    if cmd == "status":
        return cmd, ({"service": args.service} if args.service else {}), 30.0
    if cmd in ("start", "stop", "restart", "drain", "resume"):
        if args.all and args.services:
            raise CtlError(EXIT_USAGE, f"{cmd}: give SERVICE names or --all, not both")
        if not args.all and not args.services:
            raise CtlError(EXIT_USAGE, f"{cmd}: name at least one SERVICE, or use --all")
        req: dict[str, Any] = {"all": True} if args.all else {"services": args.services}
        timeout = getattr(args, "timeout", None)
        if timeout is not None:
            if not 0 < timeout <= 86400:
                raise CtlError(EXIT_USAGE, f"{cmd}: --timeout must be in (0, 86400] seconds")
            req["timeout_s"] = timeout
        if getattr(args, "no_wait", False):
            req["wait"] = False
        # Waiting commands: the daemon enforces its own deadline; do not cut it off.
        return cmd, req, None
    if cmd == "swap":
        req = {"service": args.service}
        if args.timeout is not None:
            if not 0 < args.timeout <= 86400:
                raise CtlError(EXIT_USAGE, "swap: --timeout must be in (0, 86400] seconds")
            req["timeout_s"] = args.timeout
        return cmd, req, None
    if cmd == "reset":
        return cmd, {"services": args.services}, 60.0
    if cmd == "power-event":
        if args.force and args.event != "on-line":
            raise CtlError(EXIT_USAGE, "power-event: --force goes with on-line only")
        return cmd, ({"event": args.event, "force": True} if args.force
                     else {"event": args.event}), 60.0
    if cmd == "checkpoint":  # the daemon bounds it (each hook's timeout_s)
        return cmd, ({"name": args.name} if args.name else {}), None
    if cmd == "key":
        return _key_request(args)
    return cmd, {}, None


def _key_request(args: argparse.Namespace) -> tuple[str, dict[str, Any], float | None]:
    action: str = args.key_command
    if action == "list":
        return "key-list", {}, 30.0
    req: dict[str, Any] = {"id": args.id}
    if action == "new":
        if args.models is not None:
            req["models"] = args.models
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(args, name)
            if value is not None:
                top = 1_000_000 if name == "rpm" else 1_000_000_000
                if not 0 < value <= top:
                    raise CtlError(EXIT_USAGE, f"key new: --{name} must be a whole number "
                                   f"from 1 to {top}")
                req[name] = value
        if args.expires is not None:
            req["expires"] = args.expires
    elif action == "rotate":
        from .keys import parse_duration

        try:
            req["overlap_s"] = parse_duration(args.overlap)
        except ValueError as exc:
            raise CtlError(EXIT_USAGE, f"key rotate: --overlap: {exc}") from None
    return "key-" + action, req, 60.0


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def render_keys(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    if not data.get("auth"):
        return "no [auth] keys_file in the config: the router and the gates take no keys"
    rows = [["ID", "MODELS", "RPM", "TPM", "CONC", "EXPIRES", "LAST USE", "REQUESTS",
             "TOKENS", "NOW"]]
    for k in data.get("keys") or []:
        tokens = "-"
        if isinstance(k.get("prompt_tokens"), int):
            tokens = f"{k['prompt_tokens']}+{k.get('completion_tokens') or 0}"
        models = ",".join(k.get("models") or [])
        models = models if len(models) <= 40 else models[:37] + "..."
        rows.append([str(k.get("id")), models,
                     str(k.get("rpm") or "-"), str(k.get("tpm") or "-"),
                     str(k.get("concurrency") or "-"), _when(k.get("expires")),
                     _when(k.get("last_used")), str(k.get("requests", "-")), tokens,
                     str(k.get("inflight", "-"))])
    return f"keys file: {data.get('keys_file')}\n" + _table(rows)


def render_key(cmd: str, data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    if cmd == "key-revoke":
        return f"key {data.get('id')}: revoked (its next request is refused)"
    lines = [f"key {data.get('id')}: " + ("made" if cmd == "key-new" else "rotated"),
             f"secret: {data.get('secret')}",
             "(shown once: it is not kept; clients send `Authorization: Bearer <secret>`)"]
    if cmd == "key-rotate" and data.get("previous_until"):
        lines.append(f"the old secret stays valid until {_when(data['previous_until'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cmd, req, timeout = _request(args)
        data = call(args.socket, cmd, req, timeout)
    except CtlError as exc:
        sys.stderr.write(f"llmctl: {exc.message}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif cmd == "status":
        sys.stdout.write(render_status(data) + "\n")
    elif cmd == "power-event":
        sys.stdout.write(render_power_event(data) + "\n")
    elif cmd == "handover":
        models = data.get("models", []) if isinstance(data, dict) else []
        sys.stdout.write(f"handed over: the daemon exits; {len(models)} model(s) keep running "
                         f"({', '.join(models) or 'none'}) until the next llm-supervisor "
                         "adopts them (within adopt_grace_s)\n")
    elif cmd == "key-list":
        sys.stdout.write(render_keys(data) + "\n")
    elif cmd.startswith("key-"):
        sys.stdout.write(render_key(cmd, data) + "\n")
    elif cmd == "checkpoint":
        sys.stdout.write(render_checkpoints(data) + "\n")
        if isinstance(data, dict) and data.get("ok") is False:
            return EXIT_FAILED  # the hooks ran; one of them did not succeed
    else:
        sys.stdout.write(render_brief(data) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
