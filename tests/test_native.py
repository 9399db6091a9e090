"""The request path compiled (mypyc, setup.py) or, all of it, from source: never a mix, never
a compiled module older than its source (supervisord_llm/native.py)."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisord_llm import native

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# imports the package, says how its request path loaded, and proxies one request through it
PROBE = f"""
import asyncio, importlib, json, sys
sys.path.insert(1, {str(TESTS)!r})
from supervisord_llm import native
files = {{m: importlib.import_module(m).__file__ for m in native.MODULES}}

async def main():
    from collect import Wired
    w = Wired()
    w.conn.data_received(b"GET /x HTTP/1.1\\r\\nHost: g\\r\\n\\r\\n")
    w.up.data_received(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    return b"".join(w.client.out).decode()

print(json.dumps({{"compiled": native.COMPILED, "why": native.WHY, "files": files,
                  "answer": asyncio.run(main())}}))
"""


def probe(pkg_root: Path, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if k != "LLM_SUPERVISOR_PURE"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=pkg_root, capture_output=True,
                       text=True, timeout=60, check=False,
                       env={**clean, "PYTHONPATH": str(pkg_root), **env})
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["answer"].startswith("HTTP/1.1 200") and doc["answer"].endswith("ok")
    return doc


def compiled_file(path: str) -> bool:
    return any(path.endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES)


def test_the_request_path_is_compiled_where_the_suite_runs() -> None:
    """scripts/setup.sh compiles it in place: the suite (CI's run) tests the compiled code,
    and a compile that failed there does not pass unseen."""
    if not native.COMPILED:
        if os.environ.get("LLM_SUPERVISOR_REQUIRE_E2E") == "1":
            pytest.fail(f"the request path is not compiled: {native.WHY}")
        pytest.skip(f"the request path is not compiled here: {native.WHY}")
    for module in native.MODULES:
        assert compiled_file(str(importlib.import_module(module).__file__)), module


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package as built in place (compiled modules, their manifest, the sources)."""
    if not native.COMPILED:
        pytest.skip(f"the request path is not compiled here: {native.WHY}")
    shutil.copytree(ROOT / "supervisord_llm", tmp_path / "supervisord_llm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_copy_runs_compiled(copy: Path) -> None:
    doc = probe(copy)
    assert doc["compiled"] is True and doc["why"] == "compiled (mypyc)"
    assert all(compiled_file(f) and f.startswith(str(copy)) for f in doc["files"].values())


def test_a_source_edited_since_the_compile_loads_all_from_source(copy: Path) -> None:
    """A compiled module older than its source would run code that is not the one read (a
    fix edited in, a test run against the old build): all of the request path loads from
    source instead (the compiled modules call each other natively: never a mix)."""
    router = copy / "supervisord_llm" / "gate" / "router.py"
    router.write_text(router.read_text() + "\n# edited\n")
    doc = probe(copy)
    assert doc["compiled"] is False
    assert doc["why"] == "supervisord_llm.gate.router changed since it was compiled"
    assert all(f.endswith(".py") and f.startswith(str(copy)) for f in doc["files"].values())


WAYS = {
    "pure": "LLM_SUPERVISOR_PURE is set",
    "no manifest": "not compiled",
    "bad manifest": "_native.json unreadable (",
    "a manifest nested too deeply": "_native.json unreadable (nested too deeply)",
    "a manifest of the wrong shape": "no `modules` and `compiled` tables",
    "a FIFO for a manifest": "_native.json unreadable (not a regular file)",
    "a module missing": "supervisord_llm.gate.admission is not compiled",
    "a directory for a module": "supervisord_llm.http1 is not compiled",
    "the shared library missing": "supervisord_llm._compiled__mypyc is not compiled",
    "a truncated module": "router.",  # ... is not the file that was built
    "a truncated shared library": "_compiled__mypyc.",
    "a module copied over another": "server.",  # (the modules' files are often one size)
}


@pytest.mark.parametrize("case", list(WAYS))
def test_the_other_ways_to_pure_python(copy: Path, case: str) -> None:
    """Never a crash (a truncated library is a SIGBUS when loaded; a manifest nested deep a
    RecursionError; a FIFO would block the import for ever), never a mix: all from source,
    and the reason said."""
    pkg = copy / "supervisord_llm"
    manifest = pkg / native.MANIFEST
    env = {}

    def so(pattern: str, where: Path = pkg / "gate") -> Path:
        return next(where.glob(pattern))

    if case == "pure":
        env["LLM_SUPERVISOR_PURE"] = "1"
    elif case == "no manifest":
        manifest.unlink()
    elif case == "bad manifest":
        manifest.write_text("{\"modules\": [")
    elif case == "a manifest nested too deeply":
        manifest.write_text("[" * 200_000 + "]" * 200_000)
    elif case == "a manifest of the wrong shape":
        manifest.write_text("{\"modules\": []}")
    elif case == "a FIFO for a manifest":
        manifest.unlink()
        os.mkfifo(manifest)
    elif case == "a module missing":
        so("admission.*.so").unlink()
    elif case == "a directory for a module":
        lib = so("http1.*.so", pkg)
        lib.unlink()
        lib.mkdir()
    elif case == "the shared library missing":
        so("_compiled__mypyc.*.so", pkg).unlink()
    elif case == "a truncated module":
        lib = so("router.*.so")
        lib.write_bytes(lib.read_bytes()[:4096])
    elif case == "a truncated shared library":
        lib = so("_compiled__mypyc.*.so", pkg)
        lib.write_bytes(lib.read_bytes()[:100_000])
    else:
        shutil.copy(so("router.*.so"), so("server.*.so"))
    doc = probe(copy, **env)
    assert doc["compiled"] is False
    assert WAYS[case] in doc["why"], doc["why"]
    if case.startswith(("a truncated", "a module copied")):
        assert doc["why"].endswith("is not the file that was built")
    assert all(f.endswith(".py") for f in doc["files"].values())


def test_a_source_missing_is_said_not_run_compiled_unchecked(copy: Path) -> None:
    """A compiled module whose source is gone cannot be checked: it is not loaded, and the
    import says what is missing."""
    (copy / "supervisord_llm" / "gate" / "upstream.py").unlink()
    clean = {k: v for k, v in os.environ.items() if k != "LLM_SUPERVISOR_PURE"}
    r = subprocess.run([sys.executable, "-c", "import supervisord_llm.gate.proxy"], cwd=copy,
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**clean, "PYTHONPATH": str(copy)})
    assert r.returncode == 1
    assert "supervisord_llm.gate.upstream: its source" in r.stderr and "reinstall" in r.stderr
