"""The warm interpreter pool: spare vLLM processes that have already imported vLLM's server module (torch,
transformers, vLLM: most of a cold start) and wait for a model. A cold start hands its command line, environment
and log path to a spare instead of starting a fresh interpreter; the spare then becomes the model's server in
place (`vllama/spare.py`). A new spare is made in the background at once, at low priority (or, where vllama
cannot lower a spare's priority and raise it again, once that start is over).

Spares are interchangeable when they were started by the same interpreter (with the same flags) for the same
module, with the same environment: the *engine environment* (`PoolKey`). vllama keeps `VLLAMA_POOL_SIZE`
spares (default 2 on a host with 16 GiB available, else 1; 0 = no pool) for each engine environment of the
models in models.yaml (without `prewarm: false`), and for any other one once a model has started with it. On
the CPU build a spare's memory counts against the models' budget by itself (free memory is never more than
what the OS says is available).

A start falls back to a plain spawn, never waiting longer than that would take, when:
- the pool is off, or the model says `prewarm: false`;
- its command is not `PYTHON [FLAGS] -m vllm.entrypoints.openai.api_server` (a wrapper script, `vllm serve`);
- no spare of its engine environment is ready or importing (more starts at once than spares);
- its environment differs from the spare's in a variable that is read while importing (anything outside
  `LATE_ENV`: PYTHON*, LD_PRELOAD/LD_LIBRARY_PATH, OMP_*/MKL_*/KMP_* (the OpenMP runtime reads them when torch
  loads it), HF_HOME/HF_HUB_*/TRANSFORMERS_* (read into constants at import), VLLM_LOGGING_*/VLLM_CONFIGURE_LOGGING
  (vLLM's logger is set up at import), TORCH_*...): such a model gets spares of its own environment;
- it needs other devices than the spare's CUDA_VISIBLE_DEVICES and the spare has initialised the CUDA driver
  while importing (after cuInit the variable no longer counts; each spare reports it: `cuda_initialized` in
  info). Importing vLLM maps libcuda (its compiled ops link it); only a cuInit makes the spare keep its devices.
  A spare whose driver is not initialised takes a model for any device set, a tensor-parallel one too (its
  workers are forked or spawned after the hand-off, with the model's CUDA_VISIBLE_DEVICES);
- the spare died, or did not take the model within `HANDOFF_TIMEOUT` (it is killed).

Fork (`VLLAMA_POOL_FORK`, default on): a pooled start also sets VLLM_WORKER_MULTIPROC_METHOD=fork (unless the
model sets it), so vLLM's EngineCore (and, on the CPU build, its worker) are forked from the pre-imported server
instead of importing everything again in a spawned interpreter (without fork a pooled start on 2 CPU cores took
19.9 s instead of 4.5 s; bare vLLM 28.7 s). What fork changes:
- GPU: fork is vLLM's own default outside its CLI, and vLLM switches to spawn by itself when CUDA is already
  initialised in the parent (the API server does not initialise it). Checked on the H100 with vLLM 0.26: the
  EngineCore forks within 2 s of the hand-off; sleep level 2 and the wake with reload work.
- CPU build: vLLM's CPU platform forces spawn unconditionally; the spare keeps fork (it wraps the platform's
  config check). vLLM binds a spawned worker's OpenMP threads through the environment (OMP_NUM_THREADS,
  GOMP_CPU_AFFINITY / OMP_PLACES / KMP_AFFINITY, set just before the worker starts), which the OpenMP runtime
  reads only when torch loads it: a forked worker inherits a runtime initialised in the spare and ran unpinned
  on every core (affinity [0, 1] instead of vLLM's [0], the other core reserved for the EngineCore). The spare
  re-applies the binding in the forked worker (sched_setaffinity + torch.set_num_threads, from an at-fork hook);
  with it the worker runs on the cores vLLM chose and answers like a spawned one (same greedy output; decode
  212–349 tok/s pooled against 165–311 bare in one run on 2 shared cores). The one hazard left: GNU OpenMP
  deadlocks in a forked child whose parent already ran a parallel region; no process of vLLM 0.32's start path
  does before forking the worker, but a later vLLM might: set VLLAMA_POOL_FORK=0 then (pooled starts still skip
  the API server's imports).
- Every forked process inherits the API server's open files (its listening socket, the log); harmless, as the
  whole process group is stopped together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllama import engine as eng
from vllama.config import ModelConfig, Settings

log = logging.getLogger("vllama")

SPARE_SCRIPT = Path(__file__).with_name("spare.py")
DEFAULT_MODULES = ("vllm.entrypoints.openai.api_server",)
# what a spare may be given only at hand-off: nothing reads these while vLLM's server module is imported
LATE_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",  # read by the CUDA driver at cuInit (see CUDA_INIT_ENV)
        "CUDA_DEVICE_ORDER",
        "NCCL_NVLS_ENABLE",  # read by NCCL when a communicator is made
        "VLLM_CPU_KVCACHE_SPACE",  # read by vLLM's CPU platform when it checks the config
        "VLLM_WORKER_MULTIPROC_METHOD",  # read when the EngineCore/workers are started
        "PYTHONUNBUFFERED",  # the spare re-applies it to its streams
    }
)
# ... of which these count only until the CUDA driver is loaded
CUDA_INIT_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})
HANDOFF_TIMEOUT = 10.0  # a ready spare takes a model in milliseconds
SPARE_NICE = 10  # spares import at low priority (only where the priority can be raised again at hand-off)
MAX_FAILURES = 3  # spares of one engine environment that failed in a row before the pool gives up on it


# spares per engine environment when VLLAMA_POOL_SIZE is unset: two, so that a second cold start right after
# another is pooled too, on a host with room for them (a spare holds ~0.7 GB: vLLM 0.32's CPU build measured
# 0.66 GB of RSS after its imports); one on a smaller host
POOL_SIZE_ON_LARGE_HOST = 2
LARGE_HOST_AVAILABLE_BYTES = 16 << 30


def default_pool_size() -> int:
    import psutil

    return POOL_SIZE_ON_LARGE_HOST if psutil.virtual_memory().available >= LARGE_HOST_AVAILABLE_BYTES else 1


class SpareFailed(Exception):
    pass


@dataclass(frozen=True)
class PoolKey:
    """An engine environment: spares with equal keys are interchangeable."""

    interpreter: tuple[str, ...]  # the Python and its flags
    module: str
    env: tuple[tuple[str, str], ...]  # the environment read while importing (all but LATE_ENV), sorted

    def describe(self) -> str:
        return f"{' '.join(self.interpreter)} -m {self.module}"


def split_command(
    prefix: Iterable[str], modules: Iterable[str] = DEFAULT_MODULES
) -> tuple[tuple[str, ...], str] | None:
    """(interpreter with its flags, module) of a `PYTHON [FLAGS] -m MODULE` command a spare can pre-import;
    None for anything else."""
    parts = list(prefix)
    if len(parts) < 3 or parts[-2] != "-m" or parts[-1] not in set(modules):
        return None
    interpreter = parts[:-2]
    i = 1
    while i < len(interpreter):
        flag = interpreter[i]
        if flag in ("-W", "-X") and i + 1 < len(interpreter):
            i += 2
            continue
        if not flag.startswith("-") or flag in ("-", "-c", "-m") or flag.startswith(("-c", "-m")):
            return None  # a script or a command: not an interpreter flag
        i += 1
    return tuple(interpreter), parts[-1]


def import_env(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k not in LATE_ENV))


def pool_key(prefix: Iterable[str], env: dict[str, str], modules: Iterable[str] = DEFAULT_MODULES) -> PoolKey | None:
    split = split_command(prefix, modules)
    if split is None:
        return None
    return PoolKey(interpreter=split[0], module=split[1], env=import_env(env))


def handoff_blockers(spare_env: dict[str, str], model_env: dict[str, str], *, cuda_initialized: bool) -> list[str]:
    """Variables that differ between a spare's environment and a model's and cannot change after the spare's
    imports: if any, the spare cannot take the model."""
    late = LATE_ENV - CUDA_INIT_ENV if cuda_initialized else LATE_ENV
    names = set(spare_env) | set(model_env)
    return sorted(n for n in names if n not in late and spare_env.get(n) != model_env.get(n))


def can_restore_priority() -> bool:
    """Whether a process that lowered its priority may raise it back (root, or RLIMIT_NICE allows it)."""
    if os.geteuid() == 0:
        return True
    with contextlib.suppress(OSError, ValueError):
        soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
        current = os.getpriority(os.PRIO_PROCESS, 0)
        return soft == resource.RLIM_INFINITY or 20 - soft <= current
    return False


def set_priority(pid: int, nice: int) -> None:
    """Give every thread of process `pid` niceness `nice`."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def launch_template(
    name: str,
    cfg: ModelConfig,
    settings: Settings,
    device_kind: str,
    sleep_mode: bool,
    cuda_ids: Callable[[Sequence[int]], list[str]] | None = None,
) -> eng.LaunchSpec:
    """The launch a model would get (on port 0, the first devices): where its engine environment comes from
    (the address changes only the command line).
    `cuda_ids` (the probe's) maps vllama's devices to the GPUs a child names: a spare never sees a GPU outside
    vllama's selection."""
    devices = tuple(range(cfg.device_count))
    return eng.build_launch(
        name=name,
        cfg=cfg,
        vllm_command=settings.vllm_command,
        port=0,
        devices=devices,
        device_kind=device_kind,
        gpu_memory_utilization=None,
        logs_dir=settings.logs_dir,
        sleep_mode=sleep_mode,
        cuda_ids=cuda_ids(devices) if cuda_ids is not None else None,
    )


@dataclass(eq=False)
class Spare:
    key: PoolKey
    env: dict[str, str]
    process: asyncio.subprocess.Process  # its guard (the leader of its process group)
    commands: int  # write end of the pipe to its stdin
    created: float
    ready: asyncio.Future[dict[str, Any]]
    started: asyncio.Future[None]
    taken: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def is_ready(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def server_pid(self) -> int | None:
        pid = self.info.get("pid")
        return int(pid) if pid else None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _quiet(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (nobody may wait on it)."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


class WarmPool:
    def __init__(
        self,
        *,
        size: int,
        logs_dir: Path,
        stop_grace: float,
        device_kind: str,
        fork: bool = True,
        modules: Iterable[str] = DEFAULT_MODULES,
        nice: int | None = None,
        clock: Any = time.monotonic,
        cuda_ids: Callable[[Sequence[int]], list[str]] | None = None,
    ) -> None:
        self.size = max(0, size)
        self.cuda_ids = cuda_ids
        self.logs_dir = logs_dir
        self.stop_grace = stop_grace
        self.device_kind = device_kind
        self.fork = fork
        self.modules = tuple(modules)
        self.nice = (SPARE_NICE if can_restore_priority() else 0) if nice is None else nice
        self.clock = clock
        self.closed = False
        self._spares: dict[PoolKey, list[Spare]] = {}
        self._wanted: dict[PoolKey, dict[str, str]] = {}  # engine environments to keep spares for → their env
        self._failures: dict[PoolKey, int] = {}
        self._fill_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_import_seconds: float | None = None
        self.pooled_starts = 0
        self.plain_starts = 0
        self.last_fallback: str | None = None
        self.started_by: dict[int, str] = {}  # guard pid → "pool" or the reason it was a plain spawn

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "warm-pool.log"

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- keeping spares ------------------------------------------------------------------------------------

    def want(self, prefix: Iterable[str], env: dict[str, str]) -> PoolKey | None:
        """Keep spares for this command's engine environment from now on; its key (None: not poolable)."""
        key = pool_key(prefix, env, self.modules)
        if key is not None and self.enabled and key not in self._wanted:
            self._wanted[key] = dict(env)
        return key

    def want_models(self, models: dict[str, ModelConfig], settings: Settings, sleep_mode: bool) -> None:
        """Keep spares for the engine environments of these configured models (the default one if none)."""
        entries = [(n, c) for n, c in models.items() if c.prewarm] if models else [("default", ModelConfig())]
        for name, cfg in entries:
            spec = launch_template(name, cfg, settings, self.device_kind, sleep_mode, self.cuda_ids)
            self.want(cfg.vllm_command or settings.vllm_command, spec.env)

    def live(self, key: PoolKey) -> list[Spare]:
        spares = [s for s in self._spares.get(key, []) if s.alive and not s.taken]
        self._spares[key] = spares
        return spares

    async def fill(self) -> None:
        """Start spares until every wanted engine environment has `size` (ready or importing)."""
        if self.closed or not self.enabled:
            return
        async with self._fill_lock:
            for key, env in list(self._wanted.items()):
                missing = self.size - len(self.live(key))
                for _ in range(missing):
                    if self.closed or self._failures.get(key, 0) >= MAX_FAILURES:
                        break
                    try:
                        await self._start_spare(key, env)
                    except OSError as exc:
                        self._failures[key] = self._failures.get(key, 0) + 1
                        log.warning("warm pool: could not start a spare for %s: %s", key.describe(), exc)

    async def _start_spare(self, key: PoolKey, env: dict[str, str]) -> Spare:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        cmd_read, cmd_write = os.pipe()
        ev_read, ev_write = os.pipe()
        try:
            with self.log_path.open("ab") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "vllama.guard", "--parent", str(os.getpid()), "--grace", str(self.stop_grace),
                    "--", *key.interpreter, str(SPARE_SCRIPT), "--module", key.module, "--nice", str(self.nice),
                    stdin=cmd_read,
                    stdout=ev_write,
                    stderr=out,
                    env=env,
                    start_new_session=True,  # its own process group, like every vLLM child
                )  # fmt: skip
        except BaseException:
            os.close(cmd_write)
            os.close(ev_read)
            raise
        finally:
            os.close(cmd_read)
            os.close(ev_write)
        loop = asyncio.get_running_loop()
        spare = Spare(
            key=key,
            env=dict(env),
            process=process,
            commands=cmd_write,
            created=self.clock(),
            ready=loop.create_future(),
            started=loop.create_future(),
        )
        _quiet(spare.ready)
        _quiet(spare.started)
        self._spares.setdefault(key, []).append(spare)
        self._background(self._read_events(spare, ev_read))
        log.info("warm pool: importing a spare for %s (guard pid %d)", key.describe(), process.pid)
        return spare

    async def _read_events(self, spare: Spare, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        failure = "it exited"
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready" and not spare.ready.done():
                    spare.info = event
                    self.last_import_seconds = float(event.get("import_seconds") or 0) or None
                    self._failures[spare.key] = 0
                    spare.ready.set_result(event)
                    log.info(
                        "warm pool: spare pid %s ready (imports took %.1f s)", event.get("pid"), event["import_seconds"]
                    )
                elif event.get("event") == "failed":
                    failure = f"its imports failed: {event.get('error')}"
                elif event.get("event") == "started" and not spare.started.done():
                    spare.started.set_result(None)
                    return  # it is a server now: its output goes to the model's log
        finally:
            transport.close()
            for future in (spare.ready, spare.started):
                if not future.done():
                    future.set_exception(SpareFailed(failure))
        # the spare ended before it took a model
        if not spare.taken:
            self._forget(spare)
            if not self.closed:
                self._failures[spare.key] = self._failures.get(spare.key, 0) + 1
                log.warning("warm pool: spare for %s ended: %s", spare.key.describe(), failure)
                if self._failures[spare.key] >= MAX_FAILURES:
                    log.warning("warm pool: giving up on %s after %d failures", spare.key.describe(), MAX_FAILURES)
                await self.fill()

    def _forget(self, spare: Spare) -> None:
        with contextlib.suppress(ValueError):
            self._spares.get(spare.key, []).remove(spare)
        if spare.commands >= 0:  # closing it tells a waiting spare to exit
            with contextlib.suppress(OSError):
                os.close(spare.commands)
            spare.commands = -1

    async def _kill(self, spare: Spare) -> None:
        self._forget(spare)
        if spare.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.process.pid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(spare.process.wait(), self.stop_grace + 2.0)
        eng.kill_group(spare.process.pid)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(spare.process.wait(), 5.0)

    # --- starting a model ----------------------------------------------------------------------------------

    async def _take(self, key: PoolKey, env: dict[str, str]) -> tuple[Spare | None, str]:
        """A spare that can take a model with this environment (marked taken), or None and why not."""
        spares = self.live(key)
        if not spares:
            return None, "no spare (all taken by other starts; the pool is being refilled)"
        reason = "no compatible spare"
        for spare in sorted(spares, key=lambda s: not s.is_ready):
            if not spare.is_ready:
                # still importing: it is ahead of a fresh interpreter; raise its priority and wait for it
                if handoff_blockers(spare.env, env, cuda_initialized=False):
                    continue
                spare.taken = True
                if self.nice:
                    for pid in self._spare_pids(spare):
                        set_priority(pid, os.getpriority(os.PRIO_PROCESS, 0))
                expected = self.last_import_seconds
                timeout = max(30.0, 2 * expected) if expected else 600.0
                try:
                    await asyncio.wait_for(asyncio.shield(spare.ready), timeout)
                except (asyncio.TimeoutError, SpareFailed) as exc:
                    await self._kill(spare)
                    return None, f"the importing spare did not become ready ({exc or 'timeout'})"
                except BaseException:
                    spare.taken = False  # the start was cancelled: the spare stays in the pool
                    if spare not in self._spares.setdefault(spare.key, []):
                        self._spares[spare.key].append(spare)
                    raise
            initialized = bool(spare.info.get("cuda_initialized", True))
            blockers = handoff_blockers(spare.env, env, cuda_initialized=initialized)
            if blockers:
                spare.taken = False
                reason = f"the spare's environment differs in {', '.join(blockers)} (read before the hand-off)"
                continue
            spare.taken = True
            return spare, ""
        return None, reason

    def _spare_pids(self, spare: Spare) -> list[int]:
        pid = spare.server_pid()
        if pid:
            return [pid]
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{spare.process.pid}/task/{spare.process.pid}/children") as f,
        ):
            return [int(p) for p in f.read().split()]
        return []

    async def _hand_off(self, spare: Spare, spec: eng.LaunchSpec, prefix: list[str]) -> eng.EngineProcess:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        waited = self.clock() - spare.created
        with spec.log_path.open("ab") as out:
            out.write(f"# vllama: {' '.join(spec.argv)}\n".encode())
            out.write(
                f"# vllama: warm pool: taken by pre-imported interpreter pid {spare.info.get('pid')} "
                f"(its imports took {spare.info.get('import_seconds')} s; it was started {waited:.0f} s ago)\n".encode()
            )
            offset = out.tell()
        request = {
            "argv": spec.argv[len(prefix) :],
            "env": spec.env,
            "log": str(spec.log_path),
            "fork": self.fork,
            "cpu_fork": self.fork and self.device_kind == "cpu",
        }
        try:
            await asyncio.to_thread(_write_all, spare.commands, (json.dumps(request) + "\n").encode())
            await asyncio.wait_for(asyncio.shield(spare.started), HANDOFF_TIMEOUT)
        except (OSError, asyncio.TimeoutError, SpareFailed) as exc:
            await self._kill(spare)
            raise SpareFailed(f"the spare did not take the model: {exc or 'timeout'}") from None
        except BaseException:
            self._background(self._kill(spare))  # cancelled mid hand-off: it may be a server nobody owns
            raise
        self._forget(spare)  # closes our end of its stdin
        return eng.EngineProcess(spec=spec, process=spare.process, log_offset=offset)

    async def spawn(
        self, spec: eng.LaunchSpec, *, prefix: list[str], stop_grace: float, prewarm: bool = True
    ) -> eng.EngineProcess:
        """Start vLLM for `spec` in a spare if one can take it, else as a plain child (`engine.spawn`)."""
        key: PoolKey | None = None
        if not self.enabled:
            reason = "the warm pool is off (VLLAMA_POOL_SIZE=0)"
        elif self.closed:
            reason = "the warm pool is closed (vllama is stopping)"
        elif not prewarm:
            reason = "the model sets prewarm: false"
        elif spec.argv[: len(prefix)] != list(prefix):
            reason = "the command line does not start with the vLLM command"
        else:
            key = self.want(prefix, spec.env)
            if key is None:
                reason = f"{' '.join(prefix)} is not `PYTHON -m {' | '.join(self.modules)}`"
            else:
                spare, reason = await self._take(key, spec.env)
                if spare is not None:
                    try:
                        engine = await self._hand_off(spare, spec, prefix)
                    except SpareFailed as exc:
                        reason = str(exc)
                    else:
                        self.pooled_starts += 1
                        self._started(engine, "warm pool")
                        log.info("warm pool: %s taken by spare pid %s", spec.log_path.name, spare.info.get("pid"))
                        self._refill(engine)
                        return engine
        engine = await eng.spawn(spec, stop_grace=stop_grace)
        self.plain_starts += 1
        self.last_fallback = reason
        self._started(engine, f"plain spawn: {reason}")
        if key is not None:
            log.info("warm pool: plain start for %s: %s", spec.log_path.name, reason)
            self._refill(engine)
        return engine

    def _refill(self, engine: eng.EngineProcess) -> None:
        """Replace the spare a start took (or lacked). At once when spares import at a lower priority than starts
        run: they take only the CPU a start leaves idle, and a start right after this one finds a spare importing
        (it raises that spare's priority and waits for less than a fresh interpreter takes) or ready. Otherwise
        once this start is over: imports at the same priority would slow it down."""
        if self.nice > 0:
            self._background(self.fill())
        else:
            self._background(self._refill_after(engine))

    async def _refill_after(self, engine: eng.EngineProcess, poll: float = 0.5, limit: float = 3600.0) -> None:
        """Refill once this start is over (its port or socket answers, or it exited): spares importing next to a
        start would slow it down."""
        deadline = self.clock() + limit
        while not engine.exited and self.clock() < deadline and not self.closed:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.wait_for(eng.open_connection(engine.address), 2.0)
                writer.close()
                await asyncio.sleep(2.0)  # vllama's warm-up request
                break
            await asyncio.sleep(poll)
        await self.fill()

    def _started(self, engine: eng.EngineProcess, how: str) -> None:
        self.started_by[engine.pid] = how
        while len(self.started_by) > 256:
            self.started_by.pop(next(iter(self.started_by)))

    def how_started(self, engine: eng.EngineProcess | None) -> str | None:
        return self.started_by.get(engine.pid) if engine is not None else None

    # --- shutdown and views --------------------------------------------------------------------------------

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        spares = [s for spares in self._spares.values() for s in spares if not s.taken]
        await asyncio.gather(*(self._kill(s) for s in spares), return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        spares = []
        for key, items in self._spares.items():
            for s in items:
                if not s.alive or s.taken:
                    continue
                spares.append(
                    {
                        "pid": s.server_pid(),
                        "guard_pid": s.process.pid,
                        "state": "ready" if s.is_ready else "importing",
                        "command": key.describe(),
                        "age_seconds": round(now - s.created, 1),
                        "import_seconds": s.info.get("import_seconds"),
                        "cuda_initialized": s.info.get("cuda_initialized"),
                    }
                )
        return {
            "size": self.size,
            "fork": self.fork,
            "nice": self.nice,
            "spares": spares,
            "engine_environments": len(self._wanted),
            "pooled_starts": self.pooled_starts,
            "plain_starts": self.plain_starts,
            "last_fallback": self.last_fallback,
            "gave_up": [k.describe() for k, n in self._failures.items() if n >= MAX_FAILURES],
            "log": str(self.log_path),
        }
