"""The control socket (`server`: the listener, the protocol, SO_PEERCRED) and what its
commands do (`commands`)."""

from .commands import Commands
from .server import ControlServer, Peer, peer_of

__all__ = ["Commands", "ControlServer", "Peer", "peer_of"]
