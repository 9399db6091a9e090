"""The build: everything is in pyproject.toml, but for the request path (the gate, the router,
their HTTP/1.1 parsing: supervisord_llm/native.py lists the modules), compiled with mypyc when
a C compiler and Python's headers are there. Without them, or with LLM_SUPERVISOR_COMPILE=0,
the package is pure Python and runs the same (slower per request); a failed compile says so
and goes on pure.

A checkout compiles in place (scripts/setup.sh does): python setup.py build_ext --inplace
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _native_constants() -> dict[str, Any]:
    """The literal constants of supervisord_llm/native.py (read, not run: importing it
    decides how the package loads, which is no business of the build)."""
    out: dict[str, Any] = {}
    for node in ast.parse((HERE / "supervisord_llm" / "native.py").read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.value is not None:
            with contextlib.suppress(ValueError):  # (not a literal: not one of these)
                out[node.target.id] = ast.literal_eval(node.value)
    return out


_NATIVE = _native_constants()
MODULES: tuple[str, ...] = _NATIVE["MODULES"]
MANIFEST: str = _NATIVE["MANIFEST"]
GROUP: str = _NATIVE["GROUP"]
# the commands that build extensions (pip also runs this file for metadata: no compile then)
_BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def _sources() -> list[str]:
    return [str(Path(*m.split(".")).with_suffix(".py")) for m in MODULES]


class OptionalBuildExt(build_ext):
    """Compiles the request path if it can; records what it compiled (the runtime uses the
    compiled modules only if each was built from the source beside it)."""

    def run(self) -> None:
        manifest = Path("." if self.inplace else self.build_lib, "supervisord_llm", MANIFEST)
        manifest.unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing: pure Python, said loudly
            print(f"llm-supervisor: the request path was not compiled ({exc}); it runs as "
                  "pure Python (about 3x the CPU per request). Install gcc and the Python "
                  "headers (Debian: apt-get install gcc python3-dev) and build again for "
                  "the compiled one.", file=sys.stderr)
            return
        if self.extensions:
            built = {ext.name: Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions}
            manifest.parent.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({
                # what each was compiled from, and each file as built: its name, and its
                # SHA-256 (a module's: small, and all of a size) or its size (the library)
                "modules": {m: hashlib.sha256(Path(HERE, src).read_bytes()).hexdigest()
                            for m, src in zip(MODULES, _sources(), strict=True)},
                "compiled": {name: [path.name, hashlib.sha256(path.read_bytes()).hexdigest()
                                    if name in MODULES else path.stat().st_size]
                             for name, path in built.items()}}, indent=1) + "\n")


def _extensions() -> list[Any]:
    if os.environ.get("LLM_SUPERVISOR_COMPILE", "1") == "0" or not _BUILDS & set(sys.argv):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("llm-supervisor: mypyc (from mypy) is missing: the request path stays pure "
              "Python", file=sys.stderr)
        return []
    old = os.getcwd()
    os.chdir(HERE)  # mypyc names modules by their paths from here
    try:
        exts: list[Any] = mypycify(_sources(), opt_level="3", group_name=GROUP)
    except (Exception, SystemExit) as exc:  # its type check failed: pure Python, said loudly
        print(f"llm-supervisor: mypyc could not compile the request path ({exc}): it stays "
              "pure Python", file=sys.stderr)
        return []
    finally:
        os.chdir(old)
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
