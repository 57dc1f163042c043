"""Relay one OpenAI request to the model's vLLM instance, byte for byte, as a raw ASGI endpoint.

Per request: read the body, take the model name from it, acquire the instance (one in-flight count, O(1); no
lock when it is running), send the request upstream on a pooled keep-alive connection, and relay the answer.
Streams (SSE) go to the client as they arrive, whatever bytes vLLM's chunks hold, never re-parsed or
re-assembled; other answers are read whole first (up to BUFFER_LIMIT, then relayed as they come), so a child
that dies mid-answer still yields a clean 502 in the OpenAI error shape (mid-stream it ends the stream with an
error event). The request counts as in flight
until the last byte reaches the client or the client goes away; a client that goes away closes the upstream
connection, which makes vLLM abort the request. A request that never reached vLLM because its child had just
died (connection refused, or closed before any answer: `Instance.child_died`) is sent once more, to a fresh child;
a kept-alive connection closed or reset before any byte of the answer is sent once more on a fresh connection.
A child that sends no answer within `VLLAMA_RESPONSE_TIMEOUT` and fails its health check is killed (504).

The upstream client is a small HTTP/1.1 client on asyncio (httptools parses the answer, in C): per chunk, one
read, one wake-up of the relay and one write. It was chosen by measurement (bench/proxy.py; README "Proxy
overhead") over aiohttp and httpx, which stay selectable with VLLAMA_PROXY_CLIENT=aiohttp|httpx to rerun the
comparison. The endpoint is raw ASGI (no FastAPI request/response objects or dependency solving per request)
but is a route of the app, so every middleware (API keys, metrics) applies to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools
from starlette.types import Receive, Scope, Send

from vllama import lora
from vllama.engine import EngineProcess, engine_exited, socket_path, url_of
from vllama.errors import BadRequest, PayloadTooLarge, UpstreamError, UpstreamTimeout, VllamaError
from vllama.instance import Instance
from vllama.manager import Manager

# the only vLLM paths reachable through vllama: never its sleep/wake/RPC/dev endpoints
PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/score",
    "/v1/responses",
    "/v1/messages",
    "/v2/rerank",
    "/rerank",
    "/score",
    "/tokenize",
    "/detokenize",
)

# not passed on, either way (lower case, as ASGI gives them); vllama frames both connections itself
_HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
        b"transfer-encoding", b"upgrade", b"content-length", b"host", b"authorization", b"date", b"server",
        b"expect", b"x-api-key",
    }
)  # fmt: skip
_SSE = b"text/event-stream"
_HIGH_WATER = 256 * 1024  # bytes buffered from vLLM (client slower than the model) before reading pauses
_CONNECT_TIMEOUT = 10.0
# a non-streamed answer is held whole up to this size, so that a child dying mid-answer is a clean 502; a
# larger one (a big embeddings batch) is relayed as it comes, keeping vllama's memory bounded per request
BUFFER_LIMIT = 16 * 1024 * 1024


def _header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


# --- request side ---------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared.decode()} bytes is over the limit of {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False) and len(body) <= limit:
        return body  # the usual case: one message
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            break
    if size > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


# --- upstream clients -----------------------------------------------------------------------------------------


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]  # lower-case names, hop-by-hop headers removed

    async def read(self) -> tuple[bytes, bool]:
        """The bytes that have arrived (waiting for some if none has), and whether the answer is complete."""
        ...

    def finish(self) -> None:
        """The answer was relayed whole: keep the connection for the next request."""

    async def abort(self) -> None:
        """Drop the connection (vLLM aborts a request whose connection closes)."""


class Client(Protocol):
    async def post(self, address: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """POST to the child at `address` (`unix:/path` or `127.0.0.1:port`: `EngineProcess.address`). Raises
        OSError (or a client-specific error in CLIENT_ERRORS) if vLLM cannot be reached."""
        ...

    async def close(self) -> None: ...


class UpstreamClosed(ConnectionError):
    pass


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a vLLM server; also the UpstreamResponse of its current request."""

    def __init__(self, pool: RawClient, address: str, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle = False
        self.waiter: asyncio.Future[None] | None = None
        self.begin()

    def begin(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.got_head = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.paused = False
        self.error: BaseException | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.idle:  # nothing is asked on an idle connection: whatever this is, the connection is unusable
            self._close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamClosed(f"unreadable answer from vLLM: {exc}")
            self._close()
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle:
            self.pool.discard(self)
        if not self.complete and self.error is None:
            if self.got_head and not self._framed():  # an answer delimited by the end of the connection
                self.complete = True
            else:
                self.error = exc or UpstreamClosed("vLLM closed the connection")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # 1xx: an interim answer; the real one follows
            self.raw_headers = []
            return
        self.got_head = True
        self.headers = [(k, v) for k, v in self.raw_headers if k not in _HOP_BY_HOP]
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.got_head:
            return  # the end of a 1xx
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # helpers
    def _framed(self) -> bool:
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.raw_headers)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # the UpstreamResponse side
    async def head(self) -> None:
        while not self.got_head:
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()  # cleared by whoever wakes it
            await self.waiter

    async def read(self) -> tuple[bytes, bool]:
        while not self.chunks:
            if self.complete:
                return b"", True
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()  # (no helper coroutine: this runs once per chunk)
            await self.waiter
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return data, self.complete

    def finish(self) -> None:
        if self.complete and self.keep_alive and not self.closed:
            self.pool.give_back(self)
        else:
            self._close()

    async def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


class RawClient:
    """Keep-alive connections to each vLLM server (by address), most recently used first."""

    def __init__(self) -> None:
        self.idle: dict[str, list[_Conn]] = {}

    async def post(self, address: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        host = b"localhost" if socket_path(address) is not None else address.encode()
        head = [b"POST ", path.encode(), b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        for k, v in headers:
            head += (k, b": ", v, b"\r\n")
        head += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        request = b"".join(head)
        for attempt in (1, 2):
            conn, reused = await self._connection(address, fresh=attempt > 1)
            conn.begin()
            assert conn.transport is not None
            conn.transport.write(request)
            try:
                await conn.head()
            except ConnectionError:  # UpstreamClosed, ConnectionResetError, BrokenPipeError...
                # a kept-alive connection the server closed or reset (its idle timeout, a restart) just as it was
                # reused, before any byte of an answer: sent again once, on a fresh connection (vLLM aborts a
                # request whose connection goes away, so it was not served)
                if reused and not conn.received and attempt == 1:
                    await conn.abort()
                    continue
                raise
            except BaseException:
                await conn.abort()
                raise
            return conn
        raise AssertionError("unreachable")

    async def _connection(self, address: str, fresh: bool) -> tuple[_Conn, bool]:
        idle = self.idle.get(address)
        while idle and not fresh:
            conn = idle.pop()
            conn.idle = False
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        loop = asyncio.get_running_loop()
        path = socket_path(address)
        if path is not None:
            connecting = loop.create_unix_connection(lambda: _Conn(self, address, loop), path)
        else:
            host, _, port = address.rpartition(":")
            connecting = loop.create_connection(lambda: _Conn(self, address, loop), host, int(port))
        transport, conn = await asyncio.wait_for(connecting, _CONNECT_TIMEOUT)
        conn.transport = transport  # uvloop may call connection_made only later
        return conn, False

    def give_back(self, conn: _Conn) -> None:
        conn.idle = True
        self.idle.setdefault(conn.address, []).append(conn)

    def discard(self, conn: _Conn) -> None:
        conn.idle = False
        idle = self.idle.get(conn.address)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self.idle[conn.address]

    async def close(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn._close()
        self.idle.clear()


class _AiohttpResponse:
    def __init__(self, response: Any) -> None:
        self.r = response
        self.status = response.status
        self.headers = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _HOP_BY_HOP]

    async def read(self) -> tuple[bytes, bool]:
        data = await self.r.content.readany()
        return data, self.r.content.at_eof()

    def finish(self) -> None:
        self.r.release()

    async def abort(self) -> None:
        self.r.close()


class AiohttpClient:
    """The alternative kept for the comparison (VLLAMA_PROXY_CLIENT=aiohttp)."""

    def __init__(self) -> None:
        import aiohttp

        from vllama.engine import ChildConnector

        self.aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=ChildConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def post(self, address: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        r = await self.session.post(f"{url_of(address)}{path}", data=body, headers=hdrs)
        return _AiohttpResponse(r)

    async def close(self) -> None:
        await self.session.close()


class _HttpxResponse:
    def __init__(self, response: Any) -> None:
        self.r = response
        self.status = response.status_code
        self.headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
        self.it = response.aiter_raw()

    async def read(self) -> tuple[bytes, bool]:
        try:
            return await self.it.__anext__(), False
        except StopAsyncIteration:
            return b"", True

    def finish(self) -> None:
        pass  # a response read to the end gives its connection back by itself

    async def abort(self) -> None:
        await self.r.aclose()


class HttpxClient:
    """The alternative kept for the comparison (VLLAMA_PROXY_CLIENT=httpx)."""

    def __init__(self) -> None:
        import httpx

        self.httpx = httpx
        self.clients: dict[str, Any] = {}  # address → its client (httpx reaches one Unix socket per transport)

    async def post(self, address: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        client = self.clients.get(address)
        if client is None:
            uds = socket_path(address)
            limits = self.httpx.Limits(max_connections=None, max_keepalive_connections=None)
            client = self.clients[address] = self.httpx.AsyncClient(
                transport=self.httpx.AsyncHTTPTransport(uds=uds, limits=limits),
                timeout=self.httpx.Timeout(None, connect=_CONNECT_TIMEOUT),
            )
        base = "http://localhost" if socket_path(address) is not None else f"http://{address}"
        request = client.build_request("POST", f"{base}{path}", content=body, headers=headers)
        return _HttpxResponse(await client.send(request, stream=True))

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def _client_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.HTTPError)
    return tuple(errors)


CLIENT_ERRORS = _client_errors()  # UpstreamClosed is a ConnectionError, so an OSError
CLIENTS: dict[str, Callable[[], Client]] = {"raw": RawClient, "aiohttp": AiohttpClient, "httpx": HttpxClient}


def make_client() -> Client:
    name = os.environ.get("VLLAMA_PROXY_CLIENT", "raw").strip() or "raw"
    if name not in CLIENTS:
        raise ValueError(f"VLLAMA_PROXY_CLIENT={name!r}: use one of {', '.join(CLIENTS)}")
    return CLIENTS[name]()


# --- the endpoint ---------------------------------------------------------------------------------------------


class RelayEndpoint:
    """The ASGI app of one relayed path (a route of the FastAPI app, so its middleware applies)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        manager: Manager = app.state.manager
        client: Client | None = getattr(app.state, "relay_client", None)
        if client is None:
            client = app.state.relay_client = make_client()
        forwarded = []
        declared = None
        for k, v in scope["headers"]:
            if k not in _HOP_BY_HOP:
                forwarded.append((k, v))
            elif k == b"content-length":
                declared = v
        try:
            body = await read_body(receive, declared, manager.settings.max_body_bytes)
            model = parse_json_object(body).get("model")
        except ClientGone:
            return
        except VllamaError as err:
            await send_error(send, err)
            return
        for may_resend in (True, False):
            try:
                # a LoRA adapter's name acquires its base and loads the adapter (vllama/lora.py)
                inst, adapter = await lora.acquire(manager, model)
            except VllamaError as err:
                await send_error(send, err)
                return
            try:
                relay = Relay(inst, client, send, receive, manager.settings.response_timeout)
                undelivered = await relay.run(self.path, forwarded, body, may_resend)
            finally:
                lora.release(inst, adapter)
            if not undelivered:
                return
            # its child had died before the request reached it: the next acquire starts a fresh one; send once more


class Relay:
    """One relayed request, from the POST upstream to the last byte to the client. A task watches the client:
    if it goes away, the relay is cancelled and the upstream connection dropped."""

    __slots__ = ("client", "done", "gone", "inst", "receive", "response_timeout", "send", "task")

    def __init__(self, inst: Instance, client: Client, send: Send, receive: Receive, response_timeout: float) -> None:
        self.inst = inst
        self.response_timeout = response_timeout
        self.client = client
        self.send = send
        self.receive = receive
        self.gone = False
        self.done = False
        self.task = asyncio.current_task()

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.done and self.task is not None:
            self.gone = True
            self.task.cancel()

    async def run(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes, may_resend: bool) -> bool:
        """Relay the request. True (nothing sent to the client) if it never reached vLLM because the child is
        gone (connection refused, or closed before any answer) and `may_resend`: the caller may try again."""
        inst = self.inst
        engine = inst.engine
        if engine is None:
            await send_error(send=self.send, err=UpstreamError(inst.last_error or f"{inst.name} went away"))
            return False
        watcher = asyncio.get_running_loop().create_task(self._watch())
        up: UpstreamResponse | None = None
        try:
            try:
                async with asyncio.timeout(self.response_timeout):
                    up = await self.client.post(engine.address, path, headers, body)
            except TimeoutError:
                # no answer in time: a hung child is killed (and started afresh by the next request)
                hung = await inst.check_hung(engine)
                what = "stopped answering and was killed; the next request starts it again" if hung else "is busy"
                await send_error(self.send, UpstreamTimeout(
                    f"{inst.name}: no answer within {self.response_timeout:.0f} s (VLLAMA_RESPONSE_TIMEOUT): its vLLM "
                    f"{what} (log: {engine.spec.log_path})"))  # fmt: skip
                return False
            except CLIENT_ERRORS as exc:
                if may_resend and await engine_exited(engine, within=2.0):
                    inst.child_died(engine)  # recorded before any later command, a fresh acquire's start included
                    return True
                await send_error(self.send, UpstreamError(f"{inst.name}: could not reach its vLLM server: {exc!r} "
                                                          f"(log: {engine.spec.log_path})"))  # fmt: skip
                return False
            ok = await self._relay(up, engine)
            if ok:
                up.finish()
            else:
                await up.abort()
        except asyncio.CancelledError:
            if up is not None:
                await up.abort()
            if not self.gone:
                raise
            task = self.task
            if task is not None:
                task.uncancel()  # our own cancel (the client left): handled
        except BaseException:
            if up is not None:
                await up.abort()
            raise
        finally:
            self.done = True
            if not watcher.done():
                watcher.cancel()
        return False

    async def _relay(self, up: UpstreamResponse, engine: EngineProcess) -> bool:
        """Relay the answer; True if it came whole (the connection can be reused)."""
        send = self.send
        headers = up.headers
        content_type = _header_value(headers, b"content-type") or b""
        chunks: list[bytes] = []
        if not content_type.startswith(_SSE):
            size, complete = 0, False
            try:
                while size <= BUFFER_LIMIT:
                    data, complete = await up.read()
                    chunks.append(data)
                    size += len(data)
                    if complete:
                        break
            except CLIENT_ERRORS as exc:
                err = UpstreamError(f"{self.inst.name} (log: {engine.spec.log_path}) failed while answering: {exc!r}")
                await send_error(send, err)
                return False
            if complete:
                data = b"".join(chunks)
                headers = [*headers, (b"content-length", str(len(data)).encode())]
                self.done = True
                await send({"type": "http.response.start", "status": up.status, "headers": headers})
                await send({"type": "http.response.body", "body": data})
                return True
            # over the limit: relay the rest as it comes (chunked); a failure from here on cuts the answer short,
            # which the client's HTTP parser reports (the connection closes before the final chunk)
        await send({"type": "http.response.start", "status": up.status, "headers": headers})
        try:
            if chunks:
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                chunks = []
            while True:
                data, complete = await up.read()
                if complete:
                    self.done = True
                    await send({"type": "http.response.body", "body": data})  # the last bytes and the end at once
                    return True
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except CLIENT_ERRORS as exc:
            if not content_type.startswith(_SSE):
                # a plain answer cut short: no event to add; ending without the last chunk tells the client
                return False
            # the child died mid-stream: tell the client in the stream, then end it
            err = UpstreamError(f"{self.inst.name} (log: {engine.spec.log_path}) stopped mid-stream: {exc!r}")
            event = {"error": err.to_body()["error"]}
            self.done = True
            await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode()})
            return False


async def send_error(send: Send, err: VllamaError) -> None:
    data = json.dumps(err.to_body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status_code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
