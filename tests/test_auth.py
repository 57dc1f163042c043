"""Optional API keys (vllama/auth.py): the middleware's rules as a table over a tiny app, then a real daemon with
both keys set, driven by httpx, the official `openai` client and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import psutil
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.conftest import Daemon, base_env, new_fake_daemon, wait_until_gone
from tests.test_manager_fake import assert_openai_error, engine_stats
from vllama.auth import ApiKeyMiddleware, presented_keys

USER, ADMIN = "user-key-0123456789", "admin-key-9876543210"


def _echo_headers(request: Request) -> JSONResponse:
    return JSONResponse({"headers": dict(request.headers)})


def tiny_app(api_key: str | None, admin_api_key: str | None) -> TestClient:
    paths = ["/health", "/v1/models", "/v1/chat/completions", "/rerank", "/api/tags", "/vllama/ps", "/metrics"]
    app = Starlette(routes=[Route(p, _echo_headers, methods=["GET", "POST"]) for p in paths])
    app.add_middleware(ApiKeyMiddleware, api_key=api_key, admin_api_key=admin_api_key)
    return TestClient(app)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


API_ROUTES = ["/v1/models", "/v1/chat/completions", "/rerank", "/api/tags", "/metrics"]


@pytest.mark.parametrize(
    ("api_key", "admin_key", "path", "headers", "status"),
    [
        # only VLLAMA_API_KEY: it guards everything but /health, the admin API included
        *[(USER, None, p, {}, 401) for p in [*API_ROUTES, "/vllama/ps"]],
        *[(USER, None, p, bearer(USER), 200) for p in [*API_ROUTES, "/vllama/ps"]],
        (USER, None, "/v1/models", {"x-api-key": USER}, 200),
        (USER, None, "/v1/models", {"Authorization": f"bearer   {USER}  "}, 200),
        (USER, None, "/v1/models", bearer(USER + "x"), 401),
        (USER, None, "/v1/models", bearer(USER[:-1]), 401),
        (USER, None, "/v1/models", {"Authorization": USER}, 401),  # no scheme
        (USER, None, "/v1/models", {"Authorization": f"Basic {USER}"}, 401),
        (USER, None, "/v1/models", {"Authorization": "Bearer "}, 401),
        (USER, None, "/health", {}, 200),
        (USER, None, "/nothing-here", {}, 401),  # unknown routes say nothing before the key is checked
        # both keys: the admin key guards /vllama/*, the API key does not open it; the admin key opens the API
        (USER, ADMIN, "/vllama/ps", bearer(USER), 401),
        (USER, ADMIN, "/vllama/ps", bearer(ADMIN), 200),
        (USER, ADMIN, "/vllama/ps", {"x-api-key": ADMIN}, 200),
        (USER, ADMIN, "/v1/models", bearer(USER), 200),
        (USER, ADMIN, "/v1/models", bearer(ADMIN), 200),
        (USER, ADMIN, "/v1/models", {}, 401),
        (USER, ADMIN, "/health", {}, 200),
        # only the admin key: the OpenAI API is open, the admin API is not
        (None, ADMIN, "/v1/models", {}, 200),
        (None, ADMIN, "/vllama/ps", {}, 401),
        (None, ADMIN, "/vllama/ps", bearer(ADMIN), 200),
    ],
)
def test_key_rules(api_key: str | None, admin_key: str | None, path: str, headers: dict[str, str], status: int) -> None:
    with tiny_app(api_key, admin_key) as client:
        r = client.get(path, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error", err
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert USER not in r.text and ADMIN not in r.text  # the answer never repeats a key


def test_credentials_are_removed_before_the_app_sees_them() -> None:
    with tiny_app(USER, ADMIN) as client:
        got = client.get("/v1/models", headers={**bearer(USER), "x-api-key": "other", "x-keep": "1"}).json()
    assert "authorization" not in got["headers"] and "x-api-key" not in got["headers"]
    assert got["headers"]["x-keep"] == "1"


def test_presented_keys_parsing() -> None:
    headers = [(b"authorization", b"Bearer abc"), (b"x-api-key", b" def "), (b"authorization", b"Basic zzz")]
    assert presented_keys(headers) == [b"abc", b"def"]
    assert presented_keys([(b"authorization", b"BEARER  xyz ")]) == [b"xyz"]
    assert presented_keys([]) == []


def test_bad_key_in_the_environment_is_refused_without_echoing_it(tmp_path: Any) -> None:
    env = base_env(tmp_path, VLLAMA_API_KEY="has a space-secret")
    r = subprocess.run([sys.executable, "-m", "vllama", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "VLLAMA_API_KEY" in r.stderr and "secret" not in r.stderr, r.stderr


# --- a real daemon with both keys ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    hub = tmp_path_factory.mktemp("hub")
    for cached in ("Qwen/Qwen3-0.6B", "org/allowed-model"):  # a local Hugging Face cache with two models
        (hub / ("models--" + cached.replace("/", "--")) / "snapshots" / "0").mkdir(parents=True)
    d = new_fake_daemon(
        tmp_path_factory.mktemp("auth"),
        HF_HUB_CACHE=str(hub),
        VLLAMA_ALLOW_MODELS="org/allowed-*",
        VLLAMA_STOP_TIMEOUT="5",
        FAKE_ENGINE_STARTUP_S="0.1",
        VLLAMA_API_KEY=USER,
        VLLAMA_ADMIN_API_KEY=ADMIN,
    )
    d.write_models({"A": {"gpu_memory_gib": 2}})
    d.start()  # polls /health: open without a key
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 15)


CHAT = {"model": "A", "messages": [{"role": "user", "content": "knock knock"}], "max_tokens": 3}


def test_daemon_openai_routes_need_the_key(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        for path in ("/v1/chat/completions", "/v1/embeddings", "/tokenize"):
            err = assert_openai_error(c.post(path, json=CHAT), 401, "invalid_api_key")
            assert "missing API key" in err["message"]
        assert_openai_error(c.get("/v1/models", headers=bearer("wrong")), 401, "invalid_api_key")
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/vllama/ps").status_code == 401
        assert c.get("/vllama/ps", headers=bearer(USER)).status_code == 401, "the API key must not open the admin API"
        r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(USER))
        assert r.status_code == 200, r.text
        r = c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": USER})
        assert r.status_code == 200, r.text
        rows = c.get("/vllama/ps", headers=bearer(ADMIN)).json()["models"]
        (row,) = [m for m in rows if m["model"] == "A"]
        # vLLM never sees the key, in a header or in its environment
        assert engine_stats(row)["credentials_seen"] == 0
        child_env = psutil.Process(row["pid"]).environ()
        assert "VLLAMA_API_KEY" not in child_env and "VLLAMA_ADMIN_API_KEY" not in child_env
        assert USER not in json.dumps(child_env) and ADMIN not in json.dumps(child_env)


def test_daemon_with_a_key_starts_only_configured_models(daemon: Daemon) -> None:
    # issue 16: VLLAMA_ALLOW_MODELS restricts this daemon to models.yaml's names and `org/allowed-*`
    with httpx.Client(base_url=daemon.url, timeout=60, headers=bearer(USER)) as c:
        for name in ("Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B"):
            err = assert_openai_error(
                c.post("/v1/chat/completions", json={**CHAT, "model": name}), 403, "model_not_allowed"
            )
            assert name in err["message"] and "VLLAMA_ALLOW_MODELS" in err["message"] and "A" in err["message"]
        r = c.post("/api/chat", json={"model": "Qwen/Qwen3-0.6B", "messages": []})
        assert r.status_code == 403 and "VLLAMA_ALLOW_MODELS" in r.json()["error"]
        assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "model": "/"}), 404, "model_not_found")
        # the listings show only what may start: configured, and the cache's models that match the patterns
        listed = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "A" in listed and "org/allowed-model" in listed and "Qwen/Qwen3-0.6B" not in listed
        assert "Qwen/Qwen3-0.6B" not in {m["name"] for m in c.get("/api/tags").json()["models"]}
    with httpx.Client(base_url=daemon.url, timeout=60, headers=bearer(ADMIN)) as c:
        assert c.post("/vllama/start", json={"model": "Qwen/Qwen3-0.6B"}).status_code == 403
        assert "Qwen/Qwen3-0.6B" not in {m["model"] for m in c.get("/vllama/ps").json()["models"]}


def test_daemon_with_the_official_openai_client(daemon: Daemon) -> None:
    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=USER, max_retries=0, timeout=60) as client:
        answer = client.chat.completions.create(
            model="A", messages=[{"role": "user", "content": "hi there"}], max_tokens=3
        )
        assert answer.choices[0].message.content == "echo: hi there"
        assert "A" in {m.id for m in client.models.list().data}
        chunks = client.chat.completions.create(
            model="A", messages=[{"role": "user", "content": "streamed"}], max_tokens=2, stream=True
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "echo: streamed"
    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="wrong", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="A", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_daemon_cli_passes_the_key(daemon: Daemon) -> None:
    without = {k: v for k, v in daemon.env.items() if not k.endswith("API_KEY")}
    cmd = [sys.executable, "-m", "vllama"]
    r = subprocess.run([*cmd, "ps"], env={**without, "VLLAMA_URL": daemon.url}, capture_output=True, text=True)
    assert r.returncode == 1 and "--api-key" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(
        [*cmd, "ps"], env={**without, "VLLAMA_URL": daemon.url, "VLLAMA_API_KEY": USER}, capture_output=True, text=True
    )
    assert r.returncode == 1 and "admin API key" in r.stderr, r.stderr
    ok = daemon.cli("ps")  # VLLAMA_ADMIN_API_KEY is in the daemon's environment, which the helper passes on
    assert ok.returncode == 0 and "A" in ok.stdout, ok.stderr
    r = subprocess.run(
        [*cmd, "--api-key", ADMIN, "info"], env={**without, "VLLAMA_URL": daemon.url}, capture_output=True, text=True
    )
    assert r.returncode == 0 and "health:" in r.stdout, r.stderr
