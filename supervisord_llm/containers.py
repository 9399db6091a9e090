"""Engines in containers (`[service.container]`): the `run` command line that carries a
service's pinning into the container, and the runtime calls that find and remove the
containers of ours (docs/design.md, "Engines in containers").

- The keeper runs `RUNTIME [runtime_args] run --rm --name llm-<keeper id> --label ...
  [pinning] [run_args] IMAGE [command]` in the foreground, as it runs any engine: the CLI's
  exit is the engine's, its output the engine's. A container outlives a killed CLI (its
  monitor, conmon or the docker daemon, keeps it), so the keeper stops and removes the
  container itself (`stop -t`, then `rm -f`) whenever the CLI ends, and signals go to the
  container through the runtime (`kill --signal`).
- Every container is named after its keeper and labelled with the service, the keeper and
  the state directory of the supervisor that made it: a later supervisor removes what its
  own state directory's dead keepers left, and never a container without that label.
- The pinning: NVIDIA GPUs by UUID through CDI (`--device nvidia.com/gpu=UUID`, podman and
  docker 25+) or docker's `--gpus device=UUID`; AMD GPUs as `/dev/kfd` and each card's render
  node; CPUs and memory as `--cpuset-cpus`/`--cpuset-mems` from the GPUs' NUMA node; the
  service's environment (`*_VISIBLE_DEVICES` too) passed by name (`-e KEY`: the values stay
  in the CLI's environment, off its command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ContainerSection
from .errors import SpawnError
from .topology import format_cpulist

log = logging.getLogger(__name__)

LABEL_SERVICE = "io.llm-supervisor.service"
LABEL_KEEPER = "io.llm-supervisor.keeper"
LABEL_STATE = "io.llm-supervisor.state-dir"
NAME_PREFIX = "llm-"
# exit codes of `podman run` / `docker run` that are the runtime's own, not the engine's:
# 125 the runtime failed (no such image, bad flags), 126 the command cannot be run, 127 it
# is not in the image
RUNTIME_EXITS = frozenset({125, 126, 127})
_CALL_TIMEOUT_S = 30.0
_MAX_OUTPUT = 1 << 20


def name_of(keeper_id: str) -> str:
    """A container's name: its keeper's id (`service-xxxxxxxx`) after `llm-`."""
    return NAME_PREFIX + keeper_id


def keeper_of(name: str) -> str | None:
    return name[len(NAME_PREFIX):] if name.startswith(NAME_PREFIX) else None


@dataclass(frozen=True)
class ContainerRun:
    """What runs a service's container, less what names its instance (added per keeper)."""

    runtime: tuple[str, ...]  # the runtime and its global flags
    options: tuple[str, ...]  # run's options: pinning, environment, run_args
    image: str
    command: tuple[str, ...]  # the command in the image (empty: the image's own)
    pull: bool = False  # pull the image first when it is missing
    pull_timeout_s: float = 1800.0

    def argv(self, service: str, keeper_id: str, state_dir: str) -> tuple[str, ...]:
        return (*self.runtime, "run", "--rm", "--name", name_of(keeper_id),
                "--label", f"{LABEL_SERVICE}={service}",
                "--label", f"{LABEL_KEEPER}={keeper_id}",
                "--label", f"{LABEL_STATE}={state_dir}",
                *self.options, self.image, *self.command)

    def key(self) -> list[object]:
        """What makes two runs the same (the launch digest)."""
        return [list(self.runtime), list(self.options), self.image, list(self.command),
                self.pull, self.pull_timeout_s]


def gpu_options(c: ContainerSection, vendor: str | None, uuids: list[str],
                devices: list[str]) -> list[str]:
    """The runtime's flags that give the container the service's GPUs and nothing else."""
    if not uuids:
        return []
    if vendor == "amd":
        out = ["--device", "/dev/kfd"]
        for dev in devices:
            out += ["--device", dev]
        return out
    if c.flag == "gpus":
        # docker reads the value as CSV: several devices must be quoted as one field
        ids = ",".join(uuids)
        return ["--gpus", f"device={ids}" if len(uuids) == 1 else f'"device={ids}"']
    out = []
    for uuid in uuids:
        out += ["--device", f"nvidia.com/gpu={uuid}"]
    return out


def run_options(c: ContainerSection, *, env_keys: Iterable[str], gpu: list[str],
                cpus: tuple[int, ...] | None, mem_node: int | None, stop_signal: int,
                stop_timeout_s: float, run_args: tuple[str, ...]) -> tuple[str, ...]:
    out = ["--pull", "never", "--network", c.network,
           "--stop-signal", signal.Signals(stop_signal).name,
           "--stop-timeout", str(max(1, round(stop_timeout_s)))]
    out += gpu
    if cpus:
        out += ["--cpuset-cpus", format_cpulist(cpus)]
    if mem_node is not None:
        out += ["--cpuset-mems", str(mem_node)]
    for key in env_keys:
        out += ["-e", key]  # by name: the value comes from the CLI's environment
    out += run_args
    return tuple(out)


# --- runtime calls ------------------------------------------------------------------------


async def call(argv: list[str], timeout_s: float = _CALL_TIMEOUT_S) -> tuple[int, str]:
    """Run a runtime command: its exit status and its output (stdout, then stderr; at most
    1 MiB). Raises SpawnError when it cannot be run or takes longer than `timeout_s`."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise SpawnError(f"container runtime not found: {argv[0]!r}")
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, *argv[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise SpawnError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await proc.stdout.read(65536):
                if size < _MAX_OUTPUT:
                    chunks.append(chunk[:_MAX_OUTPUT - size])
                    size += len(chunks[-1])
            code = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await proc.wait()
        raise SpawnError(f"took longer than {timeout_s:g} s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return code, b"".join(chunks).decode("utf-8", "replace")


def _gone(text: str) -> bool:
    """The runtime's answer for a container that does not exist (podman, docker)."""
    low = text.lower()
    return "no such container" in low or "no container with name" in low


async def remove(runtime: tuple[str, ...], names: list[str], stop_timeout_s: float) -> None:
    """Stop (the container's stop signal, SIGKILL after `stop_timeout_s`) and remove the
    containers. A container already gone is not an error; anything else is logged."""
    if not names:
        return
    t = max(0, round(stop_timeout_s))
    for verb, argv, timeout in (("stop", [*runtime, "stop", "-t", str(t), *names], t + 15.0),
                                ("rm", [*runtime, "rm", "-f", *names], 30.0)):
        try:
            code, out = await call(argv, timeout)
        except SpawnError as exc:
            log.error("`%s %s` of %s: %s", runtime[0], verb, ", ".join(names), exc)
            continue
        if code != 0 and not _gone(out):
            log.error("`%s %s` of %s: exit %d: %s", runtime[0], verb, ", ".join(names), code,
                      printable(out.strip()[-500:]))


async def ours(runtime: tuple[str, ...], state_dir: str) -> list[str]:
    """The names of the containers (running or not) labelled with this state directory."""
    code, out = await call([*runtime, "ps", "-a", "--filter", f"label={LABEL_STATE}={state_dir}",
                            "--format", "{{.Names}}"])
    if code != 0:
        raise SpawnError(f"`{runtime[0]} ps`: exit {code}: {out.strip()[-300:]}")
    return [line.strip() for line in out.splitlines() if line.strip()]


async def sweep(runtimes: Iterable[tuple[str, ...]], state_dir: str, live: set[str],
                stop_timeout_s: float = 10.0) -> list[str]:
    """Remove the containers of this state directory whose keeper is not `live` (a dead
    run's); a container without the label is never looked at. Returns what was removed."""
    removed: list[str] = []
    for runtime in runtimes:
        try:
            names = await ours(runtime, state_dir)
        except SpawnError as exc:
            log.warning("looking for containers left by an earlier run: %s", exc)
            continue
        stale = [n for n in names if keeper_of(n) not in live]
        if stale:
            log.warning("found container(s) %s left by an earlier run: removing them",
                        ", ".join(stale))
            await remove(runtime, stale, stop_timeout_s)
            removed += stale
    return removed


def printable(text: str) -> str:
    """Another program's words, safe for a terminal and a log (escape sequences and other
    control characters shown as `\\xNN`, never run)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


_HINTS = ("Run '", "See '")  # the runtimes' last line after an error: a pointer to --help
_KEEPER = "llm-supervisor keeper: "  # (the keeper's own lines in the engine's output)


def refusal(runtime: str, code: int, tail: list[str]) -> str:
    """What `llmctl status` says of a runtime's own exit while a container starts: the
    runtime's words (its last error line: `Error: ...`, `docker: ...`; not the hint to read
    --help that follows), made safe for a terminal. A pull that failed (the keeper's
    `pull: ...` line) says so, with the runtime's words. 126 and 127 may be the runtime's
    (a CDI device it cannot resolve, a command not in the image) or the engine's own exit:
    said as the exit they are."""
    name = os.path.basename(runtime)
    lines = [ln.strip() for ln in tail if ln.strip() and not ln.strip().startswith(_HINTS)]
    pulled = [ln[len(_KEEPER) + 6:] for ln in lines if ln.startswith(_KEEPER + "pull: ")]
    theirs = [ln for ln in lines if not ln.startswith(_KEEPER)]
    errors = [ln for ln in theirs if "error" in ln.lower() or ln.startswith(f"{name}:")]
    said = printable((errors or theirs or ["(it said nothing)"])[-1])[:400]
    if pulled:
        why = printable(pulled[-1])[:300]
        return f"{name} could not pull the image: {why}" + (f"; {said}" if errors else "")
    if code in (126, 127):
        return f"{name} run exited {code} while starting: {said}"
    return f"{name} refused to run the container: {said}"


__all__ = ["LABEL_KEEPER", "LABEL_SERVICE", "LABEL_STATE", "RUNTIME_EXITS", "ContainerRun",
           "call", "gpu_options", "keeper_of", "name_of", "ours", "printable", "refusal",
           "remove",
           "run_options", "sweep"]
