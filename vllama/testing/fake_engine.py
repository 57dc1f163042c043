"""A fake vLLM OpenAI server: real HTTP (aiohttp), simulated GPU memory, no model.

Launched exactly like vLLM, so the manager cannot tell the difference:

    python -m vllama.testing.fake_engine --model M --served-model-name NAME (--host 127.0.0.1 --port P | --uds PATH)
        [--gpu-memory-utilization U] [--max-model-len N] [--tensor-parallel-size T] [--pipeline-parallel-size P]
        [--enable-sleep-mode]

Other vLLM flags are accepted and ignored. It mirrors the vLLM behaviour vllama depends on (DESIGN.md): the
port opens only once "loaded"; startup fails unless U × total is free on every device of the instance; sleep
levels 1/2 and the level-2 wake sequence; a request to a sleeping server hangs until it is woken; a wake into
a full GPU fails with "out of memory" and breaks the engine for good; level 2 + a plain wake gives garbage
(empty) output; sleeping with requests in flight "crashes" (500, and it does not sleep).

Environment knobs:
  VLLAMA_FAKE_GPU_LEDGER     shared ledger folder (unset: no memory simulation, everything fits)
  VLLAMA_FAKE_GPU_TOTAL_GIB  device totals, comma list of GiB (default "8")
  CUDA_VISIBLE_DEVICES       physical devices of this instance (default "0"), integers only as vLLM reads
                             them; the first T × P are used (the ledger records these physical indices)
  FAKE_ENGINE_NEED_GIB       memory need per device, overriding U × total
  FAKE_ENGINE_CONTEXT_GIB    residue held per device while asleep (default 0.5)
  FAKE_ENGINE_STARTUP_S      seconds before the memory check and the port opening (default 0.5)
  FAKE_ENGINE_START_GATE     a file path: the port opens only once that file exists (checked after the memory
                             check and claim): a test holds a start for as long as it needs, then creates it
  FAKE_ENGINE_SLEEP_S        duration of /sleep (default 0.05)
  FAKE_ENGINE_SLEEP_GATE     a file path: /sleep finishes (falls asleep and answers) only once that file exists
  FAKE_ENGINE_WAKE_S         duration of each /wake_up (default 0.1)
  FAKE_ENGINE_TOKEN_RATE     tokens/s per request, 0 = unpaced (default; body field "fake_token_rate" wins)
  FAKE_ENGINE_TTFT_S         delay before the first token (default 0; body field "fake_ttft_s" wins)
  body field "fake_hold"     a file path: the answer stops after its first token (not streamed: is not sent)
                             until that file exists, so a test knows the request is still in flight
  FAKE_ENGINE_EMBED_DIM      embedding size (default 16)
  FAKE_ENGINE_FAIL           fail at startup with this message (exit 1)
  FAKE_ENGINE_HANG           never open the port (to test start timeouts; SIGTERM still ends it)
  FAKE_ENGINE_IGNORE_SIGTERM ignore SIGTERM (only SIGKILL ends it)
  FAKE_ENGINE_CORE_PROCESS   hold the memory under a child's pid, like VLLM::EngineCore: SIGKILL to this
                             process alone then leaves the memory held (kill the process group)
  VLLM_SERVER_DEV_MODE=1 with --enable-sleep-mode: /sleep, /wake_up, /is_sleeping, /collective_rpc and
                             /reset_prefix_cache exist (else 404)

LoRA: with --enable-lora [--max-loras N] [--max-lora-rank R] and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True,
POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace} and /v1/unload_lora_adapter {lora_name} exist and
answer like vLLM 0.32 (404 for a path without adapter_config.json, 500 for a rank above R, 400 for a name loaded
already). Stricter than vLLM, which keeps more adapters registered than slots: a load beyond N adapters fails
(500), so a vllama that forgets to unload is caught. A loaded adapter is served under its name and answers
"<name>: <words>" instead of "echo: <words>". A level-2 sleep drops every adapter (what vLLM does there is not
checked yet; this is the pessimistic case that vllama must handle).

Completions echo the last user message (or the prompt): "echo: <words>", padded with "tokN" words to exactly
max_tokens tokens (default 16; finish_reason "length"); a word containing a `stop` string ends it ("stop").
Tokens are whitespace words. Embeddings are hashed bags of words, so texts sharing words are similar; score
and rerank return their cosine. GET /fake/stats → in_flight, served, sleeping, level, broken, cancelled,
credentials_seen (requests that carried an Authorization or x-api-key header: vllama must strip them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from vllama.gpu import GIB, read_ledger, write_ledger

VERSION = "0.26.0+fake"
Body = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
CHAT_PRE, CHAT_POST = (
    b'"choices":[{"index":0,"delta":{"content":',
    b'},"logprobs":null,"finish_reason":null}]}\n\n',
)
ROLE_CHUNK = (
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
)
TEXT_PRE, TEXT_POST = b'"choices":[{"index":0,"text":', b',"logprobs":null,"finish_reason":null}]}\n\n'
FINISH = b'"choices":[{"index":0,%s,"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"


def log(msg: str, level: str = "INFO") -> None:
    print(f"{level} {time.strftime('%m-%d %H:%M:%S')} [fake_engine.py] {msg}", flush=True)


GATE_POLL_S = 0.02


def gate_open(path: str | None) -> bool:
    """Whether the gate file `path` exists (no gate: always open)."""
    return not path or os.path.exists(path)


async def wait_gate(path: str | None) -> None:
    while not gate_open(path):  # noqa: ASYNC110 (a file another process creates: polled)
        await asyncio.sleep(GATE_POLL_S)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def parse_len(raw: str) -> int:
    """vLLM accepts 4096, 4k (× 1000) and 4K (× 1024)."""
    mult = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(raw[-1:], 1)
    return int(float(raw[:-1] if mult > 1 else raw) * mult)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(obj), content_type="application/json")


def error(status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> web.Response:
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def usage(prompt: int, completion: int = 0) -> Body:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def text_of(value: Any) -> str:
    """The text of a prompt, a message content (string or parts) or a token id list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v.get("text", "")) if isinstance(v, dict) else str(v) for v in value)
    return "" if value is None else str(value)


def texts_of(value: Any) -> list[str]:
    """One input or a batch of them (strings or token lists) → a list of texts."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return [text_of(v) for v in value]
    return [text_of(value)]


def n_tokens(text: str) -> int:
    return len(text.split()) + 1  # words + a BOS token


def embed(text: str, dim: int) -> list[float]:
    v = [0.0] * dim
    for word in text.lower().split():
        h = zlib.crc32(word.strip(".,;:!?\"'()").encode())
        v[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm else [1.0] + [0.0] * (dim - 1)


class Ledger:
    """This process's entry in the shared memory ledger; `folder=None` simulates nothing (always fits)."""

    def __init__(self, folder: Path | None, devices: list[int], totals: list[int], pid: int) -> None:
        self.folder, self.devices, self.totals, self.pid = folder, devices, totals, pid
        self.held = dict.fromkeys(devices, 0)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Makes check-then-claim atomic across fake engines: real allocations race, tests should not."""
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def free(self) -> dict[int, int]:
        assert self.folder is not None
        free = {d: self.totals[d] for d in self.devices}
        for per_device in read_ledger(self.folder).values():
            for d, n in per_device.items():
                if d in free:
                    free[d] -= n
        return free

    def claim(self, want: dict[int, int]) -> dict[int, int] | None:
        """Grow to `want` if that fits on every device and return None. Else return the free memory and keep
        half of what was missing: a failed wake holds half-restored memory, as vLLM's allocator does."""
        if self.folder is None:
            self.hold(want)
            return None
        with self.locked():
            free = self.free()
            if all(want[d] - self.held[d] <= free[d] for d in self.devices):
                self.hold(want)
                return None
            self.hold({d: self.held[d] + max(0, min(free[d], want[d] - self.held[d])) // 2 for d in self.devices})
            return free

    def hold(self, per_device: dict[int, int]) -> None:
        self.held = dict(per_device)
        if self.folder is not None:
            write_ledger(self.folder, self.pid, self.held)

    def release(self) -> None:
        if self.folder is not None:
            with contextlib.suppress(OSError):
                (self.folder / f"{self.pid}.json").unlink()


class ClientGone(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


class FakeEngine:
    def __init__(self, args: argparse.Namespace, ledger: Ledger, need: dict[int, int]) -> None:
        self.names: list[str] = args.served_model_name or [args.model]
        self.root, self.max_model_len, self.tp = args.model, args.max_model_len, args.tensor_parallel_size
        self.pp = args.pipeline_parallel_size
        self.ledger, self.need = ledger, need
        context = int(env_float("FAKE_ENGINE_CONTEXT_GIB", 0.5) * GIB)
        self.residue = {d: min(context, n) for d, n in need.items()}
        self.sleep_s = env_float("FAKE_ENGINE_SLEEP_S", 0.05)
        self.wake_s = env_float("FAKE_ENGINE_WAKE_S", 0.1)
        self.token_rate = env_float("FAKE_ENGINE_TOKEN_RATE", 0.0)
        self.ttft = env_float("FAKE_ENGINE_TTFT_S", 0.0)
        self.sleep_gate = os.environ.get("FAKE_ENGINE_SLEEP_GATE") or None
        self.dim = int(env_float("FAKE_ENGINE_EMBED_DIM", 16))
        self.awake = asyncio.Event()  # clear while asleep (or falling asleep): inference waits on it
        self.awake.set()
        self.lifecycle = asyncio.Lock()
        self.asleep_tags: set[str] = set()
        self.level = 0
        self.weights_ok = True  # False after a level-2 sleep until reload_weights
        self.broken = False
        self.in_flight = self.served = self.cancelled = 0
        self.credentials_seen = 0  # requests that arrived with an Authorization or x-api-key header
        self.max_loras, self.max_lora_rank = args.max_loras, args.max_lora_rank
        self.loras: dict[str, str] = {}  # loaded adapter name → path
        self.lora_loads = self.lora_unloads = 0

    def app(self, sleep_api: bool, lora_api: bool = False) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        r = app.router
        r.add_get("/health", self.ok)
        r.add_get("/ping", self.ok)
        r.add_get("/version", self.version)
        r.add_get("/v1/models", self.models)
        r.add_get("/metrics", self.metrics)
        r.add_get("/fake/stats", self.stats)
        r.add_post("/v1/chat/completions", self.inference(self.generate))
        r.add_post("/v1/completions", self.inference(self.generate))
        r.add_post("/v1/embeddings", self.inference(self.embeddings))
        for path in ("/score", "/v1/score"):
            r.add_post(path, self.inference(self.score))
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r.add_post(path, self.inference(self.rerank))
        if sleep_api:
            r.add_post("/sleep", self.sleep)
            r.add_post("/wake_up", self.wake_up)
            r.add_get("/is_sleeping", self.is_sleeping)
            r.add_post("/collective_rpc", self.collective_rpc)
            r.add_post("/reset_prefix_cache", self.ok)
        if lora_api:
            r.add_post("/v1/load_lora_adapter", self.load_lora)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora)
        return app

    # --- plain endpoints ---------------------------------------------------------------------------------
    async def ok(self, _: web.Request) -> web.Response:
        return web.Response()

    async def version(self, _: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def is_sleeping(self, _: web.Request) -> web.Response:
        return json_response({"is_sleeping": bool(self.asleep_tags)})

    async def models(self, _: web.Request) -> web.Response:
        created = int(time.time())
        card = {"object": "model", "created": created, "owned_by": "vllm", "root": self.root, "parent": None}
        data = [{"id": n, **card, "max_model_len": self.max_model_len, "permission": []} for n in self.names]
        data += [{**card, "id": n, "root": p, "parent": self.names[0], "permission": []} for n, p in self.loras.items()]
        return json_response({"object": "list", "data": data})

    async def metrics(self, _: web.Request) -> web.Response:
        waiting = self.in_flight if self.asleep_tags else 0
        label = f'{{model_name="{self.names[0]}"}}'
        running = f"vllm:num_requests_running{label} {self.in_flight - waiting}\n"
        return web.Response(text=f"{running}vllm:num_requests_waiting{label} {waiting}\n")

    async def stats(self, _: web.Request) -> web.Response:
        return json_response(
            {
                "in_flight": self.in_flight,
                "served": self.served,
                "sleeping": bool(self.asleep_tags),
                "level": self.level,
                "broken": self.broken,
                "cancelled": self.cancelled,
                "credentials_seen": self.credentials_seen,
                # where vllama put it: the GPUs it was given (physical indices) and how CUDA numbers them
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
                "devices": self.ledger.devices,
                "tensor_parallel_size": self.tp,
                "pipeline_parallel_size": self.pp,
                "loras": list(self.loras),
                "lora_loads": self.lora_loads,
                "lora_unloads": self.lora_unloads,
            }
        )

    # --- inference ---------------------------------------------------------------------------------------
    def inference(self, fn: Callable[[web.Request, Body], Awaitable[web.StreamResponse]]) -> Handler:
        """Parse, check the model name, count the request in flight; a client that goes away cancels it."""

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = json.loads(await request.read())
            except ValueError as e:
                return error(400, f"invalid JSON body: {e}")
            if not isinstance(body, dict):
                return error(400, "the body must be a JSON object")
            model = body.get("model")
            if model is not None and model not in self.names and model not in self.loras:
                return error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
            if "Authorization" in request.headers or "x-api-key" in request.headers:
                self.credentials_seen += 1
            self.in_flight += 1
            try:
                response = await fn(request, body)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            except ClientGone as gone:
                self.cancelled += 1
                return gone.response
            finally:
                self.in_flight -= 1
            self.served += 1
            return response

        return handler

    async def generate(self, request: web.Request, body: Body) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        if chat:
            messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
            user = [m for m in messages if m.get("role") == "user"]
            prompt = text_of(user[-1].get("content")) if user else ""
            prompt_tokens = sum(n_tokens(text_of(m.get("content"))) for m in messages)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = text_of(body.get("prompt"))
            prompt_tokens, max_tokens = n_tokens(prompt), body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else int(max_tokens)
        if prompt_tokens + max_tokens > self.max_model_len:
            return error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        rate = float(body.get("fake_token_rate", self.token_rate))
        ttft = float(body.get("fake_ttft_s", self.ttft))
        hold = str(body["fake_hold"]) if body.get("fake_hold") else None
        await self.awake.wait()  # a request to a sleeping engine hangs until someone wakes it

        model = body.get("model")
        opening = f"{model}:" if model in self.loras else "echo:"  # an adapter answers differently from the base
        words, finish, tokens = [opening, *prompt.split()], "length", []
        for i in range(max_tokens):
            word = words[i] if i < len(words) else f"tok{i}"
            if any(s in word for s in stop):
                finish = "stop"
                break
            tokens.append(word if i == 0 else " " + word)
        if not self.weights_ok:
            tokens = [""] * len(tokens)  # garbage weights: the output decodes to nothing
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, model = int(time.time()), body.get("model") or self.names[0]
        if body.get("stream"):
            obj = "chat.completion.chunk" if chat else "text_completion"
            head = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":'.encode()
            head += dumps(model) + b","
            tail = head + FINISH % (b'"delta":{}' if chat else b'"text":""', finish.encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                tail += head + b'"choices":[],"usage":' + dumps(usage(prompt_tokens, len(tokens))) + b"}\n\n"
            pre, post = (head + CHAT_PRE, CHAT_POST) if chat else (head + TEXT_PRE, TEXT_POST)
            first = head + ROLE_CHUNK if chat else b""
            return await self._stream(request, first, pre, post, tokens, tail, rate, ttft, hold)

        pause = ttft + (max(len(tokens) - 1, 0) / rate if rate > 0 else 0.0)
        if pause > 0:
            await asyncio.sleep(pause)
        await wait_gate(hold)
        text = "".join(tokens)
        choice: Body = {"index": 0, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if chat:
            choice["message"] = dict(role="assistant", content=text, reasoning_content=None, tool_calls=[])
        else:
            choice["text"] = text
        obj = "chat.completion" if chat else "text_completion"
        return json_response(
            {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            | {"usage": usage(prompt_tokens, len(tokens))}
        )

    async def _stream(
        self, request: web.Request, first: bytes, pre: bytes, post: bytes, tokens: list[str], tail: bytes,
        rate: float, ttft: float, hold: str | None,
    ) -> web.StreamResponse:  # fmt: skip
        """SSE like vLLM: `first` (chat: the role), a chunk per token, `tail` (finish, usage), [DONE]. With a
        `hold` gate, nothing after the first token is sent until the gate opens (pacing restarts there)."""
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        try:
            if first:
                await response.write(first)
            if ttft > 0:
                await asyncio.sleep(ttft)
            start = loop.time()
            for i, token in enumerate(tokens):
                if rate > 0 and (delay := start + i / rate - loop.time()) > 0:
                    await asyncio.sleep(delay)
                await response.write(pre + dumps(token) + post)
                if i == 0 and not gate_open(hold):
                    await wait_gate(hold)
                    start = loop.time()  # the next token one gap after the release
            await response.write(tail + DONE)
            await response.write_eof()
        except ConnectionResetError as e:  # the client went away mid-stream: stop generating, quietly
            raise ClientGone(response) from e
        return response

    def _reply(self, prefix: str, body: Body, fields: Body) -> web.Response:
        envelope = {"id": prefix + uuid.uuid4().hex, "object": "list", "created": int(time.time())}
        return json_response(envelope | {"model": body.get("model") or self.names[0]} | fields)

    def _vec(self, text: str) -> list[float]:
        return embed(text, self.dim) if self.weights_ok else [0.0] * self.dim

    async def embeddings(self, _: web.Request, body: Body) -> web.StreamResponse:
        texts = texts_of(body.get("input"))
        await self.awake.wait()
        data: list[Body] = []
        for i, text in enumerate(texts):
            vec: Any = self._vec(text)
            if body.get("encoding_format") == "base64":  # the openai client asks for this by default
                vec = base64.b64encode(struct.pack(f"<{self.dim}f", *vec)).decode()
            data.append({"index": i, "object": "embedding", "embedding": vec})
        return self._reply("embd-", body, {"data": data, "usage": usage(sum(map(n_tokens, texts)))})

    def _similarity(self, a: str, b: str) -> float:
        return sum(x * y for x, y in zip(self._vec(a), self._vec(b), strict=True))

    async def score(self, _: web.Request, body: Body) -> web.StreamResponse:
        first = texts_of(next((body[k] for k in ("text_1", "data_1", "queries") if k in body), ""))
        second = texts_of(next((body[k] for k in ("text_2", "data_2", "documents") if k in body), ""))
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            return error(400, "text_1 must be one text or as many texts as text_2", param="text_1")
        await self.awake.wait()
        pairs = list(zip(first, second, strict=True))
        data = [{"index": i, "object": "score", "score": self._similarity(a, b)} for i, (a, b) in enumerate(pairs)]
        return self._reply("score-", body, {"data": data, "usage": usage(sum(n_tokens(a + " " + b) for a, b in pairs))})

    async def rerank(self, _: web.Request, body: Body) -> web.StreamResponse:
        query, docs = text_of(body.get("query")), texts_of(body.get("documents") or [])
        await self.awake.wait()
        scores = [self._similarity(query, d) for d in docs]
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: int(body.get("top_n") or len(docs))]
        results = [{"index": i, "document": {"text": docs[i]}, "relevance_score": scores[i]} for i in order]
        n = sum(n_tokens(query + " " + d) for d in docs)
        return json_response(
            {"id": "rerank-" + uuid.uuid4().hex, "model": body.get("model") or self.names[0]}
            | {"usage": {"total_tokens": n}, "results": results}
        )

    # --- LoRA --------------------------------------------------------------------------------------------
    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            name, path, inplace = body["lora_name"], body["lora_path"], bool(body.get("load_inplace"))
        except (ValueError, KeyError, TypeError):
            return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.names:
            return error(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
        if name in self.loras and not inplace:
            return error(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        try:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        rank = int(config.get("r") or 0)
        if rank > self.max_lora_rank:
            message = f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            return error(
                500, f"Call to add_lora method failed: Worker failed with error '{message}'", "InternalServerError"
            )
        if name not in self.loras and len(self.loras) >= self.max_loras:
            message = f"fake engine: max_loras {self.max_loras} reached (loaded: {', '.join(self.loras)})"
            log(message, "ERROR")
            return error(500, message, "InternalServerError")
        self.loras[name] = path
        self.lora_loads += 1
        log(f"Loaded new LoRA adapter: name '{name}', path '{path}'")
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            name = json.loads(await request.read())["lora_name"]
        except (ValueError, KeyError, TypeError):
            return error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if self.loras.pop(name, None) is None:
            return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        self.lora_unloads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # --- sleep mode ----------------------------------------------------------------------------------------
    async def sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return error(400, f"invalid sleep level {level!r}", param="level")
        async with self.lifecycle:
            if self.asleep_tags:  # already asleep; deepening to level 2 drops the CPU copy of the weights
                if level == "2":
                    self.level, self.weights_ok = 2, False
                return web.Response()
            if self.in_flight:  # real vLLM may crash or abort them: vllama must drain first
                msg = f"EngineCore crashed: sleep with {self.in_flight} requests in flight"
                log(msg, "ERROR")
                return error(500, msg, "InternalServerError")
            self.awake.clear()
            t0 = time.monotonic()
            await asyncio.sleep(self.sleep_s)
            await wait_gate(self.sleep_gate)
            self.ledger.hold(self.residue)
            self.asleep_tags, self.level = {"weights", "kv_cache"}, int(level)
            self.weights_ok = self.weights_ok and level == "1"
            if level == "2":
                self.loras.clear()  # the pessimistic case (see the module's docstring)
        log(f"It took {time.monotonic() - t0:.6f} seconds to fall asleep.")
        return web.Response()

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = set(request.query.getall("tags", [])) or {"weights", "kv_cache"}
        if not tags <= {"weights", "kv_cache"}:
            return error(400, f"unknown wake_up tags {sorted(tags)}", param="tags")
        async with self.lifecycle:
            if self.broken:
                return error(500, "CUDA Error: invalid argument at cumem_allocator.cpp:62", "InternalServerError")
            if not self.asleep_tags:
                return web.Response()
            free = self.ledger.claim(self.need) if self.ledger.held != self.need else None
            await asyncio.sleep(self.wake_s)
            if free is not None:
                self.broken = True
                gib = ", ".join(f"cuda:{i} {free[d] / GIB:.2f} GiB free" for i, d in enumerate(self.ledger.devices))
                log(f"wake_up failed: CUDA Error: out of memory ({gib})", "ERROR")
                return error(500, "CUDA Error: out of memory at cumem_allocator.cpp:62", "InternalServerError")
            self.asleep_tags -= tags
            if not self.asleep_tags:
                self.level = 0
                self.awake.set()
        return web.Response()

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            method = json.loads(await request.read()).get("method")
        except (ValueError, AttributeError):
            return error(400, "expected a JSON body with a method")
        if method == "reload_weights":
            if self.broken or "weights" in self.asleep_tags:
                return error(500, "reload_weights failed: the weights are asleep", "InternalServerError")
            self.weights_ok = True
        return json_response({"results": [None] * (self.tp * self.pp)})


# --- process ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake_engine", allow_abbrev=False)
    p.add_argument("--model", default="facebook/opt-125m")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default=None)  # a Unix socket path: then --host and --port are ignored, as in vLLM
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=parse_len, default=2048)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, default=16)
    return p.parse_known_args(argv)[0]


class StartupError(Exception):
    pass


def load(args: argparse.Namespace, ledger: Ledger) -> dict[int, int]:
    """The slow, blocking part of a start: "imports", then the memory check and claim. Returns the need."""
    time.sleep(env_float("FAKE_ENGINE_STARTUP_S", 0.5))
    if os.environ.get("FAKE_ENGINE_FAIL"):
        raise StartupError(f"RuntimeError: {os.environ['FAKE_ENGINE_FAIL']}")
    if args.model.startswith("/") and not os.path.exists(args.model):
        raise StartupError(f"OSError: model path {args.model} does not exist (not a local folder)")
    if any(d >= len(ledger.totals) for d in ledger.devices):
        raise StartupError(f"RuntimeError: CUDA error: invalid device ordinal (devices {ledger.devices})")
    u, need_gib = args.gpu_memory_utilization, os.environ.get("FAKE_ENGINE_NEED_GIB", "").strip()
    need = {d: int(float(need_gib) * GIB) if need_gib else int(u * ledger.totals[d]) for d in ledger.devices}
    if ledger.folder is None:
        ledger.hold(need)
    else:
        with ledger.locked():
            free = ledger.free()
            for i, d in enumerate(ledger.devices):
                if need[d] > free[d]:
                    raise StartupError(
                        f"ValueError: Free memory on device cuda:{i} ({free[d] / GIB:.2f}/"
                        f"{ledger.totals[d] / GIB:.2f} GiB) on startup is less than desired GPU memory "
                        f"utilization ({u}, {need[d] / GIB:.2f} GiB). Decrease GPU memory utilization or "
                        "reduce GPU memory used by other processes."
                    )
            ledger.hold(need)
    gate = os.environ.get("FAKE_ENGINE_START_GATE")
    if not gate_open(gate):
        log(f"waiting for {gate} before opening the port (FAKE_ENGINE_START_GATE)")
        while not gate_open(gate):
            time.sleep(GATE_POLL_S)
    log("Loading weights took 0.01 GiB and 0.01 seconds")
    log(f"Available KV cache memory: {max(need.values()) / GIB:.2f} GiB")
    return need


async def serve(args: argparse.Namespace, engine: FakeEngine) -> None:
    loop, stopping = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            loop.add_signal_handler(sig, stopping.set)
    sleep_api = os.environ.get("VLLM_SERVER_DEV_MODE") == "1" and args.enable_sleep_mode
    lora_api = args.enable_lora and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1")
    runner = web.AppRunner(
        engine.app(sleep_api, lora_api), handler_cancellation=True, access_log=None, shutdown_timeout=0.2
    )
    await runner.setup()
    try:
        if args.uds:
            log(f"Starting vLLM API server 0 on unix:{args.uds}")
            # bound here, like vLLM does: bind() over an existing file fails (EADDRINUSE) where asyncio's own
            # unix server would remove a leftover socket first
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(args.uds)
            await web.SockSite(runner, sock).start()
        else:
            log(f"Starting vLLM API server 0 on http://{args.host}:{args.port}")
            await web.TCPSite(runner, args.host, args.port).start()
        log("Application startup complete.")
        await stopping.wait()
        log("Shutting down FastAPI HTTP server.")
    finally:
        engine.ledger.release()  # the memory goes back at once, as when the EngineCore exits
        await runner.cleanup()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ignore_term = bool(os.environ.get("FAKE_ENGINE_IGNORE_SIGTERM"))
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else _terminate)
    log(f"vLLM API server version {VERSION}")
    log(f"non-default args: {vars(args)}")
    if os.environ.get("FAKE_ENGINE_HANG"):
        log("hanging before the port opens (FAKE_ENGINE_HANG)")
        while True:
            time.sleep(3600)
    tp = max(args.tensor_parallel_size, 1) * max(args.pipeline_parallel_size, 1)  # the world size
    folder = os.environ.get("VLLAMA_FAKE_GPU_LEDGER")
    totals = [int(float(x) * GIB) for x in os.environ.get("VLLAMA_FAKE_GPU_TOTAL_GIB", "8").split(",")]
    core = None
    if os.environ.get("FAKE_ENGINE_CORE_PROCESS"):  # the memory belongs to a child, like VLLM::EngineCore
        core = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"])
    visible: list[int] = []
    ledger = Ledger(Path(folder) if folder else None, [], totals, core.pid if core else os.getpid())
    try:
        # like vLLM (0.26), which reads each entry with int(): a GPU or MIG UUID fails here
        try:
            visible = [int(x) for x in os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",") if x.strip()]
        except ValueError as e:
            raise StartupError(f"ValueError: {e} (CUDA_VISIBLE_DEVICES)") from None
        ledger = Ledger(ledger.folder, visible[:tp], totals, ledger.pid)
        if tp > len(visible):
            raise StartupError(f"ValueError: World size ({tp}) is larger than the number of available GPUs "
                               f"({len(visible)}) in this node.")  # fmt: skip
        need = load(args, ledger)
        asyncio.run(serve(args, FakeEngine(args, ledger, need)))
        return 0
    except StartupError as e:
        log("EngineCore failed to start.", "ERROR")
        print(e, flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        return 1
    except OSError as e:  # the port (or socket path) is taken
        print(f"OSError: {e}", flush=True)
        return 1
    finally:
        ledger.release()
        if core is not None:
            core.kill()
            core.wait()


if __name__ == "__main__":
    sys.exit(main())
