"""Exec shim: `python -I -S _shim.py DAEMON_PID PDEATHSIG CPUS MEMNODE CREDS -- ARGV...`.

It applies what must not be done in `preexec_fn` (the daemon has threads): the user switch,
the parent-death signal (after the switch, which would clear it), CPU affinity and NUMA memory
binding, then `execvp`s the real command, so the service keeps the shim's pid and process
group. Standard library only; keep it tiny: it is on the path of every restart.
CPUS is a kernel cpulist or "-", MEMNODE a node number or "-", CREDS "UID:GID:G1,G2" or "-".
"""

import ctypes
import os
import platform
import sys

PR_SET_PDEATHSIG = 1
MPOL_BIND = 2
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "riscv64": 237, "ppc64le": 261,
                     "ppc64": 261, "s390x": 270}


def _warn(msg: str) -> None:
    sys.stderr.write(f"llm-supervisor shim: {msg}\n")


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main(args: list[str]) -> int:
    if len(args) < 7 or args[5] != "--":
        _warn("usage: _shim.py DAEMON_PID PDEATHSIG CPUS MEMNODE CREDS -- ARGV...")
        return 127
    daemon_pid, pdeathsig, cpus, memnode, creds = int(args[0]), int(args[1]), args[2], \
        args[3], args[4]
    argv = args[6:]
    try:  # the supervisor protects itself from the OOM killer; its services must not inherit it
        with open("/proc/self/oom_score_adj", "r+") as fh:
            if int(fh.read().strip() or 0) < 0:
                fh.seek(0)
                fh.write("0")
    except (OSError, ValueError):
        pass
    if creds != "-":
        uid, gid, groups = creds.split(":")
        try:
            os.setgroups([int(g) for g in groups.split(",") if g])
            os.setgid(int(gid))
            os.setuid(int(uid))
        except (OSError, ValueError) as exc:
            _warn(f"cannot switch to uid {uid} gid {gid}: {exc}")
            return 126
    libc = ctypes.CDLL(None, use_errno=True)
    if pdeathsig and libc.prctl(PR_SET_PDEATHSIG, pdeathsig, 0, 0, 0) != 0:
        _warn(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if daemon_pid and os.getppid() != daemon_pid:
        return 1  # the supervisor died before we got here: do not start an orphan
    if cpus != "-":
        try:
            os.sched_setaffinity(0, _cpus(cpus))
        except (OSError, ValueError) as exc:
            _warn(f"cannot set CPU affinity {cpus}: {exc}")
    if memnode != "-":
        node = int(memnode)
        nr = SYS_SET_MEMPOLICY.get(platform.machine())
        words = node // 64 + 1
        mask = (ctypes.c_ulong * words)()
        mask[node // 64] = 1 << (node % 64)
        if nr is None:
            _warn(f"memory binding not supported on {platform.machine()}")
        elif libc.syscall(nr, MPOL_BIND, mask, ctypes.c_ulong(words * 64 + 1)) != 0:
            _warn(f"cannot bind memory to node {node}: {os.strerror(ctypes.get_errno())}")
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - the point of the shim
    except OSError as exc:
        _warn(f"cannot execute {argv[0]!r}: {exc.strerror}")
        return 127
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
