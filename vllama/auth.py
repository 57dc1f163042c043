"""Optional API keys: a small ASGI middleware in front of the whole app.

- `VLLAMA_API_KEY` guards every route but `GET /health`: the OpenAI routes (`/v1/*`, `/rerank`, `/score`,
  `/tokenize`...), any other API router (Ollama's `/api/*`), the docs, and — unless an admin key is set — the
  admin API under `/vllama/`.
- `VLLAMA_ADMIN_API_KEY` guards `/vllama/*` (start, stop, sleep, assign, logs, info, ps). With both set, the
  admin key also works on the OpenAI routes (whoever may run the models may use them), never the reverse.
- A key is accepted as `Authorization: Bearer <key>` (what the `openai` client sends) or `x-api-key: <key>`.
  Each presented value is compared with each accepted key in constant time (`hmac.compare_digest` over their
  SHA-256 digests, so neither content nor length leaks through timing).
- Anything else is a 401 in the OpenAI error shape, with `WWW-Authenticate: Bearer`.
- The credentials are removed from the request before the app sees it: they never reach a vLLM child, a log
  or an error message.

With no key set, the middleware is not installed at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from vllama.errors import Unauthorized

# open without a key: health checks, and the status page's HTML (it holds no data: its admin calls need the key,
# which the page asks for on a 401), so a browser, which cannot send a Bearer header for a page load, can open it
PUBLIC_PATHS = frozenset({"/health", "/ui", "/"})
ADMIN_PREFIX = "/vllama"
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The keys a request presents: `Authorization: Bearer <key>` and `x-api-key: <key>` values."""
    keys = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, admin_api_key: str | None) -> None:
        self.app = app
        api = [_digest(api_key.encode())] if api_key else []
        admin = [_digest(admin_api_key.encode())] if admin_api_key else []
        # the keys each kind of route accepts (empty: open)
        self.admin_keys = admin or api
        self.api_keys = api + admin if api else []
        self.separate_admin = bool(admin)

    def keys_for(self, path: str) -> list[bytes]:
        if path in PUBLIC_PATHS:
            return []
        return self.admin_keys if is_admin_path(path) else self.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        accepted = self.keys_for(path)
        if not accepted:
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope.get("headers", []))
        ok = False
        for key in presented:
            digest = _digest(key)
            for good in accepted:
                ok |= hmac.compare_digest(digest, good)  # no short cut: every comparison runs
        if not ok:
            await self._refuse(scope, send, path, bool(presented))
            return
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k not in _CREDENTIAL_HEADERS]
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, path: str, presented: bool) -> None:
        admin = is_admin_path(path) and self.separate_admin
        which = "the admin API key (VLLAMA_ADMIN_API_KEY)" if admin else "the API key (VLLAMA_API_KEY)"
        if presented:
            message = f"invalid API key for {path}: this route needs {which}"
        else:
            message = f"missing API key for {path}: send {which} as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        body = json.dumps(Unauthorized(message).to_body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="vllama"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
