"""A spare vLLM interpreter of vllama's warm pool: it imports vLLM's server module ahead of time, then waits for
a model and becomes that model's server, as `python -m MODULE ARGV...` would have been (see `vllama/pool.py`).

It runs in the vLLM environment's own Python (which may be another virtualenv than vllama's), by path:

    PYTHON [FLAGS] /path/to/vllama/spare.py --module vllm.entrypoints.openai.api_server [--nice N]

so it imports nothing of vllama and sticks to the standard library. It is started under `vllama.guard`, in its
own process group, like any vLLM child. Protocol, one JSON object per line:

  fd 0, vllama → spare:  {"argv": [...], "env": {...}, "log": PATH, "fork": bool, "cpu_fork": bool}
  fd 1, spare → vllama:  {"event": "ready", "pid", "import_seconds", "cuda_initialized", "modules"} when the
                         imports are done; {"event": "failed", "error"} if they failed (then it exits 1);
                         {"event": "started"} once it has taken the model: it then closes both pipes, sends its
                         output to the model's log and runs the server in this very process.
  EOF on fd 0 while waiting: exit 0.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import warnings

# modules a server start imports later on, imported here too where they exist (best effort: names differ
# between vLLM versions); in a forked EngineCore/worker they are then already there
PRELOAD = (
    "vllm.entrypoints.launchers.api_server.entry",  # where `__main__` of the api_server module goes (vLLM 0.3x)
    "vllm.entrypoints.openai.cli_args",
    "vllm.engine.arg_utils",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.executor.uniproc_executor",
)


def _send(fd: int, event: dict[str, object]) -> None:
    data = (json.dumps(event) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _set_priority(nice: int, *, pid: str = "self") -> None:
    """Give every thread of this process niceness `nice` (Linux keeps one per thread)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


CUDA_ERROR_NOT_INITIALIZED = 3  # what a CUDA driver call answers before cuInit


def _cuda_initialized() -> bool:
    """Whether the CUDA driver has been initialised in this process (cuInit ran): it has then read
    CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, and setting them at hand-off would change nothing. The driver
    being loaded is not enough: vLLM's compiled ops link it (vLLM 0.26's `_C_stable_libtorch.abi3.so` and
    `cumem_allocator.abi3.so` list libcuda.so.1 as NEEDED), so importing vLLM maps libcuda without initialising
    it; what tells is whether a driver call still answers CUDA_ERROR_NOT_INITIALIZED."""
    try:
        with open("/proc/self/maps") as maps:
            if not any("libcuda.so" in line for line in maps):
                return False
    except OSError:
        return True  # cannot tell: assume the worst
    try:
        import ctypes

        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy already mapped
    except OSError:
        return True
    return not driver_uninitialised(driver)


def driver_uninitialised(driver: object) -> bool:
    """Whether the CUDA driver `driver` (a ctypes library) still answers CUDA_ERROR_NOT_INITIALIZED: a call that
    needs no context, which neither initialises the driver nor touches a GPU."""
    import ctypes

    count = ctypes.c_int(0)
    try:
        result = driver.cuDeviceGetCount(ctypes.byref(count))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False
    return int(result) == CUDA_ERROR_NOT_INITIALIZED


def _keep_fork_on_cpu() -> None:
    """vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn unconditionally when it checks the config:
    keep the fork asked for. Spawned EngineCore and worker processes would import torch and vLLM again (~10 s
    each on 2 cores); forked ones start from this interpreter, which has them."""
    try:
        from vllm.platforms import cpu
    except Exception:
        return
    platform = getattr(cpu, "CpuPlatform", None)
    original = getattr(getattr(platform, "check_and_update_config", None), "__func__", None)
    if platform is None or original is None:
        return

    def check_and_update_config(cls: type, vllm_config: object) -> None:
        original(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    platform.check_and_update_config = classmethod(check_and_update_config)
    os.register_at_fork(after_in_child=_bind_forked_cpu_worker)


def _cpu_list(env: dict[str, str]) -> list[int]:
    """The CPUs vLLM meant a worker to run on, from the OpenMP variables it sets around the worker's start."""
    raw = env.get("GOMP_CPU_AFFINITY") or env.get("OMP_PLACES", "").strip("{}")
    if not raw and "proclist=[" in env.get("KMP_AFFINITY", ""):
        raw = env["KMP_AFFINITY"].split("proclist=[", 1)[1].split("]", 1)[0]
    cpus: list[int] = []
    for part in raw.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _bind_forked_cpu_worker() -> None:
    """In a forked CPU worker: apply the thread binding vLLM put in the environment for a spawned one. A spawned
    worker's OpenMP runtime reads OMP_NUM_THREADS/GOMP_CPU_AFFINITY when torch loads; a forked one inherited a
    runtime initialised long before, so set the affinity and the thread count by hand."""
    cpus = _cpu_list(dict(os.environ))
    if not cpus:
        return
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, cpus)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch = sys.modules.get("torch")
    if torch is not None and threads.isdigit():
        with contextlib.suppress(Exception):
            torch.set_num_threads(int(threads))


def _set_title(argv: list[str]) -> None:
    """Make `ps` show the server's command line, not this script's (with setproctitle, which vLLM depends on:
    imported before the environment changes, or it cannot find the memory it rewrites)."""
    setproctitle = sys.modules.get("setproctitle")
    if setproctitle is not None:
        with contextlib.suppress(Exception):
            setproctitle.setproctitle(" ".join(argv))


def main() -> int:
    args = sys.argv[1:]
    module = args[args.index("--module") + 1] if "--module" in args else "vllm.entrypoints.openai.api_server"
    nice = int(args[args.index("--nice") + 1]) if "--nice" in args else 0
    # run as a file, sys.path[0] is vllama's package folder; `python -m` would have the working directory there
    if sys.path and os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0] or "."):
        sys.path[0] = os.getcwd()
    # the pipes to vllama move off fds 0/1: the server's stdin is /dev/null and nothing printed while importing
    # may end up in the protocol
    commands = os.fdopen(os.dup(0), "rb")
    events = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice:
        _set_priority(base_nice + nice)

    t0 = time.monotonic()
    try:
        importlib.import_module(module)
    except BaseException as exc:  # reported to vllama, which falls back to a plain start
        import traceback

        traceback.print_exc()  # into the pool's log
        _send(events, {"event": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    for name in PRELOAD if module.startswith("vllm.") else ():
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # set up now: it finds the memory it rewrites from the environment
        import setproctitle

        setproctitle.setproctitle(setproctitle.getproctitle())
    import_seconds = time.monotonic() - t0
    _send(
        events,
        {
            "event": "ready",
            "pid": os.getpid(),
            "import_seconds": round(import_seconds, 3),
            "cuda_initialized": _cuda_initialized(),
            "modules": len(sys.modules),
        },
    )

    line = commands.readline()
    if not line.strip():
        return 0  # vllama closed the pipe: no model for this spare
    request = json.loads(line)
    if nice:
        _set_priority(base_nice)  # threads made while importing (OpenMP, tokenizers) were niced too
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("fork") and "VLLM_WORKER_MULTIPROC_METHOD" not in request["env"]:
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
        if request.get("cpu_fork"):
            _keep_fork_on_cpu()
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _send(events, {"event": "started"})
    os.close(events)
    commands.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    if os.environ.get("PYTHONUNBUFFERED"):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]

    argv = list(request["argv"])
    _set_title([sys.executable, "-m", module, *argv])
    # runpy warns that the module is already imported: that is the point of this process
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    import runpy

    sys.argv = [module, *argv]  # run_module puts the module's file first, as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
