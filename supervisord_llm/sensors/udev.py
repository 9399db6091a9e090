"""Device removal and arrival from the kernel's uevents (pyudev, handed in by the daemon: this
module never imports it), an `events.EventSource`.

The monitor listens on the kernel's netlink socket (`source="kernel"`): a `udev` source only
receives what systemd-udevd re-broadcasts, and nothing where it does not run. It is read on
the loop (`loop.add_reader(monitor.fileno())`, then `monitor.poll(0)` until it has nothing):
no thread. A monitor that cannot be created (no permission, no netlink, no libudev) is a
warning; GPU loss is then seen by failed reads and Xid events only.

Which devices: `subsystem` filters in the kernel (BPF), `devices` maps a device name to the GPU
uuid it stands for, and `key` turns both the names in `devices` and each event's `sys_name`
into the form they are compared in. For GPUs: subsystem `pci`, `devices` the GPUs' PCI bus
ids, `key` `pci_slot` (NVML says 00000000:41:00.0, the kernel 0000:41:00.0). Tests use `net`
and interface names with `ip link add NAME type ifb` / `ip link del NAME`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .events import EventSink

log = logging.getLogger(__name__)

MAX_EVENTS_PER_WAKEUP = 256  # a flood of uevents cannot hold the loop


def pci_slot(name: str) -> str:
    """A PCI address in the kernel's form, lower case, 4-digit domain: '0000:41:00.0' for
    NVML's '00000000:41:00.0' or '41:00.0'. Anything else is returned lower-cased."""
    text = name.strip().lower()
    parts = text.split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    if len(parts) != 3 or "." not in parts[2]:
        return text
    dev, _, fn = parts[2].partition(".")
    try:
        return f"{int(parts[0], 16):04x}:{int(parts[1], 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
    except ValueError:
        return text


class UdevSource:
    """Kernel uevents for the GPUs' devices: a `lost_actions` event (remove) reports the GPU
    lost, a `back_actions` one (add) reports it back."""

    name = "udev"

    def __init__(
        self,
        pyudev: Any,
        devices: Mapping[str, str],
        *,
        subsystem: str | None = "pci",
        key: Callable[[str], str] = pci_slot,
        source: str = "kernel",
        lost_actions: Collection[str] = ("remove",),
        back_actions: Collection[str] = ("add",),
    ) -> None:
        self._pyudev = pyudev
        self._key = key
        self._targets = {key(name): uuid for name, uuid in devices.items()}
        self.subsystem = subsystem
        self.source = source
        self._lost_actions = frozenset(lost_actions)
        self._back_actions = frozenset(back_actions)
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._sink: EventSink | None = None
        self.error: str | None = None  # why there is no monitor, if there is none
        self.seen = 0  # events for one of our devices

    @property
    def active(self) -> bool:
        return self._fd is not None

    def start(self, sink: EventSink) -> None:
        """Create the monitor and read it on the running loop. Never raises for a monitor
        that cannot be had: logs a warning and leaves `error` set."""
        self._sink = sink
        try:
            context = self._pyudev.Context()
            monitor = self._pyudev.Monitor.from_netlink(context, source=self.source)
            if self.subsystem is not None:
                monitor.filter_by(self.subsystem)
            monitor.start()
            fd = int(monitor.fileno())
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("udev: no %s uevent monitor (%s): device removal is seen only by "
                        "failed reads and Xid events", self.source, self.error)
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        self._monitor, self._fd = monitor, fd

    def close(self) -> None:
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = None
        self._monitor = None  # pyudev unrefs (closes) the monitor when it is collected

    def join(self, timeout_s: float) -> bool:
        return True

    def _readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        for _ in range(MAX_EVENTS_PER_WAKEUP):
            try:
                device = monitor.poll(0)
            except OSError as exc:  # ENOBUFS: the kernel dropped events (buffer overrun)
                log.warning("udev: reading uevents: %s", exc)
                return
            if device is None:
                return
            self._handle(device)

    def _handle(self, device: Any) -> None:
        name = str(device.sys_name)
        uuid = self._targets.get(self._key(name))
        sink = self._sink
        if uuid is None or sink is None:
            return
        action = str(device.action)
        what = f"{device.subsystem} device {name}"
        self.seen += 1
        if action in self._lost_actions:
            sink.report_lost(uuid, f"udev: {what}: {action}")
        elif action in self._back_actions:
            sink.report_back(uuid, f"udev: {what}: {action}")
