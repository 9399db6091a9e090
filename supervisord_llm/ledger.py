"""What the operator decided about each service, kept across a restart of the daemon
(`state_dir/services.json`): held down by `llmctl stop`, its gate drained by `llmctl drain`,
an on-demand model pinned by `llmctl start`. The models outlive the daemon (keepers); these
decisions must too, or a crash would start what an operator stopped, reopen what they
drained and make a pinned model evictable again.

They hold until the next boot: the file records the boot id, and after a reboot the
services start as configured (a reboot is the natural clean slate; a drain for maintenance
is not meant to outlast it).

Written off the loop, the latest state wins, only when it changed (a change of any service
asks for a write; the daemon's 5 s state-directory check asks too). Read at start like any
state file (statefile.read_json: a regular file of bounded size); a damaged file is said
once and taken as empty (the services start as configured).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .logs import LogLimiter
from .procs import read_boot_id
from .statefile import Damaged, read_json, write_json

log = logging.getLogger(__name__)

LEDGER_FILE = "services.json"


@dataclass(frozen=True)
class Decisions:
    held: bool = False  # the operator's hold (`llmctl stop`)
    drained: bool = False  # its gate closed by the operator (`llmctl drain`)
    pinned: bool = False  # an on-demand model `llmctl start` pinned

    def doc(self) -> dict[str, bool]:
        return {"held": self.held, "drained": self.drained, "pinned": self.pinned}


class Ledger:
    def __init__(self, state_dir: str | None) -> None:
        self.path = Path(state_dir) / LEDGER_FILE if state_dir else None
        self._written: dict[str, Decisions] | None = None
        self._next: dict[str, Decisions] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._limiter = LogLimiter(__name__)

    async def load(self) -> dict[str, Decisions]:
        if self.path is None:
            return {}
        try:
            doc = await asyncio.to_thread(read_json, self.path)
        except Damaged as exc:
            log.warning("%s %s: the services start as configured (no operator's stop, "
                        "drain or pin is kept from before)", self.path, exc)
            return {}
        services = doc.get("services") if isinstance(doc, dict) else None
        if not isinstance(services, dict):
            return {}
        assert isinstance(doc, dict)
        if doc.get("boot_id") != read_boot_id():
            log.info("%s is from before the last boot: the services start as configured",
                     self.path)
            return {}
        out: dict[str, Decisions] = {}
        for name, entry in services.items():
            if isinstance(name, str) and isinstance(entry, dict):
                out[name] = Decisions(*(entry.get(k) is True
                                        for k in ("held", "drained", "pinned")))
        self._written = dict(out)
        return out

    def record(self, now: dict[str, Decisions]) -> None:
        """The decisions as they stand (only services with one); written if they changed."""
        now = {k: v for k, v in now.items() if v != Decisions()}
        if self.path is None:
            return
        if self._writer is not None and not self._writer.done():
            self._next = now  # the writer takes the latest when it is done with this one
            return
        if now == self._written:
            return
        self._next = now
        self._writer = asyncio.get_running_loop().create_task(self._write(),
                                                              name="ledger-writer")

    async def _write(self) -> None:
        assert self.path is not None
        while self._next is not None:
            doc, self._next = self._next, None
            body: dict[str, Any] = {"boot_id": read_boot_id(),
                                    "services": {k: v.doc() for k, v in sorted(doc.items())}}
            try:
                await asyncio.to_thread(write_json, self.path, body)
            except OSError as exc:
                self._limiter.error("write", "cannot record the operator's decisions in %s: "
                                    "%s", self.path, exc)
                return
            self._written = doc

    async def flush(self) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
