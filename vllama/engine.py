"""One vLLM child: its command line and environment, spawning it in its own process group under
`vllama.guard`, readiness, the sleep/wake HTTP calls, and stopping the whole group.

This module knows vLLM's HTTP and process facts; it keeps no lifecycle state (that is `instance.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from vllama.config import ModelConfig

LOOPBACK = "127.0.0.1"  # vLLM's sleep/RPC endpoints are unauthenticated: children never bind anything else
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# env that breaks vLLM's sleep mode (its allocator cannot release expandable segments)
_ENV_DROPPED = ("PYTORCH_CUDA_ALLOC_CONF",)


class EngineError(Exception):
    """An engine operation failed; the message is meant for the user (what failed, where the log is)."""


def safe_file_name(name: str) -> str:
    """A model name made safe for a file name: no path separators, no leading dots, bounded length."""
    cleaned = _UNSAFE_NAME_CHARS.sub("_", name).strip("._") or "model"
    return cleaned[:80]


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path


def build_launch(
    *,
    name: str,
    cfg: ModelConfig,
    vllm_command: list[str],
    port: int,
    devices: tuple[int, ...],
    device_kind: str,
    gpu_memory_utilization: float | None,
    logs_dir: Path,
    sleep_mode: bool,
) -> LaunchSpec:
    served_names = [name, *cfg.aliases]
    argv = [
        *(cfg.vllm_command or vllm_command),
        "--model", cfg.source or name,
        "--served-model-name", *served_names,
        "--host", LOOPBACK,
        "--port", str(port),
    ]  # fmt: skip
    if device_kind == "cuda" and gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
    if cfg.max_model_len is not None:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if len(devices) > 1:
        argv += ["--tensor-parallel-size", str(len(devices))]
    if sleep_mode:
        argv += ["--enable-sleep-mode"]
    argv += cfg.extra_args

    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env.update(cfg.env)
    env["PYTHONUNBUFFERED"] = "1"
    if device_kind == "cuda":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers devices like NVML
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (unsupported on the lent machines)
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if device_kind == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_path = logs_dir / f"{safe_file_name(name)}_{port}.log"
    return LaunchSpec(argv=argv, env=env, port=port, log_path=log_path)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_port(port_range: tuple[int, int], taken: Iterable[int]) -> int:
    busy = set(taken)
    for port in range(port_range[0], port_range[1] + 1):
        if port not in busy and port_is_free(port):
            return port
    raise EngineError(f"no free port in {port_range[0]}-{port_range[1]} for a new vLLM instance")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            tail = deque(f.read().decode(errors="replace").splitlines(), maxlen=lines)
    except OSError:
        return ""
    return "\n".join(tail)


# vLLM's last words after a failed start only point elsewhere ("Engine core initialization failed. See root
# cause above."): the root cause is the error line before them
_GENERIC_FAILURE = re.compile(r"See root cause above|Engine core initialization failed|EngineCore failed to start")


def summarize_failure(path: Path) -> str:
    """The most telling line of a failed vLLM log (its last error that is not a generic wrapper), for an
    error message."""
    tail = log_tail(path, 60).splitlines()
    errors = [line for line in tail if re.search(r"(Error|Exception|error:)", line) and "Traceback" not in line]
    specific = [line for line in errors if not _GENERIC_FAILURE.search(line)]
    if specific or errors:
        return (specific or errors)[-1].strip()[-400:]
    return tail[-1].strip()[-400:] if tail else "(empty log)"


@dataclass
class EngineProcess:
    """A running (or exited) vLLM child under its guard. `pgid` is the guard's pid = the process group."""

    spec: LaunchSpec
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.spec.port}"

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    def group_pids(self) -> list[int]:
        """Every live process of this instance's group (guard, API server, EngineCore, workers...)."""
        out = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.info["pid"]) == self.pid:
                    out.append(p.info["pid"])
        return out

    def server_pid(self) -> int | None:
        """The vLLM API server's pid (the guard's child)."""
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.pid).children()
            if children:
                return int(children[0].pid)
        return None


async def spawn(spec: LaunchSpec, *, stop_grace: float) -> EngineProcess:
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = spec.log_path.open("ab")
    try:
        log.write(f"# vllama: {' '.join(spec.argv)}\n".encode())
        log.flush()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllama.guard", "--parent", str(os.getpid()), "--grace", str(stop_grace),
            "--", *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=spec.env,
            start_new_session=True,  # own session and process group: signal the group, not one pid
        )  # fmt: skip
    finally:
        log.close()
    return EngineProcess(spec=spec, process=process)


async def wait_ready(engine: EngineProcess, http: aiohttp.ClientSession, timeout: float) -> None:
    """Poll /health until 200 (vLLM opens its port only once the engine is up), watching for an early exit."""
    deadline = time.monotonic() + timeout
    while True:
        if engine.exited:
            raise EngineError(
                f"vLLM exited with code {engine.process.returncode} while starting: "
                f"{summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
            )
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with http.get(f"{engine.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise EngineError(f"vLLM did not become ready within {timeout:.0f} s (log: {engine.spec.log_path})")
        await asyncio.sleep(0.2)


async def terminate(engine: EngineProcess, grace: float) -> int | None:
    """Stop the whole group: SIGTERM to the guard (it stops vLLM gracefully), SIGKILL to the group after
    `grace` (+ a margin for the guard's own grace). Returns the exit code."""
    if not engine.exited:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(engine.process.wait(), grace + 2.0)
    kill_group(engine.pid)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(engine.process.wait(), 5.0)
    return engine.process.returncode


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --- vLLM's sleep API (needs VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode) ---------------------------------


async def _post(http: aiohttp.ClientSession, url: str, timeout: float, json: object = None) -> None:
    async with http.post(url, json=json, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status >= 400:
            body = (await r.text())[:300]
            raise EngineError(f"POST {url.split('/', 3)[-1]} answered {r.status}: {body}")


async def is_sleeping(engine: EngineProcess, http: aiohttp.ClientSession) -> bool:
    async with http.get(f"{engine.base_url}/is_sleeping", timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        return bool((await r.json()).get("is_sleeping"))


async def _await_sleeping(engine: EngineProcess, http: aiohttp.ClientSession, want: bool, timeout: float) -> None:
    # vLLM's docs say /sleep may return before the sleep completes: /is_sleeping is the truth
    deadline = time.monotonic() + timeout
    while await is_sleeping(engine, http) != want:
        if time.monotonic() > deadline:
            raise EngineError(f"vLLM did not report is_sleeping={want} within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def sleep(engine: EngineProcess, http: aiohttp.ClientSession, level: int, timeout: float = 120.0) -> None:
    await _post(http, f"{engine.base_url}/sleep?level={level}", timeout)
    await _await_sleeping(engine, http, True, timeout)


async def wake(engine: EngineProcess, http: aiohttp.ClientSession, level: int, timeout: float = 300.0) -> None:
    base = engine.base_url
    if level == 2:
        # level 2 dropped the weights: a plain /wake_up would serve garbage; reload them from disk first
        await _post(http, f"{base}/wake_up?tags=weights", timeout)
        await _post(http, f"{base}/collective_rpc", timeout, json={"method": "reload_weights"})
        await _post(http, f"{base}/wake_up?tags=kv_cache", timeout)
        await _post(http, f"{base}/reset_prefix_cache", timeout)
    else:
        await _post(http, f"{base}/wake_up", timeout)
    await _await_sleeping(engine, http, False, timeout)


async def warm_up(engine: EngineProcess, http: aiohttp.ClientSession, served_name: str) -> None:
    """One 1-token completion after a start or wake: the first real request then runs warm. Best effort:
    embedding models refuse it, and that is fine."""
    body = {"model": served_name, "prompt": "Hi", "max_tokens": 1}
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with http.post(
            f"{engine.base_url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)
        ) as r:
            await r.read()
