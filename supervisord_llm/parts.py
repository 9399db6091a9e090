"""The daemon's parts, built once by the daemon (`daemon.py`) and handed whole only to what
reads across all of them: status, metrics and the control commands. No part reaches a sibling
through another: each is given what it needs when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from .access import Access
from .demand import Swapper
from .guard import GpuGuard
from .host import Host
from .power import PowerController
from .probe import GenerationProber
from .sensors.events import GpuEvents
from .supervisor import Supervisor


@dataclass(frozen=True)
class Parts:
    sup: Supervisor  # the registry: services, gates, GPUs
    host: Host  # host-wide operations and the mode
    guard: GpuGuard  # GPU protection
    power: PowerController  # the UPS
    probes: GenerationProber  # generation probes
    events: GpuEvents  # Xids, udev
    swapper: Swapper  # models on demand
    access: Access  # API keys and the audit log (the front door's settings)
