"""Issue 12's defects end to end: a `vllama serve` process over fake engines (real processes, real HTTP, the
simulated GPU ledger). The in-process tests (`test_lifecycle.py`) choose every interleaving; these show the same
behaviour through the daemon as a user meets it. Waits are for states (`ps`), with generous hang detectors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Daemon
from tests.test_manager_fake import assert_echo, chat, chat_once, info, ps, states, wait_for, wait_state


def test_keep_alive_sleep_then_a_bigger_model_then_the_sleeper_again(fake_daemon: Daemon) -> None:
    """B idles into its keep-alive sleep (slow: 3 s); meanwhile A arrives needing more room than B's sleep frees
    (so B must then be stopped), and a request for B arrives too. Both are answered; nothing stays stuck. (On
    main before the one-owner core both requests hung forever on Python 3.12, and every later start with them.)"""
    fake_daemon.env["VLLAMA_KEEP_ALIVE_INTERVAL"] = "0.2"
    fake_daemon.write_models(
        {
            "A": {"gpu_memory_gib": 7.8},  # more than B's sleep frees (B keeps 0.5 GiB): B must stop
            "B": {
                "gpu_memory_gib": 4,
                "env": {"FAKE_ENGINE_SLEEP_S": "3"},
                "keep_alive": {"sleep_l1": None, "sleep_l2": 0.5, "stop": None},
            },
        }
    )
    fake_daemon.start()
    with fake_daemon.client(timeout=60) as c, ThreadPoolExecutor(2) as pool:
        assert_echo(chat(c, "B", "first"), "first")
        wait_state(c, "B", "draining", timeout=30)  # the keep-alive is putting B to sleep
        for first, second in (("A", "B"), ("B", "A")):
            futures = [pool.submit(chat_once, fake_daemon, m, f"to {m}") for m in (first, second)]
            for f, m in zip(futures, (first, second), strict=True):
                assert_echo(f.result(90), f"to {m}")
            if first == "A":  # once more, the other way round, while B idles into its sleep again
                wait_for(lambda: states(c)["B"][0] in ("draining", "sleeping", "stopped"), 30, what="B idle")
        final = ps(c)
        assert all(m["in_flight"] == 0 for m in final.values())
        assert all(m["state"] in ("running", "sleeping", "stopped") for m in final.values()), final


def test_the_ladder_goes_l1_l2_stop_and_each_step_is_visible(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_KEEP_ALIVE_INTERVAL"] = "0.2"
    ladder = {"sleep_l1": 0.5, "sleep_l2": 1.5, "stop": 3}
    fake_daemon.env["VLLAMA_KEEP_ALIVE"] = json.dumps(ladder)
    fake_daemon.write_models({"M": {"gpu_memory_gib": 2}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "M", "hi"), "hi")
        seen: list[tuple[str, int | None]] = []

        def stopped() -> bool:
            st = states(c)["M"]
            if not seen or seen[-1] != st:
                seen.append(st)
            return st[0] == "stopped"

        wait_for(stopped, 30, interval=0.02, what="M stopped by its keep-alive")
        assert ("sleeping", 1) in seen and ("sleeping", 2) in seen, seen
        assert seen.index(("sleeping", 1)) < seen.index(("sleeping", 2)), seen
        actions = [(e["action"], e["reason"]) for e in info(c)["recent_evictions"] if e["model"] == "M"]
        assert actions == [("sleep_l1", "keep_alive"), ("sleep_l2", "keep_alive"), ("stop", "keep_alive")]
        metrics = httpx.get(f"{fake_daemon.url}/metrics", timeout=10).text
        for action in ("sleep_l1", "sleep_l2", "stop"):
            assert f'vllama_evictions_total{{action="{action}",model="M",reason="keep_alive"}} 1.0' in metrics
        assert_echo(chat(c, "M", "back"), "back")


def test_the_host_budget_makes_evictions_sleep_at_level_2(fake_daemon: Daemon) -> None:
    fake_daemon.env["VLLAMA_HOST_MEMORY_GIB"] = "1"  # less than A's weights
    fake_daemon.write_models({"A": {"gpu_memory_gib": 5, "sleep_level": 1}, "B": {"gpu_memory_gib": 5}})
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert_echo(chat(c, "A", "one"), "one")
        assert_echo(chat(c, "B", "two"), "two")
        assert states(c)["A"] == ("sleeping", 2)
        host = info(c)["host_memory"]
        assert host == {"budget_bytes": 1024**3, "l1_bytes": 0, "free_bytes": 1024**3}
        metrics = httpx.get(f"{fake_daemon.url}/metrics", timeout=10).text
        assert "vllama_host_memory_budget_bytes 1.073741824e+09" in metrics
