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
        blocked("tensor_parallel_size 2", wait=False),
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
