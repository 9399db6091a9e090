"""Orphan guardian: run as `python -I -S _guardian.py INSTANCE_ID` with its stdin on a pipe
from the daemon.

The daemon writes `+PGID` when it launches a service's process group and `-PGID` when that
group is gone. When the pipe reaches end-of-file, however the daemon ended (SIGKILL and OOM
kills included), the guardian SIGKILLs every group still registered, then every process whose
environment carries `LLM_SUPERVISOR_INSTANCE=INSTANCE_ID` (what escaped a group: setsid, a
double fork), through a pidfd opened before the check, so a reused pid is never hit. No
inference server and none of its children outlives the supervisor holding GPU memory. It
ignores SIGINT, SIGTERM and SIGHUP: only the end of the pipe (or SIGKILL) ends it.
"""

import contextlib
import os
import signal
import sys


def _marked(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return marker in fh.read().split(b"\0")
    except OSError:
        return False  # not readable: not proven ours


def kill_marked(instance: str) -> None:
    marker = f"LLM_SUPERVISOR_INSTANCE={instance}".encode()
    me = os.getpid()
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == me:
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _marked(pid, marker):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def main(args: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    instance = args[0] if args else ""
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        text = line.strip()
        try:
            if text.startswith(b"+"):
                groups.add(int(text[1:]))
            elif text.startswith(b"-"):
                groups.discard(int(text[1:]))
        except ValueError:
            continue
    for pgid in groups:
        if pgid > 1:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
    if instance:
        kill_marked(instance)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
