"""Every error the daemon returns is in the OpenAI shape {"error": {"message", "type", "param", "code"}}, with the
right status; odd model names never escape the logs folder. One daemon over fake engines serves the module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Daemon, new_fake_daemon, wait_until_gone

MAX_BODY = 1000
ODD_NAMES = ["org/../../escape", "../up", "with space", "模型/ünïcode", "a\\b", ".hidden"]
MODELS: dict[str, Any] = {
    "A": {"gpu_memory_gib": 1, "aliases": ["a-alias"]},
    "F": {"gpu_memory_gib": 1, "env": {"FAKE_ENGINE_FAIL": "kaboom"}},
    **{name: {"gpu_memory_gib": 0.5} for name in ODD_NAMES},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = new_fake_daemon(
        tmp_path_factory.mktemp("api_errors"),
        VLLAMA_SLEEP_RESIDUAL_GIB="0.5",
        VLLAMA_MAX_BODY_BYTES=str(MAX_BODY),
        VLLAMA_STOP_TIMEOUT="5",
        FAKE_ENGINE_CONTEXT_GIB="0.25",
        FAKE_ENGINE_STARTUP_S="0.1",
    )
    d.write_models(MODELS)
    d.start()
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 15), "vLLM children left after vllama stopped"


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client(timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI-shaped error with this status (and code); returns the inner object."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in err["message"]
    return dict(err)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/v1/rerank", {"query": "q", "documents": ["d"]}),
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
    ],
)
def test_unknown_model_is_404_model_not_found(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    err = assert_error(http.post(path, json={"model": "no-such-model", **body}), 404, "model_not_found")
    assert "no-such-model" in err["message"]
    assert "A" in err["message"]  # it lists what is configured
    assert err["param"] == "model"
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"model": "A", ', b"\xff\xfe", b"", b"null"],
    ids=["garbage", "truncated", "not-utf8", "empty", "null"],
)
def test_malformed_json_is_400(http: httpx.Client, content: bytes) -> None:
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    err = assert_error(r, 400, "bad_request")
    assert "JSON" in err["message"]


@pytest.mark.parametrize("payload", [["A"], "A", 42, True])
def test_json_that_is_not_an_object_is_400(http: httpx.Client, payload: Any) -> None:
    err = assert_error(http.post("/v1/chat/completions", json=payload), 400, "bad_request")
    assert "object" in err["message"]


@pytest.mark.parametrize("model", [None, "", "  ", 42, ["A"], {"name": "A"}])
def test_missing_or_bad_model_field(http: httpx.Client, model: Any) -> None:
    body = dict(CHAT) if model is None else {"model": model, **CHAT}
    err = assert_error(http.post("/v1/chat/completions", json=body), (400, 404))
    assert "model" in err["message"]
    assert err["param"] == "model"


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/vllama/sleep", {"json": {"model": "A", "level": 7}}),
        ("POST", "/vllama/sleep", {"json": {"model": "A", "level": "x"}}),
        ("POST", "/vllama/sleep", {"json": {"model": "A", "level": None}}),
        ("POST", "/vllama/sleep", {"json": {"level": 1}}),
        ("POST", "/vllama/start", {"json": {"model": 5}}),
        ("POST", "/vllama/start", {"json": {"model": "A", "wait": "maybe"}}),
        ("POST", "/vllama/start", {"json": ["A"]}),
        ("POST", "/vllama/start", {"content": b"{oops", "headers": {"content-type": "application/json"}}),
        ("POST", "/vllama/stop", {"json": {}}),
        ("POST", "/vllama/assign", {"json": {"model": "A", "gpu_memory_utilization": 5}}),
        ("POST", "/vllama/assign", {"json": {"model": "A", "devices": "zero"}}),
        ("POST", "/vllama/assign", {"json": {"model": "A", "keep_alive": "whenever"}}),
        ("POST", "/vllama/assign", {"json": {"model": "A"}}),
        ("GET", "/vllama/logs", {"params": {"model": "A", "lines": "many"}}),
        ("GET", "/vllama/logs", {}),
    ],
)
def test_bad_admin_requests_are_400(http: httpx.Client, method: str, path: str, kwargs: dict[str, Any]) -> None:
    err = assert_error(http.request(method, path, **kwargs), 400, "bad_request")
    assert err["type"] == "invalid_request_error"


def test_bad_admin_value_message_names_the_field(http: httpx.Client, daemon: Daemon) -> None:
    err = assert_error(http.post("/vllama/sleep", json={"model": "A", "level": 7}), 400)
    assert "level" in err["message"]
    before = (daemon.home / "models.yaml").read_text()
    err = assert_error(http.post("/vllama/assign", json={"model": "A", "keep_alive": "whenever"}), 400)
    assert "keep_alive" in err["message"] and "whenever" in err["message"]
    assert (daemon.home / "models.yaml").read_text() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/vllama/stop"), ("POST", "/vllama/sleep"), ("POST", "/vllama/start"), ("GET", "/vllama/logs")],
)
def test_admin_unknown_model_is_404(http: httpx.Client, method: str, path: str) -> None:
    kwargs: dict[str, Any] = {"params": {"model": "nope"}} if method == "GET" else {"json": {"model": "nope"}}
    err = assert_error(http.request(method, path, **kwargs), 404, "model_not_found")
    assert "nope" in err["message"]


def test_logs_of_a_never_started_model_is_404(http: httpx.Client) -> None:
    err = assert_error(http.get("/vllama/logs", params={"model": "with space"}), 404, "not_found")
    assert "with space" in err["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/nope", 404),
        ("GET", "/vllama/nope", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_unknown_route_in_openai_shape(http: httpx.Client, method: str, path: str, status: int) -> None:
    err = assert_error(http.request(method, path), status)
    assert path in err["message"]
    if status == 404:
        assert err["code"] == "not_found"


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {"model": "A", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    err = assert_error(http.post("/v1/chat/completions", json=big), 413, "payload_too_large")
    assert str(MAX_BODY) in err["message"]

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b'{"model": "A", "prompt": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}'

    err = assert_error(http.post("/v1/completions", content=chunks()), 413, "payload_too_large")
    assert str(MAX_BODY) in err["message"]
    # just under the limit is fine
    ok = http.post("/v1/chat/completions", json={"model": "A", "messages": [{"role": "user", "content": "x" * 800}]})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_model_names_log_inside_logs_dir(http: httpx.Client, daemon: Daemon, name: str) -> None:
    logs = (daemon.home / "logs").resolve()
    before = {p for p in daemon.home.parent.rglob("*") if p.is_file()}
    r = http.post("/v1/chat/completions", json={"model": name, **CHAT})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name
    snap = http.post("/vllama/start", json={"model": name}).json()
    assert snap["state"] == "running", snap
    log = Path(snap["log"])
    assert log.exists()
    assert log.resolve().parent == logs, log  # no traversal, no sub-folder
    assert log.parent == daemon.home / "logs"  # the path as given has no ".." either
    assert not log.name.startswith(".")
    new = {p for p in daemon.home.parent.rglob("*") if p.is_file()} - before
    assert all(p.resolve().parent == logs for p in new if p.suffix == ".log"), new
    assert not list(daemon.home.parent.parent.glob("escape*")) and not list(daemon.home.parent.glob("up_*"))
    tail = http.get("/vllama/logs", params={"model": name, "lines": 3})
    assert tail.status_code == 200 and tail.json()["log"] == snap["log"]
    assert http.post("/vllama/stop", json={"model": name}).status_code == 200


def test_failed_start_is_503_with_log_path(http: httpx.Client, daemon: Daemon) -> None:
    err = assert_error(http.post("/v1/chat/completions", json={"model": "F", **CHAT}), 503, "model_unavailable")
    assert "F" in err["message"]
    assert str(daemon.home / "logs") in err["message"]
    # a start that fails says why, not just that it failed
    assert "kaboom" in err["message"], err["message"]


def test_openai_client_not_found(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(info.value)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="A", messages=[{"role": "user", "content": "x" * MAX_BODY}])
    assert too_big.value.status_code == 413 and str(MAX_BODY) in str(too_big.value)
    # and the happy path, through an alias
    answer = client.chat.completions.create(model="a-alias", messages=[{"role": "user", "content": "hello there"}])
    assert answer.choices[0].message.content


def test_models_and_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = http.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    by_id = {m["id"]: m for m in data["data"]}
    assert set(MODELS) <= set(by_id)
    for name in MODELS:
        entry = by_id[name]
        assert entry["object"] == "model"
        assert entry["vllama"]["state"] in {"stopped", "starting", "running", "sleeping", "error"}
        assert entry["vllama"]["configured"] is True
    assert by_id["A"]["vllama"]["aliases"] == ["a-alias"]
    assert http.post("/vllama/start", json={"model": "A"}).status_code == 200
    assert http.get("/v1/models").json()["data"][0]["id"]
    states = {m["id"]: m["vllama"]["state"] for m in http.get("/v1/models").json()["data"]}
    assert states["A"] == "running"
    assert json.loads(http.get("/health").text)["instances"].get("running", 0) >= 1
