"""GET /metrics (Prometheus text format) against a daemon over fake engines: per-request counters (once per
request, not per streamed chunk), lifecycle operations, evictions by reason, waits, live states and memory."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.ecosystem import GIB, wait_for


def scrape(daemon: Daemon, key: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{daemon.url}/metrics", timeout=10, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def chat(daemon: Daemon, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    with daemon.client() as c:
        return c.post("/v1/chat/completions", json=body)


def test_requests_lifecycle_evictions_and_memory(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 5}, "B": {"gpu_memory_gib": 5}})  # only one fits in 8 GiB
    fake_daemon.start()

    s = scrape(fake_daemon)
    assert value(s, "vllama_device_memory_total_bytes", device="0", name="fake0", kind="cuda") == 8 * GIB
    assert value(s, "vllama_device_memory_free_bytes", device="0", name="fake0", kind="cuda") == 8 * GIB
    assert value(s, "vllama_uptime_seconds") is not None

    assert chat(fake_daemon, "A").status_code == 200
    assert chat(fake_daemon, "A").status_code == 200
    with fake_daemon.client() as c:  # a stream of 60 chunks is one request
        r = c.post(
            "/v1/chat/completions",
            json={"model": "A", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 60},
        )
        assert r.status_code == 200 and r.text.count("data:") > 60
        assert c.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 404
        assert c.get("/no/such/path").status_code == 404

    s = scrape(fake_daemon)
    chat_ok = {"endpoint": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert value(s, "vllama_requests_total", **chat_ok) == 3
    assert value(s, "vllama_requests_total", endpoint="/v1/chat/completions", method="POST", status="404") == 1
    assert value(s, "vllama_request_errors_total", endpoint="/v1/chat/completions", status="404") == 1
    assert value(s, "vllama_request_errors_total", endpoint="unmatched", status="404") == 1
    assert value(s, "vllama_request_duration_seconds_count", endpoint="/v1/chat/completions") == 4
    assert value(s, "vllama_model_state", model="A", state="running") == 1
    assert value(s, "vllama_model_state", model="A", state="sleeping") == 0
    assert value(s, "vllama_model_in_flight", model="A") == 0
    assert value(s, "vllama_model_memory_bytes", model="A", device="0") == 5 * GIB
    assert value(s, "vllama_device_memory_free_bytes", device="0", name="fake0", kind="cuda") == 3 * GIB
    assert value(s, "vllama_model_operations_total", model="A", operation="start", outcome="ok") == 1
    assert value(s, "vllama_model_operation_duration_seconds_count", model="A", operation="start") == 1
    assert value(s, "vllama_model_wait_seconds_count", model="A") == 1  # only the first request waited

    assert chat(fake_daemon, "B").status_code == 200  # makes room: A is put to sleep (level 2)
    s = scrape(fake_daemon)
    assert value(s, "vllama_evictions_total", model="A", reason="capacity", action="sleep_l2") == 1
    assert value(s, "vllama_model_operations_total", model="A", operation="sleep", outcome="ok") == 1
    assert value(s, "vllama_model_state", model="A", state="sleeping") == 1
    assert value(s, "vllama_model_sleep_level", model="A") == 2

    assert chat(fake_daemon, "A").status_code == 200  # wakes A, B goes to sleep
    s = scrape(fake_daemon)
    assert value(s, "vllama_model_operations_total", model="A", operation="wake", outcome="ok") == 1
    assert value(s, "vllama_model_operation_duration_seconds_count", model="A", operation="wake") == 1
    assert value(s, "vllama_evictions_total", model="B", reason="capacity", action="sleep_l2") == 1
    assert value(s, "vllama_model_wait_seconds_count", model="A") == 2

    with fake_daemon.client() as c:
        ps = c.get("/vllama/ps").json()
        assert c.post("/vllama/stop", json={"model": "A"}).status_code == 200
        info = c.get("/vllama/info").json()
    assert [(e["model"], e["reason"], e["action"]) for e in ps["recent_evictions"]] == [
        ("A", "capacity", "sleep_l2"),
        ("B", "capacity", "sleep_l2"),
    ]
    assert "to make room for B" in ps["recent_evictions"][0]["message"]
    assert len(info["recent_evictions"]) == 2
    s = scrape(fake_daemon)
    assert value(s, "vllama_model_operations_total", model="A", operation="stop", outcome="ok") == 1
    assert value(s, "vllama_model_state", model="A", state="stopped") == 1


def test_failed_start_counts_as_an_error(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"F": {"gpu_memory_gib": 1, "env": {"FAKE_ENGINE_FAIL": "kaboom"}}})
    fake_daemon.start()
    assert chat(fake_daemon, "F").status_code == 503
    s = scrape(fake_daemon)
    assert value(s, "vllama_model_operations_total", model="F", operation="start", outcome="error") == 1
    assert value(s, "vllama_model_state", model="F", state="error") == 1
    assert value(s, "vllama_request_errors_total", endpoint="/v1/chat/completions", status="503") == 1


def test_keep_alive_steps_are_evictions_by_keep_alive(fake_daemon: Daemon) -> None:
    fake_daemon.write_models(
        {"A": {"gpu_memory_gib": 1, "keep_alive": {"sleep_l1": "0.5s", "sleep_l2": None, "stop": "2s"}}}
    )
    fake_daemon.env["VLLAMA_KEEP_ALIVE_INTERVAL"] = "0.2"
    fake_daemon.start()
    assert chat(fake_daemon, "A").status_code == 200
    wait_for(
        lambda: value(scrape(fake_daemon), "vllama_evictions_total", model="A", reason="keep_alive", action="sleep_l1")
    )
    wait_for(
        lambda: value(scrape(fake_daemon), "vllama_evictions_total", model="A", reason="keep_alive", action="stop")
    )
    with fake_daemon.client() as c:
        reasons = [(e["reason"], e["action"]) for e in c.get("/vllama/ps").json()["recent_evictions"]]
    assert reasons == [("keep_alive", "sleep_l1"), ("keep_alive", "stop")]


def test_unauthorized_requests_count_under_their_route(fake_daemon: Daemon) -> None:
    fake_daemon.write_models({"A": {"gpu_memory_gib": 1}})
    fake_daemon.env["VLLAMA_API_KEY"] = "sesame"
    fake_daemon.start()
    with fake_daemon.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "A", "messages": []}).status_code == 401
        assert c.get("/metrics").status_code == 401  # the metrics need the key too (Prometheus: `authorization`)
    s = scrape(fake_daemon, key="sesame")
    assert value(s, "vllama_request_errors_total", endpoint="/v1/chat/completions", status="401") == 1
