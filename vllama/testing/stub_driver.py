"""A stub engine driver and GPU probe for deterministic in-process tests of the lifecycle core.

Children are real processes (`sleep`, in their own session, like vLLM under its guard), so kills, exits and
process groups are real; what vLLM would do over HTTP (start-up, sleep, wake) is simulated, and each operation
can be held at a gate that the test opens when it wants: interleavings are chosen by the test, not by timing.
Memory follows the operations in an in-memory ledger that the stub probe reports, like NVML would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vllama import engine as eng
from vllama.gpu import DeviceInfo

if TYPE_CHECKING:
    from vllama.instance import Instance


class StubProbe:
    """Devices with fixed totals; free = total − what the stub children hold (pid → device → bytes)."""

    kind = "cuda"
    supports_sleep = True
    links: frozenset[frozenset[int]] = frozenset()

    def __init__(self, totals: list[int]) -> None:
        self.totals = totals
        self.held: dict[int, dict[int, int]] = {}

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(i, f"stub{i}", t, t - sum(h.get(i, 0) for h in self.held.values()))
            for i, t in enumerate(self.totals)
        ]

    def process_memory(self) -> dict[int, dict[int, int]]:
        return {pid: dict(per_device) for pid, per_device in self.held.items()}

    def cuda_ids(self, indices: Sequence[int]) -> list[str]:
        return [str(i) for i in indices]


@dataclass
class Gate:
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


class StubDriver:
    """Operations pass at once unless the test holds them: `hold(model, op)` makes the next `op` of `model` wait
    (its `entered` event is set when it gets there) until `release(model, op)`. `fail[(model, op)]` makes an
    operation raise that exception instead."""

    def __init__(self, probe: StubProbe, logs: Path, asleep_residue: int) -> None:
        self.probe = probe
        self.logs = logs
        self.asleep_residue = asleep_residue
        self.gates: dict[tuple[str, str], Gate] = {}
        self.fail: dict[tuple[str, str], BaseException] = {}
        self.calls: list[tuple[str, str]] = []
        self.answering = True  # what `alive` answers
        self._names: dict[int, str] = {}
        self._needs: dict[int, dict[int, int]] = {}
        self._port = 40000

    def hold(self, model: str, op: str) -> Gate:
        gate = self.gates[(model, op)] = Gate()
        return gate

    def release(self, model: str, op: str) -> None:
        self.gates.pop((model, op)).opened.set()

    async def _pass(self, model: str, op: str) -> None:
        self.calls.append((model, op))
        gate = self.gates.get((model, op))
        if gate is not None:
            gate.entered.set()
            await gate.opened.wait()
        exc = self.fail.pop((model, op), None)
        if exc is not None:
            raise exc

    def name_of(self, engine: eng.EngineProcess) -> str:
        return self._names[engine.pid]

    async def start(self, inst: Instance, on_spawn: Callable[[eng.EngineProcess], None]) -> eng.EngineProcess:
        self._port += 1
        process = await asyncio.create_subprocess_exec("sleep", "3600", start_new_session=True)
        spec = eng.LaunchSpec(["sleep", "3600"], {}, self._port, self.logs / f"{inst.name}_{self._port}.log")
        engine = eng.EngineProcess(spec=spec, process=process)
        self._names[engine.pid] = inst.name
        on_spawn(engine)
        await self._pass(inst.name, "start")
        if engine.exited:
            raise eng.EngineError(f"exited with code {process.returncode} while starting")
        self._needs[engine.pid] = {d: inst.need for d in inst.devices}
        self.probe.held[engine.pid] = dict(self._needs[engine.pid])
        return engine

    async def sleep(self, engine: eng.EngineProcess, level: int) -> None:
        await self._pass(self.name_of(engine), f"sleep{level}")
        if engine.exited:
            raise ConnectionResetError("the child is gone")
        self.probe.held[engine.pid] = {d: self.asleep_residue for d in self._needs[engine.pid]}

    async def wake(self, engine: eng.EngineProcess, level: int, served_name: str) -> None:
        await self._pass(self.name_of(engine), f"wake{level}")
        if engine.exited:
            raise ConnectionResetError("the child is gone")
        self.probe.held[engine.pid] = dict(self._needs[engine.pid])

    async def stop(self, engine: eng.EngineProcess) -> None:
        self.calls.append((self._names.get(engine.pid, "?"), "stop"))
        eng.kill_group(engine.pid)
        await engine.process.wait()
        self.probe.held.pop(engine.pid, None)

    async def alive(self, engine: eng.EngineProcess) -> bool:
        return self.answering and not engine.exited

    def crash(self, engine: eng.EngineProcess) -> None:
        """The child dies by itself (its memory goes with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.pid, signal.SIGKILL)
        self.probe.held.pop(engine.pid, None)
