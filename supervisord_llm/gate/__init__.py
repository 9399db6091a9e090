"""The request gate: a reverse proxy in front of a service's backend that knows every request
in flight, so that the supervisor can stop taking new requests without cutting any off.

- `server`: the side toward clients (HTTP/1.1 on llhttp, timeouts, connection limit);
- `admission`: the concurrency limit and the FIFO queue;
- `proxy`: one gate's state and the proxying of one request;
- `upstream`: the keep-alive client toward the backends;
- `host`: the thread whose event loop runs every gate.
"""

from .host import GateHost
from .proxy import DRAIN_REASONS, Gate, GateStats, Histogram

__all__ = ["DRAIN_REASONS", "Gate", "GateHost", "GateStats", "Histogram"]
