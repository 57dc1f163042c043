"""Proxy overhead: the same streaming load sent directly to an upstream and through vllama, alternating.

    python bench/proxy.py                          # fake engine upstream: paced + as-fast-as-possible (~3 min)
    python bench/proxy.py --quick                  # a short smoke run
    python bench/proxy.py --real                   # real vLLM (CPU build, tiny model) at concurrency 1 and 8
    python bench/proxy.py --profile OUT.txt        # py-spy profile of vllama at the unpaced ceiling (c=64)
    python bench/proxy.py --out bench/results/proxy-DATE   # also write result.json and result.md there
    python bench/proxy.py --quick --compare transport:tcp,transport:uds   # the children on ports vs Unix sockets

The upstream is started by vllama itself from a models.yaml entry (the fake engine, `vllm_command`, or real vLLM);
the direct load goes to that same process at its own address (its Unix socket, or its port with
VLLAMA_CHILD_TRANSPORT=tcp), so both paths hit the same server. The load comes from
a separate load-generator process (aiohttp on uvloop, one connection per concurrent client, connections warmed
before each measured phase). Each scenario runs direct, via, then via, direct (two rounds, order swapped in the
second) and the table reports the pooled samples.

Modes (fake upstream):
  paced  every stream produces `--paced-tokens` tokens at `--rate` tokens/s, clients start staggered over one
         stream's duration (steady arrivals); measures whether vllama keeps up and what it adds to TTFT.
  max    unpaced streams of `--max-tokens` tokens, as fast as the upstream writes them; measures vllama's ceiling.

Metrics: requests/s and SSE events ("chunks", one per token) per second over the phase; TTFT = time from sending
the request to the first content token; total = time to the end of the stream; vllama CPU = user+system seconds
of the daemon process (psutil) per 1000 chunks relayed. Every stream is checked: complete, ends with [DONE].
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONTENT = re.compile(rb'"(?:content|text)":"[^"]')  # a chunk with text in it (the role chunk has "content":"")


# --- load generator (runs in its own process) -------------------------------------------------------------------


async def _one(session: Any, url: str, body: bytes, headers: dict[str, str], sample: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = time.time()
    ttft = None
    data = bytearray()
    reads = 0
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {(await resp.read())[:300]!r}"}
        async for chunk in resp.content.iter_any():
            reads += 1
            if ttft is None and CONTENT.search(chunk):
                ttft = time.perf_counter() - t0
            data += chunk
    total = time.perf_counter() - t0
    events = data.count(b"\n\n")
    if not data.endswith(b"data: [DONE]\n\n"):
        return {"error": f"stream did not end with [DONE]: {bytes(data[-200:])!r}"}
    out: dict[str, Any] = {"ttft": ttft if ttft is not None else total, "total": total, "events": events}
    out["reads"] = reads
    out["start"] = started
    if sample:
        out["sample"] = bytes(data[:1500]).decode(errors="replace")
    return out


async def _phase(spec: dict[str, Any]) -> None:
    import aiohttp

    url = spec["url"]
    conc = spec["concurrency"]
    body = json.dumps(spec["body"]).encode()
    warm_body = json.dumps({**spec["body"], "max_tokens": 1, "fake_token_rate": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if spec.get("uds"):  # straight to a child on its Unix socket
        connector: Any = aiohttp.UnixConnector(path=spec["uds"], limit=0, force_close=False)
    else:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # open (and keep) one connection per client, to this target, before measuring
        await asyncio.gather(*(_one(session, url, warm_body, headers) for _ in range(conc)))
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        gc.collect()
        gc.disable()  # no collector pauses in the measuring process while it measures
        results: list[dict[str, Any]] = []
        t_go = time.perf_counter()
        deadline = t_go + spec["duration"]
        stagger = spec["stagger"]

        async def client(i: int) -> None:
            if stagger:
                await asyncio.sleep(stagger * i / conc)
            done = 0
            while done == 0 or time.perf_counter() < deadline:
                r = await _one(session, url, body, headers, sample=i == 0 and done == 0)
                results.append(r)
                done += 1
                if spec.get("max_requests") and len(results) >= spec["max_requests"]:
                    return

        await asyncio.gather(*(client(i) for i in range(conc)))
        wall = time.perf_counter() - t_go
        gc.enable()
    print(json.dumps({"wall": wall, "results": results}), flush=True)


def loadgen_main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for line in sys.stdin:
        if not line.strip():
            continue
        asyncio.run(_phase(json.loads(line)))


# --- orchestration ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import httpx
        import psutil
        import yaml

        self.args = args
        self.httpx, self.psutil = httpx, psutil
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-proxy-bench-"))
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = "tiny-chat" if args.real else "fake"
        if args.real:
            from vllama.offline_models import prepare

            path = prepare(Path("~/.cache/vllama/models").expanduser(), ["tiny"])["tiny"]
            entry: dict[str, Any] = {"model": str(path), "gpu_memory_gib": 3, "max_model_len": 512}
            entry["extra_args"] = ["--enforce-eager"]
        else:
            entry = {"model": "fake-model", "gpu_memory_gib": 1, "max_model_len": 1_000_000}
            entry["vllm_command"] = [sys.executable, "-m", "vllama.testing.fake_engine"]
        entry.update({"pinned": True, "keep_alive": -1})
        (self.home / "models.yaml").write_text(yaml.safe_dump({self.model: entry}))
        lo = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLAMA_", "FAKE_ENGINE_"))}
        self.env.update(
            VLLAMA_HOME=str(self.home),
            VLLAMA_GPU_PROBE="cpu",
            VLLAMA_CPU_MEMORY_GIB="8",
            VLLAMA_PORT_RANGE=f"{lo}-{lo + 20}" if lo + 20 < 65000 else "33300-33999",
            VLLAMA_STARTUP_TIMEOUT="600",
            FAKE_ENGINE_STARTUP_S="0.1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        for kv in args.env or []:
            k, _, v = kv.partition("=")
            self.env[k] = v
        self.daemon: subprocess.Popen[bytes] | None = None
        self.loadgen: subprocess.Popen[str] | None = None
        self.rows: list[dict[str, Any]] = []

    # processes
    def start(self) -> None:
        log = (self.home / "serve.log").open("ab")
        cmd = [sys.executable, "-m", "vllama", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        cmd += ["--log-level", "warning"]
        src = self.args.vllama_src or ROOT  # another checkout's vllama (A/B against an older relay)
        if self.args.vllama_src:
            self.env["PYTHONPATH"] = str(src)
        self.daemon = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=src)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SystemExit(f"vllama serve exited:\n{(self.home / 'serve.log').read_text()}")
            with contextlib.suppress(self.httpx.HTTPError):
                if self.httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        r = self.httpx.post(f"{self.url}/vllama/start", json={"model": self.model}, timeout=900)
        r.raise_for_status()
        rows = self.httpx.get(f"{self.url}/vllama/ps", timeout=30).json()["models"]
        row = next(r for r in rows if r["model"] == self.model)
        # a child on a Unix socket is reached at any host name over that socket
        self.upstream_uds = row.get("socket")
        self.upstream = "http://child" if self.upstream_uds else f"http://127.0.0.1:{row['port']}"
        self.daemon_ps = self.psutil.Process(self.daemon.pid)
        if self.args.daemon_nice is not None:  # a diagnosis of CPU contention (vLLM's children keep theirs)
            os.setpriority(os.PRIO_PROCESS, self.daemon.pid, self.args.daemon_nice)
        self.engine_ps = [p for p in self.daemon_ps.children(recursive=True) if p.pid == row["pid"]]
        self.engine_tree = self.psutil.Process(row["pid"])
        self.loadgen = subprocess.Popen(
            [sys.executable, __file__, "_loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.loadgen_ps = self.psutil.Process(self.loadgen.pid)

    def stop(self) -> None:
        if self.loadgen and self.loadgen.poll() is None:
            assert self.loadgen.stdin is not None
            self.loadgen.stdin.close()
            try:
                self.loadgen.wait(10)
            except subprocess.TimeoutExpired:
                self.loadgen.kill()
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        if os.environ.get("BENCH_DUMP"):
            with contextlib.suppress(OSError):
                shutil.copytree(self.home / "logs", Path(os.environ["BENCH_DUMP"]) / "logs", dirs_exist_ok=True)
                shutil.copy(self.home / "serve.log", Path(os.environ["BENCH_DUMP"]) / "serve.log")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu(self, proc: Any) -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    @staticmethod
    def runq_wait(pid: int) -> float:
        """Seconds the process's main thread has spent runnable but waiting for a CPU (Linux schedstat)."""
        try:
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return math.nan

    def engine_cpu(self) -> float:
        total = 0.0
        for p in [self.engine_tree, *self.engine_tree.children(recursive=True)]:
            with contextlib.suppress(self.psutil.Error):
                total += self.cpu(p)
        return total

    # one phase: one target, one concurrency
    def phase(self, target: str, spec: dict[str, Any], profile: Path | None = None) -> dict[str, Any]:
        assert self.loadgen and self.loadgen.stdin and self.loadgen.stdout
        url = (self.url if target == "via" else self.upstream) + "/v1/chat/completions"
        uds = self.upstream_uds if target == "direct" else None
        self.loadgen.stdin.write(json.dumps({**spec, "url": url, "uds": uds}) + "\n")
        self.loadgen.stdin.flush()
        ready = json.loads(self.loadgen.stdout.readline())
        assert ready.get("ready"), ready
        spy = None
        if profile is not None:
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            # --native (C frames: uvloop, the syscalls) needs the process paused at each sample
            how = ["--native"] if self.args.profile_native else ["--nonblocking"]
            spy = subprocess.Popen(
                [spy_bin, "record", *how, "--format", "raw", "--rate", "250", "-o", str(profile),
                 "--pid", str(self.daemon_ps.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        c0 = (self.cpu(self.daemon_ps), self.engine_cpu(), self.cpu(self.loadgen_ps), time.monotonic())
        w0 = [self.runq_wait(p.pid) for p in (self.daemon_ps, self.engine_tree, self.loadgen_ps)]
        self.loadgen.stdin.write("go\n")
        self.loadgen.stdin.flush()
        out = json.loads(self.loadgen.stdout.readline())
        c1 = (self.cpu(self.daemon_ps), self.engine_cpu(), self.cpu(self.loadgen_ps), time.monotonic())
        w1 = [self.runq_wait(p.pid) for p in (self.daemon_ps, self.engine_tree, self.loadgen_ps)]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if os.environ.get("BENCH_DUMP"):  # raw per-request results, for digging into a phase
            name = f"{target}-{spec['concurrency']}-{int(time.time() * 1000)}.json"
            (Path(os.environ["BENCH_DUMP"]) / name).write_text(json.dumps(out))
        errors = [r["error"] for r in out["results"] if "error" in r]
        if errors:
            raise SystemExit(f"{target} c={spec['concurrency']}: {len(errors)} failed requests, e.g. {errors[0]}")
        return {
            "results": out["results"],
            "wall": out["wall"],
            "vllama_cpu": c1[0] - c0[0],
            "engine_cpu": c1[1] - c0[1],
            "loadgen_cpu": c1[2] - c0[2],
            "runq_wait": dict(
                zip(("vllama", "engine", "loadgen"), (b - a for a, b in zip(w0, w1, strict=True)), strict=True)
            ),
        }

    def scenario(self, mode: str, conc: int, spec: dict[str, Any]) -> dict[str, Any]:
        pooled: dict[str, list[dict[str, Any]]] = {"direct": [], "via": []}
        order = [("direct", "via"), ("via", "direct")][: self.args.rounds]
        if self.args.rounds > 2:
            order = [order[i % 2] for i in range(self.args.rounds)]
        for targets in order:
            for target in targets:
                pooled[target].append(self.phase(target, spec))
        row: dict[str, Any] = {"mode": mode, "concurrency": conc}
        for target, phases in pooled.items():
            rs = [r for p in phases for r in p["results"]]
            wall = sum(p["wall"] for p in phases)
            events = sum(r["events"] for r in rs)
            row[target] = {
                "requests": len(rs),
                "rps": len(rs) / wall,
                "chunks_s": events / wall,
                "ttft_p50_ms": pct([r["ttft"] for r in rs], 0.5) * 1e3,
                "ttft_p99_ms": pct([r["ttft"] for r in rs], 0.99) * 1e3,
                "total_p50_ms": pct([r["total"] for r in rs], 0.5) * 1e3,
                "total_p99_ms": pct([r["total"] for r in rs], 0.99) * 1e3,
                "events_per_read": events / max(1, sum(r["reads"] for r in rs)),
                "sample": next((r["sample"] for r in rs if "sample" in r), ""),
                "vllama_cpu_s_per_1k": sum(p["vllama_cpu"] for p in phases) / events * 1e3,
                "vllama_cpu_ms_per_request": sum(p["vllama_cpu"] for p in phases) / len(rs) * 1e3,
                "engine_cpu_s_per_1k": sum(p["engine_cpu"] for p in phases) / events * 1e3,
                "loadgen_cpu_s_per_1k": sum(p["loadgen_cpu"] for p in phases) / events * 1e3,
                "runq_wait_ms_per_s": {  # time runnable but not running (CPU contention), per second of the phase
                    k: sum(p["runq_wait"][k] for p in phases) / wall * 1e3 for k in ("vllama", "engine", "loadgen")
                },
                "cpu_util": {
                    "vllama": sum(p["vllama_cpu"] for p in phases) / wall,
                    "engine": sum(p["engine_cpu"] for p in phases) / wall,
                    "loadgen": sum(p["loadgen_cpu"] for p in phases) / wall,
                },
            }
        d, v = row["direct"], row["via"]
        row["ratio"] = {
            k: v[k] / d[k] if d[k] else math.nan
            for k in ("rps", "chunks_s", "ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms")
        }
        row["added_ttft_p50_ms"] = v["ttft_p50_ms"] - d["ttft_p50_ms"]
        row["added_ttft_p99_ms"] = v["ttft_p99_ms"] - d["ttft_p99_ms"]
        self.rows.append(row)
        print(fmt_row(row), flush=True)
        return row


def body(model: str, tokens: int, rate: float, real: bool) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story about a proxy."}],
        "max_tokens": tokens,
        "stream": True,
    }
    if real:
        b.update(ignore_eos=True, temperature=0)
    else:
        b["fake_token_rate"] = rate
    return b


def specs(args: argparse.Namespace, model: str, mode: str, conc: int) -> dict[str, Any]:
    if mode == "paced":
        return {
            "concurrency": conc,
            "duration": args.paced_duration,
            "stagger": args.paced_tokens / args.rate,
            "body": body(model, args.paced_tokens, args.rate, False),
        }
    if mode == "max":
        return {
            "concurrency": conc,
            "duration": args.max_duration,
            "stagger": 0,
            "body": body(model, args.max_tokens, 0, False),
        }
    raise SystemExit(f"unknown mode {mode!r}")


HEADER = (
    "| mode | conc | path | req/s | chunks/s | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms "
    "| vllama CPU s/1k chunks | n |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def fmt_row(row: dict[str, Any]) -> str:
    lines = []
    for target in ("direct", "via"):
        m = row[target]
        lines.append(
            f"| {row['mode']} | {row['concurrency']} | {target} | {m['rps']:.1f} | {m['chunks_s']:.0f} "
            f"| {m['ttft_p50_ms']:.2f} | {m['ttft_p99_ms']:.2f} | {m['total_p50_ms']:.1f} | {m['total_p99_ms']:.1f} "
            f"| {m['vllama_cpu_s_per_1k'] if target == 'via' else 0:.3f} | {m['requests']} |"
        )
    r = row["ratio"]
    lines.append(
        f"| {row['mode']} | {row['concurrency']} | **via/direct** | {r['rps']:.3f} | **{r['chunks_s']:.3f}** "
        f"| {r['ttft_p50_ms']:.2f} (+{row['added_ttft_p50_ms']:.2f}) | {r['ttft_p99_ms']:.2f} "
        f"| {r['total_p50_ms']:.3f} | {r['total_p99_ms']:.3f} | | |"
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10]
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["versions"] = {
            p: version(p) for p in ("aiohttp", "uvicorn", "starlette", "fastapi", "uvloop", "httptools")
        }
    return info


def summarize_profile(raw: Path, top: int = 30) -> str:
    """py-spy raw (collapsed) stacks → self and inclusive time per function, as text."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
    out = [f"{total} samples", "", "self %  function"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "incl %  function"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


def run(args: argparse.Namespace, concs: list[int], info: dict[str, Any]) -> list[dict[str, Any]]:
    """One daemon (with args.env / args.vllama_src), every scenario; returns the rows."""
    bench = Bench(args)
    try:
        bench.start()
        where = bench.upstream_uds or bench.upstream
        print(f"vllama {bench.url}, upstream {where}, load {os.getloadavg()}", flush=True)
        if args.profile:  # the first mode and concurrency given (default: max at 64)
            mode, c = args.modes.split(",")[0], int(args.concurrency or 64)
            spec = specs(args, bench.model, mode, c)
            spec["duration"] = 8.0
            bench.phase("via", {**spec, "duration": 1.0})  # warm-up
            raw = args.profile.with_suffix(".raw")
            bench.phase("via", spec, profile=raw)
            args.profile.write_text(summarize_profile(raw))
            print(args.profile.read_text())
            return []
        print(HEADER, flush=True)
        if args.real:
            for c in concs:
                spec = {"concurrency": c, "duration": args.real_duration, "stagger": 0}
                bench.scenario("real", c, {**spec, "body": body(bench.model, args.real_tokens, 0, True)})
        else:
            for mode in args.modes.split(","):
                for c in concs:
                    bench.scenario(mode, c, specs(args, bench.model, mode, c))
    except BaseException:
        log = bench.home / "serve.log"
        if log.exists():
            print("--- vllama log (tail) ---\n" + "\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        bench.stop()
    return bench.rows


CPU_HEADER = (
    "| mode | conc | vllama CPU ms/request | vllama CPU s/1k chunks | SSE events per read (via) | CPU cores used "
    "direct: engine + loadgen | via: vllama + engine + loadgen | waiting for a CPU, ms/s, via: vllama, engine, "
    "loadgen |\n|---|---|---|---|---|---|---|---|"
)


def fmt_cpu(row: dict[str, Any]) -> str:
    d, v, w = row["direct"]["cpu_util"], row["via"]["cpu_util"], row["via"]["runq_wait_ms_per_s"]
    m = row["via"]
    return (
        f"| {row['mode']} | {row['concurrency']} | {m['vllama_cpu_ms_per_request']:.3f} "
        f"| {m['vllama_cpu_s_per_1k']:.4f} | {m['events_per_read']:.1f} | {d['engine']:.2f} + {d['loadgen']:.2f} "
        f"| {v['vllama']:.2f} + {v['engine']:.2f} + {v['loadgen']:.2f} "
        f"| {w['vllama']:.0f}, {w['engine']:.0f}, {w['loadgen']:.0f} |"
    )


COMPARE_HEADER = (
    "| scenario | variant | vllama CPU ms/request | vllama CPU s/1k chunks | chunks/s via | chunks/s via/direct "
    "| TTFT p50 ms via | added TTFT p50 ms | TTFT p99 via/direct | load |\n|---|---|---|---|---|---|---|---|---|---|"
)


def compare(args: argparse.Namespace, concs: list[int], info: dict[str, Any]) -> list[str]:
    """Each variant (an upstream client name, src:PATH for another checkout, or transport:uds|tcp for where the
    children listen) in turn, `--rounds` times, one direct/via alternation per scenario each time; medians over
    the rounds."""
    variants = args.compare.split(",")
    rounds, args.rounds = args.rounds, 1
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for variant in variants:
            sub = argparse.Namespace(**vars(args))
            sub.env = list(args.env or [])
            if variant.startswith("src:"):
                sub.vllama_src = Path(variant[4:])
            elif variant.startswith("transport:"):
                sub.env.append(f"VLLAMA_CHILD_TRANSPORT={variant.partition(':')[2]}")
            else:
                sub.env.append(f"VLLAMA_PROXY_CLIENT={variant}")
            load = os.getloadavg()[0]
            for row in run(sub, concs, info):
                row["load"] = load
                results.setdefault((f"{row['mode']} c={row['concurrency']}", variant), []).append(row)
    lines = [COMPARE_HEADER]
    for (scenario, variant), rows in results.items():

        def med(f: Callable[[dict[str, Any]], float], rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(f(r) for r in rows)

        lines.append(
            f"| {scenario} | {variant} | {med(lambda r: r['via']['vllama_cpu_ms_per_request']):.3f} "
            f"| {med(lambda r: r['via']['vllama_cpu_s_per_1k']):.4f} | {med(lambda r: r['via']['chunks_s']):.0f} "
            f"| {med(lambda r: r['ratio']['chunks_s']):.3f} | {med(lambda r: r['via']['ttft_p50_ms']):.2f} "
            f"| {med(lambda r: r['added_ttft_p50_ms']):.2f} | {med(lambda r: r['ratio']['ttft_p99_ms']):.2f} "
            f"| {med(lambda r: r['load']):.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default=None, help="comma list (default 1,16,64,256; --real: 1,8)")
    p.add_argument("--modes", default="paced,max", help="paced, max (fake upstream)")
    p.add_argument("--rate", type=float, default=50.0, help="paced mode: tokens/s per stream")
    p.add_argument("--paced-tokens", type=int, default=50, help="paced mode: tokens per stream")
    p.add_argument("--paced-duration", type=float, default=4.0, help="paced mode: seconds clients keep starting")
    p.add_argument("--max-tokens", type=int, default=100, help="max mode: tokens per stream")
    p.add_argument("--max-duration", type=float, default=2.5, help="max mode: seconds clients keep starting")
    p.add_argument("--rounds", type=int, default=2, help="direct/via alternations per scenario")
    p.add_argument("--real", action="store_true", help="real vLLM (CPU build) with the tiny model")
    p.add_argument("--real-tokens", type=int, default=32)
    p.add_argument("--real-duration", type=float, default=8.0)
    p.add_argument("--quick", action="store_true", help="short phases, one round (a smoke run)")
    p.add_argument("--profile", type=Path, help="py-spy the daemon (first of --modes, --concurrency) via vllama")
    p.add_argument("--profile-native", action="store_true", help="with --profile: C frames too (uvloop, syscalls)")
    p.add_argument("--env", action="append", help="KEY=VALUE for the daemon (e.g. VLLAMA_PROXY_CLIENT=httpx)")
    p.add_argument("--out", type=Path, help="write result.json and result.md into this folder")
    p.add_argument("--vllama-src", type=Path, help="run the daemon from this checkout (e.g. an older relay)")
    p.add_argument("--daemon-nice", type=int, help="renice the daemon (only it) once the model runs (root: < 0)")
    p.add_argument(
        "--compare",
        help="variants to compare, in turn: upstream clients (raw,aiohttp,httpx), src:PATH, transport:uds|tcp",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.paced_duration, args.max_duration, args.rounds, args.real_duration = 1.5, 1.0, 1, 3.0
    concs = [int(c) for c in (args.concurrency or ("1,8" if args.real else "1,16,64,256")).split(",")]
    info = machine()
    info["command"] = " ".join(["python", "bench/proxy.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.monotonic()
    if args.compare:
        lines = compare(args, concs, info)
        rows: list[dict[str, Any]] = []
    else:
        rows = run(args, concs, info)
        lines = [HEADER, *(fmt_row(r) for r in rows), "", CPU_HEADER, *(fmt_cpu(r) for r in rows)] if rows else []
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    info["seconds"] = round(time.monotonic() - t_start, 1)
    print("\n".join(lines))
    print(f"done in {info['seconds']} s; load before {info['load_before']}, after {info['load_after']}")
    if args.out and lines:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps({"machine": info, "rows": rows, "table": lines}, indent=1))
        md = [f"# vllama proxy overhead ({info['date']})", "", f"`{info['command']}`", "", "```"]
        md += [*info.get("lscpu", []), "```", "", f"load average before {info['load_before']}, after "
               f"{info['load_after']}; {info['seconds']} s", "", *lines]  # fmt: skip
        (args.out / "result.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_loadgen"]:
        loadgen_main()
    else:
        sys.path.insert(0, str(ROOT))
        sys.exit(main())
