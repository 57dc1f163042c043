"""The relay (vllama/proxy.py): what goes through vllama is what vLLM sent, byte for byte, under concurrency.

Daemon tests run a real `vllama serve` over the fake engine and compare each answer with the same request sent
straight to the engine (ids and timestamps aside); client tests drive the pooled upstream client against small
in-process HTTP servers that misbehave on purpose (closed keep-alive connections, odd chunking).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon, engine_client
from vllama import proxy

_VOLATILE = re.compile(rb'"id":"[a-z]+-[0-9a-f]+"|"created":\d+')


def normalize(data: bytes) -> bytes:
    return _VOLATILE.sub(b"<volatile>", data)


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "A", "messages": [{"role": "user", "content": text}]} | extra


def ps(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in c.get("/vllama/ps").json()["models"]}


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def fetch(url: str, body: dict[str, Any], child: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
    """POST to `url`, or to the path `url` straight to the child of `ps` row `child` (past vllama)."""
    client = engine_client(child) if child is not None else httpx.Client(timeout=60)
    with client as c, c.stream("POST", url, json=body) as r:
        return r.status_code, r.headers.get("content-type", ""), r.read()


def check_stream(data: bytes, text: str, max_tokens: int) -> None:
    """Every SSE event intact and in order: role, the tokens, finish (usage), [DONE]."""
    events = data.split(b"\n\n")
    assert events[-1] == b"", data[-200:]
    assert events[-2] == b"data: [DONE]"
    words = ["echo:", *text.split()]
    expected = [w if i < len(words) else f"tok{i}" for i, w in enumerate(words[:max_tokens])]
    expected += [f"tok{i}" for i in range(len(expected), max_tokens)]
    got = []
    for event in events[:-2]:
        assert event.startswith(b"data: {"), event
        chunk = json.loads(event[len(b"data: ") :])
        for choice in chunk["choices"]:
            content = choice.get("delta", {}).get("content")
            if content:
                got.append(content.strip())
    assert got == expected


@pytest.fixture
def daemon(fake_daemon: Daemon) -> Daemon:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 1, "max_model_len": 100_000}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert c.post("/v1/chat/completions", json=chat_body("warm")).status_code == 200
    return fake_daemon


def test_concurrent_streams_are_byte_identical_to_direct(daemon: Daemon) -> None:
    with daemon.client() as c:
        upstream = ps(c)["A"]
    # a mix: paced streams that interleave on the event loop, unpaced ones that arrive coalesced, usage chunks,
    # multi-byte UTF-8 and JSON escapes in the echoed words, and non-streamed answers
    jobs = []
    for i in range(48):
        text = f'stream {i} naïve «quoted» "q" \\ é中文 ' + " ".join(f"w{i}-{j}" for j in range(i % 7))
        extra: dict[str, Any] = {"stream": True, "max_tokens": 20 + i % 13}
        if i % 3 == 0:
            extra["fake_token_rate"] = 200
        if i % 4 == 0:
            extra["stream_options"] = {"include_usage": True}
        if i % 8 == 7:
            extra = {"max_tokens": 12}  # not streamed
        jobs.append(chat_body(text, **extra))
    with ThreadPoolExecutor(48) as pool:
        via = list(pool.map(lambda b: fetch(f"{daemon.url}/v1/chat/completions", b), jobs))
        direct = list(pool.map(lambda b: fetch("/v1/chat/completions", b, upstream), jobs))
    for body, (vs, vt, vdata), (ds, dt, ddata) in zip(jobs, via, direct, strict=True):
        assert (vs, vt) == (ds, dt) == (200, vt)
        assert normalize(vdata) == normalize(ddata)
        if body.get("stream"):
            assert vt.startswith("text/event-stream")
            check_stream(vdata, body["messages"][0]["content"], body["max_tokens"])
        else:
            assert json.loads(vdata)["choices"][0]["message"]["content"].startswith("echo: stream")
    with daemon.client() as c:
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="in_flight back to 0")


def test_many_streams_at_once_keep_order(daemon: Daemon) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = chat_body(f"many {i}", stream=True, max_tokens=60, fake_token_rate=300)
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            data = b"".join([chunk async for chunk in r.aiter_raw()])
        check_stream(data, f"many {i}", 60)

    async def main() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(200)))

    asyncio.run(main())
    with daemon.client() as c:
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="in_flight back to 0")


def test_large_bodies_and_a_slow_reader(daemon: Daemon) -> None:
    with daemon.client() as c:
        upstream = ps(c)["A"]
    # a 2 MB prompt goes up intact (the echo proves it), and ~2 MB of events come back to a reader slower than
    # the engine (the relay stops reading from vLLM while the client lags, and loses nothing)
    words = [f"{i:07d}" + "x" * 250 for i in range(8000)]
    body = chat_body(" ".join(words), stream=True, max_tokens=len(words) + 1)
    with httpx.Client(base_url=daemon.url, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks = []
        for i, chunk in enumerate(r.iter_raw(16384)):
            chunks.append(chunk)
            if i < 40:
                time.sleep(0.02)
    data = b"".join(chunks)
    check_stream(data, body["messages"][0]["content"], body["max_tokens"])
    assert normalize(data) == normalize(fetch("/v1/chat/completions", body, upstream)[2])
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body(" ".join(words), max_tokens=len(words) + 1))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "echo: " + " ".join(words)
        assert int(r.headers["content-length"]) == len(r.content)
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="in_flight back to 0")


def test_upstream_errors_pass_through_and_other_paths(daemon: Daemon) -> None:
    with daemon.client() as c:
        upstream = engine_client(ps(c)["A"])
        # vLLM's own 400 (context too long) reaches the client as vLLM sent it
        too_long = chat_body("x", max_tokens=10**6)
        r = c.post("/v1/chat/completions", json=too_long)
        d = upstream.post("/v1/chat/completions", json=too_long)
        assert r.status_code == d.status_code == 400
        assert r.json() == d.json()
        for path, body in [
            ("/v1/completions", {"model": "A", "prompt": "complete me", "max_tokens": 5}),
            ("/v1/embeddings", {"model": "A", "input": ["one", "two"]}),
            ("/v1/score", {"model": "A", "text_1": "a b", "text_2": ["a", "b c"]}),
            ("/rerank", {"model": "A", "query": "a", "documents": ["a", "b"]}),
        ]:
            r = c.post(path, json=body)
            d = upstream.post(path, json=body)
            assert r.status_code == d.status_code == 200, (path, r.text)
            assert normalize(r.content) == normalize(d.content), path
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="in_flight back to 0")


def test_many_clients_leaving_mid_stream_cancel_upstream(daemon: Daemon) -> None:
    with daemon.client() as c:
        row = ps(c)["A"]

    def stats() -> dict[str, Any]:
        with engine_client(row) as child:
            return dict(child.get("/fake/stats").json())

    before = stats()["cancelled"]

    async def leave(client: httpx.AsyncClient, i: int) -> None:
        body = chat_body(f"leaving {i}", stream=True, max_tokens=1000, fake_token_rate=20)  # 50 s if read whole
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_raw():
                break  # closes the connection: the client is gone

    async def main() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(leave(client, i) for i in range(32)))

    asyncio.run(main())
    wait_for(lambda: stats()["cancelled"] - before == 32, 10, what="32 upstream cancels")
    wait_for(lambda: stats()["in_flight"] == 0, 5, what="engine in_flight 0")
    with daemon.client() as c:
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="vllama in_flight back to 0")
        assert c.post("/v1/chat/completions", json=chat_body("still fine")).status_code == 200


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_the_alternative_clients_still_relay(fake_daemon: Daemon, client: str) -> None:
    """The clients kept for the comparison in bench/proxy.py (VLLAMA_PROXY_CLIENT) give the same bytes."""
    fake_daemon.env["VLLAMA_PROXY_CLIENT"] = client
    fake_daemon.write_models({"A": {"gpu_memory_gib": 1}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        body = chat_body("alternative client", stream=True, max_tokens=30, fake_token_rate=500)
        status, _, data = fetch(f"{fake_daemon.url}/v1/chat/completions", body)
        assert status == 200
        check_stream(data, "alternative client", 30)
        assert c.post("/v1/chat/completions", json=chat_body("plain")).json()["choices"][0]["message"]
        wait_for(lambda: ps(c)["A"]["in_flight"] == 0, 5, what="in_flight back to 0")


# --- the pooled upstream client against misbehaving servers ------------------------------------------------------


@pytest.fixture(params=["tcp", "uds"])
def transport(request: pytest.FixtureRequest) -> str:
    """The raw client's tests run against a loopback port and a Unix socket: a child listens on either."""
    return str(request.param)


@contextlib.asynccontextmanager
async def tiny_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Any], transport: str = "tcp"
) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw HTTP/1.1 server on a free port (or a Unix socket); `handle(reader, writer, n)` answers the n-th
    request on a connection. Yields (its address for the client, the number of connections accepted so far, in a
    list)."""
    accepted = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                n += 1
                if await handle(reader, writer, n) is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    if transport == "uds":
        with tempfile.TemporaryDirectory(dir="/tmp") as folder:
            path = f"{folder}/child.sock"
            server = await asyncio.start_unix_server(serve, path)
            try:
                yield f"unix:{path}", accepted
            finally:
                server.close()
        return
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()


async def relay_all(client: proxy.RawClient, address: str, body: bytes = b"{}") -> tuple[int, bytes]:
    up = await client.post(address, "/v1/chat/completions", [(b"content-type", b"application/json")], body)
    out = []
    while True:
        data, complete = await up.read()
        out.append(data)
        if complete:
            break
    up.finish()
    return up.status, b"".join(out)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not a FIN: the peer's next read fails with ConnectionResetError."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("how", ["closed", "reset"])
async def test_raw_client_retries_a_kept_alive_connection_closed_by_the_server(how: str, transport: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:  # read the 2nd request on this connection, then close (idle timeout) or reset, not answering
            if how == "reset":
                reset(writer)
            return False
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        return True

    client = proxy.RawClient()
    async with tiny_server(handle, transport) as (address, accepted):
        assert await relay_all(client, address) == (200, b"ok")
        assert await relay_all(client, address) == (200, b"ok")  # retried once, on a new connection
        assert accepted[0] == 2
    await client.close()


async def test_raw_client_reuses_connections_and_relays_odd_chunking(transport: str) -> None:
    events = [b'data: {"a": "\xc3', b'\xa9"}\n', b"\ndata: [DO", b"NE]\n\n"]  # split mid-character, mid-event

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for e in events:
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    client = proxy.RawClient()
    async with tiny_server(handle, transport) as (address, accepted):
        for _ in range(5):
            up = await client.post(address, "/v1/chat/completions", [], b"{}")
            assert (b"content-type", b"text/event-stream") in up.headers
            assert not any(k in (b"transfer-encoding", b"connection") for k, _ in up.headers)
            out = b""
            while True:
                data, complete = await up.read()
                out += data
                if complete:
                    break
            up.finish()
            assert out == b"".join(events)
        assert accepted[0] == 1  # one kept-alive connection for all five
    await client.close()


async def test_raw_client_reports_a_server_that_dies_mid_answer(transport: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await writer.drain()
        return False  # and close mid-body

    client = proxy.RawClient()
    async with tiny_server(handle, transport) as (address, _):
        up = await client.post(address, "/v1/chat/completions", [], b"{}")
        got = b""
        with pytest.raises(proxy.CLIENT_ERRORS):
            while True:
                data, complete = await up.read()
                got += data
                assert not complete
        assert got == b"data: "
        await up.abort()
    with pytest.raises(OSError):  # nothing listens any more
        await client.post(address, "/v1/chat/completions", [], b"{}")
    await client.close()


# --- issue 16: faults of the upstream connection and the size of held answers ------------------------------------


async def test_raw_client_does_not_resend_on_a_fresh_connection_reset(transport: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        reset(writer)
        return False

    client = proxy.RawClient()
    async with tiny_server(handle, transport) as (address, accepted):
        with pytest.raises(ConnectionError):  # a new connection reset: vLLM may have seen it; not sent twice
            await relay_all(client, address)
        assert accepted[0] == 1
    await client.close()


class ScriptedUpstream:
    """An UpstreamResponse that hands out `parts`, then fails with `error` if given."""

    def __init__(self, parts: list[bytes], error: BaseException | None = None, content_type: bytes = b"json") -> None:
        self.status = 200
        self.headers = [(b"content-type", b"application/" + content_type)]
        self.parts, self.error = list(parts), error

    async def read(self) -> tuple[bytes, bool]:
        if not self.parts:
            if self.error is not None:
                raise self.error
            return b"", True
        return self.parts.pop(0), not self.parts and self.error is None

    def finish(self) -> None:
        pass

    async def abort(self) -> None:
        pass


async def relay_scripted(up: ScriptedUpstream) -> tuple[bool, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        await asyncio.sleep(3600)

    inst: Any = SimpleNamespace(name="A")
    engine: Any = SimpleNamespace(spec=SimpleNamespace(log_path="/logs/A.log"))
    ok = await proxy.Relay(inst, proxy.RawClient(), send, receive, 600.0)._relay(up, engine)
    return ok, sent


async def test_a_small_plain_answer_is_held_whole_and_a_failure_is_a_502(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "BUFFER_LIMIT", 100)
    ok, sent = await relay_scripted(ScriptedUpstream([b"x" * 60, b"y" * 40]))
    assert ok and [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (b"content-length", b"100") in sent[0]["headers"] and sent[1]["body"] == b"x" * 60 + b"y" * 40
    ok, sent = await relay_scripted(ScriptedUpstream([b"x" * 60], ConnectionResetError()))
    assert not ok and sent[0]["status"] == 502 and b"failed while answering" in sent[1]["body"]


async def test_a_large_plain_answer_is_relayed_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "BUFFER_LIMIT", 100)
    parts = [bytes([65 + i]) * 60 for i in range(5)]
    ok, sent = await relay_scripted(ScriptedUpstream(parts))
    assert ok and sent[0]["status"] == 200
    assert not any(k == b"content-length" for k, _ in sent[0]["headers"])
    bodies = sent[1:]
    assert b"".join(m["body"] for m in bodies) == b"".join(parts)
    assert len(bodies[0]["body"]) <= 100 + 60  # held no more than the limit and one read
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    # cut short past the limit: the answer is never completed (the client sees a truncated body)
    ok, sent = await relay_scripted(ScriptedUpstream(parts, ConnectionResetError()))
    assert not ok and sent[0]["status"] == 200 and all(m.get("more_body") for m in sent[1:])
