"""Multi-GPU proof of vllama (issue 13) on a 2-GPU host, with real vLLM and NVML: a tensor-parallel model with
single-GPU models around it, automatic placement, eviction per device (a tensor-parallel model counting on
both), then vllama started with CUDA_VISIBLE_DEVICES=1 using GPU 1 only; NVML readings of both GPUs at every
step; every request must be answered; no GPU process may be left after SIGTERM (phase 1) and after SIGKILL
(phase 2) of vllama.

On the lent 2-GPU machine (see bench/README.md), after `source .gpu-b/setup.sh`:
    python3 .gpu-b/make_models.py /tmp/models a=135m
    PYTHONPATH=$PWD:$PYTHONPATH python3 bench/gpu_multi.py --models-dir /tmp/models --out $OUT/multi
Locally, as a dry run over fake engines on two simulated 80 GiB GPUs (no vLLM, no GPU):
    python bench/gpu_multi.py --fake --out /tmp/multi-dry
Writes OUT/multi.json, OUT/multi.md (rewritten after every step, so a run cut short still reports) and
OUT/multi-logs.txt (vllama's log and the end of every vLLM log). Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import StepReport, exit_on_sigterm, signal_and_wait, start_daemon  # noqa: E402
from vllama.gpu import GIB, LedgerProbe, NvmlProbe  # noqa: E402

REQUEST_TIMEOUT = 600.0  # a cold start through vllama (plain spawn, no warm spare) takes up to ~140 s


def gib(n: float) -> float:
    return round(n / GIB, 2)


def free_port() -> int:
    """A port nobody listens on (another vllama may run on this machine: never talk to it by mistake)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Multi(StepReport):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.out, "multi", "# vllama on two GPUs (issue 13)", fake=args.fake)
        self.fake = args.fake
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-multi-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.homes: list[Path] = []
        self.requests = 0
        self.failed: list[str] = []
        self.base_env = dict(os.environ)
        self.base_env.pop("CUDA_VISIBLE_DEVICES", None)  # each phase sets its own
        self.base_env.pop("VLLAMA_DEVICES", None)
        self.base_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.base_env["VLLAMA_POOL_SIZE"] = "2"  # two spares: the two single-GPU models start at once
        self.base_env["VLLAMA_KEEP_ALIVE"] = "-1"  # only capacity evicts here
        if self.fake:
            ledger = self.tmp / "ledger"
            ledger.mkdir()
            self.host: Any = LedgerProbe(ledger, [80 * GIB, 80 * GIB])  # the whole host, whatever vllama sees
            self.source = "tiny"
            self.tp_source = self.source
            self.base_env.update(
                {
                    "VLLAMA_GPU_PROBE": "fake",
                    "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
                    "VLLAMA_FAKE_GPU_TOTAL_GIB": "80,80",
                    "VLLAMA_VLLM_COMMAND": f"{sys.executable} -m vllama.testing.fake_engine",
                    "VLLAMA_POOL_MODULES": "vllama.testing.fake_engine",  # the warm pool works on fake engines
                    "FAKE_ENGINE_STARTUP_S": "1",
                    "FAKE_ENGINE_CONTEXT_GIB": "0.8",
                }
            )
        else:
            self.host = NvmlProbe(None)  # every GPU of the host, in NVML's numbering
            folder = args.models_dir / "a"
            if not (folder / "config.json").is_file():
                raise SystemExit(f"no model in {folder}: python3 .gpu-b/make_models.py {args.models_dir} a=135m")
            self.source = str(folder)
            # tensor parallelism needs the heads divisible by 2: the 135m shape has 9, the 1b shape 16
            tp_folder = args.models_dir / "b"
            self.tp_source = str(tp_folder) if (tp_folder / "config.json").is_file() else self.source
            self.base_env["VLLAMA_GPU_PROBE"] = "nvml"
        self.vllm_args = [*shlex.split(os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "")), "--enforce-eager"]
        self.report["gpus"] = [{"nvml_index": d.index, "name": d.name, "uuid": d.uuid} for d in self.host.devices()]
        # what NVML's peer-to-peer status says (vllama prefers these pairs for tensor parallelism)
        self.report["nvlink_pairs"] = sorted(sorted(pair) for pair in self.host.links)

    # --- vllama ---------------------------------------------------------------------------------------------

    def start(self, phase: str, models: dict[str, dict[str, Any]], **env: str) -> None:
        home = self.tmp / phase
        home.mkdir()
        self.homes.append(home)
        entries = {
            name: {"model": self.source, "max_model_len": 2048, "extra_args": self.vllm_args, **cfg}
            for name, cfg in models.items()
        }
        (home / "models.yaml").write_text(yaml.safe_dump(entries))
        self.daemon = start_daemon(home, self.port, {**self.base_env, "VLLAMA_HOME": str(home), **env})
        devices = [
            {k: d[k] for k in ("index", "nvml_index", "uuid", "total_bytes")}
            for d in self.get("/vllama/info")["devices"]
        ]
        self.record(f"{phase}: vllama started", env=env, vllama_devices=devices, gpus=self.gpus())
        self.log(f"- vllama started ({env or 'no CUDA_VISIBLE_DEVICES'}): its devices {devices}")

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def ps(self) -> dict[str, dict[str, Any]]:
        return {r["model"]: r for r in self.get("/vllama/ps")["models"]}

    def placement(self) -> dict[str, str]:
        """model → "state on devices" (vllama's numbers), e.g. "running [0, 1]", "sleeping(L2) [1]"."""
        out = {}
        for name, r in sorted(self.ps().items()):
            level = f"(L{r['sleep_level']})" if r.get("sleep_level") else ""
            out[name] = f"{r['state']}{level} {r['devices']}"
        return out

    def state(self, model: str) -> str:
        return self.placement().get(model, "absent").split(" ")[0]

    def wait_for_spares(self, n: int, timeout: float = 300.0) -> float:
        """Wait (bounded) until `n` warm spares are ready, so the next start is a pooled one, as in service."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            pool = self.get("/vllama/info").get("warm_pool") or {}
            ready = sum(1 for s in pool.get("spares", []) if s.get("state") == "ready")
            if ready >= n or pool.get("size", 0) == 0 or pool.get("gave_up"):
                break
            time.sleep(0.5)
        return round(time.perf_counter() - t0, 1)

    def chat(self, model: str) -> float:
        """One chat request; a failure is recorded (the run goes on)."""
        self.requests += 1
        t0 = time.perf_counter()
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        try:
            r = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT)
            ok, detail = r.status_code == 200, f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            ok, detail = False, repr(exc)
        dt = round(time.perf_counter() - t0, 2)
        if not ok:
            self.failed.append(f"{model}: {detail}")
            self.log(f"  request to {model} FAILED after {dt} s: {detail}")
        return dt

    def step(self, name: str, *models: str, concurrent: bool = False) -> dict[str, float]:
        """Request each model (at once when `concurrent`), then record the placement and NVML's readings."""
        seconds: dict[str, float] = {}
        if concurrent:
            threads = [threading.Thread(target=lambda m=m: seconds.__setitem__(m, self.chat(m))) for m in models]
            for t in threads:
                t.start()
                time.sleep(0.3)  # in this order: the first is the least recently used
            for t in threads:
                t.join(REQUEST_TIMEOUT + 30)
        else:
            for m in models:
                seconds[m] = self.chat(m)
        where = self.placement()
        gpus = self.gpus()
        started_by = {m: r.get("started_by") for m, r in self.ps().items()}  # the warm pool, or why not
        self.record(name, request_seconds=seconds, placement=where, gpus=gpus, started_by=started_by)
        used = ", ".join(f"GPU {g['gpu']} {g['used_gib']} GiB used" for g in gpus["gpus"])
        self.log(f"- {name}: requests {seconds}; {where}; NVML: {used}; processes {gpus['processes']}")
        return seconds

    # --- NVML ---------------------------------------------------------------------------------------------

    def gpus(self) -> dict[str, Any]:
        """Every GPU of the host (not only vllama's): memory used and the processes holding memory."""
        per_gpu = [
            {"gpu": d.index, "used_gib": gib(d.total - d.free), "free_gib": gib(d.free)} for d in self.host.devices()
        ]
        procs = {str(pid): {str(g): gib(n) for g, n in m.items()} for pid, m in self.host.process_memory().items()}
        return {"gpus": per_gpu, "processes": procs}

    def processes_on(self, gpu: int) -> list[str]:
        return [pid for pid, per_gpu in self.gpus()["processes"].items() if str(gpu) in per_gpu]

    def gpu_processes_left(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            procs = self.gpus()["processes"]
            if not procs or time.monotonic() > deadline:
                return dict(procs)
            time.sleep(0.5)

    # --- stopping -----------------------------------------------------------------------------------------

    def stop_daemon(self, sig: int) -> float:
        assert self.daemon is not None
        return signal_and_wait(self.daemon, sig)

    def clean_up(self) -> None:
        """Whatever happened: stop vllama, then kill what its guards still run (only this run's: a guard names
        its vllama's pid)."""
        if self.daemon is None:
            return
        pid = self.daemon.pid
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        time.sleep(1.0)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "vllama.guard" in cmd and "--parent" in cmd and cmd[cmd.index("--parent") + 1 :][:1] == [str(pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.info["pid"], signal.SIGKILL)
                    self.log(f"  clean-up: killed the process group of guard {proc.info['pid']}")

    def save_logs(self) -> None:
        parts = []
        for home in self.homes:
            for f in sorted(home.rglob("*.log")):
                parts.append(f"===== {home.name}/{f.relative_to(home)}\n" + f.read_text(errors="replace")[-30000:])
        (self.out / "multi-logs.txt").write_text("\n".join(parts))


# --- phase 1: vllama on both GPUs ----------------------------------------------------------------------------


def phase_both(run: Multi) -> None:
    run.log("")
    run.log("## Phase 1: vllama sees both GPUs")
    run.log("A on GPU 0 (0.30), B on GPU 1 (0.20), T tensor-parallel on both (0.25), C anywhere (0.25), D on GPU 1")
    run.log("(0.35); fractions of each GPU's total; eviction = sleep level 2.")
    run.start(
        "both",
        {
            "A": {"devices": [0], "gpu_memory_utilization": 0.30},
            "B": {"devices": [1], "gpu_memory_utilization": 0.20},
            "T": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.25, "model": run.tp_source},
            "C": {"gpu_memory_utilization": 0.25},
            "D": {"devices": [1], "gpu_memory_utilization": 0.35},
        },
    )
    run.wait_for_spares(2)
    run.step("A and B cold start at once (A first)", "A", "B", concurrent=True)
    run.check("A on GPU 0 and B on GPU 1, both running", run.placement() == {"A": "running [0]", "B": "running [1]"})

    run.wait_for_spares(1)
    run.step("T (tensor_parallel_size 2) cold start", "T")
    run.check("T runs on both GPUs", run.placement().get("T") == "running [0, 1]")
    t_pids_on = {g: set(run.processes_on(g)) for g in (0, 1)}
    run.check("NVML: processes hold memory on both GPUs", all(t_pids_on.values()))

    run.wait_for_spares(1)
    run.step("C cold start, automatic placement", "C")
    run.check("C goes to GPU 1 (GPU 0 holds A 0.30 + T, GPU 1 holds B 0.20 + T): no eviction",
              run.placement().get("C") == "running [1]" and run.get("/vllama/info")["evictions"] == 0)  # fmt: skip

    run.wait_for_spares(1)
    run.step("D on GPU 1 (0.35) does not fit there", "D")
    where = run.placement()
    run.check(
        "per-device eviction: B (GPU 1's least recently used) sleeps; A (GPU 0, least recently used overall) and T run",
        where.get("B", "").startswith("sleeping")
        and where.get("A") == "running [0]"
        and where.get("T") == "running [0, 1]"
        and where.get("D") == "running [1]",
    )

    before = {g["gpu"]: g["used_gib"] for g in run.gpus()["gpus"]}
    run.step("B again: room on GPU 1", "B")
    where = run.placement()
    after = {g["gpu"]: g["used_gib"] for g in run.gpus()["gpus"]}
    run.record("GPU 0 memory around B's wake", before=before, after=after)
    run.check(
        "T (GPU 1's least recently used) sleeps for B and frees GPU 0 too (a TP model counts on both); A runs",
        where.get("T", "").startswith("sleeping")
        and where.get("B") == "running [1]"
        and where.get("A") == "running [0]"
        and after[0] < before[0] - 5,
    )

    run.step("T again: wakes on both GPUs", "T")
    where = run.placement()
    run.check(
        "T wakes on both GPUs; C (GPU 1's least recently used) sleeps; A untouched",
        where.get("T") == "running [0, 1]"
        and where.get("C", "").startswith("sleeping")
        and where.get("A") == "running [0]",
    )

    run.step("every running model once more", "A", "B", "D", "T")
    took = run.stop_daemon(signal.SIGTERM)
    left = run.gpu_processes_left(30)
    run.record("SIGTERM to vllama", seconds=took, gpu_processes_after=left, gpus=run.gpus())
    run.log(f"- SIGTERM: vllama exited in {took} s; GPU processes left {left}")
    run.check("after SIGTERM of vllama no GPU process is left on either GPU", not left)


# --- phase 2: vllama restricted to GPU 1 ---------------------------------------------------------------------


def phase_gpu1(run: Multi) -> None:
    run.log("")
    run.log("## Phase 2: vllama started with CUDA_VISIBLE_DEVICES=1")
    run.log("E and F at 0.60 each (of GPU 1): they do not fit together, so they evict each other, on GPU 1 only.")
    gpu0_before = next(g["used_gib"] for g in run.gpus()["gpus"] if g["gpu"] == 0)
    run.start(
        "gpu1",
        {
            "E": {"gpu_memory_utilization": 0.60},
            "F": {"gpu_memory_utilization": 0.60},
            "T": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.25, "model": run.tp_source},
            "on1": {"devices": [1], "gpu_memory_utilization": 0.2},
        },
        CUDA_VISIBLE_DEVICES="1",
    )
    (dev,) = run.get("/vllama/info")["devices"]
    run.check("vllama has one device, vllama's 0 = NVML GPU 1", (dev["index"], dev["nvml_index"]) == (0, 1))

    run.wait_for_spares(1)
    run.step("E cold start", "E")
    run.wait_for_spares(1)
    run.step("F cold start: E sleeps", "F")
    run.step("E again: F sleeps, E wakes", "E")
    where = run.placement()
    run.check(
        "E and F evicted each other on vllama's device 0",
        where.get("E") == "running [0]" and where.get("F", "").startswith("sleeping"),
    )
    refused = {}
    for model in ("T", "on1"):
        r = httpx.post(
            f"{run.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=60,
        )
        refused[model] = f"{r.status_code} {r.json().get('error', {}).get('message', '')[:200]}"
    run.record("refused: a TP-2 model and a model on device 1, with one device", refused=refused)
    run.log(f"- with one device: {refused}")
    run.check(
        "a TP-2 model and a model on device [1] are refused with a reason (503), not placed on GPU 0",
        all(v.startswith("503") for v in refused.values()),
    )

    gpus = run.gpus()
    gpu0_now = next(g["used_gib"] for g in gpus["gpus"] if g["gpu"] == 0)
    run.check(
        "NVML: no process on GPU 0, and GPU 0's memory did not grow (vllama used GPU 1 only)",
        not run.processes_on(0) and gpu0_now <= gpu0_before + 0.5 and bool(run.processes_on(1)),
    )

    run.record("before SIGKILL", gpus=gpus)
    took = run.stop_daemon(signal.SIGKILL)
    left = run.gpu_processes_left(60)
    run.record("SIGKILL to vllama", seconds=took, gpu_processes_after=left, gpus=run.gpus())
    run.log(f"- SIGKILL: GPU processes left after up to 60 s: {left}")
    run.check("after SIGKILL of vllama no GPU process is left (its guards stopped the engines)", not left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fake", action="store_true", help="dry run over fake engines and two simulated GPUs")
    parser.add_argument("--deadline", type=int, default=570, help="stop (cleanly) after this many seconds")
    args = parser.parse_args()
    exit_on_sigterm()

    def out_of_time(signum: int, frame: object) -> None:
        raise SystemExit(f"deadline of {args.deadline} s reached")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(args.deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Multi(args)
    t0 = time.perf_counter()
    try:
        if run.host.process_memory():
            run.log(f"warning: GPU processes before the run: {run.gpus()['processes']}")
        phase_both(run)
        run.clean_up()
        phase_gpu1(run)
    except BaseException as exc:
        run.log(f"- ABORTED: {exc!r}")
        run.report["aborted"] = repr(exc)
        raise
    finally:
        signal.alarm(0)
        run.clean_up()
        run.report["requests"] = run.requests
        run.report["failed_requests"] = run.failed
        run.report["checks"] = {**run.report.get("checks", {}), "every request answered": not run.failed}
        run.report["seconds"] = round(time.perf_counter() - t0, 1)
        run.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.log(f"- {run.requests} requests, {len(run.failed)} failed; {run.report['seconds']} s in all")
        run.save_logs()
        run.flush()
    passed = all(run.report["checks"].values())
    print(f"{'ALL CHECKS PASSED' if passed else 'SOME CHECKS FAILED'}: {run.out}/multi.md", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
