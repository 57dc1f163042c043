"""Helpers shared by the benchmarks: run a `vllama serve`, time the first token of a streamed request.
Only the standard library, httpx and vllama itself: these run on the GPU machine too (no pytest there)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


class StepReport:
    """A benchmark's report, rewritten to OUT/<stem>.json and OUT/<stem>.md after every step, so a run cut short
    still reports what it did."""

    def __init__(self, out: Path, stem: str, title: str, **header: Any) -> None:
        self.out = out
        self.stem = stem
        self.report: dict[str, Any] = {**header, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
        self.md: list[str] = [title, ""]

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.md.append(line)
        self.flush()

    def record(self, name: str, **data: Any) -> None:
        entry = {"step": name, "t": round(time.time(), 3), **data}
        self.report["steps"].append(entry)
        print(json.dumps(entry), flush=True)
        self.flush()

    def check(self, what: str, ok: bool) -> None:
        """Record a named pass/fail check (the report's "checks") and log it."""
        self.report.setdefault("checks", {})[what] = ok
        self.log(f"- {'PASS' if ok else 'FAIL'}: {what}")

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.report, indent=2))
        (self.out / f"{self.stem}.md").write_text("\n".join(self.md) + "\n")


def exit_on_sigterm() -> None:
    """Make SIGTERM (e.g. from `timeout`) a normal exit, so `finally` blocks stop what the benchmark started:
    Python's default SIGTERM handling skips them, leaving vLLM processes holding GPU memory. Only the first one
    counts: `timeout` signals the process and then its group, and a second SystemExit would cut the clean-up."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def signal_and_wait(proc: subprocess.Popen[bytes], sig: int, timeout: float = 120.0) -> float:
    """Send `sig` to a process and wait (bounded) for it to exit; the seconds it took."""
    t0 = time.perf_counter()
    proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    return round(time.perf_counter() - t0, 2)


def start_daemon(home: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`vllama serve` on 127.0.0.1:port in its own session, logging to home/serve.log; returns once healthy."""
    with (home / "serve.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllama", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(600):
        if proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        time.sleep(0.1)
    raise RuntimeError("vllama did not come up: " + (home / "serve.log").read_text()[-2000:])


def first_token(base: str, model: str, max_tokens: int = 8) -> tuple[float, float]:
    """(seconds to the first streamed event, seconds to the end) of a streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and ttft is None:
                ttft = time.perf_counter() - t0
    return ttft or float("nan"), time.perf_counter() - t0


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: " + log.read_text(errors="replace")[-2000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
