"""Cold start through vllama against a bare `python -m vllm.entrypoints.openai.api_server` of the same model with
the same flags, alternating, in one run: spawn (or request) → first streamed token, with per-phase times read
from each start's log as it is written.

    python bench/cold_start.py --model PATH [--kinds bare,pool] [--rounds 3] [--device cpu|cuda]
                               [--extra-args "--enforce-eager"] [--out bench/results]

Kinds: `bare` (vLLM by hand), `pool` (through vllama, the start handed to a pre-imported interpreter of the warm
pool), `vllama` (through vllama, `prewarm: false`: a fresh interpreter, as before the pool), `b2b` (back to back:
model M's start, then at once, as its first token arrives, another model's start: the second one is timed), `first`
(the first request right after a fresh `vllama serve` answers /health, its spares still importing). Before each
start but `first` the run waits until the pool has `--pool-size` ready spares again. A warm-up start (bare, not
counted) first fills the OS page cache and vLLM's compile cache; `--no-warmup` skips it.

On CPU this uses vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE=1, as vllama sets by default); on a GPU, the
`--enable-sleep-mode` vllama adds there. `$VLLAMA_GPU_BUNDLE_ARGS` (the GPU bundle's required flags) is appended
to the extra arguments when set. Only the standard library, httpx, PyYAML and vllama: no pytest needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
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

from bench.common import exit_on_sigterm, first_token, start_daemon, wait_healthy  # noqa: E402

# the first log line of each phase of a vLLM start (vLLM 0.26 on GPUs, 0.32 CPU build)
PHASES = [
    ("args", re.compile(r"non-default args")),  # the API server has imported everything and parsed its flags
    ("engine_core", re.compile(r"EngineCore.*Initializing a V1 LLM engine|Initializing a V1 LLM engine")),
    ("worker", re.compile(r"\((?:Worker|VllmWorker)[^)]*pid=")),  # a worker process (CPU build, TP > 1)
    ("weights", re.compile(r"Loading weights took|Model loading took")),
    ("compiled", re.compile(r"torch\.compile takes|Compil(?:ing|ed) a graph|Directly load the compiled|saved AOT")),
    ("engine_ready", re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
    ("server_up", re.compile(r"Starting vLLM (?:API )?server|Application startup complete")),
]
KINDS = ("bare", "pool", "vllama", "b2b", "first")
MODEL_OF = {"pool": "M", "vllama": "P", "b2b": "N", "first": "M"}
POOLED = ("pool", "b2b", "first")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LogWatcher(threading.Thread):
    """Stamps the first line of each phase written after it started, in the files of `folder` whose names start
    with `prefix` (a vllama instance's log gets its port in its name) or in one file."""

    def __init__(self, folder: Path, prefix: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.folder, self.prefix, self.t0 = folder, prefix, t0
        self.offsets = {p: p.stat().st_size for p in self._files()}
        self.stamps: dict[str, float] = {}
        self.header: str | None = None
        self.done = threading.Event()

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir() if p.name.startswith(self.prefix) and p.suffix == ".log"]

    def poll(self) -> None:
        for path in self._files():
            start = self.offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = start + len(complete)
            now = round(time.perf_counter() - self.t0, 2)
            for line in complete.decode(errors="replace").splitlines():
                if "warm pool: taken by" in line:
                    self.header = line.split("# vllama: ", 1)[-1]
                for name, pattern in PHASES:
                    if name not in self.stamps and pattern.search(line):
                        self.stamps[name] = now

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            time.sleep(0.05)
        self.poll()

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join(5)
        return dict(sorted(self.stamps.items(), key=lambda kv: kv[1]))


def decode_rate(base: str, model: str, tokens: int) -> float | None:
    """Tokens per second of one greedy `tokens`-token completion (0 tokens: not measured)."""
    if tokens <= 0:
        return None
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    httpx.post(f"{base}/v1/completions", json=body, timeout=600).raise_for_status()
    return round(tokens / (time.perf_counter() - t0), 1)


def bare(model: str, args: list[str], env: dict[str, str], tmp: Path, decode: int = 0) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "M", "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
    log = tmp / f"bare-{port}.log"
    log.touch()
    t0 = time.perf_counter()
    watcher = LogWatcher(tmp, log.name, t0)
    watcher.offsets[log] = 0
    watcher.start()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc, log)
        ready = time.perf_counter() - t0
        ttft, _ = first_token(base, "M")
        took = ready + ttft
        phases = watcher.stop()
        rate = decode_rate(base, "M", decode)
        return {
            "seconds": round(took, 2),
            "ready": round(ready, 2),
            "phases": phases,
            "decode_tok_s": rate,
            "log": str(log),
        }
    finally:
        watcher.done.set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        time.sleep(2)  # let memory come back before the next start


def via_vllama(url: str, home: Path, model: str, decode: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    watcher = LogWatcher(home / "logs", f"{model}_", t0)
    watcher.start()
    try:
        took, _ = first_token(url, model)
    finally:
        phases = watcher.stop()
    rate = decode_rate(url, model, decode)
    row = httpx.get(f"{url}/vllama/ps", timeout=30).json()["models"]
    mine = next((r for r in row if r["model"] == model), {})
    httpx.post(f"{url}/vllama/stop", json={"model": model}, timeout=120).raise_for_status()
    time.sleep(2)
    return {
        "seconds": round(took, 2),
        "phases": phases,
        "decode_tok_s": rate,
        "started_by": mine.get("started_by"),
        "spare": watcher.header,
        "log": mine.get("log"),
    }


def back_to_back(url: str, home: Path, decode: int = 0) -> dict[str, Any]:
    """M's start, then N's as soon as M's first token is there: N's start is the one timed."""
    first, _ = first_token(url, "M")
    result = via_vllama(url, home, "N", decode)
    httpx.post(f"{url}/vllama/stop", json={"model": "M"}, timeout=120).raise_for_status()
    return {**result, "before_it": {"model": "M", "seconds": round(first, 2)}}


def first_after_serve(home: Path, env: dict[str, str], decode: int = 0) -> dict[str, Any]:
    """A fresh `vllama serve`; M requested as soon as /health answers (the spares are still importing)."""
    port = free_port()
    daemon = start_daemon(home, port, env)
    try:
        return via_vllama(f"http://127.0.0.1:{port}", home, "M", decode)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)


def wait_for_spare(url: str, count: int = 1, timeout: float = 600.0) -> float:
    """Wait until the warm pool has `count` ready spares (a refill after the last start); the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        pool = httpx.get(f"{url}/vllama/info", timeout=30).json().get("warm_pool") or {}
        if sum(s["state"] == "ready" for s in pool.get("spares", [])) >= count:
            return round(time.perf_counter() - t0, 1)
        if pool.get("gave_up"):
            raise RuntimeError(f"the warm pool gave up: {pool}")
        time.sleep(0.5)
    raise RuntimeError("no ready spare in the warm pool")


def render(report: dict[str, Any]) -> str:
    rows, med = report["rows"], report["median_seconds"]
    names = [name for name, _ in PHASES if any(name in r["phases"] for r in rows)]
    lines = [
        "# Cold start: bare vLLM vs through vllama (spawn or request → first streamed token)",
        "",
        f"- date: {report['date']}; machine: {report['machine']}; device {report['device']}; "
        f"load average at the end {report['load_end']:.2f}",
        f"- command: `{report['command']}`",
        f"- warm pool: {report['pool_size']} spares, fork {'on' if report['pool_fork'] else 'off'}; spare imports "
        f"took {report.get('spare_import_seconds')} s (in the background, before the start but for `first`)",
        "- kinds: bare = vLLM by hand; pool = through vllama, a ready spare; vllama = through vllama, `prewarm: "
        "false`; b2b = through vllama, a second model right after another's start; first = the first request "
        "right after `vllama serve` is up",
        "",
        "Seconds from the spawn (bare) or the request (vllama) to the first line of each phase in the log, to the "
        "server's /health (bare) and to the first streamed token:",
        "",
        "| round | kind | " + " | ".join(names) + " | first token | decode tok/s | started by |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
        *[
            f"| {r['round']} | {r['kind']} | "
            + " | ".join(str(r["phases"].get(n, "")) for n in names)
            + f" | **{r['seconds']}** | {r.get('decode_tok_s') or ''} | {r.get('started_by') or ''} |"
            for r in rows
        ],
        "",
        "Phases: args = the API server has imported vLLM and parsed its flags; engine_core / worker = the first line "
        "of the EngineCore / worker process; weights = weights loaded; engine_ready = KV cache made and warmed up; "
        "server_up = the HTTP server starts.",
        "",
    ]
    if report.get("warmup"):
        lines += [f"Warm-up start (bare, not counted): {report['warmup']['seconds']} s.", ""]
    parts = [f"{k} {v:.1f} s" for k, v in med.items()]
    ratios = [f"{k}/bare {med[k] / med['bare']:.2f}×" for k in med if k != "bare" and "bare" in med]
    lines.append(f"**Median: {', '.join(parts)}" + (f" ({', '.join(ratios)})" if ratios else "") + ".**")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--kinds", default="bare,pool", help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--extra-args", default="--enforce-eager", help="vLLM flags: --extra-args=--enforce-eager")
    parser.add_argument("--decode", type=int, default=0, help="then time a completion of N tokens (tokens/s)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--no-fork", action="store_true", help="VLLAMA_POOL_FORK=0: spawned EngineCore/workers")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--pool-size", type=int, default=2, help="VLLAMA_POOL_SIZE of the daemon")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    exit_on_sigterm()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: a comma list of {', '.join(KINDS)}")

    tmp = Path(tempfile.mkdtemp(prefix="vllama-cold-"))
    home = tmp / "home"
    home.mkdir()
    extra = [
        *shlex.split(args.extra_args),
        *shlex.split(os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "")),
        "--max-model-len",
        str(args.max_model_len),
    ]
    bare_args = list(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_")}
    env.update(
        {
            "VLLAMA_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
            "VLLAMA_POOL_SIZE": str(args.pool_size) if any(k in POOLED for k in kinds) else "0",
            "VLLAMA_POOL_FORK": "0" if args.no_fork else "1",
        }
    )
    entry: dict[str, Any] = {"model": args.model, "extra_args": extra}
    if args.device == "cpu":
        entry["gpu_memory_gib"] = 4
        env.update({"VLLAMA_GPU_PROBE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"})
        bare_env = dict(env)
    else:
        entry["gpu_memory_utilization"] = args.gpu_memory_utilization
        env["VLLAMA_GPU_PROBE"] = "nvml"
        bare_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--enable-sleep-mode"]
        bare_env = {**env, "VLLM_SERVER_DEV_MODE": "1"}
    models = {"M": entry, "N": entry, "P": {**entry, "prewarm": False}}
    wanted = {MODEL_OF[k] for k in kinds if k != "bare"} | ({"M"} if "b2b" in kinds else set())
    (home / "models.yaml").write_text(yaml.safe_dump({name: models[name] for name in sorted(wanted)}))

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "device": args.device,
        "command": "python bench/cold_start.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "pool_fork": not args.no_fork,
        "pool_size": args.pool_size,
        "rows": [],
    }
    rows: list[dict[str, Any]] = report["rows"]
    daemon = None
    url = ""
    try:
        if not args.no_warmup:
            report["warmup"] = bare(args.model, bare_args, bare_env, tmp, args.decode)
            print(json.dumps({"warmup": report["warmup"]["seconds"]}), flush=True)
        shared = any(k not in ("bare", "first") for k in kinds)
        pooled = any(k in POOLED for k in kinds) and args.pool_size > 0
        for i in range(args.rounds):
            order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]  # alternate who goes first
            for kind in order:
                if kind == "first":
                    # its own daemon: the shared one is stopped so that nothing else imports meanwhile
                    if daemon is not None:
                        daemon.send_signal(signal.SIGTERM)
                        daemon.wait(120)
                        daemon = None
                    rows.append({"round": i + 1, "kind": kind, **first_after_serve(home, env, args.decode)})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                if shared and daemon is None:
                    port = free_port()
                    daemon = start_daemon(home, port, env)
                    url = f"http://127.0.0.1:{port}"
                waited = wait_for_spare(url, args.pool_size) if pooled and daemon is not None else 0.0
                if kind == "bare":
                    result = bare(args.model, bare_args, bare_env, tmp, args.decode)
                elif kind == "b2b":
                    result = back_to_back(url, home, args.decode)
                else:
                    result = via_vllama(url, home, MODEL_OF[kind], args.decode)
                rows.append({"round": i + 1, "kind": kind, "waited_for_spare": waited, **result})
                print(json.dumps(rows[-1]), flush=True)
        if pooled:
            if daemon is not None:
                report["warm_pool"] = httpx.get(f"{url}/vllama/info", timeout=30).json().get("warm_pool") or {}
            found = [re.search(r"imports took ([\d.]+) s", r.get("spare") or "") for r in rows]
            report["spare_import_seconds"] = [float(m.group(1)) for m in found if m]
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)

    report["median_seconds"] = {
        k: statistics.median(r["seconds"] for r in rows if r["kind"] == k)
        for k in kinds
        if any(r["kind"] == k for r in rows)
    }
    report["load_end"] = os.getloadavg()[0]
    text = render(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"cold-start-{args.device}-{'-'.join(kinds)}-{time.strftime('%Y-%m-%d')}"
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
