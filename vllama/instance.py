"""One owner per model: the lifecycle state machine of one vLLM instance.

    stopped ──start──▶ starting ──ready──▶ running ──sleep──▶ draining ──▶ sleeping(L1/L2)
       ▲                  │                  ▲  │                              │
       │               failed                └──┴──────── waking ◀──wake───────┘
       │                  ▼                     │
       └──── stopping ◀── error ◀── child died ─┘ (any state ─stop─▶ draining ─▶ stopping ─▶ stopped)

Invariants:
- Only this class changes `state`. Every lifecycle operation runs with `lock` held (the caller takes it), so
  operations on one model never interleave.
- `in_flight` only grows while the state is RUNNING, checked and incremented without an await in between
  (`try_acquire`). Sleep and stop first leave RUNNING (→ draining), then wait for `in_flight == 0`: no
  request is ever admitted to an instance that is going to sleep or stopping.
- Memory is reserved from the moment a start or wake is decided (`reserve_start`, `begin_wake`), not from
  when vLLM allocates it (≈ a minute later): placement decisions count reservations.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from vllama import engine as eng
from vllama.config import KeepAlive, ModelConfig
from vllama.errors import ModelUnavailable


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


class Instance:
    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        *,
        http: aiohttp.ClientSession,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.lock = asyncio.Lock()
        self.state = State.STOPPED
        self.sleep_level = 0  # 1 or 2 while sleeping
        self.engine: eng.EngineProcess | None = None
        self.devices: tuple[int, ...] = ()
        self.need = 0  # bytes on each device while awake
        self.gpu_memory_utilization: float | None = None
        self.asleep_held = 0  # bytes per device still held while asleep (measured after a sleep)
        self.in_flight = 0
        self.last_used = clock()
        self.last_used_wall = time.time()
        self.last_error: str | None = None
        self.last_log: Path | None = None
        self.last_eviction: str | None = None
        # set by a request's `keep_alive` (Ollama API): replaces the configured keep-alive ladder until it stops
        self.keep_alive_override: KeepAlive | None = None
        self.failed_attempts = 0  # count of failed starts/wakes: waiters on a failed attempt share its error
        self.ready_at: float | None = None
        self.startup_seconds: float | None = None
        self._http = http
        self._on_change = on_change
        self._clock = clock
        self._idle = asyncio.Event()
        self._idle.set()
        self._watcher: asyncio.Task[None] | None = None  # notices a child that dies by itself

    # --- requests ------------------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Admit one request if running (no await: the check and the increment are atomic)."""
        if self.state is not State.RUNNING:
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
            self._on_change()

    def touch(self) -> None:
        self.last_used = self._clock()
        self.last_used_wall = time.time()

    async def _drain(self, timeout: float) -> bool:
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # --- transitions (caller holds self.lock) --------------------------------------------------------------

    def _set(self, state: State) -> None:
        self.state = state
        self._on_change()

    def reserve_start(self, devices: tuple[int, ...], need: int, utilization: float | None) -> None:
        assert self.lock.locked() and self.state in (State.STOPPED, State.ERROR), self.state
        self.devices, self.need, self.gpu_memory_utilization = devices, need, utilization
        self.last_error = None
        self._set(State.STARTING)

    def abort_start(self, message: str) -> None:
        """A reserved start that could not even be spawned (no free port)."""
        assert self.lock.locked() and self.state is State.STARTING
        self.failed_attempts += 1
        self.last_error = message
        self._set(State.ERROR)

    async def launch(
        self,
        spec: eng.LaunchSpec,
        *,
        startup_timeout: float,
        stop_grace: float,
        respawn: Callable[[eng.LaunchSpec], eng.LaunchSpec | None] | None = None,
        spawner: Callable[[eng.LaunchSpec, float], Awaitable[eng.EngineProcess]] | None = None,
    ) -> None:
        """Spawn vLLM and wait until it answers. A child whose port was taken by another process (after it was
        picked) is started again with the spec `respawn` gives (another port; None: give up), still STARTING:
        the memory stays reserved. On failure: kill the group, state ERROR, raise."""
        assert self.lock.locked() and self.state is State.STARTING
        t0 = self._clock()
        deadline = t0 + startup_timeout
        engine: eng.EngineProcess | None = None
        try:
            while True:
                self.last_log = spec.log_path
                # the warm pool's spawner may hand the start to a pre-imported interpreter (vllama/pool.py)
                engine = await (spawner(spec, stop_grace) if spawner else eng.spawn(spec, stop_grace=stop_grace))
                self.engine = engine
                try:
                    await eng.wait_ready(engine, self._http, max(deadline - self._clock(), 0.0))
                    break
                except eng.PortInUse as exc:
                    self.engine = None
                    await eng.terminate(engine, stop_grace)
                    engine = None
                    retry = respawn(spec) if respawn is not None else None
                    if retry is None:
                        raise eng.EngineError(f"{exc} (log: {spec.log_path})") from None
                    spec = retry
            assert engine is not None
            await eng.warm_up(engine, self._http, self.name)
            if engine.exited:
                raise eng.EngineError(
                    f"vLLM exited with code {engine.process.returncode} right after it became ready: "
                    f"{eng.summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
                )
        except (eng.EngineError, OSError) as exc:
            await self._fail(f"{self.name} failed to start: {exc}", engine, stop_grace)
        except BaseException:
            await self._fail(f"{self.name}: start was cancelled", engine, stop_grace)
            raise
        # watched from here on (no await before RUNNING): until now the start itself noticed an exit
        assert engine is not None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(engine))
        self.startup_seconds = self._clock() - t0
        self.ready_at = self._clock()
        self.sleep_level = 0
        self.touch()
        self._set(State.RUNNING)

    async def _fail(self, message: str, engine: eng.EngineProcess | None, stop_grace: float) -> None:
        self.engine = None
        self.failed_attempts += 1
        self.last_error = message
        self._set(State.ERROR)
        if engine is not None:
            await eng.terminate(engine, stop_grace)
        raise ModelUnavailable(message)

    def begin_wake(self) -> None:
        assert self.lock.locked() and self.state is State.SLEEPING
        self._set(State.WAKING)

    async def finish_wake(self, stop_grace: float) -> None:
        """Wake (level-2 aware). A failed wake leaves vLLM broken for good: kill it, state ERROR."""
        assert self.lock.locked() and self.state is State.WAKING and self.engine is not None
        engine = self.engine
        try:
            await eng.wake(engine, self._http, self.sleep_level)
            await eng.warm_up(engine, self._http, self.name)
        except (eng.EngineError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await self._fail(
                f"{self.name} failed to wake from sleep level {self.sleep_level}: {exc}; the instance was "
                f"stopped and will start fresh on the next request (log: {engine.spec.log_path})",
                engine,
                stop_grace,
            )
        self.sleep_level = 0
        self.touch()
        self._set(State.RUNNING)

    async def sleep(self, level: int, *, drain_timeout: float) -> bool:
        """RUNNING → SLEEPING at level 1 or 2, after in-flight requests finish. False if they did not finish
        in time (the instance stays running)."""
        assert self.lock.locked() and level in (1, 2)
        if self.state is not State.RUNNING or self.engine is None:
            return self.state is State.SLEEPING
        self._set(State.DRAINING)
        if not await self._drain(drain_timeout):
            self._set(State.RUNNING)
            return False
        engine = self.engine
        try:
            await eng.sleep(engine, self._http, level)
        except (eng.EngineError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # an engine that cannot sleep is in an unknown state: stop it rather than guess
            self.last_error = f"{self.name} failed to sleep at level {level}: {exc} (log: {engine.spec.log_path})"
            await self._stop_engine(engine)
            self.failed_attempts += 1
            self._set(State.ERROR)
            return True
        self.sleep_level = level
        self._set(State.SLEEPING)
        return True

    async def stop(self, *, drain_timeout: float, stop_grace: float) -> bool:
        """Any state → STOPPED, after in-flight requests finish (False if they did not, in time)."""
        assert self.lock.locked()
        if self.state is State.RUNNING:
            self._set(State.DRAINING)
            if not await self._drain(drain_timeout):
                self._set(State.RUNNING)
                return False
        engine = self.engine
        if engine is not None:
            self._set(State.STOPPING)
            await self._stop_engine(engine, stop_grace)
        self.sleep_level = 0
        self.last_error = None
        self._set(State.STOPPED)
        return True

    async def _stop_engine(self, engine: eng.EngineProcess, stop_grace: float = 10.0) -> None:
        self.engine = None
        await eng.terminate(engine, stop_grace)

    async def _watch(self, engine: eng.EngineProcess) -> None:
        """Notice a child that dies by itself (crash, OOM kill) and record it."""
        self._record_exit(engine, await engine.process.wait())

    async def child_died(self, engine: eng.EngineProcess, within: float = 2.0) -> bool:
        """For the relay, after a request could not even reach `engine` (connection refused, or reset before any
        answer): True if the child is gone — its exit is then recorded at once, as the watcher would, so a fresh
        `Manager.acquire` starts it again and the request can be sent there instead of failing with a 502;
        False if it still runs (then the error is real). Waits up to `within` for the guard to notice."""
        if not engine.exited:
            try:
                await asyncio.wait_for(asyncio.shield(engine.process.wait()), within)
            except asyncio.TimeoutError:
                return False
        assert engine.process.returncode is not None
        self._record_exit(engine, engine.process.returncode)
        return True

    def _record_exit(self, engine: eng.EngineProcess, code: int) -> None:
        if self.engine is engine:  # not a stop we asked for, and not recorded yet
            self.engine = None
            eng.kill_group(engine.pid)  # the EngineCore may outlive the API server
            self.failed_attempts += 1
            self.last_error = (
                f"{self.name}: vLLM exited unexpectedly with code {code}: "
                f"{eng.summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
            )
            self.sleep_level = 0
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
            "port": engine.port if engine else None,
            "pid": (engine.server_pid() or engine.pid) if engine else None,
            "devices": list(self.devices),
            "need_bytes": self.need,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "in_flight": self.in_flight,
            "last_access": self.last_used_wall,
            "idle_seconds": round(self.idle_for(), 1),
            "pinned": self.cfg.pinned,
            "log": str(self.last_log) if self.last_log else None,
            "startup_seconds": round(self.startup_seconds, 2) if self.startup_seconds else None,
            "last_error": self.last_error,
            "last_eviction": self.last_eviction,
        }
