"""LoRA adapters on demand (vllama/lora.py): the pure slot decision as a table, the launch flags and HTTP helpers
of vllama/engine.py, the sizing of the LoRA slots, and the whole lifecycle through a real `vllama serve` over fake
engines, which speak vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter and refuse a load beyond
--max-loras (stricter than vLLM), so a vllama that forgets to unload fails here. Fake engines answer an adapter's
requests with "<adapter>: <words>" and drop every adapter at a level-2 sleep.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, engine_client
from vllama import engine as eng
from vllama.config import ModelConfig
from vllama.lora import SlotPlan, plan_slots
from vllama.sizing import GIB, estimate, lora_bytes

# --- the pure decision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loaded", "in_flight", "max_loras", "want", "plan"),
    [
        ([], {}, 1, "a", SlotPlan()),  # a free slot: load
        (["a"], {}, 1, "a", SlotPlan(load=False)),  # loaded already
        (["a"], {"a": 3}, 1, "a", SlotPlan(load=False)),  # loaded and busy: still served
        (["a"], {}, 2, "b", SlotPlan()),
        (["a", "b"], {}, 2, "c", SlotPlan(unload=("a",))),  # least recently used first
        (["b", "a"], {}, 2, "c", SlotPlan(unload=("b",))),
        (["a", "b"], {"a": 1}, 2, "c", SlotPlan(unload=("b",))),  # never one with requests in flight
        (["a", "b"], {"a": 1, "b": 2}, 2, "c", SlotPlan(load=False, wait=True)),  # all busy: wait
        (["a"], {"a": 1}, 1, "b", SlotPlan(load=False, wait=True)),
        (["a", "b", "c"], {}, 2, "d", SlotPlan(unload=("a", "b"))),  # over the limit (flags changed): back under
        (["a", "b", "c"], {"b": 1}, 2, "d", SlotPlan(unload=("a", "c"))),
        (["a", "b", "c"], {"a": 1, "b": 1}, 2, "d", SlotPlan(load=False, wait=True)),
        (["a", "b"], {"a": 0}, 2, "c", SlotPlan(unload=("a",))),  # a zero count is idle
    ],
)
def test_plan_slots(loaded: list[str], in_flight: dict[str, int], max_loras: int, want: str, plan: SlotPlan) -> None:
    assert plan_slots(loaded, in_flight, max_loras, want) == plan


# --- launch flags, ranks, sizing -------------------------------------------------------------------------------


def adapter(folder: Path, rank: int = 8) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def launch(cfg: ModelConfig) -> eng.LaunchSpec:
    return eng.build_launch(
        name="base", cfg=cfg, vllm_command=["vllm"], port=1234, devices=(0,), device_kind="cpu",
        gpu_memory_utilization=None, logs_dir=Path("/tmp"), sleep_mode=False,
    )  # fmt: skip


def test_launch_enables_lora_with_ranks_read_from_the_adapters(tmp_path: Path) -> None:
    cfg = ModelConfig(adapters={"a": adapter(tmp_path / "a", 8), "b": adapter(tmp_path / "b", 12), "c": "/gone"})
    spec = launch(cfg)
    # 12 rounds up to vLLM's 16; the missing adapter is skipped (its requests fail when it is loaded)
    assert spec.argv[-5:] == ["--enable-lora", "--max-loras", "3", "--max-lora-rank", "16"]
    assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert eng.launch_lora_settings(spec.argv) == (3, 16)


def test_launch_settings_from_config_and_users_own_flags() -> None:
    cfg = ModelConfig(adapters={f"a{i}": f"/x/{i}" for i in range(9)}, max_lora_rank=64)
    assert eng.lora_launch(cfg) == eng.LoraLaunch(eng.DEFAULT_MAX_LORAS_CAP, 64, "max_lora_rank")
    assert eng.lora_launch(ModelConfig(adapters={"a": "/x"}, max_loras=7)) == eng.LoraLaunch(
        7, eng.DEFAULT_LORA_RANK, "the adapters' adapter_config.json (set max_lora_rank to choose)"
    )
    own = ModelConfig(adapters={"a": "/x"}, extra_args=["--enable-lora", "--max-loras=5"])
    spec = launch(own)
    assert spec.argv.count("--enable-lora") == 1 and "--max-lora-rank" not in spec.argv
    assert eng.launch_lora_settings(spec.argv) == (5, eng.DEFAULT_LORA_RANK)
    plain = launch(ModelConfig())
    assert eng.launch_lora_settings(plain.argv) is None and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"r": 8}, 8),
        ({"r": 8, "rank_pattern": {"q_proj": 32}}, 32),
        ({"r": 0}, "no valid rank"),
        ({"lora_alpha": 16}, "no valid rank"),
        ("not json", "cannot be read"),
        (None, "has no adapter_config.json"),
    ],
)
def test_read_adapter_rank(tmp_path: Path, content: Any, expected: int | str) -> None:
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / "adapter_config.json").write_text(text)
    if isinstance(expected, int):
        assert eng.read_adapter_rank(tmp_path) == expected
    else:
        with pytest.raises(eng.LoraError, match=expected):
            eng.read_adapter_rank(tmp_path)


def test_rank_limit_for() -> None:
    assert [eng.rank_limit_for(r) for r in (1, 2, 8, 9, 300, 512, 513)] == [1, 8, 8, 16, 320, 512, None]


def test_lora_slots_are_in_the_memory_need() -> None:
    llama8b = {
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16",
    }  # fmt: skip
    # rank × layers × Σ(in + out) of q, k, v, o, gate, up, down × 2 bytes, per slot
    per_slot = 16 * 32 * (8192 + 2 * 5120 + 8192 + 2 * 18432 + 18432) * 2
    assert lora_bytes(llama8b, max_loras=4, max_rank=16, element_bytes=2) == 4 * per_slot
    assert 0.2 * GIB < 4 * per_slot < 0.4 * GIB  # small next to the model
    plain = estimate(llama8b, weights_on_disk=16 * GIB, max_model_len=4096)
    with_lora = estimate(llama8b, weights_on_disk=16 * GIB, max_model_len=4096, lora_slots=4, lora_rank=16)
    assert plain.lora == 0 and with_lora.lora == 4 * per_slot
    assert with_lora.total - plain.total == 4 * per_slot
    assert "LoRA slots 0.31" in with_lora.describe()


# --- the lifecycle through vllama over fake engines ------------------------------------------------------------


def completion(c: httpx.Client, model: str, text: str = "hello there", **extra: Any) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 3, **extra})


def fake_stats(daemon: Daemon, model: str) -> dict[str, Any]:
    row = next(r for r in httpx.get(f"{daemon.url}/vllama/ps").json()["models"] if r["model"] == model)
    with engine_client(row) as child:
        stats: dict[str, Any] = child.get("/fake/stats").json()
    return stats


def ps_adapters(daemon: Daemon, model: str) -> dict[str, dict[str, Any]]:
    row = next(r for r in httpx.get(f"{daemon.url}/vllama/ps").json()["models"] if r["model"] == model)
    return {a["name"]: a for a in row["adapters"]}


@pytest.fixture
def lora_daemon(fake_daemon: Daemon, tmp_path: Path) -> Daemon:
    names = ["a", "b", "c"]
    adapters = {n: adapter(tmp_path / "adapters" / n) for n in names}
    adapters["wide"] = adapter(tmp_path / "adapters" / "wide", rank=64)
    adapters["missing"] = str(tmp_path / "adapters" / "missing")
    fake_daemon.write_models(
        {
            "base": {"gpu_memory_gib": 2, "adapters": adapters, "max_loras": 2, "max_lora_rank": 8},
            "other": {"gpu_memory_gib": 2},
        }
    )
    fake_daemon.env["VLLAMA_CAPACITY_WAIT"] = "1.5"  # how long a request waits for a busy LoRA slot
    fake_daemon.start()
    return fake_daemon


def test_adapter_requests_load_on_demand_and_rotate_lru(lora_daemon: Daemon) -> None:
    with lora_daemon.client() as c:
        base = completion(c, "base")
        assert base.status_code == 200, base.text
        assert base.json()["choices"][0]["text"].startswith("echo:")
        for name in ["a", "b", "a", "c", "b", "a"]:  # 3 adapters over 2 slots
            r = completion(c, name)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"].startswith(f"{name}:")  # the adapter answered, not the base
            assert r.json()["model"] == name
        stats = fake_stats(lora_daemon, "base")
        # a, b loaded; c evicts a (LRU); b used; a evicts c (b was used after c)
        assert sorted(stats["loras"]) == ["a", "b"]
        assert (stats["lora_loads"], stats["lora_unloads"]) == (5, 3)
        listing = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert listing["a"]["parent"] == "base" and listing["a"]["vllama"]["loaded"] is True
        assert listing["c"]["vllama"]["loaded"] is False and listing["c"]["vllama"]["base"] == "base"
        assert listing["base"]["vllama"]["state"] == "running"
        assert {n for n, a in ps_adapters(lora_daemon, "base").items() if a["loaded"]} == {"a", "b"}
        tags = {m["name"]: m for m in c.get("/api/tags").json()["models"]}
        assert tags["b"]["details"]["parent_model"] == "base"
        metrics = c.get("/metrics").text
        assert 'vllama_lora_operations_total{adapter="a",model="base",operation="load",outcome="ok"} 2.0' in metrics
        assert 'vllama_lora_loaded{adapter="a",model="base"} 1.0' in metrics
        assert 'vllama_lora_loaded{adapter="c",model="base"} 0.0' in metrics
    shown = lora_daemon.cli("ps")
    assert "base + adapter a: loaded" in shown.stdout and "base + adapter c: not loaded" in shown.stdout


def test_adapter_in_flight_is_never_unloaded_and_a_full_house_waits(lora_daemon: Daemon) -> None:
    slow = {"max_tokens": 20, "fake_token_rate": 20}  # ~1 s
    with lora_daemon.client() as c:
        assert completion(c, "a").status_code == 200
        assert completion(c, "b").status_code == 200
    with ThreadPoolExecutor(4) as pool:
        # a busy, b idle: c takes b's slot at once, without waiting for a
        busy_a = pool.submit(lambda: completion(httpx.Client(base_url=lora_daemon.url, timeout=30), "a", **slow))
        time.sleep(0.3)
        t0 = time.monotonic()
        with lora_daemon.client() as c:
            assert completion(c, "c").status_code == 200
        assert time.monotonic() - t0 < 0.7
        assert busy_a.result().status_code == 200
        # a and c both busy: b waits for a slot and gets it when one finishes
        busy = [
            pool.submit(lambda n=n: completion(httpx.Client(base_url=lora_daemon.url, timeout=30), n, **slow))
            for n in ("a", "c")
        ]
        time.sleep(0.3)
        t0 = time.monotonic()
        with lora_daemon.client() as c:
            waited = completion(c, "b")
        assert waited.status_code == 200, waited.text
        assert time.monotonic() - t0 > 0.4  # it waited for a request to finish
        assert all(f.result().status_code == 200 for f in busy)
        # both busy for longer than the wait (1.5 s): a clear 503 naming the setting to change
        very_slow = {"max_tokens": 60, "fake_token_rate": 20}  # ~3 s
        names = list(fake_stats(lora_daemon, "base")["loras"])
        busy = [
            pool.submit(lambda n=n: completion(httpx.Client(base_url=lora_daemon.url, timeout=30), n, **very_slow))
            for n in names
        ]
        time.sleep(0.3)
        other = ({"a", "b", "c"} - set(names)).pop()
        with lora_daemon.client() as c:
            refused = completion(c, other)
            assert completion(c, "base").status_code == 200  # the base itself is not held up
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "adapter_unavailable" and "raise max_loras under base" in error["message"]
        assert all(f.result().status_code == 200 for f in busy)


def test_bad_adapters_are_clear_errors_and_disturb_nothing(lora_daemon: Daemon) -> None:
    with lora_daemon.client() as c:
        assert completion(c, "a").status_code == 200
        missing = completion(c, "missing")
        assert missing.status_code == 503
        message = missing.json()["error"]["message"]
        assert "adapter 'missing' of model 'base'" in message and "does not exist" in message
        wide = completion(c, "wide")
        assert wide.status_code == 503
        message = wide.json()["error"]["message"]
        assert "rank 64, above the max_lora_rank 8" in message and "set max_lora_rank: 64 under base" in message
        # nothing else disturbed: the loaded adapter and the base still answer, nothing was unloaded
        assert completion(c, "a").json()["choices"][0]["text"].startswith("a:")
        assert completion(c, "base").status_code == 200
        assert completion(c, "nonexistent-adapter").status_code == 404
    stats = fake_stats(lora_daemon, "base")
    assert stats["loras"] == ["a"] and stats["lora_unloads"] == 0


def test_a_lora_base_is_stopped_instead_of_level_2_and_restarts_with_no_adapter(lora_daemon: Daemon) -> None:
    """vLLM 0.26 cannot wake a LoRA-enabled model from sleep level 2 (bench/results/2026-11-27-h100-lora-wake):
    `vllama sleep --level 2` stops it and says why; the new process starts with no adapter, and vllama's books
    start over with it."""
    with lora_daemon.client() as c:
        assert completion(c, "a").status_code == 200
        assert completion(c, "b").status_code == 200
        done = lora_daemon.cli("sleep", "base", "--level", "2")
        assert done.returncode == 0 and "LoRA" in done.stdout + done.stderr, done
        assert not any(a["loaded"] for a in ps_adapters(lora_daemon, "base").values())
        r = completion(c, "b")
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("b:"), r.text
        assert fake_stats(lora_daemon, "base")["loras"] == ["b"]
