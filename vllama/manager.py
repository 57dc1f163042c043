"""The daemon's core: one owner per model (`instance.py`) and the parts they share — names (`registry.py`),
room on the devices (`placement.py`, executing the pure `scheduler.py`), the engine operations (`driver.py`)
and the keep-alive ladder (`keep_alive.py`). The manager wires them, admits requests, answers the admin
commands and shuts everything down.

No lock anywhere: a request to a running model takes none and never awaits; everything else is a command to a
model's owner, whose answer is awaited (see the invariants in `instance.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from vllama import engine as eng
from vllama import scheduler
from vllama.config import GIB, KeepAlive, ModelConfig, ModelsFile, Settings
from vllama.driver import Driver, VllmDriver
from vllama.errors import Conflict, ModelUnavailable
from vllama.gpu import GpuProbe
from vllama.instance import Instance, Reservation, State
from vllama.keep_alive import KeepAliveLoop, expires_at, ladder_for
from vllama.lora import LoraRegistry
from vllama.metrics import Metrics
from vllama.model_access import StartBackoff
from vllama.placement import Placement, default_host_budget
from vllama.pool import WarmPool, default_pool_size
from vllama.registry import Registry
from vllama.sizing import Sizing, size_model

log = logging.getLogger("vllama")

_DEFAULT_CUDA_UTILIZATION = 0.9  # vLLM's own default


class Manager:
    def __init__(
        self,
        settings: Settings,
        probe: GpuProbe,
        *,
        clock: Callable[[], float] = time.monotonic,
        driver: Driver | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.clock = clock
        self._http: aiohttp.ClientSession | None = None
        self._keep_alive_task: asyncio.Task[None] | None = None
        self.last_eviction: str | None = None
        self.evictions = 0
        # the last evictions (capacity and keep-alive), newest last, for `ps`, `info` and the status page
        self.recent_evictions: deque[dict[str, Any]] = deque(maxlen=50)
        self.metrics = Metrics()
        self.metrics.bind(self)
        self.loras = LoraRegistry(self.metrics, wait_timeout=settings.capacity_wait)  # adapters per base (lora.py)
        self.started_at = time.time()
        self.closing = False
        self._background: set[asyncio.Task[Any]] = set()
        # processes found at start-up at our children's addresses that this vllama did not start (engine.find_strays)
        self.strays: list[dict[str, Any]] = []
        self._sizing_cache: dict[tuple[str, str, int], tuple[float, Sizing]] = {}
        # pre-imported vLLM interpreters that cold starts are handed to (vllama/pool.py)
        self.pool = WarmPool(
            size=settings.pool_size if settings.pool_size is not None else default_pool_size(),
            logs_dir=settings.logs_dir,
            stop_grace=settings.stop_timeout,
            device_kind=probe.kind,
            fork=settings.pool_fork,
            modules=settings.pool_modules,
            cuda_ids=probe.cuda_ids,  # spares see only vllama's GPUs
        )
        self.registry = Registry(settings, self._new_instance)
        self.start_backoff = StartBackoff(settings.start_backoff)  # no retry storm of a failing start
        host_budget = (
            int(settings.host_memory_gib * GIB) if settings.host_memory_gib is not None else default_host_budget()
        )
        self.placement = Placement(
            settings,
            probe,
            self.registry,
            self.need_for,
            self.demand_for,
            self._capacity_eviction,
            host_budget=host_budget,
        )
        self.keep_alive = KeepAliveLoop(settings, self.registry, self.placement, self._record_eviction)
        self.driver: Driver = driver or VllmDriver(
            settings, probe, self.pool, lambda: self.http, self._taken, self._sizing_of
        )

    def _new_instance(self, name: str, cfg: ModelConfig) -> Instance:
        return Instance(
            name,
            cfg,
            host=self,
            transition_timeout=self.settings.transition_timeout,
            stop_grace=self.settings.stop_timeout,
            clock=self.clock,
        )

    # --- lifecycle of the manager itself ---------------------------------------------------------------------

    async def open(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.registry.load_config(strict=True)
        if self.settings.child_transport == "uds":
            run_dir = self.settings.run_dir
            if eng.private_dir(run_dir):
                log.warning("the children's socket folder %s was open to other users: its mode is now 0700", run_dir)
            if run_dir.parent != self.settings.home.expanduser().absolute():
                log.info("children's sockets are in %s (a socket path under %s would be too long)", run_dir,
                         self.settings.home)  # fmt: skip
            for path in await asyncio.to_thread(eng.remove_leftover_sockets, run_dir):
                log.info("removed the leftover socket %s (nothing answers on it)", path)
            self.strays = await asyncio.to_thread(eng.find_strays, run_dir=run_dir)
            where = f"vllama's socket folder {run_dir}"
        else:
            self.strays = await asyncio.to_thread(eng.find_strays, port_range=self.settings.port_range)
            where = "vllama's port range {}-{}".format(*self.settings.port_range)
        for stray in self.strays:
            log.warning(
                "stray process at %s (not started by this vllama; left alone, its address is skipped): pid %s, %s, "
                "%s: %s",
                where,
                stray["pid"],
                stray["socket"] or f"port {stray['port']}",
                stray["kind"],
                stray["cmdline"],
            )
        self._http = eng.child_session()
        self._keep_alive_task = asyncio.get_running_loop().create_task(self.keep_alive.run_forever())
        self.pool.want_models(self.models.models, self.settings, self.probe.supports_sleep)
        self.background(asyncio.get_running_loop().create_task(self.pool.fill()))

    async def close(self) -> None:
        """Let in-flight requests finish (bounded), then stop every child."""
        self.closing = True
        if self._keep_alive_task:
            self._keep_alive_task.cancel()
        deadline = self.clock() + self.settings.shutdown_grace
        while any(i.in_flight for i in self.instances.values()) and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # a bounded poll across every instance
        await asyncio.gather(*(i.close() for i in self.instances.values()), self.pool.close())
        if self._http:
            await self._http.close()

    def background(self, task: asyncio.Task[Any]) -> None:
        """Keep a fire-and-forget task alive; its errors are recorded on the instance, not raised."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the manager is not open")
        return self._http

    # --- names (registry.py) -------------------------------------------------------------------------------

    @property
    def instances(self) -> dict[str, Instance]:
        return self.registry.instances

    @property
    def models(self) -> ModelsFile:
        return self.registry.models

    @property
    def config_error(self) -> str | None:
        return self.registry.config_error

    def load_config(self) -> None:
        self.registry.load_config()

    def resolve(self, name: object) -> tuple[str, ModelConfig]:
        return self.registry.resolve(name)

    def instance(self, name: object) -> Instance:
        return self.registry.instance(name)

    # --- requests ------------------------------------------------------------------------------------------

    async def acquire(self, name: object) -> Instance:
        """A running instance of `name` with one request counted in flight (the caller releases it)."""
        inst = self.instance(name)
        if inst.try_acquire():  # the hot path: no await
            return inst
        if self.closing:
            raise ModelUnavailable("vllama is shutting down")
        waited_from = time.perf_counter()
        try:
            await inst.bring_up_and_acquire()
            return inst
        finally:
            self.metrics.observe_wait(inst.name, time.perf_counter() - waited_from)

    # --- what owners ask of the rest (instance.Host) -------------------------------------------------------

    async def make_room(self, inst: Instance, waking: bool) -> Reservation:
        return await self.placement.make_room(inst, waking)

    def room_without_eviction(self, inst: Instance) -> Reservation | None:
        return self.placement.room_without_eviction(inst)

    async def start_engine(self, inst: Instance, on_spawn: Callable[[eng.EngineProcess], None]) -> eng.EngineProcess:
        return await self.driver.start(inst, on_spawn)

    async def sleep_engine(self, engine: eng.EngineProcess, level: int) -> int:
        await self.driver.sleep(engine, level)
        return self.placement.held_by(engine.pid)

    async def wake_engine(self, engine: eng.EngineProcess, level: int, served_name: str) -> None:
        await self.driver.wake(engine, level, served_name)

    async def stop_engine(self, engine: eng.EngineProcess) -> None:
        await self.driver.stop(engine)

    async def engine_alive(self, engine: eng.EngineProcess) -> bool:
        return await self.driver.alive(engine)

    def host_bytes_at_l1(self, inst: Instance) -> int:
        return self.placement.host_bytes_at_l1(inst)

    def observe(self, inst: Instance, operation: str, seconds: float, ok: bool) -> None:
        self.metrics.observe_operation(inst.name, operation, seconds, ok)

    def changed(self) -> None:
        self.placement.changed()

    def check_start_backoff(self, inst: Instance) -> None:
        self.start_backoff.check(inst.name, self.clock())

    def record_start(self, inst: Instance, ok: bool) -> None:
        self.start_backoff.record(inst.name, failed=not ok, message=inst.last_error, now=self.clock())

    def _taken(self) -> set[int | Path]:
        """Ports and sockets of our children and of strays: a new launch picks another."""
        taken: set[int | Path] = set()
        for engine in (i.engine for i in self.instances.values()):
            if engine is not None:
                taken.add(engine.spec.uds or engine.port or 0)
        for stray in self.strays:
            taken.add(Path(stray["socket"]) if stray["socket"] else int(stray["port"] or 0))
        return taken

    def _sizing_of(self, inst: Instance) -> Sizing | None:
        return self.sizing_for(inst.name, inst.cfg, self._device_total(inst.devices))

    def _capacity_eviction(self, victim: Instance, action: str, for_model: str) -> None:
        message = f"{victim.name} {_ACTIONS[action]} at {time.strftime('%H:%M:%S')} to make room for {for_model}"
        self._record_eviction(victim, action, "capacity", message)
        self.last_eviction = message
        self.evictions += 1

    def _record_eviction(self, inst: Instance, action: str, reason: str, message: str) -> None:
        """Remember a sleep or stop vllama decided by itself (`reason`: capacity, keep_alive, request,
        host_memory)."""
        inst.last_eviction = message
        self.recent_evictions.append(
            {"time": time.time(), "model": inst.name, "action": action, "reason": reason, "message": message}
        )
        self.metrics.observe_eviction(inst.name, reason, action)
        log.info("eviction: %s", message)

    # --- admin operations ----------------------------------------------------------------------------------

    async def start(self, name: str) -> dict[str, object]:
        """Start or wake `name` (at once, even while requests back off after a failed start); its `ps` row once
        running."""
        return await self.instance(name).bring_up(backoff=False)

    async def stop(self, name: str) -> dict[str, object]:
        """Stop `name` after its in-flight requests (Conflict if they do not finish); its row once stopped."""
        inst = self.instance(name)
        stopped, snapshot = await inst.stop(self.settings.drain_timeout)
        if not stopped:
            raise Conflict(f"{inst.name} still has {inst.in_flight} request(s) in flight; try again later")
        return snapshot

    async def sleep(self, name: str, level: int) -> tuple[dict[str, object], str]:
        """Sleep at level 1/2, or stop for 3. Without sleep mode (CPU), 1 and 2 fall back to a stop, said."""
        inst = self.instance(name)
        if level in (1, 2) and not self.probe.supports_sleep:
            note = f"this engine has no sleep mode ({self.probe.kind} build): stopped instead (level 3)"
            return await self.stop(name), note
        if level == 2 and inst.cfg.lora_enabled:
            note = "a model with LoRA cannot wake from sleep level 2 (vLLM 0.26's reload_weights): stopped instead"
            return await self.stop(name), note
        if level == 3:
            return await self.stop(name), ""
        if inst.state is State.SLEEPING and inst.sleep_level == level:
            return inst.snapshot(), "already asleep at that level"
        asleep, snapshot = await inst.sleep(level, self.settings.drain_timeout)
        if not asleep:
            raise Conflict(f"{inst.name} still has {inst.in_flight} request(s) in flight; try again later")
        return snapshot, ""

    # --- keep-alive (keep_alive.py) ------------------------------------------------------------------------

    async def apply_keep_alive(self) -> None:
        await self.keep_alive.run_once()

    def keep_alive_for(self, inst: Instance) -> KeepAlive:
        return ladder_for(inst, self.settings)

    def expires_at(self, inst: Instance) -> float | None:
        return expires_at(inst, self.settings, self.probe.supports_sleep)

    # --- memory --------------------------------------------------------------------------------------------

    def memory_view(self) -> tuple[list[scheduler.DeviceMemory], list[scheduler.Resident]]:
        return self.placement.memory_view()

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
            tp=cfg.device_count,
            sequences=cfg.auto_memory_sequences or self.settings.auto_memory_sequences,
            device_total=total,
            device_kind=self.probe.kind,
            lora=eng.lora_launch(cfg),
        )
        if len(self._sizing_cache) > 256:
            self._sizing_cache.clear()
        self._sizing_cache[key] = (time.monotonic(), sized)
        return sized

    def demand_for(self, inst: Instance, devices: tuple[int, ...] | None, waking: bool) -> scheduler.Demand:
        """What `inst` needs on each candidate device. A fraction (gpu_memory_utilization, or vLLM's default)
        stays a fraction, which the policy applies to each device's own total; bytes (gpu_memory_gib, an
        auto-sizing estimate, a sleeper's memory) stay bytes."""
        tp = inst.cfg.device_count
        if waking:
            return scheduler.Demand(
                name=inst.name, need=inst.need, tp=tp, devices=devices, held=inst.asleep_held, waking=True
            )
        totals = {d.index: d.total for d in self.probe.devices()}
        candidates = devices if devices is not None else tuple(totals)
        largest = max(totals.get(d, 0) for d in candidates) if candidates else 0
        need, util = self.need_for(inst.cfg, largest, inst.name)
        sized = self.sizing_for(inst.name, inst.cfg, largest)
        in_bytes = inst.cfg.gpu_memory_gib is not None or (sized is not None and sized.estimate is not None)
        fraction = util if self.probe.kind == "cuda" and not in_bytes else None
        return scheduler.Demand(name=inst.name, need=need, tp=tp, devices=devices, fraction=fraction)

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

    # --- views ---------------------------------------------------------------------------------------------

    def devices_snapshot(self) -> list[dict[str, Any]]:
        view, _ = self.memory_view()
        raw = {d.index: d for d in self.probe.devices()}
        return [
            {
                "index": d.index,
                "name": raw[d.index].name,
                "uuid": raw[d.index].uuid,  # which GPU of the host this is
                "nvml_index": raw[d.index].physical,
                "kind": self.probe.kind,
                "total_bytes": d.total,
                "free_bytes": raw[d.index].free,
                "available_bytes": d.free,
                "models": [i.name for i in self.instances.values() if d.index in i.devices and i.reserved()],
            }
            for d in view
        ]

    def host_memory(self) -> dict[str, int]:
        """The host budget for level-1 sleepers' weights, what they hold and what is left."""
        budget = self.placement.host_budget
        free = self.placement.host_free()
        return {"budget_bytes": budget, "l1_bytes": budget - free, "free_bytes": free}

    def live_strays(self) -> list[dict[str, Any]]:
        """The strays found at start-up that are still there (for `info`)."""
        self.strays = [s for s in self.strays if s["pid"] is None or psutil.pid_exists(s["pid"])]
        return self.strays

    def ps(self) -> list[dict[str, Any]]:
        measured = self.placement.measured_by_instance()
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
            snap["adapters"] = self.loras.snapshot(inst.name, inst.cfg, inst.engine)
            out.append(snap)
        return out


_ACTIONS = {"sleep_l1": "put to sleep (level 1)", "sleep_l2": "put to sleep (level 2)", "stop": "stopped"}
