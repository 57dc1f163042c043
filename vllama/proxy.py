"""Relay one OpenAI request to the model's vLLM instance, byte for byte.

The request counts as in flight (the instance's lease) from admission until the last byte reaches the client,
or the client goes away. A client that disconnects closes the upstream connection, which makes vLLM abort the
request. Streams (SSE) are relayed chunk by chunk as they arrive, never re-parsed; other answers are read whole
first, so a child that dies mid-answer still yields a clean 502 in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from vllama.errors import BadRequest, PayloadTooLarge, UpstreamError, VllamaError
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

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "host", "authorization", "date", "server",
}  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


async def forward(manager: Manager, request: Request, path: str) -> Response:
    body = await read_body(request, manager.settings.max_body_bytes)
    payload = parse_json_object(body)
    inst = await manager.acquire(payload.get("model"))
    try:
        engine = inst.engine
        if engine is None:
            raise UpstreamError(inst.last_error or f"{inst.name} went away before the request was sent")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = await _post_unless_client_leaves(
                manager.http,
                request,
                f"{engine.base_url}{path}",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                f"{inst.name}: could not reach its vLLM server: {exc} (log: {engine.spec.log_path})"
            ) from None
    except BaseException:
        inst.release()
        raise
    if upstream is None:  # the client went away; vLLM aborted the request
        inst.release()
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    return RelayResponse(upstream, inst.release, describe=f"{inst.name} (log: {engine.spec.log_path})")


async def _post_unless_client_leaves(
    http: aiohttp.ClientSession, request: Request, url: str, **kwargs: Any
) -> aiohttp.ClientResponse | None:
    """POST upstream while watching the client. A non-streamed answer's headers come only once vLLM has
    generated all of it: a client that leaves before then cancels the upstream request (vLLM aborts it on the
    closed connection) instead of leaving it generating, and counted in flight, for nobody. None if it left."""
    post = asyncio.ensure_future(http.post(url, **kwargs))
    gone = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({post, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        gone.cancel()
        post.cancel()
        post.add_done_callback(_close_response)
        raise
    client_left = gone.done()
    gone.cancel()
    if client_left:
        post.cancel()
    await asyncio.wait({post, gone})  # let the cancellations land (the upstream connection is closed)
    if not client_left:
        return post.result()
    _close_response(post)  # in case it answered just as the client left
    return None


def _close_response(post: asyncio.Future[aiohttp.ClientResponse]) -> None:
    if post.done() and not post.cancelled() and post.exception() is None:
        post.result().close()


class RelayResponse(Response):
    """Streams an upstream aiohttp response to the ASGI client; owns the upstream response and the lease."""

    def __init__(self, upstream: aiohttp.ClientResponse, release: Callable[[], None], *, describe: str) -> None:
        self.upstream = upstream
        self.release = release
        self.describe = describe
        self.status_code = upstream.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if relay.done():
                relay.result()
        finally:
            for task in (relay, watch):
                task.cancel()
            for task in (relay, watch):
                with contextlib.suppress(BaseException):
                    await task
            if relay.cancelled() or not relay.done() or relay.exception() is not None:
                self.upstream.close()  # drop the connection: vLLM aborts the request
            else:
                self.upstream.release()
            self.release()

    async def _relay(self, send: Send) -> None:
        up = self.upstream
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in up.headers.items()
            if k.lower() not in _HOP_BY_HOP
        ]
        if not up.content_type.startswith("text/event-stream"):
            try:
                data = await up.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                err = UpstreamError(f"{self.describe} failed while answering: {exc}")
                await _send_error(send, err)
                raise
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": up.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        await send({"type": "http.response.start", "status": up.status, "headers": headers})
        try:
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # the child died mid-stream: tell the client in the stream, then end it
            event = {"error": UpstreamError(f"{self.describe} stopped mid-stream: {exc}").to_body()["error"]}
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(event)}\n\n".encode(),
                    "more_body": True,
                }
            )
            await send({"type": "http.response.body", "body": b""})
            raise
        await send({"type": "http.response.body", "body": b""})


async def _send_error(send: Send, err: VllamaError) -> None:
    data = json.dumps(err.to_body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status_code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
