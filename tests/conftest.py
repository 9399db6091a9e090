from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from supervisord_llm.health import HttpProber
from supervisord_llm.spawn import Spawner


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
