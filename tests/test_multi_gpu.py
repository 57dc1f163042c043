"""Several GPUs end to end (issue 13): a real `vllama serve` over fake engines on simulated GPUs (the shared
ledger records each engine's memory by physical GPU, i.e. by the CUDA_VISIBLE_DEVICES vllama gave it).

vllama restricted by CUDA_VISIBLE_DEVICES or VLLAMA_DEVICES (indices or UUIDs) uses only those GPUs and numbers
them from 0; children get the physical indices with CUDA_DEVICE_ORDER=PCI_BUS_ID; a mixed-size host places a
default-fraction model on the smaller GPU when the larger one is taken; NVLink pairs are preferred for TP.
"""

from __future__ import annotations

import pytest

from tests.conftest import Daemon
from tests.test_manager_fake import assert_echo, chat, engine_stats, held_by, info, ledger, ps
from vllama.gpu import GIB, fake_uuid


def engine_env(daemon: Daemon, model: str) -> tuple[str, str]:
    """(CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER) the running `model`'s engine was started with."""
    with daemon.client() as c:
        stats = engine_stats(ps(c)[model])
    return stats["cuda_visible_devices"], stats["cuda_device_order"]


def physical_gpus_used(daemon: Daemon) -> set[int]:
    return {gpu for per_device in ledger(daemon).values() for gpu in per_device}


def test_cuda_visible_devices_restricts_vllama_to_those_gpus(fake_daemon: Daemon) -> None:
    """vllama started with CUDA_VISIBLE_DEVICES=1 on a 2-GPU host: every model on GPU 1, eviction there, GPU 0
    untouched; vllama calls it device 0."""
    fake_daemon.env |= {"VLLAMA_FAKE_GPU_TOTAL_GIB": "8,8", "CUDA_VISIBLE_DEVICES": "1"}
    fake_daemon.write_models({m: {"gpu_memory_gib": 3.5} for m in ("a", "b", "c")} | {"on1": {"devices": [1]}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        (dev,) = info(c)["devices"]
        assert (dev["index"], dev["nvml_index"], dev["uuid"]) == (0, 1, fake_uuid(1))
        for m in ("a", "b", "c"):  # two fit: c evicts a, on GPU 1
            assert_echo(chat(c, m, f"hi {m}"), f"hi {m}")
            assert engine_env(fake_daemon, m) == ("1", "PCI_BUS_ID")
        s = ps(c)
        assert {m: s[m]["devices"] for m in ("a", "b", "c")} == {"a": [0], "b": [0], "c": [0]}
        assert (s["a"]["state"], s["b"]["state"], s["c"]["state"]) == ("sleeping", "running", "running")
        assert physical_gpus_used(fake_daemon) == {1}, "vllama used a GPU outside CUDA_VISIBLE_DEVICES"
        assert held_by(fake_daemon, s["b"]["pid"]) == {1: int(3.5 * GIB)}
        # models.yaml's device 1 does not exist for this vllama: said, not placed elsewhere
        r = chat(c, "on1", "no such device")
        assert r.status_code == 503 and "device(s) [1] do not exist" in r.text, r.text


def test_vllama_devices_by_uuid_wins_and_tp_gets_the_physical_pair(fake_daemon: Daemon) -> None:
    """VLLAMA_DEVICES=<uuid of GPU 2>,1 over CUDA_VISIBLE_DEVICES=0 on 3 GPUs: vllama's 0 and 1 are GPUs 2 and 1;
    a TP-2 model's engine gets CUDA_VISIBLE_DEVICES=2,1; a model fixed on device 0 runs on GPU 2."""
    fake_daemon.env |= {
        "VLLAMA_FAKE_GPU_TOTAL_GIB": "8,8,8",
        "CUDA_VISIBLE_DEVICES": "0",
        "VLLAMA_DEVICES": f"{fake_uuid(2)},1",
    }
    fake_daemon.write_models(
        {"tp2": {"gpu_memory_gib": 3, "tensor_parallel_size": 2}, "first": {"gpu_memory_gib": 2, "devices": [0]}}
    )
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert [(d["index"], d["nvml_index"]) for d in info(c)["devices"]] == [(0, 2), (1, 1)]
        assert_echo(chat(c, "tp2", "both"), "both")
        assert_echo(chat(c, "first", "one"), "one")
        s = ps(c)
        assert s["tp2"]["devices"] == [0, 1] and s["first"]["devices"] == [0]
        assert engine_env(fake_daemon, "tp2") == ("2,1", "PCI_BUS_ID")
        assert engine_env(fake_daemon, "first") == ("2", "PCI_BUS_ID")
        assert held_by(fake_daemon, s["tp2"]["pid"]) == {2: 3 * GIB, 1: 3 * GIB}
        assert physical_gpus_used(fake_daemon) == {1, 2}


def test_tp_model_prefers_the_nvlink_pair(fake_daemon: Daemon) -> None:
    fake_daemon.env |= {"VLLAMA_FAKE_GPU_TOTAL_GIB": "8,8,8", "VLLAMA_FAKE_GPU_NVLINK": "1-2"}
    fake_daemon.write_models({"tp2": {"gpu_memory_gib": 3, "tensor_parallel_size": 2}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "tp2", "linked"), "linked")
        assert ps(c)["tp2"]["devices"] == [1, 2]
        assert engine_env(fake_daemon, "tp2") == ("1,2", "PCI_BUS_ID")


def test_mixed_sizes_default_fraction_goes_to_the_smaller_gpu(fake_daemon: Daemon) -> None:
    """8 GiB + 4 GiB, the 8 GiB one held by a pinned model: a model with vLLM's default fraction (0.9) needs
    3.6 GiB on the 4 GiB GPU and runs there (it was refused: its need came from the 8 GiB GPU)."""
    fake_daemon.env |= {"VLLAMA_FAKE_GPU_TOTAL_GIB": "8,4"}
    fake_daemon.write_models({"big": {"gpu_memory_utilization": 0.9, "devices": [0], "pinned": True}, "m": {}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "big", "first"), "first")
        assert_echo(chat(c, "m", "fits the small one"), "fits the small one")
        s = ps(c)
        assert s["m"]["devices"] == [1] and s["big"]["state"] == "running"
        assert held_by(fake_daemon, s["m"]["pid"]) == {1: int(0.9 * 4 * GIB)}


@pytest.mark.parametrize(
    ("env", "models", "message"),
    [
        pytest.param(
            {"VLLAMA_DEVICES": "MIG-4f79e892-0000-0000-0000-000000000000"}, {}, "does not support MIG", id="MIG UUID"
        ),
        pytest.param({"CUDA_VISIBLE_DEVICES": "2"}, {}, "there is no GPU 2", id="no such GPU"),
        pytest.param({"VLLAMA_FAKE_GPU_MIG": "1", "VLLAMA_DEVICES": "1"}, {}, "is in MIG mode", id="MIG-mode GPU"),
        pytest.param({}, {"m": {"extra_args": ["-tp", "2"]}}, "tensor_parallel_size", id="-tp in extra_args"),
    ],
)
def test_vllama_refuses_to_start_on_a_contradiction(
    fake_daemon: Daemon, env: dict[str, str], models: dict[str, object], message: str
) -> None:
    fake_daemon.env |= {"VLLAMA_FAKE_GPU_TOTAL_GIB": "8,8", **env}
    fake_daemon.write_models(models)
    with pytest.raises(RuntimeError, match="exited") as err:
        fake_daemon.start()
    assert message in str(err.value)
