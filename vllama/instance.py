"""One owner per model: the lifecycle of one vLLM instance, run by one task.

    stopped ──bring up──▶ starting ──ready──▶ running ──evict/sleep──▶ draining ──▶ sleeping(L1/L2)
       ▲                     │                  ▲  │                                 │  │
       │                  failed                └──┴────────── waking ◀──bring up───┘  │ deepen (L1 → L2:
       │                     ▼                     │                                    │  wake, sleep L2)
       └──── stopping ◀── error ◀── child died ────┘   (any state ─stop─▶ draining ─▶ stopping ─▶ stopped)

Invariants:
- Only the owner task (`_run`) changes `state`, `engine`, `devices` and the other lifecycle fields. Everyone
  else — requests, the keep-alive, other models' placements, admin calls, the child watcher, the relay —
  sends a command and awaits its answer. Commands are served one at a time, in order.
- Commands from other models (`try_evict`, `try_deepen`) are answered "not now" at once when the owner is
  busy, has commands queued, has requests in flight or is not in a state they apply to: nobody ever waits for
  a model that is itself waiting. An accepted one is the next command served, and serving it never waits on
  another model, so there is no cycle of waits.
- `in_flight` only grows while the state is RUNNING with a live child, checked and incremented without an
  await in between (`try_acquire`). Sleep and stop first leave RUNNING (→ draining), then wait for
  `in_flight == 0` (or the child's death): no request is admitted to an instance going to sleep or stopping.
- Every command ends in a defined state, on every exception and on cancellation: what failed kills the child
  and leaves ERROR with the reason (the next request starts afresh); a refusal leaves the state as it was.
- Memory is reserved from the moment a start or wake is decided (by `Host.make_room`), not from when vLLM
  allocates it: placement decisions count reservations.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from vllama import engine as eng
from vllama.config import KeepAlive, ModelConfig
from vllama.errors import Conflict, ModelUnavailable, VllamaError

log = logging.getLogger("vllama")
T = TypeVar("T")


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    ERROR = "error"


# states in which the instance holds (or is about to hold) its full memory
HOLDS_FULL_MEMORY = {State.STARTING, State.RUNNING, State.DRAINING, State.WAKING, State.STOPPING}


class _StepFailed(Exception):
    """An engine operation failed; the instance is already in ERROR with the reason."""


class Outcome(str, enum.Enum):
    """The answer to a command from another model or the keep-alive."""

    DONE = "done"
    NOT_NOW = "not now"  # busy, in use or not in a state the command applies to: nothing was changed
    FAILED = "failed"  # tried and failed: the child was killed and the instance is in ERROR


@dataclass(frozen=True)
class Reservation:
    """Where a start or wake goes and what it holds there, decided by placement."""

    devices: tuple[int, ...]
    need: int  # bytes on each device while awake
    utilization: float | None  # the fraction given to vLLM (None on the CPU build)


class Host(Protocol):
    """What an owner needs from the rest of vllama: room on the devices, and the engine operations (a seam
    that tests replace with a stub)."""

    async def make_room(self, inst: Instance, waking: bool) -> Reservation:
        """Evict until `inst` fits (or raise NoCapacity); the reservation is taken at return."""
        ...

    def room_without_eviction(self, inst: Instance) -> Reservation | None: ...

    async def start_engine(self, inst: Instance, on_spawn: Callable[[eng.EngineProcess], None]) -> eng.EngineProcess:
        """Spawn vLLM for `inst` (its reservation is set) and wait until it answers; EngineError on failure."""
        ...

    async def sleep_engine(self, engine: eng.EngineProcess, level: int) -> int:
        """Put vLLM to sleep; answers the bytes per device it still holds (measured; 0 if unknown)."""
        ...

    async def wake_engine(self, engine: eng.EngineProcess, level: int, served_name: str) -> None: ...

    async def stop_engine(self, engine: eng.EngineProcess) -> None: ...

    async def engine_alive(self, engine: eng.EngineProcess) -> bool: ...

    def host_bytes_at_l1(self, inst: Instance) -> int:
        """Host memory the weights take once asleep at level 1."""
        ...

    def observe(self, inst: Instance, operation: str, seconds: float, ok: bool) -> None: ...

    def changed(self) -> None:
        """Something that may free memory or end a wait happened."""
        ...

    def check_start_backoff(self, inst: Instance) -> None:
        """Raise ModelUnavailable while requests must not start `inst` again yet (after failed starts)."""
        ...

    def record_start(self, inst: Instance, ok: bool) -> None: ...


CommandKind = Literal["bring_up", "evict", "deepen", "sleep", "stop", "child_died", "check_hung"]


@dataclass
class Command:
    kind: CommandKind
    level: int = 0  # evict/sleep: 1 or 2 = sleep at that level, 3 = stop
    drain_timeout: float = 0.0
    engine: eng.EngineProcess | None = None  # child_died / check_hung: which child the news is about
    attempts_seen: int = 0  # bring_up: failed attempts when sent (an attempt that failed since is shared)
    admit: bool = False  # bring_up: admit one request once running (see `bring_up_and_acquire`)
    backoff: bool = True  # bring_up: a request honours the back-off after failed starts; `vllama start` does not
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Instance:
    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        *,
        host: Host,
        transition_timeout: float = 300.0,
        stop_grace: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.state = State.STOPPED
        self.sleep_level = 0  # 1 or 2 while sleeping
        self.engine: eng.EngineProcess | None = None
        self.devices: tuple[int, ...] = ()
        self.need = 0  # bytes on each device while awake
        self.gpu_memory_utilization: float | None = None
        self.asleep_held = 0  # bytes per device still held while asleep (measured after a sleep)
        self.host_held = 0  # bytes of host memory held while asleep at level 1 (the weights)
        self.in_flight = 0
        self.last_used = clock()
        self.last_used_wall = time.time()
        self.last_error: str | None = None
        self.last_log: Path | None = None
        self.last_eviction: str | None = None
        # set by a request's `keep_alive` (Ollama API): replaces the configured keep-alive ladder until it stops
        self.keep_alive_override: KeepAlive | None = None
        # failed starts and wakes: the callers that waited for one share its error instead of each trying again
        self.failed_attempts = 0
        self.ready_at: float | None = None
        self.startup_seconds: float | None = None
        self.transition_timeout = transition_timeout
        self.stop_grace = stop_grace
        self._host = host
        self._clock = clock
        self._idle = asyncio.Event()
        self._idle.set()
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._serving = False  # a command is being served
        self._watcher: asyncio.Task[None] | None = None  # notices a child that dies by itself
        self._watched: eng.EngineProcess | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"owner:{name}")

    # --- requests (no await: the check and the increment are atomic) ----------------------------------------

    def try_acquire(self) -> bool:
        """Admit one request if running with a live child."""
        engine = self.engine
        if self.state is not State.RUNNING or engine is None or engine.exited:
            return False
        self.in_flight += 1
        self._idle.clear()
        self.touch()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self.touch()
        if self.in_flight == 0:
            self._idle.set()
            self._host.changed()

    def touch(self) -> None:
        self.last_used = self._clock()
        self.last_used_wall = time.time()

    @property
    def busy(self) -> bool:
        """Serving a command or with commands waiting: others' commands would have to wait."""
        return self._serving or not self._queue.empty()

    # --- commands (what everyone else calls) ---------------------------------------------------------------

    async def bring_up(self, *, backoff: bool = True) -> dict[str, object]:
        """Start or wake, making room first; ModelUnavailable (NoCapacity) if that fails. Answers the snapshot
        taken when it was done (the owner may go on with later commands at once). `backoff=False` starts even
        while requests are held back after failed starts."""
        command = Command("bring_up", attempts_seen=self.failed_attempts, backoff=backoff)
        result: dict[str, object] = await self._send(command)
        return result

    async def bring_up_and_acquire(self) -> None:
        """Start or wake, then admit one request (the caller releases it). The owner admits it the moment the
        model is running, before anything else can run: no other model's eviction comes in between."""
        command = Command("bring_up", attempts_seen=self.failed_attempts, admit=True)
        try:
            await self._send(command)
        except asyncio.CancelledError:
            # the caller left while waiting: a request admitted on its behalf is given back
            command.future.add_done_callback(self._release_if_admitted)
            raise

    def _release_if_admitted(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release()

    async def stop(self, drain_timeout: float) -> tuple[bool, dict[str, object]]:
        """Stop after in-flight requests finish; False if they did not in time (then it keeps running). With
        the snapshot taken when it was done."""
        result: tuple[bool, dict[str, object]] = await self._send(Command("stop", level=3, drain_timeout=drain_timeout))
        return result

    async def sleep(self, level: int, drain_timeout: float) -> tuple[bool, dict[str, object]]:
        """Sleep at level 1 or 2 after in-flight requests finish; False if they did not in time. Conflict if
        the instance is not running (or asleep at another level). With the snapshot taken when it was done."""
        result: tuple[bool, dict[str, object]] = await self._send(
            Command("sleep", level=level, drain_timeout=drain_timeout)
        )
        return result

    async def try_evict(self, level: int) -> Outcome:
        """For placement and the keep-alive: sleep at `level` (1, 2) or stop (3), only if idle right now."""
        if self.busy or self.in_flight or self.state not in (State.RUNNING, State.SLEEPING):
            return Outcome.NOT_NOW
        result: Outcome = await self._send(Command("evict", level=level))
        return result

    async def try_deepen(self) -> Outcome:
        """For the keep-alive and the host budget: from sleep level 1 to 2 (frees the weights' host memory)."""
        if self.busy or self.state is not State.SLEEPING or self.sleep_level != 1:
            return Outcome.NOT_NOW
        result: Outcome = await self._send(Command("deepen", level=2))
        return result

    def child_died(self, engine: eng.EngineProcess) -> None:
        """News that `engine` exited (the watcher, or the relay that could not reach it). Not awaited: the
        owner records it before serving any later command (a request's bring-up included)."""
        self._queue.put_nowait(Command("child_died", engine=engine))

    async def check_hung(self, engine: eng.EngineProcess) -> bool:
        """For the relay, after a request got no answer in time: True if the child stopped answering its health
        check too (it was then killed and will start afresh on the next request)."""
        result: bool = await self._send(Command("check_hung", engine=engine))
        return result

    async def close(self) -> None:
        """End the owner (vllama shuts down) and stop the child, whatever the owner was doing."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():  # commands that will never be served: their senders get an answer
            command = self._queue.get_nowait()
            if not command.future.done():
                command.future.set_exception(ModelUnavailable(f"{self.name}: vllama is shutting down"))
        if self._watcher is not None:
            self._watcher.cancel()
        engine, self.engine = self.engine, None
        if engine is not None:
            await self._host.stop_engine(engine)
        self._set(State.STOPPED)

    async def _send(self, command: Command) -> Any:
        if self._task.done():
            raise ModelUnavailable(f"{self.name}: vllama is shutting down")
        self._queue.put_nowait(command)
        command.future.add_done_callback(_retrieved)
        # shielded: a caller that gives up (a client that left) does not cancel the owner's work
        return await asyncio.shield(command.future)

    # --- the owner task ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            command = await self._queue.get()
            self._serving = True
            try:
                result = await self._serve(command)
            except asyncio.CancelledError:
                if not command.future.done():
                    command.future.set_exception(ModelUnavailable(f"{self.name}: vllama is shutting down"))
                raise
            except VllamaError as exc:
                if not command.future.done():
                    command.future.set_exception(exc)
            except Exception as exc:  # a bug or an unexpected answer: never leave the model mid-transition
                log.exception("%s: %s failed unexpectedly", self.name, command.kind)
                await self._fail(f"{self.name}: {command.kind} failed unexpectedly: {exc!r}")
                if not command.future.done():
                    command.future.set_exception(ModelUnavailable(self.last_error or str(exc)))
            else:
                if not command.future.done():
                    command.future.set_result(result)
            finally:
                self._serving = False
                self._host.changed()

    async def _serve(self, c: Command) -> Any:
        if c.kind == "bring_up":
            await self._bring_up(c.attempts_seen, c.backoff)
            if not c.admit:
                return self.snapshot()  # for `vllama start` (it reads the child's pid: not on the request path)
            if not self.try_acquire():
                raise ModelUnavailable(self.last_error or f"{self.name} is {self.state.value}")
            return None
        if c.kind == "evict":
            return await self._evict(c.level)
        if c.kind == "deepen":
            return await self._deepen()
        if c.kind == "sleep":
            return await self._admin_sleep(c.level, c.drain_timeout), self.snapshot()
        if c.kind == "stop":
            return await self._stop(c.drain_timeout), self.snapshot()
        if c.kind == "child_died":
            return self._record_exit(c.engine)
        if c.kind == "check_hung":
            return await self._check_hung(c.engine)
        raise ValueError(f"unknown command {c.kind!r}")

    # --- transitions (only ever run by the owner task) -----------------------------------------------------

    def _set(self, state: State) -> None:
        self.state = state
        self._host.changed()

    async def _bring_up(self, attempts_seen: int, backoff: bool) -> None:
        if self.engine is not None and self.engine.exited:
            self._record_exit(self.engine)  # died, and its watcher's news is not in yet: record it now
        if self.state is State.RUNNING:
            return
        if self.state is State.ERROR and self.failed_attempts != attempts_seen and self.last_error:
            # the attempt this caller waited for failed: share its error instead of retrying once per waiter
            raise ModelUnavailable(self.last_error)
        if self.state is State.SLEEPING and self.engine is not None:
            await self._wake()
            return
        if self.state not in (State.STOPPED, State.ERROR):
            raise ModelUnavailable(f"{self.name} is {self.state.value}")
        if backoff and self.state is State.ERROR:
            self._host.check_start_backoff(self)  # a start that just failed is not retried (evicting) at once
        await self._start()

    async def _start(self) -> None:
        reservation = await self._host.make_room(self, waking=False)
        # no await between the plan and this: the reservation is counted by the next plan
        self.devices, self.need = reservation.devices, reservation.need
        self.gpu_memory_utilization = reservation.utilization
        self.last_error = None
        self._set(State.STARTING)
        t0 = self._clock()
        engine: eng.EngineProcess | None = None

        def on_spawn(spawned: eng.EngineProcess) -> None:
            nonlocal engine
            engine = spawned
            self.engine, self.last_log = spawned, spawned.spec.log_path

        try:
            engine = await self._host.start_engine(self, on_spawn)
        except BaseException as exc:
            ok = isinstance(exc, eng.EngineError | OSError)
            message = f"{self.name} failed to start: {exc}" if ok else f"{self.name}: start interrupted ({exc!r})"
            self._host.observe(self, "start", self._clock() - t0, False)
            self.failed_attempts += 1
            await self._fail(message, engine)
            self._host.record_start(self, ok=False)
            if isinstance(exc, Exception):
                raise ModelUnavailable(message) from None
            raise
        self._host.observe(self, "start", self._clock() - t0, True)
        self._host.record_start(self, ok=True)
        self.startup_seconds = self._clock() - t0
        log.info("%s ready in %.1f s", self.name, self.startup_seconds)
        self._become_running(engine)

    async def _wake(self) -> None:
        reservation = await self._host.make_room(self, waking=True)
        self.need = reservation.need
        engine = self.engine
        if engine is None or engine.exited:  # died while asleep and waiting for room (its news is queued)
            self._record_exit(engine)
            raise ModelUnavailable(self.last_error or f"{self.name} died while asleep")
        level = self.sleep_level
        self._set(State.WAKING)
        try:
            await self._engine_step(
                "wake", engine, f"wake from sleep level {level}", self._host.wake_engine(engine, level, self.name)
            )
        except _StepFailed:
            self.failed_attempts += 1  # the callers that waited for this wake share its error
            raise ModelUnavailable(self.last_error or f"{self.name} failed to wake") from None
        self.host_held = 0
        self._become_running(engine)

    def _become_running(self, engine: eng.EngineProcess) -> None:
        if self._watched is not engine:  # a new child (a wake keeps the child and its watcher)
            if self._watcher is not None:
                self._watcher.cancel()
            self._watched = engine
            self._watcher = asyncio.get_running_loop().create_task(self._watch(engine))
        self.engine = engine
        self.ready_at = self._clock()
        self.sleep_level = 0
        self.touch()
        self._set(State.RUNNING)

    async def _drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish (or the child to die: nothing will finish then)."""
        if self.in_flight == 0:
            return True
        engine = self.engine
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._idle.wait())]
        if engine is not None:
            waits.append(asyncio.ensure_future(engine.process.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self.in_flight == 0 or engine is None or engine.exited

    async def _evict(self, level: int) -> Outcome:
        if self.in_flight or self.state not in (State.RUNNING, State.SLEEPING):
            return Outcome.NOT_NOW
        if level == 3 or self.state is State.SLEEPING:
            if self.state is State.SLEEPING and level != 3:
                return Outcome.NOT_NOW  # already asleep: only a stop frees more (deepening is its own command)
            await self._stop(0.0)
            return Outcome.DONE
        return await self._sleep(level, 0.0)

    async def _admin_sleep(self, level: int, drain_timeout: float) -> bool:
        if self.state is State.SLEEPING and self.sleep_level == level:
            return True
        if self.state is State.SLEEPING:
            raise Conflict(f"{self.name} is asleep at level {self.sleep_level}; wake it first (vllama start)")
        if self.state is not State.RUNNING:
            raise Conflict(f"{self.name} is {self.state.value}, not running: nothing to put to sleep")
        outcome = await self._sleep(level, drain_timeout)
        if outcome is Outcome.FAILED:
            raise ModelUnavailable(self.last_error or f"{self.name} failed to sleep")
        return outcome is Outcome.DONE

    async def _sleep(self, level: int, drain_timeout: float) -> Outcome:
        """RUNNING → SLEEPING at `level` once idle. NOT_NOW if requests did not finish in time (RUNNING again),
        FAILED if the sleep failed (ERROR, the child killed)."""
        engine = self.engine
        if engine is None:
            return Outcome.NOT_NOW
        self._set(State.DRAINING)
        if not await self._drain(drain_timeout):
            self._set(State.RUNNING)
            return Outcome.NOT_NOW
        host_bytes = self._host.host_bytes_at_l1(self) if level == 1 else 0
        try:
            still_held = await self._engine_step(
                "sleep", engine, f"sleep at level {level}", self._host.sleep_engine(engine, level)
            )
        except _StepFailed:
            return Outcome.FAILED
        self.sleep_level, self.host_held = level, host_bytes
        self.asleep_held = still_held or self.asleep_held
        self._set(State.SLEEPING)
        return Outcome.DONE

    async def _deepen(self) -> Outcome:
        """Level 1 → 2: vLLM cannot drop the weights' host copy while asleep, so wake (if that fits without
        evicting anyone) and sleep at level 2 at once. The state stays WAKING throughout: no request gets in."""
        engine = self.engine
        if self.state is not State.SLEEPING or self.sleep_level != 1 or engine is None:
            return Outcome.NOT_NOW
        reservation = self._host.room_without_eviction(self)
        if reservation is None:
            return Outcome.NOT_NOW
        self.need = reservation.need
        self._set(State.WAKING)

        async def wake_then_sleep_at_level_2() -> int:
            await self._host.wake_engine(engine, 1, "")
            return await self._host.sleep_engine(engine, 2)

        try:
            await self._engine_step("sleep", engine, "go from sleep level 1 to 2", wake_then_sleep_at_level_2())
        except _StepFailed:
            return Outcome.FAILED
        self.sleep_level, self.host_held = 2, 0
        self._set(State.SLEEPING)
        return Outcome.DONE

    async def _engine_step(self, operation: str, engine: eng.EngineProcess, what: str, step: Awaitable[T]) -> T:
        """One engine operation of a transition, under `transition_timeout` and observed in the metrics. An
        engine that fails it is in an unknown state: the child is killed, ERROR with the reason, _StepFailed
        (a cancellation does the same, then propagates)."""
        t0 = self._clock()
        try:
            async with asyncio.timeout(self.transition_timeout):
                result = await step
        except BaseException as exc:
            self._host.observe(self, operation, self._clock() - t0, False)
            await self._fail(
                f"{self.name} failed to {what}: {_describe(exc, self.transition_timeout)}; it was stopped and "
                f"starts afresh on the next request (log: {engine.spec.log_path})",
                engine,
            )
            if isinstance(exc, Exception):
                raise _StepFailed from None
            raise
        self._host.observe(self, operation, self._clock() - t0, True)
        return result

    async def _stop(self, drain_timeout: float) -> bool:
        """Any state → STOPPED, after in-flight requests finish (False if they did not, in time)."""
        if self.state is State.RUNNING:
            self._set(State.DRAINING)
            if not await self._drain(drain_timeout):
                self._set(State.RUNNING)
                return False
        engine, self.engine = self.engine, None
        if engine is not None:
            self._set(State.STOPPING)
            t0 = self._clock()
            try:
                await self._host.stop_engine(engine)
            finally:
                self._host.observe(self, "stop", self._clock() - t0, True)
        self.sleep_level, self.host_held = 0, 0
        self.last_error = None
        self.keep_alive_override = None
        self._set(State.STOPPED)
        return True

    async def _fail(self, message: str, engine: eng.EngineProcess | None = None) -> None:
        """Whatever went wrong: kill the child (shielded from a cancellation), ERROR with the reason."""
        engine = engine or self.engine
        self.engine = None
        self.last_error = message
        self.sleep_level, self.host_held = 0, 0
        self._set(State.ERROR)
        if isinstance(_current_exception(), asyncio.CancelledError):
            log.info("%s: interrupted (vllama is shutting down): its child is stopped", self.name)
        else:
            log.error("%s", message)
        if engine is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._host.stop_engine(engine))

    async def _check_hung(self, engine: eng.EngineProcess | None) -> bool:
        if engine is None or engine is not self.engine or self.state not in (State.RUNNING, State.DRAINING):
            return False
        if await self._host.engine_alive(engine):
            return False
        await self._fail(
            f"{self.name}: vLLM stopped answering (no response within the timeout, and its health check failed); "
            f"it was killed and will start fresh on the next request (log: {engine.spec.log_path})",
            engine,
        )
        return True

    async def _watch(self, engine: eng.EngineProcess) -> None:
        await engine.process.wait()
        self.child_died(engine)

    def _record_exit(self, engine: eng.EngineProcess | None) -> None:
        if engine is None or self.engine is not engine:
            return  # a stop we asked for, or already recorded
        self.engine = None
        eng.discard(engine)  # the EngineCore may outlive the API server
        self.last_error = (
            f"{self.name}: vLLM exited unexpectedly with code {engine.process.returncode}: "
            f"{eng.summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
        )
        log.error("%s", self.last_error)
        self.sleep_level, self.host_held = 0, 0
        self._set(State.ERROR)

    # --- views ---------------------------------------------------------------------------------------------

    def reserved(self) -> int:
        """Bytes this instance holds or is about to hold on each of its devices, by its state."""
        if self.state in HOLDS_FULL_MEMORY:
            return self.need
        if self.state is State.SLEEPING:
            return self.asleep_held
        return 0

    def idle_for(self) -> float:
        return self._clock() - self.last_used

    def snapshot(self) -> dict[str, object]:
        engine = self.engine
        return {
            "model": self.name,
            "state": self.state.value,
            "sleep_level": self.sleep_level or None,
            "port": engine.port if engine else None,  # None on a Unix socket
            "socket": str(engine.spec.uds) if engine and engine.spec.uds else None,
            "pid": (engine.server_pid() or engine.pid) if engine else None,
            "devices": list(self.devices),
            "need_bytes": self.need,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "host_memory_bytes": self.host_held,
            "in_flight": self.in_flight,
            "last_access": self.last_used_wall,
            "idle_seconds": round(self.idle_for(), 1),
            "pinned": self.cfg.pinned,
            "log": str(self.last_log) if self.last_log else None,
            "startup_seconds": round(self.startup_seconds, 2) if self.startup_seconds else None,
            "last_error": self.last_error,
            "last_eviction": self.last_eviction,
        }


def action_of(inst: Instance) -> str:
    """How an eviction left `inst`: stop, sleep_l1 or sleep_l2 (the metrics' `action` label)."""
    return "stop" if inst.state is not State.SLEEPING else f"sleep_l{inst.sleep_level}"


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an answer's exception as seen: its sender may have given up waiting for it (no asyncio warning)."""
    if not future.cancelled():
        future.exception()


def _current_exception() -> BaseException | None:
    return sys.exc_info()[1]


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:.0f} s"
    return str(exc) or repr(exc)
