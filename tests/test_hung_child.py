"""A child that stops answering (issue 12): the relay's response timeout, a health check, and a replacement —
with real processes (the daemon and a fake engine frozen with SIGSTOP, as a hung vLLM would be)."""

from __future__ import annotations

import os
import signal

from tests.conftest import Daemon
from tests.test_manager_fake import assert_echo, assert_openai_error, chat, ps


def test_a_hung_child_is_killed_and_the_next_request_gets_a_fresh_one(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_RESPONSE_TIMEOUT"] = "2"
    fake_daemon.write_models({"A": {"gpu_memory_gib": 3}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "warm"), "warm")
        before = ps(c)["A"]
        os.kill(before["pid"], signal.SIGSTOP)  # vLLM's API server no longer answers anything
        err = assert_openai_error(chat(c, "A", "anyone there"), 504, "upstream_timeout")
        assert "stopped answering and was killed" in err["message"] and "VLLAMA_RESPONSE_TIMEOUT" in err["message"]
        row = ps(c)["A"]
        assert (row["state"], row["in_flight"], row["pid"]) == ("error", 0, None)
        assert "stopped answering" in row["last_error"]
        assert_echo(chat(c, "A", "back again"), "back again")  # a fresh child
        assert ps(c)["A"]["pid"] != before["pid"]


def test_a_slow_but_healthy_child_is_left_alone(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_RESPONSE_TIMEOUT"] = "1"
    fake_daemon.write_models({"A": {"gpu_memory_gib": 3}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "warm"), "warm")
        pid = ps(c)["A"]["pid"]
        # the answer's first byte comes after 3 s, but the child answers its health check: only slow
        err = assert_openai_error(chat(c, "A", "think hard", fake_ttft_s=3), 504, "upstream_timeout")
        assert "is busy" in err["message"]
        row = ps(c)["A"]
        assert (row["state"], row["pid"], row["in_flight"]) == ("running", pid, 0)
        assert_echo(chat(c, "A", "quick one"), "quick one")
