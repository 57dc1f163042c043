"""A small HTTP client for the daemon's admin API (what the CLI uses)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx


class DaemonNotRunning(Exception):
    pass


class DaemonError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def default_url() -> str:
    if os.environ.get("VLLAMA_URL"):
        return os.environ["VLLAMA_URL"].rstrip("/")
    port = os.environ.get("VLLAMA_PORT", "33258")
    return f"http://127.0.0.1:{port}"


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/` → `http://host:port`."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def default_api_key() -> str | None:
    """The key the CLI sends: VLLAMA_ADMIN_API_KEY (the admin API's), else VLLAMA_API_KEY."""
    for name in ("VLLAMA_ADMIN_API_KEY", "VLLAMA_API_KEY"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    return None


class Client:
    def __init__(self, url: str | None = None, timeout: float = 30.0, *, api_key: str | None = None) -> None:
        self.url = normalize_url(url or default_url())
        key = api_key or default_api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, timeout=timeout or self._http.timeout, **kwargs)
        except httpx.ConnectError:
            raise DaemonNotRunning(
                f"vllama is not running at {self.url} (start it with `vllama serve`, or set VLLAMA_URL)"
            ) from None
        except httpx.TimeoutException:
            raise DaemonError(0, f"vllama at {self.url} did not answer in time") from None
        except (httpx.TransportError, httpx.InvalidURL) as exc:  # a bad URL, or the daemon died mid-answer
            raise DaemonError(0, f"could not talk to vllama at {self.url}: {exc}") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            try:
                message = data["error"]["message"]
            except (KeyError, TypeError):
                message = f"{self.url}{path} answered HTTP {r.status_code} ({r.reason_phrase}) without a vllama error"
            if r.status_code == 401:
                message += " (give the key with --api-key, or set VLLAMA_ADMIN_API_KEY or VLLAMA_API_KEY)"
            raise DaemonError(r.status_code, message)
        if not isinstance(data, dict):
            raise DaemonError(r.status_code, f"{self.url}{path} did not answer with JSON: is that a vllama daemon?")
        return data

    def info(self) -> dict[str, Any]:
        return dict(self._call("GET", "/vllama/info"))

    def ps(self) -> dict[str, Any]:
        return dict(self._call("GET", "/vllama/ps"))

    def start(self, model: str, *, wait: bool) -> dict[str, Any]:
        return dict(self._call("POST", "/vllama/start", json={"model": model, "wait": wait}, timeout=3600))

    def stop(self, model: str) -> dict[str, Any]:
        return dict(self._call("POST", "/vllama/stop", json={"model": model}, timeout=600))

    def sleep(self, model: str, level: int) -> dict[str, Any]:
        return dict(self._call("POST", "/vllama/sleep", json={"model": model, "level": level}, timeout=600))

    def assign(self, model: str, **settings: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/vllama/assign", json={"model": model, **settings}, timeout=3600))

    def logs(self, model: str, lines: int) -> dict[str, Any]:
        return dict(self._call("GET", "/vllama/logs", params={"model": model, "lines": lines}))

    def logs_from(self, model: str, offset: int) -> dict[str, Any]:
        """The log's complete lines from byte `offset` on (`lines`), the offset to ask next time, and the log path."""
        return dict(self._call("GET", "/vllama/logs", params={"model": model, "offset": offset}))

    def chat_stream(self, model: str, messages: list[dict[str, Any]], **options: Any) -> Iterator[str]:
        """Stream a chat completion (OpenAI API): yields the answer's text as it is generated."""
        body = {"model": model, "messages": messages, "stream": True, **options}
        timeout = httpx.Timeout(10.0, read=None)  # a model may take minutes to start before the first token
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        message = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = f"HTTP {r.status_code}: {r.text[:200]}"
                    raise DaemonError(r.status_code, message)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        raise DaemonError(502, str(err.get("message") if isinstance(err, dict) else err))
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.ConnectError:
            raise DaemonNotRunning(
                f"vllama is not running at {self.url} (start it with `vllama serve`, or set VLLAMA_URL)"
            ) from None
        except httpx.TransportError as exc:
            raise DaemonError(0, f"the answer from vllama at {self.url} broke off: {exc}") from None
