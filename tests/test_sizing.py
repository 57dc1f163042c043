"""Memory auto-sizing (vllama/sizing.py): the estimate's parts on real config.json files (the offline tiny model,
SmolLM2-135M) and on the 135M/1B/3B Llama shapes the GPU runs use (`make_models.py`), the flags given to vLLM,
the fallbacks, and the daemon placing and launching a model with `memory: auto`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon
from vllama.config import ConfigError, Settings, parse_models
from vllama.gpu import GIB, LedgerProbe
from vllama.manager import Manager
from vllama.offline_models import prepare
from vllama.sizing import (
    CONTEXT_GIB,
    KV_FLAG,
    OVERHEAD_FRACTION,
    OVERHEAD_GIB,
    derived_max_model_len,
    estimate,
    kv_bytes_per_token,
    model_dir,
    parameter_count,
    size_model,
)

# SmolLM2-135M-Instruct's config.json (as converted by vllama.offline_models), the shape of make_models' "135m"
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "dtype": "bfloat16",
    "head_dim": 64,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}
SMOLLM2_SAFETENSORS = 269_060_552  # bytes of its model.safetensors in bf16
# make_models.py's shapes on top of SmolLM2's config
SHAPES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128},
    "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128},
}  # fmt: skip


def model_folder(root: Path, config: dict[str, Any], weights: int | None = None) -> Path:
    """A model folder with this config.json and a sparse model.safetensors of `weights` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if weights is not None:
        with (root / "model.safetensors").open("wb") as f:
            f.truncate(weights)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = Path(os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models")).expanduser()
    return prepare(dest, ["tiny"])["tiny"]


@pytest.fixture
def smollm2(tmp_path: Path) -> Path:
    """The real converted SmolLM2 folder when it was prepared already (the e2e tests do), else its config with a
    sparse weights file of the real size."""
    real = Path(os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models")).expanduser() / "smollm2-135m-instruct"
    if (real / "config.json").is_file() and (real / "model.safetensors").is_file():
        return real
    return model_folder(tmp_path / "smollm2", SMOLLM2, SMOLLM2_SAFETENSORS)


# --- the parts ------------------------------------------------------------------------------------------------


def test_parameter_counts_of_the_gpu_shapes() -> None:
    assert parameter_count(SMOLLM2) == 134_515_008  # SmolLM2-135M's real parameter count
    assert parameter_count({**SMOLLM2, **SHAPES["1b"]}) == 1_107_363_840
    assert parameter_count({**SMOLLM2, **SHAPES["3b"]}) == 2_969_742_336
    untied = {**SMOLLM2, "tie_word_embeddings": False}
    assert parameter_count(untied) - parameter_count(SMOLLM2) == 49152 * 576


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token(SMOLLM2, 2) == 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token({**SMOLLM2, **SHAPES["1b"]}, 2) == 2 * 16 * 8 * 128 * 2
    assert kv_bytes_per_token({**SMOLLM2, **SHAPES["3b"]}, 2) == 2 * 28 * 8 * 128 * 2
    assert kv_bytes_per_token({**SMOLLM2, **SHAPES["3b"]}, 2, tp=2) == 2 * 28 * 4 * 128 * 2  # heads split
    assert kv_bytes_per_token(SMOLLM2, 2, tp=4) == 2 * 30 * 1 * 64 * 2  # 3 KV heads on 4 ranks: replicated
    assert kv_bytes_per_token(SMOLLM2, 1) == 2 * 30 * 3 * 64  # fp8 KV cache
    mla = {"num_hidden_layers": 27, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "hidden_size": 2048}
    assert kv_bytes_per_token(mla, 2) == 27 * (512 + 64) * 2
    no_head_dim = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4}
    assert kv_bytes_per_token(no_head_dim, 2) == 2 * 2 * 4 * 64 * 2  # head_dim = hidden / heads, MHA


def test_derived_max_model_len() -> None:
    assert derived_max_model_len(SMOLLM2) == 8192
    assert derived_max_model_len({"n_positions": 1024}) == 1024
    assert derived_max_model_len({}) == 2048  # vLLM's fallback
    yarn = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}}  # fmt: skip
    assert derived_max_model_len(yarn) == 131072
    llama3 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert derived_max_model_len(llama3) == 131072  # already the scaled length
    assert derived_max_model_len({**SMOLLM2, "_tokenizer_model_max_length": 2048}) == 2048


def test_estimate_adds_up_and_scales_with_sequences() -> None:
    e = estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS, max_model_len=2048, sequences=4)
    assert e.weights == SMOLLM2_SAFETENSORS
    assert e.kv_cache == 2 * 30 * 3 * 64 * 2 * 2048 * 4
    assert e.context == int(CONTEXT_GIB * GIB)
    assert e.overhead == int(OVERHEAD_GIB * GIB + OVERHEAD_FRACTION * (e.weights + e.kv_cache))
    assert e.total == e.context + e.weights + e.kv_cache + e.activations + e.overhead
    e8 = estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS, max_model_len=2048, sequences=8)
    assert e8.kv_cache == 2 * e.kv_cache and e8.total > e.total
    # vLLM's profiling batch is larger on big GPUs: more activation memory there
    small_gpu = estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS, max_model_len=2048, device_total=24 * GIB)
    assert small_gpu.activations < e.activations
    # whole blocks of 16 tokens
    odd = estimate(SMOLLM2, weights_on_disk=1, max_model_len=1000, sequences=1)
    assert odd.kv_cache == 2 * 30 * 3 * 64 * 2 * 1008


def test_estimate_dtypes_and_tensor_parallel() -> None:
    f32 = estimate({**SMOLLM2, "dtype": "float32"}, weights_on_disk=2 * SMOLLM2_SAFETENSORS, max_model_len=1024)
    assert f32.weights == SMOLLM2_SAFETENSORS  # served in 16 bits by default
    kept = estimate({**SMOLLM2, "dtype": "float32"}, weights_on_disk=1000, max_model_len=1024, dtype="float32")
    assert kept.weights == 1000 and kept.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    fp8 = estimate(SMOLLM2, weights_on_disk=1000, max_model_len=1024, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token == 2 * 30 * 3 * 64
    three_b = {**SMOLLM2, **SHAPES["3b"]}
    tp2 = estimate(three_b, max_model_len=1024, tp=2)
    assert tp2.weights == (2_969_742_336 * 2) // 2 and tp2.weights_from == "parameter count × dtype"


def test_gpu_shapes_pack_far_better_than_default_fractions() -> None:
    """The H100 demonstration's premise: with vLLM's default 0.9 of 80 GiB one model is resident; the auto
    estimates of the 135M, 1B and 3B shapes (4 × 8192 tokens of KV each) all fit several times over."""
    needs = {
        "135m": estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS).total,
        "1b": estimate({**SMOLLM2, **SHAPES["1b"]}).total,
        "3b": estimate({**SMOLLM2, **SHAPES["3b"]}).total,
    }
    assert 2 * GIB < needs["135m"] < 4 * GIB
    assert 5 * GIB < needs["1b"] < 9 * GIB
    assert 10 * GIB < needs["3b"] < 16 * GIB
    assert sum(needs.values()) < 0.35 * 80 * GIB


# --- whole models ---------------------------------------------------------------------------------------------


def test_size_the_real_tiny_model(tiny: Path) -> None:
    sized = size_model(
        str(tiny), extra_args=["--enforce-eager"], max_model_len=512, tp=1, sequences=4, device_total=80 * GIB,
        device_kind="cuda",
    )  # fmt: skip
    assert sized.estimate is not None, sized.reason
    e = sized.estimate
    assert e.weights == (tiny / "model.safetensors").stat().st_size and e.weights_from == "safetensors files"
    config = json.loads((tiny / "config.json").read_text())
    assert e.kv_bytes_per_token == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * 64 * 2
    assert e.kv_cache == e.kv_bytes_per_token * 512 * 4 and e.max_model_len == 512
    assert sized.extra_args() == [KV_FLAG, str(e.kv_cache)]
    assert sized.utilization(80 * GIB) >= e.total / (80 * GIB)
    assert "auto memory:" in sized.reason and "KV cache" in sized.reason


def test_size_smollm2(smollm2: Path) -> None:
    sized = size_model(
        str(smollm2), extra_args=[], max_model_len=None, tp=1, sequences=4, device_total=80 * GIB, device_kind="cuda"
    )
    assert sized.estimate is not None, sized.reason
    e = sized.estimate
    assert e.max_model_len == 8192 and e.kv_cache == 23040 * 8192 * 4
    assert e.weights == SMOLLM2_SAFETENSORS
    # the CPU build: the processes' resident size instead of a CUDA context
    cpu = size_model(
        str(smollm2), extra_args=["--max-model-len", "1024"], max_model_len=None, tp=1, sequences=2,
        device_total=16 * GIB, device_kind="cpu",
    )  # fmt: skip
    assert cpu.estimate is not None and cpu.estimate.max_model_len == 1024 and cpu.estimate.context > e.context


def test_size_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--small"
    model_folder(repo / "snapshots" / "abc123", SMOLLM2, SMOLLM2_SAFETENSORS)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert model_dir("org/small") == repo / "snapshots" / "abc123"
    sized = size_model("org/small", extra_args=[], max_model_len=2048, tp=1, sequences=4, device_total=80 * GIB,
                       device_kind="cuda")  # fmt: skip
    assert sized.estimate is not None and sized.estimate.weights == SMOLLM2_SAFETENSORS
    missing = size_model("org/absent", extra_args=[], max_model_len=None, tp=1, sequences=4, device_total=80 * GIB,
                         device_kind="cuda")  # fmt: skip
    assert missing.estimate is None and "not in the local Hugging Face cache" in missing.reason


def test_fallbacks(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", SMOLLM2, SMOLLM2_SAFETENSORS)

    def size(**kw: Any) -> Any:
        args: dict[str, Any] = {"extra_args": [], "max_model_len": None, "tp": 1, "sequences": 4}
        args.update(device_total=80 * GIB, device_kind="cuda")
        args.update(kw)
        return size_model(str(folder), **args)

    assert "vLLM's flags decide" in size(extra_args=["--kv-cache-memory-bytes", "1000000"]).reason
    assert "vLLM's flags decide" in size(extra_args=["--gpu-memory-utilization=0.3"]).reason
    too_big = size(device_total=2 * GIB)
    assert too_big.estimate is None and "exceeds the device" in too_big.reason
    assert "not a local folder" in size_model("/nonexistent/x", extra_args=[], max_model_len=None, tp=1,
                                              sequences=4, device_total=GIB, device_kind="cuda").reason  # fmt: skip
    (folder / "config.json").write_text("[1, 2]")
    assert "cannot read" in size().reason


def test_models_yaml_keys() -> None:
    models = parse_models({"a": {"memory": "auto", "auto_memory_sequences": 8}, "b": {"memory": "default"}})
    assert models.models["a"].memory == "auto" and models.models["a"].auto_memory_sequences == 8
    with pytest.raises(ConfigError, match="memory: auto sizes the memory itself"):
        parse_models({"a": {"memory": "auto", "gpu_memory_gib": 4}})
    with pytest.raises(ConfigError, match="memory"):
        parse_models({"a": {"memory": "lots"}})


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLAMA_AUTO_MEMORY", "1")
    monkeypatch.setenv("VLLAMA_AUTO_MEMORY_SEQUENCES", "2")
    monkeypatch.setenv("VLLAMA_POOL_SIZE", "0")
    monkeypatch.setenv("VLLAMA_POOL_FORK", "off")
    s = Settings.from_env()
    assert s.auto_memory and s.auto_memory_sequences == 2 and s.pool_size == 0 and not s.pool_fork
    monkeypatch.setenv("VLLAMA_AUTO_MEMORY", "maybe")
    with pytest.raises(ConfigError, match="VLLAMA_AUTO_MEMORY"):
        Settings.from_env()


# --- the manager --------------------------------------------------------------------------------------------


def test_manager_need_for(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", SMOLLM2, SMOLLM2_SAFETENSORS)
    settings = Settings(home=tmp_path / "home")
    manager = Manager(settings, LedgerProbe(tmp_path / "ledger", [80 * GIB]))
    total = 80 * GIB
    plain = parse_models({"m": {"model": str(folder)}}).models["m"]
    assert manager.need_for(plain, total, "m") == (int(0.9 * total), 0.9)  # vLLM's default: auto is off
    auto = parse_models({"m": {"model": str(folder), "memory": "auto", "max_model_len": 2048}}).models["m"]
    need, util = manager.need_for(auto, total, "m")
    expected = estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS, max_model_len=2048).total
    assert need == expected and util is not None and util * total >= need and util < 0.05
    settings.auto_memory = True  # the daemon default applies to models without a memory setting...
    assert manager.need_for(plain, total, "m")[0] == estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS).total
    explicit = parse_models({"m": {"model": str(folder), "gpu_memory_utilization": 0.3}}).models["m"]
    assert manager.need_for(explicit, total, "m") == (int(0.3 * total), 0.3)  # ...not to explicit ones
    opted_out = parse_models({"m": {"model": str(folder), "memory": "default"}}).models["m"]
    assert manager.need_for(opted_out, total, "m") == (int(0.9 * total), 0.9)


def test_daemon_starts_an_auto_sized_model(fake_daemon: Daemon, tmp_path: Path) -> None:
    """Through the daemon on a simulated 8 GiB GPU: the model is placed with its estimate, vLLM gets the KV cache
    size and a utilization that covers the estimate, and ps/info say so."""
    folder = model_folder(tmp_path / "small", SMOLLM2, SMOLLM2_SAFETENSORS)
    fake_daemon.write_models({"small": {"model": str(folder), "memory": "auto", "max_model_len": 1024}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        r = c.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        row = next(m for m in c.get("/vllama/ps").json()["models"] if m["model"] == "small")
    e = estimate(SMOLLM2, weights_on_disk=SMOLLM2_SAFETENSORS, max_model_len=1024, device_total=8 * GIB)
    assert row["need_bytes"] == e.total and row["memory_estimate"]["kv_cache"] == e.kv_cache
    assert row["memory_sizing"].startswith("auto memory:")
    command = Path(row["log"]).read_text().splitlines()[0]
    assert f"{KV_FLAG} {e.kv_cache}" in command
    util = float(command.split("--gpu-memory-utilization ")[1].split()[0])
    assert util * 8 * GIB >= e.total
    # the fake engine claims utilization × total, as vLLM's start-up check asks for: about the estimate
    held = sum(sum(v.values()) for v in row_memory(fake_daemon).values())
    assert e.total <= held <= e.total + 0.001 * 8 * GIB


def row_memory(daemon: Daemon) -> dict[str, dict[str, int]]:
    deadline = time.monotonic() + 5
    while True:
        rows = httpx.get(f"{daemon.url}/vllama/ps", timeout=10).json()["models"]
        memory = {r["model"]: r["memory_bytes"] for r in rows if r["memory_bytes"]}
        if memory or time.monotonic() > deadline:
            return memory
        time.sleep(0.1)
