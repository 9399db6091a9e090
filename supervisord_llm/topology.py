"""Host topology from sysfs: NUMA nodes, their CPUs, a PCI device's node. A `sysfs_root`
seam lets tests build a tree under tmp_path."""

from __future__ import annotations

from pathlib import Path

from .config import normalize_pci_bus_id


def parse_cpulist(text: str) -> set[int]:
    """`0-3,8,10-11` -> {0,1,2,3,8,10,11}. Raises ValueError on junk."""
    cpus: set[int] = set()
    for raw in text.strip().split(","):
        part = raw.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"bad range {part!r}")
            cpus.update(range(a, b + 1))
        else:
            cpus.add(int(lo))
    return cpus


def format_cpulist(cpus: set[int] | list[int] | tuple[int, ...]) -> str:
    """{0,1,2,3,8} -> `0-3,8` (the kernel's own form)."""
    items = sorted(set(cpus))
    out: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


class Topology:
    def __init__(self, sysfs_root: str | Path = "/sys") -> None:
        self.root = Path(sysfs_root)

    def _read(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except OSError:
            return None

    def nodes(self) -> set[int]:
        text = self._read("devices/system/node/online")
        if text is None:
            return set()
        try:
            return parse_cpulist(text)
        except ValueError:
            return set()

    def node_cpus(self, node: int) -> set[int] | None:
        text = self._read(f"devices/system/node/node{node}/cpulist")
        if text is None:
            return None
        try:
            return parse_cpulist(text)
        except ValueError:
            return None

    def node_has_memory(self, node: int) -> bool:
        text = self._read("devices/system/node/has_memory")
        if text is None:
            # Older kernels: a node directory with meminfo has memory.
            return (self.root / f"devices/system/node/node{node}/meminfo").exists()
        try:
            return node in parse_cpulist(text)
        except ValueError:
            return False

    def pci_numa_node(self, pci_bus_id: str) -> int:
        """The NUMA node of a PCI device, -1 when unknown or not supported."""
        norm = normalize_pci_bus_id(pci_bus_id)
        if norm is None:
            return -1
        text = self._read(f"bus/pci/devices/{norm}/numa_node")
        if text is None:
            return -1
        try:
            node = int(text.strip())
        except ValueError:
            return -1
        return node if node >= 0 else -1
