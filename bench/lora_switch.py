"""An adapter switch against a model switch, through vllama, in one run.

    python bench/lora_switch.py [--models DIR] [--rounds 3] [--out bench/results]

One `vllama serve` with two models of the same tiny random Llama (`m1`, `m2`) on a CPU budget that holds only one
of them, and two random rank-8 adapters on `m1` with `max_loras: 1`:
- adapter switch: a request to the other adapter of the running `m1` (vLLM unloads one adapter, loads the other);
- model switch: a request to the other model (vllama stops the running one, cold-starts the other: the CPU build
  has no sleep mode);
- warm: a request to the adapter that is loaded already (what the same request costs without a switch).
Each is the wall time of one greedy completion of 8 tokens, request to answer. Medians over the rounds; the
adapter loads and unloads as vLLM answered them are read from vllama's /metrics.

Only the standard library, httpx, PyYAML and vllama (the adapters are built with torch, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import StepReport, exit_on_sigterm, start_daemon  # noqa: E402
from vllama.offline_models import build_tiny_lora, prepare  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(url: str, model: str) -> float:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t0


def lora_metric_means(url: str) -> dict[str, float]:
    """Mean seconds of each LoRA operation, from vllama's histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllama_lora_operation_duration_seconds_"):
            name, value = line.rsplit(" ", 1)
            op = name.split('operation="', 1)[1].split('"', 1)[0]
            if name.startswith("vllama_lora_operation_duration_seconds_sum"):
                sums[op] = sums.get(op, 0.0) + float(value)
            elif name.startswith("vllama_lora_operation_duration_seconds_count"):
                counts[op] = counts.get(op, 0.0) + float(value)
    return {op: sums[op] / counts[op] for op in sums if counts.get(op)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    exit_on_sigterm()
    dest = Path(args.models).expanduser()
    tiny = str(prepare(dest, ["tiny"])["tiny"])
    adapters = {f"lora-{i}": str(build_tiny_lora(dest / f"tiny-lora-{i}", seed=i)) for i in (1, 2)}
    eager = ["--enforce-eager"]
    models = {
        "m1": {"model": tiny, "gpu_memory_gib": 3, "max_model_len": 512, "extra_args": eager,
               "adapters": adapters, "max_loras": 1},
        "m2": {"model": tiny, "gpu_memory_gib": 3, "max_model_len": 512, "extra_args": eager},
    }  # fmt: skip
    date = time.strftime("%Y-%m-%d")
    report = StepReport(
        Path(args.out),
        f"lora-switch-cpu-{date}",
        "# LoRA adapter switch vs model switch (CPU build, tiny Llama, through vllama)",
        command="python bench/lora_switch.py " + shlex.join(sys.argv[1:]),
        machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    )
    samples: dict[str, list[float]] = {"warm": [], "adapter switch": [], "model switch": []}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "models.yaml").write_text(yaml.safe_dump(models))
        port, lo = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_")}
        env.update(
            VLLAMA_HOME=str(home), VLLAMA_GPU_PROBE="cpu", VLLAMA_CPU_MEMORY_GIB="4", VLLAMA_POOL_SIZE="0",
            VLLAMA_PORT_RANGE=f"{lo}-{lo + 40}", VLLAMA_STARTUP_TIMEOUT="600", HF_HUB_OFFLINE="1",
            PYTHONPATH=str(ROOT),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        daemon = start_daemon(home, port, env)
        try:
            report.record("cold start m1 (not counted)", seconds=round(timed(url, "m1"), 3))
            for r in range(1, args.rounds + 1):
                timed(url, "lora-1")  # loaded (after m1's restart, a load without an unload: not counted)
                samples["warm"].append(timed(url, "lora-1"))
                for name in ("lora-2", "lora-1"):
                    samples["adapter switch"].append(timed(url, name))
                    report.record("adapter switch", round=r, to=name, seconds=round(samples["adapter switch"][-1], 4))
                for name in ("m2", "m1"):
                    samples["model switch"].append(timed(url, name))
                    report.record("model switch", round=r, to=name, seconds=round(samples["model switch"][-1], 3))
            means = lora_metric_means(url)
        finally:
            daemon.terminate()
            daemon.wait(60)
    load = os.getloadavg()[0]
    medians = {k: statistics.median(v) for k, v in samples.items()}
    report.report.update(samples=samples, medians=medians, lora_operation_means=means, load_average_end=load)
    machine = report.report["machine"]
    report.log(f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {machine}; load average at the end {load:.2f}")
    report.log(f"- command: `{report.report['command']}`")
    report.log(
        "- models: two names over the same tiny random Llama (hidden 128, 2 layers); m1 has two random rank-8 "
        "adapters (q_proj, v_proj), max_loras 1; CPU budget 4 GiB for 3 GiB models (one fits)"
    )
    report.log("- each sample: one greedy 8-token completion, request → answer, through vllama")
    report.log("")
    report.log("| request | samples | median s | min s | max s |")
    report.log("|---|---|---|---|---|")
    for kind, values in samples.items():
        report.log(f"| {kind} | {len(values)} | {medians[kind]:.4f} | {min(values):.4f} | {max(values):.4f} |")
    report.log("")
    ops = ", ".join(f"{op} {s * 1000:.1f} ms" for op, s in sorted(means.items()))
    report.log(f"vLLM's own LoRA calls (mean, from /metrics): {ops}.")
    ratio = medians["model switch"] / medians["adapter switch"]
    report.log(
        f"\n**Median adapter switch {medians['adapter switch'] * 1000:.0f} ms (warm request "
        f"{medians['warm'] * 1000:.0f} ms) vs model switch {medians['model switch']:.1f} s: {ratio:.0f}×.**"
    )
    print(json.dumps(medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
