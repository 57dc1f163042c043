"""Deterministic tests of the lifecycle core: the manager in-process, its owners, placement and keep-alive, over
a stub driver (real `sleep` child processes; start-up, sleep and wake simulated and held at gates the test
opens) and a stub probe. Interleavings are chosen by events, never by wall-clock windows; `wait_for` bounds
only catch a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllama.config import GIB, Settings
from vllama.errors import Conflict, ModelUnavailable, NoCapacity
from vllama.instance import Instance, Outcome, State
from vllama.manager import Manager
from vllama.testing.stub_driver import StubDriver, StubProbe

HANG = 20.0  # seconds: only ever reached when something hangs


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Core:
    manager: Manager
    driver: StubDriver
    probe: StubProbe

    def inst(self, name: str) -> Instance:
        return self.manager.instances[name]

    async def request(self, name: str) -> Instance:
        """One request: acquire (start or wake if needed) and release at once."""
        inst = await asyncio.wait_for(self.manager.acquire(name), HANG)
        inst.release()
        return inst

    def actions(self) -> list[tuple[str, str, str]]:
        return [(e["model"], e["action"], e["reason"]) for e in self.manager.recent_evictions]


async def settle() -> None:
    """Let every ready task run until nothing changes (a few loop turns; no wall clock)."""
    for _ in range(50):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def make_core(
    tmp_path: Path,
    models: dict[str, Any],
    *,
    totals_gib: tuple[float, ...] = (10.0,),
    clock: Callable[[], float] | None = None,
    **settings: Any,
) -> AsyncIterator[Core]:
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "models.yaml").write_text(yaml.safe_dump(models))
    defaults: dict[str, Any] = {
        "home": home,
        "pool_size": 0,
        "capacity_wait": 10.0,
        "memory_settle_timeout": 0.5,
        "sleep_residual_gib": 1.0,
        "host_memory_gib": 100.0,
        "stop_timeout": 2.0,
    }
    s = Settings(**{**defaults, **settings})
    probe = StubProbe([int(t * GIB) for t in totals_gib])
    driver = StubDriver(probe, home / "logs", asleep_residue=int(1.0 * GIB))
    manager = Manager(s, probe, driver=driver, **({"clock": clock} if clock else {}))
    manager.registry.load_config(strict=True)
    try:
        yield Core(manager, driver, probe)
    finally:
        await asyncio.wait_for(manager.close(), HANG)


def gib(n: float, **extra: Any) -> dict[str, Any]:
    return {"gpu_memory_gib": n, **extra}


# --- the hang of issue 12: a keep-alive sleep, a placement that must stop the sleeper, a request for it --------


@pytest.mark.parametrize("first", ["A", "B"])
async def test_keep_alive_sleep_then_placement_stop_then_request_for_sleeper(tmp_path: Path, first: str) -> None:
    """B is being put to sleep by the keep-alive; A needs more room than B's sleep frees (B must then be
    stopped); a request for B arrives too. Both requests are answered, in either order of arrival, and
    nothing stays held (on main before the one-owner core this hung forever on Python 3.12)."""
    clock = Clock()
    models = {"A": gib(9.5), "B": gib(6, keep_alive={"sleep_l1": None, "sleep_l2": 10, "stop": None})}
    async with make_core(tmp_path, models, clock=clock) as core:
        await core.request("B")
        gate = core.driver.hold("B", "sleep2")
        clock.now += 11
        keep_alive = asyncio.create_task(core.manager.apply_keep_alive())
        await asyncio.wait_for(gate.entered.wait(), HANG)  # B's owner is inside its sleep now
        order = ["A", "B"] if first == "A" else ["B", "A"]
        requests = {}
        for name in order:
            requests[name] = asyncio.create_task(core.request(name))
            await settle()
        assert not any(t.done() for t in requests.values())  # both wait: B's sleep is held
        core.driver.release("B", "sleep2")
        done = await asyncio.wait_for(asyncio.gather(*requests.values(), keep_alive), HANG)
        assert [i.name for i in done[:2]] == order
        await asyncio.wait_for(_until(lambda: not any(i.busy for i in core.manager.instances.values())), HANG)
        states = {i.name: i.state for i in core.manager.instances.values()}
        assert State.RUNNING in states.values() and set(states.values()) <= {State.RUNNING, State.STOPPED}, states
        assert all(i.in_flight == 0 for i in core.manager.instances.values())
        # and both still answer (the one not running is started again, the other making room)
        for name in order:
            assert (await core.request(name)).state is State.RUNNING


# --- interleavings: keep-alive step x request x another model's eviction x stop x child death x disconnect -----

EVENTS = ["keep_alive", "request", "evict_for_other", "admin_stop", "child_death", "disconnect"]


@pytest.mark.parametrize(("first", "second"), list(itertools.permutations(EVENTS, 2)))
async def test_two_events_on_one_model_end_in_a_defined_state(tmp_path: Path, first: str, second: str) -> None:
    """Model M is running and idle; two lifecycle events hit it, the first one held mid-way at a gate while the
    second arrives. Whatever the pair, every caller gets an answer, M ends in a settled state (running,
    sleeping, stopped or error) with nothing in flight, and a request afterwards is served."""
    clock = Clock()
    models = {
        "M": gib(6, keep_alive={"sleep_l1": 5, "sleep_l2": None, "stop": None}, sleep_level=2),
        "O": gib(6, keep_alive={"sleep_l1": None, "sleep_l2": None, "stop": None}),
    }
    async with make_core(tmp_path, models, clock=clock) as core:
        m = await core.request("M")
        clock.now += 6  # M is due for its keep-alive step
        core.driver.hold("M", "sleep1")
        core.driver.hold("M", "sleep2")
        tasks: list[asyncio.Task[Any]] = []

        async def fire(event: str) -> None:
            if event == "keep_alive":
                tasks.append(asyncio.create_task(core.manager.apply_keep_alive()))
            elif event == "request":
                tasks.append(asyncio.create_task(core.request("M")))
            elif event == "evict_for_other":
                tasks.append(asyncio.create_task(core.request("O")))  # O needs M's room
            elif event == "admin_stop":
                tasks.append(asyncio.create_task(core.manager.stop("M")))
            elif event == "child_death":
                if m.engine is not None:
                    engine = m.engine
                    core.driver.crash(engine)
                    await asyncio.wait_for(engine.process.wait(), HANG)  # the exit is seen (the watcher's news)
            elif event == "disconnect":
                waiter = asyncio.create_task(core.manager.acquire("M"))
                await settle()
                waiter.cancel()  # a client that gave up while waiting (or after being admitted)
                with contextlib.suppress(asyncio.CancelledError):
                    inst = await waiter
                    inst.release()
            await settle()

        await fire(first)
        await fire(second)
        for op in ("sleep1", "sleep2"):
            if ("M", op) in core.driver.gates:
                core.driver.release("M", op)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG)
        for r in results:
            # the only acceptable failures: the model died under a request (503 with the reason), a stop that
            # raced with a request (409), or no room while the other model was busy
            if isinstance(r, BaseException):
                assert isinstance(r, ModelUnavailable | Conflict), repr(r)
        # settled, and nothing left in flight (a request admitted for a client that left is given back by a
        # callback of its answer: it may run a loop turn after the owner goes idle)
        await asyncio.wait_for(_until(lambda: not m.busy and m.in_flight == 0), HANG)
        assert m.state in (State.RUNNING, State.SLEEPING, State.STOPPED, State.ERROR)
        if m.state is State.ERROR:
            assert m.last_error
        if m.state is not State.RUNNING:
            assert m.engine is None or m.state is State.SLEEPING
        # and M answers a request afterwards (the other model, idle, makes room)
        await settle()
        await asyncio.wait_for(_until(lambda: not m.busy), HANG)
        again = await core.request("M")
        assert again.state is State.RUNNING and again.engine is not None and not again.engine.exited


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 (a condition on plain attributes: polled per loop turn)
        await asyncio.sleep(0)


# --- the ladder: L1 -> L2 -> stop ------------------------------------------------------------------------------


async def test_keep_alive_ladder_goes_l1_then_l2_then_stop(tmp_path: Path) -> None:
    clock = Clock()
    models = {"M": gib(4, keep_alive={"sleep_l1": 10, "sleep_l2": 20, "stop": 30})}
    async with make_core(tmp_path, models, clock=clock) as core:
        m = await core.request("M")
        expected = [(9, State.RUNNING, 0), (11, State.SLEEPING, 1), (21, State.SLEEPING, 2), (31, State.STOPPED, 0)]
        start = clock.now
        for at, state, level in expected:
            clock.now = start + at
            await core.manager.apply_keep_alive()
            assert (m.state, m.sleep_level) == (state, level), at
        assert core.actions() == [
            ("M", "sleep_l1", "keep_alive"),
            ("M", "sleep_l2", "keep_alive"),
            ("M", "stop", "keep_alive"),
        ]
        # L1 -> L2 is a wake and a level-2 sleep (vLLM cannot drop the weights' host copy while asleep)
        assert [op for name, op in core.driver.calls if name == "M"] == ["start", "sleep1", "wake1", "sleep2", "stop"]
        metrics = core.manager.metrics.render().decode()
        for action in ("sleep_l1", "sleep_l2", "stop"):
            assert f'vllama_evictions_total{{action="{action}",model="M",reason="keep_alive"}} 1.0' in metrics
        assert (await core.request("M")).state is State.RUNNING


async def test_ladder_l1_to_l2_waits_when_the_wake_would_not_fit(tmp_path: Path) -> None:
    """Deepening wakes the model for a moment: with no room for that, it waits (the stop step still comes)."""
    clock = Clock()
    ladder = {"sleep_l1": 10, "sleep_l2": 20, "stop": 30}
    models = {
        "M": gib(6, keep_alive=ladder),
        "O": gib(6, keep_alive={"sleep_l1": None, "sleep_l2": None, "stop": None}),
    }
    async with make_core(tmp_path, models, clock=clock) as core:
        m = await core.request("M")
        clock.now += 11
        await core.manager.apply_keep_alive()
        assert (m.state, m.sleep_level) == (State.SLEEPING, 1)
        await core.request("O")  # O takes the room M would need to wake
        clock.now += 10
        await core.manager.apply_keep_alive()
        assert (m.state, m.sleep_level) == (State.SLEEPING, 1)
        clock.now += 10
        await core.manager.apply_keep_alive()
        assert m.state is State.STOPPED


# --- host memory: level-1 sleepers' weights count against a budget -------------------------------------------


@pytest.mark.parametrize(("budget_gib", "level"), [(100.0, 1), (2.0, 2)])
async def test_host_budget_chooses_the_sleep_level_of_an_eviction(
    tmp_path: Path, budget_gib: float, level: int
) -> None:
    models = {"A": gib(6, sleep_level=1), "B": gib(6)}
    async with make_core(tmp_path, models, host_memory_gib=budget_gib) as core:
        await core.request("A")
        await core.request("B")  # A must make room
        a = core.inst("A")
        assert (a.state, a.sleep_level) == (State.SLEEPING, level)
        assert a.host_held == (5 * GIB if level == 1 else 0)  # need 6 less what it keeps asleep (1)
        assert core.manager.placement.host_free() == int(budget_gib * GIB) - a.host_held


async def test_host_budget_turns_a_keep_alive_l1_step_into_l2(tmp_path: Path) -> None:
    clock = Clock()
    models = {"A": gib(6, keep_alive={"sleep_l1": 10, "sleep_l2": None, "stop": None})}
    async with make_core(tmp_path, models, clock=clock, host_memory_gib=1.0) as core:
        a = await core.request("A")
        clock.now += 11
        await core.manager.apply_keep_alive()
        assert (a.state, a.sleep_level) == (State.SLEEPING, 2)
        assert "host memory budget" in (a.last_eviction or "")


async def test_overdrawn_host_budget_deepens_the_least_recently_used_l1_sleeper(tmp_path: Path) -> None:
    clock = Clock()
    never = {"sleep_l1": None, "sleep_l2": None, "stop": None}
    models = {"A": gib(3, keep_alive=never), "B": gib(3, keep_alive=never)}
    async with make_core(tmp_path, models, clock=clock, host_memory_gib=100.0) as core:
        a = await core.request("A")
        clock.now += 1
        b = await core.request("B")
        await core.manager.sleep("A", 1)
        await core.manager.sleep("B", 1)
        core.manager.placement.host_budget = int(3 * GIB)  # 2 + 2 GiB of weights held: overdrawn by 1
        await core.manager.apply_keep_alive()
        assert (a.sleep_level, b.sleep_level) == (2, 1)  # A was used least recently
        assert core.actions() == [("A", "sleep_l2", "host_memory")]


# --- every failure ends in a defined state ---------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("bad JSON"), RuntimeError("boom"), ConnectionResetError()])
async def test_a_wake_that_raises_anything_ends_in_error_and_the_next_request_starts_afresh(
    tmp_path: Path, error: Exception
) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        m = await core.request("M")
        await core.manager.sleep("M", 2)
        old = m.engine
        core.driver.fail[("M", "wake2")] = error
        with pytest.raises(ModelUnavailable, match="failed to wake"):
            await core.request("M")
        assert m.state is State.ERROR and m.engine is None and old is not None and old.exited
        assert (await core.request("M")).state is State.RUNNING
        assert m.engine is not old


@pytest.mark.parametrize("error", [ValueError("bad JSON"), ConnectionResetError()])
async def test_a_failed_eviction_sleep_is_not_counted_as_an_eviction(tmp_path: Path, error: Exception) -> None:
    async with make_core(tmp_path, {"A": gib(6), "B": gib(6)}) as core:
        a = await core.request("A")
        core.driver.fail[("A", "sleep2")] = error
        await core.request("B")  # A's sleep fails: A is killed (that frees its memory too) and B starts
        assert a.state is State.ERROR and "failed to sleep" in (a.last_error or "")
        assert core.actions() == []
        assert core.inst("B").state is State.RUNNING
        metrics = core.manager.metrics.render().decode()
        assert 'vllama_model_operations_total{model="A",operation="sleep",outcome="error"} 1.0' in metrics


async def test_a_transition_that_outlasts_its_timeout_kills_the_child(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}, transition_timeout=0.2) as core:
        m = await core.request("M")
        core.driver.hold("M", "sleep2")  # never released: vLLM does not answer
        engine = m.engine
        with pytest.raises(ModelUnavailable, match="no answer within"):
            await core.manager.sleep("M", 2)
        assert m.state is State.ERROR and engine is not None and engine.exited


async def test_child_death_during_a_sleep_never_ends_running(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        m = await core.request("M")
        gate = core.driver.hold("M", "sleep2")
        sleeping = asyncio.create_task(core.manager.sleep("M", 2))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        assert m.engine is not None
        core.driver.crash(m.engine)
        await asyncio.wait_for(m.engine.process.wait(), HANG)
        await settle()  # the watcher's news is queued behind the sleep
        core.driver.release("M", "sleep2")
        with pytest.raises(ModelUnavailable):
            await asyncio.wait_for(sleeping, HANG)
        await asyncio.wait_for(_until(lambda: not m.busy), HANG)
        assert m.state is State.ERROR and m.engine is None


async def test_child_death_while_asleep_and_while_draining(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}, drain_timeout=HANG) as core:
        m = await core.request("M")
        await core.manager.sleep("M", 1)
        assert m.engine is not None
        core.driver.crash(m.engine)
        await asyncio.wait_for(_until(lambda: m.state is State.ERROR), HANG)
        # draining: a stop waits for a request in flight; the child dies: the drain ends at once
        m = await asyncio.wait_for(core.manager.acquire("M"), HANG)  # held in flight
        stopping = asyncio.create_task(core.manager.stop("M"))
        await asyncio.wait_for(_until(lambda: m.state is State.DRAINING), HANG)
        assert m.engine is not None
        core.driver.crash(m.engine)
        await asyncio.wait_for(stopping, HANG)
        m.release()
        assert m.state is State.STOPPED


async def test_request_after_the_relay_saw_the_child_die_starts_a_fresh_one(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        m = await asyncio.wait_for(core.manager.acquire("M"), HANG)
        old = m.engine
        assert old is not None
        core.driver.crash(old)
        await old.process.wait()
        m.child_died(old)  # what the relay does before it sends the request once more
        m.release()
        assert not m.try_acquire()  # the dead child admits nothing, even before the owner records it
        again = await core.request("M")
        assert again.engine is not old and again.state is State.RUNNING


async def test_a_hung_child_is_killed_and_replaced(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        m = await asyncio.wait_for(core.manager.acquire("M"), HANG)
        old = m.engine
        assert old is not None
        assert not await m.check_hung(old)  # it still answers its health check: only slow
        core.driver.answering = False
        assert await m.check_hung(old)
        m.release()
        assert m.state is State.ERROR and old.exited and "stopped answering" in (m.last_error or "")
        core.driver.answering = True
        assert (await core.request("M")).engine is not old


async def test_cancelled_waiters_do_not_cancel_the_start(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        gate = core.driver.hold("M", "start")
        waiter = asyncio.create_task(core.manager.acquire("M"))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        core.driver.release("M", "start")
        m = core.inst("M")
        # running, and the request admitted for the waiter that left is given back
        await asyncio.wait_for(_until(lambda: m.state is State.RUNNING and m.in_flight == 0), HANG)


async def test_shutdown_mid_start_kills_the_child(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        gate = core.driver.hold("M", "start")
        waiter = asyncio.create_task(core.manager.acquire("M"))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        m = core.inst("M")
        engine = m.engine
        await asyncio.wait_for(core.manager.close(), HANG)
        with pytest.raises(ModelUnavailable):
            await asyncio.wait_for(waiter, HANG)
        assert engine is not None and engine.exited and m.state is State.STOPPED


# --- others' commands are answered at once when the owner is busy ---------------------------------------------


async def test_a_busy_victim_answers_not_now_at_once(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"A": gib(4), "B": gib(4)}) as core:
        a = await core.request("A")
        gate = core.driver.hold("A", "sleep2")
        sleeping = asyncio.create_task(core.manager.sleep("A", 2))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        assert await a.try_evict(3) is Outcome.NOT_NOW  # no await on A's sleep
        assert await a.try_deepen() is Outcome.NOT_NOW
        core.driver.release("A", "sleep2")
        await asyncio.wait_for(sleeping, HANG)
        inflight = await asyncio.wait_for(core.manager.acquire("B"), HANG)
        assert await inflight.try_evict(2) is Outcome.NOT_NOW  # a request in flight
        inflight.release()


async def test_no_room_while_only_busy_models_hold_it_is_a_503_after_the_wait(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"A": gib(6), "B": gib(6)}, capacity_wait=0.3) as core:
        a = await asyncio.wait_for(core.manager.acquire("A"), HANG)  # in flight for the whole test
        with pytest.raises(NoCapacity, match="busy models hold the rest: A"):
            await core.request("B")
        a.release()
        assert (await core.request("B")).state is State.RUNNING  # A idle now: it makes room


async def test_a_model_on_another_device_is_never_evicted(tmp_path: Path) -> None:
    models = {"A": gib(6, devices=[0]), "B": gib(6, devices=[1]), "C": gib(6, devices=[0])}
    async with make_core(tmp_path, models, totals_gib=(10.0, 10.0)) as core:
        await core.request("A")
        await core.request("B")
        await core.request("C")
        assert core.inst("A").state is State.SLEEPING and core.inst("B").state is State.RUNNING


async def test_no_load_or_eviction_on_a_device_while_another_model_loads_there(tmp_path: Path) -> None:
    """vLLM sizes its memory from what is free while it initialises: a start on the same GPU waits."""
    models = {"A": gib(3), "B": gib(3)}
    async with make_core(tmp_path, models) as core:
        gate = core.driver.hold("A", "start")
        a_task = asyncio.create_task(core.request("A"))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        b_task = asyncio.create_task(core.request("B"))
        await settle()
        assert ("B", "start") not in core.driver.calls
        core.driver.release("A", "start")
        await asyncio.wait_for(asyncio.gather(a_task, b_task), HANG)
        assert core.driver.calls.index(("B", "start")) > core.driver.calls.index(("A", "start"))


async def test_shutdown_answers_the_commands_still_queued(tmp_path: Path) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        gate = core.driver.hold("M", "start")
        first = asyncio.create_task(core.manager.acquire("M"))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        queued = asyncio.create_task(core.manager.stop("M"))  # waits behind the start
        await settle()
        await asyncio.wait_for(core.manager.close(), HANG)
        for task in (first, queued):
            with pytest.raises(ModelUnavailable, match="shutting down"):
                await asyncio.wait_for(task, HANG)


async def test_a_request_that_finds_the_child_dead_before_its_watcher_does_starts_a_fresh_one(
    tmp_path: Path,
) -> None:
    async with make_core(tmp_path, {"M": gib(4)}) as core:
        m = await core.request("M")
        old = m.engine
        assert old is not None
        assert m._watcher is not None
        m._watcher.cancel()  # its news is late (here: never comes): the owner must notice the exit itself
        core.driver.crash(old)
        await old.process.wait()
        again = await asyncio.wait_for(core.manager.acquire("M"), HANG)
        again.release()
        assert again.state is State.RUNNING and again.engine is not old


# --- a model with LoRA never sleeps at level 2 (vLLM 0.26 cannot wake it: bench/results/2026-11-27-h100-lora-wake)


LORA = {"extra_args": ["--enable-lora"]}


async def test_a_lora_model_is_stopped_where_it_would_sleep_at_level_2(tmp_path: Path) -> None:
    clock = Clock()
    models = {"L": gib(6, **LORA, keep_alive={"sleep_l1": 10, "sleep_l2": 20, "stop": 30}), "O": gib(6)}
    async with make_core(tmp_path, models, clock=clock) as core:
        lora = await core.request("L")
        await core.request("O")  # L's eviction level is 2 (the default): a stop instead
        assert lora.state is State.STOPPED and core.actions() == [("L", "stop", "capacity")]
        snapshot, note = await core.manager.sleep("O", 2)  # a model without LoRA sleeps at level 2
        assert snapshot["sleep_level"] == 2 and not note
        await core.request("L")
        snapshot, note = await core.manager.sleep("L", 2)
        assert snapshot["state"] == "stopped" and "LoRA" in note
        # the ladder: level 1, then no level 2 (no deepening), then the stop
        await core.request("L")
        start = clock.now
        for at, expected in ((11, (State.SLEEPING, 1)), (21, (State.SLEEPING, 1)), (31, (State.STOPPED, 0))):
            clock.now = start + at
            await core.manager.apply_keep_alive()
            assert (lora.state, lora.sleep_level) == expected, at
        assert ("L", "wake1") not in core.driver.calls and ("L", "sleep2") not in core.driver.calls


async def test_the_room_an_eviction_frees_goes_to_the_model_that_evicted(tmp_path: Path) -> None:
    """B evicts A; a request for A arrives while A falls asleep. B gets the room (A's own request does not wake
    A back into it, which made the two swap over and over), then A's request is served once B is idle."""
    async with make_core(tmp_path, {"A": gib(6), "B": gib(6)}) as core:
        await core.request("A")
        gate = core.driver.hold("A", "sleep2")
        for_b = asyncio.create_task(core.request("B"))
        await asyncio.wait_for(gate.entered.wait(), HANG)
        for_a = asyncio.create_task(core.request("A"))  # queued behind A's sleep
        await settle()
        core.driver.release("A", "sleep2")
        await asyncio.wait_for(asyncio.gather(for_b, for_a), HANG)
        calls = core.driver.calls
        assert calls.index(("B", "start")) < calls.index(("A", "wake2")), calls
