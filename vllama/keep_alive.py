"""The keep-alive ladder: idle models go running → sleep L1 → sleep L2 → stopped, as configured.

Each pass asks the pure `scheduler.keep_alive_step` what each idle model is due for and sends that model's
owner a command (`try_evict`, `try_deepen`); a model that is busy answers "not now" and is looked at again on
the next pass. Level 1 keeps the weights in host memory: when the host budget has no room for them the step
is level 2, and when the budget is overdrawn the least recently used level-1 sleepers are taken to level 2.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vllama import scheduler
from vllama.config import KeepAlive, Settings
from vllama.instance import Instance, Outcome, State, action_of

if TYPE_CHECKING:
    from vllama.placement import Placement
    from vllama.registry import Registry

log = logging.getLogger("vllama")

OnStep = Callable[[Instance, str, str, str], None]  # instance, action, reason, message


def ladder_for(inst: Instance, settings: Settings) -> KeepAlive:
    """The ladder `inst` follows: a request's `keep_alive` (Ollama API) wins over models.yaml and the default."""
    return inst.keep_alive_override or inst.cfg.keep_alive or settings.keep_alive


def next_steps(inst: Instance, ladder: KeepAlive, can_sleep: bool) -> list[float]:
    """Idle seconds at which the steps still ahead of `inst` are due."""
    current = 0 if inst.state is State.RUNNING else inst.sleep_level
    steps = [ladder.stop]
    if can_sleep and current < 1:
        steps.append(ladder.sleep_l1)
    if can_sleep and current < 2:
        steps.append(ladder.sleep_l2)
    return [s for s in steps if s is not None]


def expires_at(inst: Instance, settings: Settings, can_sleep: bool) -> float | None:
    """Wall-clock time of the next keep-alive step of `inst` (a deeper sleep or its stop), if it has one."""
    if inst.cfg.pinned or inst.state not in (State.RUNNING, State.SLEEPING):
        return None
    due = next_steps(inst, ladder_for(inst, settings), can_sleep)
    if not due:
        return None
    return (time.time() if inst.in_flight else inst.last_used_wall) + min(due)


class KeepAliveLoop:
    def __init__(self, settings: Settings, registry: Registry, placement: Placement, on_step: OnStep) -> None:
        self.settings = settings
        self.registry = registry
        self.placement = placement
        self.on_step = on_step
        self.can_sleep = placement.probe.supports_sleep

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.keep_alive_interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("keep-alive pass failed")

    async def run_once(self) -> None:
        """One pass: every due step is sent at once (each waits only for its own model)."""
        await asyncio.gather(*(self._step(inst) for inst in list(self.registry.instances.values())))
        if self.can_sleep:
            await self._relieve_host()

    async def _step(self, inst: Instance) -> None:
        if inst.cfg.pinned or inst.busy or inst.in_flight or inst.state not in (State.RUNNING, State.SLEEPING):
            return
        ladder = ladder_for(inst, self.settings)
        step = scheduler.keep_alive_step(
            idle_for=inst.idle_for(),
            phase="running" if inst.state is State.RUNNING else "sleeping",
            sleep_level=inst.sleep_level,
            sleep_l1=ladder.sleep_l1,
            sleep_l2=ladder.sleep_l2,
            stop=ladder.stop,
            can_sleep=self.can_sleep,
        )
        if step is None:
            return
        loading = self.placement.loading()
        if any(d in loading for d in inst.devices):
            return  # vLLM sizes a loading model from free memory: free nothing under it (next pass)
        note = ""
        reason = "keep_alive" if inst.keep_alive_override is None else "request"  # (a stop clears the override)
        if step == "stop":
            outcome = await inst.try_evict(3)
        elif inst.state is State.RUNNING:
            level = 1 if step == "sleep_l1" or inst.cfg.lora_enabled else 2
            if level == 1 and self.placement.host_bytes_at_l1(inst) > self.placement.host_free():
                if inst.cfg.lora_enabled:
                    return  # no room for its weights, and no level 2 with LoRA: it waits for its stop step
                level, note = 2, " (level 2: the host memory budget has no room for its weights)"
            outcome = await inst.try_evict(level)
        elif inst.cfg.lora_enabled:
            return  # asleep at level 1 and due for level 2, which LoRA cannot wake from: it waits for its stop
        else:
            outcome = await inst.try_deepen()  # asleep at level 1, due for level 2
        if outcome is not Outcome.DONE:
            return
        action = action_of(inst)
        message = f"keep-alive: {action} after {inst.idle_for():.0f} s idle{note}"
        if reason == "request":
            message += " (keep_alive set by a request)"
        self.on_step(inst, action, reason, message)

    async def _relieve_host(self) -> None:
        free = self.placement.host_free()
        if free >= 0:
            return
        _, residents = self.placement.memory_view()
        for name in scheduler.host_relief(residents, free):
            inst = self.registry.instances.get(name)
            if inst is None:
                continue
            outcome = Outcome.NOT_NOW if inst.cfg.lora_enabled else await inst.try_deepen()
            if outcome is Outcome.NOT_NOW and inst.state is State.SLEEPING and inst.sleep_level == 1:
                outcome = await inst.try_evict(3)  # no room to wake it for a level-2 sleep: stop it
            if outcome is Outcome.DONE:
                action = action_of(inst)
                self.on_step(inst, action, "host_memory", f"host memory budget overdrawn: {action}")
