"""Cold start through vllama against a bare `python -m vllm.entrypoints.openai.api_server` of the same model
with the same flags, alternating, in one run: spawn (or request) → first streamed token.

    python bench/cold_start.py --model PATH [--rounds 2] [--device cpu|cuda] [--extra-args "--enforce-eager"]
                               [--out bench/results]

On CPU this uses vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE=1, as vllama sets by default); on a GPU, NVML.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import first_token, start_daemon, wait_healthy  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare(model: str, args: list[str], env: dict[str, str], tmp: Path) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "M", "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    log = tmp / f"bare-{port}.log"
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc, log)
        first_token(base, "M")
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        time.sleep(2)  # let memory come back before the next start


def via_vllama(url: str) -> float:
    t0 = time.perf_counter()
    first_token(url, "M")
    took = time.perf_counter() - t0
    httpx.post(f"{url}/vllama/stop", json={"model": "M"}, timeout=120).raise_for_status()
    time.sleep(2)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--extra-args", default="--enforce-eager")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vllama-cold-"))
    home = tmp / "home"
    home.mkdir()
    extra = [*shlex.split(args.extra_args), "--max-model-len", "512"]
    entry: dict[str, object] = {"model": args.model, "extra_args": extra}
    bare_args = list(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_")}
    env.update({"VLLAMA_HOME": str(home), "PYTHONPATH": f"{ROOT}:{env.get('PYTHONPATH', '')}"})
    if args.device == "cpu":
        entry["gpu_memory_gib"] = 4
        env.update({"VLLAMA_GPU_PROBE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"})
    else:
        entry["gpu_memory_utilization"] = args.gpu_memory_utilization
        env["VLLAMA_GPU_PROBE"] = "nvml"
        bare_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--enable-sleep-mode"]
    (home / "models.yaml").write_text(yaml.safe_dump({"M": entry}))
    port = free_port()
    daemon = start_daemon(home, port, env)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for i in range(args.rounds):
            order = ("bare", "vllama") if i % 2 == 0 else ("vllama", "bare")
            for kind in order:
                bare_env = {**env, "VLLM_SERVER_DEV_MODE": "1"} if args.device == "cuda" else env
                took = bare(args.model, bare_args, bare_env, tmp) if kind == "bare" else via_vllama(url)
                rows.append({"round": i + 1, "kind": kind, "seconds": round(took, 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)

    med = {k: statistics.median(r["seconds"] for r in rows if r["kind"] == k) for k in ("bare", "vllama")}
    lines = [
        "# Cold start: through vllama vs bare vLLM (spawn or request → first streamed token)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} cores, device {args.device}; load average at the end {os.getloadavg()[0]:.2f}",
        f"- command: `python bench/cold_start.py --model {args.model} --rounds {args.rounds} --device {args.device}"
        f" --extra-args '{args.extra_args}'`",
        "",
        "| round | kind | seconds |",
        "|---|---|---|",
        *[f"| {r['round']} | {r['kind']} | {r['seconds']} |" for r in rows],
        "",
        f"**Median: bare {med['bare']:.1f} s, through vllama {med['vllama']:.1f} s "
        f"(ratio {med['vllama'] / med['bare']:.2f}×).**",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"cold-start-{args.device}-{time.strftime('%Y-%m-%d')}.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
