"""The Ollama API on vllama's port (/api/*), translated onto the vLLM OpenAI endpoints behind.

Ollama clients (its Python/JS libraries, Open WebUI's Ollama connection, editors' plugins) talk to vllama as to
an Ollama server: `/api/chat` and `/api/generate` stream NDJSON by default (one JSON object per line, the last
with `"done": true`, `done_reason` and Ollama's counters and durations in nanoseconds), `"stream": false` gives one
object. Errors are Ollama's `{"error": "message"}`. A request's `keep_alive` ("5m", seconds, 0 = unload right after
the request, negative = never) replaces the model's keep-alive ladder until the model stops; a request without
one goes back to the configured ladder, as Ollama goes back to its default.

Upstream, generation always streams from vLLM (with usage), so the timings are measured the same way whether the
client streams or not: load = waiting for the model, prompt eval = until the first token, eval = the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from vllama import __version__
from vllama.api.deps import manager_of
from vllama.api.openai import startable_cached_models
from vllama.config import KeepAlive, ModelConfig, parse_duration
from vllama.errors import BadRequest, Conflict, ModelNotFound, PayloadTooLarge, UpstreamError, VllamaError
from vllama.instance import Instance, State
from vllama.manager import Manager
from vllama.sizing import hf_cache_dir

router = APIRouter()

# the Ollama API level vllama speaks (clients gate features on /api/version)
OLLAMA_VERSION = "0.6.0"
NDJSON = "application/x-ndjson"
_FOREVER = "2318-08-09T00:00:00Z"  # Ollama's expires_at for a model kept loaded forever is as far out
_LOADED = (State.STARTING, State.RUNNING, State.DRAINING, State.WAKING, State.SLEEPING)
_OPTIONS = {  # Ollama option → vLLM (OpenAI API + vLLM's sampling extras)
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
    "num_predict": "max_tokens",
}
Json = dict[str, Any]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class UpstreamStatus(VllamaError):
    """vLLM refused the translated request (a 4xx/5xx): its status and message go to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status


def ollama_errors(
    handler: Callable[[Request], Awaitable[Response | Json]],
) -> Callable[[Request], Awaitable[Response | Json]]:
    """Errors in Ollama's shape, `{"error": "message"}`, with the status vllama would give."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response | Json:
        try:
            return await handler(request)
        except VllamaError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    return wrapper


async def read_json(request: Request, limit: int) -> Json:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def resolve(manager: Manager, name: object) -> str:
    """The canonical name; Ollama clients may add the default tag `:latest` to a name that has none."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound('request has no model name: set "model" to one of GET /api/tags')
    try:
        return manager.resolve(name)[0]
    except ModelNotFound:
        if name.endswith(":latest"):
            return manager.resolve(name[: -len(":latest")])[0]
        raise


def parse_keep_alive(value: Any) -> KeepAlive | None:
    """Ollama's keep_alive (how long the model stays loaded after this request) as a vllama ladder: stop after
    that time. None when not given."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("-"):
        return KeepAlive(sleep_l1=None, sleep_l2=None, stop=None)  # "-1m" etc.: forever
    try:
        stop = parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"keep_alive: {exc}") from None
    return KeepAlive(sleep_l1=None, sleep_l2=None, stop=stop)


# --- translation (pure) ------------------------------------------------------------------------------------


def sampling(options: Any, fmt: Any) -> Json:
    """Ollama `options` and `format` → OpenAI/vLLM request fields."""
    out: Json = {}
    if isinstance(options, dict):
        for key, target in _OPTIONS.items():
            value = options.get(key)
            if value is None:
                continue
            if key == "num_predict" and (not isinstance(value, int) or value < 0):
                continue  # -1: unlimited, -2: fill the context; vLLM's default is up to the context length
            out[target] = value
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    return out


def _image_url(image: str) -> str:
    if image.startswith("data:"):
        return image
    kind = {"/9j/": "jpeg", "iVBO": "png", "R0lG": "gif", "UklG": "webp"}.get(image[:4], "png")
    return f"data:image/{kind};base64,{image}"


def openai_messages(messages: list[Any]) -> list[Json]:
    """Ollama messages → OpenAI's. Ollama's tool calls carry no id and its tool results name the tool
    (`tool_name`) instead: the assistant's calls get ids (`call_<message>_<call>`, unique in the conversation),
    and a tool result without `tool_call_id` takes the id of the first unanswered call of its tool, else of the
    first unanswered call, so the chat template pairs each result with its call."""
    out: list[Json] = []
    pending: list[tuple[str, str]] = []  # (id, tool name) of the latest assistant calls not answered yet
    for position, m in enumerate(messages):
        message = openai_message(m, position)
        if message.get("tool_calls"):
            pending = [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            name = m.get("tool_name")
            answered = next((c for c in pending if c[0] == call_id), None)
            answered = answered or next((c for c in pending if c[1] == name), None)
            if answered is None and pending:
                answered = pending[0]
            if answered is not None:
                pending.remove(answered)
                message["tool_call_id"] = call_id or answered[0]
            else:
                message["tool_call_id"] = call_id or f"call_{name or position}"
        out.append(message)
    return out


def openai_message(m: Any, position: int = 0) -> Json:
    if not isinstance(m, dict):
        raise BadRequest("messages: each message must be an object with a role and a content")
    role, content = m.get("role") or "user", m.get("content") or ""
    out: Json = {"role": role}
    images = m.get("images") or []
    if images:
        parts: list[Json] = [{"type": "text", "text": content}] if content else []
        parts += [{"type": "image_url", "image_url": {"url": _image_url(str(i))}} for i in images]
        out["content"] = parts
    else:
        out["content"] = content
    calls = m.get("tool_calls") or []
    if isinstance(calls, list) and calls:
        out["tool_calls"] = [
            {
                "id": str(call.get("id") or f"call_{position}_{i}"),
                "type": "function",
                "function": {"name": str(fn.get("name") or ""), "arguments": _arguments_text(fn.get("arguments"))},
            }
            for i, call in enumerate(calls)
            if isinstance(call, dict)
            for fn in [_function_of(call)]
        ]
    if role == "tool" and isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]:
        out["tool_call_id"] = m["tool_call_id"]  # else openai_messages pairs it with its call
    return out


def _function_of(call: Json) -> Json:
    fn = call.get("function")
    return fn if isinstance(fn, dict) else {}


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {})


def chat_body(model: str, payload: Json) -> Json:
    """An Ollama /api/chat request → a streamed vLLM /v1/chat/completions request."""
    messages = payload.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    body: Json = {
        "model": model,
        "messages": openai_messages(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(sampling(payload.get("options"), payload.get("format")))
    if payload.get("tools"):
        body["tools"] = payload["tools"]
    think = payload.get("think")
    if isinstance(think, bool):
        body["chat_template_kwargs"] = {"enable_thinking": think}
    elif isinstance(think, str) and think:
        body["reasoning_effort"] = think
    return body


def generate_bodies(model: str, payload: Json) -> tuple[str, Json]:
    """An Ollama /api/generate request → (vLLM path, streamed request). Ollama applies the model's template
    unless `raw`: so does vLLM's chat endpoint; raw prompts go to the completions endpoint as they are."""
    prompt = payload.get("prompt") or ""
    extra = sampling(payload.get("options"), payload.get("format"))
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    if payload.get("raw"):
        return "/v1/completions", {"model": model, "prompt": prompt, **stream, **extra}
    messages: list[Json] = []
    if payload.get("system"):
        messages.append({"role": "system", "content": payload["system"]})
    messages.append(openai_message({"role": "user", "content": prompt, "images": payload.get("images")}))
    return "/v1/chat/completions", {"model": model, "messages": messages, **stream, **extra}


def done_reason(finish: str | None) -> str:
    return {"length": "length", None: "stop", "tool_calls": "stop", "stop": "stop"}.get(finish, finish or "stop")


def _tool_calls(acc: dict[int, Json]) -> list[Json]:
    """Accumulated OpenAI tool-call deltas → Ollama tool calls (arguments as an object)."""
    calls = []
    for index in sorted(acc):
        fn = acc[index]
        try:
            arguments = json.loads(fn["arguments"] or "{}")
        except json.JSONDecodeError:
            arguments = fn["arguments"]
        calls.append({"function": {"index": index, "name": fn["name"], "arguments": arguments}})
    return calls


# --- the answer: a response that owns the lease --------------------------------------------------------------


class Out:
    """Writes one JSON answer, or an NDJSON stream, to the ASGI client."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def json(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data})
        self.started = True

    async def begin(self) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON.encode())]})
        self.started = True

    async def line(self, obj: Any) -> None:
        await self.send({"type": "http.response.body", "body": json.dumps(obj).encode() + b"\n", "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b""})

    async def error(self, exc: VllamaError) -> None:
        if not self.started:
            await self.json({"error": exc.message}, exc.status_code)
        else:  # mid-stream: Ollama's clients raise on a line with "error"
            await self.line({"error": exc.message})
            await self.end()


Job = Callable[[Out], Awaitable[None]]


class LeasedAnswer(Response):
    """Runs `job` while the model's lease is held; releases it when the answer is complete or the client left
    (which cancels the job, closing the upstream request: vLLM aborts it). With keep_alive 0 the model is
    unloaded right after."""

    def __init__(self, manager: Manager, inst: Instance, job: Job) -> None:
        self.manager, self.inst, self.job = manager, inst, job
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Out(send)
        work = asyncio.ensure_future(self._run(out))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            for task in (work, gone):
                with contextlib.suppress(BaseException):
                    await task
            self.inst.release()
            override = self.inst.keep_alive_override
            if override is not None and override.stop == 0 and not self.manager.closing:
                self.manager.background(asyncio.get_running_loop().create_task(self.manager.apply_keep_alive()))
        failure = work.exception() if work.done() and not work.cancelled() else None
        if failure is not None:
            raise failure

    async def _run(self, out: Out) -> None:
        try:
            await self.job(out)
        except VllamaError as exc:
            await out.error(exc)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await out.error(UpstreamError(f"{self.inst.name}: its vLLM server failed while answering: {exc!r}"))


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def lease(request: Request, payload: Json) -> tuple[Manager, Instance, int]:
    """Acquire the requested model (starting or waking it), apply the request's keep_alive. Returns the manager,
    the instance (one request in flight: the caller must hand it to a LeasedAnswer) and the load time in ns."""
    m = manager_of(request)
    name = resolve(m, payload.get("model"))
    keep_alive = parse_keep_alive(payload.get("keep_alive"))
    t0 = time.perf_counter_ns()
    inst = await m.acquire(name)
    load_ns = time.perf_counter_ns() - t0
    inst.keep_alive_override = keep_alive
    return m, inst, load_ns


def _base_url(inst: Instance) -> str:
    engine = inst.engine
    if engine is None:
        raise UpstreamError(inst.last_error or f"{inst.name} went away before the request was sent")
    return engine.base_url


async def _upstream_error(r: aiohttp.ClientResponse) -> UpstreamStatus:
    text = await r.text()
    try:
        err = json.loads(text).get("error")
        message = err.get("message") if isinstance(err, dict) else (err or json.loads(text).get("message"))
    except (ValueError, AttributeError):
        message = None
    return UpstreamStatus(r.status, str(message or text or f"vLLM answered HTTP {r.status}"))


class Generation:
    """What one streamed vLLM generation produced, with Ollama's counters."""

    def __init__(self, t_arrival: int, load_ns: int) -> None:
        self.t_arrival, self.load_ns = t_arrival, load_ns
        self.t_sent = self.t_first = 0
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tools: dict[int, Json] = {}
        self.finish: str | None = None
        self.prompt_tokens = self.completion_tokens = 0

    def stats(self) -> Json:
        end = time.perf_counter_ns()
        first = self.t_first or end
        return {
            "done_reason": done_reason(self.finish),
            "total_duration": end - self.t_arrival,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": max(0, first - self.t_sent),
            "eval_count": self.completion_tokens,
            "eval_duration": max(0, end - first),
        }


def _sse_event(data: bytes) -> Json:
    """One `data:` payload of vLLM's stream; anything but a JSON object ends the answer with an upstream error
    (which the client gets as an error line, or a 502 when not streaming) instead of an unhandled exception."""
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        event = None
    if not isinstance(event, dict):
        raise UpstreamError(f"the model's vLLM server sent a malformed stream event: {data[:200]!r}")
    return event


async def stream_generation(
    http: aiohttp.ClientSession, url: str, body: Json, gen: Generation
) -> AsyncIterator[tuple[str, str]]:
    """POST a streamed request to vLLM; yield ("open", "") once vLLM accepted it (an error before that is an
    UpstreamStatus, which the client gets as the answer's status), then ("content" | "thinking", text) deltas as
    they come; fill `gen`."""
    gen.t_sent = time.perf_counter_ns()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with http.post(url, json=body, timeout=timeout) as r:
        if r.status != 200:
            raise await _upstream_error(r)
        yield "open", ""
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = _sse_event(data)
            if "error" in event:
                err = event["error"]
                raise UpstreamError(str(err.get("message") if isinstance(err, dict) else err))
            usage = event.get("usage")
            if usage:
                gen.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                gen.completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in event.get("choices") or []:
                if choice.get("finish_reason"):
                    gen.finish = choice["finish_reason"]
                delta = choice.get("delta")
                if delta is None:  # /v1/completions
                    piece = choice.get("text") or ""
                    reasoning = ""
                else:
                    piece = delta.get("content") or ""
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    for call in delta.get("tool_calls") or []:
                        acc = gen.tools.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
                        fn = call.get("function") or {}
                        acc["name"] += fn.get("name") or ""
                        acc["arguments"] += fn.get("arguments") or ""
                if (piece or reasoning) and not gen.t_first:
                    gen.t_first = time.perf_counter_ns()
                if reasoning:
                    gen.thinking.append(reasoning)
                    yield "thinking", reasoning
                if piece:
                    gen.text.append(piece)
                    yield "content", piece


def _wants_stream(payload: Json) -> bool:
    return payload.get("stream") is not False  # Ollama streams unless told not to


# --- routes ------------------------------------------------------------------------------------------------


@router.get("/api/version")
async def version() -> Json:
    return {"version": OLLAMA_VERSION, "vllama": __version__}


@router.post("/api/chat", response_model=None)
@ollama_errors
async def chat(request: Request) -> Response | Json:
    t_arrival = time.perf_counter_ns()
    m = manager_of(request)
    payload = await read_json(request, m.settings.max_body_bytes)
    requested = str(payload.get("model"))
    if not payload.get("messages"):  # Ollama: no messages loads (or, with keep_alive 0, unloads) the model
        reason = await load_or_unload(request, payload)
        return {"model": requested, "created_at": now_iso(), "message": {"role": "assistant", "content": ""}} | {
            "done_reason": reason,
            "done": True,
        }
    m, inst, load_ns = await lease(request, payload)
    stream = _wants_stream(payload)

    async def job(out: Out) -> None:
        body = chat_body(inst.name, payload)
        gen = Generation(t_arrival, load_ns)
        url = _base_url(inst) + "/v1/chat/completions"
        async for kind, piece in stream_generation(m.http, url, body, gen):
            if kind == "open":
                if stream:
                    await out.begin()
            elif stream:
                delta: Json = {"role": "assistant", "content": piece if kind == "content" else ""}
                if kind == "thinking":
                    delta["thinking"] = piece
                await out.line({"model": requested, "created_at": now_iso(), "message": delta, "done": False})
        message: Json = {"role": "assistant", "content": "" if stream else "".join(gen.text)}
        if gen.thinking and not stream:
            message["thinking"] = "".join(gen.thinking)
        if gen.tools:
            message["tool_calls"] = _tool_calls(gen.tools)
        final = {"model": requested, "created_at": now_iso(), "message": message, "done": True, **gen.stats()}
        if stream:
            await out.line(final)
            await out.end()
        else:
            await out.json(final)

    return LeasedAnswer(m, inst, job)


@router.post("/api/generate", response_model=None)
@ollama_errors
async def generate(request: Request) -> Response | Json:
    t_arrival = time.perf_counter_ns()
    m = manager_of(request)
    payload = await read_json(request, m.settings.max_body_bytes)
    requested = str(payload.get("model"))
    if not payload.get("prompt") and not payload.get("images"):  # Ollama: load (or unload) the model
        reason = await load_or_unload(request, payload)
        return {"model": requested, "created_at": now_iso(), "response": "", "done": True, "done_reason": reason}
    m, inst, load_ns = await lease(request, payload)
    stream = _wants_stream(payload)

    async def job(out: Out) -> None:
        path, body = generate_bodies(inst.name, payload)
        gen = Generation(t_arrival, load_ns)
        base = _base_url(inst)
        try:
            async for kind, piece in _generation_with_fallback(m.http, base, path, body, payload, gen):
                if kind == "open":
                    if stream and not out.started:
                        await out.begin()
                elif stream:
                    await out.line({"model": requested, "created_at": now_iso(), "response": piece, "done": False})
        except UpstreamStatus as exc:
            if out.started:
                raise UpstreamError(exc.message) from None
            raise
        final: Json = {"model": requested, "created_at": now_iso(), "response": "" if stream else "".join(gen.text)}
        if gen.thinking and not stream:
            final["thinking"] = "".join(gen.thinking)
        final |= {"done": True, **gen.stats()}
        if stream:
            await out.line(final)
            await out.end()
        else:
            await out.json(final)

    return LeasedAnswer(m, inst, job)


async def _generation_with_fallback(
    http: aiohttp.ClientSession, base: str, path: str, body: Json, payload: Json, gen: Generation
) -> AsyncIterator[tuple[str, str]]:
    """A model without a chat template (a base model) cannot take the chat endpoint: send the prompt as it is."""
    try:
        async for item in stream_generation(http, base + path, body, gen):
            yield item
        return
    except UpstreamStatus as exc:
        if path != "/v1/chat/completions" or exc.status_code != 400 or "chat template" not in exc.message.lower():
            raise
    raw_path, raw_body = generate_bodies(body["model"], {**payload, "raw": True})
    if payload.get("system"):
        raw_body["prompt"] = f"{payload['system']}\n\n{raw_body['prompt']}"
    async for item in stream_generation(http, base + raw_path, raw_body, gen):
        yield item


async def load_or_unload(request: Request, payload: Json) -> str:
    """An empty prompt/messages: load the model (done_reason "load"), or unload it with keep_alive 0."""
    m = manager_of(request)
    name = resolve(m, payload.get("model"))
    keep_alive = parse_keep_alive(payload.get("keep_alive"))
    if keep_alive is not None and keep_alive.stop == 0:
        if m.resolve(name)[1].pinned:  # pinned holds against a request's unload, as against keep-alive and eviction
            raise Conflict(f"{name} is pinned in models.yaml: a request does not unload it (`vllama stop {name}` does)")
        inst = m.instances.get(name)
        if inst is not None and inst.state is not State.STOPPED:
            await m.stop(name)
        return "unload"
    inst = await m.acquire(name)
    inst.keep_alive_override = keep_alive
    inst.release()
    return "load"


async def _embed(request: Request, payload: Json, texts: Any, legacy: bool) -> Response:
    t_arrival = time.perf_counter_ns()
    m, inst, load_ns = await lease(request, payload)
    requested = str(payload.get("model"))

    async def job(out: Out) -> None:
        body: Json = {"model": inst.name, "input": texts, "encoding_format": "float"}
        if payload.get("dimensions"):
            body["dimensions"] = payload["dimensions"]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with m.http.post(_base_url(inst) + "/v1/embeddings", json=body, timeout=timeout) as r:
            if r.status != 200:
                raise await _upstream_error(r)
            data = await r.json()
        vectors = [d["embedding"] for d in sorted(data.get("data") or [], key=lambda d: d.get("index", 0))]
        if legacy:
            await out.json({"embedding": vectors[0] if vectors else []})
            return
        usage = data.get("usage") or {}
        await out.json(
            {
                "model": requested,
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - t_arrival,
                "load_duration": load_ns,
                "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
            }
        )

    return LeasedAnswer(m, inst, job)


@router.post("/api/embed", response_model=None)
@ollama_errors
async def embed(request: Request) -> Response | Json:
    payload = await read_json(request, manager_of(request).settings.max_body_bytes)
    texts = payload.get("input")
    if not isinstance(texts, str | list):
        raise BadRequest("input must be a string or a list of strings")
    return await _embed(request, payload, texts, legacy=False)


@router.post("/api/embeddings", response_model=None)
@ollama_errors
async def embeddings(request: Request) -> Response | Json:
    """The older single-text endpoint (superseded by /api/embed)."""
    payload = await read_json(request, manager_of(request).settings.max_body_bytes)
    return await _embed(request, payload, str(payload.get("prompt") or ""), legacy=True)


# --- model listings ------------------------------------------------------------------------------------------


def model_files(name: str, cfg: ModelConfig | None) -> Path | None:
    """Where the model's files are on this machine: a local path, or the newest snapshot in the HF cache."""
    target = (cfg.model if cfg and cfg.model else None) or name
    path = Path(target).expanduser()
    if target.startswith(("/", "~", ".")) and path.exists():
        return path
    if "/" in target and not target.startswith("/"):
        snapshots = hf_cache_dir() / ("models--" + target.replace("/", "--")) / "snapshots"
        with contextlib.suppress(OSError):
            found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    return None


_WALK_LIMIT = 5000  # entries looked at under a model's folder: a request must never make vllama walk a disk


def bounded_files(root: Path, limit: int = _WALK_LIMIT) -> list[Path]:
    """The files under `root` (symlinked files followed, symlinked folders not), from the first `limit` entries
    met: unreadable folders are skipped, nothing is sorted before the cut."""
    files: list[Path] = []
    pending, seen = [root], 0
    while pending and seen < limit:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    if seen > limit:
                        break
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(Path(entry.path))
                        elif entry.is_file():
                            files.append(Path(entry.path))
        except OSError:  # unreadable (permissions), gone, not a folder
            continue
    return files


def describe(name: str, cfg: ModelConfig | None, fallback_time: float) -> Json:
    """Ollama's listing fields for one model (size, digest, format and family read from its files if local)."""
    root = model_files(name, cfg)
    size, modified, fmt, family = 0, fallback_time, "", ""
    if root is not None:
        files = [root] if root.is_file() else bounded_files(root)
        with contextlib.suppress(OSError):
            modified = root.stat().st_mtime
        for p in files:
            with contextlib.suppress(OSError):
                size += p.stat().st_size
        if any(p.suffix == ".gguf" for p in files):
            fmt = "gguf"
        elif any(p.suffix == ".safetensors" for p in files):
            fmt = "safetensors"
        config = root / "config.json" if root.is_dir() else None
        if config is not None and config.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                family = str(json.loads(config.read_text()).get("model_type") or "")
    digest = hashlib.sha256(f"{name}\0{root or ''}".encode()).hexdigest()
    details = {
        "parent_model": "",
        "format": fmt,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": "",
        "quantization_level": "",
    }
    return {
        "name": name,
        "model": name,
        "modified_at": iso(modified),
        "size": size,
        "digest": digest,
        "details": details,
    }


@router.get("/api/tags")
async def tags(request: Request) -> Json:
    """Every model vllama can serve: configured, requested so far, and in the local Hugging Face cache."""
    m = manager_of(request)
    models = m.models
    names = list(dict.fromkeys([*models.models, *m.instances, *startable_cached_models(m)]))
    try:
        fallback = m.settings.models_path.stat().st_mtime
    except OSError:
        fallback = m.started_at
    rows = await asyncio.to_thread(lambda: [describe(n, models.get(n), fallback) for n in names])
    # LoRA adapters (vllama/lora.py): their own files, with the base model as the parent
    for ref in models.adapters.values():
        row = await asyncio.to_thread(describe, ref.name, ModelConfig(model=str(ref.path)), fallback)
        row["details"]["parent_model"] = ref.base
        row["details"]["format"] = row["details"]["format"] or "lora"
        rows.append(row)
    return {"models": rows}


@router.get("/api/ps")
async def ps(request: Request) -> Json:
    """Models that are loaded (or loading, or asleep): size, memory on the GPUs, and when they expire."""
    m = manager_of(request)
    loaded = [(snap, m.instances[str(snap["model"])]) for snap in m.ps() if snap["state"] in {s.value for s in _LOADED}]
    models = m.models
    infos = await asyncio.to_thread(lambda: [describe(i.name, models.get(i.name), m.started_at) for _, i in loaded])
    rows = []
    for (snap, inst), info in zip(loaded, infos, strict=True):
        expires = m.expires_at(inst)
        memory = sum(int(v) for v in dict(snap.get("memory_bytes") or {}).values())
        rows.append(
            {
                "name": inst.name,
                "model": inst.name,
                "size": max(memory, inst.need * max(1, len(inst.devices))),
                "digest": info["digest"],
                "details": info["details"],
                "expires_at": iso(expires) if expires is not None else _FOREVER,
                "size_vram": memory,
                "context_length": inst.cfg.max_model_len,
                "vllama": {
                    "state": inst.state.value,
                    "sleep_level": inst.sleep_level or None,
                    "devices": snap["devices"],
                },
            }
        )
    return {"models": rows}


@router.post("/api/show", response_model=None)
@ollama_errors
async def show(request: Request) -> Response | Json:
    m = manager_of(request)
    payload = await read_json(request, m.settings.max_body_bytes)
    name = resolve(m, payload.get("model") or payload.get("name"))
    cfg = m.models.get(name)
    info = await asyncio.to_thread(describe, name, cfg, m.started_at)
    family = info["details"]["family"]
    model_info: Json = {"general.architecture": family} if family else {}
    if family and cfg and cfg.max_model_len:
        model_info[f"{family}.context_length"] = cfg.max_model_len
    target = (cfg.model if cfg and cfg.model else None) or name
    parameters = f"num_ctx {cfg.max_model_len}" if cfg and cfg.max_model_len else ""
    return {
        "modelfile": f"# served by vllama with vLLM\nFROM {target}\n",
        "parameters": parameters,
        "template": "",
        "details": info["details"],
        "model_info": model_info,
        "capabilities": ["completion"],
        "modified_at": info["modified_at"],
    }


@router.post("/api/pull", include_in_schema=False)
@router.post("/api/push", include_in_schema=False)
@router.post("/api/create", include_in_schema=False)
@router.post("/api/copy", include_in_schema=False)
@router.delete("/api/delete", include_in_schema=False)
async def unsupported(request: Request) -> Response:
    """Ollama's model management: not vllama's (501, with a message an Ollama client shows)."""
    message = (
        f"{request.url.path} is not supported by vllama: models are configured in models.yaml (or named by a "
        "Hugging Face id or a local path), and vLLM downloads a Hugging Face model on its first start"
    )
    return JSONResponse({"error": message}, status_code=501)
