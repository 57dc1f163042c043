"""A soak test of vllama under eviction pressure: a real `vllama serve` over fake engines on one simulated GPU
that cannot hold every model awake, driven by many concurrent clients with a mix of streamed and non-streamed
chat, completions and embeddings. Every answer is checked in full (an echo of the request, or a whole stream
ending in [DONE]); nothing may be lost, cut or refused by vllama. Afterwards no request is left in flight, in
vllama or in any engine, and vllama's memory (RSS) and file descriptors at the start and the end are reported.

Used by `bench/soak.py` (the full run, figures in bench/results/) and `tests/test_soak.py` (a shorter run in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

FAKE_ENGINE = [sys.executable, "-m", "vllama.testing.fake_engine"]


@dataclass
class SoakConfig:
    requests: int = 10_000
    concurrency: int = 64
    models: int = 4
    model_gib: float = 3.0  # each model's need; with 8 GiB, two are awake at a time and the rest asleep
    gpu_gib: float = 8.0
    stream_fraction: float = 0.4
    embed_fraction: float = 0.1
    completion_fraction: float = 0.15
    hot_fraction: float = 0.7  # share of requests for the current "hot" pair of models (it moves)
    hot_span: int = 300  # requests between two moves of the hot pair
    seed: int = 6
    work_dir: Path | None = None  # default: a temporary folder


@dataclass
class SoakResult:
    config: SoakConfig
    sent: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failure_examples: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rss_start: int = 0  # after the warm-up (every model started once)
    rss_end: int = 0
    rss_peak: int = 0
    fds_start: int = 0
    fds_end: int = 0
    upstream_pool: int = 0  # vllama's idle keep-alive connections to the engines at the end (part of fds_end)
    evictions: int = 0
    in_flight_after: dict[str, int] = field(default_factory=dict)  # vllama's count per model at the end
    engine_in_flight_after: dict[str, int] = field(default_factory=dict)  # each engine's own count
    states_after: dict[str, str] = field(default_factory=dict)
    leftover_processes: list[int] = field(default_factory=list)  # children alive after vllama stopped
    daemon_exit: int | None = None
    daemon_errors: list[str] = field(default_factory=list)  # tracebacks in vllama's log

    @property
    def lost(self) -> int:
        return self.sent - self.ok

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def passed(self) -> bool:
        return (
            self.sent == self.config.requests
            and self.lost == 0
            and not any(self.in_flight_after.values())
            and not any(self.engine_in_flight_after.values())
            and not self.leftover_processes
            and self.daemon_exit == 0
            and not self.daemon_errors
        )

    def summary(self) -> dict[str, Any]:
        mib = 1024 * 1024
        return {
            "requests": self.sent,
            "ok": self.ok,
            "lost_or_failed": self.lost,
            "failures": self.failures,
            "by_kind": self.by_kind,
            "by_model": self.by_model,
            "concurrency": self.config.concurrency,
            "models": self.config.models,
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(self.sent / self.seconds, 1) if self.seconds else 0,
            "latency_p50_ms": round(self.percentile(0.5) * 1000, 1),
            "latency_p99_ms": round(self.percentile(0.99) * 1000, 1),
            "latency_max_ms": round(max(self.latencies, default=0) * 1000, 1),
            "evictions": self.evictions,
            "rss_start_mib": round(self.rss_start / mib, 1),
            "rss_end_mib": round(self.rss_end / mib, 1),
            "rss_peak_mib": round(self.rss_peak / mib, 1),
            "fds_start": self.fds_start,
            "fds_end": self.fds_end,
            "upstream_pool": self.upstream_pool,
            "in_flight_after": self.in_flight_after,
            "engine_in_flight_after": self.engine_in_flight_after,
            "states_after": self.states_after,
            "leftover_processes": self.leftover_processes,
            "daemon_exit": self.daemon_exit,
            "daemon_errors": len(self.daemon_errors),
            "passed": self.passed(),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Daemon:
    def __init__(self, cfg: SoakConfig, work: Path) -> None:
        self.home = work / "home"
        ledger = work / "ledger"
        self.home.mkdir(parents=True, exist_ok=True)
        ledger.mkdir(exist_ok=True)
        self.names = [f"m{i}" for i in range(cfg.models)]
        models = {name: {"gpu_memory_gib": cfg.model_gib, "keep_alive": -1} for name in self.names}
        (self.home / "models.yaml").write_text(yaml.safe_dump(models))
        self.port = _free_port()
        lo = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLAMA_", "FAKE_ENGINE_"))}
        env.update(
            {
                "VLLAMA_HOME": str(self.home),
                "VLLAMA_PORT_RANGE": f"{lo}-{min(lo + 60, 65000)}",
                "VLLAMA_GPU_PROBE": "fake",
                "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
                "VLLAMA_FAKE_GPU_TOTAL_GIB": str(cfg.gpu_gib),
                "VLLAMA_VLLM_COMMAND": " ".join(FAKE_ENGINE),
                "VLLAMA_SLEEP_RESIDUAL_GIB": "0.5",
                "VLLAMA_STOP_TIMEOUT": "5",
                "FAKE_ENGINE_CONTEXT_GIB": "0.5",
                "FAKE_ENGINE_STARTUP_S": "0.2",
                "FAKE_ENGINE_SLEEP_S": "0.01",
                "FAKE_ENGINE_WAKE_S": "0.02",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.log = work / "serve.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *[sys.executable, "-m", "vllama", "serve", "--port", str(self.port)],
                    *["--host", "127.0.0.1", "--log-level", "warning"],
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.ps = psutil.Process(self.proc.pid)
        self.url = f"http://127.0.0.1:{self.port}"

    def children_groups(self) -> set[int]:
        groups = set()
        with contextlib.suppress(psutil.Error):
            for p in self.ps.children(recursive=True):
                with contextlib.suppress(psutil.Error, OSError):
                    groups.add(os.getpgid(p.pid))
        groups.discard(self.proc.pid)
        return groups


def _unix_sockets(proc: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return len(proc.net_connections(kind="unix"))
    return 0


def _expected_text(text: str, max_tokens: int) -> str:
    words = ["echo:", *text.split()]
    return " ".join(words[i] if i < len(words) else f"tok{i}" for i in range(max_tokens))


async def _one(http: aiohttp.ClientSession, url: str, i: int, model: str, kind: str) -> str | None:
    """Send request number `i`; None when the answer is complete and right, else what was wrong."""
    text = f"soak request {i} for {model}"
    n = len(text.split()) + 1
    if kind == "embed":
        async with http.post(f"{url}/v1/embeddings", json={"model": model, "input": text}) as r:
            body = await r.read()
            if r.status != 200:
                return f"http {r.status}: {body[:200]!r}"
            data = json.loads(body)
            return None if len(data["data"][0]["embedding"]) > 0 else "empty embedding"
    if kind == "completion":
        payload = {"model": model, "prompt": text, "max_tokens": n}
        async with http.post(f"{url}/v1/completions", json=payload) as r:
            body = await r.read()
            if r.status != 200:
                return f"http {r.status}: {body[:200]!r}"
            got = json.loads(body)["choices"][0]["text"]
            return None if got == f"echo: {text}" else f"wrong text {got[:80]!r}"
    payload = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": n}
    if kind == "chat":
        async with http.post(f"{url}/v1/chat/completions", json=payload) as r:
            body = await r.read()
            if r.status != 200:
                return f"http {r.status}: {body[:200]!r}"
            got = json.loads(body)["choices"][0]["message"]["content"]
            return None if got == f"echo: {text}" else f"wrong text {got[:80]!r}"
    max_tokens = 12  # streamed: a few more tokens than the echo
    payload |= {"stream": True, "max_tokens": max_tokens}
    async with http.post(f"{url}/v1/chat/completions", json=payload) as r:
        if r.status != 200:
            return f"http {r.status}: {(await r.read())[:200]!r}"
        events = []
        buffer = b""
        async for chunk in r.content.iter_any():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            events += [line[6:].decode() for line in lines if line.startswith(b"data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream cut: {events[-1:]!r}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {next(c for c in chunks if 'error' in c)!r}"[:300]
    got = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return None if got == _expected_text(text, max_tokens) else f"wrong stream {got[:80]!r}"


async def _drive(cfg: SoakConfig, daemon: _Daemon, result: SoakResult) -> None:
    rng = random.Random(cfg.seed)
    names = daemon.names
    plan: list[tuple[str, str]] = []
    for i in range(cfg.requests):
        hot = (i // cfg.hot_span) % len(names)
        pair = [names[hot], names[(hot + 1) % len(names)]]
        model = rng.choice(pair) if rng.random() < cfg.hot_fraction else rng.choice(names)
        x = rng.random()
        kind = (
            "stream"
            if x < cfg.stream_fraction
            else "embed"
            if x < cfg.stream_fraction + cfg.embed_fraction
            else "completion"
            if x < cfg.stream_fraction + cfg.embed_fraction + cfg.completion_fraction
            else "chat"
        )
        plan.append((model, kind))
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        # warm-up: every model started once (their cold starts are not the soak's subject), then RSS is measured
        for name in names:
            async with http.post(f"{daemon.url}/vllama/start", json={"model": name}) as r:
                await r.read()
        result.rss_start = result.rss_peak = daemon.ps.memory_info().rss
        result.fds_start = daemon.ps.num_fds()
        unix_start = _unix_sockets(daemon.ps)

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(plan):
                i = next_index
                next_index += 1
                model, kind = plan[i]
                t0 = time.perf_counter()
                try:
                    problem = await _one(http, daemon.url, i, model, kind)
                except Exception as exc:  # a dropped connection, a timeout: lost
                    problem = f"{type(exc).__name__}: {exc}"[:300]
                result.latencies.append(time.perf_counter() - t0)
                result.sent += 1
                result.by_kind[kind] = result.by_kind.get(kind, 0) + 1
                result.by_model[model] = result.by_model.get(model, 0) + 1
                if problem is None:
                    result.ok += 1
                else:
                    key = problem.split(":")[0]
                    result.failures[key] = result.failures.get(key, 0) + 1
                    if len(result.failure_examples) < 20:
                        result.failure_examples.append(f"#{i} {model} {kind}: {problem}")

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(0.5)
                with contextlib.suppress(psutil.Error):
                    result.rss_peak = max(result.rss_peak, daemon.ps.memory_info().rss)

        sampler = asyncio.get_running_loop().create_task(sample_rss())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        result.seconds = time.perf_counter() - t0
        sampler.cancel()

    # the clients' connections are closed now; what vllama still holds open is its listening socket, its log,
    # and its pool of keep-alive connections to the engines (bounded; not a leak): counted apart
    await asyncio.sleep(1.0)
    result.rss_end = daemon.ps.memory_info().rss
    result.rss_peak = max(result.rss_peak, result.rss_end)
    result.fds_end = daemon.ps.num_fds()
    with contextlib.suppress(psutil.Error):
        conns = daemon.ps.net_connections(kind="tcp")
        result.upstream_pool = sum(1 for c in conns if c.raddr and c.laddr.port != daemon.port)  # outgoing ones
        # children on Unix sockets: the connections to them are the Unix sockets opened since the start
        result.upstream_pool += max(0, _unix_sockets(daemon.ps) - unix_start)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{daemon.url}/vllama/ps") as r:
            rows = (await r.json())["models"]
        async with http.get(f"{daemon.url}/vllama/info") as r:
            result.evictions = (await r.json())["evictions"]
        for row in rows:
            result.in_flight_after[row["model"]] = row["in_flight"]
            result.states_after[row["model"]] = row["state"] + (f" L{row['sleep_level']}" if row["sleep_level"] else "")
            if row["port"]:
                async with http.get(f"http://127.0.0.1:{row['port']}/fake/stats") as r:
                    result.engine_in_flight_after[row["model"]] = (await r.json())["in_flight"]


def run_soak(cfg: SoakConfig) -> SoakResult:
    result = SoakResult(config=cfg)
    with contextlib.ExitStack() as stack:
        work = cfg.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllama-soak-")))
        daemon = _Daemon(cfg, work)
        try:
            deadline = time.monotonic() + 60
            while True:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"vllama exited at start:\n{daemon.log.read_text()}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", daemon.port), timeout=1):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("vllama did not start")
                time.sleep(0.1)
            asyncio.run(_drive(cfg, daemon, result))
        finally:
            groups = daemon.children_groups()
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                result.daemon_exit = daemon.proc.wait(60)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                result.daemon_exit = daemon.proc.wait()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                result.leftover_processes = processes_in_groups(groups)
                if not result.leftover_processes:
                    break
                time.sleep(0.2)
            log = daemon.log.read_text(errors="replace")
            result.daemon_errors = [block[:500] for block in log.split("Traceback")[1:]]
    return result


def processes_in_groups(groups: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is one of `groups`."""
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) in groups:
                alive.append(p.info["pid"])
    return alive


def machine() -> str:
    mem = psutil.virtual_memory().total / 1024**3
    return (
        f"{platform.node()}: {platform.system()} {platform.release()}, {psutil.cpu_count()} CPU(s), "
        f"{mem:.0f} GiB RAM, Python {platform.python_version()}"
    )


def markdown(result: SoakResult, command: str) -> str:
    s = result.summary()
    cfg = result.config
    lines = [
        f"# vllama soak test, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- setup: {cfg.models} fake-engine models of {cfg.model_gib:g} GiB on one simulated {cfg.gpu_gib:g} GiB GPU "
        "(0.5 GiB kept while asleep): two fit awake, the others sleep (level 2) and wake as requests move; "
        f"{cfg.hot_fraction:.0%} of requests go to a hot pair of models that moves every {cfg.hot_span} requests, "
        "the rest to any model",
        f"- mix: {cfg.stream_fraction:.0%} streamed chat, {cfg.embed_fraction:.0%} embeddings, "
        f"{cfg.completion_fraction:.0%} completions, the rest chat; every answer checked in full",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests sent / answered completely and correctly | {s['requests']} / {s['ok']} |",
        f"| lost, cut or refused | **{s['lost_or_failed']}** {s['failures'] or ''} |",
        f"| concurrency | {s['concurrency']} |",
        f"| by kind | {s['by_kind']} |",
        f"| by model | {s['by_model']} |",
        f"| evictions (sleep/stop to make room) | {s['evictions']} |",
        f"| time, throughput | {s['seconds']} s, {s['requests_per_s']} requests/s |",
        f"| latency p50 / p99 / max | {s['latency_p50_ms']} / {s['latency_p99_ms']} / {s['latency_max_ms']} ms |",
        f"| vllama RSS after warm-up / at the end / peak | {s['rss_start_mib']} / {s['rss_end_mib']} / "
        f"{s['rss_peak_mib']} MiB |",
        f"| vllama file descriptors after warm-up / at the end (of which pooled connections to engines) | "
        f"{s['fds_start']} / {s['fds_end']} ({s['upstream_pool']}) |",
        f"| in flight afterwards (vllama / engines) | {s['in_flight_after']} / {s['engine_in_flight_after']} |",
        f"| states afterwards | {s['states_after']} |",
        f"| processes left after SIGTERM of vllama | {len(s['leftover_processes'])} |",
        f"| vllama exit code, tracebacks in its log | {s['daemon_exit']}, {s['daemon_errors']} |",
        f"| **passed** | **{s['passed']}** |",
    ]
    if result.failure_examples:
        lines += ["", "Failures (first 20):", "", *[f"- {f}" for f in result.failure_examples]]
    return "\n".join(lines) + "\n"
