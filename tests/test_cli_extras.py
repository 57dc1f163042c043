"""The CLI's Ollama-like habits against a daemon over fake engines: `vllama start`'s stages read from the vLLM
log (in a pipe and on a terminal), `vllama logs -f`, `vllama run` (one prompt, or a conversation from stdin),
and shell completion."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.ecosystem import ps_rows, running_daemon, wait_for
from vllama.progress import Progress, bar, scan

# lines of a real vLLM 0.11 start on a GPU (prefixes as vLLM prints them)
VLLM_LOG = """\
(APIServer pid=1200) INFO 11-25 10:00:00 [api_server.py:1839] vLLM API server version 0.11.0
(APIServer pid=1200) INFO 11-25 10:00:00 [utils.py:233] non-default args: {'model': 'Qwen/Qwen3-0.6B', 'port': 33301}
(APIServer pid=1200) INFO 11-25 10:00:05 [model.py:547] Resolved architecture: Qwen3ForCausalLM
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:09 [core.py:77] Initializing a V1 LLM engine (v0.11.0) with config: ...
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:10 [gpu_model_runner.py:2602] Starting to load model Qwen/Qwen3-0.6B...
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:12 [default_loader.py:267] Loading weights took 0.35 seconds
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:12 [gpu_model_runner.py:2653] Model loading took 1.1201 GiB and 0.91 seconds
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:18 [backends.py:548] Using cache directory: /root/.cache/vllm/torch_compile_cache/abc/rank_0_0/backbone for vLLM's torch.compile
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:18 [backends.py:559] Dynamo bytecode transform time: 5.63 s
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:25 [monitor.py:34] torch.compile takes 10.51 s in total
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:26 [gpu_worker.py:298] Available KV cache memory: 60.12 GiB
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:26 [kv_cache_utils.py:1087] GPU KV cache size: 562,864 tokens
Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67 [00:03<00:00, 20.1it/s]
(EngineCore_DP0 pid=1300) INFO 11-25 10:00:32 [gpu_model_runner.py:3480] Graph capturing finished in 5 secs, took 0.55 GiB
(APIServer pid=1200) INFO 11-25 10:00:34 [api_server.py:1880] Starting vLLM API server 0 on http://127.0.0.1:33301
(APIServer pid=1200) INFO:     Application startup complete.
"""  # noqa: E501


def test_stages_of_a_real_vllm_log() -> None:
    keys = [key for key, _ in scan(VLLM_LOG)]
    assert list(dict.fromkeys(keys)) == [
        "spawned",
        "loading",
        "loaded",
        "compiling",
        "kv_cache",
        "graphs",
        "graphs_done",
        "server",
        "ready",
    ]
    lines = dict(scan(VLLM_LOG)[::-1])  # the first line of each stage
    assert lines["loaded"] == "Loading weights took 0.35 seconds"  # vLLM's prefix is dropped
    assert lines["graphs_done"] == "Graph capturing finished in 5 secs, took 0.55 GiB"

    progress = Progress()
    assert progress.fraction == 0 and progress.current == "waiting for vLLM"
    half = VLLM_LOG.index("Dynamo")
    first = progress.feed(VLLM_LOG[:half], 1.0)
    assert [label for label, _ in first] == [
        "vLLM process spawned",
        "loading weights",
        "weights loaded",
        "compiling (torch.compile)",
    ]
    assert progress.current == "compiling (torch.compile)" and 0 < progress.fraction < 1
    rest = progress.feed(VLLM_LOG[half:], 2.0)
    assert [label for label, _ in rest][-1] == "API server up"  # each stage once: compiling is not repeated
    assert "compiling (torch.compile)" not in [label for label, _ in rest]
    assert progress.reached["compiling"][0] == 1.0
    assert bar(0.5, 10) == "█████░░░░░"


def test_stages_of_the_cpu_build_and_enforce_eager() -> None:
    log = "INFO [x.py:1] Loading weights took 0.01 GiB and 0.01 seconds\nINFO: Application startup complete.\n"
    assert [k for k, _ in scan(log)] == ["loaded", "ready"]  # stages that never show are simply not shown


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = {"A": {"gpu_memory_gib": 2}, "B": {"gpu_memory_gib": 2}, "C": {"gpu_memory_gib": 2}}
    with running_daemon(tmp_path_factory.mktemp("cli"), models) as d:
        yield d


def ok(daemon: Daemon, *args: str, stdin: str | None = None) -> str:
    env = {**daemon.env, "VLLAMA_URL": daemon.url}
    result = subprocess.run(
        [sys.executable, "-m", "vllama", *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"vllama {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_start_shows_the_stages_in_a_pipe(daemon: Daemon) -> None:
    out = ok(daemon, "start", "A")
    lines = out.splitlines()
    assert lines[0].startswith("Logs: ")
    stages = [m.group(1) for m in re.finditer(r"^  - (.+?)\s{2,}\d+\.\ds  ", out, re.M)]
    # the fake engine writes the lines of these stages (no compiling or CUDA graphs)
    assert stages == [
        "vLLM process spawned",
        "weights loaded",
        "KV cache allocated",
        "API server starting",
        "API server up",
    ], out
    assert any("Loading weights took" in line for line in lines)
    assert lines[-1].startswith("A is running on socket ")


def test_start_on_a_terminal_shows_a_progress_line(daemon: Daemon) -> None:
    ok(daemon, "stop", "B")
    master, slave = pty.openpty()
    env = {**daemon.env, "VLLAMA_URL": daemon.url, "PYTHONIOENCODING": "utf-8", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "vllama", "start", "B"], env=env, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(10) == 0, output
    text = output.decode()
    assert "✓ weights loaded" in text and "✓ API server up" in text
    assert "\r" in text and ("⠋" in text or "█" in text or "░" in text)  # the progress line, redrawn in place
    assert text.rstrip().splitlines()[-1].strip().startswith("B is running on socket ")


def sigint_ignored() -> None:
    """In the child before exec: SIGINT ignored, as a non-interactive shell leaves it for a job it starts in the
    background (how the test suite may well run): `vllama logs -f` must end on Ctrl-C all the same."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_logs_follow(daemon: Daemon) -> None:
    ok(daemon, "start", "C")
    env = {**daemon.env, "VLLAMA_URL": daemon.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllama", "logs", "C", "-f", "-n", "2"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_ignored,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen: list[str] = []

    def saw(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

    def count(text: str) -> int:
        saw(text)
        return sum(text in line for line in seen)

    try:
        # the timeouts here are hang detectors: every line waited for is already in the log
        wait_for(lambda: saw(str(ps_rows(daemon)["C"]["log"])), timeout=60)  # the header: "# <log path>"
        ok(daemon, "sleep", "C", "--level", "1")  # the fake engine logs how long it took to fall asleep
        wait_for(lambda: saw("to fall asleep"), timeout=60)
        started = count("Application startup complete")
        ok(daemon, "stop", "C")
        ok(daemon, "start", "C")  # a restart: its lines are followed too
        wait_for(lambda: count("Application startup complete") > started, timeout=60)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)  # at once, in fact: 30 s only tells a hang
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("`vllama logs -f` did not end on SIGINT") from None
    assert code == 0  # Ctrl-C ends it quietly


class _StuckLogs(BaseHTTPRequestHandler):
    """A daemon whose first /vllama/logs answer comes at once and whose next ones never come (until the test
    ends): `vllama logs -f` is then waiting for an HTTP answer."""

    waiting = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        if "offset=" in self.path:  # a poll of the follow loop
            type(self).waiting.set()
            type(self).release.wait(120)
            return
        body = json.dumps({"log": "/tmp/C_1.log", "lines": "an old line\n", "offset": 12}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_logs_follow_ctrl_c_while_waiting_for_the_daemon() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StuckLogs)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_")} | {"VLLAMA_URL": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllama", "logs", "C", "-f"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_ignored,
    )
    try:
        assert _StuckLogs.waiting.wait(60), "the follow loop never polled"
        proc.send_signal(signal.SIGINT)  # it is waiting for an answer that would take its whole 30 s timeout
        try:
            out, err = proc.communicate(timeout=30)  # at once, in fact: 30 s only tells a hang
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("`vllama logs -f` did not end on SIGINT while waiting for the daemon") from None
    finally:
        _StuckLogs.release.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, err  # ended by Ctrl-C, quietly: not by the client's timeout (an error, exit 1)
    assert out.splitlines()[:2] == ["# /tmp/C_1.log", "an old line"]
    assert "Traceback" not in err and "Error" not in err, err


def test_run_one_prompt(daemon: Daemon) -> None:
    ok(daemon, "stop", "A")
    out = ok(daemon, "run", "A", "hello there world", "--max-tokens", "4")
    assert out == "echo: hello there world\n"  # started it first; the answer only on stdout
    assert ps_rows(daemon)["A"]["state"] == "running"


def test_run_conversation_from_stdin(daemon: Daemon) -> None:
    out = ok(daemon, "run", "A", "--max-tokens", "3", stdin="first question\n\n/clear\nsecond one\n/bye\nnever sent\n")
    assert out.splitlines() == ["echo: first question", "echo: second one"]


def test_run_errors_are_one_line(daemon: Daemon) -> None:
    env = {**daemon.env, "VLLAMA_URL": daemon.url}
    result = subprocess.run(
        [sys.executable, "-m", "vllama", "run", "no-such-model", "hi"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_shell_completion(daemon: Daemon) -> None:
    vllama = Path(sys.executable).with_name("vllama")  # completion goes by the program's name: the installed script
    if not vllama.exists():
        pytest.skip("the vllama console script is not installed next to this Python")
    env = {**daemon.env, "VLLAMA_URL": daemon.url}
    # `--show-completion` takes no shell name: it writes the script for the shell it finds among its ancestor
    # processes (shellingham), i.e. for whatever started the test run — with `sh -c "pytest ..."` that is sh,
    # which typer does not support: nothing on stdout. As a user does, ask for it from a bash (its child, not
    # exec'd: the `exit` that follows keeps bash in between).
    shown = subprocess.run(
        ["bash", "-c", '"$0" --show-completion; exit $?', vllama], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "complete -o default -F _vllama_completion vllama" in shown.stdout, (shown.stdout, shown.stderr)
    env["_VLLAMA_COMPLETE"] = "complete_bash"
    for words, expected in (
        ("vllama sta", ["start"]),
        ("vllama start ", ["A", "B", "C"]),  # a MODEL: the daemon's configured models and instances
        ("vllama logs B", ["B"]),
    ):
        cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
        env_words = {**env, "COMP_WORDS": words, "COMP_CWORD": cword}
        result = subprocess.run([vllama], env=env_words, capture_output=True, text=True, timeout=120)
        assert result.stdout.split() == expected, (words, result.stdout, result.stderr)
