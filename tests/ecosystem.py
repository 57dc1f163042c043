"""Helpers shared by the ecosystem tests (Ollama API, metrics, status page, CLI extras)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, new_fake_daemon, wait_until_gone

GIB = 1024**3


@contextmanager
def running_daemon(root: Path, models: dict[str, Any], **env: str) -> Iterator[Daemon]:
    """A started daemon over fake engines on one simulated 8 GiB GPU (like conftest's `fake_daemon`), for a
    module-scoped fixture; stopped afterwards, checking that no child is left."""
    daemon = new_fake_daemon(root, **env)
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
