"""Table tests for the placement/eviction policy (vllama.scheduler): pure functions, no GPU needed.

Each case names the devices, the residents, the demand and the exact plan expected. Memory is in GiB through
`gib()`; a sleeping vLLM keeps its CUDA context (`asleep_held`), so sleeping frees `held - asleep_held`.
"""

from __future__ import annotations

import pytest

from vllama.scheduler import (
    Blocked,
    Demand,
    DeviceMemory,
    Eviction,
    Placement,
    Resident,
    host_relief,
    keep_alive_step,
    plan_placement,
)


def gib(n: float) -> int:
    return int(n * 1024**3)


def dev(index: int, total: float, free: float) -> DeviceMemory:
    return DeviceMemory(index, total=gib(total), free=gib(free))


def running(
    name: str,
    last_used: float,
    held: float = 4,
    asleep: float = 0.5,
    devices: tuple[int, ...] = (0,),
    **kw: object,
) -> Resident:
    return Resident(name, "running", devices, gib(held), gib(asleep), last_used, **kw)  # type: ignore[arg-type]


def sleeping(name: str, last_used: float, held: float = 0.5, devices: tuple[int, ...] = (0,), **kw: object) -> Resident:
    return Resident(name, "sleeping", devices, gib(held), gib(held), last_used, **kw)  # type: ignore[arg-type]


def busy(name: str, last_used: float, held: float = 4, devices: tuple[int, ...] = (0,)) -> Resident:
    """Starting, waking, sleeping or stopping right now."""
    return Resident(name, "busy", devices, gib(held), gib(0.5), last_used)


def want(name: str, need: float, tp: int = 1, devices: tuple[int, ...] | None = None, held: float = 0) -> Demand:
    return Demand(name, gib(need), tp=tp, devices=devices, held=gib(held))


def sleep(name: str, frees: float, level: int = 2) -> Eviction:
    return Eviction(name, level, gib(frees))


def stop(name: str, frees: float) -> Eviction:
    return Eviction(name, 3, gib(frees))


def place(*devices: int, evict: tuple[Eviction, ...] = ()) -> Placement:
    return Placement(tuple(devices), evict)


def blocked(reason_part: str, *, wait: bool, holders: tuple[str, ...] = ()) -> Blocked:
    """Expected Blocked: `reason_part` must appear in the reason; wait and holders must match exactly."""
    return Blocked(reason_part, wait=wait, holders=holders)


ONE_8G_FULL = [dev(0, 8, free=0)]
TWO_8G_FULL = [dev(0, 8, free=0), dev(1, 8, free=0)]

PLACEMENT_CASES = [
    # --- the spec's scenario -------------------------------------------------------------------------------
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, held=4, asleep=0), running("B", 2, held=4, asleep=0)],
        want("C", 4),
        True,
        place(0, evict=(sleep("A", 4),)),
        id="spec: 8G device, A and B of 4G, demand C -> sleep LRU A at level 2, only A",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, held=4, asleep=0.5), running("B", 2, held=4, asleep=0.5)],
        want("C", 4),
        True,
        place(0, evict=(sleep("A", 3.5), sleep("B", 3.5))),
        id="spec with a 0.5G context kept asleep: sleeping A alone is 0.5G short -> sleep B too",
    ),
    pytest.param(
        ONE_8G_FULL,
        [
            sleeping("A", 1, held=0.5),
            running("B", 2, held=3.75, asleep=0.25),
            running("C", 3, held=3.75, asleep=0.25),
        ],
        want("A", 4, devices=(0,), held=0.5),
        True,
        place(0, evict=(sleep("B", 3.5),)),
        id="spec follow-up: wake A (holds 0.5G) while B and C run -> sleep the LRU of B/C",
    ),
    # --- who may be a victim ---------------------------------------------------------------------------
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, pinned=True), running("B", 2)],
        want("C", 3.5),
        True,
        place(0, evict=(sleep("B", 3.5),)),
        id="pinned LRU victim is skipped",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, in_flight=1), running("B", 2)],
        want("C", 3.5),
        True,
        place(0, evict=(sleep("B", 3.5),)),
        id="victim with requests in flight is skipped -> next LRU",
    ),
    pytest.param(
        ONE_8G_FULL,
        [busy("S", 1), running("A", 2)],
        want("C", 3.5),
        True,
        place(0, evict=(sleep("A", 3.5),)),
        id="busy-phase (starting) resident is never evicted",
    ),
    pytest.param(
        ONE_8G_FULL,
        [sleeping("C", 0, held=0.5), running("A", 1, held=3.5), running("B", 2, held=4)],
        want("C", 7.5, devices=(0,), held=0.5),
        True,
        # short 7G: sleep A (3) + sleep B (3.5) leaves 0.5G; pass 2 must not stop C itself (the oldest),
        # it stops A, the LRU of the others
        place(0, evict=(stop("A", 3.5), sleep("B", 3.5))),
        id="the requester's own sleeping entry is never a victim",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("beta", 5), running("alpha", 5)],
        want("C", 3.5),
        True,
        place(0, evict=(sleep("alpha", 3.5),)),
        id="tie in last_used -> broken by name",
    ),
    # --- eviction levels -------------------------------------------------------------------------------
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1), running("B", 2)],
        want("C", 4),
        False,
        place(0, evict=(stop("A", 4),)),
        id="can_sleep=False (CPU) -> evictions are stops that free everything",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, evict_level=1), running("B", 2)],
        want("C", 3.5),
        True,
        place(0, evict=(sleep("A", 3.5, level=1),)),
        id="evict_level 1 honoured",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, evict_level=3), running("B", 2)],
        want("C", 3.5),
        True,
        place(0, evict=(stop("A", 4),)),
        id="evict_level 3 stops even where sleep is possible",
    ),
    # --- sleepers still hold their CUDA context -----------------------------------------------------------
    pytest.param(
        ONE_8G_FULL,
        [sleeping("S", 1, held=1), running("A", 2, held=3.5), running("B", 3, held=3.5)],
        want("D", 7),
        True,
        # sleeping A and B frees 6G of the 7G: the old sleeper S is stopped for the last 1G
        place(0, evict=(stop("S", 1), sleep("A", 3), sleep("B", 3))),
        id="sleeping everything is not enough -> stop the sleeper",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1), running("B", 2)],
        want("C", 7.5),
        True,
        # sleeping both frees 7G; pass 2 stops the LRU just-slept A for its last 0.5G
        place(0, evict=(stop("A", 4), sleep("B", 3.5))),
        id="instances just put to sleep are stopped LRU-first when still short",
    ),
    pytest.param(
        [dev(0, 8, free=0), dev(1, 8, free=8)],
        [
            sleeping("A", 1, held=0.5),
            running("B", 2, held=3.5),
            running("C", 3, held=4),
        ],
        want("A", 4, devices=(0,), held=0.5),
        True,
        # wake needs 3.5G more on device 0 (its own); the empty device 1 is no use to a sleeper
        place(0, evict=(sleep("B", 3), sleep("C", 3.5))),
        id="waking a sleeper that no longer fits evicts others on its device",
    ),
    # --- fits already ----------------------------------------------------------------------------------
    pytest.param(
        [dev(0, 8, free=4)],
        [running("A", 1)],
        want("C", 4),
        True,
        place(0),
        id="fits without eviction -> no evictions",
    ),
    pytest.param(
        [dev(0, 8, free=3.5)],
        [sleeping("C", 1, held=0.5), running("A", 2)],
        want("C", 4, devices=(0,), held=0.5),
        True,
        place(0),
        id="sleeper's own context counts toward its need",
    ),
    # --- choosing devices ------------------------------------------------------------------------------
    pytest.param(
        [dev(0, 8, free=0), dev(1, 8, free=6)],
        [running("A", 1, devices=(0,)), running("B", 2, devices=(0,)), running("X", 3, held=2, devices=(1,))],
        want("C", 4),
        True,
        place(1),
        id="two devices, any -> the one needing no eviction",
    ),
    pytest.param(
        [dev(0, 8, free=5), dev(1, 8, free=7), dev(2, 8, free=7)],
        [],
        want("C", 4),
        True,
        place(1),
        id="no eviction needed -> most memory left, ties to the lowest index",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("A", 1, held=3, evict_level=3, devices=(0,)),
            running("P", 2, held=5, pinned=True, devices=(0,)),
            running("C", 3, devices=(1,)),
            running("Q", 4, pinned=True, devices=(1,)),
        ],
        want("D", 3),
        True,
        # stopping A frees less (3G) than sleeping C (3.5G), but a stop costs a cold start later
        place(1, evict=(sleep("C", 3.5),)),
        id="both full -> the device where a sleep suffices beats one needing a stop",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("A", 1, held=2, devices=(0,)),
            running("B", 2, held=2, devices=(0,)),
            running("P", 3, pinned=True, devices=(0,)),
            running("C", 4, devices=(1,)),
            running("Q", 5, pinned=True, devices=(1,)),
        ],
        want("D", 3),
        True,
        place(1, evict=(sleep("C", 3.5),)),
        id="both full -> one eviction beats two, even of less recently used models",
    ),
    pytest.param(
        TWO_8G_FULL,
        [running("A", 1, devices=(1,)), running("B", 2, devices=(0,))],
        want("C", 3.5, devices=(0,)),
        True,
        place(0, evict=(sleep("B", 3.5),)),
        id="fixed devices -> the older victim on another device is not touched",
    ),
    # --- tensor parallel -------------------------------------------------------------------------------
    pytest.param(
        TWO_8G_FULL,
        [
            running("A", 1, devices=(0,)),
            running("B", 2, devices=(1,)),
            running("T", 3, devices=(0, 1)),
        ],
        want("D", 3.5, tp=2),
        True,
        place(0, 1, evict=(sleep("A", 3.5), sleep("B", 3.5))),
        id="tp 2 needs the full need free on both devices -> evict on each",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("T", 1, devices=(0, 1)),
            running("A", 2, devices=(0,)),
            running("B", 3, devices=(1,)),
        ],
        want("D", 3.5, tp=2),
        True,
        place(0, 1, evict=(sleep("T", 3.5),)),
        id="tp 2: one tp-2 victim frees both devices at once",
    ),
    pytest.param(
        [dev(0, 8, free=0), dev(1, 8, free=4)],
        [
            running("Y", 1, devices=(1,)),
            running("A", 2, devices=(0,)),
            running("P", 3, pinned=True, devices=(0,)),
        ],
        want("D", 3.5, tp=2),
        True,
        # device 1 already has 4G free: its older idle model Y is left alone
        place(0, 1, evict=(sleep("A", 3.5),)),
        id="tp 2: only devices still short get evictions",
    ),
    pytest.param(
        [dev(0, 8, free=0), dev(1, 8, free=0.5)],
        [
            sleeping("S", 1, held=0.5, devices=(1,)),
            running("X", 2, held=7, asleep=0.5, devices=(1,)),
            running("A", 3, held=7.5, asleep=1, devices=(0,)),
            sleeping("T", 4, held=0.5, devices=(0,)),
        ],
        want("D", 7, tp=2),
        True,
        # sleeping X covers device 1; sleeping A leaves device 0 0.5G short, so pass 2 stops A (the LRU
        # on device 0) and leaves the older sleeper S alone: device 1 is no longer short
        place(0, 1, evict=(sleep("X", 6.5), stop("A", 7.5))),
        id="tp 2: pass 2 stops sleepers only on devices still short",
    ),
    pytest.param(
        [dev(0, 8, free=8), dev(1, 8, free=2), dev(2, 8, free=8)],
        [running("X", 1, held=6, devices=(1,))],
        want("D", 4, tp=2),
        True,
        place(0, 2),
        id="tp 2 of three devices -> the pair that needs no eviction",
    ),
    pytest.param(
        [dev(0, 8, free=8)],
        [],
        want("D", 1, tp=2),
        True,
        blocked("needs 2 devices", wait=False),
        id="tp 2 with only one device -> never",
    ),
    # --- blocked ---------------------------------------------------------------------------------------
    pytest.param(
        [dev(0, 8, free=8)],
        [],
        want("C", 9),
        True,
        blocked("in total", wait=False),
        id="need larger than the device -> never",
    ),
    pytest.param(
        [dev(0, 8, free=8)],
        [],
        want("C", 1, devices=(3,)),
        True,
        blocked("do not exist", wait=False),
        id="unknown device index -> never",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, in_flight=3), busy("B", 2)],
        want("C", 4),
        True,
        blocked("busy models hold the rest", wait=True, holders=("A", "B")),
        id="only busy models in the way -> wait, naming them",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1), running("B", 2, in_flight=1)],
        want("C", 8),
        True,
        # stopping idle A still leaves 4G short, which in-flight B holds
        blocked("busy models hold the rest", wait=True, holders=("B",)),
        id="idle evictions not enough, a busy model holds the rest -> wait for it",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("A", 1, pinned=True), running("B", 2, pinned=True)],
        want("C", 4),
        True,
        blocked("pinned: A, B", wait=False, holders=("A", "B")),
        id="pinned models hold the device -> never",
    ),
    pytest.param(
        ONE_8G_FULL,
        [running("P", 1, held=6, pinned=True), running("B", 2, held=2, in_flight=1)],
        want("C", 4),
        True,
        blocked("does not fit", wait=False, holders=("P", "B")),
        id="busy models could free too little (rest pinned) -> never",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("P", 1, held=8, pinned=True, devices=(0,)),
            running("B", 2, held=8, in_flight=1, devices=(1,)),
        ],
        want("C", 4),
        True,
        blocked("busy models hold the rest", wait=True, holders=("B",)),
        id="any device: pinned on one, busy on the other -> wait for the busy one",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("P", 1, held=8, pinned=True, devices=(0,)),
            running("A", 2, held=4, devices=(1,)),
            running("Q", 3, held=4, pinned=True, devices=(1,)),
        ],
        want("C", 4, devices=(0,)),
        True,
        blocked("(pinned: P)", wait=False, holders=("P",)),
        id="fixed device full of pinned -> never, idle model elsewhere untouched",
    ),
    pytest.param(
        TWO_8G_FULL,
        [
            running("B", 1, held=8, in_flight=2, devices=(0,)),
            running("P", 2, held=8, pinned=True, devices=(1,)),
        ],
        want("D", 4, tp=2),
        True,
        # B draining would free device 0, but pinned P keeps device 1 short forever
        blocked("does not fit", wait=False, holders=("B", "P")),
        id="tp 2: busy model on one device, pinned on the other -> never",
    ),
]


@pytest.mark.parametrize(("devices", "residents", "demand", "can_sleep", "expected"), PLACEMENT_CASES)
def test_plan_placement(
    devices: list[DeviceMemory],
    residents: list[Resident],
    demand: Demand,
    can_sleep: bool,
    expected: Placement | Blocked,
) -> None:
    got = plan_placement(devices, residents, demand, can_sleep=can_sleep)
    if isinstance(expected, Placement):
        assert got == expected
    else:
        assert isinstance(got, Blocked), got
        assert (got.wait, got.holders) == (expected.wait, expected.holders), got
        assert expected.reason in got.reason, got.reason


def test_at_least_twenty_placement_cases() -> None:
    assert len(PLACEMENT_CASES) >= 20


# --- several GPUs (issue 13): mixed sizes, device sets of parallel models, per-device fairness ---------------


def frac(name: str, fraction: float, tp: int = 1, devices: tuple[int, ...] | None = None) -> Demand:
    """A model with gpu_memory_utilization `fraction`: its need is that fraction of each device's own total."""
    return Demand(name, tp=tp, devices=devices, fraction=fraction)


def full(n: int, total: float = 8) -> list[DeviceMemory]:
    return [dev(i, total, free=0) for i in range(n)]


def free(n: int, total: float = 8) -> list[DeviceMemory]:
    return [dev(i, total, free=total) for i in range(n)]


NO_LINKS: frozenset[frozenset[int]] = frozenset()


def linked(*pairs: tuple[int, int]) -> frozenset[frozenset[int]]:
    return frozenset(frozenset(p) for p in pairs)


MULTI_GPU_CASES = [
    # --- mixed sizes: a fraction is per device ---------------------------------------------------------------
    pytest.param(
        [dev(0, 80, free=2), dev(1, 48, free=48)],
        [busy("X", 1, held=78, devices=(0,))],
        frac("M", 0.9),
        NO_LINKS,
        place(1),
        id="80G busy + 48G free: default fraction 0.9 is 43.2G on the 48G device -> placed there, not refused",
    ),
    pytest.param(
        [dev(0, 80, free=80), dev(1, 48, free=48)],
        [],
        frac("M", 0.9),
        NO_LINKS,
        place(0),
        id="80G + 48G both free: 0.9 leaves 8G on the 80G and 4.8G on the 48G -> the 80G",
    ),
    pytest.param(
        [dev(0, 80, free=0), dev(1, 48, free=0)],
        [running("A", 1, held=80, asleep=1, devices=(0,)), running("B", 2, held=48, asleep=1, devices=(1,))],
        frac("M", 0.5),
        NO_LINKS,
        place(0, evict=(sleep("A", 79),)),
        id="80G + 48G both full, one sleep either way -> the least recently used model's device (the 80G)",
    ),
    pytest.param(
        [dev(0, 80, free=10), dev(1, 48, free=48)],
        [running("A", 1, held=70, asleep=1, devices=(0,))],
        want("M", 60),
        NO_LINKS,
        place(0, evict=(sleep("A", 69),)),
        id="60G in bytes never fits the 48G -> the 80G, after a sleep there",
    ),
    pytest.param(
        [dev(0, 80, free=30), dev(1, 48, free=48)],
        [running("A", 1, held=50, asleep=1, devices=(0,))],
        want("T", 24, tp=2),
        NO_LINKS,
        place(0, 1, evict=(sleep("A", 49),)),
        id="tp 2 of 24G in bytes on 80G + 48G: vLLM's one fraction (24/48) is 40G on the 80G -> make room there",
    ),
    pytest.param(
        [dev(0, 80, free=0), dev(1, 48, free=48)],
        [busy("X", 1, held=80, devices=(0,))],
        frac("M", 0.9, devices=(1,)),
        NO_LINKS,
        place(1),
        id="fixed on the 48G: 0.9 of 48G fits although 0.9 of 80G would not",
    ),
    # --- device sets of parallel models ----------------------------------------------------------------------
    pytest.param(
        free(4),
        [],
        want("T", 4, tp=2),
        linked((1, 2)),
        place(1, 2),
        id="tp 2 of 4 free GPUs -> the NVLink pair",
    ),
    pytest.param(
        free(4),
        [],
        want("T", 4, tp=2),
        linked((0, 1), (2, 3)),
        place(0, 1),
        id="tp 2, two NVLink pairs, all free -> the first pair",
    ),
    pytest.param(
        [dev(0, 8, free=0), *free(3)[1:]],
        [running("A", 1, held=8, devices=(0,))],
        want("T", 4, tp=2),
        linked((0, 1)),
        place(1, 2),
        id="tp 2: the NVLink pair needs an eviction -> least eviction first, over PCIe",
    ),
    pytest.param(
        full(3),
        [
            running("A", 1, held=8, devices=(0,)),
            running("B", 2, held=8, devices=(1,)),
            running("C", 3, held=8, devices=(2,)),
        ],
        want("T", 4, tp=2),
        linked((1, 2)),
        place(1, 2, evict=(sleep("B", 7.5), sleep("C", 7.5))),
        id="tp 2: every pair needs two sleeps -> the NVLink pair, even over the least recently used",
    ),
    pytest.param(
        full(3),
        [
            running("A", 1, held=8, devices=(0,)),
            running("B", 2, held=8, devices=(1,)),
            running("C", 3, held=8, devices=(2,)),
        ],
        want("T", 4, tp=2),
        NO_LINKS,
        place(0, 1, evict=(sleep("A", 7.5), sleep("B", 7.5))),
        id="tp 2: every pair needs two sleeps, no NVLink -> the two least recently used",
    ),
    pytest.param(
        [dev(0, 8, free=0), dev(1, 8, free=0), dev(2, 8, free=8), dev(3, 8, free=8)],
        [running("T2", 1, held=8, devices=(0, 1))],
        want("T", 4, tp=4),
        NO_LINKS,
        place(0, 1, 2, 3, evict=(sleep("T2", 7.5),)),
        id="tp 4 on 4 GPUs: one tp-2 sleep frees both of its devices",
    ),
    pytest.param(
        free(2),
        [],
        want("T", 4, tp=3),
        NO_LINKS,
        blocked("needs 3 devices", wait=False),
        id="tp × pp of 3 on 2 GPUs -> never",
    ),
    # --- per-device fairness ---------------------------------------------------------------------------------
    pytest.param(
        full(2),
        [
            running("A", 1, devices=(0,)),
            running("B", 2, devices=(0,)),
            running("C", 3, devices=(1,)),
            running("D", 4, devices=(1,)),
        ],
        want("T", 3, tp=2),
        NO_LINKS,
        place(0, 1, evict=(sleep("A", 3.5), sleep("C", 3.5))),
        id="tp 2 short on both: the LRU of each device, not the two oldest overall",
    ),
    pytest.param(
        full(2),
        [running("P", 5, held=8, pinned=True, devices=(0,)), running("X", 0, held=8, devices=(1,))],
        want("M", 4, devices=(0,)),
        NO_LINKS,
        blocked("does not fit", wait=False, holders=("P",)),
        id="GPU 0 pinned full: the oldest model, on GPU 1, is never evicted for GPU 0",
    ),
    pytest.param(
        full(2),
        [
            running("T", 1, devices=(0, 1)),
            running("A", 2, devices=(0,)),
            running("B", 3, devices=(1,)),
        ],
        want("M", 3, devices=(1,)),
        NO_LINKS,
        place(1, evict=(sleep("T", 3.5),)),
        id="a tp-2 model counts on both devices: it is GPU 1's LRU, GPU 0's model is untouched",
    ),
    pytest.param(
        full(2),
        [running("B", 2, devices=(0,)), running("A", 1, devices=(1,))],
        want("M", 3),
        NO_LINKS,
        place(1, evict=(sleep("A", 3.5),)),
        id="one sleep on either device -> the least recently used model, on whichever device",
    ),
    pytest.param(
        full(2),
        [busy("S", 1, held=8, devices=(0,)), running("A", 9, devices=(1,)), running("B", 9, devices=(1,))],
        want("M", 3, devices=(0,)),
        NO_LINKS,
        blocked("busy models hold the rest", wait=True, holders=("S",)),
        id="GPU 0 held by a busy model -> wait for it, never evict GPU 1's idle models",
    ),
]


@pytest.mark.parametrize(("devices", "residents", "demand", "links", "expected"), MULTI_GPU_CASES)
def test_plan_placement_multi_gpu(
    devices: list[DeviceMemory],
    residents: list[Resident],
    demand: Demand,
    links: frozenset[frozenset[int]],
    expected: Placement | Blocked,
) -> None:
    got = plan_placement(devices, residents, demand, links=links)
    if isinstance(expected, Placement):
        assert got == expected
    else:
        assert isinstance(got, Blocked), got
        assert (got.wait, got.holders) == (expected.wait, expected.holders), got
        assert expected.reason in got.reason, got.reason


@pytest.mark.parametrize(
    ("demand", "totals", "devices", "expected"),
    [
        pytest.param(frac("M", 0.9), {0: 80, 1: 48}, (1,), {1: 43.2}, id="fraction of the device's own total"),
        pytest.param(frac("M", 0.5, tp=2), {0: 80, 1: 48}, (0, 1), {0: 40, 1: 24}, id="fraction, tp 2 mixed"),
        pytest.param(want("M", 24, tp=2), {0: 80, 1: 48}, (0, 1), {0: 40, 1: 24}, id="bytes: one fraction"),
        pytest.param(want("M", 24, tp=2), {0: 48, 1: 48}, (0, 1), {0: 24, 1: 24}, id="bytes, equal devices"),
        pytest.param(
            Demand("M", gib(24), tp=2, waking=True), {0: 80, 1: 48}, (0, 1), {0: 24, 1: 24}, id="a wake: bytes"
        ),
    ],
)
def test_demand_needs_per_device(
    demand: Demand, totals: dict[int, float], devices: tuple[int, ...], expected: dict[int, float]
) -> None:
    got = demand.needs({i: gib(t) for i, t in totals.items()}, devices)
    assert got == pytest.approx({i: gib(n) for i, n in expected.items()}, abs=1)


# keep_alive ladder unless a case says otherwise: sleep L1 after 60 s, L2 after 300 s, stop after 900 s
LADDER = {"sleep_l1": 60.0, "sleep_l2": 300.0, "stop": 900.0}
NO_TIMEOUTS = {"sleep_l1": None, "sleep_l2": None, "stop": None}

KEEP_ALIVE_CASES = [
    pytest.param(30, "running", 0, LADDER, True, None, id="running, idle below every timeout"),
    pytest.param(60, "running", 0, LADDER, True, "sleep_l1", id="running, idle past sleep_l1"),
    pytest.param(300, "running", 0, LADDER, True, "sleep_l2", id="running, idle past sleep_l2 -> skip L1"),
    pytest.param(900, "running", 0, LADDER, True, "stop", id="running, idle past stop"),
    pytest.param(400, "running", 0, LADDER, False, None, id="can_sleep False skips the sleep steps"),
    pytest.param(900, "running", 0, LADDER, False, "stop", id="can_sleep False still stops"),
    pytest.param(100, "sleeping", 1, LADDER, True, None, id="asleep at L1, not yet past sleep_l2"),
    pytest.param(300, "sleeping", 1, LADDER, True, "sleep_l2", id="asleep at L1, past sleep_l2 -> deepen"),
    pytest.param(400, "sleeping", 2, LADDER, True, None, id="asleep at L2, past sleep_l2, not stop"),
    pytest.param(900, "sleeping", 2, LADDER, True, "stop", id="asleep at L2, past stop"),
    pytest.param(10**9, "running", 0, NO_TIMEOUTS, True, None, id="None timeouts never fire (running)"),
    pytest.param(10**9, "sleeping", 2, NO_TIMEOUTS, True, None, id="None timeouts never fire (sleeping)"),
    pytest.param(
        200,
        "running",
        0,
        {"sleep_l1": None, "sleep_l2": 120.0, "stop": None},
        True,
        "sleep_l2",
        id="only sleep_l2 set",
    ),
    pytest.param(
        10**9,
        "sleeping",
        2,
        {"sleep_l1": 60.0, "sleep_l2": 300.0, "stop": None},
        True,
        None,
        id="no stop timeout -> stays asleep at L2",
    ),
    pytest.param(
        0,
        "running",
        0,
        {"sleep_l1": None, "sleep_l2": None, "stop": 0.0},
        True,
        "stop",
        id="stop after 0 s -> stop at once",
    ),
]


@pytest.mark.parametrize(("idle_for", "phase", "sleep_level", "timeouts", "can_sleep", "expected"), KEEP_ALIVE_CASES)
def test_keep_alive_step(
    idle_for: float,
    phase: str,
    sleep_level: int,
    timeouts: dict[str, float | None],
    can_sleep: bool,
    expected: str | None,
) -> None:
    got = keep_alive_step(
        idle_for=idle_for,
        phase=phase,  # type: ignore[arg-type]
        sleep_level=sleep_level,
        can_sleep=can_sleep,
        **timeouts,
    )
    assert got == expected


# --- the host budget for level-1 sleepers, devices where a model loads, models without a level-2 sleep -------

HOST_CASES = [
    pytest.param(
        [running("A", 1, held=8, evict_level=1, host_l1=gib(3))],
        gib(10),
        {},
        place(0, evict=(sleep("A", 7.5, level=1),)),
        id="room in the host budget for A's weights -> level 1",
    ),
    pytest.param(
        [running("A", 1, held=8, evict_level=1, host_l1=gib(3))],
        gib(2),
        {},
        place(0, evict=(sleep("A", 7.5, level=2),)),
        id="no room in the host budget -> level 2 (the weights are dropped)",
    ),
    pytest.param(
        [
            running("A", 1, held=4, evict_level=1, host_l1=gib(3)),
            running("B", 2, held=4, evict_level=1, host_l1=gib(3)),
        ],
        gib(4),
        {},
        place(0, evict=(sleep("A", 3.5, level=1), sleep("B", 3.5, level=2))),
        id="room for one sleeper's weights -> the least recently used at level 1, the next at level 2",
    ),
    pytest.param(
        [running("A", 1, held=8, evict_level=2, can_sleep_l2=False)],
        None,
        {},
        place(0, evict=(stop("A", 8),)),
        id="a model that cannot wake from level 2 (LoRA) -> stopped instead",
    ),
    pytest.param(
        [running("A", 1, held=8, evict_level=1, host_l1=gib(3), can_sleep_l2=False)],
        gib(1),
        {},
        place(0, evict=(stop("A", 8),)),
        id="LoRA, no room in the host budget for level 1 -> stopped, not level 2",
    ),
    pytest.param(
        [running("A", 1, held=8)],
        None,
        {0: "L"},
        blocked("L is loading on device 0", wait=True, holders=("L",)),
        id="another model loads on the device -> wait, evict nothing under it",
    ),
]


@pytest.mark.parametrize(("residents", "host_free", "loading", "expected"), HOST_CASES)
def test_plan_placement_host_budget_loading_and_lora(
    residents: list[Resident], host_free: int | None, loading: dict[int, str], expected: Placement | Blocked
) -> None:
    got = plan_placement([dev(0, 8, free=0)], residents, want("N", 6), host_free=host_free, loading=loading)
    if isinstance(expected, Placement):
        assert got == expected
    else:
        assert isinstance(got, Blocked), got
        assert (got.wait, got.holders) == (expected.wait, expected.holders), got
        assert expected.reason in got.reason, got.reason


def test_a_loading_device_is_avoided_when_another_has_room() -> None:
    devices = [dev(0, 8, free=8), dev(1, 8, free=8)]
    assert plan_placement(devices, [], want("N", 4), loading={0: "L"}) == place(1)


@pytest.mark.parametrize(
    ("residents", "host_free", "expected"),
    [
        pytest.param([sleeping("A", 1, host_l1=gib(3))], 0, (), id="not overdrawn -> nothing"),
        pytest.param(
            [sleeping("B", 2, host_l1=gib(3)), sleeping("A", 1, host_l1=gib(3)), running("R", 0, host_l1=gib(9))],
            -gib(1),
            ("A",),
            id="overdrawn by 1 GiB -> the least recently used level-1 sleeper only",
        ),
        pytest.param(
            [sleeping("A", 1, host_l1=gib(3)), sleeping("B", 2, host_l1=gib(3))],
            -gib(4),
            ("A", "B"),
            id="overdrawn by more than one sleeper holds -> both, oldest first",
        ),
        pytest.param(
            [sleeping("P", 1, host_l1=gib(3), pinned=True)],
            -gib(1),
            (),
            id="pinned sleepers stay",
        ),
    ],
)
def test_host_relief(residents: list[Resident], host_free: int, expected: tuple[str, ...]) -> None:
    assert host_relief(residents, host_free) == expected
