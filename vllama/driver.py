"""The engine operations an owner runs, behind one seam (`Driver`): the real one spawns and drives vLLM
children (`VllmDriver`); deterministic tests replace it with a stub whose operations they release one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

from vllama import engine as eng
from vllama.config import Settings
from vllama.gpu import GpuProbe
from vllama.pool import WarmPool
from vllama.sizing import Sizing

if TYPE_CHECKING:
    from vllama.instance import Instance

log = logging.getLogger("vllama")

# launches again at another address when the picked port (or socket) was taken before vLLM bound it
PORT_RETRIES = 3


class Driver(Protocol):
    async def start(self, inst: Instance, on_spawn: Callable[[eng.EngineProcess], None]) -> eng.EngineProcess:
        """Spawn vLLM for `inst` (its reservation is set: devices, utilization) and wait until it answers.
        `on_spawn` is called with each child as soon as it exists. EngineError (or OSError) on failure; the
        caller kills what was spawned."""
        ...

    async def sleep(self, engine: eng.EngineProcess, level: int) -> None: ...

    async def wake(self, engine: eng.EngineProcess, level: int, served_name: str) -> None:
        """Wake (level-2 aware), then one warm-up request unless `served_name` is empty."""
        ...

    async def stop(self, engine: eng.EngineProcess) -> None: ...

    async def alive(self, engine: eng.EngineProcess) -> bool:
        """Whether the child answers its health check (briefly)."""
        ...


class VllmDriver:
    def __init__(
        self,
        settings: Settings,
        probe: GpuProbe,
        pool: WarmPool,
        http: Callable[[], aiohttp.ClientSession],
        taken: Callable[[], set[int | Path]],
        sizing_for: Callable[[Instance], Sizing | None],
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.pool = pool
        self._http = http
        self._taken = taken
        self._sizing_for = sizing_for
        # model → the port or socket picked for its launch in progress
        self.launching: dict[str, int | Path] = {}

    def _spec(self, inst: Instance, avoid: list[int | Path]) -> eng.LaunchSpec:
        taken = self._taken() | set(self.launching.values()) | set(avoid)
        port: int | None = None
        uds: Path | None = None
        if self.settings.child_transport == "uds":
            uds = eng.pick_socket(self.settings.run_dir, inst.name, taken)
        else:
            port = eng.pick_port(self.settings.port_range, taken)
        self.launching[inst.name] = uds or port or 0  # picked but not bound yet: no concurrent launch may pick it
        spec = eng.build_launch(
            name=inst.name,
            cfg=inst.cfg,
            vllm_command=self.settings.vllm_command,
            port=port,
            uds=uds,
            devices=inst.devices,
            device_kind=self.probe.kind,
            gpu_memory_utilization=inst.gpu_memory_utilization,
            logs_dir=self.settings.logs_dir,
            sleep_mode=self.probe.supports_sleep,
            cuda_ids=self.probe.cuda_ids(inst.devices),  # vllama's device numbers → NVML indices
        )
        # memory auto-sizing: vLLM's KV cache gets exactly the estimated size (vllama/sizing.py)
        sized = self._sizing_for(inst)
        if sized is not None and sized.estimate is not None:
            # on the CPU build VLLM_CPU_KVCACHE_SPACE (vllama's default 1 GiB) would override the flag
            env = {k: v for k, v in spec.env.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
            spec = dataclasses.replace(spec, argv=[*spec.argv, *sized.extra_args()], env=env)
        return spec

    async def start(self, inst: Instance, on_spawn: Callable[[eng.EngineProcess], None]) -> eng.EngineProcess:
        tried: list[int | Path] = []
        http = self._http()
        grace = self.settings.stop_timeout
        timeout = inst.cfg.startup_timeout or self.settings.startup_timeout
        prefix = inst.cfg.vllm_command or self.settings.vllm_command
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            spec = self._spec(inst, tried)
            log.info(
                "starting %s on devices %s at %s (log: %s)", inst.name, list(inst.devices), spec.address, spec.log_path
            )
            while True:
                tried.append(spec.uds or spec.port or 0)
                # the warm pool may hand the start to a pre-imported interpreter (vllama/pool.py)
                engine = await self.pool.spawn(spec, prefix=prefix, stop_grace=grace, prewarm=inst.cfg.prewarm)
                on_spawn(engine)
                try:
                    await eng.wait_ready(engine, http, max(deadline - loop.time(), 0.0))
                    break
                except eng.PortInUse as exc:
                    # another process took the address between the pick and vLLM's bind: another one (bounded)
                    await eng.terminate(engine, grace)
                    if len(tried) > PORT_RETRIES:
                        raise eng.EngineError(f"{exc} (log: {spec.log_path})") from None
                    spec = self._spec(inst, tried)
                    log.warning("%s: %s; trying %s", inst.name, exc, spec.address)
        finally:
            self.launching.pop(inst.name, None)
        await eng.warm_up(engine, http, inst.name)
        if engine.exited:
            raise eng.EngineError(
                f"vLLM exited with code {engine.process.returncode} right after it became ready: "
                f"{eng.summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
            )
        return engine

    async def sleep(self, engine: eng.EngineProcess, level: int) -> None:
        await eng.sleep(engine, self._http(), level)

    async def wake(self, engine: eng.EngineProcess, level: int, served_name: str) -> None:
        await eng.wake(engine, self._http(), level)
        if served_name:
            await eng.warm_up(engine, self._http(), served_name)

    async def stop(self, engine: eng.EngineProcess) -> None:
        await eng.terminate(engine, self.settings.stop_timeout)

    async def alive(self, engine: eng.EngineProcess) -> bool:
        if engine.exited:
            return False
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._http().get(f"{engine.base_url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        return False
