"""LoRA adapters on demand: which adapters each running base model has loaded, and loading one for a request.

An adapter is requested by its own name (models.yaml lists it under its base model, vllama/config.py). The
request path (`acquire`) brings the base up like any model, then makes sure the adapter is loaded into the
base's vLLM (POST /v1/load_lora_adapter, vllama/engine.py), and forwards the request unchanged: vLLM serves a
loaded adapter under its lora_name, which is the adapter's name.

A base launched with `--max-loras N` keeps at most N adapters loaded here; loading one more first unloads the
least recently used adapter that has no request in flight (`plan_slots`, a pure function). When all N have
requests in flight, the request waits (bounded) for one to finish, then gets a 503.

Invariants (per running vLLM process of a base, `BaseLoras`):
- `loaded` holds only adapters vLLM has loaded and that may serve requests: an adapter enters it after its load
  succeeded and leaves it *before* its unload is sent. So a request admitted by `try_use` (no await between the
  check and the in-flight increment) never reaches an adapter that is being unloaded.
- An adapter with requests in flight is never chosen for unloading.
- Loads and unloads of one base are serialized by its `lock` (vLLM's slot count is per process); requests for
  an adapter that is loaded take no lock.
- The state belongs to one vLLM process (`engine`): a base that restarted gets a fresh, empty state (a new
  process has no adapters), and a lease releases the state it was taken from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from vllama import engine as eng
from vllama.config import AdapterRef, ModelConfig
from vllama.errors import AdapterUnavailable, UpstreamError

if TYPE_CHECKING:
    from vllama.instance import Instance
    from vllama.manager import Manager
    from vllama.metrics import Metrics

log = logging.getLogger("vllama")


# --- the pure decision ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotPlan:
    """What to do to serve adapter `want`: unload these (least recently used first), then load it; or wait
    for a request to finish because every slot that would have to be freed is busy."""

    unload: tuple[str, ...] = ()
    load: bool = True
    wait: bool = False


def plan_slots(loaded: Sequence[str], in_flight: Mapping[str, int], max_loras: int, want: str) -> SlotPlan:
    """`loaded`: the loaded adapters, least recently used first; `in_flight`: requests per adapter."""
    if want in loaded:
        return SlotPlan(load=False)
    excess = len(loaded) + 1 - max_loras
    if excess <= 0:
        return SlotPlan()
    idle = [name for name in loaded if not in_flight.get(name)]
    if len(idle) < excess:
        return SlotPlan(load=False, wait=True)
    return SlotPlan(unload=tuple(idle[:excess]))


# --- per running base -----------------------------------------------------------------------------------------


class BaseLoras:
    """The adapters loaded into one vLLM process of a base model (see the module's invariants)."""

    def __init__(self, base: str, engine: eng.EngineProcess, max_loras: int, max_rank: int) -> None:
        self.base = base
        self.engine = engine
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self.in_flight: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.lock = asyncio.Lock()
        self.released = asyncio.Event()  # set (and replaced) whenever an adapter's last request finishes

    def try_use(self, name: str) -> bool:
        """Count one request on `name` if it is loaded (no await: the check and the count are atomic)."""
        if name not in self.loaded:
            return False
        self.loaded.move_to_end(name)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.last_used[name] = time.time()
        return True

    def release(self, name: str) -> None:
        left = self.in_flight[name] - 1
        if left:
            self.in_flight[name] = left
            return
        del self.in_flight[name]
        self.last_used[name] = time.time()
        self.released.set()
        self.released = asyncio.Event()


@dataclass
class AdapterLease:
    """One request in flight on an adapter; `release` exactly once."""

    state: BaseLoras
    name: str

    def release(self) -> None:
        self.state.release(self.name)


def check_adapter(ref: AdapterRef, max_rank: int, rank_setting: str) -> None:
    """Refuse, before anything is unloaded, an adapter vLLM would refuse: no folder, no adapter config, a rank
    above what the base was launched with. The message names the adapter, its base and the setting."""
    where = f"adapter {ref.name!r} of model {ref.base!r}"
    if not ref.path.is_dir():
        raise AdapterUnavailable(
            f"{where}: its path {ref.path} does not exist or is not a folder (models.yaml: fix the adapter's path "
            f"under {ref.base}.adapters or adapter_dirs)",
            param="model",
        )
    try:
        rank = eng.read_adapter_rank(ref.path)
    except eng.LoraError as exc:
        raise AdapterUnavailable(f"{where}: {exc}", param="model") from None
    if rank > max_rank:
        raise AdapterUnavailable(
            f"{where} has rank {rank}, above the max_lora_rank {max_rank} that {ref.base} was started with "
            f"(from {rank_setting}): set max_lora_rank: {eng.rank_limit_for(rank) or rank} under {ref.base} in "
            f"models.yaml and restart it (vllama stop {ref.base})",
            param="model",
        )


class LoraRegistry:
    """The LoRA state of every running base model."""

    def __init__(self, metrics: Metrics | None = None, wait_timeout: float = 120.0) -> None:
        self.metrics = metrics
        self.wait_timeout = wait_timeout  # how long a request waits for a busy LoRA slot
        self._bases: dict[str, BaseLoras] = {}

    def state_for(self, base: str, engine: eng.EngineProcess) -> BaseLoras | None:
        """The state of `base`'s process `engine` (a new one for a new process); None without LoRA enabled."""
        state = self._bases.get(base)
        if state is not None and state.engine is engine:
            return state
        settings = eng.launch_lora_settings(engine.spec.argv)
        if settings is None:
            return None
        state = self._bases[base] = BaseLoras(base, engine, *settings)
        return state

    async def acquire(self, inst: Instance, ref: AdapterRef, http: aiohttp.ClientSession) -> AdapterLease:
        """For a request that holds the running base `inst`: make sure adapter `ref` is loaded and count the
        request on it. Raises AdapterUnavailable (bad adapter, vLLM refused it, every slot busy too long)."""
        engine = inst.engine
        if engine is None:
            raise UpstreamError(inst.last_error or f"{inst.name} went away before the adapter could be loaded")
        state = self.state_for(ref.base, engine)
        if state is None:
            raise AdapterUnavailable(
                f"adapter {ref.name!r}: {ref.base} runs without LoRA (it was started before the adapter was "
                f"configured, or extra_args left out --enable-lora): restart it (vllama stop {ref.base})"
            )
        if state.try_use(ref.name):  # the hot path: loaded already
            return AdapterLease(state, ref.name)
        rank_setting = "max_lora_rank" if inst.cfg.max_lora_rank is not None else "the adapters' ranks at its start"
        check_adapter(ref, state.max_rank, rank_setting)
        deadline = time.monotonic() + self.wait_timeout
        while True:
            released = state.released
            async with state.lock:
                if state.try_use(ref.name):  # another request loaded it meanwhile
                    return AdapterLease(state, ref.name)
                plan = plan_slots(list(state.loaded), state.in_flight, state.max_loras, ref.name)
                if not plan.wait:
                    for victim in plan.unload:
                        state.loaded.pop(victim)  # out of service before the await (see the invariants)
                        await self._unload(state, victim, http)
                    await self._load(state, ref, http)
                    state.loaded[ref.name] = ref.path
                    state.try_use(ref.name)
                    return AdapterLease(state, ref.name)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = ", ".join(f"{n} ({c})" for n, c in state.in_flight.items())
                raise AdapterUnavailable(
                    f"adapter {ref.name!r}: all {state.max_loras} LoRA slots of {ref.base} stayed busy for "
                    f"{self.wait_timeout:.0f} s (requests in flight: {busy}); raise max_loras under {ref.base}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(released.wait(), remaining)

    async def _load(self, state: BaseLoras, ref: AdapterRef, http: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        try:
            try:
                await eng.load_lora(state.engine, http, ref.name, ref.path)
            except eng.LoraError as exc:
                if "already been loaded" not in str(exc):
                    raise
                # vLLM still has it (an unload that failed earlier): load it again in place
                await eng.load_lora(state.engine, http, ref.name, ref.path, replace=True)
        except eng.LoraError as exc:
            self._observe(state.base, ref.name, "load", time.perf_counter() - t0, False)
            raise AdapterUnavailable(
                f"adapter {ref.name!r} of model {ref.base!r} ({ref.path}) could not be loaded: {exc} "
                f"(log: {state.engine.spec.log_path})",
                param="model",
            ) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._observe(state.base, ref.name, "load", time.perf_counter() - t0, False)
            raise UpstreamError(
                f"{ref.base}: could not reach its vLLM server to load adapter {ref.name!r}: {exc!r} "
                f"(log: {state.engine.spec.log_path})"
            ) from None
        self._observe(state.base, ref.name, "load", time.perf_counter() - t0, True)
        log.info("%s: loaded adapter %s (%s)", state.base, ref.name, ref.path)

    async def _unload(self, state: BaseLoras, name: str, http: aiohttp.ClientSession) -> None:
        """Unload a least recently used adapter. A failure is logged, not raised: the adapter is out of vllama's
        books already, and a load of it later replaces whatever vLLM kept."""
        t0 = time.perf_counter()
        try:
            await eng.unload_lora(state.engine, http, name)
        except (eng.LoraError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._observe(state.base, name, "unload", time.perf_counter() - t0, False)
            log.warning("%s: unloading adapter %s failed: %s", state.base, name, exc)
            return
        self._observe(state.base, name, "unload", time.perf_counter() - t0, True)
        log.info("%s: unloaded adapter %s (least recently used, to make room)", state.base, name)

    def _observe(self, base: str, adapter: str, operation: str, seconds: float, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_lora(base, adapter, operation, seconds, ok)

    def snapshot(self, base: str, cfg: ModelConfig, engine: eng.EngineProcess | None) -> list[dict[str, Any]]:
        """The adapters of `base` for ps and /v1/models: each configured adapter, loaded or not."""
        state = self._bases.get(base)
        if state is not None and (engine is None or state.engine is not engine):
            state = None
        rows = []
        for name, path in cfg.adapters.items():
            rows.append(
                {
                    "name": name,
                    "path": path,
                    "loaded": bool(state and name in state.loaded),
                    "in_flight": state.in_flight.get(name, 0) if state else 0,
                    "last_used": state.last_used.get(name) if state else None,
                }
            )
        return rows


# --- the request path's hook ----------------------------------------------------------------------------------


async def acquire(manager: Manager, name: object) -> tuple[Instance, AdapterLease | None]:
    """The request path's acquire: a model name acquires that model (as `Manager.acquire`); an adapter's name
    acquires its base, then loads the adapter if needed. Release both with `release`."""
    ref = manager.models.adapter(name)
    if ref is None:
        return await manager.acquire(name), None
    inst = await manager.acquire(ref.base)
    try:
        lease = await manager.loras.acquire(inst, ref, manager.http)
    except BaseException:
        inst.release()
        raise
    return inst, lease


def release(inst: Instance, lease: AdapterLease | None) -> None:
    if lease is not None:
        lease.release()
    inst.release()
