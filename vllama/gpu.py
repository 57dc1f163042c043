"""Device inventory behind one seam: NVML for real GPUs, a memory budget for the CPU, a ledger for tests.

Which GPUs vllama may use: `VLLAMA_DEVICES` if set, else vllama's own `CUDA_VISIBLE_DEVICES`, else every GPU
NVML lists. Both take the same syntax: a comma list of NVML indices (PCI bus order, as `nvidia-smi` numbers them)
or GPU UUIDs (`GPU-…`, or a unique prefix of one, as CUDA accepts). Each entry is mapped to its NVML device by
UUID, once, at start-up.

vllama's device numbers (models.yaml `devices`, `ps`, `info`) are positions in that list, as CUDA numbers the
devices of a process started with that `CUDA_VISIBLE_DEVICES`: with `CUDA_VISIBLE_DEVICES=1`, vllama's device 0
is the host's GPU 1. Without a selection they are the NVML indices. A child's `CUDA_VISIBLE_DEVICES` gets the
NVML indices of its devices (`cuda_ids`) with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA numbers them like NVML.
Indices, not UUIDs: vLLM (0.26 at least) parses each entry of `CUDA_VISIBLE_DEVICES` with `int()`.

MIG is not supported, and said so: a `MIG-…` entry is refused at start-up, and a GPU in MIG mode is left out
(with a warning) when no selection names it, refused when one does. NVML lists a MIG-mode GPU as one device whose
memory is split among MIG instances (reachable only through `nvmlDeviceGetMigDeviceHandleByIndex`), CUDA cannot
use the parent GPU itself, vLLM cannot take a `MIG-` UUID in `CUDA_VISIBLE_DEVICES`, and MIG instances have no
peer-to-peer path for tensor parallelism. Run vLLM on a MIG slice by hand instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from vllama.errors import ConfigError

GIB = 1024**3
log = logging.getLogger("vllama")

# pairs of vllama device indices that NVML says are linked by NVLink (directly or through an NVSwitch)
Links = frozenset[frozenset[int]]


@dataclass(frozen=True)
class DeviceInfo:
    index: int  # vllama's device number: the position in the selected list (see the module's docstring)
    name: str
    total: int  # bytes
    free: int  # bytes, as measured now
    uuid: str = ""
    physical: int | None = None  # the NVML index: what a child's CUDA_VISIBLE_DEVICES names


@dataclass(frozen=True)
class PhysicalGpu:
    """A GPU as NVML lists it."""

    index: int  # NVML index (PCI bus order)
    uuid: str
    name: str = ""
    mig: bool = False  # MIG mode enabled: CUDA cannot use the GPU itself, only its MIG instances


def select_devices(selection: str | None, gpus: Sequence[PhysicalGpu], source: str) -> list[PhysicalGpu]:
    """The GPUs a selection (`source` = the variable it came from, for messages) names, in its order.

    None: every GPU not in MIG mode. An empty string selects none (CUDA's meaning). A negative index ends the
    list, as it does for CUDA (`CUDA_VISIBLE_DEVICES=-1` hides every GPU). Anything else that names no GPU, or
    names one twice, or a MIG instance or a MIG-mode GPU, is a ConfigError: silently using other GPUs than the
    user asked for is the bug this guards against."""
    if selection is None:
        return [g for g in gpus if not g.mig]
    chosen: list[PhysicalGpu] = []
    entries = [e.strip() for e in selection.split(",")] if selection.strip() else []
    for entry in entries:
        gpu = _resolve_entry(entry, gpus, source, selection)
        if gpu is None:
            break  # a negative index: CUDA stops there
        if gpu in chosen:
            raise ConfigError(f"{source}={selection!r} names GPU {gpu.index} ({gpu.uuid}) twice")
        if gpu.mig:
            raise ConfigError(
                f"{source}={selection!r}: GPU {gpu.index} ({gpu.uuid}) is in MIG mode; vllama does not support "
                "MIG (vLLM reads CUDA_VISIBLE_DEVICES as integer indices and MIG slices cannot do tensor "
                "parallelism): disable MIG on it (nvidia-smi -i N -mig 0) or leave it out"
            )
        chosen.append(gpu)
    return chosen


def _resolve_entry(entry: str, gpus: Sequence[PhysicalGpu], source: str, selection: str) -> PhysicalGpu | None:
    have = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
    if not entry:
        raise ConfigError(f"{source}={selection!r} has an empty entry (use e.g. 0,1 or GPU-UUIDs)")
    if entry.upper().startswith("MIG-"):
        raise ConfigError(
            f"{source}={selection!r} names the MIG instance {entry}: vllama does not support MIG (vLLM reads "
            "CUDA_VISIBLE_DEVICES as integer indices, and a MIG slice cannot do tensor parallelism). Use whole "
            f"GPUs: {have}"
        )
    try:
        number = int(entry)
    except ValueError:
        matches = [g for g in gpus if g.uuid.lower().startswith(entry.lower())]
        if len(matches) == 1:
            return matches[0]
        what = "more than one GPU" if matches else "no GPU"
        raise ConfigError(f"{source}={selection!r}: {entry!r} matches {what}; GPUs on this host: {have}") from None
    if number < 0:
        return None
    for g in gpus:
        if g.index == number:
            return g
    raise ConfigError(f"{source}={selection!r}: there is no GPU {number}; GPUs on this host: {have}")


def device_selection(vllama_devices: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    """(the selection, the variable it came from): VLLAMA_DEVICES wins over CUDA_VISIBLE_DEVICES."""
    if vllama_devices is not None:
        return vllama_devices, "VLLAMA_DEVICES"
    if "CUDA_VISIBLE_DEVICES" in env:
        return env["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES"
    return None, "all GPUs"


class GpuProbe(Protocol):
    """What the manager needs to know about devices. Implementations must be cheap and thread-safe."""

    kind: str  # "cuda" or "cpu": decides sleep mode, child environment and default memory needs
    supports_sleep: bool
    links: Links  # NVLink-connected pairs of device indices (empty where unknown or none)

    def devices(self) -> list[DeviceInfo]: ...

    def process_memory(self) -> dict[int, dict[int, int]]:
        """pid → {device index → bytes} for every process holding device memory (empty where unknown)."""
        ...

    def cuda_ids(self, indices: Sequence[int]) -> list[str]:
        """What a child on these vllama devices gets in CUDA_VISIBLE_DEVICES (with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
        ...


def _physical_ids(selected: Sequence[PhysicalGpu], indices: Sequence[int]) -> list[str]:
    return [str(selected[i].index) if 0 <= i < len(selected) else str(i) for i in indices]


def _left_out_mig(gpus: Sequence[PhysicalGpu], selection: str | None) -> None:
    if selection is None:
        for g in gpus:
            if g.mig:
                log.warning("GPU %d (%s) is in MIG mode: left out (vllama does not support MIG)", g.index, g.uuid)


def _warn_device_order(selection: str | None, source: str, gpus: Sequence[PhysicalGpu]) -> None:
    """Indices of CUDA_VISIBLE_DEVICES are read in PCI bus order; CUDA's own default order (FASTEST_FIRST) can
    differ where the GPUs are not all alike: say so rather than guess."""
    if source != "CUDA_VISIBLE_DEVICES" or selection is None or os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return
    if len({g.name for g in gpus}) > 1 and any(e.strip().lstrip("-").isdigit() for e in selection.split(",")):
        log.warning(
            "CUDA_VISIBLE_DEVICES=%s: vllama reads its indices in PCI bus order (nvidia-smi's), but CUDA_DEVICE_ORDER "
            "is not PCI_BUS_ID and this host's GPUs differ: set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs",
            selection,
        )


class NvmlProbe:
    kind = "cuda"
    supports_sleep = True

    def __init__(self, selection: str | None = None, source: str = "CUDA_VISIBLE_DEVICES") -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._lock = threading.Lock()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = [self._describe(i, h) for i, h in enumerate(handles)]
        self.selected = select_devices(selection, gpus, source)
        _left_out_mig(gpus, selection)
        _warn_device_order(selection, source, gpus)
        # by UUID: the one name of a GPU that no ordering (PCI bus, fastest first, a container's) changes
        self._handles = [pynvml.nvmlDeviceGetHandleByUUID(g.uuid) for g in self.selected]
        self.links = self._nvlinks()

    def _describe(self, index: int, handle: Any) -> PhysicalGpu:
        nvml = self._nvml
        uuid, name = nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)
        try:
            mig = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
        except nvml.NVMLError:  # not supported on this GPU or driver: no MIG
            mig = False
        return PhysicalGpu(index, _text(uuid), _text(name), bool(mig))

    def _nvlinks(self) -> Links:
        """Pairs whose peer-to-peer path is NVLink (NVML's P2P status; an NVSwitch links every pair)."""
        nvml, pairs = self._nvml, set()
        for (i, a), (j, b) in itertools.combinations(enumerate(self._handles), 2):
            try:
                status = nvml.nvmlDeviceGetP2PStatus(a, b, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
            except (nvml.NVMLError, AttributeError):
                continue
            if status == nvml.NVML_P2P_STATUS_OK:
                pairs.add(frozenset((i, j)))
        return frozenset(pairs)

    def devices(self) -> list[DeviceInfo]:
        out = []
        with self._lock:
            for i, (gpu, h) in enumerate(zip(self.selected, self._handles, strict=True)):
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(DeviceInfo(i, gpu.name, int(mem.total), int(mem.free), gpu.uuid, gpu.index))
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

    def cuda_ids(self, indices: Sequence[int]) -> list[str]:
        return _physical_ids(self.selected, indices)


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


class CpuProbe:
    """One "device", index 0: a RAM budget for vLLM's CPU build. The CPU build has no sleep mode, so eviction
    there means stopping. Free = the smaller of the budget and what the OS says is available."""

    kind = "cpu"
    supports_sleep = False
    links: Links = frozenset()

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.total = budget_bytes if budget_bytes is not None else int(psutil.virtual_memory().total * 0.8)

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(0, "cpu", self.total, min(self.total, int(psutil.virtual_memory().available)))]

    def process_memory(self) -> dict[int, dict[int, int]]:
        return {}

    def cuda_ids(self, indices: Sequence[int]) -> list[str]:
        return [str(i) for i in indices]


def fake_uuid(index: int) -> str:
    """The UUID of simulated GPU `index` (the shape of a real one)."""
    return f"GPU-fa4e0000-0000-0000-0000-{index:012d}"


class LedgerProbe:
    """Simulated GPUs for tests: fake engines (`vllama.testing.fake_engine`) record what they hold in a shared
    ledger folder, one JSON file per process, by physical index (their CUDA_VISIBLE_DEVICES); a dead process's
    memory is released, as the driver does. `totals` are the host's GPUs; `selection` picks some, like NVML's;
    `mig` marks GPUs in MIG mode; `links` are NVLink pairs of physical indices."""

    kind = "cuda"
    supports_sleep = True

    def __init__(
        self,
        ledger: Path,
        totals: list[int],
        *,
        selection: str | None = None,
        source: str = "CUDA_VISIBLE_DEVICES",
        mig: Sequence[int] = (),
        links: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.ledger = ledger
        self.totals = totals
        ledger.mkdir(parents=True, exist_ok=True)
        gpus = [PhysicalGpu(i, fake_uuid(i), f"fake{i}", i in mig) for i in range(len(totals))]
        self.selected = select_devices(selection, gpus, source)
        _left_out_mig(gpus, selection)
        position = {g.index: i for i, g in enumerate(self.selected)}
        self.links = frozenset(
            frozenset((position[a], position[b])) for a, b in links if a in position and b in position
        )

    def devices(self) -> list[DeviceInfo]:
        used = dict.fromkeys((g.index for g in self.selected), 0)
        for per_device in read_ledger(self.ledger).values():
            for physical, n in per_device.items():
                if physical in used:
                    used[physical] += n
        return [
            DeviceInfo(i, g.name, self.totals[g.index], self.totals[g.index] - used[g.index], g.uuid, g.index)
            for i, g in enumerate(self.selected)
        ]

    def process_memory(self) -> dict[int, dict[int, int]]:
        position = {g.index: i for i, g in enumerate(self.selected)}
        out: dict[int, dict[int, int]] = {}
        for pid, per_device in read_ledger(self.ledger).items():
            mine = {position[d]: n for d, n in per_device.items() if d in position}
            if mine:
                out[pid] = mine
        return out

    def cuda_ids(self, indices: Sequence[int]) -> list[str]:
        return _physical_ids(self.selected, indices)


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


def make_probe(
    kind: str,
    *,
    cpu_budget: int | None,
    ledger: Path | None,
    fake_totals: list[int],
    selection: str | None = None,
    source: str = "CUDA_VISIBLE_DEVICES",
    fake_mig: Sequence[int] = (),
    fake_links: Sequence[tuple[int, int]] = (),
) -> GpuProbe:
    """The probe for `kind`; `selection` (from `source`) restricts the GPUs (see the module's docstring). A bad
    selection is a ConfigError, also with `auto`: falling back to the CPU would hide the mistake."""
    if kind == "fake":
        if ledger is None:
            raise ValueError("the fake GPU probe needs VLLAMA_FAKE_GPU_LEDGER")
        return LedgerProbe(ledger, fake_totals, selection=selection, source=source, mig=fake_mig, links=fake_links)
    if kind == "cpu":
        return CpuProbe(cpu_budget)
    if kind in ("nvml", "auto"):
        try:
            probe = NvmlProbe(selection, source)
            if probe.devices():
                return probe
        except ConfigError:
            raise
        except Exception:
            if kind == "nvml":
                raise
        if kind == "nvml":
            raise ConfigError(f"no GPU selected ({source}={selection!r}) and VLLAMA_GPU_PROBE=nvml")
        return CpuProbe(cpu_budget)
    raise ValueError(f"unknown GPU probe {kind!r} (use auto, nvml, cpu or fake)")
