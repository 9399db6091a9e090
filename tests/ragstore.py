"""A RAG store stand-in for the power tests: an in-memory "vector store" over HTTP whose
`POST /checkpoint` makes it durable, the way a real one (a FAISS index behind a RAG API) does
before the power goes.

    python tests/ragstore.py --port PORT --snapshot PATH [--dim 64] [--host 127.0.0.1]

    GET  /health      {"status": "ok"}
    GET  /stats       {"count", "dim", "sha256", "restored", "checkpoints"}
    POST /add         body: float32 little-endian vectors, a whole number of `dim` of them;
                      answers {"added", "count"}
    POST /checkpoint  writes the snapshot and answers 200 {"count", "sha256", "bytes", "path"}
                      once it is durable

The snapshot is one header line, `RAGSNAP1 count=N dim=D sha256=HEX\\n`, then the N*D float32
values (the checksum is that of those bytes). It is written to a temporary file in the same
directory, fsynced, renamed over the snapshot (atomic: a reader, or a power cut, sees the old
snapshot or the new one, never half of one) and the directory fsynced (so the rename itself
is on disk), and only then answered. At start, an existing snapshot is loaded (and checked:
a damaged one is refused, exit 1), so a restart after a power cut finds its vectors again.
SIGTERM stops it at once (aiohttp's run_app).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

MAGIC = "RAGSNAP1"
FLOAT = 4  # bytes of a float32


class SnapshotError(ValueError):
    """A snapshot file that is not complete or not consistent."""


@dataclass(frozen=True)
class Snapshot:
    count: int
    dim: int
    sha256: str
    data: bytes  # count * dim float32, little-endian


def header(count: int, dim: int, sha256: str) -> bytes:
    return f"{MAGIC} count={count} dim={dim} sha256={sha256}\n".encode()


def read_snapshot(path: Path) -> Snapshot:
    """Read and check a snapshot: the header, the length its count and dim give, the
    checksum. Raises SnapshotError (or OSError when it cannot be read)."""
    raw = path.read_bytes()
    head, sep, data = raw.partition(b"\n")
    if not sep:
        raise SnapshotError(f"{path}: no header line ({len(raw)} bytes)")
    words = head.decode("ascii", "replace").split()
    if len(words) != 4 or words[0] != MAGIC:
        raise SnapshotError(f"{path}: not a {MAGIC} header: {head[:100]!r}")
    fields = dict(w.partition("=")[::2] for w in words[1:])
    try:
        count, dim, digest = int(fields["count"]), int(fields["dim"]), fields["sha256"]
    except (KeyError, ValueError):
        raise SnapshotError(f"{path}: bad header: {head[:100]!r}") from None
    if len(data) != count * dim * FLOAT:
        raise SnapshotError(f"{path}: {len(data)} bytes of vectors, the header says "
                            f"{count} x {dim} float32 ({count * dim * FLOAT} bytes)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise SnapshotError(f"{path}: checksum {actual} != {digest} in the header")
    return Snapshot(count, dim, digest, data)


def write_snapshot(path: Path, dim: int, data: bytes) -> str:
    """Write `data` as the snapshot at `path`, durably and atomically; its checksum."""
    digest = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(header(len(data) // (dim * FLOAT), dim, digest))
            f.write(data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest


class Store:
    def __init__(self, snapshot: Path, dim: int) -> None:
        self.snapshot = snapshot
        self.dim = dim
        self.data = bytearray()
        self.restored = 0  # vectors loaded from the snapshot at start
        self.checkpoints = 0
        self.lock = asyncio.Lock()  # one checkpoint at a time

    @property
    def count(self) -> int:
        return len(self.data) // (self.dim * FLOAT)

    def load(self) -> None:
        if not self.snapshot.exists():
            return
        snap = read_snapshot(self.snapshot)
        if snap.dim != self.dim:
            raise SnapshotError(f"{self.snapshot}: dim {snap.dim}, this store has {self.dim}")
        self.data = bytearray(snap.data)
        self.restored = snap.count

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"count": self.count, "dim": self.dim,
                                  "sha256": hashlib.sha256(self.data).hexdigest(),
                                  "restored": self.restored, "checkpoints": self.checkpoints})

    async def add(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not body or len(body) % (self.dim * FLOAT):
            raise web.HTTPBadRequest(text=f"the body must be float32 vectors of dim {self.dim}"
                                     f" ({self.dim * FLOAT} bytes each); got {len(body)} bytes")
        self.data += body
        return web.json_response({"added": len(body) // (self.dim * FLOAT),
                                  "count": self.count})

    async def checkpoint(self, _request: web.Request) -> web.Response:
        async with self.lock:
            data = bytes(self.data)  # taken on the loop: every /add answered so far is in it
            digest = await asyncio.to_thread(write_snapshot, self.snapshot, self.dim, data)
            self.checkpoints += 1
        return web.json_response({"count": len(data) // (self.dim * FLOAT), "sha256": digest,
                                  "bytes": len(data), "path": str(self.snapshot)})


def app(store: Store) -> web.Application:
    application = web.Application(client_max_size=64 * 1024 * 1024)
    application.add_routes([web.get("/health", store.health), web.get("/stats", store.stats),
                            web.post("/add", store.add),
                            web.post("/checkpoint", store.checkpoint)])
    return application


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    store = Store(a.snapshot, a.dim)
    try:
        store.load()
    except (OSError, SnapshotError) as exc:
        print(f"ragstore: cannot load the snapshot: {exc}", file=sys.stderr)
        sys.exit(1)
    if store.restored:
        print(f"ragstore: restored {store.restored} vectors from {a.snapshot}", flush=True)
    web.run_app(app(store), host=a.host, port=a.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
