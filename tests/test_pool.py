"""The warm interpreter pool (vllama/pool.py, vllama/spare.py): the pure rules (which commands can be pooled,
which environments are interchangeable), the spare protocol end to end with the fake engine as the "server
module" (imports, hand-off, log redirection, guard, stop, refill), the fallbacks, and the daemon using it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import Daemon, processes_in_groups, wait_until_gone
from vllama import engine as eng
from vllama import spare
from vllama.config import ModelConfig
from vllama.pool import (
    LATE_ENV,
    MAX_FAILURES,
    WarmPool,
    default_pool_size,
    handoff_blockers,
    import_env,
    pool_key,
    split_command,
)

PY = sys.executable
FAKE = "vllama.testing.fake_engine"
FAKE_CMD = [PY, "-m", FAKE]

# --- pure rules ------------------------------------------------------------------------------------------------


SERVER = "vllm.entrypoints.openai.api_server"


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ([PY, "-m", SERVER], ((PY,), SERVER)),
        ([PY, "-X", "faulthandler", "-u", "-m", SERVER], ((PY, "-X", "faulthandler", "-u"), SERVER)),
        (["/opt/vllm/bin/vllm", "serve"], None),  # a console script
        ([PY, "wrapper.py", "-m", SERVER], None),  # a script, not an interpreter flag
        ([PY, "-c", "pass", "-m", SERVER], None),
        ([PY, "-m", "vllm.entrypoints.cli.main"], None),  # not a pre-importable server module
    ],
)
def test_split_command(prefix: list[str], expected: object) -> None:
    assert split_command(prefix) == expected


def test_pool_key_ignores_late_variables_only() -> None:
    base = {"PATH": "/bin", "HF_HOME": "/hf", "CUDA_VISIBLE_DEVICES": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [PY, "-m", "vllm.entrypoints.openai.api_server"]
    key = pool_key(cmd, base)
    assert key is not None and key.module == "vllm.entrypoints.openai.api_server"
    assert pool_key(cmd, {**base, "CUDA_VISIBLE_DEVICES": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}) == key
    assert pool_key(cmd, {**base, "HF_HOME": "/elsewhere"}) != key  # read into constants at import
    assert pool_key(cmd, {**base, "OMP_NUM_THREADS": "4"}) != key  # read when torch loads OpenMP
    assert pool_key([PY, "-m", "other"], base) is None
    assert dict(import_env(base)) == {"PATH": "/bin", "HF_HOME": "/hf"}
    assert "CUDA_VISIBLE_DEVICES" in LATE_ENV and "PYTHONPATH" not in LATE_ENV


def test_handoff_blockers() -> None:
    spare_env = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert handoff_blockers(spare_env, {**spare_env, "CUDA_VISIBLE_DEVICES": "1"}, cuda_initialized=False) == []
    # once the spare loaded the CUDA driver, the device list it saw at cuInit is final
    assert handoff_blockers(spare_env, {**spare_env, "CUDA_VISIBLE_DEVICES": "1"}, cuda_initialized=True) == [
        "CUDA_VISIBLE_DEVICES"
    ]
    assert handoff_blockers(spare_env, {**spare_env, "LD_PRELOAD": "x.so"}, cuda_initialized=False) == ["LD_PRELOAD"]
    assert handoff_blockers(spare_env, {"PATH": "/bin"}, cuda_initialized=False) == []


class FakeDriver:
    """libcuda's cuDeviceGetCount as a ctypes library offers it: an int result code, the count through a pointer."""

    def __init__(self, result: int) -> None:
        self.result = result

    def cuDeviceGetCount(self, _count: object) -> int:
        return self.result


def test_spare_tells_an_initialised_cuda_driver_from_a_loaded_one() -> None:
    # CUDA_ERROR_NOT_INITIALIZED: loaded (vLLM's ops link libcuda) but cuInit never ran: the devices can change
    assert spare.driver_uninitialised(FakeDriver(spare.CUDA_ERROR_NOT_INITIALIZED))
    assert not spare.driver_uninitialised(FakeDriver(0))  # CUDA_SUCCESS: cuInit ran
    assert not spare.driver_uninitialised(FakeDriver(100))  # any other answer: assume the worst
    assert not spare.driver_uninitialised(object())  # not a driver at all
    assert spare._cuda_initialized() is False  # this machine: no libcuda mapped


def test_cpu_list_from_vllms_openmp_variables() -> None:
    assert spare._cpu_list({"GOMP_CPU_AFFINITY": "0 1 2"}) == [0, 1, 2]
    assert spare._cpu_list({"OMP_PLACES": "{4,5,6}"}) == [4, 5, 6]
    assert spare._cpu_list({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[2,3]"}) == [2, 3]
    assert spare._cpu_list({"GOMP_CPU_AFFINITY": "0-3"}) == [0, 1, 2, 3]
    assert spare._cpu_list({}) == []


# --- the protocol, with the fake engine as the server module -----------------------------------------------------


def launch(tmp: Path, *, env: dict[str, str] | None = None, name: str = "m") -> eng.LaunchSpec:
    cfg = ModelConfig(env=env or {})
    return eng.build_launch(
        name=name,
        cfg=cfg,
        vllm_command=FAKE_CMD,
        uds=eng.pick_socket(tmp, name, []),  # the hand-off works as any child: on a Unix socket
        devices=(0,),
        device_kind="cuda",
        gpu_memory_utilization=0.5,
        logs_dir=tmp / "logs",
        sleep_mode=True,
    )


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[WarmPool]:
    p = WarmPool(size=1, logs_dir=tmp_path / "logs", stop_grace=3, device_kind="cuda", modules=[FAKE, "slowmod"])
    yield p
    await p.close()


async def until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_ready_spare(pool: WarmPool, timeout: float = 30.0) -> dict[str, object]:
    ready = await until(
        lambda: [s for s in pool.snapshot()["spares"] if s["state"] == "ready"], timeout, f"a spare: {pool.snapshot()}"
    )
    return dict(ready[0])


def group_alive(pgid: int) -> list[int]:
    return processes_in_groups({pgid})


async def test_spare_takes_a_model_and_stops_cleanly(pool: WarmPool, tmp_path: Path) -> None:
    spec = launch(tmp_path)
    assert pool.want(FAKE_CMD, spec.env) is not None
    await pool.fill()
    spare_info = await wait_ready_spare(pool)
    engine = await pool.spawn(spec, prefix=FAKE_CMD, stop_grace=3)
    assert pool.how_started(engine) == "warm pool" and pool.pooled_starts == 1
    async with eng.child_session() as http:
        await eng.wait_ready(engine, http, 30)
        body = {"model": "m", "prompt": "hello pool", "max_tokens": 3}
        async with http.post(f"{engine.base_url}/v1/completions", json=body) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["text"] == "echo: hello pool"
    # the spare itself became the server: same process, in the guard's group, with the server's command line
    assert engine.server_pid() == spare_info["pid"]
    assert os.getpgid(int(spare_info["pid"])) == engine.pid
    title = " ".join(psutil.Process(int(spare_info["pid"])).cmdline())
    assert FAKE in title and f"--uds {spec.uds}" in title
    log = spec.log_path.read_text()
    assert log.startswith("# vllama: ") and "warm pool: taken by pre-imported interpreter" in log
    assert "Starting vLLM API server" in eng.output_since_start(engine)  # its output went to the model's log
    assert await eng.terminate(engine, 3) == 0
    assert not wait_until_gone({engine.pid}, 10)
    await wait_ready_spare(pool)  # and a new spare was made


async def test_close_stops_waiting_spares(pool: WarmPool, tmp_path: Path) -> None:
    pool.want(FAKE_CMD, launch(tmp_path).env)
    await pool.fill()
    info = await wait_ready_spare(pool)
    await pool.close()
    assert not wait_until_gone({int(info["guard_pid"])}, 10)
    assert pool.snapshot()["spares"] == []


async def test_fallbacks_are_plain_spawns(pool: WarmPool, tmp_path: Path) -> None:
    spec = launch(tmp_path)
    pool.want(FAKE_CMD, spec.env)
    await pool.fill()
    await wait_ready_spare(pool)
    engines = []
    # a model that opts out
    engines.append(await pool.spawn(spec, prefix=FAKE_CMD, stop_grace=3, prewarm=False))
    assert pool.how_started(engines[-1]) == "plain spawn: the model sets prewarm: false"
    # a model whose environment differs in a variable read at import: another engine environment
    other = launch(tmp_path, env={"SOME_IMPORT_TIME_SETTING": "1"}, name="other")
    engines.append(await pool.spawn(other, prefix=FAKE_CMD, stop_grace=3))
    assert "no spare" in str(pool.how_started(engines[-1]))
    assert pool.snapshot()["engine_environments"] == 2  # spares are kept for it from now on
    # a command that cannot be pooled
    engines.append(await pool.spawn(spec, prefix=[PY, "-m", "vllama.testing.other"], stop_grace=3))
    assert "command line does not start" in str(pool.how_started(engines[-1]))
    assert pool.pooled_starts == 0 and pool.plain_starts == 3
    for engine in engines:
        await eng.terminate(engine, 3)


async def test_a_dead_spare_is_replaced_and_the_start_falls_back(pool: WarmPool, tmp_path: Path) -> None:
    spec = launch(tmp_path)
    pool.want(FAKE_CMD, spec.env)
    await pool.fill()
    info = await wait_ready_spare(pool)
    os.kill(int(info["pid"]), signal.SIGKILL)  # the spare dies while waiting
    await until(lambda: all(s["pid"] != info["pid"] for s in pool.snapshot()["spares"]), 10, "the dead spare gone")
    new = await wait_ready_spare(pool)  # refilled
    assert new["pid"] != info["pid"]
    engine = await pool.spawn(spec, prefix=FAKE_CMD, stop_grace=3)
    assert pool.how_started(engine) == "warm pool"
    await eng.terminate(engine, 3)


async def test_failing_imports_give_up_and_fall_back(tmp_path: Path) -> None:
    pool = WarmPool(size=1, logs_dir=tmp_path / "logs", stop_grace=3, device_kind="cuda", modules=["no_such_mod"])
    try:
        cmd = [PY, "-m", "no_such_mod"]
        spec = launch(tmp_path)
        spec = eng.LaunchSpec(
            argv=[*cmd, *spec.argv[3:]], env=spec.env, port=spec.port, log_path=spec.log_path, uds=spec.uds
        )
        pool.want(cmd, spec.env)
        await pool.fill()
        await until(lambda: pool.snapshot()["gave_up"], 60, "the pool to give up")
        assert pool.snapshot()["gave_up"] == [f"{PY} -m no_such_mod"], pool.snapshot()
        assert pool._failures[next(iter(pool._wanted))] == MAX_FAILURES
        engine = await pool.spawn(spec, prefix=cmd, stop_grace=3)  # a plain spawn, which fails like bare would
        assert "no spare" in str(pool.how_started(engine))
        assert await engine.process.wait() != 0
        assert "ModuleNotFoundError" in (tmp_path / "logs" / "warm-pool.log").read_text()
    finally:
        await pool.close()


@pytest.mark.parametrize("cuda_initialized", [False, True])
async def test_a_spare_takes_a_model_on_other_devices_unless_cuda_is_initialised(
    tmp_path: Path, cuda_initialized: bool
) -> None:
    """Spares are made with the first devices' CUDA_VISIBLE_DEVICES. A model on another device set (GPU 1, a
    tensor-parallel pair) gets its own in the spare, which its server and workers inherit, as long as the spare's
    imports did not initialise CUDA (on the H100 with vLLM 0.26 they do not: `bench/results/
    2026-11-27-h100-warm-start`); a spare that reports cuInit keeps its devices, and the start is a plain spawn."""
    (tmp_path / "devmod.py").write_text(
        "import os\nif __name__ == '__main__':\n    print('devices', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
    )
    pool = WarmPool(size=1, logs_dir=tmp_path / "logs", stop_grace=3, device_kind="cuda", modules=["devmod"])
    try:
        cmd = [PY, "-m", "devmod"]
        base = launch(tmp_path)
        spare_env = {**base.env, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "GPU-aaaa"}
        pool.want(cmd, spare_env)
        await pool.fill()
        await wait_ready_spare(pool)
        if cuda_initialized:
            for spare_ in pool.live(next(iter(pool._wanted))):
                spare_.info["cuda_initialized"] = True  # as a spare whose imports ran cuInit reports it
        pair = {**spare_env, "CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-cccc"}
        spec = eng.LaunchSpec(argv=[*cmd, "--model", "x"], env=pair, port=base.port, log_path=base.log_path)
        engine = await pool.spawn(spec, prefix=cmd, stop_grace=3)
        assert await asyncio.wait_for(engine.process.wait(), 30) == 0
        assert "devices GPU-bbbb,GPU-cccc" in spec.log_path.read_text()
        how = str(pool.how_started(engine))
        if cuda_initialized:
            assert how.startswith("plain spawn") and "differs in CUDA_VISIBLE_DEVICES" in how, how
        else:
            assert how == "warm pool", how
    finally:
        await pool.close()


async def test_a_start_waits_for_a_spare_still_importing(pool: WarmPool, tmp_path: Path) -> None:
    """A spare that is still importing is ahead of a fresh interpreter: the start takes it (at full priority)
    rather than spawning another. The module's `__main__` gets the model's argv and its exit code comes back."""
    (tmp_path / "slowmod.py").write_text(
        "import sys, time\ntime.sleep(1.5)\n"
        "if __name__ == '__main__':\n    print('slowmod ran with', sys.argv[1:], flush=True)\n    sys.exit(3)\n"
    )
    cmd = [PY, "-m", "slowmod"]
    base = launch(tmp_path)
    env = {**base.env, "PYTHONPATH": str(tmp_path)}
    spec = dataclasses.replace(base, argv=[*cmd, "--model", "x"], env=env)
    pool.want(cmd, env)
    await pool.fill()
    assert pool.snapshot()["spares"][0]["state"] == "importing"
    engine = await pool.spawn(spec, prefix=cmd, stop_grace=3)
    assert pool.how_started(engine) == "warm pool"
    assert await asyncio.wait_for(engine.process.wait(), 30) == 3
    assert "slowmod ran with ['--model', 'x']" in spec.log_path.read_text()


@pytest.mark.parametrize(("available_gib", "size"), [(64, 2), (16, 2), (15.9, 1), (2, 1)])
def test_default_pool_size_follows_the_hosts_memory(
    monkeypatch: pytest.MonkeyPatch, available_gib: float, size: int
) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(available_gib * (1 << 30))))
    assert default_pool_size() == size


async def test_a_taken_spare_is_replaced_at_once_so_back_to_back_starts_are_pooled(
    pool: WarmPool, tmp_path: Path
) -> None:
    """Spares import at low priority, so the one a start takes is replaced at once, not when that start is over
    (a second cold start right after another used to be a plain spawn). The first start here never finishes."""
    assert pool.nice > 0  # root may lower and raise priorities (the tests run as root)
    hanging = launch(tmp_path, env={"FAKE_ENGINE_HANG": "1"}, name="first")
    pool.want(FAKE_CMD, hanging.env)
    await pool.fill()
    first_spare = await wait_ready_spare(pool)
    first = await pool.spawn(hanging, prefix=FAKE_CMD, stop_grace=3)
    assert pool.how_started(first) == "warm pool"
    second_spare = await wait_ready_spare(pool)  # while the first start still has not opened its port
    assert second_spare["pid"] != first_spare["pid"] and first.process.returncode is None
    second = await pool.spawn(
        launch(tmp_path, env={"FAKE_ENGINE_HANG": "1"}, name="second"), prefix=FAKE_CMD, stop_grace=3
    )
    assert pool.how_started(second) == "warm pool" and pool.pooled_starts == 2 and pool.plain_starts == 0
    for engine in (first, second):
        await eng.terminate(engine, 3)


async def test_without_low_priority_spares_the_refill_waits_for_the_start(tmp_path: Path) -> None:
    """Where spares cannot import at a lower priority, a spare importing beside a start would slow it down:
    the refill waits until the start is over."""
    pool = WarmPool(size=1, logs_dir=tmp_path / "logs", stop_grace=3, device_kind="cuda", modules=[FAKE], nice=0)
    try:
        hanging = launch(tmp_path, env={"FAKE_ENGINE_HANG": "1"})
        pool.want(FAKE_CMD, hanging.env)
        await pool.fill()
        await wait_ready_spare(pool)
        engine = await pool.spawn(hanging, prefix=FAKE_CMD, stop_grace=3)
        await until(lambda: "hanging before the port opens" in spec_log(hanging), 30, "the start to hang")
        assert pool.snapshot()["spares"] == []  # not refilled while the start goes on
        await eng.terminate(engine, 3)
        await wait_ready_spare(pool)  # refilled once it is over
    finally:
        await pool.close()


def spec_log(spec: eng.LaunchSpec) -> str:
    return spec.log_path.read_text(errors="replace") if spec.log_path.exists() else ""


# --- the daemon with the pool ----------------------------------------------------------------------------------


def test_daemon_hands_cold_starts_to_the_pool(fake_daemon: Daemon) -> None:
    fake_daemon.env |= {"VLLAMA_POOL_SIZE": "1", "VLLAMA_POOL_MODULES": FAKE}
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2}, "B": {"gpu_memory_gib": 2, "prewarm": False}})
    fake_daemon.start()
    with fake_daemon.client() as c:

        def ready_spares() -> list[dict[str, object]]:
            pool = c.get("/vllama/info").json()["warm_pool"]
            return [s for s in pool["spares"] if s["state"] == "ready"]

        deadline = time.monotonic() + 30
        while not ready_spares():
            assert time.monotonic() < deadline, c.get("/vllama/info").json()["warm_pool"]
            time.sleep(0.1)
        spare_pid = ready_spares()[0]["pid"]
        for model in ("A", "B"):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        rows = {m["model"]: m for m in c.get("/vllama/ps").json()["models"]}
        assert rows["A"]["started_by"] == "warm pool" and rows["A"]["pid"] == spare_pid
        assert rows["B"]["started_by"] == "plain spawn: the model sets prewarm: false"
        pool = c.get("/vllama/info").json()["warm_pool"]
        assert pool["pooled_starts"] == 1 and pool["plain_starts"] == 1
        assert c.post("/vllama/stop", json={"model": "A"}).status_code == 200
        deadline = time.monotonic() + 30
        while not ready_spares():  # refilled after A's start
            assert time.monotonic() < deadline
            time.sleep(0.1)
    groups = fake_daemon.child_groups()
    assert len(groups) == 2  # B and the new spare, each in its own group under a guard
    fake_daemon.stop(signal.SIGKILL)
    assert not wait_until_gone(groups, 15)


def test_pool_size_zero_starts_nothing(fake_daemon: Daemon) -> None:
    fake_daemon.env |= {"VLLAMA_POOL_SIZE": "0", "VLLAMA_POOL_MODULES": FAKE}
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2}})
    fake_daemon.start()
    time.sleep(0.5)
    assert fake_daemon.child_groups() == set()
    r = httpx.get(f"{fake_daemon.url}/vllama/info", timeout=10).json()["warm_pool"]
    assert r["size"] == 0 and r["spares"] == []


async def test_a_cancelled_start_leaves_the_importing_spare_in_the_pool(pool: WarmPool, tmp_path: Path) -> None:
    (tmp_path / "slowmod.py").write_text("import time\ntime.sleep(1.5)\n")
    cmd = [PY, "-m", "slowmod"]
    base = launch(tmp_path)
    env = {**base.env, "PYTHONPATH": str(tmp_path)}
    spec = dataclasses.replace(base, argv=[*cmd, "--model", "x"], env=env)
    pool.want(cmd, env)
    await pool.fill()
    task = asyncio.get_running_loop().create_task(pool.spawn(spec, prefix=cmd, stop_grace=3))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    info = await wait_ready_spare(pool)  # not leaked, not killed: still the pool's
    assert len(pool.snapshot()["spares"]) == 1
    engine = await pool.spawn(spec, prefix=cmd, stop_grace=3)
    assert pool.how_started(engine) == "warm pool" and engine.server_pid() == info["pid"]
    assert await asyncio.wait_for(engine.process.wait(), 30) == 0
