"""The fake vLLM server (vllama.testing.fake_engine) as a real subprocess: its API shapes, its simulated GPU
memory ledger and the vLLM sleep-mode behaviour it mirrors (hangs, garbage after level 2, broken after OOM).

Devices: two of 8 GiB; the engine runs with --gpu-memory-utilization 0.5, so it needs 4 GiB and keeps a
0.5 GiB context while asleep. The test process itself can "hold" memory by writing its own ledger entry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vllama.gpu import GIB, read_ledger, write_ledger

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    def __init__(self, tmp: Path, args: list[str], env: dict[str, str]) -> None:
        self.port, self.ledger = free_port(), tmp / "ledger"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"engine-{self.port}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_ENGINE_", "VLLAMA_", "CUDA_"))}
        base |= {
            "VLLAMA_FAKE_GPU_LEDGER": str(self.ledger),
            "VLLAMA_FAKE_GPU_TOTAL_GIB": "8,8",
            "VLLM_SERVER_DEV_MODE": "1",
            "FAKE_ENGINE_STARTUP_S": "0",
            "FAKE_ENGINE_SLEEP_S": "0.01",
            "FAKE_ENGINE_WAKE_S": "0.01",
            "PYTHONPATH": str(ROOT),
        }
        cmd = [sys.executable, "-m", "vllama.testing.fake_engine", "--model", "/dev/null", "--served-model-name"]
        cmd += [MODEL, "--host", "127.0.0.1", "--port", str(self.port), "--gpu-memory-utilization", "0.5"]
        cmd += ["--enable-sleep-mode", "--dtype", "bfloat16", "--enforce-eager", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=base | env, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"fake engine exited early:\n{self.log()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return
            time.sleep(0.02)
        raise AssertionError(f"fake engine not ready:\n{self.log()}")

    def held(self) -> dict[int, int]:
        return read_ledger(self.ledger).get(self.proc.pid, {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    engines: list[Engine] = []

    def _spawn(*args: str, wait: bool = True, **env: str) -> Engine:
        engine = Engine(tmp_path, list(args), env)
        engines.append(engine)
        if wait:
            engine.wait_ready()
        return engine

    yield _spawn
    for engine in engines:
        engine.stop()
    with contextlib.suppress(OSError):
        (tmp_path / "ledger" / f"{os.getpid()}.json").unlink()


@pytest.fixture
async def engine(spawn: Any) -> Engine:
    return spawn()  # type: ignore[no-any-return]


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=engine.url, timeout=10) as c:
        yield c


def chat(content: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await client.get("/fake/stats")).json()  # type: ignore[no-any-return]


async def sse(response: httpx.Response) -> list[Any]:
    """The events of an SSE body, "[DONE]" kept as a string."""
    events, buffer = [], ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            assert event.startswith("data: "), event
            data = event.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    assert buffer == ""
    return events


async def test_models_health_version_and_errors(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert "version" in (await client.get("/version")).json()
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert (card["id"], card["object"], card["owned_by"], card["root"]) == (MODEL, "model", "vllm", "/dev/null")
    assert card["max_model_len"] == 2048

    r = await client.post("/v1/chat/completions", json={**chat(), "model": "nope"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    assert r.status_code == 400
    assert "maximum context length is 2048" in r.json()["error"]["message"]


async def test_chat_and_completions(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=6))
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello there world tok4 tok5"
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 6,
        "total_tokens": 10,
        "prompt_tokens_details": None,
    }
    body = (await client.post("/v1/chat/completions", json=chat(max_tokens=6, stop=["there"]))).json()
    assert body["choices"][0]["message"]["content"] == "echo: hello"
    assert body["choices"][0]["finish_reason"] == "stop"

    body = (await client.post("/v1/completions", json={"model": MODEL, "prompt": "a b"})).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"].split() == ["echo:", "a", "b", *(f"tok{i}" for i in range(3, 16))]
    assert (await stats(client))["served"] == 3


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    req = chat(max_tokens=5, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = await sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "echo: hello there world tok4"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 6 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5

    req = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}
    async with client.stream("POST", "/v1/completions", json=req) as r:
        events = await sse(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "echo: x tok2"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


async def until(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll `check()` (a coroutine function) until it is truthy; `timeout` is only a hang detector."""
    for _ in range(int(timeout / 0.02)):
        if value := await check():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_stream_pacing_and_disconnect(engine: Engine, client: httpx.AsyncClient, tmp_path: Path) -> None:
    # paced at 1 token/s, 100 tokens take 99 s: still in flight (not answered) after the first token, in either
    # form; a client that goes away cancels it
    slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat(max_tokens=100, fake_token_rate=1)))
    await until("the paced answer in flight", lambda: _in_flight(client, 1))
    assert not slow.done(), "a paced answer came at once"
    slow.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await slow
    await until("the paced answer cancelled", lambda: _cancelled(client, 1))

    req = chat(max_tokens=1000, stream=True, fake_token_rate=1)
    async with client.stream("POST", "/v1/chat/completions", json=req) as r:
        events = []
        # keep the iterator: a `break` out of `async for line in r.aiter_lines()` drops the last reference to the
        # generator, whose finalizer (asyncio's asyncgen hook) then closes it, and httpcore closes the connection
        # under it: the engine saw the client go away before the stats below were read (a flake under load)
        lines = r.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 2:  # the role chunk and the first token
                break
        assert events[1]["choices"][0]["delta"]["content"] == "echo:"
        assert (await stats(client))["in_flight"] == 1, "a paced stream ended at once"
    s = await until("the paced stream cancelled", lambda: _cancelled(client, 2))  # gone after the first token
    assert s["in_flight"] == 0 and s["served"] == 0

    # a hold gate: nothing after the first token until the gate file exists, then the rest
    gate = tmp_path / "hold"
    req = chat(max_tokens=6, stream=True, fake_hold=str(gate))
    async with client.stream("POST", "/v1/chat/completions", json=req) as r:
        lines = r.aiter_lines()
        got = []
        async for line in lines:
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 2:
                break
        assert (await stats(client))["in_flight"] == 1
        gate.touch()
        events = [json.loads(x.removeprefix("data: ")) for x in got]
        events += [json.loads(x.removeprefix("data: ")) async for x in lines if x.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == "echo: hello there world tok4 tok5"
    assert (await stats(client)).items() >= {"served": 1, "in_flight": 0, "cancelled": 2}.items()
    assert "Traceback" not in engine.log() and "Error handling request" not in engine.log()


async def _in_flight(client: httpx.AsyncClient, n: int) -> bool:
    return bool((await stats(client))["in_flight"] == n)


async def _cancelled(client: httpx.AsyncClient, n: int) -> dict[str, Any] | None:
    s = await stats(client)
    return s if s["cancelled"] == n else None


async def test_embeddings_score_rerank(client: httpx.AsyncClient) -> None:
    texts = ["the cat sat on the mat", "a cat sat on a mat", "quantum chromodynamics lecture notes"]
    body = (await client.post("/v1/embeddings", json={"model": MODEL, "input": texts})).json()
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
    vecs = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and len(vecs[0]) == 16
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in vecs)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > 0.5 > cos(vecs[0], vecs[2])
    b64 = (await client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})).json()
    decoded = struct.unpack("<16f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(decoded, vecs[0], strict=True))

    score = (await client.post("/v1/score", json={"text_1": texts[0], "text_2": texts[1:]})).json()
    assert [d["object"] for d in score["data"]] == ["score", "score"]
    assert math.isclose(score["data"][0]["score"], cos(vecs[0], vecs[1]))
    rerank = (await client.post("/v1/rerank", json={"query": texts[0], "documents": texts[::-1], "top_n": 2})).json()
    assert [r["index"] for r in rerank["results"]] == [2, 1]  # the query itself first, then its paraphrase
    assert rerank["results"][0]["document"] == {"text": texts[0]}


async def test_sleep_l1_frees_memory_and_requests_wait_for_wake(engine: Engine, client: httpx.AsyncClient) -> None:
    assert engine.held() == {0: 4 * GIB}
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await client.post("/sleep", params={"level": 1})).status_code == 200
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    assert engine.held() == {0: GIB // 2}
    assert (await client.get("/health")).status_code == 200  # health stays up while asleep

    pending = asyncio.create_task(client.post("/v1/chat/completions", json=chat(max_tokens=3)))
    await until("the request in flight", lambda: _in_flight(client, 1))
    # it hangs, like real vLLM: no error, no auto-wake; still waiting right before the wake
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    assert (await stats(client)).items() >= {"in_flight": 1, "served": 0}.items()
    assert not pending.done()
    assert (await client.post("/wake_up")).status_code == 200
    r = await asyncio.wait_for(pending, 30)
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello there"  # L1 keeps the weights
    assert engine.held() == {0: 4 * GIB}
    assert (await stats(client))["sleeping"] is False


async def test_sleep_with_requests_in_flight_is_refused(client: httpx.AsyncClient) -> None:
    pending = asyncio.create_task(client.post("/v1/chat/completions", json=chat(max_tokens=20, fake_token_rate=50)))
    for _ in range(200):
        if (await stats(client))["in_flight"]:
            break
        await asyncio.sleep(0.01)
    r = await client.post("/sleep", params={"level": 1})
    assert r.status_code == 500 and "in flight" in r.json()["error"]["message"]
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await pending).status_code == 200


async def test_level2_wake_needs_reload_weights(engine: Engine, client: httpx.AsyncClient) -> None:
    assert (await client.post("/sleep", params={"level": 2})).status_code == 200
    assert (await stats(client))["level"] == 2
    assert engine.held() == {0: GIB // 2}
    assert (await client.post("/wake_up")).status_code == 200  # plain wake after L2: garbage
    body = (await client.post("/v1/chat/completions", json=chat(max_tokens=4))).json()
    assert body["choices"][0]["message"]["content"] == "" and body["usage"]["completion_tokens"] == 4

    assert (await client.post("/sleep", params={"level": 2})).status_code == 200
    assert (await client.post("/wake_up", params={"tags": "weights"})).status_code == 200
    assert engine.held() == {0: 4 * GIB}
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}  # kv cache still asleep
    r = await client.post("/collective_rpc", json={"method": "reload_weights"})
    assert r.status_code == 200 and r.json() == {"results": [None]}
    assert (await client.post("/wake_up", params={"tags": "kv_cache"})).status_code == 200
    assert (await client.post("/reset_prefix_cache")).status_code == 200
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    body = (await client.post("/v1/chat/completions", json=chat(max_tokens=4))).json()
    assert body["choices"][0]["message"]["content"] == "echo: hello there world"


async def test_wake_without_room_breaks_the_engine(engine: Engine, client: httpx.AsyncClient) -> None:
    assert (await client.post("/sleep", params={"level": 1})).status_code == 200
    write_ledger(engine.ledger, os.getpid(), {0: 7 * GIB})  # someone else took the GPU meanwhile
    r = await client.post("/wake_up")
    assert r.status_code == 500 and "CUDA Error: out of memory" in r.json()["error"]["message"]
    s = await stats(client)
    assert s["broken"] is True and s["sleeping"] is True
    assert engine.held() == {0: GIB // 2 + GIB // 4}  # residue + half of the 0.5 GiB that was free
    (engine.ledger / f"{os.getpid()}.json").unlink()
    r = await client.post("/wake_up")  # room again, but the engine is broken for good
    assert r.status_code == 500 and "invalid argument" in r.json()["error"]["message"]


def test_startup_needs_free_memory_on_every_device(spawn: Any, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    write_ledger(ledger, os.getpid(), {1: 6 * GIB})
    engine = spawn("--tensor-parallel-size", "2", wait=False, CUDA_VISIBLE_DEVICES="0,1")
    assert engine.proc.wait(10) == 1
    assert (
        "ValueError: Free memory on device cuda:1 (2.00/8.00 GiB) on startup is less than desired GPU memory "
        "utilization (0.5, 4.00 GiB)"
    ) in engine.log()
    assert set(read_ledger(ledger)) == {os.getpid()}

    write_ledger(ledger, os.getpid(), {1: 2 * GIB})  # now 6 GiB free on device 1: fits, on both devices
    engine = spawn("-tp", "2", CUDA_VISIBLE_DEVICES="1,0")
    assert engine.held() == {0: 4 * GIB, 1: 4 * GIB}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"FAKE_ENGINE_FAIL": "boom"}, "RuntimeError: boom"),
        (("--model", "/no/such/model"), {}, "/no/such/model does not exist"),
        (("-tp", "2"), {}, "World size (2) is larger than the number of available GPUs (1)"),
    ],
)
def test_startup_failures_exit_1(spawn: Any, args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    engine = spawn(*args, wait=False, **env)
    assert engine.proc.wait(10) == 1
    assert message in engine.log()
    assert read_ledger(engine.ledger) == {}


def test_hang_never_opens_the_port(spawn: Any) -> None:
    engine = spawn(wait=False, FAKE_ENGINE_HANG="1")
    wait_log(engine, "hanging before the port opens")
    with pytest.raises(httpx.ConnectError):
        httpx.get(engine.url + "/health")
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(30) == 0


def test_start_gate_holds_the_port_until_the_file_exists(spawn: Any, tmp_path: Path) -> None:
    gate = tmp_path / "start-gate"
    engine = spawn(wait=False, FAKE_ENGINE_START_GATE=str(gate))
    wait_log(engine, "before opening the port (FAKE_ENGINE_START_GATE)")
    assert engine.held() == {0: 4 * GIB}  # the memory is claimed; the port is not open
    with pytest.raises(httpx.ConnectError):
        httpx.get(engine.url + "/health")
    gate.touch()
    engine.wait_ready(30)
    assert httpx.get(engine.url + "/health").status_code == 200


def wait_log(engine: Engine, text: str, timeout: float = 30.0) -> None:
    """Wait until the engine's log shows `text` (`timeout` is only a hang detector)."""
    deadline = time.monotonic() + timeout
    while text not in engine.log():
        assert engine.proc.poll() is None, f"fake engine exited:\n{engine.log()}"
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{engine.log()}"
        time.sleep(0.02)


async def test_sigterm_exits_fast_and_releases_memory(engine: Engine, client: httpx.AsyncClient) -> None:
    """SIGTERM ends the engine without waiting for a request in flight (one that would take 1000 s)."""
    req = chat(max_tokens=1000, stream=True, fake_token_rate=1)
    async with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert engine.held() == {0: 4 * GIB}
        engine.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(httpx.HTTPError):
            async for _ in r.aiter_bytes():
                pass
        assert await asyncio.to_thread(engine.proc.wait, 30) == 0  # 30 s: a hang detector
    assert read_ledger(engine.ledger) == {} and not list(engine.ledger.glob("*.json"))


def test_sleep_api_needs_dev_mode(spawn: Any) -> None:
    engine = spawn(VLLM_SERVER_DEV_MODE="0")
    assert httpx.post(engine.url + "/sleep?level=1").status_code == 404
    assert httpx.get(engine.url + "/is_sleeping").status_code == 404
    assert httpx.get(engine.url + "/health").status_code == 200
