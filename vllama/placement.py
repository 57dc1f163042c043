"""Placement: the devices' and the host's memory as the policy sees it, and the execution of its plans.

`make_room` is run by the owner of the model being placed. It asks `scheduler.plan_placement` (pure) for a
plan, and either reserves (no await between the plan and the reservation, so every later plan counts it) or
runs the plan's first eviction by *asking* the victim's owner (`Instance.try_evict`: "not now" at once when the
victim is busy), then plans again from fresh readings. It holds no lock, ever: waiting for memory is waiting
for a change (an instance settled, a request finished), with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from vllama import scheduler
from vllama.config import GIB, ModelConfig, Settings
from vllama.errors import NoCapacity
from vllama.gpu import GpuProbe
from vllama.instance import Instance, Outcome, Reservation, State, action_of
from vllama.sizing import checkpoint_bytes, model_dir

if TYPE_CHECKING:
    from vllama.registry import Registry

log = logging.getLogger("vllama")

NeedFor = Callable[[ModelConfig, int, str], tuple[int, float | None]]
DemandFor = Callable[[Instance, "tuple[int, ...] | None", bool], scheduler.Demand]
OnEviction = Callable[[Instance, str, str], None]  # victim, action (sleep_l1/sleep_l2/stop), for which model


def default_host_budget() -> int:
    """80% of the host memory available now (`MemAvailable`) for level-1 sleepers' weights."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


class Placement:
    def __init__(
        self,
        settings: Settings,
        probe: GpuProbe,
        registry: Registry,
        need_for: NeedFor,
        demand_for: DemandFor,
        on_eviction: OnEviction,
        *,
        host_budget: int,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.registry = registry
        self.need_for = need_for
        self.demand_for = demand_for
        self.on_eviction = on_eviction
        self.host_budget = host_budget
        self._changed = asyncio.Event()
        self._weights_on_disk: dict[str, int | None] = {}
        # model → bytes per device: the room an eviction is freeing for that model, until its next plan (see
        # make_room); other models' plans do not count it as free
        self._claims: dict[str, dict[int, int]] = {}

    def changed(self) -> None:
        """Something that may free memory happened: wake everyone waiting for room."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- what the policy sees ------------------------------------------------------------------------------

    def host_bytes_at_l1(self, inst: Instance) -> int:
        """Host memory a model's weights take asleep at level 1: the checkpoint's size where its files are local,
        else what it holds awake less what it keeps asleep (more than the weights: a safe side)."""
        source = inst.cfg.source or inst.name
        if source not in self._weights_on_disk:  # looked up once per source (the plans read it often)
            folder = model_dir(source)
            self._weights_on_disk[source] = checkpoint_bytes(folder)[0] if folder is not None else None
        on_disk = self._weights_on_disk[source]
        if on_disk:
            return on_disk
        return max(inst.need - self._asleep_held(inst), 0) * max(len(inst.devices), 1)

    def host_free(self) -> int:
        """What is left of the host budget for level-1 sleepers (negative when overdrawn)."""
        used = sum(i.host_held for i in self.registry.instances.values() if i.state is State.SLEEPING)
        return self.host_budget - used

    def _asleep_held(self, inst: Instance) -> int:
        return inst.asleep_held or int(self.settings.sleep_residual_gib * GIB)

    def loading(self, exclude: Instance | None = None) -> dict[int, str]:
        """GPU device → the model starting or waking there (vLLM sizes itself from free memory meanwhile)."""
        if self.probe.kind != "cuda":
            return {}
        out: dict[int, str] = {}
        for inst in self.registry.instances.values():
            if inst is not exclude and inst.state in (State.STARTING, State.WAKING):
                for d in inst.devices:
                    out[d] = inst.name
        return out

    def memory_view(
        self, for_model: str | None = None
    ) -> tuple[list[scheduler.DeviceMemory], list[scheduler.Resident]]:
        """The devices' free memory (measured, less what loading instances reserved but have not taken yet, less
        the room other models' evictions are freeing for them) and every instance that holds memory, for the
        policy (as `for_model` sees it)."""
        devices = self.probe.devices()
        measured = self.measured_by_instance()
        reserved = {d.index: 0 for d in devices}
        residents = []
        for inst in self.registry.instances.values():
            if inst.state in (State.STOPPED, State.ERROR) and inst.engine is None:
                continue
            mine = measured.get(inst.name, {})
            held_now = max([inst.reserved(), *mine.values()])
            for d in inst.devices:
                if d in reserved:
                    reserved[d] += max(inst.reserved(), mine.get(d, 0))
            busy = inst.busy or inst.state not in (State.RUNNING, State.SLEEPING)
            asleep_at_l1 = inst.state is State.SLEEPING and inst.sleep_level == 1
            residents.append(
                scheduler.Resident(
                    name=inst.name,
                    phase="busy" if busy else ("running" if inst.state is State.RUNNING else "sleeping"),
                    devices=inst.devices,
                    held=held_now,
                    asleep_held=self._asleep_held(inst),
                    last_used=inst.last_used,
                    in_flight=inst.in_flight,
                    pinned=inst.cfg.pinned,
                    evict_level=inst.cfg.sleep_level,
                    host_l1=inst.host_held if asleep_at_l1 else (self.host_bytes_at_l1(inst) if not busy else 0),
                    can_sleep_l2=not inst.cfg.lora_enabled,
                )
            )
        for model, claim in self._claims.items():
            if model != for_model:
                for d, n in claim.items():
                    if d in reserved:
                        reserved[d] += n
        view = [
            scheduler.DeviceMemory(d.index, d.total, max(0, min(d.free, d.total - reserved[d.index]))) for d in devices
        ]
        return view, residents

    def measured_by_instance(self) -> dict[str, dict[int, int]]:
        """Device memory each instance's processes hold, as the probe measures it (model → device → bytes)."""
        names = {i.engine.pid: i.name for i in self.registry.instances.values() if i.engine is not None}
        return {names[group]: held for group, held in self._held_by_groups(set(names)).items()}

    def _held_by_groups(self, groups: set[int]) -> dict[int, dict[int, int]]:
        """Device memory held by the processes of these process groups (group → device → bytes). Each child's
        group is led by its guard: the few GPU-holding pids are mapped to groups, rather than every process of
        the machine scanned (this runs on the event loop, during placements)."""
        out: dict[int, dict[int, int]] = {}
        for pid, per_device in self.probe.process_memory().items():
            try:
                group = os.getpgid(pid)
            except OSError:
                continue
            if group in groups:
                mine = out.setdefault(group, {})
                for d, n in per_device.items():
                    mine[d] = mine.get(d, 0) + n
        return out

    def free_on(self, devices: tuple[int, ...], for_model: str | None = None) -> dict[int, int]:
        view, _ = self.memory_view(for_model)
        return {d.index: d.free for d in view if d.index in devices}

    def plan(self, inst: Instance, waking: bool) -> tuple[scheduler.Plan, scheduler.Demand]:
        fixed = inst.devices if waking else (tuple(inst.cfg.devices) if inst.cfg.devices else None)
        devices, residents = self.memory_view(inst.name)
        demand = self.demand_for(inst, fixed, waking)
        plan = scheduler.plan_placement(
            devices,
            residents,
            demand,
            can_sleep=self.probe.supports_sleep,
            host_free=self.host_free() if self.probe.supports_sleep else None,
            loading=self.busy_devices(inst),
            links=self.probe.links,
        )
        return plan, demand

    def busy_devices(self, inst: Instance) -> dict[int, str]:
        """Devices where another model loads, or is evicting to make room for itself: `inst` does not plan
        there meanwhile (on a GPU vLLM sizes a loading model from free memory; and two placements evicting on one
        device at once would both take the same victim, then one would stop it for nothing)."""
        busy = {d: name for name, claim in self._claims.items() if name != inst.name for d in claim}
        return {**busy, **self.loading(exclude=inst)}

    def _reservation(self, devices: tuple[int, ...], demand: scheduler.Demand, inst: Instance) -> Reservation:
        if demand.waking:  # same devices, same fraction
            return Reservation(devices, demand.need, inst.gpu_memory_utilization)
        totals = {d.index: d.total for d in self.probe.devices()}
        needs = demand.needs(totals, devices)
        _, util = self.need_for(inst.cfg, min(totals[d] for d in devices), inst.name)
        # one number per instance: the largest (a larger device of an unequal set needs more of its own total)
        return Reservation(devices, max(needs.values()), util)

    # --- execution (run by the owner of the model being placed) --------------------------------------------

    def room_without_eviction(self, inst: Instance) -> Reservation | None:
        """A reservation if `inst` (asleep) can wake where it is without evicting anyone, now."""
        plan, demand = self.plan(inst, waking=True)
        if isinstance(plan, scheduler.Placement) and not plan.evictions:
            return self._reservation(plan.devices, demand, inst)
        return None

    async def make_room(self, inst: Instance, waking: bool) -> Reservation:
        """Evict (one step at a time, re-reading real memory after each) until `inst` fits, then reserve. Waits
        while only busy models stand in the way, up to `capacity_wait`; then NoCapacity."""
        try:
            return await self._make_room(inst, waking)
        finally:
            self._drop_claim(inst.name)

    def _drop_claim(self, name: str) -> None:
        if self._claims.pop(name, None) is not None:
            self.changed()  # others' plans may count that room again

    async def _make_room(self, inst: Instance, waking: bool) -> Reservation:
        loop = asyncio.get_running_loop()  # deadlines are real time (`clock` is for idle times, tests move it)
        deadline = loop.time() + self.settings.capacity_wait
        while True:
            changed = self._changed
            plan, demand = self.plan(inst, waking)
            if isinstance(plan, scheduler.Placement):
                if not plan.evictions:
                    return self._reservation(plan.devices, demand, inst)  # the caller reserves: no await between
                victim = self.registry.instances.get(plan.evictions[0].name)
                totals = {d.index: d.total for d in self.probe.devices()}
                wanted = {d: n - demand.held for d, n in demand.needs(totals, plan.devices).items()}
                # the room this eviction frees is this model's until its next plan: the victim's own queued request
                # (or anyone else) does not take it back in between, which would make the two swap over and over
                self._claims[inst.name] = wanted
                if victim is not None and await self._evict(victim, plan.evictions[0], inst.name, wanted):
                    continue
                # the victim became busy since the plan was made: plan again once something changes
            elif not plan.wait:
                inst.last_error = plan.reason
                raise NoCapacity(plan.reason)
            self._drop_claim(inst.name)  # never hold room while waiting
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = plan.reason if isinstance(plan, scheduler.Blocked) else "the models in the way stayed busy"
                raise NoCapacity(f"gave up after waiting {self.settings.capacity_wait:.0f} s: {reason}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))

    async def _evict(
        self, victim: Instance, eviction: scheduler.Eviction, for_model: str, wanted: dict[int, int]
    ) -> bool:
        """Ask the victim to sleep or stop; True if it did (or failed trying, which freed its memory too).
        `wanted`: the free bytes per device the model being placed needs."""
        before = self.free_on(victim.devices, for_model)
        held_before = self.measured_by_instance().get(victim.name, {})
        outcome = await victim.try_evict(eviction.level)
        if outcome is Outcome.NOT_NOW:
            return False
        if outcome is Outcome.FAILED:
            log.warning("eviction of %s for %s failed: %s", victim.name, for_model, victim.last_error)
            return True
        self.on_eviction(victim, action_of(victim), for_model)
        expected = eviction.frees
        if victim.state is State.SLEEPING and victim.asleep_held and held_before:
            # the plan guessed what a sleeper keeps (its CUDA context); now it is measured: expect what was
            # really released, not the guess (a guess too low would wait out the settle timeout for nothing)
            expected = max(0, min(held_before.get(d, 0) for d in victim.devices) - victim.asleep_held)
        await self._settle(victim, for_model, before, expected, wanted)
        return True

    async def _settle(
        self, victim: Instance, for_model: str, before: dict[int, int], expected: int, wanted: dict[int, int]
    ) -> None:
        """Freed GPU memory shows up in NVML with a delay: wait (bounded) until most of it is back, or until
        what the model being placed needs (`wanted`, free bytes per device) is free, or until the victim's state
        changed (it died, or was stopped: the next plan sees that)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.memory_settle_timeout
        target = int(expected * 0.9)
        devices, settled_as = victim.devices, (victim.state, victim.sleep_level)
        while loop.time() < deadline:
            if (victim.state, victim.sleep_level) != settled_as:
                return
            now = self.free_on(tuple(set(devices) | set(wanted)), for_model)
            if all(now.get(d, 0) - before.get(d, 0) >= target for d in devices):
                return
            if all(now.get(d, 0) >= n for d, n in wanted.items()):
                return
            await asyncio.sleep(0.1)
        log.warning("memory on devices %s did not come back in time after an eviction", list(devices))

    def held_by(self, engine_pid: int) -> int:
        """The most device memory the process group `engine_pid` holds on one device now (0 if unknown)."""
        return max(self._held_by_groups({engine_pid}).get(engine_pid, {}).values(), default=0)
