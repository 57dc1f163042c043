"""Helpers shared by the ecosystem tests (Ollama API, metrics, status page, CLI extras)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import FAKE_ENGINE, Daemon, base_env, free_port, wait_until_gone

GIB = 1024**3


@contextmanager
def running_daemon(root: Path, models: dict[str, Any], **env: str) -> Iterator[Daemon]:
    """A started daemon over fake engines on one simulated 8 GiB GPU (like conftest's `fake_daemon`), for a
    module-scoped fixture; stopped afterwards, checking that no child is left."""
    home, ledger = root / "home", root / "ledger"
    home.mkdir()
    ledger.mkdir()
    settings = {
        "VLLAMA_GPU_PROBE": "fake",
        "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
        "VLLAMA_FAKE_GPU_TOTAL_GIB": "8",
        "VLLAMA_VLLM_COMMAND": " ".join(FAKE_ENGINE),
        "VLLAMA_SLEEP_RESIDUAL_GIB": "0.5",
        "FAKE_ENGINE_CONTEXT_GIB": "0.5",
        "FAKE_ENGINE_STARTUP_S": "0.3",
        "VLLAMA_STOP_TIMEOUT": "5",
        **env,
    }
    daemon = Daemon(home=home, port=free_port(), env=base_env(home, **settings))
    daemon.write_models(models)
    daemon.start()
    try:
        yield daemon
    finally:
        groups = daemon.child_groups()
        daemon.stop()
        leftover = wait_until_gone(groups, 15)
        assert not leftover, f"processes of vLLM children left after vllama stopped: {leftover}"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy (returns it) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s (last value: {value!r})")
        time.sleep(interval)


def ps_rows(daemon: Daemon) -> dict[str, dict[str, Any]]:
    with daemon.client() as c:
        return {row["model"]: row for row in c.get("/vllama/ps").json()["models"]}
