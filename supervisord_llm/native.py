"""Whether the request path (the gate, the router, their HTTP/1.1 parsing) runs compiled.

The install compiles these modules with mypyc (setup.py; scripts/setup.sh in place for a
checkout): the same code, about three times less CPU per request. The build writes
`_native.json` with the SHA-256 of each source it compiled. At the first import of the
package the compiled modules are used only if every one of them is there and was built from
the source beside it; otherwise (no compiler at install, a source edited since, or
`LLM_SUPERVISOR_PURE=1`) all of them load from source, never a mix (compiled modules call
each other natively), and `WHY` says why.

Standard library only: imported before anything else of the package.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

# the request path: what every request and every chunk of a stream runs through
MODULES: Final = (
    "supervisord_llm.http1",
    "supervisord_llm.gate.admission",
    "supervisord_llm.gate.upstream",
    "supervisord_llm.gate.server",
    "supervisord_llm.gate.proxy",
    "supervisord_llm.gate.router",
)
GROUP: Final = "supervisord_llm._compiled"  # mypyc's library they share (`GROUP__mypyc`)
MANIFEST: Final = "_native.json"
_ROOT: Final = Path(__file__).resolve().parent.parent


def source_of(module: str) -> Path:
    return _ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiled_path(module: str) -> Path | None:
    src = source_of(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = src.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def decide() -> tuple[bool, str]:
    """(compiled, why): whether the compiled modules can be used, and why not."""
    if os.environ.get("LLM_SUPERVISOR_PURE", "") not in ("", "0"):
        return False, "LLM_SUPERVISOR_PURE is set"
    try:
        doc = json.loads(Path(__file__).with_name(MANIFEST).read_text())
        built = doc["modules"]
        assert isinstance(built, dict)
    except FileNotFoundError:
        return False, "not compiled (built without a C compiler, or LLM_SUPERVISOR_COMPILE=0)"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        return False, f"{MANIFEST} unreadable ({exc})"
    for module in (*MODULES, f"{GROUP}__mypyc"):
        if _compiled_path(module) is None:
            return False, f"{module} is not compiled"
        if module not in MODULES:
            continue
        try:
            if built.get(module) != digest(source_of(module)):
                return False, f"{module} changed since it was compiled"
        except OSError as exc:
            return False, f"{module}: {exc}"
    return True, "compiled (mypyc)"


class _FromSource(importlib.machinery.PathFinder):
    """Loads the request path's modules from their sources, past the compiled ones."""

    @classmethod
    def find_spec(cls, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


COMPILED, WHY = decide()
if not COMPILED and not any(f is _FromSource for f in sys.meta_path):
    sys.meta_path.insert(0, _FromSource)
