"""Real-GPU proof of vllama: the spec's eviction scenario, sleep/wake timings against bare vLLM, a swap trace
(sleep vs stop/start), a stream that survives an eviction, and clean shutdowns — with real vLLM and NVML.

Runs on the lent GPU machine (see bench/README.md for the exact device calls):
    python3 bench/gpu_scenario.py sleep  --models-dir /tmp/models --out $OUT   # scenario, timings, trace, SIGTERM
    python3 bench/gpu_scenario.py stop   --models-dir /tmp/models --out $OUT   # stop/start trace, SIGKILL
and locally as a dry run over fake engines and a simulated GPU (no vLLM, no GPU):
    python bench/gpu_scenario.py sleep --fake --out /tmp/gpu-dry
Every step appends to OUT/<phase>.json and OUT/<phase>.md as it goes, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import StepReport, exit_on_sigterm, first_token, signal_and_wait, start_daemon, wait_healthy  # noqa: E402
from vllama.gpu import GIB, LedgerProbe, NvmlProbe  # noqa: E402

MODELS = ("A", "B", "C")
UTILIZATION = 0.4  # two of the three fit on one GPU, three do not


class Run(StepReport):
    def __init__(self, phase: str, out: Path, fake: bool, models_dir: Path) -> None:
        super().__init__(out, phase, f"# vllama GPU run: phase `{phase}`", phase=phase)
        self.phase = phase
        self.fake = fake
        self.models_dir = models_dir
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-gpu-"))
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.port = 33258
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon: subprocess.Popen[bytes] | None = None
        if fake:
            self.ledger = self.tmp / "ledger"
            self.ledger.mkdir()
            self.probe: Any = LedgerProbe(self.ledger, [80 * GIB])
        else:
            self.probe = NvmlProbe()
        self.env = dict(os.environ)
        self.env.update({"VLLAMA_HOME": str(self.home), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
        if fake:
            self.env.update(
                {
                    "VLLAMA_GPU_PROBE": "fake",
                    "VLLAMA_FAKE_GPU_LEDGER": str(self.ledger),
                    "VLLAMA_FAKE_GPU_TOTAL_GIB": "80",
                    "VLLAMA_VLLM_COMMAND": f"{sys.executable} -m vllama.testing.fake_engine",
                    "FAKE_ENGINE_STARTUP_S": "1",
                    "FAKE_ENGINE_CONTEXT_GIB": "0.8",
                }
            )
        self.vllm_args = [*os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "").split(), "--enforce-eager"]

    # --- daemon -------------------------------------------------------------------------------------------

    def write_models(self, sleep_level: int) -> None:
        models = {}
        for name in MODELS:
            source = name if self.fake else str(self.models_dir / name.lower())
            models[name] = {
                "model": source,
                "gpu_memory_utilization": UTILIZATION,
                "max_model_len": 4096,
                "sleep_level": sleep_level,
                "extra_args": self.vllm_args,
            }
        (self.home / "models.yaml").write_text(yaml.safe_dump(models))

    def start_daemon(self) -> None:
        self.daemon = start_daemon(self.home, self.port, self.env)

    def ps(self) -> dict[str, dict[str, Any]]:
        return {r["model"]: r for r in httpx.get(f"{self.url}/vllama/ps", timeout=30).json()["models"]}

    def states(self) -> dict[str, str]:
        return {
            m: r["state"] + (f"(L{r['sleep_level']})" if r.get("sleep_level") else "") for m, r in self.ps().items()
        }

    def gpu(self) -> dict[str, Any]:
        dev = self.probe.devices()[0]
        procs = self.probe.process_memory()
        return {
            "used_gib": round((dev.total - dev.free) / GIB, 2),
            "free_gib": round(dev.free / GIB, 2),
            "processes": {str(pid): round(sum(m.values()) / GIB, 2) for pid, m in procs.items()},
        }

    # --- requests -----------------------------------------------------------------------------------------

    def first_token(self, base: str, model: str, max_tokens: int = 8) -> tuple[float, float]:
        return first_token(base, model, max_tokens)

    def chat(self, model: str, max_tokens: int = 8) -> float:
        t0 = time.perf_counter()
        r = httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens},
            timeout=900,
        )
        if r.status_code != 200:
            raise RuntimeError(f"request to {model} failed: {r.status_code} {r.text[:500]}")
        return time.perf_counter() - t0

    def child_url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.ps()[model]['port']}"

    def stop_daemon(self, sig: int) -> float:
        assert self.daemon is not None
        return signal_and_wait(self.daemon, sig)

    def our_gpu_processes(self, timeout: float = 30.0) -> dict[str, float]:
        """GPU processes left (waiting up to `timeout` for them to go)."""
        deadline = time.monotonic() + timeout
        while True:
            procs = self.gpu()["processes"]
            if not procs or time.monotonic() > deadline:
                return dict(procs)
            time.sleep(0.5)


# --- bare vLLM, for the baselines ---------------------------------------------------------------------------


def bare_sleep(base: str, level: int) -> float:
    t0 = time.perf_counter()
    httpx.post(f"{base}/sleep", params={"level": level}, timeout=300).raise_for_status()
    while not httpx.get(f"{base}/is_sleeping", timeout=30).json()["is_sleeping"]:
        time.sleep(0.01)
    return time.perf_counter() - t0


def bare_wake(base: str, level: int) -> None:
    if level == 2:
        httpx.post(f"{base}/wake_up", params={"tags": "weights"}, timeout=300).raise_for_status()
        httpx.post(f"{base}/collective_rpc", json={"method": "reload_weights"}, timeout=300).raise_for_status()
        httpx.post(f"{base}/wake_up", params={"tags": "kv_cache"}, timeout=300).raise_for_status()
        httpx.post(f"{base}/reset_prefix_cache", timeout=300).raise_for_status()
    else:
        httpx.post(f"{base}/wake_up", timeout=300).raise_for_status()


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def swap_trace(run: Run, n: int) -> dict[str, Any]:
    pattern = "ABACABCBACBCABAC"
    sequence = [pattern[i % len(pattern)] for i in range(n)]
    latencies, switches, failed = [], [], 0
    t0 = time.perf_counter()
    previous = None
    for model in sequence:
        try:
            dt = run.chat(model)
        except Exception as exc:  # a failed request is a result here, not a crash of the benchmark
            failed += 1
            run.log(f"  request to {model} failed: {exc}")
            previous = model
            continue
        latencies.append(dt)
        if previous is not None and model != previous:
            switches.append(dt)
        previous = model
    total = time.perf_counter() - t0
    return {
        "sequence": "".join(sequence),
        "requests": n,
        "failed": failed,
        "total_s": round(total, 2),
        "switches": len(switches),
        "switch_p50_s": pct(switches, 0.5) if switches else None,
        "switch_p99_s": pct(switches, 0.99) if switches else None,
    }


# --- phases -------------------------------------------------------------------------------------------------


def phase_sleep(run: Run) -> None:
    run.write_models(sleep_level=2)
    run.start_daemon()
    run.log(f"Three models at gpu_memory_utilization {UTILIZATION}: two fit, three do not. Eviction level 2.")
    run.log("")
    run.log("## The spec's scenario")
    cold = run.first_token(run.url, "A")
    run.record("A cold start through vllama", ttft_s=round(cold[0], 2), states=run.states(), gpu=run.gpu())
    run.log(f"- request A: cold start to first token {cold[0]:.1f} s; states {run.states()}")
    run.chat("B")
    run.record("B", states=run.states(), gpu=run.gpu())
    run.log(f"- request B: states {run.states()}, GPU used {run.gpu()['used_gib']} GiB")
    run.chat("C")
    st = run.states()
    run.record("C", states=st, gpu=run.gpu())
    run.log(f"- request C: states {st}, GPU used {run.gpu()['used_gib']} GiB")
    run.check(
        "after A, B, C: A sleeping (L2), B and C running", st == {"A": "sleeping(L2)", "B": "running", "C": "running"}
    )
    dt = run.chat("A")
    st = run.states()
    run.record("A again", seconds=round(dt, 3), states=st, gpu=run.gpu())
    run.log(f"- request A again ({dt:.2f} s): states {st}")
    run.check(
        "A again: B (least recently used) sleeping, A and C running",
        st == {"A": "running", "B": "sleeping(L2)", "C": "running"},
    )

    run.log("")
    run.log("## Sleep and wake: through vllama vs bare vLLM (same instance), median of 3")
    timings: dict[str, Any] = {}
    for level in (1, 2):
        child = run.child_url("A")
        bare_s, bare_w, via_s, via_w = [], [], [], []
        for _ in range(3):
            bare_s.append(bare_sleep(child, level))
            t0 = time.perf_counter()
            bare_wake(child, level)
            bare_w.append(time.perf_counter() - t0 + run.first_token(child, "A")[0])
        for _ in range(3):
            t0 = time.perf_counter()
            r = httpx.post(f"{run.url}/vllama/sleep", json={"model": "A", "level": level}, timeout=300)
            r.raise_for_status()
            via_s.append(time.perf_counter() - t0)
            via_w.append(run.first_token(run.url, "A")[0])
        timings[f"L{level}"] = {
            "sleep_bare_s": median(bare_s),
            "sleep_vllama_s": median(via_s),
            "sleep_added_ms": round((median(via_s) - median(bare_s)) * 1000, 1),
            "wake_to_first_token_bare_s": median(bare_w),
            "wake_to_first_token_vllama_s": median(via_w),
            "wake_added_ms": round((median(via_w) - median(bare_w)) * 1000, 1),
        }
        run.record(f"sleep/wake L{level}", **timings[f"L{level}"])
        t = timings[f"L{level}"]
        run.log(
            f"- L{level}: sleep {t['sleep_bare_s']:.3f} s bare, {t['sleep_vllama_s']:.3f} s via vllama "
            f"(+{t['sleep_added_ms']} ms); wake to first token {t['wake_to_first_token_bare_s']:.3f} s bare, "
            f"{t['wake_to_first_token_vllama_s']:.3f} s via vllama (+{t['wake_added_ms']} ms)"
        )
    run.report["sleep_wake"] = timings

    run.log("")
    run.log("## A stream from B survives C's arrival evicting A")
    run.chat("B")  # B wakes (evicts C, the LRU); A is now the least recently used idle model
    run.chat("B")
    stream: dict[str, Any] = {}

    def stream_b() -> None:
        body = {"model": "B", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 1500,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        chunks, finish, usage = 0, None, None
        with httpx.stream("POST", f"{run.url}/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    event = json.loads(line[5:])
                    if event.get("choices"):
                        chunks += 1
                        finish = event["choices"][0].get("finish_reason") or finish
                    usage = event.get("usage") or usage
                elif line == "data: [DONE]":
                    stream["done"] = True
        stream.update(chunks=chunks, finish=finish, usage=usage, status=r.status_code)

    th = threading.Thread(target=stream_b)
    th.start()
    time.sleep(0.5)
    st_before = run.states()
    dt = run.chat("C")
    st_after = run.states()
    th.join(600)
    run.record("stream during eviction", before=st_before, after=st_after, c_seconds=round(dt, 3), stream=stream)
    run.log(f"- before C: {st_before}; after C: {st_after}; B's stream: {stream}")
    completion_tokens = (stream.get("usage") or {}).get("completion_tokens")
    run.check(
        "B's stream complete (1500 tokens, finish 'length', [DONE]) while A was evicted for C",
        bool(stream.get("done")) and completion_tokens == 1500 and stream.get("finish") == "length"
        and st_after.get("A", "").startswith("sleeping") and st_after.get("C") == "running",
    )  # fmt: skip

    run.log("")
    run.log("## Swap trace with sleep (level 2 eviction)")
    trace = swap_trace(run, 30)
    run.report["trace_sleep"] = trace
    run.record("swap trace (sleep)", **trace)
    run.log(f"- {trace}")
    run.check("swap trace with sleep: no failed request", trace["failed"] == 0)

    run.log("")
    run.log("## Shutdown with SIGTERM")
    pids_before = run.gpu()["processes"]
    took = run.stop_daemon(signal.SIGTERM)
    left = run.our_gpu_processes()
    run.record("SIGTERM", seconds=round(took, 2), gpu_processes_before=pids_before, gpu_processes_after=left)
    run.log(f"- vllama exited {took:.1f} s after SIGTERM; GPU processes before {pids_before}, after {left}")
    run.check("after SIGTERM no GPU process is left", not left)

    run.log("")
    run.log("## Bare vLLM cold start of the same model (baseline)")
    bare = bare_cold_start(run)
    run.record("bare cold start", ttft_s=round(bare, 2))
    run.report["cold_start"] = {"vllama_s": round(cold[0], 2), "bare_s": round(bare, 2)}
    run.log(f"- bare vLLM: spawn to first token {bare:.1f} s; through vllama (first start, above) {cold[0]:.1f} s")


def bare_cold_start(run: Run) -> float:
    port = 33290
    if run.fake:
        cmd = [sys.executable, "-m", "vllama.testing.fake_engine"]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    source = "A" if run.fake else str(run.models_dir / "a")
    cmd += ["--model", source, "--served-model-name", "A", "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", str(UTILIZATION), "--max-model-len", "4096", *run.vllm_args]  # fmt: skip
    env = dict(run.env)
    env["CUDA_VISIBLE_DEVICES"] = "0"
    t0 = time.perf_counter()
    with (run.tmp / "bare.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, run.tmp / "bare.log")
        run.first_token(base, "A")
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def phase_stop(run: Run) -> None:
    run.write_models(sleep_level=3)
    run.start_daemon()
    run.log(f"Three models at gpu_memory_utilization {UTILIZATION}; eviction = stop (level 3), no sleep.")
    run.log("")
    run.log("## Swap trace with stop/start")
    n = int(os.environ.get("VLLAMA_STOP_TRACE", "5"))
    trace = swap_trace(run, n)
    run.report["trace_stop"] = trace
    run.record("swap trace (stop/start)", **trace, states=run.states())
    run.log(f"- {trace}")
    run.check("swap trace with stop/start: no failed request", trace["failed"] == 0)

    run.log("")
    run.log("## vllama killed with SIGKILL")
    before = run.gpu()["processes"]
    run.stop_daemon(signal.SIGKILL)
    t0 = time.perf_counter()
    left = run.our_gpu_processes(60)
    run.record(
        "SIGKILL", gpu_processes_before=before, gpu_processes_after=left, seconds=round(time.perf_counter() - t0, 2)
    )
    run.log(f"- GPU processes before {before}; {time.perf_counter() - t0:.1f} s after SIGKILL: {left}")
    run.check("after SIGKILL of vllama no GPU process is left (the guards stopped them)", not left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["sleep", "stop"])
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fake", action="store_true", help="dry run over fake engines and a simulated GPU")
    args = parser.parse_args()
    exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.phase, args.out, args.fake, args.models_dir)
    run.report["machine"] = "fake (dry run)" if args.fake else run.probe.devices()[0].name
    try:
        {"sleep": phase_sleep, "stop": phase_stop}[args.phase](run)
    finally:
        if run.daemon and run.daemon.poll() is None:
            run.daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.daemon.wait(60)
        shutil_logs(run)
        run.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.flush()
    return 0 if all(run.report.get("checks", {}).values()) else 1


def shutil_logs(run: Run) -> None:
    """Keep the tail of every log (vllama's and each vLLM's) in one file under OUT."""
    parts = []
    for f in sorted(run.home.rglob("*.log")) + sorted(run.tmp.glob("*.log")):
        parts.append(f"===== {f.name}\n" + f.read_text(errors="replace")[-20000:])
    (run.out / f"{run.phase}-logs.txt").write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
