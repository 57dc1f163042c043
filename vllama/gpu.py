"""Device inventory behind one seam: NVML for real GPUs, a memory budget for the CPU, a ledger for tests.

Device indices are NVML indices; children get `CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA numbers devices the same.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes, as measured now


class GpuProbe(Protocol):
    """What the manager needs to know about devices. Implementations must be cheap and thread-safe."""

    kind: str  # "cuda" or "cpu": decides sleep mode, child environment and default memory needs
    supports_sleep: bool

    def devices(self) -> list[DeviceInfo]: ...

    def process_memory(self) -> dict[int, dict[int, int]]:
        """pid → {device index → bytes} for every process holding device memory (empty where unknown)."""
        ...


class NvmlProbe:
    kind = "cuda"
    supports_sleep = True

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._lock = threading.Lock()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def devices(self) -> list[DeviceInfo]:
        out = []
        with self._lock:
            for i, h in enumerate(self._handles):
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                name = self._nvml.nvmlDeviceGetName(h)
                out.append(
                    DeviceInfo(i, name if isinstance(name, str) else name.decode(), int(mem.total), int(mem.free))
                )
        return out

    def process_memory(self) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        with self._lock:
            for i, h in enumerate(self._handles):
                try:
                    procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(h)
                except self._nvml.NVMLError:
                    continue
                for p in procs:
                    used = p.usedGpuMemory
                    if used is not None:
                        out.setdefault(int(p.pid), {})[i] = int(used)
        return out


class CpuProbe:
    """One "device", index 0: a RAM budget for vLLM's CPU build. The CPU build has no sleep mode, so eviction
    there means stopping. Free = the smaller of the budget and what the OS says is available."""

    kind = "cpu"
    supports_sleep = False

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.total = budget_bytes if budget_bytes is not None else int(psutil.virtual_memory().total * 0.8)

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(0, "cpu", self.total, min(self.total, int(psutil.virtual_memory().available)))]

    def process_memory(self) -> dict[int, dict[int, int]]:
        return {}


class LedgerProbe:
    """Simulated GPUs for tests: fake engines (`vllama.testing.fake_engine`) record what they hold in a shared
    ledger folder, one JSON file per process; a dead process's memory is released, as the driver does."""

    kind = "cuda"
    supports_sleep = True

    def __init__(self, ledger: Path, totals: list[int]) -> None:
        self.ledger = ledger
        self.totals = totals
        ledger.mkdir(parents=True, exist_ok=True)

    def devices(self) -> list[DeviceInfo]:
        used = [0] * len(self.totals)
        for per_device in self.process_memory().values():
            for i, n in per_device.items():
                if i < len(used):
                    used[i] += n
        return [DeviceInfo(i, f"fake{i}", t, t - used[i]) for i, t in enumerate(self.totals)]

    def process_memory(self) -> dict[int, dict[int, int]]:
        return read_ledger(self.ledger)


def read_ledger(ledger: Path) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for f in ledger.glob("*.json"):
        try:
            pid = int(f.stem)
            data = json.loads(f.read_text())
        except (ValueError, OSError):
            continue  # a file being replaced right now, or not ours
        if not psutil.pid_exists(pid) or _is_zombie(pid):
            continue
        out[pid] = {int(k): int(v) for k, v in data.items() if int(v) > 0}
    return out


def write_ledger(ledger: Path, pid: int, per_device: dict[int, int]) -> None:
    tmp = ledger / f".{pid}.tmp"
    tmp.write_text(json.dumps({str(k): v for k, v in per_device.items()}))
    os.replace(tmp, ledger / f"{pid}.json")


def _is_zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def make_probe(kind: str, *, cpu_budget: int | None, ledger: Path | None, fake_totals: list[int]) -> GpuProbe:
    if kind == "fake":
        if ledger is None:
            raise ValueError("the fake GPU probe needs VLLAMA_FAKE_GPU_LEDGER")
        return LedgerProbe(ledger, fake_totals)
    if kind == "cpu":
        return CpuProbe(cpu_budget)
    if kind in ("nvml", "auto"):
        try:
            probe = NvmlProbe()
            if probe.devices():
                return probe
        except Exception:
            if kind == "nvml":
                raise
        return CpuProbe(cpu_budget)
    raise ValueError(f"unknown GPU probe {kind!r} (use auto, nvml, cpu or fake)")
