from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from supervisord_llm.health import HttpProber
from supervisord_llm.spawn import Spawner

# modules that must never run beside each other: each starts a real systemd (tests/sdlab.sh),
# and the install test makes real users and groups
SERIAL_GROUPS = {"test_systemd": "systemd-lab", "test_install": "systemd-lab"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist's `--dist loadgroup`: a module's tests run on one worker, in order
    (its module-scoped fixtures are made once), and the SERIAL_GROUPS modules on the same
    one. Without xdist: nothing."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(module, module)))


@pytest.fixture
async def spawner(tmp_path: Path) -> AsyncIterator[Spawner]:
    sp = Spawner(tmp_path / "state", use_guardian=True)
    (tmp_path / "state").mkdir()
    await sp.start()
    try:
        yield sp
    finally:
        sp.kill_all()
        await sp.close()


@pytest.fixture
async def prober() -> AsyncIterator[HttpProber]:
    p = HttpProber()
    try:
        yield p
    finally:
        await p.close()
