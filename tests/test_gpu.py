"""Which GPUs vllama uses (issue 13): CUDA_VISIBLE_DEVICES / VLLAMA_DEVICES parsed against NVML's list, by
index or UUID, MIG refused; the fake probe maps physical GPUs to vllama's device numbers like the NVML one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vllama.config import ModelConfig, Settings, parse_models
from vllama.engine import build_launch
from vllama.errors import ConfigError
from vllama.gpu import (
    GIB,
    LedgerProbe,
    NvmlProbe,
    PhysicalGpu,
    device_selection,
    fake_uuid,
    select_devices,
    write_ledger,
)
from vllama.pool import launch_template

UUIDS = ["GPU-1111aaaa-0000-0000-0000-000000000000", "GPU-2222bbbb-0000-0000-0000-000000000000",
         "GPU-2222cccc-0000-0000-0000-000000000000"]  # fmt: skip
HOST = [PhysicalGpu(i, u, "H100") for i, u in enumerate(UUIDS)]
HOST_WITH_MIG = [*HOST[:2], PhysicalGpu(2, UUIDS[2], "A100", mig=True)]


@pytest.mark.parametrize(
    ("selection", "gpus", "expected"),
    [
        pytest.param(None, HOST, [0, 1, 2], id="unset: every GPU"),
        pytest.param(None, HOST_WITH_MIG, [0, 1], id="unset: a GPU in MIG mode is left out"),
        pytest.param("1", HOST, [1], id="one index"),
        pytest.param("2,0", HOST, [2, 0], id="indices keep their order (vllama's device 0 is GPU 2)"),
        pytest.param(" 1 , 0 ", HOST, [1, 0], id="spaces"),
        pytest.param(UUIDS[1], HOST, [1], id="a full UUID"),
        pytest.param("GPU-2222c", HOST, [2], id="a unique UUID prefix, as CUDA accepts"),
        pytest.param(f"{UUIDS[2].lower()},0", HOST, [2, 0], id="UUID (any case) and index mixed"),
        pytest.param("", HOST, [], id="empty: no GPU (CUDA's meaning)"),
        pytest.param("-1", HOST, [], id="-1: no GPU"),
        pytest.param("1,-1,0", HOST, [1], id="a negative index ends the list, as for CUDA"),
    ],
)
def test_select_devices(selection: str | None, gpus: list[PhysicalGpu], expected: list[int]) -> None:
    assert [g.index for g in select_devices(selection, gpus, "CUDA_VISIBLE_DEVICES")] == expected


@pytest.mark.parametrize(
    ("selection", "gpus", "message"),
    [
        pytest.param("3", HOST, "there is no GPU 3", id="index out of range"),
        pytest.param("GPU-9999", HOST, "matches no GPU", id="unknown UUID"),
        pytest.param("GPU-2222", HOST, "matches more than one GPU", id="ambiguous UUID prefix"),
        pytest.param("0,0", HOST, "twice", id="a GPU twice"),
        pytest.param(f"1,{UUIDS[1]}", HOST, "twice", id="a GPU twice, by index and UUID"),
        pytest.param("0,,1", HOST, "empty entry", id="empty entry"),
        pytest.param("nvidia0", HOST, "matches no GPU", id="not an index nor a UUID"),
        pytest.param("MIG-4f79e892-0000-0000-0000-000000000000", HOST, "does not support MIG", id="a MIG UUID"),
        pytest.param("2", HOST_WITH_MIG, "is in MIG mode", id="a GPU in MIG mode, named"),
    ],
)
def test_select_devices_refuses(selection: str, gpus: list[PhysicalGpu], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        select_devices(selection, gpus, "VLLAMA_DEVICES")
    assert message in str(err.value) and "VLLAMA_DEVICES" in str(err.value)


def test_device_selection_precedence() -> None:
    assert device_selection("1", {"CUDA_VISIBLE_DEVICES": "0"}) == ("1", "VLLAMA_DEVICES")
    assert device_selection(None, {"CUDA_VISIBLE_DEVICES": "0"}) == ("0", "CUDA_VISIBLE_DEVICES")
    assert device_selection(None, {"CUDA_VISIBLE_DEVICES": ""}) == ("", "CUDA_VISIBLE_DEVICES")
    assert device_selection(None, {}) == (None, "all GPUs")


def test_settings_read_the_device_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLAMA_DEVICES", "GPU-1111,1")
    monkeypatch.setenv("VLLAMA_FAKE_GPU_NVLINK", "0-1,2-3")
    monkeypatch.setenv("VLLAMA_FAKE_GPU_MIG", "2")
    s = Settings.from_env()
    assert (s.devices, s.fake_gpu_nvlink, s.fake_gpu_mig) == ("GPU-1111,1", [(0, 1), (2, 3)], [2])
    monkeypatch.setenv("VLLAMA_DEVICES", "")
    assert Settings.from_env().devices is None  # empty = unset, like every VLLAMA_ variable
    monkeypatch.setenv("VLLAMA_FAKE_GPU_NVLINK", "01")
    with pytest.raises(ConfigError, match="VLLAMA_FAKE_GPU_NVLINK"):
        Settings.from_env()


def test_ledger_probe_maps_physical_gpus_to_vllama_devices(tmp_path: Path) -> None:
    probe = LedgerProbe(tmp_path, [8 * GIB, 4 * GIB, 6 * GIB], selection=f"2,{fake_uuid(1)}", links=[(1, 2), (0, 1)])
    write_ledger(tmp_path, 1, {1: 1 * GIB, 0: 3 * GIB})  # pid 1 (init) lives: an engine on GPUs 0 and 1
    devices = probe.devices()
    assert [(d.index, d.physical, d.uuid, d.total, d.free) for d in devices] == [
        (0, 2, fake_uuid(2), 6 * GIB, 6 * GIB),
        (1, 1, fake_uuid(1), 4 * GIB, 3 * GIB),
    ]
    assert probe.process_memory() == {1: {1: 1 * GIB}}  # GPU 0 is not vllama's: not reported
    assert probe.cuda_ids([1, 0]) == ["1", "2"]
    assert probe.links == {frozenset((0, 1))}  # NVLink 1-2 in vllama's numbers; 0-1 involves an unseen GPU


def test_ledger_probe_leaves_mig_gpus_out(tmp_path: Path) -> None:
    probe = LedgerProbe(tmp_path, [8 * GIB, 8 * GIB], mig=[0])
    assert [d.physical for d in probe.devices()] == [1]
    with pytest.raises(ConfigError, match="MIG mode"):
        LedgerProbe(tmp_path, [8 * GIB, 8 * GIB], selection="0", mig=[0])


def test_child_gets_the_physical_gpus_in_pci_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1111,3")  # vllama's own: never passed on as is
    cfg = ModelConfig(pipeline_parallel_size=2, devices=[0, 1, 2, 3])
    spec = build_launch(
        name="m", cfg=cfg, vllm_command=["vllm"], port=1, devices=(0, 1, 2, 3), device_kind="cuda",
        gpu_memory_utilization=0.5, logs_dir=tmp_path, sleep_mode=True, cuda_ids=["3", "1", "0", "2"],
    )  # fmt: skip
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "3,1,0,2"
    assert spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    argv = " ".join(spec.argv)
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 2" in argv


# --- models.yaml: flags and variables that would contradict the plan ------------------------------------------


def models_error(entry: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_models({"m": entry})
    return str(err.value)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--gpu-memory-utilization", "0.5"], "gpu_memory_utilization"),
        (["--gpu-memory-utilization=0.5"], "gpu_memory_utilization"),
        (["--gpu_memory_utilization", "0.5"], "gpu_memory_utilization"),
        (["--gpu-memory", "0.5"], "gpu_memory_utilization"),  # argparse takes a unique prefix
        (["--kv-cache-memory-bytes", "1000000"], "gpu_memory_gib"),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size"),
        (["--tensor-parallel-size=2"], "tensor_parallel_size"),
        (["-tp", "2"], "tensor_parallel_size"),
        (["-tp=2"], "tensor_parallel_size"),
        (["-tp2"], "tensor_parallel_size"),
        (["--pipeline-parallel-size", "2"], "pipeline_parallel_size"),
        (["-pp", "2"], "pipeline_parallel_size"),
        (["--data-parallel-size", "2"], "one engine per model"),
    ],
)
def test_extra_args_that_contradict_the_plan_are_refused(args: list[str], key: str) -> None:
    msg = models_error({"extra_args": ["--enforce-eager", *args]})
    assert "'m'" in msg and args[0] in msg and key in msg and "extra_args" in msg


@pytest.mark.parametrize(
    "args",
    [
        ["--enforce-eager", "--max-num-seqs", "8"],
        ["--kv-cache-dtype", "fp8"],
        ["--max-model-len", "-1"],
        ["--attention-backend", "TRITON_ATTN"],
        ["--swap-space", "4"],
    ],
)
def test_other_extra_args_pass(args: list[str]) -> None:
    assert parse_models({"m": {"extra_args": args}}).models["m"].extra_args == args


@pytest.mark.parametrize("name", ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"])
def test_env_that_contradicts_the_placement_is_refused(name: str) -> None:
    msg = models_error({"env": {name: "1"}})
    assert name in msg and "devices" in msg


@pytest.mark.parametrize(
    ("entry", "tp", "pp", "count"),
    [
        ({}, 1, 1, 1),
        ({"devices": [0, 1]}, 2, 1, 2),
        ({"tensor_parallel_size": 2}, 2, 1, 2),
        ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, 2, 2, 4),
        ({"pipeline_parallel_size": 2, "devices": [0, 1, 2, 3]}, 2, 2, 4),
        ({"pipeline_parallel_size": 2, "devices": [3, 1]}, 1, 2, 2),
        ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "devices": [0, 1, 2, 3]}, 2, 2, 4),
    ],
)
def test_parallel_sizes_and_devices(entry: dict[str, object], tp: int, pp: int, count: int) -> None:
    cfg = parse_models({"m": entry}).models["m"]
    assert (cfg.tp, cfg.pp, cfg.device_count) == (tp, pp, count)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"tensor_parallel_size": 2, "devices": [0]}, ["tensor_parallel_size 2", "needs exactly 2 devices"]),
        (
            {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "devices": [0, 1]},
            ["× pipeline_parallel_size 2", "needs exactly 4 devices"],
        ),
        ({"pipeline_parallel_size": 3, "devices": [0, 1]}, ["pipeline_parallel_size 3 must divide"]),
        ({"pipeline_parallel_size": 0}, ["pipeline_parallel_size"]),
    ],
)
def test_parallel_sizes_that_disagree_with_devices(entry: dict[str, object], words: list[str]) -> None:
    msg = models_error(entry)
    assert "'m'" in msg and all(w in msg for w in words), msg


def test_warm_pool_spares_see_only_vllamas_gpus(tmp_path: Path) -> None:
    probe = LedgerProbe(tmp_path, [8 * GIB, 8 * GIB, 8 * GIB], selection="2,1")
    settings = Settings(home=tmp_path)
    spec = launch_template("m", ModelConfig(tensor_parallel_size=2), settings, "cuda", True, probe.cuda_ids)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,1"


class _StubNvml:
    """Just enough of pynvml for NvmlProbe: three GPUs (GPU 2 in MIG mode), NVLink between GPUs 0 and 1, and a
    process on GPUs 0 and 1."""

    NVML_DEVICE_MIG_ENABLE = 1
    NVML_P2P_CAPS_INDEX_NVLINK = 7
    NVML_P2P_STATUS_OK = 0

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 3

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return UUIDS.index(uuid)

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return UUIDS[h].encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "H100"

    def nvmlDeviceGetMigMode(self, h: int) -> list[int]:
        if h == 0:
            raise self.NVMLError("not supported")
        return [1 if h == 2 else 0, 0]

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, cap: int) -> int:
        return 0 if {a, b} == {0, 1} and cap == 7 else 1

    def nvmlDeviceGetMemoryInfo(self, h: int) -> object:
        return type("Mem", (), {"total": 80 * GIB, "free": (80 - 10 * h) * GIB})()

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[object]:
        return [type("Proc", (), {"pid": 42, "usedGpuMemory": (h + 1) * GIB})()] if h < 2 else []


def test_nvml_probe_maps_the_selection_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _StubNvml())
    probe = NvmlProbe(f"1,{UUIDS[0][:12]}", "CUDA_VISIBLE_DEVICES")
    assert [(d.index, d.physical, d.uuid, d.free) for d in probe.devices()] == [
        (0, 1, UUIDS[1], 70 * GIB),
        (1, 0, UUIDS[0], 80 * GIB),
    ]
    assert probe.process_memory() == {42: {0: 2 * GIB, 1: 1 * GIB}}  # by vllama's numbers
    assert probe.cuda_ids([0, 1]) == ["1", "0"]
    assert probe.links == {frozenset((0, 1))}
    assert [d.physical for d in NvmlProbe(None).devices()] == [0, 1]  # GPU 2 is in MIG mode: left out
    with pytest.raises(ConfigError, match="MIG mode"):
        NvmlProbe("2")
