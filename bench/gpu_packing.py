"""How many models are resident (running, all answering) at once on one GPU: vLLM's default memory fraction
against vllama's memory auto-sizing (`VLLAMA_AUTO_MEMORY=1`, vllama/sizing.py), with each model's estimate
against what NVML measures for it.

Runs on the lent GPU machine with models made by `make_models.py` (see bench/README.md for the device calls):
    python3 .gpu-b/make_models.py /tmp/models a=135m b=1b c=3b
    python3 bench/gpu_packing.py --models-dir /tmp/models --phase default --out $OUT
    python3 bench/gpu_packing.py --models-dir /tmp/models --phase auto --out $OUT
and locally as a dry run over fake engines on a simulated 80 GiB GPU (model folders with real configs and
sparse weight files of the real sizes are made in a temporary folder):
    python bench/gpu_packing.py --fake --out /tmp/packing-dry

Each phase starts a fresh `vllama serve`, loads the models one after another in the order given (a request each;
a model that does not fit evicts the least recently used idle one), then asks every model that is still
running once more: the ones that answer without any new eviction are resident together. Every step is written
to OUT/packing-<phase>.json and .md as it goes; the vLLM logs' tails to OUT/packing-<phase>-logs.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import StepReport, exit_on_sigterm, start_daemon  # noqa: E402
from vllama.gpu import GIB, LedgerProbe, NvmlProbe  # noqa: E402

# make_models.py's shapes on SmolLM2's config (for --fake: config.json and a sparse weights file of the real size)
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", "head_dim": 64, "hidden_size": 576,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "tie_word_embeddings": True, "vocab_size": 49152,
}  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128},
    "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
           "num_key_value_heads": 8, "head_dim": 128},
}  # fmt: skip
FAKE_SET = "a=135m,b=1b,c=3b,d=135m,e=1b,f=3b"


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def make_fake_models(root: Path, spec: str) -> list[str]:
    from vllama.sizing import parameter_count

    names = []
    for part in spec.split(","):
        name, size = part.split("=")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {**SMOLLM2, **SHAPES[size]}
        (folder / "config.json").write_text(json.dumps(config))
        with (folder / "model.safetensors").open("wb") as f:
            f.truncate(parameter_count(config) * 2)  # bf16, sparse: no disk used
        names.append(name)
    return names


class Run(StepReport):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            args.out, f"packing-{args.phase}", f"# vllama GPU packing: phase `{args.phase}`", phase=args.phase
        )
        self.args = args
        self.phase = args.phase
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-packing-"))
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.port = 33258
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_") or k == "VLLAMA_GPU_BUNDLE_ARGS"}
        self.env.update(
            {
                "VLLAMA_HOME": str(self.home),
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                "VLLAMA_AUTO_MEMORY": "1" if self.phase == "auto" else "0",
                "VLLAMA_AUTO_MEMORY_SEQUENCES": str(args.sequences),
            }
        )
        if args.fake:
            ledger = self.tmp / "ledger"
            ledger.mkdir()
            self.probe: Any = LedgerProbe(ledger, [80 * GIB])
            self.models_dir = self.tmp / "models"
            self.names = make_fake_models(self.models_dir, args.models or FAKE_SET)
            self.env.update(
                {
                    "VLLAMA_GPU_PROBE": "fake",
                    "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
                    "VLLAMA_FAKE_GPU_TOTAL_GIB": "80",
                    "VLLAMA_VLLM_COMMAND": f"{sys.executable} -m vllama.testing.fake_engine",
                    "VLLAMA_POOL_MODULES": "vllama.testing.fake_engine",  # the warm pool works on fake engines too
                    "FAKE_ENGINE_STARTUP_S": "1",
                    "FAKE_ENGINE_CONTEXT_GIB": "0.8",
                }
            )
        else:
            self.probe = NvmlProbe()
            self.models_dir = args.models_dir
            wanted = [p.split("=")[0] for p in args.models.split(",")] if args.models else None
            found = sorted(p.name for p in self.models_dir.iterdir() if (p / "config.json").is_file())
            self.names = [n for n in (wanted or found) if n in found]
            if not self.names:
                raise SystemExit(f"no models in {self.models_dir} (make them with make_models.py)")
            self.env["VLLAMA_GPU_PROBE"] = "nvml"
        self.vllm_args = [*shlex.split(os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "")), *shlex.split(args.extra_args)]

    # --- the daemon ---------------------------------------------------------------------------------------

    def write_models(self) -> None:
        models = {n: {"model": str(self.models_dir / n), "extra_args": self.vllm_args} for n in self.names}
        (self.home / "models.yaml").write_text(yaml.safe_dump(models))

    def ps(self) -> dict[str, dict[str, Any]]:
        return {r["model"]: r for r in httpx.get(f"{self.url}/vllama/ps", timeout=30).json()["models"]}

    def info(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/vllama/info", timeout=30).json())

    def gpu(self) -> dict[str, Any]:
        dev = self.probe.devices()[0]
        return {"total_gib": gib(dev.total), "used_gib": gib(dev.total - dev.free), "free_gib": gib(dev.free)}

    def chat(self, model: str) -> tuple[int, float, str]:
        t0 = time.perf_counter()
        r = httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=900,
        )
        return r.status_code, round(time.perf_counter() - t0, 2), r.text[:300]

    def running(self) -> list[str]:
        return sorted(m for m, r in self.ps().items() if r["state"] == "running")

    def measured(self, row: dict[str, Any]) -> int | None:
        """What NVML (or the fake ledger) says the instance's processes hold, when measured."""
        memory = row.get("memory_bytes") or {}
        values = [int(v) for v in memory.values()]
        return max(values) if values and row["state"] in ("running", "sleeping") else None

    def wait_for_spare(self, timeout: float = 600.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            pool = self.info().get("warm_pool") or {}
            if pool.get("size", 0) == 0 or pool.get("gave_up") or any(s["state"] == "ready" for s in pool["spares"]):
                return round(time.perf_counter() - t0, 1)
            time.sleep(0.5)
        return round(time.perf_counter() - t0, 1)


def run_phase(run: Run) -> None:
    run.write_models()
    run.daemon = start_daemon(run.home, run.port, run.env)
    run.log(
        f"- models (in load order): {', '.join(run.names)}; memory: "
        + ("auto-sized" if run.phase == "auto" else "vLLM's default (0.9 of the GPU per model)")
        + f"; KV cache sized for {run.args.sequences} sequences of max_model_len; vLLM args: {' '.join(run.vllm_args)}"
    )
    run.record("gpu_before", **run.gpu())
    run.record("spare_ready", waited_s=run.wait_for_spare())

    loads = []
    for name in run.names:
        evictions_before = run.info()["evictions"]
        code, seconds, text = run.chat(name)
        running = run.running()
        row = run.ps()[name]
        info = run.info()
        loads.append({"model": name, "status": code, "seconds": seconds, "running_after": running})
        run.record(
            "load",
            model=name,
            status=code,
            seconds=seconds,
            error=None if code == 200 else text,
            started_by=row.get("started_by"),
            need_gib=gib(row.get("need_bytes")),
            evicted=info["evictions"] - evictions_before,
            running=running,
            gpu=run.gpu(),
        )
        run.wait_for_spare()  # the pool's refill does not overlap the next start

    time.sleep(3.0)  # let NVML's numbers settle
    rows = run.ps()
    evictions_before = run.info()["evictions"]
    resident = run.running()
    answers = {m: run.chat(m)[0] for m in resident}
    still = run.running()
    new_evictions = run.info()["evictions"] - evictions_before
    all_answer = all(c == 200 for c in answers.values()) and still == resident and new_evictions == 0
    per_model = {}
    for name in run.names:
        row = rows.get(name, {})
        need, held = row.get("need_bytes"), run.measured(row)
        per_model[name] = {
            "state": row.get("state"),
            "estimate_gib": gib(need),
            "measured_gib": gib(held),
            "measured_over_estimate": round(held / need, 3)
            if need and held and row.get("state") == "running"
            else None,
            "gpu_memory_utilization": row.get("gpu_memory_utilization"),
            "sizing": row.get("memory_sizing"),
            "estimate_parts_gib": {
                k: gib(v)
                for k, v in (row.get("memory_estimate") or {}).items()
                if k in ("context", "weights", "kv_cache", "activations", "overhead", "total")
            },
        }
    run.report["result"] = {
        "resident": len(resident) if all_answer else len([m for m, c in answers.items() if c == 200]),
        "resident_models": resident,
        "all_answering": all_answer,
        "answers": answers,
        "evictions_during_loads": run.info()["evictions"],
        "gpu": run.gpu(),
        "models": per_model,
    }
    run.record("resident", **run.report["result"])
    first = run.names[0]
    if rows.get(first, {}).get("state") != "running":
        # the first model was evicted (asleep, or stopped): bring it back, as a request would (wake or restart)
        state = rows.get(first, {}).get("state")
        code, seconds, text = run.chat(first)
        run.report["result"]["back"] = {"model": first, "was": state, "status": code, "seconds": seconds}
        run.record("back", model=first, was=state, status=code, seconds=seconds, error=None if code == 200 else text)

    run.log("")
    run.log(
        f"**{len(resident)} of {len(run.names)} models resident at once"
        + (", all answering without an eviction" if all_answer else " (NOT all answering)")
        + f"**; GPU used {run.gpu()['used_gib']} of {run.gpu()['total_gib']} GiB."
    )
    run.log("")
    run.log(
        "| model | load (s) | started by | state at the end | estimate (GiB) | measured (GiB) | measured/estimate |"
    )
    run.log("|---|---|---|---|---|---|---|")
    for load in loads:
        name = load["model"]
        m = per_model[name]
        step = next(s for s in run.report["steps"] if s["step"] == "load" and s["model"] == name)
        run.log(
            f"| {name} | {load['seconds']} | {step.get('started_by') or ''} | {m['state']} | {m['estimate_gib']} "
            f"| {m['measured_gib']} | {m['measured_over_estimate'] or ''} |"
        )
    back = run.report["result"].get("back")
    if back:
        run.log("")
        run.log(f"Asking {back['model']} again (it was {back['was']}): HTTP {back['status']} in {back['seconds']} s.")
    if run.phase == "auto":
        run.log("")
        run.log("Estimates (vllama/sizing.py):")
        for name, m in per_model.items():
            run.log(f"- {name}: {m['sizing']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["default", "auto"], required=True)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument(
        "--models", default="", help="comma list of model folder names (in load order); --fake: NAME=SIZE"
    )
    parser.add_argument("--sequences", type=int, default=4, help="KV cache: sequences of max_model_len (auto)")
    parser.add_argument("--extra-args", default="--enforce-eager", help="more vLLM flags for every model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fake", action="store_true", help="dry run over fake engines and a simulated GPU")
    args = parser.parse_args()
    exit_on_sigterm()
    run = Run(args)
    run.report["machine"] = "fake (dry run)" if args.fake else run.probe.devices()[0].name
    run.report["command"] = "python3 bench/gpu_packing.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        run_phase(run)
    finally:
        if run.daemon and run.daemon.poll() is None:
            run.daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.daemon.wait(120)
        parts = [f"===== {f.name}\n" + f.read_text(errors="replace")[-20000:] for f in sorted(run.home.rglob("*.log"))]
        (run.out / f"packing-{run.phase}-logs.txt").write_text("\n".join(parts))
        run.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.flush()
    result = run.report.get("result", {})
    return 0 if result.get("all_answering") and result.get("back", {}).get("status", 200) == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
