"""The daemon's side of the front door: the keys of `[auth] keys_file` and the `[audit]`
settings, as the front is told them (`doc`), and the changes `llmctl key` makes.

Changes are made one at a time (a lock): the file is read again (a hand edit since is kept),
changed, written atomically, and the front is told the new keys before the command
answers: a revoked key's next request is refused."""

from __future__ import annotations

import asyncio
import grp
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import keys as K
from .config import Config

log = logging.getLogger(__name__)


class Access:
    def __init__(self, push: Callable[[dict[str, Any]], Awaitable[bool]],
                 clock: Callable[[], float] = time.time) -> None:
        self._push = push
        self._clock = clock
        self.keys_file: str | None = None
        self.keys: tuple[K.ApiKey, ...] = ()
        self.audit: str | None = None
        self.gid: int | None = None
        self.models: frozenset[str] = frozenset()  # what the services serve (names a key may)
        self._lock = asyncio.Lock()

    def load(self, cfg: Config) -> None:
        """The keys and audit settings of `cfg` (blocking: the keys file is read). ConfigError
        for a broken keys file: nothing changes."""
        keys: tuple[K.ApiKey, ...] = ()
        if cfg.auth is not None:
            keys = K.load_keys(cfg.auth.keys_file)
        gid = None
        if cfg.supervisor.control_group is not None:
            try:
                gid = grp.getgrnam(cfg.supervisor.control_group).gr_gid
            except KeyError:
                gid = None
        self.keys_file = cfg.auth.keys_file if cfg.auth is not None else None
        self.keys = keys
        self.models = frozenset(m for s in cfg.services for m in (s.models or (s.name,)))
        for k in keys:
            unknown = sorted(set(k.models) - self.models - {"*"})
            if unknown:
                log.warning("key %s names model(s) no service serves: %s", k.id,
                            ", ".join(unknown[:10]))
        self.audit = cfg.audit.path if cfg.audit is not None else None
        self.gid = gid

    def summary(self) -> str:
        if self.keys_file is None:
            what = "no API keys ([auth] is off)"
        else:
            what = f"{len(self.keys)} API key(s) from {self.keys_file}"
        return what + (f", audit log to {self.audit}" if self.audit is not None else "")

    def doc(self) -> dict[str, Any]:
        """What the front is told: the keys' hashes and limits (None: no [auth]), the audit
        log's path."""
        now = self._clock()
        keys = None
        if self.keys_file is not None:
            keys = [k.to_doc() for k in K.expired_rotations(self.keys, now)]
        audit = {"path": self.audit, "gid": self.gid} if self.audit is not None else None
        return {"keys": keys, "audit": audit}

    async def push(self) -> bool:
        return await self._push(self.doc())

    async def reload(self, cfg: Config) -> None:
        """The keys file read again (a hand edit, a reload), one change at a time with
        `llmctl key` (a reload that read the file before a revoke must not bring the key
        back), then told to the front. ConfigError: nothing changes."""
        async with self._lock:
            try:
                await asyncio.to_thread(self.load, cfg)
            except BaseException:
                await self.push()  # (the audit file opened again all the same: logrotate)
                raise
            if not await self.push():
                log.error("the front process did not take the keys read from %s; it is told "
                          "again at the next reload", self.keys_file)

    async def change(self, fn: Callable[[tuple[K.ApiKey, ...], float], tuple[K.ApiKey, ...]]
                     ) -> tuple[K.ApiKey, ...]:
        """Apply `fn(keys, now)` to the keys file as it is now, write it, tell the front.
        ValueError (what is wrong with the change), ConfigError (the file as it is now is
        broken: fix it first), OSError (it cannot be written)."""
        path = self.keys_file
        if path is None:
            raise ValueError("there is no [auth] keys_file in the config: add one (and "
                             "`llmctl reload`) to use API keys")
        async with self._lock:
            gid = self.gid

            def apply() -> tuple[K.ApiKey, ...]:
                now = self._clock()
                current = K.load_keys(path)
                new = K.expired_rotations(fn(current, now), now)
                K.write_keys(path, new, gid)
                return new

            self.keys = await asyncio.to_thread(apply)
            if not await self.push():
                raise ValueError("the keys file is written, but the front process did not "
                                 "take it (see the log); `llmctl reload` tells it again")
            return self.keys
