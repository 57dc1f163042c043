"""Faults survived, nothing lost: fault injection with real processes (a real `vllama serve` over fake engines).

Child faults: a child SIGKILLed mid-stream or mid-answer, a child that hangs while starting, a child whose port
another process takes, a crash loop. Daemon faults: SIGKILL (of vllama, and of vllama with every guard at once),
strays left on the port range, SIGTERM with a drain that runs out. Edge cases: a request that arrives while its
model is being stopped, and admin commands on one model at the same time.

No assertion depends on how long something took (the CI machine has 2 shared cores): what must still be going
is held by a gate or is far from its end, and timeouts are only hang detectors.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import Daemon, processes_in_groups, stray_server_and_guard, wait_until_gone
from tests.test_manager_fake import (
    Gate,
    Stream,
    assert_echo,
    assert_openai_error,
    attempts,
    chat,
    chat_body,
    chat_once,
    engine_stats,
    expected_stream_text,
    ledger,
    messages,
    openai_client,
    post_once,
    ps,
    states,
    wait_for,
    wait_spawned,
    wait_state,
)

# --- helpers ---------------------------------------------------------------------------------------------------


def port_range(daemon: Daemon) -> tuple[int, int]:
    lo, hi = daemon.env["VLLAMA_PORT_RANGE"].split("-")
    return int(lo), int(hi)


def listening_ports(lo: int, hi: int) -> dict[int, int | None]:
    """port → pid of every TCP socket listening on a port of [lo, hi]."""
    return {
        c.laddr.port: c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and lo <= c.laddr.port <= hi
    }


def group_of(pid: int) -> int:
    return os.getpgid(pid)


class RawStream:
    """An open streamed chat completion on its own connection; read it with `read_events`."""

    def __init__(self, daemon: Daemon, model: str, text: str, *, rate: float, max_tokens: int) -> None:
        self.client = httpx.Client(base_url=daemon.url, timeout=30)  # a hang detector
        body = chat_body(model, text, stream=True, fake_token_rate=rate, max_tokens=max_tokens)
        self.r = self.client.send(self.client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert self.r.status_code == 200, self.r.read()
        self.lines = self.r.iter_lines()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.r.close()
        self.client.close()


def read_events(stream: RawStream, n: int | None = None) -> list[str]:
    """`data:` payloads of the stream: the next `n`, or all until the stream ends."""
    out: list[str] = []
    for line in stream.lines:
        if line.startswith("data: "):
            out.append(line[len("data: ") :])
            if n is not None and len(out) >= n:
                break
    return out


def daemon_log(daemon: Daemon) -> str:
    return daemon.log.read_text(errors="replace")


# --- child faults ----------------------------------------------------------------------------------------------


def test_child_sigkilled_mid_stream_ends_with_error_event_others_unaffected(fake_daemon: Daemon) -> None:
    core = {"FAKE_ENGINE_CORE_PROCESS": "1"}  # memory held by a child process, like vLLM's EngineCore
    fake_daemon.write_models({"victim": {"gpu_memory_gib": 3, "env": core}, "bystander": {"gpu_memory_gib": 3}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "victim", "warm"), "warm")
        assert_echo(chat(c, "bystander", "warm"), "warm")
        bystander_pid = ps(c)["bystander"]["pid"]
        # the bystander streams through the whole fault (~2.5 s)
        bystander = Stream(fake_daemon, "bystander", "carry on", rate=20, max_tokens=50)
        bystander.wait_started()

        # 1. streamed: the client gets the tokens so far, then an error event in the OpenAI shape, then the end
        with RawStream(fake_daemon, "victim", "cut short", rate=10, max_tokens=200) as stream:  # 20 s if uncut
            first = read_events(stream, 3)
            assert all("error" not in json.loads(e) for e in first)
            group = group_of(ps(c)["victim"]["pid"])
            os.killpg(group, signal.SIGKILL)
            rest = read_events(stream)  # a stream that hung after its child died would time out reading
        assert rest, "the stream ended without telling the client"
        assert rest[-1] != "[DONE]", "a cut stream must not look complete"
        err = json.loads(rest[-1])["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["code"] == "upstream_error", err
        assert "victim" in err["message"] and "log:" in err["message"], err
        m = wait_state(c, "victim", "error", timeout=5)
        assert "exited unexpectedly" in m["last_error"], m
        wait_for(lambda: ps(c)["victim"]["in_flight"] == 0, 5, what="the cut stream no longer in flight")
        assert not wait_until_gone({group}, 5)

        # 2. the next request restarts it
        assert_echo(chat(c, "victim", "back"), "back")
        assert attempts(fake_daemon, "victim") == 2

        # 3. not streamed: nothing of the answer was sent when the child died, so the client gets either a clean
        # 502 in the OpenAI shape, or (once the relay resends requests whose child died before answering) the
        # whole answer from a fresh child — never a hang, a 500 or a truncated body
        with ThreadPoolExecutor(1) as pool:
            body = chat_body("victim", "not streamed") | {"max_tokens": 10, "fake_token_rate": 5}  # ~2 s
            slow = pool.submit(post_once, fake_daemon, "/v1/chat/completions", body)
            wait_for(lambda: ps(c)["victim"]["in_flight"] == 1, 30, what="request in flight")
            row = ps(c)["victim"]
            wait_for(lambda: engine_stats(row)["in_flight"] == 1, 30, what="the child answering it")
            os.killpg(group_of(ps(c)["victim"]["pid"]), signal.SIGKILL)
            r = slow.result(30)
        if r.status_code == 502:
            assert "victim" in assert_openai_error(r, 502, "upstream_error")["message"]
            wait_state(c, "victim", "error", timeout=5)
        else:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected_stream_text("not streamed", 10)

        # 4. the official client surfaces a mid-stream death as an error, not as a silently short answer
        assert_echo(chat(c, "victim", "again"), "again")
        with openai_client(fake_daemon) as oc:
            stream = oc.chat.completions.create(
                model="victim",
                messages=messages("through the openai client"),
                max_tokens=200,
                stream=True,
                extra_body={"fake_token_rate": 10},
            )
            got = 0
            with pytest.raises(openai.APIError):
                for _ in stream:
                    got += 1
                    if got == 3:
                        os.killpg(group_of(ps(c)["victim"]["pid"]), signal.SIGKILL)
        wait_state(c, "victim", "error", timeout=5)

        # the bystander never noticed
        assert bystander.result() == expected_stream_text("carry on", 50)
        assert ps(c)["bystander"]["pid"] == bystander_pid
        assert attempts(fake_daemon, "bystander") == 1
        assert all(m["in_flight"] == 0 for m in ps(c).values())
        assert_echo(chat(c, "victim", "and again"), "and again")


def test_child_hanging_at_start_times_out_with_503_and_its_group_killed(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_STOP_TIMEOUT"] = "1"
    hang = {"FAKE_ENGINE_HANG": "1", "FAKE_ENGINE_IGNORE_SIGTERM": "1"}  # only SIGKILL ends it
    fake_daemon.write_models(
        {"hangs": {"gpu_memory_gib": 3, "startup_timeout": "2s", "env": hang}, "fine": {"gpu_memory_gib": 3}}
    )
    fake_daemon.start()
    with fake_daemon.client() as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_once, fake_daemon, "/v1/chat/completions", chat_body("hangs", "anyone there"))
        group = group_of(wait_spawned(c, "hangs")["pid"])
        assert_echo(chat(c, "fine", "not blocked"), "not blocked")  # another model is unaffected meanwhile
        r = pending.result(60)
        err = assert_openai_error(r, 503, "model_unavailable")
        assert "did not become ready within 2 s" in err["message"], err  # it ran out the start timeout
        assert str(fake_daemon.home / "logs") in err["message"], err
        assert not wait_until_gone({group}, 5), "the hung child's process group outlived its start timeout"
        m = ps(c)["hangs"]
        assert m["state"] == "error" and m["pid"] is None and m["in_flight"] == 0, m
        assert len(ledger(fake_daemon)) == 1  # only "fine" holds memory
        assert_echo(chat(c, "fine", "still fine"), "still fine")


class _Squatter(BaseHTTPRequestHandler):
    """An HTTP server that answers 200 to everything: a stray that would pass a health check."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = b'{"squatter": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_port_taken_is_retried_on_another_port(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_CHILD_TRANSPORT"] = "tcp"  # children on ports (a vLLM without --uds)
    lo, _ = port_range(fake_daemon)
    # the child binds only once its gate is opened: the squatter takes the port first, then opens it
    gates = {m: Gate(fake_daemon, f"start-{m}") for m in ("raced", "answered")}
    fake_daemon.write_models(
        {
            "first": {"gpu_memory_gib": 1},
            **{m: {"gpu_memory_gib": 1, "env": {"FAKE_ENGINE_START_GATE": str(g)}} for m, g in gates.items()},
        }
    )
    fake_daemon.start()
    logs = fake_daemon.home / "logs"
    squatters: list[Any] = []
    try:
        # 1. a port taken before vllama picks one is skipped
        held = socket.socket()
        held.bind(("127.0.0.1", lo))
        held.listen()
        squatters.append(held)
        with fake_daemon.client() as c:
            assert_echo(chat(c, "first", "hi"), "hi")
            assert ps(c)["first"]["port"] != lo

        def squat_when_launched(model: str, serve_http: bool) -> threading.Thread:
            """Take the child's port after vllama picked it (its log file appears) and before it binds (its
            start gate is still closed), then let the child go on."""

            def run() -> None:
                deadline = time.monotonic() + 60  # a hang detector
                while time.monotonic() < deadline:
                    found = list(logs.glob(f"{model}_*.log"))
                    if found:
                        port = int(found[0].stem.rsplit("_", 1)[1])
                        if serve_http:
                            server = ThreadingHTTPServer(("127.0.0.1", port), _Squatter)
                            threading.Thread(target=server.serve_forever, daemon=True).start()
                            squatters.append(server)
                        else:
                            s = socket.socket()
                            s.bind(("127.0.0.1", port))
                            s.listen()
                            squatters.append(s)
                        gates[model].open()
                        return
                    time.sleep(0.005)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            return t

        with fake_daemon.client() as c:
            # 2. a bare socket takes the port: the child exits with "address already in use" → another port
            t = squat_when_launched("raced", serve_http=False)
            assert_echo(chat(c, "raced", "despite the race"), "despite the race")
            t.join(30)
            taken = squatters[-1].getsockname()[1]
            assert ps(c)["raced"]["port"] != taken
            assert attempts(fake_daemon, "raced") == 2
            assert f"port {taken} was taken by another process" in daemon_log(fake_daemon)

            # 3. an HTTP server takes it and answers the health check: vllama must not adopt it
            t = squat_when_launched("answered", serve_http=True)
            r = chat(c, "answered", "not the squatter")
            t.join(30)
            assert_echo(r, "not the squatter")
            taken = squatters[-1].server_address[1]
            m = ps(c)["answered"]
            assert m["port"] != taken and m["state"] == "running"
            assert attempts(fake_daemon, "answered") == 2
            # the answering process is ours: a descendant of vllama
            pids = {p.pid for p in fake_daemon.descendants()}
            assert listening_ports(m["port"], m["port"])[m["port"]] in pids
            assert all(v["in_flight"] == 0 for v in ps(c).values())
    finally:
        for s in squatters:
            if isinstance(s, ThreadingHTTPServer):
                s.shutdown()
                s.server_close()
            else:
                s.close()
    assert len(fake_daemon.child_groups()) == 3


def test_request_right_after_a_crash_is_not_lost(fake_daemon: Daemon) -> None:
    """A request sent in the few milliseconds between a child's death and vllama noticing it was never
    delivered: it should go to a fresh child, not fail."""
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2, "env": {"FAKE_ENGINE_STARTUP_S": "0.02"}}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        for i in range(3):
            assert_echo(chat(c, "A", f"warm {i}"), f"warm {i}")
            os.killpg(group_of(ps(c)["A"]["pid"]), signal.SIGKILL)
            assert_echo(chat(c, "A", f"right after {i}"), f"right after {i}")


CRASH_ROUNDS = int(os.environ.get("VLLAMA_CRASH_ROUNDS", "50"))


def test_crash_loop_leaks_nothing(fake_daemon: Daemon) -> None:
    """Kill the child in many ways, again and again, sometimes mid-stream; each time the next request restarts
    it. Afterwards: no process, listening socket, daemon file descriptor or in-flight count is left over."""
    fast = {"FAKE_ENGINE_STARTUP_S": "0.02"}
    fake_daemon.write_models(
        {
            "loop": {"gpu_memory_gib": 2, "env": {**fast, "FAKE_ENGINE_CORE_PROCESS": "1"}},
            "steady": {"gpu_memory_gib": 2},
        }
    )
    fake_daemon.start()
    lo, hi = port_range(fake_daemon)
    assert fake_daemon.proc is not None
    me = psutil.Process(fake_daemon.proc.pid)
    modes = ["group", "server", "guard", "core"]
    figures: dict[str, Any] = {}
    with fake_daemon.client() as c:
        assert_echo(chat(c, "steady", "here all along"), "here all along")
        steady_pid = ps(c)["steady"]["pid"]

        def one_round(i: int) -> None:
            m = ps(c).get("loop")
            if m is None or m["state"] != "running":
                assert_echo(chat(c, "loop", f"round {i}"), f"round {i}")
                m = ps(c)["loop"]
            server = psutil.Process(m["pid"])
            guard = server.parent()
            assert guard is not None
            mode = modes[i % len(modes)]
            stream = None
            if i % 2 == 0:  # half the rounds die with a request in flight
                stream = RawStream(fake_daemon, "loop", f"stream {i}", rate=20, max_tokens=100)
                read_events(stream, 2)
            if mode == "group":
                os.killpg(guard.pid, signal.SIGKILL)
            elif mode == "server":
                server.kill()
            elif mode == "guard":
                guard.kill()
            else:  # the "EngineCore" alone dies: the fake server lives on, as vLLM's would not; stop the server
                for child in server.children():
                    child.kill()
                server.terminate()
            if stream is not None:
                with stream:
                    rest = read_events(stream)
                assert rest and rest[-1] != "[DONE]", (i, mode, rest[-2:])
                assert "error" in json.loads(rest[-1]), (i, mode, rest[-1])
            wait_for(lambda: ps(c)["loop"]["state"] == "error", 10, what=f"round {i} ({mode}): error state")
            assert_echo(chat(c, "loop", f"round {i}"), f"round {i}")

        for i in range(4):  # warm up: connection pools, lazy imports, log files
            one_round(i)
        fds_before = me.num_fds()
        rss_before = me.memory_info().rss
        t0 = time.monotonic()
        for i in range(4, 4 + CRASH_ROUNDS):
            one_round(i)
        figures["seconds"] = round(time.monotonic() - t0, 1)
        # the last closed connections and reaped processes settle: wait for the count (30 s: a hang detector)
        deadline = time.monotonic() + 30
        while (fds_after := me.num_fds()) > fds_before + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        s = ps(c)
        figures |= {"rounds": CRASH_ROUNDS, "fds": (fds_before, fds_after), "rss": (rss_before, me.memory_info().rss)}
        assert s["loop"]["state"] == "running" and s["steady"]["pid"] == steady_pid
        assert all(m["in_flight"] == 0 for m in s.values()), s
        assert engine_stats(s["loop"])["in_flight"] == 0
        # processes: two groups (loop, steady), each a guard + a server (+ loop's core), nothing else
        groups = fake_daemon.child_groups()
        assert groups == {group_of(s["loop"]["pid"]), group_of(steady_pid)}, groups
        assert len(fake_daemon.descendants()) == 5, [p.cmdline() for p in fake_daemon.descendants()]
        # sockets in the children's folder: only the two live children's (a dead child's is replaced at its
        # restart), and nothing listens on the port range
        run_dir = Path(s["loop"]["socket"]).parent
        assert sorted(run_dir.glob("*.sock")) == sorted(Path(s[m]["socket"]) for m in ("loop", "steady"))
        assert not listening_ports(lo, hi)
        # memory ledger: only the two live children hold memory
        assert len(ledger(fake_daemon)) == 2
        assert fds_after <= fds_before + 4, f"daemon file descriptors grew: {fds_before} → {fds_after}"
    assert attempts(fake_daemon, "loop") == 5 + CRASH_ROUNDS
    print(f"crash loop: {figures}")


# --- daemon faults ---------------------------------------------------------------------------------------------


def test_sigkill_of_daemon_mid_start_mid_stream_and_asleep_leaves_nothing(fake_daemon: Daemon) -> None:
    core = {"FAKE_ENGINE_CORE_PROCESS": "1"}
    fake_daemon.write_models(
        {
            "streaming": {"gpu_memory_gib": 2, "env": core},
            "asleep": {"gpu_memory_gib": 2, "env": core},
            "starting": {"gpu_memory_gib": 2, "env": {"FAKE_ENGINE_HANG": "1"}},
        }
    )
    fake_daemon.start()
    with fake_daemon.client() as c, ThreadPoolExecutor(1) as pool:
        assert_echo(chat(c, "streaming", "hi"), "hi")
        assert_echo(chat(c, "asleep", "hi"), "hi")
        assert c.post("/vllama/sleep", json={"model": "asleep", "level": 1}).status_code == 200
        pool.submit(post_once, fake_daemon, "/vllama/start", {"model": "starting"})
        wait_spawned(c, "starting")
        stream = RawStream(fake_daemon, "streaming", "interrupted", rate=10, max_tokens=200)
        read_events(stream, 2)
        groups = fake_daemon.child_groups()
        assert len(groups) == 3 and len(processes_in_groups(groups)) >= 8  # 3 guards, 3 servers, 2 cores
        fake_daemon.stop(signal.SIGKILL)
        with stream, contextlib.suppress(httpx.HTTPError):
            read_events(stream)  # the stream ends (the connection dropped), it does not hang
        assert not wait_until_gone(groups, 5), "children outlived a SIGKILLed vllama"
        assert ledger(fake_daemon) == {}


def test_sigkill_of_daemon_and_every_guard_at_once_leaves_nothing(fake_daemon: Daemon) -> None:
    """`pkill -9 -f vllama` takes vllama and the guards together: the servers must still stop (the kernel
    tells each server its guard died) and take their cores with them."""
    core = {"FAKE_ENGINE_CORE_PROCESS": "1"}
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2, "env": core}, "B": {"gpu_memory_gib": 2, "env": core}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "hi"), "hi")
        assert_echo(chat(c, "B", "hi"), "hi")
        servers = [ps(c)[m]["pid"] for m in "AB"]
    groups = fake_daemon.child_groups()
    guards = [psutil.Process(pid).parent() for pid in servers]
    assert fake_daemon.proc is not None
    for proc in [psutil.Process(fake_daemon.proc.pid), *guards]:
        assert proc is not None
        proc.kill()
    fake_daemon.proc.wait(5)
    assert not wait_until_gone(groups, 10), "vLLM servers outlived their SIGKILLed guards"
    assert ledger(fake_daemon) == {}


def test_restarted_daemon_reports_strays_and_skips_their_ports(fake_daemon: Daemon, tmp_path: Path) -> None:
    """Leftovers on vllama's port range (a vLLM server, a guard of a vllama gone) are reported in the log and in
    `vllama info`, never adopted or killed, and their ports are not used (children on ports: for the sockets,
    see test_child_socket.py)."""
    fake_daemon.env["VLLAMA_CHILD_TRANSPORT"] = "tcp"
    lo, _ = port_range(fake_daemon)
    env = {k: v for k, v in fake_daemon.env.items() if not k.startswith("VLLAMA_FAKE")}
    env["FAKE_ENGINE_STARTUP_S"] = "0"
    at = ["--host", "127.0.0.1", "--port"]
    with stray_server_and_guard(env, [*at, str(lo)], [*at, str(lo + 1)]) as (server, guard):
        wait_for(lambda: lo in listening_ports(lo, lo), 15, what="the stray server to listen")
        wait_for(lambda: psutil.Process(guard.pid).children(), 5, what="the stray guard's child")
        fake_daemon.write_models({"A": {"gpu_memory_gib": 2}, "B": {"gpu_memory_gib": 2}})
        fake_daemon.start()
        with fake_daemon.client() as c:
            strays = c.get("/vllama/info").json()["strays"]
            by_port: dict[int, set[int]] = {}
            for s in strays:
                by_port.setdefault(s["port"], set()).add(s["pid"])
            assert server.pid in by_port.get(lo, set()), strays
            assert guard.pid in by_port.get(lo + 1, set()), strays
            assert any(s["kind"] == "vllama guard" for s in strays), strays
            assert "stray process" in daemon_log(fake_daemon)
            out = fake_daemon.cli("info")
            assert out.returncode == 0 and f"pid {server.pid} on port {lo}" in out.stdout, out.stdout
            for m in "AB":
                assert_echo(chat(c, m, f"mine {m}"), f"mine {m}")
            ours = {p.pid for p in fake_daemon.descendants()}
            for m in "AB":
                row = ps(c)[m]
                assert row["port"] not in (lo, lo + 1), row
                assert row["pid"] in ours
        fake_daemon.stop()
        assert server.poll() is None and guard.poll() is None, "vllama killed processes it did not start"


def test_sigterm_stops_accepting_drains_bounded_and_stops_children(fake_daemon: Daemon) -> None:
    """After SIGTERM: new connections are refused, a request in flight that ends within the grace is let
    finish (held until the test lets it go, well within the grace), one that would not (300 s) is cut."""
    fake_daemon.env["VLLAMA_SHUTDOWN_GRACE"] = "5"
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2}, "B": {"gpu_memory_gib": 2}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "hi"), "hi")
        assert_echo(chat(c, "B", "hi"), "hi")
    groups = fake_daemon.child_groups()
    hold = Gate(fake_daemon, "short")
    short = Stream(fake_daemon, "B", "finishes in time", rate=0, max_tokens=8, hold=hold)  # drained
    long = RawStream(fake_daemon, "A", "too long", rate=1, max_tokens=300)  # 300 s: cut after the grace
    read_events(long, 2)
    short.wait_started()
    assert fake_daemon.proc is not None
    fake_daemon.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(f"{fake_daemon.url}/health", timeout=0.5)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            return False
        return False

    wait_for(refused, 30, what="new connections refused after SIGTERM")
    assert fake_daemon.proc.poll() is None, "vllama should still be draining (a stream is held in flight)"
    assert not short.future.done()
    hold.open()
    assert short.result() == expected_stream_text("finishes in time", 8)
    rest: list[str] = []
    with long, contextlib.suppress(httpx.HTTPError):
        rest = read_events(long)
    assert "[DONE]" not in rest, "the long stream was waited for: the drain after SIGTERM is not bounded"
    assert fake_daemon.proc.wait(60) == 0  # the grace is 5 s, the long stream 300 s: 60 s is a hang detector
    assert not wait_until_gone(groups, 30)
    assert ledger(fake_daemon) == {}


# --- graceful edge cases ---------------------------------------------------------------------------------------


def test_request_while_model_is_being_stopped_waits_then_starts_it(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_STOP_TIMEOUT"] = "3600"
    slow_stop = {"FAKE_ENGINE_IGNORE_SIGTERM": "1"}  # the stop lasts until the test SIGKILLs the child
    fake_daemon.write_models({"A": {"gpu_memory_gib": 3, "env": slow_stop}, "B": {"gpu_memory_gib": 3}})
    fake_daemon.start()
    with fake_daemon.client() as c, ThreadPoolExecutor(2) as pool:
        # 1. while it is stopping (the process is going away, and still answers: it ignores SIGTERM)
        assert_echo(chat(c, "A", "warm"), "warm")
        old = ps(c)["A"]["pid"]
        stop = pool.submit(post_once, fake_daemon, "/vllama/stop", {"model": "A"})
        wait_state(c, "A", "stopping", timeout=30)
        request = pool.submit(chat_once, fake_daemon, "A", "are you there")
        assert ps(c)["A"]["state"] == "stopping"
        assert not request.done() and not stop.done(), "answered while the old child was still being stopped"
        os.killpg(group_of(old), signal.SIGKILL)  # the stop ends
        assert stop.result(30).json()["state"] == "stopped"
        assert_echo(request.result(30), "are you there")
        m = ps(c)["A"]
        assert m["state"] == "running" and m["pid"] != old and m["in_flight"] == 0
        # what the new child served: its warm-up completion after the start, and the request
        assert engine_stats(m)["served"] == 2, "the request was not served by the new child"

        # 2. while it is draining for a stop (a stream in flight): the stream completes, then the new request
        # starts it again
        hold = Gate(fake_daemon, "let-me-finish")
        stream = Stream(fake_daemon, "B", "let me finish", rate=10, max_tokens=12, hold=hold)  # held in flight
        stream.wait_started()
        old = ps(c)["B"]["pid"]
        stop = pool.submit(post_once, fake_daemon, "/vllama/stop", {"model": "B"})
        wait_state(c, "B", "draining", timeout=30)
        late = pool.submit(post_once, fake_daemon, "/v1/chat/completions", chat_body("B", "after the stop"))
        assert not stop.done() and not late.done(), "answered while a stream was still in flight"
        hold.open()
        assert stream.result() == expected_stream_text("let me finish", 12)
        assert stop.result(30).json()["state"] == "stopped"
        assert_echo(late.result(30), "after the stop")
        m = ps(c)["B"]
        assert m["state"] == "running" and m["pid"] != old and m["in_flight"] == 0

        # A's new child ignores SIGTERM too: end it here, or the daemon's shutdown would wait the hour for it
        os.killpg(group_of(ps(c)["A"]["pid"]), signal.SIGKILL)
        wait_state(c, "A", "error", timeout=30)


def test_concurrent_admin_commands_on_one_model_never_interleave(fake_daemon: Daemon) -> None:
    """stop+start, sleep+sleep, assign --restart+stop, and a mixed crowd: every answer is 200 or 409 (never a
    500), the model ends in a settled state, and there is never more than one child for it."""
    fake_daemon.write_models({"A": {"gpu_memory_gib": 3}, "B": {"gpu_memory_gib": 3}})
    fake_daemon.start()
    ops: dict[str, tuple[str, dict[str, Any]]] = {
        "start": ("/vllama/start", {"model": "A"}),
        "stop": ("/vllama/stop", {"model": "A"}),
        "sleep1": ("/vllama/sleep", {"model": "A", "level": 1}),
        "sleep2": ("/vllama/sleep", {"model": "A", "level": 2}),
        "restart": ("/vllama/assign", {"model": "A", "max_model_len": 4096, "restart": True}),
        "chat": ("/v1/chat/completions", chat_body("A", "in the crowd")),
    }
    rounds = [
        ["stop", "start"],
        ["start", "stop"],
        ["sleep1", "sleep1"],
        ["sleep2", "sleep1"],
        ["restart", "stop"],
        ["stop", "restart"],
        ["start", "sleep2", "stop", "chat", "restart", "sleep1", "chat", "start"],
    ]
    rng = random.Random(6)
    answers: dict[str, set[int]] = {}
    with fake_daemon.client() as c, ThreadPoolExecutor(8) as pool:
        assert_echo(chat(c, "B", "bystander"), "bystander")
        for names in rounds * 2:
            assert c.post("/vllama/start", json={"model": "A"}).status_code == 200
            futures = []
            for name in names:
                path, body = ops[name]
                futures.append((name, pool.submit(post_once, fake_daemon, path, body)))
                time.sleep(rng.uniform(0, 0.05))
            for name, f in futures:
                r = f.result(60)
                answers.setdefault(name, set()).add(r.status_code)
                assert r.status_code in (200, 409), (names, name, r.status_code, r.text)
                if r.status_code == 409:
                    assert_openai_error(r, 409, "conflict")
                if name == "chat" and r.status_code == 200:
                    assert_echo(r, "in the crowd")
            m = ps(c)["A"]
            assert m["state"] in ("running", "sleeping", "stopped"), (names, m)
            assert m["in_flight"] == 0
            # one child at most for A (and B's): the groups of live children match what ps shows
            live = {row["pid"] for row in ps(c).values() if row["pid"]}
            assert len(fake_daemon.child_groups()) == len(live), (names, live)
            if m["socket"]:
                stats = engine_stats(m)
                assert not stats["broken"] and stats["in_flight"] == 0
                assert stats["sleeping"] == (m["state"] == "sleeping")
        assert states(c)["B"] == ("running", None)
    log = daemon_log(fake_daemon)
    assert "Traceback" not in log and "unexpected error" not in log
    assert "EngineCore crashed" not in "".join(p.read_text() for p in (fake_daemon.home / "logs").glob("A_*.log"))
    print(f"admin answers: {answers}")


# --- children bind loopback only -------------------------------------------------------------------------------


def test_children_bind_loopback_only(fake_daemon: Daemon) -> None:
    """With VLLAMA_CHILD_TRANSPORT=tcp (children on Unix sockets, the default: test_child_socket.py)."""
    fake_daemon.env["VLLAMA_CHILD_TRANSPORT"] = "tcp"
    fake_daemon.write_models({"A": {"gpu_memory_gib": 2, "aliases": ["a"]}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "hi"), "hi")
        m = ps(c)["A"]
    server = psutil.Process(m["pid"])
    cmd = server.cmdline()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd.count("--host") == 1, cmd
    group = [psutil.Process(pid) for pid in processes_in_groups({group_of(m["pid"])})]
    listening = [conn for p in group for conn in p.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    assert listening, "the child listens somewhere"
    assert {conn.laddr.ip for conn in listening} == {"127.0.0.1"}, listening
    assert {conn.laddr.port for conn in listening} == {m["port"]}


def test_vllm_dev_endpoints_unreachable_through_odd_paths(fake_daemon: Daemon) -> None:
    """The allow-list (proxy.PROXIED_PATHS) is matched on the decoded path, exactly: dot segments, encodings,
    doubled slashes or a relayed prefix never reach vLLM's sleep/wake/RPC endpoints. Sent raw (no client-side
    normalisation)."""
    import http.client

    fake_daemon.write_models({"A": {"gpu_memory_gib": 2}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "hi"), "hi")
        row = ps(c)["A"]
    served = engine_stats(row)["served"]
    odd = [
        "/sleep?level=1",
        "/v1/../sleep?level=1",
        "/v1/chat/completions/../../sleep?level=1",
        "/%73leep?level=1",
        "/v1%2F..%2Fsleep?level=1",
        "//sleep?level=1",
        "/v1//sleep?level=1",
        "/./sleep?level=1",
        "/wake_up",
        "/collective_rpc",
        "/v1/chat/completions/../../collective_rpc",
        "/reset_prefix_cache",
        "/v1/load_lora_adapter",
        "/scale_elastic_ep",
        "/pause",
        "/v1/chat/completions%00/../sleep",
    ]
    body = json.dumps({"model": "A", "method": "reload_weights", "level": 1})
    for path in odd:
        conn = http.client.HTTPConnection("127.0.0.1", fake_daemon.port, timeout=30)
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode(errors="replace")
        conn.close()
        assert r.status in (400, 404, 405), (path, r.status, text)
        assert "error" in json.loads(text), (path, text)
    stats = engine_stats(row)
    assert not stats["sleeping"] and stats["served"] == served, stats
    with fake_daemon.client() as c:
        assert states(c)["A"] == ("running", None)
