"""Orphan guardian: run as `python -I -S _guardian.py` with its stdin on a pipe from the daemon.

The daemon writes `+PGID` when it launches a service's process group and `-PGID` when that
group is gone. When the pipe reaches end-of-file, however the daemon ended (SIGKILL and OOM
kills included), the guardian SIGKILLs every group still registered, so no inference server
and none of its children outlives the supervisor holding GPU memory. It ignores SIGINT,
SIGTERM and SIGHUP: only the end of the pipe (or SIGKILL) ends it.
"""

import contextlib
import os
import signal
import sys


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
