"""AMD GPUs through the amdgpu driver's sysfs files (`backend = "amd-sysfs"`); no library.

Cards are `<root>/class/drm/card<N>/device` with PCI vendor 0x1002 and driver amdgpu (the
connectors `card1-DP-1` and the render nodes `renderD128` point at the same device and are
skipped). Values come from the card's hwmon directory (`device/hwmon/hwmon<M>`: M varies and
is found by listing; it changes when the card comes back) and from `device/` itself:

- temperatures (millidegrees C) by their `temp*_label`: `edge` -> `temperature_c`,
  `junction` (hot spot) -> `hotspot_c`, the temperature the thermal policy acts on, `mem` ->
  `memory_temperature_c`. A board without an edge sensor (MI300) shows its junction as
  `temperature_c`.
- thresholds: `slowdown_c` = the junction's `temp*_crit` (else the edge's), `shutdown_c` = the
  junction's `temp*_emergency` (else the edge's): the same sensor the policy reads. (amdgpu's
  crit is where the firmware starts to throttle hard; emergency is where it shuts down.)
- power (microwatts): `power1_average` (RDNA3/RDNA4 dGPUs have only this), else
  `power1_input`; the limit is `power1_cap`, within `power1_cap_min`/`_max`, stock
  `power1_cap_default`. A `power1_cap_min` of 0 (RDNA4 kernels before 6.17) is not a floor:
  `min_power_limit_w` is then None, and the policy's floor is `min_power_fraction` of the
  default alone. Setting the limit writes `power1_cap` in whole watts (the driver keeps whole
  watts; needs root); outside [min, max] it is refused before writing (the driver would
  answer EINVAL) with a SensorError naming the range.
- `gpu_busy_percent`, `mem_info_vram_used`/`_total` (bytes), `numa_node` (-1: the node whose
  CPUs are exactly `local_cpulist`, if exactly one is; the kernel derives that list from the
  node, so it rarely adds anything), the PCI slot from `uevent` (PCI_SLOT_NAME).

The UUID is `GPU-<16 hex>` from `unique_id` (else the KFD topology's `unique_id`), which
ROCR_VISIBLE_DEVICES accepts. A card without one (most iGPUs) gets the id `AMD-<PCI slot>`
and is pinned by its ROCm index (`GpuInfo.pin`): the position among the KFD topology nodes
that have SIMDs, matched by `domain` and `location_id` (bus << 8 | dev << 3 | fn) - not the
DRM card number. That index is fixed at discovery.

Every method is blocking file I/O (the hub runs it on the GPU's own thread): a read opens
about seven small files whose paths were found at discovery. The card is gone
(`GpuLostError`) only when its device directory is (the card left the bus, or the driver let
go of it): the next read looks for it again by PCI slot (and unique_id), in any card<N>, with
its hwmon directory found afresh. A dGPU asleep (runtime PM) answers EPERM: an empty reading,
not an error (see `read`).

One file failing while the card is there does not blind the policy, nor mislead it:

- the policy sensor (the junction, on a card that had one at discovery; else the edge) that
  cannot be read (gone, EIO, not a number, a directory...) makes the read a SensorError
  ("junction temperature unreadable: ..."), never a reading from the edge sensor, nor a lost
  GPU: the policy holds what it has until the junction reads again. Its files are looked for
  afresh meanwhile (the hwmon directory may have been renumbered);
- any other file that fails (edge, memory temperature, power, cap, busy, VRAM) leaves its
  value None, logged once per file at a bounded rate; the reading still carries the junction.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GpuLostError, SensorError
from ..logs import LogLimiter
from ..topology import Topology, parse_cpulist
from .base import BackendUnavailable, GpuHealth, GpuInfo, GpuReading

log = logging.getLogger(__name__)

AMD_VENDOR = 0x1002
_CARD_RE = re.compile(r"card(\d+)")
_TEMP_RE = re.compile(r"temp(\d+)_input")
_HWMON_RE = re.compile(r"hwmon(\d+)")
_SPEED_RE = re.compile(r"(\d+(?:\.\d+)?)\s*GT/s")
_DPM_PCIE_RE = re.compile(r"^\s*\d+:\s*(\d+(?:\.\d+)?)\s*GT/s,\s*x(\d+)", re.MULTILINE)
_GEN_OF_GTS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6, 128.0: 7}
_LOST = frozenset({errno.ENOENT, errno.ENODEV})
# a value the driver does not report (on this board, or right now)
_ABSENT = frozenset({errno.EOPNOTSUPP, errno.ENODATA, errno.EINVAL})
_MAX_READ = 1 << 20


class _Vanished(Exception):
    """A file of the card is gone (ENOENT/ENODEV): the card left the bus or the driver."""


def _read(path: Path) -> str:
    """The whole of a small sysfs file. Raises _Vanished, or OSError for other failures."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _LOST:
            raise _Vanished(str(path)) from None
        raise
    try:
        chunks: list[bytes] = []
        size = 0
        while size < _MAX_READ:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        if exc.errno in _LOST:
            raise _Vanished(str(path)) from None
        raise
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text, 0) if text.startswith("0x") else int(text)
    except ValueError:
        raise SensorError(f"{path}: not a number: {text[:40]!r}") from None


def _threshold_c(path: Path | None) -> float | None:
    """A crit/emergency temperature, or None (absent, unreadable, or no real value)."""
    if path is None:
        return None
    try:
        value = _int(path) / 1000.0
    except (OSError, SensorError):
        return None
    return value if 0.0 < value < 200.0 else None


def pcie_gen(speed: str) -> int | None:
    """`16.0 GT/s PCIe` -> 4, `32.0 GT/s` -> 5, `8 GT/s` -> 3; None for `Unknown`."""
    m = _SPEED_RE.search(speed)
    return None if m is None else _GEN_OF_GTS.get(float(m.group(1)))


def _kfd_location(pci: str) -> tuple[int, int] | None:
    """`0000:0f:00.0` -> (domain 0, location_id 0x0f00)."""
    m = re.fullmatch(r"([0-9a-f]+):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])", pci.strip().lower())
    if m is None:
        return None
    dom, bus, dev, fn = (int(x, 16) for x in m.groups())
    return dom, (bus << 8) | (dev << 3) | fn


@dataclass(frozen=True)
class _KfdGpu:
    index: int  # the ROCm index: position among the KFD nodes that have SIMDs
    domain: int
    location_id: int
    unique_id: int


@dataclass
class _Card:
    """Where one card's files are (found at discovery, found again after it comes back)."""

    uuid: str
    pci: str
    device: Path
    hwmon: Path | None
    edge: Path | None = None
    junction: Path | None = None
    mem: Path | None = None
    power: Path | None = None
    cap: Path | None = None
    cap_min: Path | None = None
    cap_max: Path | None = None
    busy: Path | None = None
    vram_used: Path | None = None
    temp_no: dict[str, str] = field(default_factory=dict)  # label -> N of temp<N>_*
    link: Path | None = None  # the PCI device whose link is the card's link to the host


class AmdSysfsBackend:
    """`AmdSysfsBackend(sysfs_root="/sys")`: the amdgpu cards under `<root>/class/drm`."""

    name = "amd-sysfs"

    def __init__(self, sysfs_root: str | os.PathLike[str] = "/sys") -> None:
        self.root = Path(sysfs_root)
        self._drm = self.root / "class" / "drm"
        self._cards: dict[str, _Card] = {}
        self._expect_hwmon: set[str] = set()  # cards that had a hwmon directory at discovery
        self._expect_junction: set[str] = set()  # cards that had a junction sensor at discovery
        self._lock = threading.Lock()
        # a file other than the policy sensor failing: once per card and file every 10 min
        self._limiter = LogLimiter(__name__, burst=1, window_s=600.0)

    # --- finding the cards -------------------------------------------------------------

    def _card_dirs(self) -> list[Path]:
        """`card<N>/device` in N order (connectors and render nodes skipped)."""
        try:
            names = os.listdir(self._drm)
        except FileNotFoundError:
            raise BackendUnavailable(f"{self._drm} does not exist (no DRM driver is loaded, so "
                                     "no amdgpu)") from None
        except OSError as exc:
            raise BackendUnavailable(f"cannot list {self._drm}: {exc.strerror}") from None
        cards = sorted((int(m.group(1)), n) for n in names if (m := _CARD_RE.fullmatch(n)))
        return [self._drm / n / "device" for _, n in cards]

    @staticmethod
    def _uevent(device: Path) -> dict[str, str]:
        try:
            text = _read(device / "uevent")
        except (_Vanished, OSError):
            return {}
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def _amd_pci(self, device: Path) -> str | None:
        """The card's PCI slot if it is an AMD GPU driven by amdgpu, else None."""
        try:
            vendor = _int(device / "vendor")
        except (_Vanished, OSError, SensorError):
            return None
        if vendor != AMD_VENDOR:
            return None
        ev = self._uevent(device)
        if ev.get("DRIVER") != "amdgpu":
            return None
        slot = ev.get("PCI_SLOT_NAME") or os.path.basename(os.path.realpath(device))
        return slot.strip().lower()

    def _kfd_gpus(self) -> list[_KfdGpu]:
        """The KFD topology's GPU nodes in ROCm index order (empty without KFD)."""
        nodes_dir = self.root / "class" / "kfd" / "kfd" / "topology" / "nodes"
        try:
            names = sorted((n for n in os.listdir(nodes_dir) if n.isdigit()), key=int)
        except OSError:
            return []
        out: list[_KfdGpu] = []
        for n in names:
            try:
                text = _read(nodes_dir / n / "properties")
            except (_Vanished, OSError):
                continue
            props: dict[str, int] = {}
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                try:
                    props[key] = int(value)
                except ValueError:
                    continue
            if props.get("simd_count", 0) == 0:
                continue  # a CPU node
            out.append(_KfdGpu(len(out), props.get("domain", 0), props.get("location_id", -1),
                               props.get("unique_id", 0)))
        return out

    @staticmethod
    def _sysfs_unique_id(device: Path) -> str | None:
        try:
            text = _read(device / "unique_id").strip().lower()
        except (_Vanished, OSError):
            return None
        try:
            value = int(text, 16)
        except ValueError:
            return None
        return f"{value:016x}" if value else None

    def _find_hwmon(self, device: Path) -> Path | None:
        """The card's hwmon directory (`hwmon<M>`, M varies): the one named amdgpu."""
        base = device / "hwmon"
        try:
            names = sorted((n for n in os.listdir(base) if _HWMON_RE.fullmatch(n)),
                           key=lambda n: int(n[5:]))
        except OSError:
            return None
        for n in names:
            try:
                if _read(base / n / "name").strip() == "amdgpu":
                    return base / n
            except (_Vanished, OSError):
                continue
        return base / names[0] if names else None

    def _locate(self, device: Path, uuid: str, pci: str) -> _Card:
        """The paths of one card's files (those present now)."""
        card = _Card(uuid, pci, device, self._find_hwmon(device))
        link = Path(os.path.realpath(device))
        while _is_amd_bridge(link.parent):  # the board's own PCIe switch (Navi)
            link = link.parent
        card.link = link
        dev_files = set(_listdir(device))
        if "gpu_busy_percent" in dev_files:
            card.busy = device / "gpu_busy_percent"
        if "mem_info_vram_used" in dev_files:
            card.vram_used = device / "mem_info_vram_used"
        if card.hwmon is None:
            return card
        files = set(_listdir(card.hwmon))
        temps: dict[str, Path] = {}
        for f in sorted(files):
            m = _TEMP_RE.fullmatch(f)
            if m is None:
                continue
            n = m.group(1)
            label = ""
            if f"temp{n}_label" in files:
                try:
                    label = _read(card.hwmon / f"temp{n}_label").strip().lower()
                except (_Vanished, OSError):
                    label = ""
            label = label or ("edge" if n == "1" else "")
            if label in ("edge", "junction", "mem") and label not in temps:
                temps[label] = card.hwmon / f
                card.temp_no[label] = n
        card.edge, card.junction, card.mem = (temps.get(k) for k in ("edge", "junction", "mem"))
        for f in ("power1_average", "power1_input"):
            if f in files:
                card.power = card.hwmon / f
                break
        for attr, f in (("cap", "power1_cap"), ("cap_min", "power1_cap_min"),
                        ("cap_max", "power1_cap_max")):
            if f in files:
                setattr(card, attr, card.hwmon / f)
        return card

    def discover(self) -> list[GpuInfo]:
        topo = Topology(self.root)
        kfd: list[_KfdGpu] | None = None
        gpus: list[GpuInfo] = []
        cards: dict[str, _Card] = {}
        for device in self._card_dirs():
            pci = self._amd_pci(device)
            if pci is None or any(c.pci == pci for c in cards.values()):
                continue
            unique = self._sysfs_unique_id(device)
            loc = _kfd_location(pci)
            node: _KfdGpu | None = None
            if unique is None:
                if kfd is None:
                    kfd = self._kfd_gpus()
                node = next((k for k in kfd if loc == (k.domain, k.location_id)), None)
                if node is not None and node.unique_id:
                    unique = f"{node.unique_id:016x}"
            pin = ""
            if unique is not None:
                uuid = f"GPU-{unique}"
            else:
                uuid = f"AMD-{pci}"
                if node is not None:
                    pin = str(node.index)
                else:
                    log.warning("AMD GPU %s has no unique_id and no KFD topology node: ROCm "
                                "cannot be told to use it (a service pinned to it sees no GPU)",
                                pci)
            try:
                card = self._locate(device, uuid, pci)
                info = self._info(card, topo, pin)
            except _Vanished as exc:  # gone while we looked: not present
                log.warning("AMD GPU %s vanished during discovery (%s)", pci, exc)
                continue
            except OSError as exc:
                raise SensorError(f"amd-sysfs: {pci}: {exc}") from None
            cards[uuid] = card
            gpus.append(info)
        if not gpus:
            raise BackendUnavailable(f"no AMD GPU (PCI vendor 0x1002, driver amdgpu) in "
                                     f"{self._drm}")
        with self._lock:
            self._cards = cards
            self._expect_hwmon = {u for u, c in cards.items() if c.hwmon is not None}
            self._expect_junction = {u for u, c in cards.items() if c.junction is not None}
        return gpus

    def _info(self, card: _Card, topo: Topology, pin: str) -> GpuInfo:
        dev, hw = card.device, card.hwmon

        def opt_int(path: Path | None) -> int | None:
            if path is None:
                return None
            try:
                return _int(path)
            except _Vanished:
                raise
            except (OSError, SensorError):
                return None

        def watts(name: str) -> float | None:
            value = opt_int(hw / name) if hw is not None and (hw / name).exists() else None
            return None if value is None else value / 1e6

        def threshold(kind: str) -> float | None:
            """The junction's, else the edge's."""
            for label in ("junction", "edge"):
                n = card.temp_no.get(label)
                value = None if n is None or hw is None else _threshold_c(
                    hw / f"temp{n}_{kind}")
                if value is not None:
                    return value
            return None

        lo = watts("power1_cap_min")
        slowdown, shutdown = threshold("crit"), threshold("emergency")
        numa = opt_int(dev / "numa_node")
        if numa is None or numa < 0:
            numa = self._node_of_cpulist(dev, topo)
        return GpuInfo(
            index=0, uuid=card.uuid, name=self._name(dev), pci_bus_id=card.pci, vendor="amd",
            numa_node=numa, memory_total_bytes=opt_int(dev / "mem_info_vram_total"),
            default_power_limit_w=watts("power1_cap_default"),
            min_power_limit_w=lo if lo else None,
            max_power_limit_w=watts("power1_cap_max"),
            slowdown_c=slowdown, shutdown_c=shutdown, pin=pin,
            devices=self._render_nodes(card.pci))

    def _render_nodes(self, pci: str) -> tuple[str, ...]:
        """The card's render node (`/dev/dri/renderD<N>`), found as the `renderD<N>` of
        class/drm whose device is the card's PCI slot: what a container needs of it."""
        try:
            names = sorted(n for n in os.listdir(self._drm) if n.startswith("renderD"))
        except OSError:
            return ()
        out: list[str] = []
        for name in names:
            node = self._drm / name
            ev = self._uevent(node / "device")
            slot = ev.get("PCI_SLOT_NAME") or os.path.basename(
                os.path.realpath(node / "device"))
            if slot.strip().lower() == pci:
                devname = self._uevent(node).get("DEVNAME") or f"dri/{name}"
                out.append(f"/dev/{devname}")
        return tuple(out)

    @staticmethod
    def _node_of_cpulist(device: Path, topo: Topology) -> int:
        """The one NUMA node whose CPUs are the device's `local_cpulist`, else -1."""
        try:
            local = parse_cpulist(_read(device / "local_cpulist"))
        except (_Vanished, OSError, ValueError):
            return -1
        nodes = [n for n in sorted(topo.nodes()) if topo.node_cpus(n) == local]
        return nodes[0] if len(nodes) == 1 and local else -1

    @staticmethod
    def _name(device: Path) -> str:
        """`product_name` (server cards with a FRU EEPROM), else `AMD GPU 1002:7550 rev c0`."""
        def text(name: str) -> str:
            try:
                return _read(device / name).strip()
            except (_Vanished, OSError):
                return ""

        product = text("product_name")
        if product:
            return product
        dev_id, rev = text("device").lower(), text("revision").lower()
        name = f"AMD GPU 1002:{dev_id.removeprefix('0x') or '?'}"
        return f"{name} rev {rev.removeprefix('0x')}" if rev else name

    def _card(self, gpu: GpuInfo) -> _Card:
        """The card's paths: cached, or found again (by PCI slot and unique_id) after it was
        lost. Raises GpuLostError while it is not there."""
        with self._lock:
            card = self._cards.get(gpu.uuid)
        if card is not None:
            return card
        found = self._refind(gpu)
        if found is None:
            raise GpuLostError(f"AMD GPU {gpu.uuid} ({gpu.pci_bus_id}) is not present")
        with self._lock:
            self._cards[gpu.uuid] = found
        return found

    def _refind(self, gpu: GpuInfo) -> _Card | None:
        try:
            devices = self._card_dirs()
        except BackendUnavailable:
            return None
        want_pci = gpu.pci_bus_id.strip().lower()
        want_uid = gpu.uuid[4:] if gpu.uuid.startswith("GPU-") else None
        for device in devices:
            if self._amd_pci(device) != want_pci:
                continue
            if want_uid is not None:
                uid = self._sysfs_unique_id(device)
                if uid is not None and uid != want_uid.lower():
                    return None  # another card in that slot
            with self._lock:
                need_hwmon = gpu.uuid in self._expect_hwmon
                need_junction = gpu.uuid in self._expect_junction
            try:
                card = self._locate(device, gpu.uuid, want_pci)
            except OSError:
                return None
            if (need_hwmon and card.hwmon is None) or (need_junction and card.junction is None):
                return None  # back, but its driver has not finished setting it up
            return card
        return None

    def _forget(self, gpu: GpuInfo, card: _Card) -> None:
        with self._lock:
            if self._cards.get(gpu.uuid) is card:
                del self._cards[gpu.uuid]

    def _lost(self, gpu: GpuInfo, card: _Card, exc: _Vanished) -> GpuLostError:
        self._forget(gpu, card)
        return GpuLostError(f"AMD GPU {gpu.uuid} ({card.pci}) is gone: {exc} vanished")

    def _relocate(self, gpu: GpuInfo, card: _Card) -> _Card:
        """The card is there but a file of it is not where it was: find its files afresh
        (its hwmon directory may have been renumbered). Returns the card's paths now."""
        try:
            fresh = self._locate(card.device, card.uuid, card.pci)
        except OSError:
            return card
        with self._lock:
            if self._cards.get(gpu.uuid) is card:
                self._cards[gpu.uuid] = fresh
        return fresh

    # --- readings ----------------------------------------------------------------------

    def read(self, gpu: GpuInfo) -> GpuReading:
        """The values as the module's doc says; None where not reported. A dGPU that runtime
        PM has put to sleep (BACO: no display, no compute process) answers EPERM to its
        sensors (the driver does not wake it for a reading): its reading is then empty but
        for the VRAM in use, not an error. EPERM on the policy sensor while it is awake (a
        reset in progress) is a SensorError; the policy sensor failing in any other way too
        ("junction temperature unreadable"); another file failing leaves its value None."""
        card = self._card(gpu)
        label = f"GPU{gpu.index} ({card.pci})"
        with self._lock:
            need_junction = gpu.uuid in self._expect_junction
        if need_junction and card.junction is None:  # its junction sensor was not listed
            if not os.path.isdir(card.device):
                raise self._lost(gpu, card, _Vanished(str(card.device)))
            card = self._relocate(gpu, card)
            if card.junction is None:
                where = card.hwmon.name if card.hwmon is not None else "no hwmon directory"
                raise SensorError(f"{label}: junction temperature unreadable: no junction "
                                  f"sensor ({where})")
        policy = card.junction if card.junction is not None else card.edge
        policy_name = "junction" if card.junction is not None else "edge"
        refused: list[Path] = []
        failed: dict[Path, str] = {}

        def value(path: Path | None, scale: float) -> float | None:
            if path is None:
                return None
            try:
                return _int(path) / scale
            except _Vanished:
                if not os.path.isdir(card.device):
                    raise  # the card itself is gone
                failed[path] = "vanished"
            except SensorError as exc:  # not a number
                failed[path] = str(exc).removeprefix(f"{path}: ")
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    refused.append(path)
                elif exc.errno in _ABSENT and path != policy:
                    pass  # not reported right now
                else:
                    failed[path] = exc.strerror or str(exc)
            return None

        try:
            edge = value(card.edge, 1000.0)
            junction = value(card.junction, 1000.0)
            reading = GpuReading(
                temperature_c=edge if card.edge is not None else junction,
                memory_temperature_c=value(card.mem, 1000.0),
                power_w=value(card.power, 1e6),
                power_limit_w=value(card.cap, 1e6),
                utilization_pct=value(card.busy, 1.0),
                memory_used_bytes=None if (used := value(card.vram_used, 1.0)) is None
                else int(used),
                hotspot_c=junction,
            )
            asleep = bool(refused) and self._asleep(card)
        except _Vanished as exc:
            raise self._lost(gpu, card, exc) from None
        if refused and not asleep:
            if policy in refused:
                raise SensorError(f"{label}: {policy_name} temperature unreadable: the driver "
                                  f"refuses to read {', '.join(p.name for p in refused)} "
                                  "(EPERM: a reset in progress?)")
            for path in refused:
                failed[path] = "refused (EPERM)"
        if policy is not None and policy in failed:
            if failed[policy] == "vanished":
                self._relocate(gpu, card)
            raise SensorError(f"{label}: {policy_name} temperature unreadable: {policy.name}: "
                              f"{failed[policy]}")
        for path, why in failed.items():
            self._limiter.warning(f"{gpu.uuid}:{path.name}", "%s: %s unreadable (%s): not "
                                  "reported until it reads again", label, path.name, why)
        return reading

    def _asleep(self, card: _Card) -> bool:
        """Runtime-suspended (`power/runtime_status`), where the sensors answer EPERM."""
        text = self._optional(card, card.device / "power" / "runtime_status")
        return text is not None and text.strip() in ("suspended", "suspending")

    def set_power_limit(self, gpu: GpuInfo, watts: float) -> None:
        card = self._card(gpu)
        what = f"cannot set the power limit of GPU{gpu.index} ({card.pci}) to {watts:g} W"
        if card.cap is None:
            raise SensorError(f"{what}: the board has no power1_cap")
        if not math.isfinite(watts) or watts <= 0:
            raise SensorError(f"{what}: not a positive number of watts")
        whole = math.floor(watts + 1e-6)  # the driver keeps whole watts
        try:
            lo = _int(card.cap_min) / 1e6 if card.cap_min is not None else 0.0
            hi = _int(card.cap_max) / 1e6 if card.cap_max is not None else math.inf
            if not lo <= whole <= hi:
                raise SensorError(f"{what}: outside [{lo:g}, {hi:g}] W (power1_cap_min, "
                                  "power1_cap_max)")
            _write(card.cap, f"{whole * 1_000_000}\n")
        except _Vanished as exc:
            if os.path.isdir(card.device):  # a file of it, not the card
                raise SensorError(f"{what}: {exc} vanished") from None
            raise self._lost(gpu, card, exc) from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise SensorError(f"{what}: refused by the driver (outside [{lo:g}, {hi:g}] W?)"
                                  ) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise SensorError(f"{what}: {card.cap}: permission denied (writing power1_cap "
                                  "needs root)") from None
            raise SensorError(f"{what}: {exc.strerror or exc}") from None

    # --- health ------------------------------------------------------------------------

    def read_health(self, gpu: GpuInfo) -> GpuHealth:
        """PCIe link (see `_link`) and the RAS counters of boards with ECC (`ras/`); None
        where not reported. No clock-event reasons (amdgpu has them only in the binary
        `gpu_metrics`)."""
        card = self._card(gpu)
        try:
            gen, gen_max, width, width_max = self._link(card)
            ue, ce, retired, pending, failed = self._ras(card)
        except _Vanished as exc:
            raise self._lost(gpu, card, exc) from None
        return GpuHealth(pcie_gen=gen, pcie_gen_max=gen_max, pcie_width=width,
                         pcie_width_max=width_max, ecc_uncorrected_volatile=ue,
                         ecc_corrected_volatile=ce, retired_pages=retired,
                         retirement_pending=pending, remap_failed=failed)

    def _optional(self, card: _Card, path: Path) -> str | None:
        """A file that a board may not have: None if absent (the card still there) or not
        answered; _Vanished if the card is gone; SensorError for other failures."""
        try:
            return _read(path)
        except _Vanished:
            if not os.path.isdir(card.device):
                raise
            return None
        except OSError as exc:
            if exc.errno in _ABSENT or exc.errno == errno.EPERM:  # EPERM: asleep, or a reset
                return None
            raise SensorError(f"{path}: {exc.strerror or exc}") from None

    def _link(self, card: _Card) -> tuple[int | None, int | None, int | None, int | None]:
        """(gen, gen max, width, width max) of the card's link to the host.

        On Navi cards the GPU sits behind the board's own PCIe switch (AMD bridges above it),
        so the GPU's `current_link_*`/`max_link_*` describe that internal link (32 GT/s x16
        on a 9070 XT in any slot). The real link is the switch's upstream port's, whose
        maximum is the lower of its own `max_link_*` and the host port's above it. Its speed
        drops when the card idles (PCIe DPM), so the speed and width in use are the fastest
        level of `pp_dpm_pcie`, which the driver caps at what the slot trained to; without
        `pp_dpm_pcie`, the link's `current_link_*`."""
        link = card.link or card.device
        ends = [link]
        if (link.parent / "max_link_speed").exists():
            ends.append(link.parent)

        def num(path: Path) -> int | None:
            text = self._optional(card, path)
            return int(text.strip()) if text and text.strip().isdigit() else None

        def gen(path: Path) -> int | None:
            text = self._optional(card, path)
            return None if text is None else pcie_gen(text)

        gens = [g for e in ends if (g := gen(e / "max_link_speed")) is not None]
        widths = [w for e in ends if (w := num(e / "max_link_width")) is not None]
        gen_max, width_max = min(gens, default=None), min(widths, default=None)
        dpm = self._optional(card, card.device / "pp_dpm_pcie")
        levels = [(g, int(w)) for s, w in _DPM_PCIE_RE.findall(dpm or "")
                  if (g := _GEN_OF_GTS.get(float(s))) is not None]
        if levels:
            top = max(levels)
            return top[0], gen_max, top[1], width_max
        return (gen(link / "current_link_speed"), gen_max, num(link / "current_link_width"),
                width_max)

    def _ras(self, card: _Card) -> tuple[int | None, int | None, int | None, bool | None,
                                         bool | None]:
        """(uncorrected, corrected, retired pages, retirement pending, retirement failed)
        from `ras/*_err_count` ("ue: N", "ce: N" lines; summed over the blocks) and
        `ras/gpu_vram_bad_pages` (`pfn : size : flags`, R retired, P pending, F failed)."""
        ras = card.device / "ras"
        names = _listdir(ras)
        if not names:
            if not os.path.isdir(card.device):
                raise _Vanished(str(ras))
            return None, None, None, None, None
        ue = ce = None
        for n in sorted(names):
            if not n.endswith("_err_count"):
                continue
            text = self._optional(card, ras / n) or ""
            for line in text.splitlines():
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("ue", "ce") and value.isdigit():
                    if key == "ue":
                        ue = (ue or 0) + int(value)
                    else:
                        ce = (ce or 0) + int(value)
        retired: int | None = None
        pending = failed = None
        if "gpu_vram_bad_pages" in names:
            pages = self._optional(card, ras / "gpu_vram_bad_pages")
            if pages is not None:
                flags = [line.rsplit(":", 1)[1].strip() for line in pages.splitlines()
                         if line.count(":") >= 2]
                retired = flags.count("R")
                pending, failed = "P" in flags, "F" in flags
        return ue, ce, retired, pending, failed

    def close(self) -> None:
        with self._lock:
            self._cards = {}


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _is_amd_bridge(path: Path) -> bool:
    """An AMD (0x1002) PCI bridge: the internal switch of a Navi board."""
    try:
        return (_read(path / "vendor").strip() == "0x1002"
                and _read(path / "class").strip().startswith("0x0604"))
    except (_Vanished, OSError):
        return False


def _write(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _LOST:
            raise _Vanished(str(path)) from None
        raise
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        if exc.errno in _LOST:
            raise _Vanished(str(path)) from None
        raise
    finally:
        os.close(fd)
