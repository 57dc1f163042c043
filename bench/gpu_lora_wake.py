"""What vLLM does to a loaded LoRA adapter across a level-2 sleep and wake (issue 17), on the GPU machine.

Bare vLLM (no vllama): a tiny random Llama and a random rank-8 adapter built offline (vllama.offline_models),
greedy answers of the base and the adapter before the sleep, after the level-2 wake (weights reloaded, as
vllama does), and after loading the adapter again in place — so it says whether vllama's reload after a
level-2 wake is needed.

    python3 bench/gpu_lora_wake.py --model DIR --adapter DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PORT = 8011
URL = f"http://127.0.0.1:{PORT}"


def answer(c: httpx.Client, model: str) -> str:
    body = {"model": model, "prompt": "Hello there, how", "max_tokens": 12, "temperature": 0}
    r = c.post(f"{URL}/v1/completions", json=body, timeout=60)
    return f"{r.status_code} {r.json()['choices'][0]['text']!r}" if r.status_code == 200 else f"{r.status_code}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model.absolute()),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(PORT), "--enable-sleep-mode",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--enforce-eager",
        "--gpu-memory-utilization", "0.2", "--max-model-len", "512",
        *shlex.split(os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "")),
    ]  # fmt: skip
    report: dict[str, Any] = {"argv": argv}
    log = (args.out / "vllm.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    try:
        with httpx.Client() as c:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"vLLM exited with {proc.returncode}: see {args.out / 'vllm.log'}")
                try:
                    if c.get(f"{URL}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            report["ready_s"] = round(time.monotonic() - t0, 1)
            load = {"lora_name": "lora1", "lora_path": str(args.adapter.absolute())}
            report["load"] = c.post(f"{URL}/v1/load_lora_adapter", json=load, timeout=60).status_code
            report["before"] = {"base": answer(c, "tiny"), "adapter": answer(c, "lora1")}
            report["sleep_l2"] = c.post(f"{URL}/sleep?level=2", timeout=60).status_code
            wake = [
                c.post(f"{URL}/wake_up?tags=weights", timeout=60).status_code,
                c.post(f"{URL}/collective_rpc", json={"method": "reload_weights"}, timeout=120).status_code,
                c.post(f"{URL}/wake_up?tags=kv_cache", timeout=60).status_code,
                c.post(f"{URL}/reset_prefix_cache", timeout=60).status_code,
            ]
            report["wake_l2"] = wake
            report["models_after_wake"] = [m["id"] for m in c.get(f"{URL}/v1/models", timeout=10).json()["data"]]
            report["after_wake"] = {"base": answer(c, "tiny"), "adapter": answer(c, "lora1")}
            again = c.post(f"{URL}/v1/load_lora_adapter", json={**load, "load_inplace": True}, timeout=60)
            report["reload_inplace"] = again.status_code
            report["after_reload"] = {"base": answer(c, "tiny"), "adapter": answer(c, "lora1")}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
    b, w, r = report["before"], report["after_wake"], report["after_reload"]
    report["adapter_differs_from_base"] = b["adapter"] != b["base"]
    report["adapter_kept_across_l2"] = w["adapter"] == b["adapter"]
    report["adapter_right_after_reload"] = r["adapter"] == b["adapter"]
    (args.out / "lora-wake.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
