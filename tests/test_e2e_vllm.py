"""End to end with real vLLM (the CPU build) behind a real `vllama serve`, talked to with the official `openai`
client, plain HTTP and the CLI. One daemon is shared by the tests of this module, in order: each real vLLM
start costs 30–50 s on two cores, so every start here proves something.

The CPU "device" gets a 10 GiB budget and the two real models need 6 GiB each, so only one fits at a time:
asking for the second stops the idle first (the CPU build has no sleep mode, so eviction means stopping).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import Daemon, base_env, free_port, wait_until_gone
from vllama.offline_models import prepare

pytestmark = pytest.mark.vllm

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
TINY = "tiny-chat"
BROKEN = "broken-model"


@pytest.fixture(scope="session")
def offline_models() -> dict[str, Path]:
    dest = Path(os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models")).expanduser()
    return prepare(dest, ["tiny", "smollm2", "minilm"])


def models_yaml(models: dict[str, Path]) -> dict[str, object]:
    eager = ["--enforce-eager"]
    return {
        CHAT: {"model": str(models["smollm2"]), "gpu_memory_gib": 6, "max_model_len": 1024, "extra_args": eager},
        EMBED: {"model": str(models["minilm"]), "gpu_memory_gib": 6, "extra_args": [*eager, "--runner", "pooling"]},
        TINY: {"model": str(models["tiny"]), "gpu_memory_gib": 3, "max_model_len": 512, "extra_args": eager},
        BROKEN: {"model": "/nonexistent/model-folder", "gpu_memory_gib": 1},
    }


def make_daemon(tmp: Path, models: dict[str, Path]) -> Daemon:
    home = tmp / "home"
    home.mkdir(parents=True)
    # no warm pool here: these tests count process groups (tests/test_e2e_pool.py covers pooled starts)
    env = base_env(
        home, VLLAMA_GPU_PROBE="cpu", VLLAMA_CPU_MEMORY_GIB="10", VLLAMA_STARTUP_TIMEOUT="400", VLLAMA_POOL_SIZE="0"
    )
    daemon = Daemon(home=home, port=free_port(), env=env)
    daemon.write_models(models_yaml(models))
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, offline_models: dict[str, Path]) -> Iterator[Daemon]:
    d = make_daemon(tmp_path_factory.mktemp("e2e"), offline_models)
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 30)


def ps(daemon: Daemon) -> dict[str, dict[str, object]]:
    rows = httpx.get(f"{daemon.url}/vllama/ps", timeout=30).json()["models"]
    return {r["model"]: r for r in rows}


def listening(pids: list[int]) -> tuple[set[str], set[str]]:
    """(addresses of the TCP/UDP sockets the processes listen on or have bound, paths of their Unix sockets)."""
    inet, unix = set(), set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            inet |= {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="inet") if not c.raddr}
            unix |= {c.laddr for c in proc.net_connections(kind="unix") if c.laddr}
        except psutil.Error:
            continue
    return inet, unix


def test_chat_through_openai_client_sync_async_and_streaming(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed", timeout=600)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=CHAT, messages=question, max_tokens=20, temperature=0)
    assert "Paris" in (answer.choices[0].message.content or "")

    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=CHAT, messages=question, max_tokens=20, temperature=0, stream=True
        )
        if chunk.choices
    ]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)

    async def async_calls() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="x", timeout=120)
        whole = await aclient.chat.completions.create(model=CHAT, messages=question, max_tokens=20, temperature=0)
        stream = await aclient.completions.create(
            model=CHAT, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return whole.choices[0].message.content or "", text

    whole, streamed = asyncio.run(async_calls())
    assert "Paris" in whole and "Paris" in streamed

    row = ps(daemon)[CHAT]
    assert row["state"] == "running" and row["in_flight"] == 0
    server = psutil.Process(int(row["pid"]))  # type: ignore[call-overload]
    cmdline = server.cmdline()
    assert "vllm.entrypoints.openai.api_server" in cmdline
    # the child serves on its Unix socket in vllama's 0700 socket folder (its sleep/RPC endpoints are
    # unauthenticated): the API server has no TCP or UDP socket; what else of its group listens on TCP (PyTorch
    # gloo's listeners in the CPU worker: no vLLM API behind them) is on loopback only
    assert cmdline[cmdline.index("--uds") + 1] == row["socket"] and "--port" not in cmdline, cmdline
    socket_dir = Path(str(row["socket"])).parent
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    inet, unix = listening([server.pid])
    assert inet == set() and row["socket"] in unix, (inet, unix)
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == os.getpgid(server.pid)]
    inet, _ = listening(group)
    assert {address.rpartition(":")[0] for address in inet} <= {"127.0.0.1"}, inet
    assert Path(str(row["log"])).is_file() and Path(str(row["log"])).parent == daemon.home / "logs"


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_score_rerank_evict_the_idle_chat_model(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", timeout=600)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    result = client.embeddings.create(model=EMBED, input=texts)
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2

    rows = ps(daemon)
    assert rows[EMBED]["state"] == "running"
    # 6 + 6 GiB do not fit a 10 GiB budget: the idle chat model was evicted (stopped: no sleep mode on CPU)
    assert rows[CHAT]["state"] == "stopped"
    assert f"to make room for {EMBED}" in str(rows[CHAT]["last_eviction"])

    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        score = http.post("/v1/score", json={"model": EMBED, "text_1": texts[0], "text_2": texts[1:]})
        assert score.status_code == 200, score.text
        scores = [d["score"] for d in score.json()["data"]]
        assert scores[0] > scores[1]
        rerank = http.post("/v1/rerank", json={"model": EMBED, "query": texts[0], "documents": texts[1:]})
        assert rerank.status_code == 200, rerank.text
        assert rerank.json()["results"][0]["index"] == 0


def test_concurrent_first_requests_start_one_process(daemon: Daemon) -> None:
    def ask(i: int) -> int:
        r = httpx.post(
            f"{daemon.url}/v1/completions",
            json={"model": TINY, "prompt": f"hello {i}", "max_tokens": 4},
            timeout=600,
        )
        return r.status_code

    groups_before = daemon.child_groups()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(ask, range(6)))
    assert codes == [200] * 6
    new_groups = daemon.child_groups() - groups_before
    assert len(new_groups) == 1, f"expected one new vLLM process group, got {new_groups}"
    rows = ps(daemon)
    assert rows[TINY]["state"] == "running"
    assert rows[EMBED]["state"] == "running"  # 3 + 6 GiB fit the budget: nothing evicted


def test_model_that_fails_to_start_is_a_clear_503(daemon: Daemon) -> None:
    r = httpx.post(f"{daemon.url}/v1/completions", json={"model": BROKEN, "prompt": "x"}, timeout=600)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "model_unavailable"
    assert BROKEN in error["message"] and "log: " in error["message"]
    log = Path(error["message"].rsplit("log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "/nonexistent/model-folder" in log.read_text()
    rows = ps(daemon)
    assert rows[BROKEN]["state"] == "error" and rows[BROKEN]["pid"] is None
    # the failed child's process group is gone: one group per instance that has a process
    assert len(daemon.child_groups()) == sum(1 for r in rows.values() if r["pid"])


def test_sleep_without_sleep_mode_says_so_and_stops(daemon: Daemon) -> None:
    result = daemon.cli("sleep", TINY, "--level", "2")
    assert result.returncode == 0, result.stderr
    assert "no sleep mode" in result.stdout and "stopped" in result.stdout
    assert ps(daemon)[TINY]["state"] == "stopped"


def test_sigkill_of_vllama_leaves_no_vllm_process(daemon: Daemon) -> None:
    assert ps(daemon)[EMBED]["state"] == "running"
    groups = daemon.child_groups()
    assert groups
    daemon.stop(signal.SIGKILL)
    left = wait_until_gone(groups, 30)
    assert not left, f"vLLM processes survived vllama's SIGKILL: {left}"


def test_sigterm_stops_children_gracefully_and_cli_start_shows_progress(
    tmp_path: Path, offline_models: dict[str, Path]
) -> None:
    daemon = make_daemon(tmp_path, offline_models)
    try:
        result = daemon.cli("start", TINY, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "Logs: " in result.stdout and f"{TINY} is running" in result.stdout
        groups = daemon.child_groups()
        assert len(groups) == 1
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert not wait_until_gone(groups, 30)
