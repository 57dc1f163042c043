"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis), against a real daemon over fake engines.

Every operation of /openapi.json gets schema-conforming (positive) and schema-violating (negative) requests. The
relayed OpenAI routes and the Ollama routes read their bodies themselves, so the schema does not describe them:
the test gives them a body schema of its own (a model name from a small set, messages, prompt, input, ...).
Whatever comes in, the answer is never a 5xx — except 503, which says a model is unavailable, and 501 for the
Ollama endpoints vllama does not implement — and every error is a JSON error object (the OpenAI shape; Ollama's
routes use Ollama's `{"error": "..."}`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.conftest import Daemon, new_fake_daemon, wait_until_gone
from vllama import proxy

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

CASES = int(os.environ.get("VLLAMA_FUZZ_CASES", "15"))  # per operation and mode
# 503: a model is unavailable (says why); 501: an Ollama endpoint vllama deliberately does not implement (pull...)
ALLOWED_5XX = {501, 503}
MODELS: dict[str, Any] = {"A": {"gpu_memory_gib": 1, "aliases": ["a"]}, "E": {"gpu_memory_gib": 1}}

_text = {"type": "string", "maxLength": 30}
_texts = {"anyOf": [_text, {"type": "array", "items": _text, "maxItems": 3}]}
BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "enum": ["A", "a", "E", "no-such-model"]},
        "messages": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": _text},
                "required": ["role", "content"],
            },
        },
        "prompt": _texts,
        "input": _texts,
        "max_tokens": {"type": "integer", "minimum": -5, "maximum": 4000},
        "stream": {"type": "boolean"},
        "query": _text,
        "documents": {"type": "array", "items": _text, "maxItems": 3},
        "text_1": _texts,
        "text_2": _texts,
        "keep_alive": {"anyOf": [_text, {"type": "integer"}]},
        "options": {"type": "object"},
    },
    "required": ["model"],
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = new_fake_daemon(
        tmp_path_factory.mktemp("fuzz_api"),
        VLLAMA_SLEEP_RESIDUAL_GIB="0.25",
        VLLAMA_STOP_TIMEOUT="3",
        VLLAMA_CAPACITY_WAIT="5",
        VLLAMA_MAX_BODY_BYTES="100000",
        FAKE_ENGINE_CONTEXT_GIB="0.25",
        FAKE_ENGINE_STARTUP_S="0.05",
    )
    d.write_models(MODELS)
    d.start()
    yield d
    groups = d.child_groups()
    d.stop()
    assert not wait_until_gone(groups, 15)


def fuzzable_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """The app's schema, with a body schema for the routes that parse their own body."""
    spec = copy.deepcopy(raw)
    paths = spec.setdefault("paths", {})
    body = {"required": True, "content": {"application/json": {"schema": BODY}}}
    for path in proxy.PROXIED_PATHS:  # raw ASGI routes may be missing from the schema
        paths.setdefault(path, {}).setdefault("post", {"responses": {"200": {"description": "relayed"}}})
    for ops in paths.values():
        for method, op in ops.items():
            if method in ("post", "put", "patch") and "requestBody" not in op:
                op["requestBody"] = body
    return spec


def assert_error_shape(r: Any, path: str) -> None:
    if path in proxy.PROXIED_PATHS and r.text.startswith(("404: Not Found", "405: Method Not Allowed")):
        return  # relayed as is from the fake engine, which lacks that route (real vLLM answers JSON)
    try:
        data = r.json()
    except ValueError:
        raise AssertionError(f"{r.status_code} without a JSON body: {r.text[:300]!r}") from None
    assert isinstance(data, dict) and "error" in data, data
    err = data["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and err, data  # Ollama's shape
    else:
        assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), data
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"], data


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []


def fuzz_operation(op: Any, mode: GenerationMode, url: str, tally: Tally) -> None:
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        r = case.call(base_url=url, timeout=60)
        tally.counts[op.label] = tally.counts.get(op.label, 0) + 1
        tally.statuses[r.status_code] = tally.statuses.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            assert_error_shape(r, op.path)
        if r.status_code >= 500 and r.status_code not in ALLOWED_5XX:
            tally.failures.append(f"{op.label} [{mode.value}] → {r.status_code}: {r.text[:300]}\n  {case!r}"[:800])

    try:
        run()
    except Exception as exc:  # a schema this test cannot generate from (e.g. no negative case) is no failure
        if "unsatisfiable" not in f"{type(exc).__name__} {exc}".lower():
            raise


def test_api_fuzzed_from_its_openapi_schema(daemon: Daemon) -> None:
    raw = httpx.get(f"{daemon.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(fuzzable_schema(raw))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    tally = Tally()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(op, mode, daemon.url, tally)
    total = sum(tally.counts.values())
    statuses = dict(sorted(tally.statuses.items()))
    print(f"schemathesis: {total} cases over {len(tally.counts)} operations; statuses {statuses}")
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert total >= len(operations) * CASES  # at least the positive cases of every operation ran
    assert httpx.get(f"{daemon.url}/health", timeout=10).status_code == 200
    ps = httpx.get(f"{daemon.url}/vllama/ps", timeout=30).json()["models"]
    assert all(m["in_flight"] == 0 for m in ps), ps


# --- what the fuzzing found, kept as plain regression cases --------------------------------------------------

ODD_NAMES = ["~\x11)", "~no-such-user-here/model", "/tmp/a\x00b", "/" + "x" * 5000]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["tilde-control", "tilde-unknown-user", "nul", "too-long"])
def test_names_that_break_path_checks_are_404(daemon: Daemon, name: str) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        for method, path, kwargs in [
            ("POST", "/v1/chat/completions", {"json": {"model": name, "messages": []}}),
            ("POST", "/vllama/start", {"json": {"model": name}}),
            ("POST", "/vllama/assign", {"json": {"model": name, "pinned": True}}),
            ("GET", "/vllama/logs", {"params": {"model": name}}),
        ]:
            r = c.request(method, path, **kwargs)
            assert r.status_code in (400, 404), (path, r.status_code, r.text)
            assert_error_shape(r, path)


def test_keep_alive_of_a_million_years_is_forever(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        r = c.post("/api/generate", json={"model": "A", "prompt": "hi", "stream": False, "keep_alive": 6e20})
        assert r.status_code == 200, r.text
        assert c.get("/api/ps").status_code == 200
        assert c.get("/vllama/ps").status_code == 200
