"""Issue 16 item 5: each vLLM child serves on a Unix socket in a folder only vllama's user can open.

Real `vllama serve` daemons over the fake engine (which binds its socket as vLLM does: over a leftover file it
fails): no TCP listening socket in a child's group, the folder 0700, another user refused by the kernel (a
forked process that becomes uid 65534), leftover sockets, strays in the folder, a home too long for a socket
path, and an older vLLM without --uds. The real-vLLM check is in test_e2e_vllm.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import (
    Daemon,
    engine_client,
    new_fake_daemon,
    processes_in_groups,
    stray_server_and_guard,
    wait_until_gone,
)
from tests.test_manager_fake import assert_echo, chat, open_stream, ps, wait_for
from vllama import engine as eng
from vllama.config import UNIX_PATH_MAX, socket_dir

NOBODY = 65534


def connect_as_nobody(path: str) -> str:
    """Connect to the Unix socket `path` from a forked process that became uid/gid 65534: "connected", or the
    error's class name (the kernel checks search permission on every folder of the path, and write on the
    socket)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        os.close(read)
        outcome = "connected"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        except OSError as exc:
            outcome = type(exc).__name__
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A short folder that every user may traverse (0755, under /tmp): there only the socket folder's own mode
    keeps other users out (pytest's tmp_path is under a 0700 folder of root's, which would hide that)."""
    folder = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def daemon(open_tmp: Path) -> Iterator[Daemon]:
    d = new_fake_daemon(open_tmp)
    d.home.chmod(0o755)
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 15), "processes of vLLM children left after vllama stopped"


def group_of(row: dict[str, Any]) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid in processes_in_groups({os.getpgid(row["pid"])})]


skip_unless_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")


@skip_unless_root
def test_child_listens_on_a_socket_only_vllamas_user_can_open(daemon: Daemon) -> None:
    daemon.write_models({"A": {"gpu_memory_gib": 2}})
    daemon.start()
    with daemon.client() as c:
        assert_echo(chat(c, "A", "hi"), "hi")
        row = ps(c)["A"]
        info = c.get("/vllama/info").json()
    run_dir = daemon.home / "run"
    assert info["child_transport"] == "uds" and info["socket_dir"] == str(run_dir)
    assert row["socket"] == str(run_dir / "A-1.sock") and row["port"] is None
    assert stat.S_ISSOCK(os.lstat(row["socket"]).st_mode)
    folder = os.lstat(run_dir)
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.geteuid()
    # the server was given the socket, and no address to bind
    cmd = psutil.Process(row["pid"]).cmdline()
    assert cmd[cmd.index("--uds") + 1] == row["socket"] and "--host" not in cmd and "--port" not in cmd, cmd
    # no process of the child's group listens on TCP (nor UDP), on any address
    group = group_of(row)
    assert group
    inet = [conn for p in group for conn in p.net_connections(kind="inet") if not conn.raddr]
    assert inet == [], inet
    # `vllama ps` and `info` show where it listens
    assert "A-1.sock" in daemon.cli("ps").stdout
    assert f"on Unix sockets in {run_dir}" in daemon.cli("info").stdout

    # another local user cannot open the socket: the folder stops it, whatever the socket's own mode
    os.chmod(row["socket"], 0o777)  # as a umask of 0 would have made it
    assert connect_as_nobody(row["socket"]) == "PermissionError"
    # ...which shows only because the folder is 0700: the same socket in a 0755 folder lets that user in
    run_dir.chmod(0o755)
    try:
        assert connect_as_nobody(row["socket"]) == "connected"
    finally:
        run_dir.chmod(0o700)
    assert connect_as_nobody(row["socket"]) == "PermissionError"


def test_leftover_sockets_and_a_loose_folder_are_repaired_at_start(daemon: Daemon) -> None:
    run_dir = daemon.home / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)
    leftover = run_dir / "A-1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(leftover))  # a child that was SIGKILLed with its vllama: the file stays, nobody answers
    daemon.write_models({"A": {"gpu_memory_gib": 2}})
    daemon.start()
    assert stat.S_IMODE(os.lstat(run_dir).st_mode) == 0o700
    assert not leftover.exists()
    log = daemon.log.read_text()
    assert "was open to other users: its mode is now 0700" in log and f"removed the leftover socket {leftover}" in log
    with daemon.client() as c:
        assert_echo(chat(c, "A", "first"), "first")
        row = ps(c)["A"]
        assert row["socket"] == str(leftover)
        # a child that dies leaves its socket file: vllama removes it once it notices, and the next start binds
        # the same path again
        os.killpg(os.getpgid(row["pid"]), signal.SIGKILL)
        wait_for(lambda: ps(c)["A"]["state"] == "error", 10, what="the death noticed")
        assert not leftover.exists()
        assert_echo(chat(c, "A", "again"), "again")
        assert ps(c)["A"]["socket"] == str(leftover)
        # streaming, sleep and wake over the socket
        text = "".join(open_stream(c, "A", "over the socket", rate=0, max_tokens=6))
        assert "over" in text and "socket" in text, text
        assert c.post("/vllama/sleep", json={"model": "A", "level": 1}).status_code == 200
        assert ps(c)["A"]["state"] == "sleeping"
        assert_echo(chat(c, "A", "awake"), "awake")
        # a stop removes the socket file
        assert c.post("/vllama/stop", json={"model": "A"}).status_code == 200
        assert not leftover.exists() and list(run_dir.iterdir()) == []


def test_strays_in_the_socket_folder_are_reported_and_skipped(daemon: Daemon) -> None:
    """A server answering on a socket of the folder (another vllama on the same home, or one whose guards
    outlived it) and a guard about to listen on one are reported, left alone, and their names skipped."""
    run_dir = daemon.home / "run"
    eng.private_dir(run_dir)
    env = {k: v for k, v in daemon.env.items() if not k.startswith("VLLAMA_FAKE")} | {"FAKE_ENGINE_STARTUP_S": "0"}
    at_a, at_b = ["--uds", str(run_dir / "A-1.sock")], ["--uds", str(run_dir / "B-1.sock")]
    with stray_server_and_guard(env, at_a, at_b) as (server, guard):
        wait_for(lambda: eng.socket_in_use(run_dir / "A-1.sock"), 15, what="the stray server to listen")
        wait_for(lambda: psutil.Process(guard.pid).children(), 5, what="the stray guard's child")
        daemon.write_models({"A": {"gpu_memory_gib": 2}, "B": {"gpu_memory_gib": 2}})
        daemon.start()
        with daemon.client() as c:
            strays = c.get("/vllama/info").json()["strays"]
            by_socket = {s["socket"]: s for s in strays}
            assert by_socket[str(run_dir / "A-1.sock")]["pid"] == server.pid, strays
            assert by_socket[str(run_dir / "B-1.sock")]["pid"] in (
                guard.pid,
                *(p.pid for p in psutil.Process(guard.pid).children()),
            ), strays
            assert f"pid {server.pid} on socket {run_dir / 'A-1.sock'}" in daemon.cli("info").stdout
            for m in "AB":
                assert_echo(chat(c, m, f"mine {m}"), f"mine {m}")
                assert ps(c)[m]["socket"] == str(run_dir / f"{m}-2.sock")
        daemon.stop()
        assert server.poll() is None and guard.poll() is None, "vllama killed processes it did not start"
        assert (run_dir / "A-1.sock").exists(), "vllama removed a socket that a live stray answers on"


def test_a_home_too_long_for_a_socket_path_uses_a_short_private_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("h" * 60) / ("o" * 60)
    deep.mkdir(parents=True)
    daemon = new_fake_daemon(deep)
    daemon.env.pop("XDG_RUNTIME_DIR", None)
    assert len(os.fsencode(daemon.home / "run" / "A-1.sock")) > UNIX_PATH_MAX
    expected = socket_dir(daemon.home)
    assert expected.parent == Path("/tmp") and expected.name.startswith(f"vllama-{os.getuid()}-")
    shutil.rmtree(expected, ignore_errors=True)
    daemon.write_models({"A": {"gpu_memory_gib": 2}})
    try:
        daemon.start()
        with daemon.client() as c:
            assert_echo(chat(c, "A", "from far away"), "from far away")
            row = ps(c)["A"]
            assert Path(row["socket"]).parent == expected
            assert c.get("/vllama/info").json()["socket_dir"] == str(expected)
        assert stat.S_IMODE(os.lstat(expected).st_mode) == 0o700
        assert f"children's sockets are in {expected}" in daemon.log.read_text()
        with engine_client(row) as child:  # the tests' own way past vllama works over the socket too
            assert child.get("/health").status_code == 200
    finally:
        groups = daemon.child_groups()
        daemon.stop()
        assert not wait_until_gone(groups, 15)
        shutil.rmtree(expected, ignore_errors=True)


@skip_unless_root
def test_a_socket_folder_made_by_another_user_is_refused(tmp_path: Path) -> None:
    """In /tmp another user could make the fallback folder first, to reach the sockets: vllama refuses it."""
    home = tmp_path / ("x" * 100) / "home"
    home.mkdir(parents=True)
    folder = socket_dir(home)
    assert folder.parent == Path("/tmp")
    folder.mkdir(mode=0o777)
    try:
        os.chown(folder, NOBODY, NOBODY)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLAMA_")} | {"VLLAMA_HOME": str(home)}
        env.pop("XDG_RUNTIME_DIR", None)
        r = subprocess.run(
            [sys.executable, "-m", "vllama", "serve", "--port", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1, r.stderr
        assert f"belongs to uid {NOBODY}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        folder.rmdir()


def test_a_vllm_without_uds_says_which_setting_to_use(daemon: Daemon) -> None:
    old = "import sys; print('api_server.py: error: unrecognized arguments: --uds ' + sys.argv[-1]); sys.exit(2)"
    daemon.write_models({"old": {"vllm_command": [sys.executable, "-c", old]}})
    daemon.start()
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "old", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    assert "VLLAMA_CHILD_TRANSPORT=tcp" in r.json()["error"]["message"]


# --- the pieces --------------------------------------------------------------------------------------------------


def test_socket_dir_is_the_home_unless_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert socket_dir(Path("/home/someone/.vllama")) == Path("/home/someone/.vllama/run")
    long_home = Path("/srv/" + "a" * 80)
    fallback = socket_dir(long_home)
    assert fallback.parent == Path("/tmp") and fallback != socket_dir(Path("/srv/" + "b" * 80))
    assert fallback == socket_dir(long_home)  # the same home finds its sockets again after a restart
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert socket_dir(long_home).parent == Path("/run/user/1000")
    for home in (long_home, Path("/home/someone/.vllama")):
        assert len(os.fsencode(socket_dir(home))) + 1 + len("x" * 40 + "-99.sock") <= UNIX_PATH_MAX


def test_private_dir_makes_repairs_and_refuses(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    assert eng.private_dir(folder) is False and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    assert eng.private_dir(folder) is True and stat.S_IMODE(folder.stat().st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(eng.EngineError, match="not a folder"):
        eng.private_dir(link)


def test_pick_socket_skips_live_and_foreign_and_removes_leftovers(open_tmp: Path) -> None:
    run = open_tmp / "r"
    eng.private_dir(run)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(run / "m-1.sock"))
    live.listen()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(run / "m-2.sock"))
        (run / "m-3.sock").write_text("not a socket")  # never removed
        assert eng.pick_socket(run, "m", []) == run / "m-2.sock" and not (run / "m-2.sock").exists()
        assert eng.pick_socket(run, "m", [run / "m-2.sock"]) == run / "m-4.sock"
        assert (run / "m-3.sock").read_text() == "not a socket"
        long = eng.pick_socket(run, "org/" + "n" * 200, [])
        assert long.parent == run and len(long.name) <= len("x" * 40 + "-99.sock")
    finally:
        live.close()
