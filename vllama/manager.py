"""The registry of model instances: resolves names, brings models up (start or wake) with room made by the
pure policy in `scheduler.py`, runs the keep-alive ladder, and stops everything on shutdown.

Locks, always taken in this order (never the reverse), so there is no deadlock:
  1. an instance's own `lock` (one lifecycle operation per model at a time);
  2. on GPUs, the load lock of each device the model goes on (sorted): vLLM measures free memory while it
     initialises, so two loads on one GPU would corrupt each other's sizing; held until the load is ready;
  3. `placement_lock`: held only while a plan is made and executed (evictions take ~0.1–2 s) and the chosen
     start or wake is reserved. Victims' locks are only ever *tried*: a victim that is busy is skipped.
A request to a running model takes none of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil

from vllama import engine as eng
from vllama import scheduler
from vllama.config import GIB, KeepAlive, ModelConfig, ModelsFile, Settings, load_models_file
from vllama.errors import ConfigError, Conflict, ModelNotFound, ModelUnavailable, NoCapacity
from vllama.gpu import GpuProbe
from vllama.instance import Instance, State
from vllama.lora import LoraRegistry  # LORA(issue 17)
from vllama.metrics import Metrics
from vllama.pool import WarmPool
from vllama.sizing import Sizing, size_model

log = logging.getLogger("vllama")
T = TypeVar("T")

_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEFAULT_CUDA_UTILIZATION = 0.9  # vLLM's own default
PORT_RETRIES = 3  # launches again on another port when the picked one was taken before vLLM bound it


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("TRANSFORMERS_CACHE"):
        return Path(os.environ["TRANSFORMERS_CACHE"])
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def cached_hf_models() -> list[str]:
    """Hugging Face ids present in the local hub cache (`models--org--name`)."""
    root = hf_cache_dir()
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--") :].replace("--", "/") for p in root.glob("models--*") if p.is_dir())


def _is_local_path(name: str) -> bool:
    """An absolute or ~ path that exists (a request may name any string: "~nobody", NUL bytes...)."""
    if not name.startswith(("/", "~")):
        return False
    try:
        return Path(name).expanduser().exists()
    except (RuntimeError, ValueError, OSError):  # no such user's home, an embedded NUL, a name too long
        return False


class Manager:
    def __init__(self, settings: Settings, probe: GpuProbe, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.probe = probe
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self.placement_lock = asyncio.Lock()
        self._device_locks: dict[int, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._keep_alive_task: asyncio.Task[None] | None = None
        self._models = ModelsFile()
        self._models_mtime: float | None = None
        self.config_error: str | None = None
        self.last_eviction: str | None = None
        self.evictions = 0
        # the last evictions (capacity and keep-alive), newest last, for `ps`, `info` and the status page
        self.recent_evictions: deque[dict[str, Any]] = deque(maxlen=50)
        self.metrics = Metrics()
        self.metrics.bind(self)
        self.loras = LoraRegistry(self.metrics, wait_timeout=settings.capacity_wait)  # LORA(issue 17)
        self.started_at = time.time()
        self.closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._launching: dict[str, int] = {}  # model → the port picked for its launch in progress
        # processes found at start-up on our port range that this vllama did not start (see engine.find_strays)
        self.strays: list[dict[str, Any]] = []
        # pre-imported vLLM interpreters that cold starts are handed to (vllama/pool.py)
        self._sizing_cache: dict[tuple[str, str, int], tuple[float, Sizing]] = {}
        self.pool = WarmPool(
            size=settings.pool_size,
            logs_dir=settings.logs_dir,
            stop_grace=settings.stop_timeout,
            device_kind=probe.kind,
            fork=settings.pool_fork,
            modules=settings.pool_modules,
        )

    # --- lifecycle of the manager itself ---------------------------------------------------------------------

    async def open(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.load_config(strict=True)
        self.strays = await asyncio.to_thread(eng.find_strays, self.settings.port_range)
        for stray in self.strays:
            log.warning(
                "stray process on vllama's port range %d-%d (not started by this vllama; left alone, its port is "
                "skipped): pid %s, port %s, %s: %s",
                *self.settings.port_range,
                stray["pid"],
                stray["port"],
                stray["kind"],
                stray["cmdline"],
            )
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._keep_alive_task = asyncio.get_running_loop().create_task(self._keep_alive_loop())
        self.pool.want_models(self._models.models, self.settings, self.probe.supports_sleep)
        self.background(asyncio.get_running_loop().create_task(self.pool.fill()))

    async def close(self) -> None:
        """Let in-flight requests finish (bounded), then stop every child."""
        self.closing = True
        if self._keep_alive_task:
            self._keep_alive_task.cancel()
        deadline = self.clock() + self.settings.shutdown_grace
        while any(i.in_flight for i in self.instances.values()) and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # a bounded poll across every instance
        await asyncio.gather(*(self._stop_for_shutdown(i) for i in self.instances.values()), self.pool.close())
        if self._http:
            await self._http.close()

    async def _stop_for_shutdown(self, inst: Instance) -> None:
        engine = inst.engine
        if engine is not None:
            inst.engine = None
            await eng.terminate(engine, self.settings.stop_timeout)

    def background(self, task: asyncio.Task[Any]) -> None:
        """Keep a fire-and-forget task alive; its errors are recorded on the instance, not raised."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "manager not opened"
        return self._http

    # --- configuration -------------------------------------------------------------------------------------

    def load_config(self, *, strict: bool = False) -> None:
        """(Re)load models.yaml when it changed. At start-up a bad file is fatal; later, the last good
        configuration stays and the error is reported in `info`."""
        path = self.settings.models_path
        try:
            mtime = path.stat().st_mtime if path.exists() else None
        except OSError:
            mtime = None
        if mtime == self._models_mtime and not strict:
            return
        try:
            models = load_models_file(path)
        except ConfigError as exc:
            if strict:
                raise
            self.config_error = str(exc)
            self._models_mtime = mtime
            log.error("keeping the last good configuration: %s", exc)
            return
        self._models, self._models_mtime, self.config_error = models, mtime, None
        for name, inst in self.instances.items():
            inst.cfg = models.get(name) or ModelConfig()

    @property
    def models(self) -> ModelsFile:
        self.load_config()
        return self._models

    def resolve(self, name: object) -> tuple[str, ModelConfig]:
        """The canonical name and config for a requested model name, or ModelNotFound."""
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound('request has no model name: set "model" to one of GET /v1/models', param="model")
        models = self.models
        canonical = models.canonical(name)
        cfg = models.get(canonical)
        if cfg is not None:
            return canonical, cfg
        if canonical in self.instances:
            return canonical, self.instances[canonical].cfg
        if _HF_ID.match(name) or _is_local_path(name):
            return name, ModelConfig()
        known = ", ".join(sorted(models.models)) or "none configured"
        raise ModelNotFound(
            f"model {name!r} is not configured in {self.settings.models_path}, is not a local path and not a "
            f"Hugging Face id (org/name). Configured models: {known}",
            param="model",
        )

    def instance(self, name: object) -> Instance:
        canonical, cfg = self.resolve(name)
        inst = self.instances.get(canonical)
        if inst is None:
            inst = Instance(canonical, cfg, http=self.http, on_change=self._notify, clock=self.clock)
            self.instances[canonical] = inst
        return inst

    def _notify(self) -> None:
        """Something that may free memory happened: wake everyone waiting for room."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- requests ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: object) -> AsyncIterator[Instance]:
        """A running instance with one in-flight request counted for the duration of the block."""
        inst = await self.acquire(name)
        try:
            yield inst
        finally:
            inst.release()

    async def acquire(self, name: object) -> Instance:
        inst = self.instance(name)
        if inst.try_acquire():  # the hot path: no lock, no await
            return inst
        if self.closing:
            raise ModelUnavailable("vllama is shutting down")
        waited_from = time.perf_counter()
        try:
            return await self._acquire_slow(inst)
        finally:
            self.metrics.observe_wait(inst.name, time.perf_counter() - waited_from)

    async def _acquire_slow(self, inst: Instance) -> Instance:
        attempts_seen = inst.failed_attempts
        async with inst.lock:
            if inst.try_acquire():
                return inst
            if inst.state is State.ERROR and inst.failed_attempts != attempts_seen and inst.last_error:
                # the attempt we waited for failed: share its error instead of retrying once per waiter
                raise ModelUnavailable(inst.last_error)
            await self._bring_up(inst)
            if not inst.try_acquire():
                raise ModelUnavailable(inst.last_error or f"{inst.name} is {inst.state.value}")
            return inst

    async def _bring_up(self, inst: Instance) -> None:
        """Start or wake `inst` (its lock held), making room first."""
        waking = inst.state is State.SLEEPING
        if not waking and inst.state not in (State.STOPPED, State.ERROR):
            raise ModelUnavailable(f"{inst.name} is {inst.state.value}")
        devices = inst.devices if waking else (tuple(inst.cfg.devices) if inst.cfg.devices else None)
        if devices is None:
            devices = await self._choose_devices(inst)
        async with self._load_locks(devices):
            await self._make_room_and_reserve(inst, devices, waking)
            if waking:
                level = inst.sleep_level  # LORA(issue 17)
                await self._observed(inst, "wake", inst.finish_wake(self.settings.stop_timeout))
                if level == 2 and inst.engine is not None:  # LORA(issue 17): no await before this line
                    await self.loras.reload_after_wake(inst.name, inst.engine, self.http)  # LORA(issue 17)
                self._measure_asleep_held_later(inst)
            else:
                await self._observed(inst, "start", self._launch(inst))

    def _pick_port(self, avoid: list[int]) -> int:
        """A free port of the range that no instance (running or being launched) and no stray has."""
        taken = {i.engine.port for i in self.instances.values() if i.engine is not None}
        taken |= set(self._launching.values()) | {int(s["port"]) for s in self.strays if s["port"]}
        return eng.pick_port(self.settings.port_range, taken | set(avoid))

    async def _launch(self, inst: Instance) -> None:
        tried: list[int] = []

        def spec_on_a_free_port() -> eng.LaunchSpec:
            port = self._pick_port(tried)
            tried.append(port)
            self._launching[inst.name] = port  # picked but not bound yet: no concurrent launch may pick it
            spec = eng.build_launch(
                name=inst.name,
                cfg=inst.cfg,
                vllm_command=self.settings.vllm_command,
                port=port,
                devices=inst.devices,
                device_kind=self.probe.kind,
                gpu_memory_utilization=inst.gpu_memory_utilization,
                logs_dir=self.settings.logs_dir,
                sleep_mode=self.probe.supports_sleep,
            )
            # memory auto-sizing: vLLM's KV cache gets exactly the estimated size (vllama/sizing.py)
            sized = self.sizing_for(inst.name, inst.cfg, self._device_total(inst.devices))
            if sized is not None and sized.estimate is not None:
                # on the CPU build VLLM_CPU_KVCACHE_SPACE (vllama's default 1 GiB) would override the flag
                env = {k: v for k, v in spec.env.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
                spec = dataclasses.replace(spec, argv=[*spec.argv, *sized.extra_args()], env=env)
            return spec

        def respawn(failed: eng.LaunchSpec) -> eng.LaunchSpec | None:
            """Another process took the port between the pick and vLLM's bind: try another one (bounded)."""
            if len(tried) > PORT_RETRIES:
                return None
            try:
                spec = spec_on_a_free_port()
            except eng.EngineError:
                return None
            log.warning("%s: port %d was taken by another process; trying port %d", inst.name, failed.port, spec.port)
            return spec

        try:
            spec = spec_on_a_free_port()
        except eng.EngineError as exc:
            inst.abort_start(str(exc))
            raise ModelUnavailable(str(exc)) from None
        log.info(
            "starting %s on devices %s, port %d (log: %s)", inst.name, list(inst.devices), spec.port, spec.log_path
        )
        timeout = inst.cfg.startup_timeout or self.settings.startup_timeout
        prefix = inst.cfg.vllm_command or self.settings.vllm_command
        try:
            await inst.launch(
                spec,
                startup_timeout=timeout,
                stop_grace=self.settings.stop_timeout,
                respawn=respawn,
                spawner=lambda spec, grace: self.pool.spawn(
                    spec, prefix=prefix, stop_grace=grace, prewarm=inst.cfg.prewarm
                ),
            )
        finally:
            self._launching.pop(inst.name, None)
        log.info("%s ready in %.1f s", inst.name, inst.startup_seconds or 0)

    async def _observed(self, inst: Instance, operation: str, step: Awaitable[T]) -> T:
        """Await a lifecycle operation on `inst`, counting it and timing it in the metrics. An operation that
        answers False (in-flight requests did not finish in time) did nothing and is not counted."""
        t0 = time.perf_counter()
        try:
            result = await step
        except BaseException:
            self.metrics.observe_operation(inst.name, operation, time.perf_counter() - t0, False)
            raise
        if result is not False:
            ok = inst.state is not State.ERROR
            self.metrics.observe_operation(inst.name, operation, time.perf_counter() - t0, ok)
        return result

    def _record_eviction(self, inst: Instance, *, action: str, reason: str, message: str) -> None:
        """Remember a sleep or stop vllama decided by itself (`reason`: capacity, keep_alive, request)."""
        inst.last_eviction = message
        self.recent_evictions.append(
            {"time": time.time(), "model": inst.name, "action": action, "reason": reason, "message": message}
        )
        self.metrics.observe_eviction(inst.name, reason, action)

    @contextlib.asynccontextmanager
    async def _load_locks(self, devices: tuple[int, ...]) -> AsyncIterator[None]:
        if self.probe.kind != "cuda":  # the CPU build sizes its KV cache from a setting, not free memory
            yield
            return
        locks = [self._device_locks.setdefault(d, asyncio.Lock()) for d in sorted(devices)]
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(lock)
            yield

    # --- memory --------------------------------------------------------------------------------------------

    def sizing_for(self, name: str, cfg: ModelConfig, total: int) -> Sizing | None:
        """Memory auto-sizing of a model (`memory: auto`, or VLLAMA_AUTO_MEMORY=1 without an explicit memory
        setting); None where it does not apply. An estimate is remembered for a minute."""
        if cfg.gpu_memory_utilization is not None or cfg.gpu_memory_gib is not None or total <= 0:
            return None
        if cfg.memory != "auto" and not (self.settings.auto_memory and cfg.memory is None):
            return None
        if self.probe.kind == "cpu" and "VLLM_CPU_KVCACHE_SPACE" in {**os.environ, **cfg.env}:
            return Sizing(None, "auto memory: VLLM_CPU_KVCACHE_SPACE is set and sizes the KV cache: default rule used")
        key = (name, cfg.model_dump_json(), total)
        cached = self._sizing_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < 60.0:
            return cached[1]
        sized = size_model(
            cfg.source or name,
            extra_args=cfg.extra_args,
            max_model_len=cfg.max_model_len,
            tp=cfg.tp,
            sequences=cfg.auto_memory_sequences or self.settings.auto_memory_sequences,
            device_total=total,
            device_kind=self.probe.kind,
            lora=eng.lora_launch(cfg),  # LORA(issue 17)
        )
        if len(self._sizing_cache) > 256:
            self._sizing_cache.clear()
        self._sizing_cache[key] = (time.monotonic(), sized)
        return sized

    def _device_total(self, devices: tuple[int, ...]) -> int:
        totals = [d.total for d in self.probe.devices() if d.index in devices]
        return min(totals) if totals else 0

    def need_for(self, cfg: ModelConfig, total: int, name: str | None = None) -> tuple[int, float | None]:
        """(bytes needed free on each device, the utilization fraction to give vLLM)."""
        sized = self.sizing_for(name or cfg.source or "", cfg, total) if (name or cfg.source) else None
        if sized is not None and sized.estimate is not None:
            return sized.need, (sized.utilization(total) if self.probe.kind == "cuda" else None)
        if cfg.gpu_memory_gib is not None:
            need = int(cfg.gpu_memory_gib * GIB)
            return need, min(need / total, 1.0)
        if self.probe.kind == "cpu":
            util = cfg.gpu_memory_utilization
            return (int(util * total) if util else int(self.settings.cpu_default_model_gib * GIB)), None
        util = cfg.gpu_memory_utilization or _DEFAULT_CUDA_UTILIZATION
        return int(util * total), util

    def memory_view(self) -> tuple[list[scheduler.DeviceMemory], list[scheduler.Resident]]:
        """The devices' free memory (measured, less what loading instances reserved but have not taken yet)
        and every instance that holds memory, for the policy."""
        devices = self.probe.devices()
        measured = self._measured_by_instance()
        reserved = {d.index: 0 for d in devices}
        residents = []
        for inst in self.instances.values():
            if inst.state in (State.STOPPED, State.ERROR) and inst.engine is None:
                continue
            held_now = max([inst.reserved(), *measured.get(inst.name, {}).values()])
            for d in inst.devices:
                if d in reserved:
                    reserved[d] += max(inst.reserved(), measured.get(inst.name, {}).get(d, 0))
            busy = inst.lock.locked() or inst.state not in (State.RUNNING, State.SLEEPING)
            residents.append(
                scheduler.Resident(
                    name=inst.name,
                    phase="busy" if busy else ("running" if inst.state is State.RUNNING else "sleeping"),
                    devices=inst.devices,
                    held=held_now,
                    asleep_held=inst.asleep_held or int(self.settings.sleep_residual_gib * GIB),
                    last_used=inst.last_used,
                    in_flight=inst.in_flight,
                    pinned=inst.cfg.pinned,
                    evict_level=inst.cfg.sleep_level,
                )
            )
        view = [
            scheduler.DeviceMemory(d.index, d.total, max(0, min(d.free, d.total - reserved[d.index]))) for d in devices
        ]
        return view, residents

    def _measured_by_instance(self) -> dict[str, dict[int, int]]:
        per_pid = self.probe.process_memory()
        if not per_pid:
            return {}
        # each child's process group is led by its guard: map the few GPU-holding pids to groups, rather than
        # scanning every process of the machine (this runs on the event loop, during placements)
        by_group = {inst.engine.pid: inst.name for inst in self.instances.values() if inst.engine is not None}
        out: dict[str, dict[int, int]] = {}
        for pid, per_device in per_pid.items():
            try:
                name = by_group.get(os.getpgid(pid))
            except OSError:
                continue
            if name is not None:
                mine = out.setdefault(name, {})
                for d, n in per_device.items():
                    mine[d] = mine.get(d, 0) + n
        return out

    def _demand(self, inst: Instance, devices: tuple[int, ...] | None, waking: bool) -> scheduler.Demand:
        totals = {d.index: d.total for d in self.probe.devices()}
        candidates = devices if devices is not None else tuple(totals)
        need, _ = self.need_for(inst.cfg, max(totals.get(d, 0) for d in candidates) if candidates else 0, inst.name)
        if waking:
            need = inst.need
        return scheduler.Demand(
            name=inst.name,
            need=need,
            tp=inst.cfg.tp,
            devices=devices,
            held=inst.asleep_held if waking else 0,
        )

    async def _choose_devices(self, inst: Instance) -> tuple[int, ...]:
        async with self.placement_lock:
            devices, residents = self.memory_view()
            plan = scheduler.plan_placement(
                devices, residents, self._demand(inst, None, False), can_sleep=self.probe.supports_sleep
            )
        if isinstance(plan, scheduler.Placement):
            return plan.devices
        if not plan.wait:
            raise NoCapacity(plan.reason)
        # everything is busy: wait on the devices a fixed-device plan would use, the first combination
        return tuple(sorted(d.index for d in devices)[: inst.cfg.tp])

    async def _make_room_and_reserve(self, inst: Instance, devices: tuple[int, ...], waking: bool) -> None:
        """Evict (one step at a time, re-reading real memory after each) until `inst` fits on `devices`, then
        reserve its memory. Waits while only busy models stand in the way, up to `capacity_wait`."""
        deadline = self.clock() + self.settings.capacity_wait
        while True:
            changed = self._changed
            async with self.placement_lock:
                device_view, residents = self.memory_view()
                demand = self._demand(inst, devices, waking)
                plan = scheduler.plan_placement(device_view, residents, demand, can_sleep=self.probe.supports_sleep)
                if isinstance(plan, scheduler.Placement):
                    if not plan.evictions:
                        if waking:
                            inst.begin_wake()
                        else:
                            total = min(d.total for d in device_view if d.index in devices)
                            _, util = self.need_for(inst.cfg, total, inst.name)
                            inst.reserve_start(devices, demand.need, util)
                        return
                    wanted = {d: demand.need - demand.held for d in devices}
                    await self._evict(plan.evictions[0], for_model=inst.name, wanted=wanted)
                    continue
                if not plan.wait:
                    inst.last_error = plan.reason
                    raise NoCapacity(plan.reason)
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise NoCapacity(f"gave up after waiting {self.settings.capacity_wait:.0f} s: {plan.reason}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))

    async def _evict(self, eviction: scheduler.Eviction, *, for_model: str, wanted: dict[int, int]) -> None:
        """Run one eviction of a plan, then wait for the memory to show up (or for `wanted`, the free bytes
        the model being placed needs per device, to be there)."""
        victim = self.instances.get(eviction.name)
        if victim is None or victim.lock.locked() or victim.in_flight:
            return  # became busy since the plan was made: the next plan will see it
        before = self._free_on(victim.devices)
        held_before = self._measured_by_instance().get(victim.name, {})
        async with victim.lock:
            if victim.in_flight:
                return
            if eviction.level in (1, 2) and victim.state is State.RUNNING:
                done = await self._observed(victim, "sleep", victim.sleep(eviction.level, drain_timeout=0))
                what, action = f"put to sleep (level {eviction.level})", f"sleep_l{eviction.level}"
                self._measure_asleep_held_later(victim)
            else:
                stop = victim.stop(drain_timeout=0, stop_grace=self.settings.stop_timeout)
                done = await self._observed(victim, "stop", stop)
                what, action = "stopped", "stop"
        if not done:
            return
        reason = f"{victim.name} {what} at {time.strftime('%H:%M:%S')} to make room for {for_model}"
        self._record_eviction(victim, action=action, reason="capacity", message=reason)
        self.last_eviction = reason
        self.evictions += 1
        log.info("eviction: %s", reason)
        expected = eviction.frees
        if victim.state is State.SLEEPING and victim.asleep_held and held_before:
            # the plan guessed what a sleeper keeps (its CUDA context); now it is measured: expect what was
            # really released, not the guess (a guess too low would wait out the settle timeout for nothing)
            expected = max(0, min(held_before.get(d, 0) for d in victim.devices) - victim.asleep_held)
        await self._settle(victim.devices, before, expected, wanted)

    def _free_on(self, devices: tuple[int, ...]) -> dict[int, int]:
        view, _ = self.memory_view()
        return {d.index: d.free for d in view if d.index in devices}

    async def _settle(
        self, devices: tuple[int, ...], before: dict[int, int], expected: int, wanted: dict[int, int]
    ) -> None:
        """Freed GPU memory shows up in NVML with a delay: wait (bounded) until most of it is back, or until
        what the model being placed needs (`wanted`, free bytes per device) is free."""
        deadline = self.clock() + self.settings.memory_settle_timeout
        target = int(expected * 0.9)
        while self.clock() < deadline:
            now = self._free_on(tuple(set(devices) | set(wanted)))
            if all(now.get(d, 0) - before.get(d, 0) >= target for d in devices):
                return
            if all(now.get(d, 0) >= n for d, n in wanted.items()):
                return
            await asyncio.sleep(0.1)
        log.warning("memory on devices %s did not come back in time after an eviction", list(devices))

    def _measure_asleep_held_later(self, inst: Instance) -> None:
        """Remember what this instance really keeps while asleep (its CUDA context), for later plans."""
        measured = self._measured_by_instance().get(inst.name)
        if measured and inst.state is State.SLEEPING:
            inst.asleep_held = max(measured.values())

    # --- admin operations ----------------------------------------------------------------------------------

    async def start(self, name: str) -> Instance:
        inst = self.instance(name)
        async with inst.lock:
            if inst.state is not State.RUNNING:
                await self._bring_up(inst)
        return inst

    async def stop(self, name: str) -> Instance:
        inst = self.instance(name)
        async with inst.lock:
            stop = inst.stop(drain_timeout=self.settings.drain_timeout, stop_grace=self.settings.stop_timeout)
            if not await self._observed(inst, "stop", stop):
                raise Conflict(f"{inst.name} still has {inst.in_flight} request(s) in flight; try again later")
            inst.keep_alive_override = None
        return inst

    async def sleep(self, name: str, level: int) -> tuple[Instance, str]:
        """Sleep at level 1/2, or stop for 3. Without sleep mode (CPU), 1 and 2 fall back to a stop, said."""
        inst = self.instance(name)
        note = ""
        if level in (1, 2) and not self.probe.supports_sleep:
            note = f"this engine has no sleep mode ({self.probe.kind} build): stopped instead (level 3)"
            level = 3
        if level == 3:
            await self.stop(name)
            return inst, note
        async with inst.lock:
            if inst.state is State.SLEEPING and inst.sleep_level == level:
                return inst, "already asleep at that level"
            if inst.state is State.SLEEPING:
                # change of level: wake needs its memory back first, so go through a stop instead
                raise Conflict(f"{inst.name} is asleep at level {inst.sleep_level}; wake it first (vllama start)")
            if inst.state is not State.RUNNING:
                raise Conflict(f"{inst.name} is {inst.state.value}, not running: nothing to put to sleep")
            if not await self._observed(inst, "sleep", inst.sleep(level, drain_timeout=self.settings.drain_timeout)):
                raise Conflict(f"{inst.name} still has {inst.in_flight} request(s) in flight; try again later")
            self._measure_asleep_held_later(inst)
        return inst, note

    # --- keep-alive ----------------------------------------------------------------------------------------

    def keep_alive_for(self, inst: Instance) -> KeepAlive:
        """The ladder `inst` follows: a request's `keep_alive` (Ollama API) wins over models.yaml and the default."""
        return inst.keep_alive_override or inst.cfg.keep_alive or self.settings.keep_alive

    def expires_at(self, inst: Instance) -> float | None:
        """Wall-clock time of the next keep-alive step of `inst` (its next sleep or its stop), if it has one."""
        if inst.cfg.pinned or inst.state not in (State.RUNNING, State.SLEEPING):
            return None
        ka = self.keep_alive_for(inst)
        steps = [ka.stop]
        if inst.state is State.RUNNING and self.probe.supports_sleep:
            steps += [ka.sleep_l1, ka.sleep_l2]  # asleep, the next step down is the stop (see apply_keep_alive)
        due = [s for s in steps if s is not None]
        if not due:
            return None
        return (time.time() if inst.in_flight else inst.last_used_wall) + min(due)

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.keep_alive_interval)
            try:
                await self.apply_keep_alive()
            except Exception:
                log.exception("keep-alive pass failed")

    async def apply_keep_alive(self) -> None:
        for inst in list(self.instances.values()):
            if inst.cfg.pinned or inst.lock.locked() or inst.in_flight:
                continue
            if inst.state not in (State.RUNNING, State.SLEEPING):
                continue
            ka = self.keep_alive_for(inst)
            step = scheduler.keep_alive_step(
                idle_for=inst.idle_for(),
                phase="running" if inst.state is State.RUNNING else "sleeping",
                sleep_level=inst.sleep_level,
                sleep_l1=ka.sleep_l1,
                sleep_l2=ka.sleep_l2,
                stop=ka.stop,
                can_sleep=self.probe.supports_sleep,
            )
            if step is None:
                continue
            async with inst.lock:
                if inst.in_flight:
                    continue
                reason = "keep_alive" if inst.keep_alive_override is None else "request"
                if step == "stop":
                    stop = inst.stop(drain_timeout=0, stop_grace=self.settings.stop_timeout)
                    if not await self._observed(inst, "stop", stop):
                        continue
                    inst.keep_alive_override = None
                elif inst.state is State.RUNNING:
                    level = 1 if step == "sleep_l1" else 2
                    if not await self._observed(inst, "sleep", inst.sleep(level, drain_timeout=0)):
                        continue
                    self._measure_asleep_held_later(inst)
                else:
                    continue  # asleep at L1 already: the next step down is the stop
                message = f"keep-alive: {step} after {inst.idle_for():.0f} s idle"
                if reason == "request":
                    message += " (keep_alive set by a request)"
                action = "stop" if step == "stop" else step
                self._record_eviction(inst, action=action, reason=reason, message=message)
            log.info("keep-alive: %s %s", inst.name, step)

    # --- views ---------------------------------------------------------------------------------------------

    def devices_snapshot(self) -> list[dict[str, Any]]:
        view, _ = self.memory_view()
        raw = {d.index: d for d in self.probe.devices()}
        return [
            {
                "index": d.index,
                "name": raw[d.index].name,
                "kind": self.probe.kind,
                "total_bytes": d.total,
                "free_bytes": raw[d.index].free,
                "available_bytes": d.free,
                "models": [i.name for i in self.instances.values() if d.index in i.devices and i.reserved()],
            }
            for d in view
        ]

    def live_strays(self) -> list[dict[str, Any]]:
        """The strays found at start-up that are still there (for `info`)."""
        self.strays = [s for s in self.strays if s["pid"] is None or psutil.pid_exists(s["pid"])]
        return self.strays

    def ps(self) -> list[dict[str, Any]]:
        measured = self._measured_by_instance()
        out = []
        for inst in self.instances.values():
            snap = inst.snapshot()
            snap["memory_bytes"] = measured.get(inst.name) or {d: inst.reserved() for d in inst.devices}
            snap["keep_alive"] = self.keep_alive_for(inst).model_dump()
            snap["keep_alive_from_request"] = inst.keep_alive_override is not None
            snap["expires_at"] = self.expires_at(inst)
            snap["started_by"] = self.pool.how_started(inst.engine)  # the warm pool, or why a plain spawn
            sized = self.sizing_for(inst.name, inst.cfg, self._device_total(inst.devices or (0,)))
            snap["memory_sizing"] = sized.reason if sized is not None else None
            snap["memory_estimate"] = sized.estimate.as_dict() if sized is not None and sized.estimate else None
            snap["adapters"] = self.loras.snapshot(inst.name, inst.cfg, inst.engine)  # LORA(issue 17)
            out.append(snap)
        return out
