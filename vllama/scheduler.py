"""The placement and eviction policy: pure functions, no I/O, no logging, no clock.

Given the devices' memory, the instances that hold (or will hold) memory on them and one model that needs
memory, `plan_placement` answers where the model goes and which idle instances to put to sleep or stop first,
least recently used first. The manager executes the plan step by step and re-reads real memory after each.

vLLM's memory rule: `gpu_memory_utilization × total` must be FREE on every device of an instance when it
starts (not divided by the tensor-parallel size), so the need is per device, on each device of the placement,
and computed from that device's own total: on an 80 GB + 48 GB host, 0.9 is 72 GB on one and 43 GB on the other
(`Demand.needs`). A sleeping vLLM still holds memory (its CUDA context): sleeping frees `held - asleep_held`,
stopping frees all. Level-1 sleep keeps the weights in host memory: a level-1 eviction is chosen only while the
host budget (`host_free`) has room for that model's weights, else level 2.

Fairness is per device: only instances on a device of the candidate placement can be evicted for it, and only
while that device is short; an instance on several devices (tensor parallel) counts on each of them. A model
with several devices and no fixed `devices` gets the best set of that size: the fewest and cheapest evictions,
then NVLink-linked devices (`links`), then the most memory left.

On a GPU, vLLM sizes its memory from what is free while it initialises: no other start, wake or eviction may
happen on a device while a model loads there (`loading`).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["running", "sleeping", "busy"]


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    total: int  # bytes
    free: int  # bytes free now, less what instances still loading have reserved but not yet taken


@dataclass(frozen=True)
class Resident:
    """An instance holding memory. `busy` = starting, waking, sleeping or stopping right now: not
    evictable."""

    name: str
    phase: Phase
    devices: tuple[int, ...]
    held: int  # bytes held on each of its devices now
    asleep_held: int  # bytes it would still hold on each device once asleep (CUDA context)
    last_used: float
    in_flight: int = 0
    pinned: bool = False
    evict_level: int = 2  # 1 or 2 = sleep at that level, 3 = stop
    host_l1: int = 0  # host memory its weights would take asleep at level 1
    can_sleep_l2: bool = True  # False: a level-2 sleep could not be woken from (LoRA on vLLM 0.26): stop instead

    @property
    def evictable(self) -> bool:
        return self.phase != "busy" and self.in_flight == 0 and not self.pinned


@dataclass(frozen=True)
class Demand:
    """A model that needs memory free on each of its devices (`tp` of them: every GPU of one instance).

    How much on each device (`needs`): `fraction` × that device's total when set (gpu_memory_utilization);
    else `need` bytes. A start with a need in bytes gives vLLM one fraction for all its devices, need / the
    smallest total of the set, so on unequal devices a larger one needs that fraction of its own total free.
    A wake (`waking`) takes back `need` bytes on each device, what the instance held."""

    name: str
    need: int = 0
    tp: int = 1
    devices: tuple[int, ...] | None = None  # fixed by config, or by where a sleeping instance lives
    held: int = 0  # what the model itself already holds on each of its devices (a sleeper's context)
    fraction: float | None = None
    waking: bool = False

    def needs(self, totals: Mapping[int, int], devices: Sequence[int]) -> dict[int, int]:
        """Bytes that must be free on each of `devices` (with `totals`, bytes per device index)."""
        if self.fraction is not None:
            return {i: int(self.fraction * totals[i]) for i in devices}
        smallest = min((totals[i] for i in devices), default=0)
        if self.waking or smallest <= 0:
            return dict.fromkeys(devices, self.need)
        return {i: self.need * totals[i] // smallest for i in devices}


@dataclass(frozen=True)
class Eviction:
    name: str
    level: int  # 1 or 2: sleep at that level; 3: stop
    frees: int  # estimated bytes freed on each of the victim's devices


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    evictions: tuple[Eviction, ...] = ()


@dataclass(frozen=True)
class Blocked:
    """No placement now. `wait`: instances with requests in flight (or mid-transition) hold the memory, so the
    demand may fit once they drain; otherwise it can never fit as configured."""

    reason: str
    wait: bool
    holders: tuple[str, ...] = field(default=())
    devices: tuple[int, ...] = ()  # the placement it is about (when waiting: where to wait for room)


Plan = Placement | Blocked

# cost of an eviction, by level: a stop costs a cold start later, a level-2 wake a reload from disk
_EVICTION_COST = {1: 1, 2: 2, 3: 10}


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def plan_placement(
    devices: Sequence[DeviceMemory],
    residents: Sequence[Resident],
    demand: Demand,
    *,
    can_sleep: bool = True,
    host_free: int | None = None,
    loading: Mapping[int, str] | None = None,
    links: Collection[frozenset[int]] = frozenset(),
) -> Plan:
    """Where `demand` goes and what to evict first. `can_sleep=False` (no sleep mode, e.g. CPU) turns every
    eviction into a stop. `host_free`: room left in the host budget for level-1 sleepers' weights (None: no
    limit). `loading`: device → the model loading there now (its devices are not used until it is done).
    `links`: pairs of devices linked by NVLink, preferred for a model on several."""
    by_index = {d.index: d for d in devices}
    if demand.devices is not None:
        unknown = [i for i in demand.devices if i not in by_index]
        if unknown:
            return Blocked(
                f"device(s) {unknown} do not exist (have {sorted(by_index)}: vllama numbers its GPUs from 0 in "
                "the order of VLLAMA_DEVICES or CUDA_VISIBLE_DEVICES)",
                wait=False,
            )
        candidates = [tuple(demand.devices)]
    else:
        if demand.tp > len(by_index):
            return Blocked(
                f"{demand.name} needs {demand.tp} devices (tensor_parallel_size × pipeline_parallel_size), "
                f"only {len(by_index)} exist",
                wait=False,
            )
        candidates = list(itertools.combinations(sorted(by_index), demand.tp))

    plans = [
        _busy_loading(devs, loading or {}, demand) or _plan_on(by_index, devs, residents, demand, can_sleep, host_free)
        for devs in candidates
    ]
    placements = [p for p in plans if isinstance(p, Placement)]
    if placements:
        last_used = {r.name: r.last_used for r in residents}
        return min(placements, key=lambda p: _placement_cost(p, by_index, demand, links, last_used))
    blocked = [p for p in plans if isinstance(p, Blocked)]
    waiting = [b for b in blocked if b.wait]
    return min(waiting, key=lambda b: len(b.holders)) if waiting else blocked[0]


def _placement_cost(
    p: Placement,
    by_index: dict[int, DeviceMemory],
    demand: Demand,
    links: Collection[frozenset[int]],
    last_used: dict[str, float],
) -> tuple[int, int, float, int, int, tuple[int, ...]]:
    cost = sum(_EVICTION_COST[e.level] for e in p.evictions)
    # tensor parallelism all-reduces every layer: pairs of the set without NVLink go over PCIe
    unlinked = sum(1 for pair in itertools.combinations(p.devices, 2) if frozenset(pair) not in links)
    # equal evictions on different devices: evict the least recently used models, whichever device they are on
    newest_victim = max((last_used.get(e.name, 0.0) for e in p.evictions), default=0.0)
    freed = sum(e.frees for e in p.evictions)
    # with no eviction, spread models out: prefer the devices with the most memory left afterwards
    need = demand.needs({i: d.total for i, d in by_index.items()}, p.devices)
    left = min(by_index[i].free - need[i] for i in p.devices)
    return cost, unlinked, newest_victim, freed, -left, p.devices


def _busy_loading(devs: tuple[int, ...], loading: Mapping[int, str], demand: Demand) -> Blocked | None:
    busy = {i: loading[i] for i in devs if i in loading and loading[i] != demand.name}
    if not busy:
        return None
    where = ", ".join(f"{name} is loading on device {i}" for i, name in busy.items())
    return Blocked(f"{demand.name} waits: {where}", wait=True, holders=tuple(sorted(set(busy.values()))), devices=devs)


def _plan_on(
    by_index: dict[int, DeviceMemory],
    devs: tuple[int, ...],
    residents: Sequence[Resident],
    demand: Demand,
    can_sleep: bool,
    host_free: int | None,
) -> Plan:
    need = demand.needs({i: d.total for i, d in by_index.items()}, devs)
    for i in devs:
        if need[i] > by_index[i].total:
            return Blocked(
                f"{demand.name} needs {_gib(need[i])} on device {i}, which has only {_gib(by_index[i].total)} in total",
                wait=False,
                devices=devs,
            )
    deficit = {i: need[i] - demand.held - by_index[i].free for i in devs}
    if all(v <= 0 for v in deficit.values()):
        return Placement(devs)

    others = sorted(
        (r for r in residents if r.name != demand.name and set(r.devices) & set(devs)),
        key=lambda r: (r.last_used, r.name),
    )
    victims = [r for r in others if r.evictable]
    chosen: dict[str, Eviction] = {}

    def short() -> bool:
        return any(v > 0 for v in deficit.values())

    def helps(r: Resident) -> bool:
        return any(deficit.get(i, 0) > 0 for i in r.devices)

    def credit(r: Resident, amount: int) -> None:
        for i in r.devices:
            if i in deficit:
                deficit[i] -= amount

    # 1) put running idle instances to sleep, least recently used first
    for r in victims:
        if not short():
            break
        if r.phase == "running" and helps(r):
            level = r.evict_level if can_sleep else 3
            if level == 1 and host_free is not None:
                if r.host_l1 > host_free:
                    level = 2  # the host has no room for its weights: drop them
                else:
                    host_free -= r.host_l1
            if level == 2 and not r.can_sleep_l2:
                level = 3
            frees = r.held if level == 3 else max(r.held - r.asleep_held, 0)
            chosen[r.name] = Eviction(r.name, level, frees)
            credit(r, frees)
    # 2) sleeping still holds a CUDA context: stop sleepers (and the ones just put to sleep), LRU first
    for r in victims:
        if not short():
            break
        prior = chosen.get(r.name)
        if not helps(r) or (prior is not None and prior.level == 3):
            continue
        if prior is None and r.phase != "sleeping":
            continue  # a running victim not chosen above does not help
        remaining = r.asleep_held if prior is not None else r.held
        chosen[r.name] = Eviction(r.name, 3, (prior.frees if prior is not None else 0) + remaining)
        credit(r, remaining)

    if not short():
        order = [r.name for r in victims if r.name in chosen]
        return Placement(devs, tuple(chosen[n] for n in order))

    short_on = {i: v for i, v in deficit.items() if v > 0}
    busy = [r for r in others if not r.evictable and not r.pinned and any(i in short_on for i in r.devices)]
    could_free = {i: sum(r.held for r in busy if i in r.devices) for i in short_on}
    where = ", ".join(f"device {i} short by {_gib(v)}" for i, v in short_on.items())
    wanted = ", ".join(f"{_gib(n)} on device {i}" for i, n in need.items())
    if busy and all(could_free[i] >= short_on[i] for i in short_on):
        names = tuple(r.name for r in busy)
        return Blocked(
            f"{demand.name} needs {wanted}; {where} after evicting every idle model; "
            f"busy models hold the rest: {', '.join(names)}",
            wait=True,
            holders=names,
            devices=devs,
        )
    holders = tuple(r.name for r in others if any(i in short_on for i in r.devices))
    pinned = [r.name for r in others if r.pinned]
    return Blocked(
        f"{demand.name} needs {wanted} and does not fit: {where} even after evicting "
        f"every idle model" + (f" (pinned: {', '.join(pinned)})" if pinned else ""),
        wait=False,
        holders=holders,
        devices=devs,
    )


KeepAliveStep = Literal["sleep_l1", "sleep_l2", "stop"]


def keep_alive_step(
    *,
    idle_for: float,
    phase: Literal["running", "sleeping"],
    sleep_level: int,
    sleep_l1: float | None,
    sleep_l2: float | None,
    stop: float | None,
    can_sleep: bool,
) -> KeepAliveStep | None:
    """The deepest step an idle instance is due for (its idle time against the ladder), if deeper than now.

    `sleep_level` is the current level of a sleeping instance (ignored while running)."""
    current = 0 if phase == "running" else sleep_level
    due: KeepAliveStep | None = None
    if can_sleep and sleep_l1 is not None and idle_for >= sleep_l1 and current < 1:
        due = "sleep_l1"
    if can_sleep and sleep_l2 is not None and idle_for >= sleep_l2 and current < 2:
        due = "sleep_l2"
    if stop is not None and idle_for >= stop:
        due = "stop"
    return due


def host_relief(residents: Sequence[Resident], host_free: int) -> tuple[str, ...]:
    """Level-1 sleepers to take down to level 2, least recently used first, until the host budget is no longer
    overdrawn (`host_free` < 0: the sleepers' weights take more host memory than the budget allows)."""
    chosen: list[str] = []
    for r in sorted(residents, key=lambda r: (r.last_used, r.name)):
        if host_free >= 0:
            break
        if r.phase == "sleeping" and r.host_l1 > 0 and not r.pinned:
            chosen.append(r.name)
            host_free += r.host_l1
    return tuple(chosen)
