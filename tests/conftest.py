"""Shared fixtures: a real `vllama serve` daemon process, with the fake engine or real vLLM behind it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from vllama.testing.soak import processes_in_groups

FAKE_ENGINE = [sys.executable, "-m", "vllama.testing.fake_engine"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(width: int = 40) -> tuple[int, int]:
    """A block of ports for children, unlikely to collide with another test's block."""
    for _ in range(200):
        lo = free_port()
        if lo + width < 65000:
            return lo, lo + width
    raise RuntimeError("no port range")


@dataclass
class Daemon:
    """A `vllama serve` subprocess and helpers to talk to it."""

    home: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_models(self, models: dict[str, Any]) -> None:
        (self.home / "models.yaml").write_text(yaml.safe_dump(models))

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllama", "serve", "--port", str(self.port), "--host", "127.0.0.1"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllama serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"vllama serve did not come up:\n{self.log.read_text()}")

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        with contextlib.suppress(psutil.Error):
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        return []

    def child_groups(self) -> set[int]:
        """Process groups of the vLLM children (each child runs in its own session)."""
        groups = set()
        for p in self.descendants():
            with contextlib.suppress(psutil.Error, OSError):
                groups.add(os.getpgid(p.pid))
        groups.discard(self.proc.pid if self.proc else -1)
        return groups

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "VLLAMA_URL": self.url}
        return subprocess.run(
            [sys.executable, "-m", "vllama", *args], env=env, capture_output=True, text=True, timeout=timeout
        )


def wait_until_gone(groups: set[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = processes_in_groups(groups)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = processes_in_groups(groups)
    return alive


@contextlib.contextmanager
def stray_server_and_guard(
    env: dict[str, str], server_at: list[str], guard_at: list[str]
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """What another vllama can leave at our children's addresses: a fake vLLM server listening at `server_at`
    (`--uds PATH` or `--host H --port N`), and a vllama guard whose server hangs before it listens at `guard_at`
    (still starting: only its command line tells). Both are killed, with their groups, on the way out."""
    server = subprocess.Popen(
        [*FAKE_ENGINE, "--model", "stray", *server_at],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    guard = subprocess.Popen(
        [
            *[sys.executable, "-m", "vllama.guard", "--parent", str(os.getpid()), "--grace", "1", "--"],
            *[*FAKE_ENGINE, "--model", "stray2", *guard_at],
        ],
        env={**env, "FAKE_ENGINE_HANG": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield server, guard
    finally:
        for p in (server, guard):
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def engine_client(row: dict[str, Any], timeout: float = 60.0) -> httpx.Client:
    """A client straight to the child of a `vllama ps` row (past vllama): over its Unix socket, or its port."""
    if row.get("socket"):
        transport = httpx.HTTPTransport(uds=row["socket"])
        return httpx.Client(transport=transport, base_url="http://child", timeout=timeout)
    return httpx.Client(base_url=f"http://127.0.0.1:{row['port']}", timeout=timeout)


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLAMA_", "FAKE_ENGINE_"))}
    lo, hi = free_port_range()
    env.update(
        {
            "VLLAMA_HOME": str(home),
            "VLLAMA_PORT_RANGE": f"{lo}-{hi}",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def new_fake_daemon(tmp: Path, **env: str) -> Daemon:
    """A daemon (not started) over fake engines on one simulated 8 GiB GPU, with its home and the GPU ledger
    under `tmp`; `env` overrides or adds daemon and fake-engine settings."""
    home, ledger = tmp / "home", tmp / "ledger"
    home.mkdir()
    ledger.mkdir()
    defaults = {
        "VLLAMA_GPU_PROBE": "fake",
        "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
        "VLLAMA_FAKE_GPU_TOTAL_GIB": "8",
        "VLLAMA_VLLM_COMMAND": " ".join(FAKE_ENGINE),
        "VLLAMA_SLEEP_RESIDUAL_GIB": "0.5",
        "FAKE_ENGINE_CONTEXT_GIB": "0.5",
        "FAKE_ENGINE_STARTUP_S": "0.3",
        "VLLAMA_STOP_TIMEOUT": "5",
    }
    return Daemon(home=home, port=free_port(), env=base_env(home, **{**defaults, **env}))


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon over fake engines on one simulated 8 GiB GPU (not started: write models, then .start())."""
    daemon = new_fake_daemon(tmp_path)
    yield daemon
    groups = daemon.child_groups()
    daemon.stop()
    leftover = wait_until_gone(groups, 15)
    assert not leftover, f"processes of vLLM children left after vllama stopped: {leftover}"
