"""One vLLM child: its command line and environment, spawning it in its own process group under
`vllama.guard`, readiness, the sleep/wake HTTP calls, and stopping the whole group.

This module knows vLLM's HTTP and process facts; it keeps no lifecycle state (that is `instance.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from vllama.config import ADAPTER_CONFIG, LORA_RANKS, ModelConfig

LOOPBACK = "127.0.0.1"  # vLLM's sleep/RPC endpoints are unauthenticated: children never bind anything else
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# env that breaks vLLM's sleep mode (its allocator cannot release expandable segments), and vllama's own secrets
_ENV_DROPPED = ("PYTORCH_CUDA_ALLOC_CONF", "VLLAMA_API_KEY", "VLLAMA_ADMIN_API_KEY")
# how a server that could not bind its port says so (Python's OSError; uvicorn's and aiohttp's wording)
_ADDRESS_IN_USE = re.compile(r"address already in use|\[errno 98\]|EADDRINUSE", re.IGNORECASE)


class EngineError(Exception):
    """An engine operation failed; the message is meant for the user (what failed, where the log is)."""


class PortInUse(EngineError):
    """The child could not have its port: another process bound it after vllama picked it (or answers on it).
    Not the model's fault: start it again on another port."""


def safe_file_name(name: str) -> str:
    """A model name made safe for a file name: no path separators, no leading dots, bounded length."""
    cleaned = _UNSAFE_NAME_CHARS.sub("_", name).strip("._") or "model"
    return cleaned[:80]


# --- LoRA (vllama/lora.py keeps which adapters are loaded; this is the flags and the HTTP calls) ---------------

DEFAULT_MAX_LORAS_CAP = 4  # default max_loras: one slot per adapter, at most this many (each slot costs memory)
DEFAULT_LORA_RANK = 16  # vLLM's default max_lora_rank, used when no adapter's rank can be read at launch


class LoraError(EngineError):
    """An adapter could not be loaded (wrong path, rank above the limit, refused by vLLM); the base model is
    not affected."""


def read_adapter_rank(path: Path) -> int:
    """The highest rank of a PEFT adapter folder (`r`, and any `rank_pattern` override), as vLLM checks it."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise LoraError(f"{path} has no {ADAPTER_CONFIG} (not a PEFT LoRA adapter folder)") from None
    except (OSError, ValueError) as exc:
        raise LoraError(f"{path / ADAPTER_CONFIG} cannot be read: {exc}") from None
    ranks = [config.get("r"), *dict(config.get("rank_pattern") or {}).values()] if isinstance(config, dict) else []
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise LoraError(f"{path / ADAPTER_CONFIG} has no valid rank 'r' (got {ranks[:1] or config!r})")
    return int(max(ranks))


def rank_limit_for(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None: above vLLM's largest)."""
    return next((r for r in LORA_RANKS if r >= rank), None)


@dataclass(frozen=True)
class LoraLaunch:
    """The LoRA settings a base model is launched with."""

    max_loras: int
    max_lora_rank: int
    rank_from: str  # where max_lora_rank comes from, for messages: "max_lora_rank" or the adapters' configs

    def args(self) -> list[str]:
        return ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]


def lora_launch(cfg: ModelConfig) -> LoraLaunch | None:
    """LoRA settings of a model with adapters (None without): `max_loras` (default: one slot per adapter, at
    most DEFAULT_MAX_LORAS_CAP) and `max_lora_rank` (default: the highest rank among the adapters that can be
    read now, rounded up to a rank vLLM accepts; an unreadable adapter fails later, when it is loaded)."""
    if not cfg.adapters:
        return None
    max_loras = cfg.max_loras or min(len(cfg.adapters), DEFAULT_MAX_LORAS_CAP)
    if cfg.max_lora_rank is not None:
        return LoraLaunch(max_loras, cfg.max_lora_rank, "max_lora_rank")
    ranks = []
    for path in cfg.adapters.values():
        with contextlib.suppress(LoraError):
            ranks.append(read_adapter_rank(Path(path).expanduser()))
    limits = [limit for limit in map(rank_limit_for, ranks) if limit is not None]
    rank = max(limits, default=DEFAULT_LORA_RANK)
    return LoraLaunch(max_loras, rank, "the adapters' adapter_config.json (set max_lora_rank to choose)")


def launch_lora_settings(argv: list[str]) -> tuple[int, int] | None:
    """(max_loras, max_lora_rank) a child was launched with, from its argv (vLLM's defaults for flags left out);
    None when LoRA is not enabled. Read from the argv, so flags given in extra_args count too."""
    if "--enable-lora" not in argv:
        return None

    def last(flag: str, default: int) -> int:
        value = default
        for i, arg in enumerate(argv):
            raw = argv[i + 1] if arg == flag and i + 1 < len(argv) else arg.partition(flag + "=")[2]
            if raw.isdigit():
                value = int(raw)
        return value

    return last("--max-loras", 1), last("--max-lora-rank", DEFAULT_LORA_RANK)


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
    cuda_ids: Sequence[str] | None = None,
) -> LaunchSpec:
    """The command line and environment of a child on `devices` (vllama's device numbers); `cuda_ids` are what
    CUDA_VISIBLE_DEVICES names for them (NVML indices, `GpuProbe.cuda_ids`); default: the numbers themselves."""
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
    if len(devices) > 1:  # tensor_parallel_size × pipeline_parallel_size = the devices (config.py checks)
        argv += ["--tensor-parallel-size", str(len(devices) // cfg.pp)]
        if cfg.pp > 1:
            argv += ["--pipeline-parallel-size", str(cfg.pp)]
    if sleep_mode:
        argv += ["--enable-sleep-mode"]
    lora = lora_launch(cfg)
    if lora is not None and "--enable-lora" not in cfg.extra_args:  # the user's own LoRA flags win
        argv += lora.args()
    argv += cfg.extra_args

    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env.update(cfg.env)
    env["PYTHONUNBUFFERED"] = "1"
    if device_kind == "cuda":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers devices like NVML
        # the physical GPUs (vllama's own CUDA_VISIBLE_DEVICES, inherited above, is replaced, never combined)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda_ids if cuda_ids is not None else [str(d) for d in devices])
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (unsupported on the lent machines)
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if lora is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # enables /v1/load_lora_adapter and /v1/unload_lora_adapter
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


def log_tail(path: Path, lines: int = 20) -> tuple[str, int]:
    """The last lines of a log and the byte offset right after them (read once, so nothing falls between)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - 64 * 1024))
            data = f.read(end - f.tell())
    except OSError:
        return "", 0
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:]), end


# vLLM's last words after a failed start only point elsewhere ("Engine core initialization failed. See root
# cause above."): the root cause is the error line before them
_GENERIC_FAILURE = re.compile(r"See root cause above|Engine core initialization failed|EngineCore failed to start")


def summarize_failure(path: Path) -> str:
    """The most telling line of a failed vLLM log (its last error that is not a generic wrapper), for an
    error message."""
    tail = log_tail(path, 60)[0].splitlines()
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
    log_offset: int = 0  # where this run's output starts in the (appended) log file

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
        offset = log.tell()
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
    return EngineProcess(spec=spec, process=process, log_offset=offset)


def output_since_start(engine: EngineProcess, limit: int = 256 * 1024) -> str:
    """What this run of the child wrote to its log so far (the end of it, at most `limit` bytes)."""
    try:
        with engine.spec.log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(engine.log_offset, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def listens_on_port(engine: EngineProcess) -> bool | None:
    """Whether a process of this instance's group listens on its port: False means whatever answers there is
    somebody else's (a stray took the port); None when that cannot be told (no permission to look)."""
    try:
        guard = psutil.Process(engine.pid)
        procs = [guard, *guard.children(recursive=True)]
    except psutil.Error:
        return None
    denied = False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.AccessDenied:
            denied = True
            continue
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == engine.port for c in conns):
            return True
    return None if denied else False


def _port_arg(cmdline: list[str]) -> int | None:
    """The value of the last `--port N` / `--port=N` in a command line."""
    port = None
    for i, arg in enumerate(cmdline):
        value = cmdline[i + 1] if arg == "--port" and i + 1 < len(cmdline) else arg.partition("--port=")[2]
        if value.isdigit():
            port = int(value)
    return port


def find_strays(port_range: tuple[int, int]) -> list[dict[str, Any]]:
    """Processes this vllama did not start that listen on a port of `port_range`, or that run a vllama guard or
    a vLLM server meant for such a port (still starting): leftovers of an earlier or another vllama, or
    squatters. vllama never adopts or kills them; it reports them and leaves their ports alone."""
    lo, hi = port_range
    me = os.getpid()
    try:
        ours = {me, *(p.pid for p in psutil.Process(me).children(recursive=True))}
    except psutil.Error:
        ours = {me}
    found: dict[tuple[int | None, int | None], dict[str, Any]] = {}

    def add(pid: int | None, port: int | None, cmdline: list[str] | None = None) -> None:
        if cmdline is None and pid is not None:
            with contextlib.suppress(psutil.Error):
                cmdline = psutil.Process(pid).cmdline()
        text = " ".join(cmdline or [])
        kind = "vllama guard" if "vllama.guard" in text else "vLLM server" if "vllm" in text.lower() else "other"
        kind = "vLLM server (fake)" if kind == "other" and "fake_engine" in text else kind
        found[(pid, port)] = {"pid": pid, "port": port, "kind": kind, "cmdline": text[:300]}

    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and lo <= c.laddr.port <= hi and c.pid not in ours:
                add(c.pid, c.laddr.port)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        pid, cmdline = proc.info["pid"], proc.info["cmdline"] or []
        if pid in ours or not any("vllama.guard" in a or "vllm" in a.lower() or "fake_engine" in a for a in cmdline):
            continue
        port = _port_arg(cmdline)  # a guard, or a server still starting, that will bind this port
        if port is not None and lo <= port <= hi and not any(key[0] == pid for key in found):
            add(pid, port, cmdline)
    return sorted(found.values(), key=lambda e: (e["port"] or 0, e["pid"] or 0))


async def wait_ready(engine: EngineProcess, http: aiohttp.ClientSession, timeout: float) -> None:
    """Poll /health until 200 (vLLM opens its port only once the engine is up), watching for an early exit."""
    deadline = time.monotonic() + timeout
    while True:
        if engine.exited:
            if _ADDRESS_IN_USE.search(output_since_start(engine)):
                raise PortInUse(f"port {engine.port} was taken by another process before vLLM could bind it")
            raise EngineError(
                f"vLLM exited with code {engine.process.returncode} while starting: "
                f"{summarize_failure(engine.spec.log_path)} (log: {engine.spec.log_path})"
            )
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with http.get(f"{engine.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                healthy = r.status == 200
            if healthy:
                # whoever answered must be our child, not a stray that holds the port (never adopt one)
                if await asyncio.to_thread(listens_on_port, engine) is False:
                    raise PortInUse(f"port {engine.port} is answered by a process that is not this vLLM")
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


async def engine_exited(engine: EngineProcess, within: float) -> bool:
    """Whether the child has exited, waiting up to `within` seconds for its guard to notice."""
    if not engine.exited:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(engine.process.wait()), within)
    return engine.exited


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


async def _lora_post(
    engine: EngineProcess, http: aiohttp.ClientSession, path: str, body: dict[str, Any], timeout: float
) -> tuple[int, str]:
    async with http.post(f"{engine.base_url}{path}", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.text()


def _vllm_message(text: str) -> str:
    """The message of a vLLM error answer (its OpenAI error envelope), else the text itself."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:500]
    return text.strip()[:500]


async def load_lora(
    engine: EngineProcess,
    http: aiohttp.ClientSession,
    name: str,
    path: Path,
    *,
    replace: bool = False,
    timeout: float = 120.0,
) -> None:
    """Load the adapter at `path` into the running vLLM, served as `name` (vLLM serves a loaded adapter under its
    lora_name). `replace`: load it again in place if vLLM has it already (after a wake). Raises LoraError with
    vLLM's reason."""
    body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
    if replace:
        body["load_inplace"] = True
    status, text = await _lora_post(engine, http, "/v1/load_lora_adapter", body, timeout)
    if status >= 400:
        if status == 404 and text.startswith('{"detail"'):  # FastAPI's answer for a route that is not there
            raise LoraError(
                f"vLLM has no /v1/load_lora_adapter: it was not started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                f"and --enable-lora (log: {engine.spec.log_path})"
            )
        raise LoraError(f"vLLM refused to load the adapter ({status}): {_vllm_message(text)}")


async def unload_lora(engine: EngineProcess, http: aiohttp.ClientSession, name: str, timeout: float = 60.0) -> bool:
    """Unload adapter `name` from the running vLLM. False if vLLM did not have it (nothing to do)."""
    status, text = await _lora_post(engine, http, "/v1/unload_lora_adapter", {"lora_name": name}, timeout)
    if status == 404:
        return False
    if status >= 400:
        raise LoraError(f"vLLM refused to unload adapter {name!r} ({status}): {_vllm_message(text)}")
    return True
