"""A soak of vllama on the GPU: random chat and completion requests (some streamed) from several clients to five
models on one or two GPUs for --duration seconds, with a seconds-scale keep-alive ladder (sleep L1 → sleep L2 →
stop) so that every step happens during the run, on top of the capacity evictions of models that do not all fit.
Passes when no request failed, no model stuck in a transition, and no GPU process is left after SIGTERM.

Runs on the lent GPU machine (see bench/README.md for the exact device call; the models are made with
.gpu-b/make_models.py when --models-dir has none):
    python3 bench/gpu_soak.py --models-dir /tmp/models --duration 540 --out $OUT
and locally as a dry run over fake engines on two simulated 80 GiB GPUs (a shorter ladder):
    python bench/gpu_soak.py --fake --duration 60 --out /tmp/gpu-soak-dry

The traffic: each model rests once (no request for 1.25 × ladder stop + 5 s, so it walks the whole ladder); outside its
rest a model is "hot" (most requests) or "cold" (a stray request now and then, which wakes it from L1 or L2 or
starts it again) in phases that change every 1.5 × sleep_l1 .. 1.1 × stop seconds. In the last --tail seconds only
models that are loaded (running or asleep) get requests, so the run does not end on a cold start.

Every request goes to OUT/gpu-soak-requests.jsonl, every sample of /vllama/ps and the GPUs to
OUT/gpu-soak-samples.jsonl, and the summary to OUT/gpu-soak.json and .md, rewritten as the run goes, so a run cut
short still reports; vllama's and each engine's log tails go to OUT/gpu-soak-logs.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import StepReport, exit_on_sigterm, start_daemon  # noqa: E402
from vllama.gpu import GIB, LedgerProbe, NvmlProbe  # noqa: E402

MODELS = ("a", "b", "c", "d", "e")
SLEEP_LEVEL = {"a": 1, "b": 2, "c": 1, "d": 2, "e": 1}  # capacity evictions: a mix of levels 1 and 2
# one GPU: any three fit (≤ 0.85), no four; two GPUs: two fit per GPU, so the five never all fit
UTILIZATION = {
    1: {"a": 0.3, "b": 0.25, "c": 0.3, "d": 0.25, "e": 0.25},
    2: {"a": 0.35, "b": 0.3, "c": 0.35, "d": 0.3, "e": 0.3},
}
DEVICES_2GPU: dict[str, list[int] | None] = {"a": [0], "b": [0], "c": [1], "d": None, "e": None}  # None: auto
SETTLED = {"running", "sleeping", "stopped"}
LADDER_ACTIONS = ("sleep_l1", "sleep_l2", "stop")
PORT = 33268


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class Plan:
    """Who gets requests when: seeded, so two runs with the same seed send the same mix."""

    def __init__(
        self, rng: random.Random, duration: float, warmup: float, ladder: dict[str, float], rate: float
    ) -> None:
        self.rest_s = 1.25 * ladder["stop"] + 5.0  # long enough for the whole ladder (checked every 1 s)
        # a cold model gets a stray request about once per sleep_l2 seconds (two hot models take the rest)
        self.stray = 2.0 / max(rate * ladder["sleep_l2"], 1.0)
        self.lead_s = max(5.0, ladder["sleep_l1"] / 2)  # hot just before its rest, so the rest starts loaded
        stride = max(0.0, duration - warmup - self.rest_s) / (len(MODELS) - 1)
        order = list(MODELS)
        rng.shuffle(order)
        self.rests = {m: (warmup + i * stride, warmup + i * stride + self.rest_s) for i, m in enumerate(order)}
        self.phases: list[tuple[float, tuple[str, ...]]] = []
        t = 0.0
        while t < duration:
            self.phases.append((t, tuple(rng.sample(MODELS, rng.choice((2, 3, 3, 4))))))
            t += rng.uniform(1.5 * ladder["sleep_l1"], 1.1 * ladder["stop"])

    def hot(self, t: float) -> tuple[str, ...]:
        current: tuple[str, ...] = ()
        for start, models in self.phases:
            if start > t:
                break
            current = models
        return current

    def weights(self, t: float) -> dict[str, float]:
        hot = self.hot(t)
        out = {}
        for m in MODELS:
            start, end = self.rests[m]
            if start <= t < end:
                out[m] = 0.0
            elif m in hot or start - self.lead_s <= t < start:
                out[m] = 1.0
            else:
                out[m] = self.stray  # a stray request: wakes or restarts a cold model
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "rests": {m: [round(a, 1), round(b, 1)] for m, (a, b) in self.rests.items()},
            "phases": [[round(t, 1), list(models)] for t, models in self.phases],
            "stray_weight": round(self.stray, 4),
        }


class Soak(StepReport):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.out, "gpu-soak", "# vllama GPU soak", fake=args.fake, seed=args.seed)
        self.args = args
        self.fake = args.fake
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-soak-"))
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.url = f"http://127.0.0.1:{PORT}"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.evictions: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.transient_since: dict[str, tuple[str, float]] = {}  # model → (state, since)
        self.transient_max: dict[str, dict[str, float]] = defaultdict(dict)  # model → state → longest seconds
        self.stuck: list[str] = []
        self.seen_error: dict[str, str] = {}
        self.sample_errors = 0
        self.states: dict[str, dict[str, Any]] = {}  # last /vllama/ps rows
        self.samples = 0
        self.stop_event = threading.Event()
        self.req_file = (args.out / "gpu-soak-requests.jsonl").open("w")
        self.sample_file = (args.out / "gpu-soak-samples.jsonl").open("w")
        # VLLAMA_* settings in the environment pass on (e.g. VLLAMA_CAPACITY_WAIT=300), except the ones set here
        self.env = dict(os.environ)
        self.env.update(
            {
                "VLLAMA_HOME": str(self.home),
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                "VLLAMA_KEEP_ALIVE_INTERVAL": "1",
                "VLLAMA_POOL_SIZE": "1",
                "VLLAMA_LOG_LEVEL": "info",
            }
        )
        if self.fake:
            ledger = self.tmp / "ledger"
            ledger.mkdir()
            totals = [80 * GIB] * args.fake_gpus
            self.probe: Any = LedgerProbe(ledger, totals)
            self.env.update(
                {
                    "VLLAMA_GPU_PROBE": "fake",
                    "VLLAMA_FAKE_GPU_LEDGER": str(ledger),
                    "VLLAMA_FAKE_GPU_TOTAL_GIB": ",".join(["80"] * args.fake_gpus),
                    "VLLAMA_VLLM_COMMAND": f"{sys.executable} -m vllama.testing.fake_engine",
                    "VLLAMA_POOL_MODULES": "vllama.testing.fake_engine",
                    "FAKE_ENGINE_STARTUP_S": "2",
                    "FAKE_ENGINE_CONTEXT_GIB": "1.2",
                    "FAKE_ENGINE_CORE_PROCESS": "1",  # the memory belongs to a child, like VLLM::EngineCore
                    "FAKE_ENGINE_TOKEN_RATE": "200",
                    "FAKE_ENGINE_SLEEP_S": "0.1",
                    "FAKE_ENGINE_WAKE_S": "0.3",
                }
            )
        else:
            self.probe = NvmlProbe()
        self.gpus = min(2, len(self.probe.devices()))
        self.vllm_args = [*os.environ.get("VLLAMA_GPU_BUNDLE_ARGS", "").split(), "--enforce-eager"]

    # --- set-up -------------------------------------------------------------------------------------------

    def model_folder(self) -> Path:
        folder = self.args.models_dir / "a"
        if self.fake:
            from bench.gpu_packing import make_fake_models  # config.json + sparse weights of the real size

            make_fake_models(self.tmp / "models", "a=135m")
            return self.tmp / "models" / "a"
        if not (folder / "config.json").exists():
            maker = ROOT / ".gpu-b" / "make_models.py"
            self.log(f"- making the 135m model in {folder} with {maker}")
            subprocess.run([sys.executable, str(maker), str(self.args.models_dir), "a=135m"], check=True)
        return folder

    def write_models(self) -> dict[str, Any]:
        folder = self.model_folder()
        util = UTILIZATION[self.gpus]
        models: dict[str, Any] = {}
        for name in MODELS:
            entry: dict[str, Any] = {
                "model": str(folder),
                "gpu_memory_utilization": util[name],
                "max_model_len": 2048,
                "sleep_level": SLEEP_LEVEL[name],
                "keep_alive": dict(self.ladder),
                "extra_args": self.vllm_args,
            }
            if self.gpus == 2 and DEVICES_2GPU[name] is not None:
                entry["devices"] = DEVICES_2GPU[name]
            models[name] = entry
        (self.home / "models.yaml").write_text(yaml.safe_dump(models))
        return models

    @property
    def ladder(self) -> dict[str, float]:
        l1, l2, stop = (float(x.rstrip("s")) for x in self.args.ladder.split(","))
        return {"sleep_l1": l1, "sleep_l2": l2, "stop": stop}

    # --- observation --------------------------------------------------------------------------------------

    def gpu(self) -> dict[str, Any]:
        devices = [
            {"index": d.index, "used_gib": round((d.total - d.free) / GIB, 2), "total_gib": round(d.total / GIB, 2)}
            for d in self.probe.devices()
        ]
        procs = self.probe.process_memory()
        return {
            "devices": devices,
            "processes": {str(pid): round(sum(m.values()) / GIB, 2) for pid, m in procs.items()},
        }

    def sample(self, t0: float) -> None:
        now = time.monotonic()
        try:
            ps = httpx.get(f"{self.url}/vllama/ps", timeout=10).json()
        except (httpx.HTTPError, ValueError) as exc:
            self.sample_errors += 1
            self.sample_file.write(json.dumps({"t": round(now - t0, 1), "ps_error": repr(exc)}) + "\n")
            return
        rows = {r["model"]: r for r in ps["models"]}
        with self.lock:
            self.states = rows
            for e in ps.get("recent_evictions", []):
                self.evictions.setdefault((e["time"], e["model"], e["action"], e["reason"]), e)
        for m, r in rows.items():
            state = r["state"]
            if state == "error":
                self.seen_error[m] = str(r.get("last_error"))
            if state in SETTLED:
                self.transient_since.pop(m, None)
                continue
            prev = self.transient_since.get(m)
            if prev is None or prev[0] != state:
                self.transient_since[m] = (state, now)
                prev = (state, now)
            held = now - prev[1]
            self.transient_max[m][state] = round(max(held, self.transient_max[m].get(state, 0.0)), 1)
            limit = self.args.start_stuck_after if state == "starting" else self.args.stuck_after
            if held > limit:
                note = f"{m} in {state} for {held:.0f} s (limit {limit:.0f} s) at t={now - t0:.0f} s"
                if not any(s.startswith(f"{m} in {state} ") for s in self.stuck):
                    self.stuck.append(note)
                    self.log(f"- STUCK: {note}")
        try:
            gpu = self.gpu()
        except Exception as exc:  # NVML hiccups are reported, not fatal
            gpu = {"error": repr(exc)}
        self.samples += 1
        compact = {
            m: [r["state"], r.get("sleep_level"), r["in_flight"], r.get("devices")] for m, r in sorted(rows.items())
        }
        self.sample_file.write(json.dumps({"t": round(now - t0, 1), "models": compact, "gpu": gpu}) + "\n")
        self.sample_file.flush()

    def sampler(self, t0: float) -> None:
        while not self.stop_event.wait(self.args.sample_every):
            self.sample(t0)
            self.summarize()

    # --- clients ------------------------------------------------------------------------------------------

    def one_request(self, client: httpx.Client, rng: random.Random, model: str, hard_end: float) -> dict[str, Any]:
        kind = rng.choice(("chat", "chat", "completion"))
        stream = rng.random() < 0.4
        max_tokens = rng.randint(1, 16)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                                "temperature": rng.choice((0.0, 0.7))}  # fmt: skip
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": f"Say something about {rng.randint(0, 10**6)}."}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = f"Once upon a time {rng.randint(0, 10**6)}"
            path = "/v1/completions"
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        rec: dict[str, Any] = {"model": model, "kind": kind, "stream": stream, "max_tokens": max_tokens}
        timeout = httpx.Timeout(max(1.0, hard_end - time.monotonic()), connect=10)
        t0 = time.monotonic()
        rec["t_start"] = t0
        status, error = None, None
        try:
            if stream:
                done, usage, events, finish = False, None, 0, None
                with client.stream("POST", f"{self.url}{path}", json=body, timeout=timeout) as r:
                    status = r.status_code
                    if status != 200:
                        r.read()
                        error = r.text[:300]
                    else:
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data:"):
                                event = json.loads(line[5:])
                                if "error" in event:
                                    error = f"error event: {str(event['error'])[:300]}"
                                events += 1
                                usage = event.get("usage") or usage
                                for c in event.get("choices") or []:
                                    finish = c.get("finish_reason") or finish
                if status == 200 and error is None:
                    tokens = (usage or {}).get("completion_tokens")
                    if not done:
                        error = f"stream ended without [DONE] after {events} events"
                    elif tokens != max_tokens or finish is None:
                        error = f"stream incomplete: {tokens} of {max_tokens} tokens, finish {finish}"
            else:
                r = client.post(f"{self.url}{path}", json=body, timeout=timeout)
                status = r.status_code
                if status != 200:
                    error = r.text[:300]
                else:
                    data = r.json()
                    tokens = (data.get("usage") or {}).get("completion_tokens")
                    if not data.get("choices") or tokens != max_tokens:
                        error = f"answer incomplete: {tokens} of {max_tokens} tokens"
        except Exception as exc:  # a failed request is a result of the soak, not a crash of it
            error = f"{type(exc).__name__}: {exc}"[:300]
            if time.monotonic() >= hard_end - 1:
                error = "unfinished at the end of the run: " + error
        rec.update(ok=error is None, status=status, latency_s=round(time.monotonic() - t0, 4), error=error)
        return rec

    def client(self, i: int, t0: float, plan: Plan, end: float, hard_end: float) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        tail_from = end - self.args.tail
        with httpx.Client() as client:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= end:
                    return
                weights = plan.weights(now - t0)
                if now >= tail_from:  # the last seconds: no cold start that would outlast the run
                    with self.lock:
                        loaded = {m for m, r in self.states.items() if r["state"] in ("running", "sleeping")}
                    weights = {m: w for m, w in weights.items() if m in loaded}
                if not weights or sum(weights.values()) <= 0:
                    time.sleep(0.5)
                    continue
                model = rng.choices(list(weights), weights=list(weights.values()))[0]
                rec = self.one_request(client, rng, model, hard_end)
                rec["client"] = i
                rec["t"] = round(rec.pop("t_start") - t0, 3)
                with self.lock:
                    self.requests.append(rec)
                    self.req_file.write(json.dumps(rec) + "\n")
                    self.req_file.flush()
                if not rec["ok"]:
                    print(f"request failed: {rec}", flush=True)
                time.sleep(min(rng.expovariate(1 / self.args.think), 8.0))

    # --- report -------------------------------------------------------------------------------------------

    def summarize(self) -> None:
        with self.lock:
            reqs = list(self.requests)
            evictions = sorted(self.evictions.values(), key=lambda e: e["time"])
        ok = [r for r in reqs if r["ok"]]
        failed = [r for r in reqs if not r["ok"]]
        lat = [r["latency_s"] for r in ok]
        by_model: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "failed": 0})
        for r in reqs:
            by_model[r["model"]]["ok" if r["ok"] else "failed"] += 1
        seen = Counter(f"{e['reason']}/{e['action']}" for e in evictions)
        self.report["summary"] = {
            "requests": len(reqs),
            "ok": len(ok),
            "failed": len(failed),
            "streamed": sum(r["stream"] for r in reqs),
            "latency_p50_s": pct(lat, 0.5),
            "latency_p99_s": pct(lat, 0.99),
            "latency_max_s": max(lat) if lat else None,
            "by_model": dict(sorted(by_model.items())),
            "failure_examples": failed[:20],
            "evictions_seen_by_reason_action": dict(sorted(seen.items())),
            "ladder_sequences": ladder_sequences(evictions),
            "longest_transient_s": {m: d for m, d in sorted(self.transient_max.items())},
            "stuck": list(self.stuck),
            "seen_in_error": dict(self.seen_error),
            "ps_sample_errors": self.sample_errors,
            "samples": self.samples,
        }
        self.report["evictions"] = evictions
        self.flush()

    def check(self, what: str, ok: bool) -> None:
        self.report.setdefault("checks", {})[what] = ok
        self.log(f"- {'PASS' if ok else 'FAIL'}: {what}")

    def gpu_processes(self) -> dict[str, Any]:
        procs = set(self.probe.process_memory())
        if not self.fake and shutil.which("nvidia-smi"):
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False,
            ).stdout  # fmt: skip
            procs |= {int(x) for x in out.split() if x.strip().isdigit()}
        return {str(p): True for p in sorted(procs)}

    def save_logs(self) -> None:
        parts = []
        for f in sorted(self.home.rglob("*.log")):
            parts.append(f"===== {f.relative_to(self.home)}\n" + f.read_text(errors="replace")[-40000:])
        (self.args.out / "gpu-soak-logs.txt").write_text("\n".join(parts)[-15_000_000:])


def ladder_sequences(evictions: list[dict[str, Any]]) -> dict[str, int]:
    """Per model, how many times the keep-alive walked it L1 → L2 → stop with nothing in between."""
    out: dict[str, int] = {}
    by_model: dict[str, list[str]] = defaultdict(list)
    for e in evictions:
        by_model[e["model"]].append(f"{e['reason']}/{e['action']}")
    for m, acts in sorted(by_model.items()):
        full = ["keep_alive/sleep_l1", "keep_alive/sleep_l2", "keep_alive/stop"]
        out[m] = sum(acts[i : i + 3] == full for i in range(len(acts)))
    return out


METRIC = re.compile(r"^vllama_evictions_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)$")


def metrics_evictions(text: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            out[f"{labels.get('reason')}/{labels.get('action')}"] += int(float(m.group("value")))
    return dict(sorted(out.items()))


def run(soak: Soak) -> None:
    args = soak.args
    ladder = soak.ladder
    models = soak.write_models()
    soak.report["ladder"] = ladder
    soak.report["models"] = {m: {k: v for k, v in e.items() if k != "extra_args"} for m, e in models.items()}
    soak.report["machine"] = "fake (dry run)" if soak.fake else soak.probe.devices()[0].name
    soak.report["gpus"] = soak.gpus
    soak.report["vllama_env"] = {k: v for k, v in sorted(soak.env.items()) if k.startswith("VLLAMA_")}
    before = soak.gpu_processes()
    soak.report["gpu_processes_before"] = before
    soak.log(
        f"{len(MODELS)} models on {soak.gpus} GPU(s) ({soak.report['machine']}), one 135m checkpoint, "
        f"utilization {UTILIZATION[soak.gpus]}, sleep levels {SLEEP_LEVEL}, "
        f"devices {DEVICES_2GPU if soak.gpus == 2 else 'auto'}; keep-alive ladder {ladder} checked every 1 s; "
        f"warm pool 1; {args.clients} clients, think time {args.think} s (mean), {args.duration:.0f} s."
    )
    soak.daemon = start_daemon(soak.home, PORT, soak.env)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    plan = Plan(rng, args.duration, args.warmup, ladder, args.clients / args.think)
    soak.report["plan"] = plan.describe()
    end = t0 + args.duration
    hard_end = end + args.grace
    sampler = threading.Thread(target=soak.sampler, args=(t0,), daemon=True)
    sampler.start()
    clients = [
        threading.Thread(target=soak.client, args=(i, t0, plan, end, hard_end), daemon=True)
        for i in range(args.clients)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join(max(0.0, hard_end + 5 - time.monotonic()))
    unfinished = sum(c.is_alive() for c in clients)
    soak.stop_event.set()
    sampler.join(30)
    soak.log("")
    soak.log(f"## Load: {time.monotonic() - t0:.0f} s; clients still waiting at the end: {unfinished}")

    # settle: every model in a settled state with nothing in flight (transitions get --stuck-after)
    settle_end = time.monotonic() + args.stuck_after
    while True:
        soak.sample(t0)
        rows = soak.states
        unsettled = {m: r["state"] for m, r in rows.items() if r["state"] not in SETTLED or r["in_flight"]}
        if not unsettled or time.monotonic() > settle_end:
            break
        time.sleep(1)
    keep = ("state", "sleep_level", "in_flight", "devices", "last_error")
    final = {m: {k: r.get(k) for k in keep} for m, r in sorted(rows.items())}
    soak.report["states_at_end"] = final
    with contextlib.suppress(httpx.HTTPError):
        soak.report["metrics_evictions"] = metrics_evictions(httpx.get(f"{soak.url}/metrics", timeout=30).text)
    with contextlib.suppress(httpx.HTTPError, ValueError):
        info = httpx.get(f"{soak.url}/vllama/info", timeout=30).json()
        soak.report["info_at_end"] = {k: info.get(k) for k in ("evictions", "devices", "warm_pool", "strays")}
    soak.summarize()
    s = soak.report["summary"]
    ladder_seen = {a: soak.report.get("metrics_evictions", {}).get(f"keep_alive/{a}", 0) for a in LADDER_ACTIONS}
    soak.report["ladder_steps_seen"] = ladder_seen
    soak.log(
        f"- requests {s['requests']} ({s['streamed']} streamed): {s['ok']} ok, {s['failed']} failed; "
        f"latency p50 {s['latency_p50_s']} s, p99 {s['latency_p99_s']} s, max {s['latency_max_s']} s"
    )
    soak.log(f"- per model: {s['by_model']}")
    soak.log(f"- evictions (reason/action, /metrics): {soak.report.get('metrics_evictions')}")
    soak.log(f"- keep-alive ladder steps: {ladder_seen}; full L1 → L2 → stop walks per model {s['ladder_sequences']}")
    soak.log(f"- longest time in a transition (s): {s['longest_transient_s']}")
    soak.log(f"- states at the end: { {m: (f['state'], f['sleep_level'], f['in_flight']) for m, f in final.items()} }")
    if s["seen_in_error"]:
        soak.log(f"- seen in error: {s['seen_in_error']}")
    for r in s["failure_examples"][:5]:
        soak.log(f"  - failed: {r}")

    soak.log("")
    soak.log("## Shutdown with SIGTERM")
    child_pids = [int(r["pid"]) for r in rows.values() if r.get("pid")]
    pre = soak.gpu_processes()
    t_term = time.monotonic()
    soak.daemon.send_signal(signal.SIGTERM)
    try:
        code: int | None = soak.daemon.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - t_term
    deadline = time.monotonic() + 30
    while True:
        left = {p: v for p, v in soak.gpu_processes().items() if p not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    alive = [p for p in child_pids if pid_alive(p)]
    soak.report["shutdown"] = {"exit_code": code, "seconds": round(took, 2), "gpu_processes_before_sigterm": pre,
                               "gpu_processes_after": left, "children_alive_after": alive}  # fmt: skip
    soak.log(
        f"- vllama exited with {code} {took:.1f} s after SIGTERM; GPU processes before {list(pre)}, after {list(left)}"
    )
    tracebacks = (soak.home / "serve.log").read_text(errors="replace").count("Traceback")
    soak.report["tracebacks_in_vllama_log"] = tracebacks
    soak.log(f"- tracebacks in vllama's log: {tracebacks}")

    soak.log("")
    soak.log("## Checks")
    soak.check(f"0 failed requests ({s['failed']} of {s['requests']})", s["failed"] == 0 and s["requests"] > 0)
    soak.check("no client left waiting at the end", unfinished == 0)
    soak.check(
        f"nothing stuck: no transition over {args.stuck_after:.0f} s (start over {args.start_stuck_after:.0f} s), "
        "no model in error",
        not soak.stuck and not soak.seen_error,
    )
    soak.check(
        "at the end every model running, sleeping or stopped with 0 in flight",
        all(f["state"] in SETTLED and not f["in_flight"] for f in final.values()),
    )
    soak.check(f"the keep-alive ladder took every step (L1, L2, stop): {ladder_seen}", all(ladder_seen.values()))
    soak.check("vllama exited after SIGTERM (within 60 s)", code is not None)
    soak.check("after SIGTERM no GPU process and no engine process is left", not left and not alive)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--think", type=float, default=1.5, help="mean pause between a client's requests (s)")
    parser.add_argument("--ladder", default=None, help="sleep_l1,sleep_l2,stop seconds (default 20,40,90; fake 3,6,12)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the first rest (default 60; fake 8)")
    parser.add_argument("--tail", type=float, default=None, help="last seconds: loaded models only (90; fake 10)")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds after --duration for requests in flight")
    parser.add_argument("--stuck-after", type=float, default=60.0, help="a transition longer than this is stuck")
    parser.add_argument("--start-stuck-after", type=float, default=300.0, help="the same for a cold start")
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--fake", action="store_true", help="dry run over fake engines on simulated GPUs")
    parser.add_argument("--fake-gpus", type=int, choices=(1, 2), default=2)
    args = parser.parse_args()
    args.ladder = args.ladder or ("3,6,12" if args.fake else "20,40,90")
    args.warmup = args.warmup if args.warmup is not None else (8.0 if args.fake else 60.0)
    args.tail = args.tail if args.tail is not None else (10.0 if args.fake else 90.0)
    exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    soak = Soak(args)
    try:
        run(soak)
    finally:
        soak.stop_event.set()
        if soak.daemon and soak.daemon.poll() is None:
            soak.daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                soak.daemon.wait(60)
        with contextlib.suppress(Exception):
            soak.summarize()
        soak.save_logs()
        soak.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        soak.flush()
        soak.req_file.close()
        soak.sample_file.close()
        shutil.rmtree(soak.tmp, ignore_errors=True)  # the logs' tails are in OUT
    checks = soak.report.get("checks", {})
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
