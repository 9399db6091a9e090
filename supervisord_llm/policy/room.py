"""Room on the GPUs for an on-demand service, pure: `plan_room(want, holders)` says whether the
service fits now, which idle services to stop first, which busy ones to drain (the fairness
rule), or why it must wait; with the message an operator reads. No asyncio, no actors: the
swapper builds the snapshot (`Want`, `Holder`) and carries the plan out.

- A service needs on each of its GPUs what `Want.need` / `Holder.need` say (the larger of its
  `vram_gb` and what was learned once it was ready). A GPU's memory in use is the larger of
  what the services holding it need and what the GPU reports used (a stranger's process
  counts too). A GPU whose size is unknown never lacks room.
- Services going down (stopping, not to come back, or being drained for a demand) will free
  their memory: they count as freed, and the load waits until they have exited rather than
  stopping more.
- `exclusive` (on either side) reserves the GPU: every other holder must go; one that cannot
  (an `always` service, a pinned one) blocks it ("reserved by").
- Victims are on-demand services not pinned, idle (ready, nothing in their gate) and loaded at
  least their `min_residency_s` ago, least recently used first, only as many as needed.
- Without enough idle victims, when every busy one it would need has been loaded long
  enough, busy ones are drained, least recently loaded first (`drain`): the demand waits.
- Otherwise it waits (`wait`: the busy ones could make room once idle) or cannot be served
  now (`wait` False: what holds the memory is `always`, pinned or exclusive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

GIB: Final = 1024**3


def gib(n: float | None) -> str:
    return f"{(n or 0) / GIB:.1f} GiB"


@dataclass(frozen=True)
class Gpu:
    uuid: str
    index: int
    total: int | None  # bytes; None: unknown
    used: int | None = None  # what it reports used, from a reading since the last change


@dataclass(frozen=True)
class Want:
    name: str
    gpus: tuple[Gpu, ...]
    need: Mapping[str, int]  # GPU uuid -> bytes
    exclusive: bool = False


@dataclass(frozen=True)
class Holder:
    """A service that holds, or will hold, memory on some of the wanted GPUs."""

    name: str
    need: Mapping[str, int]  # GPU uuid -> bytes (only its GPUs)
    on_demand: bool = True
    exclusive: bool = False
    state: str = "ready"
    going: bool = False  # stopping, not to come back, or being drained for a demand
    pinned: bool = False  # by `llmctl start` (or being pinned by one)
    registered: bool = True  # False: a hot swap's replacement or retiring instance
    busy: bool = False  # a request in its gate (in flight, queued, or waiting)
    acting: bool = False  # a start or stop of the swapper's in flight on it
    resident_left: float = 0.0  # seconds it is still kept by min_residency_s
    last_used: float = 0.0  # its gate's last activity (least recently used goes first)
    loaded_at: float = 0.0  # when it became ready (least recently loaded drains first)
    in_flight: int = 0  # for the message
    draining_for: str | None = None  # the demand it is drained for (for the message)
    min_residency_s: float | None = None  # for the message

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def evictable(self) -> bool:
        return self.on_demand and not self.pinned and self.registered

    @property
    def victim_now(self) -> bool:
        """Idle, and loaded long enough: it may be stopped at once."""
        return self.ready and not self.busy and not self.acting and not self.resident_left

    @property
    def drainable(self) -> bool:
        """Busy, and loaded long enough: it may be drained for a demand."""
        return self.ready and not self.acting and not self.resident_left \
            and not self.victim_now


@dataclass(frozen=True)
class RoomPlan:
    ok: bool  # room now, or once `victims` are stopped
    victims: list[str]
    wait: bool  # no room now, but busy services could make it once idle
    message: str
    drain: list[str] = field(default_factory=list)  # busy ones to drain (then stop) for it


def plan_room(want: Want, holders: Sequence[Holder]) -> RoomPlan:
    gpus = {g.uuid: g for g in want.gpus}
    if not gpus:
        return RoomPlan(True, [], False, "")
    holding = [h for h in holders if h.name != want.name and any(u in gpus for u in h.need)]
    going = [h for h in holding if h.going]
    forced = [h for h in holding if want.exclusive or h.exclusive]
    committed = {u: sum(h.need.get(u, 0) for h in holding) for u in gpus}

    def short(freed: Mapping[str, int]) -> set[str]:
        out = set()
        for u, g in gpus.items():
            if g.total is None:
                continue
            in_use = max(committed[u], g.used or 0) - freed.get(u, 0)
            if want.need.get(u, 0) - (g.total - in_use) > 0:
                out.add(u)
        return out

    def free(victims: Sequence[Holder]) -> dict[str, int]:
        freed: dict[str, int] = {}
        for h in victims:
            for u, b in h.need.items():
                freed[u] = freed.get(u, 0) + b
        return freed

    def message(verb: str) -> str:
        return room_message(want, holding, committed, verb)

    if any(h not in going and not h.evictable for h in forced):
        return RoomPlan(False, [], False, message("reserved by"))
    victims = list(going)
    victims += [h for h in forced if h not in victims]
    candidates = sorted((h for h in holding if h not in victims and h.evictable),
                        key=lambda h: h.last_used)
    for h in candidates:
        lack = short(free(victims))
        if not lack:
            break
        if h.victim_now and lack & set(h.need):
            victims.append(h)
    lack = short(free(victims))
    busy = [h for h in victims if h not in going and not h.victim_now]
    if not lack and not busy:
        new = [h.name for h in victims if h not in going]
        if new:
            return RoomPlan(True, new, False, "")
        if going:  # room once they have exited
            return RoomPlan(False, [], True, message("still held by"))
        return RoomPlan(True, [], False, "")
    # fairness: busy services do not keep it waiting for good; those loaded at least their
    # min_residency_s ago are drained, least recently loaded first
    if all(h.drainable for h in busy):
        drain = list(busy)
        rest = [h for h in victims if h not in busy]  # each holder's memory counted once
        for h in sorted((h for h in candidates if h not in victims and h.drainable),
                        key=lambda h: h.loaded_at):
            lack = short(free(rest + drain))
            if not lack:
                break
            if lack & set(h.need):
                drain.append(h)
        if drain and not short(free(rest + drain)):
            return RoomPlan(False, [], True, message("held by"), drain=[h.name for h in drain])
    # could the busy ones make room once idle?
    wait = not short(free(victims + [h for h in candidates if h not in victims]))
    return RoomPlan(False, [], wait, message("held by"))


def describe(h: Holder) -> str:
    """What holds a service's memory, for the no-room message."""
    what = "always" if not h.on_demand else (
        "pinned by llmctl start" if h.pinned else
        f"{h.in_flight} request(s) in flight" if h.in_flight > 0 else
        "stopping" if h.state == "stopping" else h.state)
    if h.exclusive:
        what += ", exclusive"
    if h.draining_for is not None:
        what += f", draining for {h.draining_for}: stopped once its requests in flight are " \
            "answered"
    elif h.on_demand and h.resident_left and not h.pinned and h.min_residency_s:
        what += f", loaded {h.min_residency_s - h.resident_left:.0f} s ago: kept " \
            f"{h.resident_left:.0f} s more by min_residency_s = {h.min_residency_s:g}"
    return what


def room_message(want: Want, holding: Sequence[Holder], committed: Mapping[str, int],
                 verb: str) -> str:
    parts = []
    for g in want.gpus:
        who = [f"{h.name} ({describe(h)}, {gib(h.need.get(g.uuid, 0))})"
               for h in holding if g.uuid in h.need]
        in_use = max(committed.get(g.uuid, 0), g.used or 0)
        space = f"{gib(max(0, g.total - in_use))} free of {gib(g.total)}" \
            if g.total else "size unknown"
        parts.append(f"GPU{g.index} ({space}) {verb} " + (", ".join(who) or "no service"))
    needs = max(want.need.values(), default=0)
    what = "the whole GPU (exclusive)" if want.exclusive else gib(needs)
    return f"no room for {want.name} (needs {what}): " + "; ".join(parts)
