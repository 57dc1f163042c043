"""One vLLM child: its command line and environment, spawning it in its own process group under
`vllama.guard`, readiness, the sleep/wake HTTP calls, and stopping the whole group.

Where a child listens (`VLLAMA_CHILD_TRANSPORT`): by default on a Unix socket (vLLM's `--uds`) in a folder only
vllama's user can open (`private_dir`), so no other local user can reach its unauthenticated sleep, wake and
RPC endpoints or its models; with `tcp`, on a port of `VLLAMA_PORT_RANGE` on 127.0.0.1 (for a vLLM without
`--uds`). A child's address is one string either way, `unix:/path` or `127.0.0.1:port` (`LaunchSpec.address`).

This module knows vLLM's HTTP and process facts; it keeps no lifecycle state (that is `instance.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.client_proto import ResponseHandler

from vllama.config import ADAPTER_CONFIG, LORA_RANKS, SOCKET_NAME_MAX, ModelConfig

LOOPBACK = "127.0.0.1"  # vLLM's sleep/RPC endpoints are unauthenticated: children never bind anything else
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# env that breaks vLLM's sleep mode (its allocator cannot release expandable segments), and vllama's own secrets
_ENV_DROPPED = ("PYTORCH_CUDA_ALLOC_CONF", "VLLAMA_API_KEY", "VLLAMA_ADMIN_API_KEY")
# how a server that could not bind its port says so (Python's OSError; uvicorn's and aiohttp's wording)
_ADDRESS_IN_USE = re.compile(r"address already in use|\[errno 98\]|EADDRINUSE", re.IGNORECASE)
# how an argparse CLI (vLLM before --uds) refuses the flag
_NO_UDS = re.compile(r"unrecognized arguments:.*--uds")


class EngineError(Exception):
    """An engine operation failed; the message is meant for the user (what failed, where the log is)."""


class PortInUse(EngineError):
    """The child could not have its address: another process bound the port (or made the socket) after vllama
    picked it, or answers there. Not the model's fault: start it again at another address."""


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
    port: int | None  # None: the child listens on the Unix socket `uds`
    log_path: Path
    uds: Path | None = None

    @property
    def address(self) -> str:
        """Where the child listens: `unix:/path/of/socket` or `127.0.0.1:port`."""
        return f"unix:{self.uds}" if self.uds is not None else f"{LOOPBACK}:{self.port}"


def build_launch(
    *,
    name: str,
    cfg: ModelConfig,
    vllm_command: list[str],
    port: int | None = None,
    uds: Path | None = None,
    devices: tuple[int, ...],
    device_kind: str,
    gpu_memory_utilization: float | None,
    logs_dir: Path,
    sleep_mode: bool,
    cuda_ids: Sequence[str] | None = None,
) -> LaunchSpec:
    """The command line and environment of a child on `devices` (vllama's device numbers); `cuda_ids` are what
    CUDA_VISIBLE_DEVICES names for them (NVML indices, `GpuProbe.cuda_ids`); default: the numbers themselves.
    The child listens on the Unix socket `uds` if given (vLLM then ignores --host/--port: none is passed), else
    on 127.0.0.1 at `port`."""
    if (uds is None) == (port is None):
        raise ValueError("a child listens on a Unix socket or on a port: give one of uds and port")
    served_names = [name, *cfg.aliases]
    argv = [
        *(cfg.vllm_command or vllm_command),
        "--model", cfg.source or name,
        "--served-model-name", *served_names,
    ]  # fmt: skip
    argv += ["--uds", str(uds)] if uds is not None else ["--host", LOOPBACK, "--port", str(port)]
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
    # `<model>_<port>.log`, or `<model>_<n>.log` after the socket `<model>-<n>.sock` (`pick_socket`)
    where = uds.stem.rpartition("-")[2] if uds is not None else str(port)
    log_path = logs_dir / f"{safe_file_name(name)}_{where}.log"
    return LaunchSpec(argv=argv, env=env, port=port, log_path=log_path, uds=uds)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_port(port_range: tuple[int, int], taken: Iterable[object]) -> int:
    busy = set(taken)
    for port in range(port_range[0], port_range[1] + 1):
        if port not in busy and port_is_free(port):
            return port
    raise EngineError(f"no free port in {port_range[0]}-{port_range[1]} for a new vLLM instance")


# --- Unix sockets ------------------------------------------------------------------------------------------


def private_dir(path: Path) -> bool:
    """Make `path` a folder only this user can open (0700), or check and repair the one there. True if its
    mode had to be repaired. EngineError if it is not a real folder (a symlink, a file) or belongs to another
    user: in a shared folder like /tmp another user could have made it first, to reach the sockets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise EngineError(f"{path} (the folder of the vLLM children's sockets) is not a folder (a symlink or a file)")
    if st.st_uid != os.geteuid():
        raise EngineError(
            f"{path} (the folder of the vLLM children's sockets) belongs to uid {st.st_uid}, not to vllama's user "
            f"(uid {os.geteuid()}): remove it, or set VLLAMA_HOME to a shorter path"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)  # the mode of an existing folder, or one that a umask narrowed further
        return True
    return False


def socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket `path` (False for a leftover socket file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except (TimeoutError, BlockingIOError):
            return True  # a full backlog: somebody is there
        except OSError:  # no file, nobody listening (a leftover), not a socket
            return False
    return True


def remove_socket(path: Path) -> bool:
    """Remove a socket file (never anything else). True if one was removed."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
            return True
    return False


def pick_socket(run_dir: Path, name: str, taken: Iterable[object]) -> Path:
    """A socket path for a child of model `name`: `<run_dir>/<name>-1.sock` (the name made safe and short), or
    -2, -3... when that one is used by another child of ours, answered by a process we did not start, or is
    no socket. A leftover socket file (a child that died, an earlier vllama) is removed: vLLM cannot bind over
    one."""
    busy = set(taken)
    stem = safe_file_name(name)[: SOCKET_NAME_MAX - len("-99.sock")]
    for k in range(1, 100):
        path = run_dir / f"{stem}-{k}.sock"
        if path in busy or socket_in_use(path):
            continue
        remove_socket(path)
        if not os.path.lexists(path):
            return path
    raise EngineError(f"no free socket name for {name!r} in {run_dir}")


def socket_path(address: str) -> str | None:
    """The Unix socket of a child's address (`LaunchSpec.address`): None for `127.0.0.1:port`."""
    return address[len("unix:") :] if address.startswith("unix:") else None


# aiohttp reaches a child's socket through a URL whose host stands for the socket (see ChildConnector); both
# maps hold one entry per address ever used (a few per model), so a URL is made once, not per request
_SOCKET_HOSTS: dict[str, str] = {}
_URLS: dict[str, str] = {}


def url_of(address: str) -> str:
    """The base URL of a child at `address` (`LaunchSpec.address`) for a session with a ChildConnector."""
    url = _URLS.get(address)
    if url is None:
        path = socket_path(address)
        if path is None:
            url = f"http://{address}"
        else:
            host = f"uds-{hashlib.sha256(os.fsencode(path)).hexdigest()[:20]}.vllama.invalid"
            _SOCKET_HOSTS[host] = path
            url = f"http://{host}"
        _URLS[address] = url
    return url


class ChildConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector that also connects to the children's Unix sockets, by the host of a URL from
    `url_of` (aiohttp's own UnixConnector serves one socket per session; vllama has one session for all)."""

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        path = _SOCKET_HOSTS.get(req.host)
        if path is None:
            return await super()._create_connection(req, traces, timeout)
        try:
            async with asyncio.timeout(timeout.sock_connect):
                _, protocol = await self._loop.create_unix_connection(lambda: ResponseHandler(self._loop), path)
        except OSError as exc:
            raise UnixClientConnectorError(path, req.connection_key, exc) from exc
        return protocol


def child_session() -> aiohttp.ClientSession:
    """An aiohttp session that reaches children at either kind of address."""
    return aiohttp.ClientSession(connector=ChildConnector(limit=0))


async def open_connection(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    path = socket_path(address)
    if path is not None:
        return await asyncio.open_unix_connection(path)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


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
    def port(self) -> int | None:
        return self.spec.port

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def base_url(self) -> str:
        return url_of(self.spec.address)

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


def listens_on_address(engine: EngineProcess) -> bool | None:
    """Whether a process of this instance's group listens at its address (port or socket): False means whatever
    answers there is somebody else's (a stray took it); None when that cannot be told (no permission to look)."""
    try:
        guard = psutil.Process(engine.pid)
        procs = [guard, *guard.children(recursive=True)]
    except psutil.Error:
        return None
    uds = str(engine.spec.uds) if engine.spec.uds is not None else None
    denied = False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="unix" if uds else "tcp")
        except psutil.AccessDenied:
            denied = True
            continue
        except psutil.Error:
            continue
        if uds is not None:
            if any(c.laddr == uds for c in conns):
                return True
        elif any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == engine.port for c in conns):
            return True
    return None if denied else False


def _last_arg(cmdline: list[str], flag: str) -> str | None:
    """The value of the last `FLAG V` / `FLAG=V` in a command line."""
    value = None
    for i, arg in enumerate(cmdline):
        if arg == flag and i + 1 < len(cmdline):
            value = cmdline[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    return value


def remove_leftover_sockets(run_dir: Path) -> list[Path]:
    """Remove the socket files in `run_dir` that nobody answers on (children of an earlier vllama that was
    killed, or that died): vLLM cannot bind over one. Sockets still answered are left (`find_strays`)."""
    removed = []
    with contextlib.suppress(OSError):
        for path in sorted(run_dir.glob("*.sock")):
            if not socket_in_use(path) and remove_socket(path):
                removed.append(path)
    return removed


def find_strays(*, port_range: tuple[int, int] | None = None, run_dir: Path | None = None) -> list[dict[str, Any]]:
    """Processes this vllama did not start that listen at an address of its children — a port of `port_range`
    (TCP children), a socket in `run_dir` (Unix-socket children) — or that run a vllama guard or a vLLM server
    meant for one (still starting): leftovers of an earlier or another vllama on the same home, or squatters.
    vllama never adopts or kills them; it reports them and leaves their addresses alone."""
    me = os.getpid()
    try:
        ours = {me, *(p.pid for p in psutil.Process(me).children(recursive=True))}
    except psutil.Error:
        ours = {me}
    found: dict[tuple[int | None, object], dict[str, Any]] = {}

    def add(pid: int | None, where: int | str, cmdline: list[str] | None = None) -> None:
        if cmdline is None and pid is not None:
            with contextlib.suppress(psutil.Error):
                cmdline = psutil.Process(pid).cmdline()
        text = " ".join(cmdline or [])
        kind = "vllama guard" if "vllama.guard" in text else "vLLM server" if "vllm" in text.lower() else "other"
        kind = "vLLM server (fake)" if kind == "other" and "fake_engine" in text else kind
        port, sock = (where, None) if isinstance(where, int) else (None, where)
        found[(pid, where)] = {"pid": pid, "port": port, "socket": sock, "kind": kind, "cmdline": text[:300]}

    def ours_to_watch(port: int | None, sock: str | None) -> bool:
        if port is not None and port_range is not None:
            return port_range[0] <= port <= port_range[1]
        return sock is not None and run_dir is not None and Path(sock).parent == run_dir

    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp" if run_dir is None else "all"):
            if c.pid in ours or not c.laddr:
                continue
            if c.family == socket.AF_UNIX:
                if isinstance(c.laddr, str) and ours_to_watch(None, c.laddr) and c.laddr.endswith(".sock"):
                    add(c.pid, c.laddr)
            elif c.status == psutil.CONN_LISTEN and ours_to_watch(c.laddr.port, None):
                add(c.pid, c.laddr.port)
    listed = {key[0] for key in found}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        pid, cmdline = proc.info["pid"], proc.info["cmdline"] or []
        if pid in ours or pid in listed:
            continue
        if not any("vllama.guard" in a or "vllm" in a.lower() or "fake_engine" in a for a in cmdline):
            continue
        # a guard, or a server still starting, that will listen there
        raw_port, sock = _last_arg(cmdline, "--port"), _last_arg(cmdline, "--uds")
        port = int(raw_port) if raw_port is not None and raw_port.isdigit() else None
        if sock is not None and ours_to_watch(None, sock):
            add(pid, sock, cmdline)
        elif sock is None and port is not None and ours_to_watch(port, None):
            add(pid, port, cmdline)
    return sorted(found.values(), key=lambda e: (e["port"] or 0, e["socket"] or "", e["pid"] or 0))


async def wait_ready(engine: EngineProcess, http: aiohttp.ClientSession, timeout: float) -> None:
    """Poll /health until 200 (vLLM opens its port only once the engine is up), watching for an early exit."""
    deadline = time.monotonic() + timeout
    while True:
        if engine.exited:
            output = output_since_start(engine)
            where = f"socket {engine.spec.uds}" if engine.spec.uds is not None else f"port {engine.port}"
            if _ADDRESS_IN_USE.search(output):
                raise PortInUse(f"{where} was taken by another process before vLLM could bind it")
            hint = ""
            if engine.spec.uds is not None and _NO_UDS.search(output):
                hint = " (this vLLM has no --uds: set VLLAMA_CHILD_TRANSPORT=tcp to serve its children on ports)"
            raise EngineError(
                f"vLLM exited with code {engine.process.returncode} while starting: "
                f"{summarize_failure(engine.spec.log_path)}{hint} (log: {engine.spec.log_path})"
            )
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with http.get(f"{engine.base_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                healthy = r.status == 200
            if healthy:
                # whoever answered must be our child, not a stray that holds the port (never adopt one)
                if await asyncio.to_thread(listens_on_address, engine) is False:
                    raise PortInUse(f"{engine.address} is answered by a process that is not this vLLM")
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
    if engine.spec.uds is not None:
        remove_socket(engine.spec.uds)  # the group is gone: nobody listens there any more
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


def discard(engine: EngineProcess) -> None:
    """A child that died by itself: kill what is left of its group, and remove its socket file at once (the
    path is free for the next start even while the SIGKILLed processes are still going away)."""
    kill_group(engine.pid)
    if engine.spec.uds is not None:
        remove_socket(engine.spec.uds)


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
