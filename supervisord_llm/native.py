"""Whether the request path (the gate, the router, their HTTP/1.1 parsing) runs compiled.

The install compiles these modules with mypyc (setup.py; scripts/setup.sh in place for a
checkout): the same code, about three times less CPU per request. The build writes
`_native.json` with the SHA-256 of each source it compiled. At the first import of the
package the compiled modules are used only if every one of them is there and was built from
the source beside it; otherwise (no compiler at install, a source edited since, or
`LLM_SUPERVISOR_PURE=1`) all of them load from source, never a mix (compiled modules call
each other natively), and `WHY` says why. The manifest also holds each compiled file as
built: the SHA-256 of each module's (small: the code is in the library they share) and the
size of the shared library (a hash of its megabytes would slow every start of llmctl): a
truncated or swapped one (a full disk at install, a copy gone wrong) would crash the process
when loaded, so it is not loaded.

Standard library only: imported before anything else of the package.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

# the request path: what every request and every chunk of a stream runs through
MODULES: Final = (
    "supervisord_llm.http1",
    "supervisord_llm.gate.admission",
    "supervisord_llm.gate.door",
    "supervisord_llm.gate.upstream",
    "supervisord_llm.gate.server",
    "supervisord_llm.gate.proxy",
    "supervisord_llm.gate.router",
)
GROUP: Final = "supervisord_llm._compiled"  # mypyc's library they share (`GROUP__mypyc`)
MANIFEST: Final = "_native.json"
_MANIFEST_MAX: Final = 1 << 20
_ROOT: Final = Path(__file__).resolve().parent.parent


def source_of(module: str) -> Path:
    return _ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_path(module: str) -> Path | None:
    """The file the import system would load for `module` if compiled (as it looks: the
    extension suffixes in order, regular files only)."""
    src = source_of(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = src.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_manifest(path: Path) -> dict[str, object]:
    """The manifest: a regular file of bounded size holding a JSON object (never blocks:
    a FIFO in its place is refused, not read); OSError or ValueError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, _MANIFEST_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _MANIFEST_MAX:
        raise ValueError(f"larger than {_MANIFEST_MAX // 1024} KiB")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def decide() -> tuple[bool, str]:
    """(compiled, why): whether the compiled modules can be used, and why not."""
    if os.environ.get("LLM_SUPERVISOR_PURE", "") not in ("", "0"):
        return False, "LLM_SUPERVISOR_PURE is set"
    try:
        doc = _read_manifest(Path(__file__).with_name(MANIFEST))
    except FileNotFoundError:
        return False, "not compiled (built without a C compiler, or LLM_SUPERVISOR_COMPILE=0)"
    except (OSError, ValueError) as exc:
        return False, f"{MANIFEST} unreadable ({exc})"
    sources, files = doc.get("modules"), doc.get("compiled")
    if not isinstance(sources, dict) or not isinstance(files, dict):
        return False, f"{MANIFEST} unreadable (no `modules` and `compiled` tables)"
    for module in (*MODULES, f"{GROUP}__mypyc"):
        path = compiled_path(module)
        if path is None:
            return False, f"{module} is not compiled"
        try:
            mark = path.stat().st_size if module not in MODULES else digest(path)
            if files.get(module) != [path.name, mark]:
                return False, f"{path.name} is not the file that was built"
            if module in MODULES and sources.get(module) != digest(source_of(module)):
                return False, f"{module} changed since it was compiled"
        except OSError as exc:
            return False, f"{module}: {exc.strerror or exc}"
    return True, "compiled (mypyc)"


class _FromSource(importlib.machinery.PathFinder):
    """Loads the request path's modules from their sources, past the compiled ones."""

    @classmethod
    def find_spec(cls, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        src = source_of(fullname)
        if not src.is_file():  # (a compiled module alone is never trusted: no way to check it)
            raise ImportError(f"{fullname}: its source {src} is missing; reinstall "
                              f"llm-supervisor ({WHY})", name=fullname)
        return importlib.util.spec_from_file_location(fullname, src)


COMPILED, WHY = decide()
if not COMPILED and not any(f is _FromSource for f in sys.meta_path):
    sys.meta_path.insert(0, _FromSource)
