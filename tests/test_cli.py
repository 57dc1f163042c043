"""The `vllama` CLI as users run it (a subprocess) against a real daemon over fake engines."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Daemon, base_env, free_port


def ok(daemon: Daemon, *args: str) -> str:
    result = daemon.cli(*args)
    assert result.returncode == 0, f"vllama {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def ps_json(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {row["model"]: row for row in json.loads(ok(daemon, "ps", "--json"))["models"]}


def chat(daemon: Daemon, model: str) -> httpx.Response:
    with daemon.client() as c:
        return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def assert_log_path(daemon: Daemon, text: str, model_file_name: str) -> Path:
    match = re.search(r"^Logs: (.+)$", text, re.M)
    assert match, text
    path = Path(match.group(1).strip())
    assert path.exists(), path
    assert path.resolve().parent == (daemon.home / "logs").resolve()
    assert re.fullmatch(re.escape(model_file_name) + r"_\d+\.log", path.name), path.name
    return path


def test_info_and_ps(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 4}, "B": {"gpu_memory_gib": 2}})
    fake_daemon.start()

    out = ok(fake_daemon, "info")
    assert str(fake_daemon.port) in out
    assert str(fake_daemon.home / "models.yaml") in out
    assert "health:        ok" in out
    assert "A, B" in out  # configured models
    assert re.search(r"\[0\] .*8\.0G", out), out  # the simulated 8 GiB device

    assert "no model instances" in ok(fake_daemon, "ps")
    assert json.loads(ok(fake_daemon, "ps", "--json"))["models"] == []

    assert chat(fake_daemon, "A").status_code == 200
    assert chat(fake_daemon, "B").status_code == 200
    lines = ok(fake_daemon, "ps").rstrip("\n").splitlines()
    assert len(lines) == 3, lines
    header, rows = lines[0], lines[1:]
    columns = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    assert [name for _, name in columns][:4] == ["MODEL", "STATE", "ADDRESS", "PID"]
    assert "LAST ACCESS" in [name for _, name in columns]
    # aligned: every cell starts exactly where its column's header starts
    for row in rows:
        for start, name in columns[1:]:
            assert row[start - 2 : start] == "  " and row[start] != " ", (name, header, row)
    by_model = {row.split()[0]: row for row in rows}
    assert set(by_model) == {"A", "B"}
    assert by_model["A"].split()[1] == "running"

    data = ps_json(fake_daemon)
    assert data["A"]["state"] == "running" and data["A"]["socket"] and data["A"]["pid"]
    assert data["A"]["port"] is None  # children listen on Unix sockets, not ports
    assert data["B"]["devices"] == [0]

    # a models.yaml broken while the daemon runs: info says so, the last good configuration stays in use
    fake_daemon.write_models({"A": {"gpu_memory_gib": 4, "max_model_len": "long"}})
    out = ok(fake_daemon, "info")
    assert re.search(r"config error: .*'A'.*max_model_len.*long", out), out
    assert "A, B" in out
    assert chat(fake_daemon, "B").status_code == 200


def test_start_sleep_wake_stop_logs(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 4}})
    fake_daemon.start()

    out = ok(fake_daemon, "start", "A")
    log = assert_log_path(fake_daemon, out, "A")
    assert out.rstrip().splitlines()[-1].startswith("A is running on socket ")
    assert ps_json(fake_daemon)["A"]["state"] == "running"

    logs = ok(fake_daemon, "logs", "A", "-n", "5").rstrip("\n").splitlines()
    assert logs[0] == f"# {log}"
    assert 1 <= len(logs) - 1 <= 5
    assert logs[1:] == log.read_text().rstrip("\n").splitlines()[-(len(logs) - 1) :]

    out = ok(fake_daemon, "sleep", "A", "--level", "1")
    assert "A is sleeping (level 1)" in out
    row = ps_json(fake_daemon)["A"]
    assert (row["state"], row["sleep_level"]) == ("sleeping", 1)
    assert "sleeping (L1)" in ok(fake_daemon, "ps")

    out = ok(fake_daemon, "start", "A")  # wakes it
    assert "A is running" in out
    assert ps_json(fake_daemon)["A"]["state"] == "running"

    out = ok(fake_daemon, "sleep", "A")  # default level 2
    assert "A is sleeping (level 2)" in out
    assert ps_json(fake_daemon)["A"]["sleep_level"] == 2

    out = ok(fake_daemon, "sleep", "A", "--level", "3")
    assert "A is stopped" in out
    assert ps_json(fake_daemon)["A"]["state"] == "stopped"

    ok(fake_daemon, "start", "A")
    out = ok(fake_daemon, "stop", "A")
    assert "A is stopped" in out
    row = ps_json(fake_daemon)["A"]
    assert row["state"] == "stopped" and row["pid"] is None


def test_assign(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 4, "max_model_len": 2048}})
    fake_daemon.start()
    models_yaml = fake_daemon.home / "models.yaml"

    out = ok(fake_daemon, "assign", "A", "--gpu-memory", "0.3", "--devices", "0")
    assert "restarted" not in out
    entry = yaml.safe_load(models_yaml.read_text())["A"]
    # the fraction replaces the GiB setting (they are exclusive); other keys stay
    assert entry == {"gpu_memory_utilization": 0.3, "devices": [0], "max_model_len": 2048}

    # a new model gets an entry of its own
    ok(fake_daemon, "assign", "New/model", "--gpu-memory-gib", "2", "--keep-alive", "10m", "--pinned")
    assert yaml.safe_load(models_yaml.read_text())["New/model"] == {
        "gpu_memory_gib": 2.0,
        "keep_alive": "10m",
        "pinned": True,
    }

    # invalid settings are refused and the file is left alone
    before = models_yaml.read_text()
    refused = [["--gpu-memory", "1.5"], ["--devices", "a"], ["--keep-alive", "soon"], []]
    env = {**fake_daemon.env, "VLLAMA_URL": fake_daemon.url}
    for args, rc, stdout, stderr in run_all([["assign", "A", *a] for a in refused], env):
        assert rc == 1, (args, stdout, stderr)
        assert "Traceback" not in stderr
        assert len(stderr.splitlines()) == 1 and stderr.startswith("Error: "), stderr
        if args == ["assign", "A"]:
            assert "nothing to assign" in stderr
    assert models_yaml.read_text() == before

    # --restart restarts a running model with its new settings
    ok(fake_daemon, "start", "A")
    old_pid = ps_json(fake_daemon)["A"]["pid"]
    out = ok(fake_daemon, "assign", "A", "--gpu-memory-gib", "3", "--restart")
    assert "(restarted)" in out
    row = ps_json(fake_daemon)["A"]
    assert row["state"] == "running"
    assert row["pid"] and row["pid"] != old_pid
    assert row["need_bytes"] == 3 * 1024**3
    assert yaml.safe_load(models_yaml.read_text())["A"]["gpu_memory_gib"] == 3


def test_start_failure_reports_error_and_log(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"F": {"gpu_memory_gib": 1, "env": {"FAKE_ENGINE_FAIL": "kaboom"}}})
    fake_daemon.start()
    result = fake_daemon.cli("start", "F")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "kaboom" in result.stderr
    log = str(fake_daemon.home / "logs")
    assert log in result.stderr  # the error says where the log is
    assert_log_path(fake_daemon, result.stdout, "F")

    result = fake_daemon.cli("start", "no-such-model")
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_start_log_file_name_is_filesystem_safe(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"org/Model:v1": {"gpu_memory_gib": 1}})
    fake_daemon.start()
    out = ok(fake_daemon, "start", "org/Model:v1")
    assert_log_path(fake_daemon, out, "org_Model_v1")


COMMANDS = [
    ["info"],
    ["ps"],
    ["ps", "--json"],
    ["start", "A"],
    ["stop", "A"],
    ["sleep", "A", "--level", "1"],
    ["assign", "A", "--gpu-memory", "0.5"],
    ["logs", "A", "-n", "5"],
]


def run_all(commands: list[list[str]], env: dict[str, str]) -> list[tuple[list[str], int, str, str]]:
    """Run several CLI commands at once (they mostly wait on imports)."""
    procs = [
        (
            args,
            subprocess.Popen(
                [sys.executable, "-m", "vllama", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    results = []
    for args, proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        results.append((args, proc.returncode, stdout, stderr))
    return results


def test_every_command_without_a_daemon(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    commands = [*COMMANDS, ["ps", "--url", f"127.0.0.1:{port}/"]]  # no scheme, trailing slash: same URL
    for args, rc, stdout, stderr in run_all(commands, base_env(tmp_path, VLLAMA_URL=url)):
        assert rc == 1, (args, stdout, stderr)
        assert stderr.strip().splitlines() == [
            f"Error: vllama is not running at {url} (start it with `vllama serve`, or set VLLAMA_URL)"
        ], (args, stderr)


@pytest.fixture
def not_vllama() -> Iterator[str]:
    """An HTTP server that is not vllama: HTML 404 everywhere, HTML 200 on /vllama/info."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path.startswith("/vllama/info") else 404
            body = b"<html><body>\nnot here\n</body></html>\n"
            self.send_response(status)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_that_is_not_vllama(tmp_path: Path, not_vllama: str) -> None:
    for args, rc, stdout, stderr in run_all(
        [["info"], ["ps"], ["stop", "A"]], base_env(tmp_path, VLLAMA_URL=not_vllama)
    ):
        assert rc == 1, (args, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and not_vllama in lines[0], (args, stderr)


def run_serve(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllama", "serve", "--port", str(free_port()), "--host", "127.0.0.1"],
        env=base_env(home, VLLAMA_GPU_PROBE="fake", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"Qwen/Qwen3-0.6B": {"gpu_memory_utilisation": 0.5}}, ["Qwen/Qwen3-0.6B", "gpu_memory_utilisation"]),
        ({"A": {"devices": [0], "tensor_parallel_size": 2}}, ["'A'", "tensor_parallel_size"]),
    ],
)
def test_serve_refuses_invalid_models_yaml(tmp_path: Path, models: dict[str, Any], expected: list[str]) -> None:
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    t0 = time.monotonic()
    result = run_serve(tmp_path)
    assert time.monotonic() - t0 < 15
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr
    assert str(tmp_path / "models.yaml") in result.stderr


def test_serve_refuses_invalid_yaml_and_env(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("A: [unclosed\n")
    result = run_serve(tmp_path)
    assert result.returncode == 1 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr

    (tmp_path / "models.yaml").write_text("A: {}\n")
    result = run_serve(tmp_path, VLLAMA_PORT_RANGE="lots")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "VLLAMA_PORT_RANGE" in result.stderr and "Traceback" not in result.stderr

    # issue 16: a number out of its range is refused at start, naming the variable and the range
    result = run_serve(tmp_path, VLLAMA_KEEP_ALIVE_INTERVAL="0")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "VLLAMA_KEEP_ALIVE_INTERVAL='0'" in result.stderr and ">= 0.1 and <= 86400" in result.stderr
    assert "Traceback" not in result.stderr


def test_ps_table_aligns_wide_characters() -> None:
    from vllama.cli import _format_ps, _width

    rows = [
        {"model": name, "state": "sleeping", "sleep_level": 1, "port": 33300, "pid": 42, "devices": [0, 1],
         "memory_bytes": {"0": 2 * 1024**3}, "in_flight": 0, "last_access": 0, "idle_seconds": 3.2}
        for name in ("A", "模型/中文", "ünïcode")
    ]  # fmt: skip
    header, *lines = _format_ps(rows).splitlines()
    state_col = header.index("STATE")
    for line, row in zip(lines, rows, strict=True):
        name = row["model"]
        assert line.startswith(name)
        # the STATE cell starts in the same terminal column as its header
        assert _width(line[: line.index("sleeping (L1)")]) == state_col, line
        assert "0,1" in line and "2.0G" in line
