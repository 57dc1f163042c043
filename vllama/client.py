"""A small HTTP client for the daemon's admin API (what the CLI uses)."""

from __future__ import annotations

import os
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


class Client:
    def __init__(self, url: str | None = None, timeout: float = 30.0) -> None:
        self.url = normalize_url(url or default_url())
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

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
