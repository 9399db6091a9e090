"""Rolling out changes: the hot swap of one service, and the application of a reloaded
configuration. Both run as host operations (`host.py`): cancellable at any await (a stop of
the daemon pre-empts them), and whatever they started is stopped again when they are
cancelled or fail. Every instance they create is in the registry (`sup.extra`, shown by
`status`) from its launch to its end.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P
from .config import Config, GateSection
from .errors import ControlError, StartupError
from .plan import ServicePlan
from .ports import pick_free_port, port_free
from .service import Reconfigure, ServiceActor
from .states import State
from .supervisor import SETTLE_GRACE_S, Supervisor, initial_holds

log = logging.getLogger(__name__)


def _without_gate(plan: ServicePlan) -> ServicePlan:
    """The plan without what applies live: the gate, and how the service is loaded on
    demand (models, start, idle_stop_s, vram_gb, exclusive, min_residency_s)."""
    return dataclasses.replace(plan, config=dataclasses.replace(
        plan.config, gate=None, models=(), start="always", idle_stop_s=None, vram_gb=None,
        exclusive=False, min_residency_s=0.0))


def _names(items: list[str]) -> str:
    return ", ".join(items) or "-"


# --- hot swap ------------------------------------------------------------------------------------


async def swap(sup: Supervisor, name: str, plan: ServicePlan | None,
               timeout_s: float | None) -> dict[str, Any]:
    """Start a second instance on the other port, switch the gate to it once it is ready, let
    the old one finish its requests (at most the gate's drain_timeout_s), then stop it."""
    old = sup.actor(name)
    gate = sup.gate_of(name)
    gcfg = old.cfg.gate
    if gate is None or sup.gates is None or gcfg is None:
        raise ControlError(P.FAILED, f"{name} has no gate ([service.gate] in the config): "
                           "use `llmctl restart`")
    if old.state is not State.READY:
        raise ControlError(P.FAILED, f"{name} is {old.state}, not ready: nothing to swap "
                           "(use `llmctl restart`)")
    plan = plan or old.plan
    new_gcfg = plan.config.gate or gcfg
    ports = (plan.config.port, new_gcfg.swap_port)
    taken = sup.ports_in_use() - {p for p in ports if p is not None and p != old.port}
    if old.port == ports[0] and ports[1] is not None:
        new_port = ports[1]
    elif old.port != ports[0] and ports[0] is not None:
        new_port = ports[0]
    else:
        new_port = pick_free_port(exclude=taken | {old.port or 0})
    if not port_free(new_port):
        raise ControlError(P.FAILED, f"{name}: port {new_port} for the replacement is in use by "
                           "another process; the old instance keeps serving (free the port, "
                           "or change gate.swap_port)")
    log.info("%s: hot swap: second instance on port %d", name, new_port)
    new = sup.make_actor(plan, port=new_port, counters=old.counters)
    sup.extra[name] = ("replacement", new)
    sup.changed()
    new.run()
    limit = timeout_s or (plan.config.health.startup_timeout_s + SETTLE_GRACE_S)
    try:
        await new.command("start")
        try:
            state = await new.wait_settled(0, limit)
        except TimeoutError:
            state = new.state
        if state is not State.READY:
            why = new.failed_reason or new.last_exit or f"not ready after {limit:g} s"
            raise ControlError(P.FAILED, f"{name}: the replacement did not become ready "
                               f"({state}: {why}); the old instance keeps serving")
    except BaseException:
        log.info("%s: hot swap abandoned; stopping the replacement", name)
        try:
            await sup.stop_actor(new, remove=True)
        finally:
            sup.extra.pop(name, None)
            sup.changed()
        raise
    # the switch: the gate follows the registry's actor, atomically on the supervisor's loop
    sup.extra[name] = ("retiring", old)
    sup.actors[name] = new
    sup.changed()
    old_up = ("127.0.0.1", old.port or 0)
    drain_s = new_gcfg.drain_timeout_s
    try:
        try:
            if not await gate.wait_idle(port=old_up[1], timeout_s=drain_s):
                raise TimeoutError
        except TimeoutError:
            log.warning("%s: hot swap: requests still on the old instance after %g s; "
                        "stopping it", name, drain_s)
        await sup.stop_actor(old, remove=True)
    finally:
        if sup.extra.get(name, (None, None))[1] is old:
            del sup.extra[name]
        sup.changed()
    log.info("%s: hot swap done: port %s -> %d", name, old.port, new_port)
    return {"service": name, "old_port": old.port, "port": new_port, "state": new.state.value}


# --- reload ---------------------------------------------------------------------------------------


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    # changed without a restart: held or stopped (not started), or only what applies live
    # changed (models, start, idle_stop_s, vram_gb, exclusive, min_residency_s)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    not_ready: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "restarted": self.restarted,
                "swapped": self.swapped, "updated": self.updated, "unchanged": self.unchanged,
                "not_ready": self.not_ready, "warnings": self.warnings}

    def summary(self) -> str:
        return (f"added {_names(self.added)}; removed {_names(self.removed)}; restarted "
                f"{_names(self.restarted)}; swapped {_names(self.swapped)}; updated (no "
                f"restart) {_names(self.updated)}; unchanged {_names(self.unchanged)}")


def check_reload(sup: Supervisor, cfg: Config, plans: list[ServicePlan]) -> None:
    """What a validated config can still get wrong against what runs now: refused before
    anything changes (ControlError config_error)."""
    if not plans and sup.actors:
        raise ControlError(P.CONFIG_ERROR, "the new configuration has no [[service]]: a reload "
                           "does not stop every service (an empty file caught mid-write?); "
                           "use `llmctl stop --all`, or restart llm-supervisor with it")
    # instances a hot swap moved off their configured port hold a port no config names
    holders = {a.port: a.name for a in sup.all_actors()
               if a.port is not None and a.port != a.cfg.port and a.state is not State.STOPPED}
    problems = []
    for i, plan in enumerate(plans):
        c = plan.config
        ports = [("port", c.port)]
        if c.gate is not None:
            ports += [("gate.listen", c.gate.listen.port if c.gate.listen else None),
                      ("gate.swap_port", c.gate.swap_port)]
        for key, port in ports:
            owner = holders.get(port) if port is not None else None
            if owner is not None and owner != c.name:
                problems.append(f"service[{i}].{key}: port {port} is in use by {owner}'s "
                                "running instance (moved there by a hot swap)")
    running_gates = {name: a.cfg.gate.listen for name, a in sup.actors.items() if a.cfg.gate}
    for i, plan in enumerate(plans):
        c = plan.config
        gate = c.gate
        if gate is not None and gate.listen is not None \
                and running_gates.get(c.name) != gate.listen \
                and gate.listen not in running_gates.values() \
                and not port_free(gate.listen.port, gate.listen.host):
            problems.append(f"service[{i}].gate.listen: {gate.listen} is in use by another "
                            "process")
        current = sup.actors.get(c.name)
        if c.port is not None and (current is None or current.port != c.port) \
                and c.port not in holders and not port_free(c.port):
            problems.append(f"service[{i}].port: {c.port} is in use by another process")
    if problems:
        raise ControlError(P.CONFIG_ERROR, "new configuration conflicts with what runs, "
                           "keeping the running one: " + "; ".join(problems))


async def reload(sup: Supervisor, cfg: Config, plans: list[ServicePlan]) -> ReloadResult:
    """Apply a validated config: restart only what changed, keep the rest running, then wait
    until what was started or restarted is ready (or failed)."""
    check_reload(sup, cfg, plans)
    res = ReloadResult()
    old_cfg = sup.cfg
    for section in ("supervisor", "metrics", "gpu"):
        if getattr(old_cfg, section) != getattr(cfg, section):
            res.warnings.append(f"[{section}] changed: takes effect at the next restart "
                                "of llm-supervisor")
    new_plans = {p.name: p for p in plans}
    old_gates = {name: a.cfg.gate for name, a in sup.actors.items()}
    for name in [n for n in sup.actors if n not in new_plans]:
        actor = sup.actors[name]
        await sup.stop_actor(actor, remove=True)
        del sup.actors[name]
        sup.changed()
        res.removed.append(name)
    started: list[ServiceActor] = []
    order: list[str] = []
    for name, plan in new_plans.items():
        order.append(name)
        current = sup.actors.get(name)
        if current is None:
            actor = sup.make_actor(plan, holds=initial_holds(plan), added=True)
            sup.actors[name] = actor
            actor.run()
            started.append(actor)
            res.added.append(name)
        elif current.plan == plan:
            res.unchanged.append(name)
        elif _without_gate(current.plan) == _without_gate(plan):
            # only what applies live changed ([service.gate], the on-demand keys)
            demand_keys = dataclasses.replace(current.plan.config, gate=None) != \
                dataclasses.replace(plan.config, gate=None)
            await current.send(Reconfigure(plan))
            if not plan.config.on_demand and "idle" in current.holds:
                # now `always`: it starts, once there is room (idle on-demand services on
                # its GPUs are stopped first)
                sup.wants.ask(name, None, force=True)
            if demand_keys:
                res.updated.append(name)  # models, start, idle_stop_s, ... (what applies live)
            else:
                res.unchanged.append(name)
        elif (current.cfg.gate is not None and current.cfg.gate == plan.config.gate
              and current.state is State.READY and sup.gate_of(name) is not None):
            try:  # behind an unchanged gate: hot swap, no request lost
                await swap(sup, name, plan, None)
                res.swapped.append(name)
            except ControlError as exc:
                res.warnings.append(f"{name}: hot swap failed ({exc.message}); the old "
                                    "instance keeps serving with the old configuration")
        else:
            up, wanted, holds = current.up, current.model.wanted, current.holds
            if not plan.config.on_demand:
                holds = holds - {"idle"}
                up = up or (wanted and not holds)
            await sup.stop_actor(current, remove=True)
            actor = sup.make_actor(plan, counters=current.counters, wanted=wanted, holds=holds)
            sup.actors[name] = actor
            actor.run()
            if up:
                started.append(actor)
                res.restarted.append(name)
            else:  # held or stopped: it keeps its holds, and starts with the new config
                res.updated.append(name)
        sup.changed()
    sup.actors = {n: sup.actors[n] for n in order}
    sup.cfg = cfg
    await _reconcile_gates(sup, old_gates, res)
    for actor in started:
        await actor.command("start")
    sup.changed()
    for actor in started:
        limit = actor.cfg.health.startup_timeout_s + SETTLE_GRACE_S
        try:
            state = await actor.wait_settled(0, limit)
        except TimeoutError:
            state = actor.state
        if state not in (State.READY, State.DRAINING):
            res.not_ready[actor.name] = (f"{state}: {actor.failed_reason or actor.last_exit}"
                                         if state is State.FAILED else str(state))
    await sup.gates_settled()
    return res


async def _reconcile_gates(sup: Supervisor, old: dict[str, GateSection | None],
                           res: ReloadResult) -> None:
    """After a reload: new gates bind, removed ones close, changed settings apply live; a
    gate whose listen address changed is bound at the new one before the old one closes."""
    for name, was in old.items():
        now = sup.actors[name].cfg.gate if name in sup.actors else None
        gate = sup.gate_of(name)
        if gate is None or sup.gates is None or was == now:
            continue
        if now is not None and was is not None and now.listen == was.listen:
            sup.gates.call(gate.reconfigure, now)
        elif now is not None and was is not None:
            try:
                await sup.gates.rebind(name, now)
                log.info("%s: gate moved from %s to %s", name, was.listen or "the router only",
                         now.listen or "the router only")
            except StartupError as exc:
                res.warnings.append(str(exc))
        else:
            log.info("%s: gate %s closed", name,
                     (was.listen or "(router only)") if was else "-")
            await sup.remove_gate(name)
    res.warnings += await sup.start_gates()  # (it settles the listening sockets)
