"""The Ollama API (/api/*) against a daemon over fake engines: response shapes field by field (as Ollama's API
documentation gives them), streaming as NDJSON, option translation, keep_alive, errors, and the official
`ollama` Python client."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.conftest import Daemon, engine_client
from tests.ecosystem import GIB, ps_rows, running_daemon, wait_for
from vllama.api import ollama as ol
from vllama.errors import UpstreamError

# --- the shapes of Ollama's answers, from its API documentation (docs/api.md) --------------------------------
GENERATE_CHUNK = {"model", "created_at", "response", "done"}
GENERATE_FINAL = GENERATE_CHUNK | {
    "done_reason",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}
CHAT_CHUNK = {"model", "created_at", "message", "done"}
CHAT_FINAL = CHAT_CHUNK | (GENERATE_FINAL - GENERATE_CHUNK)
MESSAGE = {"role", "content"}
COUNTERS = GENERATE_FINAL - GENERATE_CHUNK - {"done_reason"}
EMBED = {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
TAGS_MODEL = {"name", "model", "modified_at", "size", "digest", "details"}
DETAILS = {"parent_model", "format", "family", "families", "parameter_size", "quantization_level"}
PS_MODEL = {"name", "model", "size", "digest", "details", "expires_at", "size_vram"}
SHOW = {"modelfile", "parameters", "template", "details", "model_info"}
LOADED = {"model", "created_at", "response", "done", "done_reason"}

MODELS: dict[str, Any] = {
    "chat": {"gpu_memory_gib": 1, "aliases": ["chatty"]},
    "embedder": {"gpu_memory_gib": 1},
    "slow": {"gpu_memory_gib": 1, "env": {"FAKE_ENGINE_TOKEN_RATE": "20"}},
    "ka-zero": {"gpu_memory_gib": 1},
    "ka-forever": {"gpu_memory_gib": 1},
    "ka-ten": {"gpu_memory_gib": 1},
    "pinned": {"gpu_memory_gib": 1, "pinned": True},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # the keep-alive loop runs rarely here: an unload after keep_alive 0 must not wait for it
    with running_daemon(tmp_path_factory.mktemp("ollama"), MODELS, VLLAMA_KEEP_ALIVE_INTERVAL="60") as d:
        yield d


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c


def timestamp(text: str) -> datetime:
    """Ollama's created_at / modified_at / expires_at: RFC 3339 with a zone."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def check_counters(final: dict[str, Any]) -> None:
    for key in COUNTERS:
        assert isinstance(final[key], int) and final[key] >= 0, (key, final[key])
    assert final["total_duration"] >= final["load_duration"]
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["prompt_eval_count"] > 0 and final["eval_count"] > 0


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_version(api: httpx.Client) -> None:
    r = api.get("/api/version")
    assert r.status_code == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+", r.json()["version"])


def test_tags_lists_configured_models(api: httpx.Client) -> None:
    body = api.get("/api/tags").json()
    assert set(body) == {"models"}
    by_name = {m["name"]: m for m in body["models"]}
    assert set(MODELS) <= set(by_name)
    for m in by_name.values():
        assert set(m) == TAGS_MODEL
        assert set(m["details"]) == DETAILS
        assert m["model"] == m["name"]
        assert re.fullmatch(r"[0-9a-f]{64}", m["digest"])
        assert isinstance(m["size"], int)
        timestamp(m["modified_at"])


def test_tags_reads_a_local_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    info = ol.describe("tiny", ol.ModelConfig(model=str(folder)), 0.0)
    assert info["size"] == 1000 + len(json.dumps({"model_type": "llama"}))
    assert info["details"]["format"] == "safetensors"
    assert info["details"]["family"] == "llama" and info["details"]["families"] == ["llama"]


def test_chat_streams_ndjson_by_default(api: httpx.Client) -> None:
    r = api.post("/api/chat", json={"model": "chat", "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200
    lines = ndjson(r)
    *chunks, final = lines
    assert chunks, lines
    for chunk in chunks:
        assert set(chunk) == CHAT_CHUNK
        assert chunk["done"] is False and chunk["model"] == "chat"
        assert set(chunk["message"]) == MESSAGE and chunk["message"]["role"] == "assistant"
        timestamp(chunk["created_at"])
    text = "".join(c["message"]["content"] for c in chunks)
    assert text.startswith("echo: hello there")
    assert set(final) == CHAT_FINAL
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "length"  # the fake answers 16 tokens unless told otherwise
    assert final["eval_count"] == 16 == len(chunks)
    check_counters(final)


def test_chat_without_streaming(api: httpx.Client) -> None:
    r = api.post(
        "/api/chat",
        json={
            "model": "chat",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
            "stream": False,
            "options": {"num_predict": 3, "temperature": 0, "seed": 1, "top_p": 0.9},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == CHAT_FINAL
    assert body["message"] == {"role": "assistant", "content": "echo: one two"}  # num_predict → max_tokens
    assert body["done"] is True and body["done_reason"] == "length" and body["eval_count"] == 3
    check_counters(body)


def test_stop_option_ends_with_done_reason_stop(api: httpx.Client) -> None:
    body = api.post(
        "/api/chat",
        json={
            "model": "chat",
            "messages": [{"role": "user", "content": "alpha beta gamma"}],
            "options": {"stop": ["gamma"]},
            "stream": False,
        },
    ).json()
    assert body["message"]["content"] == "echo: alpha beta"
    assert body["done_reason"] == "stop"


def test_generate_stream_and_not(api: httpx.Client) -> None:
    r = api.post(
        "/api/generate", json={"model": "chat", "prompt": "why is the sky blue", "options": {"num_predict": 4}}
    )
    *chunks, final = ndjson(r)
    for chunk in chunks:
        assert set(chunk) == GENERATE_CHUNK and chunk["done"] is False
    assert "".join(c["response"] for c in chunks) == "echo: why is the"
    assert set(final) == GENERATE_FINAL and final["response"] == "" and final["done"] is True
    check_counters(final)

    body = api.post("/api/generate", json={"model": "chat", "prompt": "why", "stream": False, "raw": True}).json()
    assert set(body) == GENERATE_FINAL
    assert body["response"].startswith("echo: why tok2")  # raw: the completions endpoint, prompt as is
    check_counters(body)


def test_generate_empty_prompt_loads_and_keep_alive_zero_unloads(api: httpx.Client, daemon: Daemon) -> None:
    body = api.post("/api/generate", json={"model": "ka-zero"}).json()
    assert set(body) == LOADED and body["done_reason"] == "load" and body["response"] == ""
    assert ps_rows(daemon)["ka-zero"]["state"] == "running"
    body = api.post("/api/generate", json={"model": "ka-zero", "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and body["done"] is True
    assert ps_rows(daemon)["ka-zero"]["state"] == "stopped"

    body = api.post("/api/chat", json={"model": "ka-zero", "messages": []}).json()
    assert body["done_reason"] == "load" and body["message"] == {"role": "assistant", "content": ""}
    assert (
        api.post("/api/chat", json={"model": "ka-zero", "messages": [], "keep_alive": "0s"}).json()["done_reason"]
        == "unload"
    )
    assert ps_rows(daemon)["ka-zero"]["state"] == "stopped"


def test_keep_alive_zero_unloads_right_after_the_request(api: httpx.Client, daemon: Daemon) -> None:
    t0 = time.monotonic()
    r = api.post(
        "/api/chat", json={"model": "ka-zero", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0}
    )
    assert r.status_code == 200 and ndjson(r)[-1]["done"] is True
    # the keep-alive loop runs every 60 s here: this is the request's own unload
    wait_for(lambda: ps_rows(daemon)["ka-zero"]["state"] == "stopped", timeout=10)
    assert time.monotonic() - t0 < 20
    with daemon.client() as c:
        metrics = c.get("/metrics").text
    assert 'vllama_evictions_total{action="stop",model="ka-zero",reason="request"}' in metrics


def test_keep_alive_sets_expires_at_in_ps(api: httpx.Client, daemon: Daemon) -> None:
    message = [{"role": "user", "content": "hi"}]
    api.post("/api/chat", json={"model": "ka-forever", "messages": message, "stream": False, "keep_alive": -1})
    api.post("/api/chat", json={"model": "ka-ten", "messages": message, "stream": False, "keep_alive": "10m"})
    api.post("/api/chat", json={"model": "chat", "messages": message, "stream": False})
    body = api.get("/api/ps").json()
    assert set(body) == {"models"}
    by_name = {m["name"]: m for m in body["models"]}
    now = datetime.now(timezone.utc)
    for m in by_name.values():
        assert set(m) >= PS_MODEL, m
        assert set(m["details"]) == DETAILS
        assert m["size_vram"] == GIB and m["size"] >= m["size_vram"]
    assert timestamp(by_name["ka-forever"]["expires_at"]).year > 2200  # kept loaded forever
    ten = timestamp(by_name["ka-ten"]["expires_at"]) - now
    assert timedelta(minutes=9) < ten <= timedelta(minutes=10, seconds=5)
    # no keep_alive: the configured ladder (the default's first step: sleep after 5 minutes)
    five = timestamp(by_name["chat"]["expires_at"]) - now
    assert timedelta(minutes=4) < five <= timedelta(minutes=5, seconds=5)
    assert ps_rows(daemon)["ka-ten"]["keep_alive"] == {"sleep_l1": None, "sleep_l2": None, "stop": 600.0}
    assert ps_rows(daemon)["ka-ten"]["keep_alive_from_request"] is True
    # a later request without keep_alive goes back to the configured ladder, as Ollama goes back to its default
    api.post("/api/chat", json={"model": "ka-ten", "messages": message, "stream": False})
    assert ps_rows(daemon)["ka-ten"]["keep_alive_from_request"] is False
    assert ps_rows(daemon)["ka-ten"]["keep_alive"]["sleep_l1"] == 300.0


def test_keep_alive_zero_leaves_a_pinned_model_alone(api: httpx.Client, daemon: Daemon) -> None:
    api.post("/api/chat", json={"model": "pinned", "messages": [{"role": "user", "content": "x"}], "keep_alive": 0})
    time.sleep(1.0)
    assert ps_rows(daemon)["pinned"]["state"] == "running"


def test_the_unload_request_leaves_a_pinned_model_alone(api: httpx.Client, daemon: Daemon) -> None:
    # issue 16: an empty prompt with keep_alive 0 (`ollama stop`) must not stop a pinned model
    api.post("/api/generate", json={"model": "pinned"})
    assert ps_rows(daemon)["pinned"]["state"] == "running"
    for path, body in [("/api/generate", {}), ("/api/chat", {"messages": []})]:
        r = api.post(path, json={"model": "pinned", "keep_alive": 0, **body})
        assert r.status_code == 409 and "pinned" in r.json()["error"] and "vllama stop" in r.json()["error"]
    assert ps_rows(daemon)["pinned"]["state"] == "running"


def test_bad_keep_alive_is_a_400(api: httpx.Client) -> None:
    r = api.post(
        "/api/chat", json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}
    )
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_embed_and_legacy_embeddings(api: httpx.Client) -> None:
    body = api.post(
        "/api/embed", json={"model": "embedder", "input": ["why is the sky blue", "why is grass green"]}
    ).json()
    assert set(body) == EMBED
    assert body["model"] == "embedder"
    assert len(body["embeddings"]) == 2 and all(len(v) == 16 for v in body["embeddings"])
    assert body["prompt_eval_count"] > 0 and body["total_duration"] >= body["load_duration"] >= 0
    single = api.post("/api/embed", json={"model": "embedder", "input": "why is the sky blue"}).json()
    assert single["embeddings"] == body["embeddings"][:1]

    legacy = api.post("/api/embeddings", json={"model": "embedder", "prompt": "why is the sky blue"}).json()
    assert set(legacy) == {"embedding"}
    assert legacy["embedding"] == body["embeddings"][0]


def test_show(api: httpx.Client) -> None:
    body = api.post("/api/show", json={"model": "chat"}).json()
    assert set(body) >= SHOW
    assert set(body["details"]) == DETAILS
    assert isinstance(body["modelfile"], str) and isinstance(body["model_info"], dict)
    assert api.post("/api/show", json={"model": "nope"}).status_code == 404


@pytest.mark.parametrize("name", ["/", "/proc", "/etc", "~", "/etc/passwd"])
def test_show_of_a_path_that_is_no_model_is_a_quick_404(api: httpx.Client, name: str) -> None:
    # issue 16: "/" used to walk the whole filesystem and answer a 500
    t0 = time.monotonic()
    r = api.post("/api/show", json={"model": name})
    message = r.json()["error"]
    assert r.status_code == 404 and ("not a model" in message or "no such path" in message), r.text
    assert time.monotonic() - t0 < 2


def test_bounded_files_stops_early_and_skips_unreadable(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlinked folder is not followed
    assert len(ol.bounded_files(tmp_path, limit=10)) < 10
    assert len(ol.bounded_files(tmp_path)) == 30
    assert ol.bounded_files(tmp_path / "missing") == []


def test_names_aliases_and_latest_tag(api: httpx.Client) -> None:
    for name in ("chat:latest", "chatty"):
        body = api.post(
            "/api/chat", json={"model": name, "messages": [{"role": "user", "content": "x"}], "stream": False}
        ).json()
        assert body["model"] == name and body["message"]["content"].startswith("echo: x")


def test_errors_have_ollamas_shape(api: httpx.Client) -> None:
    r = api.post("/api/chat", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert set(r.json()) == {"error"} and "no-such-model" in r.json()["error"]
    r = api.post("/api/generate", content=b"{not json")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = api.post("/api/pull", json={"model": "llama3"})
    assert r.status_code == 501 and "models.yaml" in r.json()["error"]
    # an error from vLLM (the context is too long) keeps its status and message
    r = api.post(
        "/api/chat",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 99999}},
    )
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]


def test_client_leaving_mid_stream_aborts_and_releases(daemon: Daemon) -> None:
    with (
        daemon.client() as c,
        c.stream(
            "POST",
            "/api/generate",
            json={"model": "slow", "prompt": "count", "options": {"num_predict": 400}},  # 20 s at 20 tokens/s
        ) as r,
    ):
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        assert json.loads(next(lines))["done"] is False
    wait_for(lambda: ps_rows(daemon)["slow"]["in_flight"] == 0, timeout=5)
    with engine_client(ps_rows(daemon)["slow"]) as child:
        wait_for(lambda: child.get("/fake/stats").json()["cancelled"] == 1, timeout=5)


# --- translation, unit-level ---------------------------------------------------------------------------------


def test_sampling_options_and_format() -> None:
    options = {"temperature": 0.2, "top_p": 0.9, "top_k": 5, "seed": 7, "num_predict": 10, "stop": ["x"]}
    options |= {"repeat_penalty": 1.1, "num_ctx": 4096, "mirostat": 1}
    assert ol.sampling(options, "json") == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 7,
        "max_tokens": 10,
        "stop": ["x"],
        "repetition_penalty": 1.1,
        "response_format": {"type": "json_object"},
    }
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    assert ol.sampling({"num_predict": -1}, schema) == {
        "response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    }
    assert ol.sampling(None, "") == {}


def test_messages_with_images_and_tools() -> None:
    body = ol.chat_body(
        "m",
        {
            "messages": [
                {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
                },
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather"}}],
            "think": False,
        },
    )
    user, assistant, tool = body["messages"]
    assert user["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    assert assistant["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    # Ollama's calls have no id and its results name the tool: vllama gives both the same id (issue 16)
    assert tool["role"] == "tool" and tool["tool_call_id"] == assistant["tool_calls"][0]["id"] == "call_1_0"
    assert body["tools"][0]["function"]["name"] == "weather"
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def _call(name: str, **extra: Any) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": {}}, **extra}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # two calls answered out of order, by tool name
        (
            [
                {"role": "assistant", "tool_calls": [_call("weather"), _call("time")]},
                {"role": "tool", "content": "12:00", "tool_name": "time"},
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ],
            ["call_0_1", "call_0_0"],
        ),
        # the same tool twice: in order
        (
            [
                {"role": "assistant", "tool_calls": [_call("weather"), _call("weather")]},
                {"role": "tool", "content": "a", "tool_name": "weather"},
                {"role": "tool", "content": "b", "tool_name": "weather"},
            ],
            ["call_0_0", "call_0_1"],
        ),
        # no tool_name: the next unanswered call
        (
            [
                {"role": "assistant", "tool_calls": [_call("a"), _call("b")]},
                {"role": "tool", "content": "1"},
                {"role": "tool", "content": "2"},
            ],
            ["call_0_0", "call_0_1"],
        ),
        # ids given by the client are kept on both sides
        (
            [
                {"role": "assistant", "tool_calls": [_call("a", id="x1")]},
                {"role": "tool", "content": "1", "tool_call_id": "x1"},
            ],
            ["x1"],
        ),
        # a second round of calls gets fresh ids; a result with no call left still gets an id
        (
            [
                {"role": "assistant", "tool_calls": [_call("a")]},
                {"role": "tool", "content": "1", "tool_name": "a"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "tool_calls": [_call("a")]},
                {"role": "tool", "content": "2", "tool_name": "a"},
                {"role": "tool", "content": "3", "tool_name": "a"},
            ],
            ["call_0_0", "call_3_0", "call_a"],
        ),
    ],
)
def test_tool_results_get_the_id_of_their_call(messages: list[dict[str, Any]], expected: list[str]) -> None:
    out = ol.chat_body("m", {"messages": messages})["messages"]
    call_ids = {c["id"] for m in out for c in m.get("tool_calls", [])}
    results = [m["tool_call_id"] for m in out if m["role"] == "tool"]
    assert results == expected
    assert set(results[: len(call_ids)]) <= call_ids


@pytest.mark.parametrize("odd", [{"tool_calls": "x"}, {"tool_calls": [{"function": "f"}]}, {"tool_calls": [1, None]}])
def test_odd_tool_calls_do_not_break_the_translation(odd: dict[str, Any]) -> None:
    out = ol.chat_body("m", {"messages": [{"role": "assistant", **odd}, {"role": "tool", "content": "r"}]})
    assert out["messages"][1]["role"] == "tool" and out["messages"][1]["tool_call_id"]


@pytest.mark.parametrize("line", [b"data: {not json", b"data: [1, 2]", b"data: 5", b"data: \xff\xfe"])
async def test_a_malformed_stream_event_is_an_upstream_error(line: bytes) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        await r.write(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n' + line + b"\n\n")
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gen = ol.Generation(0, 0)
    got: list[tuple[str, str]] = []
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(UpstreamError, match="malformed stream event"):
                async for item in ol.stream_generation(http, f"http://127.0.0.1:{port}/v1/chat/completions", {}, gen):
                    got.append(item)
    finally:
        await runner.cleanup()
    assert got == [("open", ""), ("content", "hi")]


def test_keep_alive_parsing() -> None:
    assert ol.parse_keep_alive(None) is None
    assert ol.parse_keep_alive("5m").stop == 300  # type: ignore[union-attr]
    assert ol.parse_keep_alive(30).stop == 30  # type: ignore[union-attr]
    assert ol.parse_keep_alive(0).stop == 0  # type: ignore[union-attr]
    for forever in (-1, "-1", "-1m", "-5s"):
        ka = ol.parse_keep_alive(forever)
        assert ka is not None and ka.stop is None and ka.sleep_l1 is None and ka.sleep_l2 is None


# --- the official client ---------------------------------------------------------------------------------------


def test_official_ollama_client(daemon: Daemon) -> None:
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=daemon.url)

    names = {m.model for m in client.list().models}
    assert {"chat", "embedder"} <= names

    reply = client.chat(model="chat", messages=[{"role": "user", "content": "hello"}], options={"num_predict": 3})
    assert reply.message.content == "echo: hello tok2" and reply.done and reply.done_reason == "length"
    assert reply.eval_count == 3 and reply.total_duration and reply.total_duration > 0

    parts = list(client.chat(model="chat", messages=[{"role": "user", "content": "a b"}], stream=True))
    assert "".join(p.message.content or "" for p in parts).startswith("echo: a b")
    assert parts[-1].done and not any(p.done for p in parts[:-1])

    generated = client.generate(model="chat", prompt="sky", options={"num_predict": 2}, keep_alive="10m")
    assert generated.response == "echo: sky" and generated.done

    embedded = client.embed(model="embedder", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    assert len(client.embeddings(model="embedder", prompt="a").embedding) == 16

    running = {m.model: m for m in client.ps().models}
    assert "chat" in running and running["chat"].expires_at is not None
    assert running["chat"].size_vram == GIB

    shown = client.show("chat")
    assert shown.details is not None and shown.modelinfo is not None

    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and "no-such-model" in info.value.error
