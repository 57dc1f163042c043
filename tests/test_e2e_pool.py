"""End to end with real vLLM (the CPU build): a cold start handed to the warm pool's pre-imported interpreter, with
memory auto-sizing, behind a real `vllama serve`. One real vLLM start: it answers, its output is in its own log,
its EngineCore and worker were forked (not re-imported) with vLLM's CPU binding kept, and stopping it (and then
vllama) leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import Daemon, base_env, free_port, wait_until_gone
from vllama.offline_models import prepare

pytestmark = pytest.mark.vllm

TINY = "tiny-chat"


def test_pooled_cold_start_of_real_vllm(tmp_path: Path) -> None:
    dest = Path(os.environ.get("VLLAMA_TEST_MODELS", "~/.cache/vllama/models")).expanduser()
    tiny = prepare(dest, ["tiny"])["tiny"]
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(home, VLLAMA_GPU_PROBE="cpu", VLLAMA_CPU_MEMORY_GIB="10", VLLAMA_STARTUP_TIMEOUT="400")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # auto-sizing gives the KV cache size by flag
    daemon = Daemon(home=home, port=free_port(), env=env)
    daemon.write_models(
        {TINY: {"model": str(tiny), "max_model_len": 512, "memory": "auto", "extra_args": ["--enforce-eager"]}}
    )
    daemon.start()
    try:
        with daemon.client(timeout=600) as c:
            deadline = time.monotonic() + 300
            while True:
                pool = c.get("/vllama/info").json()["warm_pool"]
                ready = [s for s in pool["spares"] if s["state"] == "ready"]
                if ready:
                    break
                assert time.monotonic() < deadline and not pool["gave_up"], pool
                time.sleep(0.5)
            spare_pid = ready[0]["pid"]

            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "Hi"}]})
            took = time.monotonic() - t0
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] is not None
            row = next(m for m in c.get("/vllama/ps").json()["models"] if m["model"] == TINY)
            assert row["state"] == "running" and row["started_by"] == "warm pool"
            assert row["pid"] == spare_pid  # the spare became the server
            assert str(row["memory_sizing"]).startswith("auto memory:")
            kv = row["memory_estimate"]["kv_cache"]

            # its output is in its own log, from the hand-off on: no import noise, the server's own lines
            log = Path(row["log"])
            assert log.parent == home / "logs" and log.name.startswith(f"{TINY}_")
            text = log.read_text()
            assert text.startswith("# vllama: ") and f"--kv-cache-memory-bytes {kv}" in text.splitlines()[0]
            assert "warm pool: taken by pre-imported interpreter" in text
            assert "non-default args" in text and "kv_cache_memory_bytes" in text
            assert "GiB for KV cache" in text  # vLLM took the size given, not VLLM_CPU_KVCACHE_SPACE
            # EngineCore and the worker were forked from the pre-imported server, in the instance's group
            server = psutil.Process(spare_pid)
            group = {p.pid: p for p in [server, *server.children(recursive=True)]}
            names = {" ".join(p.cmdline())[:40] for p in group.values()}
            assert any("VLLM::EngineCore" in n for n in names) and any("VLLM::Worker" in n for n in names), names
            assert {os.getpgid(pid) for pid in group} == {os.getpgid(spare_pid)}
            # vLLM's OpenMP binding for the worker was re-applied after the fork
            cores = re.search(r"local_rank=0, core ids=\[([\d, ]+)\]", text)
            worker = next(p for p in group.values() if "VLLM::Worker" in " ".join(p.cmdline()))
            if cores:
                assert worker.cpu_affinity() == [int(x) for x in cores.group(1).split(",")]
            assert worker.nice() == psutil.Process().nice()  # the spare's low priority did not stick
            print(f"pooled cold start to the first answer: {took:.1f} s")

            pgid = os.getpgid(spare_pid)
            assert c.post("/vllama/stop", json={"model": TINY}).status_code == 200
            assert not wait_until_gone({pgid}, 30)
    finally:
        groups = daemon.child_groups()
        daemon.stop(signal.SIGTERM)
    assert not wait_until_gone(groups, 30)  # the refilled spare too
