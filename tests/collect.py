"""A transport that keeps what is written: the gate's connections driven without a kernel
(tests, and bench/gate_python.py). No project imports, so a bench may load it beside an
older source tree."""

from __future__ import annotations

from typing import Any


class Collect:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Wired:
    """A gate open to one upstream, a client connection to it and one kept upstream
    connection, all on collecting transports: feed `conn.data_received` (the client's
    bytes) and `up.data_received` (the server's), read `client.out` and `upstream.out`.
    Made on a running loop; the project's modules are imported then (those on sys.path)."""

    def __init__(self, door: Any = None, **gate_settings: Any) -> None:
        import dataclasses

        from supervisord_llm.config import GateSection
        from supervisord_llm.gate import proxy
        from supervisord_llm.gate.server import ClientConnection, Listener
        from supervisord_llm.gate.upstream import UpstreamConnection, UpstreamPool

        pool = UpstreamPool()
        fields = {f.name for f in dataclasses.fields(GateSection)}
        if "allow_paths" in fields:  # any path, unless told (these drive HTTP itself)
            gate_settings.setdefault("allow_paths", ("/*",))
        self.gate = proxy.Gate("g", GateSection(None, **gate_settings), pool)
        if door is not None:
            self.gate.door = door
        self.gate.set_upstreams(("127.0.0.1", 9), None)
        # the gate's own listener's handler: its front door, then the gate (an older source
        # tree has none: the gate is its own handler there)
        entry = getattr(proxy, "GateEntry", None)
        handler = entry(self.gate) if entry is not None else self.gate
        self.conn = ClientConnection(Listener(handler, "127.0.0.1", 0))
        self.client = Collect()
        self.conn.connection_made(self.client)  # type: ignore[arg-type]
        self.up = UpstreamConnection(pool, ("127.0.0.1", 9))
        self.upstream = Collect()
        self.up.connection_made(self.upstream)  # type: ignore[arg-type]
        pool.release(self.up)
