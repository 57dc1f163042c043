"""No head-of-line blocking: latency of requests to a running model while other models cold-start and evict,
against the same requests with nothing else happening, in one run, alternating.

Setup: one simulated 8 GiB GPU (fake engines, a memory ledger), model R (2 GiB) serving the measured load;
models N and V (4 GiB each) that do not fit together with R: every request to one evicts the other, and N's
cold start takes FAKE_ENGINE_STARTUP_S (default 3 s). The fake engine's start is a timer, not CPU work, so the
numbers isolate vllama's locking and scheduling from CPU contention on this 2-core machine.

    python bench/hol.py [--seconds 8] [--workers 4] [--rounds 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import FAKE_ENGINE, Daemon, base_env, free_port  # noqa: E402


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def load(url: str, seconds: float, workers: int) -> list[float]:
    """Closed-loop load on model R: `workers` clients, each sending the next request when one returns."""
    latencies: list[float] = []
    body = {"model": "R", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


async def churn(url: str, seconds: float) -> int:
    """Alternate N and V (each evicts the other; N cold-starts each time) until `seconds` pass."""
    switches = 0
    deadline = time.perf_counter() + seconds
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.perf_counter() < deadline:
            for model in ("N", "V"):
                if model == "N":
                    await client.post("/vllama/stop", json={"model": "N"})  # so that N cold-starts again
                r = await client.post("/v1/chat/completions", json={**body, "model": model})
                r.raise_for_status()
                switches += 1
    return switches


async def measure(url: str, seconds: float, workers: int, contended: bool) -> dict[str, float]:
    if contended:
        lat, switches = await asyncio.gather(load(url, seconds, workers), churn(url, seconds))
    else:
        lat, switches = await load(url, seconds, workers), 0
    return {
        "requests": len(lat),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(quantile(lat, 0.99) * 1000, 2),
        "model_switches": switches,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--startup", type=float, default=3.0, help="N's cold start in seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vllama-hol-"))
    (tmp / "home").mkdir()
    (tmp / "ledger").mkdir()
    env = base_env(
        tmp / "home",
        VLLAMA_GPU_PROBE="fake",
        VLLAMA_FAKE_GPU_LEDGER=str(tmp / "ledger"),
        VLLAMA_FAKE_GPU_TOTAL_GIB="8",
        VLLAMA_VLLM_COMMAND=" ".join(FAKE_ENGINE),
        VLLAMA_SLEEP_RESIDUAL_GIB="0",
        FAKE_ENGINE_CONTEXT_GIB="0",
        FAKE_ENGINE_STARTUP_S="0.3",
    )
    daemon = Daemon(home=tmp / "home", port=free_port(), env=env)
    daemon.write_models(
        {
            "R": {"gpu_memory_gib": 2, "pinned": True},
            "V": {"gpu_memory_gib": 4},
            "N": {"gpu_memory_gib": 4, "env": {"FAKE_ENGINE_STARTUP_S": str(args.startup)}},
        }
    )
    daemon.start()
    rows = []
    try:
        asyncio.run(measure(daemon.url, 1.0, args.workers, contended=False))  # start R, warm up
        for i in range(args.rounds):
            for contended in (False, True):
                result = asyncio.run(measure(daemon.url, args.seconds, args.workers, contended))
                result["round"] = i + 1
                result["condition"] = "while N cold-starts and N/V evict each other" if contended else "quiet"
                rows.append(result)
                print(json.dumps(result), flush=True)
    finally:
        daemon.stop()

    quiet = [r for r in rows if r["model_switches"] == 0]
    busy = [r for r in rows if r["model_switches"] > 0]
    p50 = statistics.median(r["p50_ms"] for r in busy) / statistics.median(r["p50_ms"] for r in quiet)
    p99 = statistics.median(r["p99_ms"] for r in busy) / statistics.median(r["p99_ms"] for r in quiet)
    lines = [
        "# Head-of-line blocking: requests to a running model while others cold-start and evict",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}, machine: {platform.machine()} {os.cpu_count()} cores "
        f"({platform.processor() or 'cpu'}), load average at the end {os.getloadavg()[0]:.2f}",
        f"- command: `python bench/hol.py --seconds {args.seconds} --workers {args.workers} --rounds {args.rounds}"
        f" --startup {args.startup}`",
        f"- {args.workers} closed-loop clients on model R for {args.seconds} s per condition; fake engines, one "
        f"simulated 8 GiB GPU; N's cold start {args.startup} s",
        "",
        "| round | condition | requests | p50 ms | p99 ms | N/V switches |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['round']} | {r['condition']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['model_switches']} |"
            for r in rows
        ],
        "",
        f"**Ratio contended / quiet: p50 {p50:.2f}×, p99 {p99:.2f}×** (target ≤ 1.2×).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"hol-{time.strftime('%Y-%m-%d')}.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
