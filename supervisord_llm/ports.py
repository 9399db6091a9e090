"""Loopback ports: is one free, and a free one for a hot swap's replacement."""

from __future__ import annotations

import random
import socket

from . import protocol as P
from .errors import ControlError


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port` (bound the way a server binds it: SO_REUSEADDR, so
    that connections of an earlier instance in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # [::1] is given as ::1
    try:
        s = socket.socket(family)
    except OSError:  # out of descriptors (or no IPv6): cannot tell; what binds next will say
        return True
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(exclude: set[int]) -> int:
    """A free loopback port below the ephemeral range (where a probe's connect() to a port
    nobody listens on yet could connect a socket to itself)."""
    for _ in range(2000):
        port = random.randint(20000, 32000)
        if port not in exclude and port_free(port):
            return port
    raise ControlError(P.FAILED, "no free port found for the replacement instance")
