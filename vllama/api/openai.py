"""The OpenAI-compatible routes: each one resolves the model and relays to its vLLM instance."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from vllama import proxy
from vllama.manager import Manager, cached_hf_models

router = APIRouter()


def manager_of(request: Request) -> Manager:
    manager: Manager = request.app.state.manager
    return manager


def _make_route(path: str) -> None:
    async def relay(request: Request) -> Response:
        return await proxy.forward(manager_of(request), request, path)

    relay.__name__ = "relay_" + path.strip("/").replace("/", "_")
    router.add_api_route(path, relay, methods=["POST"], include_in_schema=True, summary=f"relay {path}")


for _path in proxy.PROXIED_PATHS:
    _make_route(_path)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Configured, running and locally cached models, each with its state."""
    manager = manager_of(request)
    models = manager.models
    entries: dict[str, dict[str, Any]] = {}

    def add(name: str, source: str) -> None:
        inst = manager.instances.get(name)
        cfg = models.get(name)
        entries.setdefault(
            name,
            {
                "id": name,
                "object": "model",
                "created": int(manager.started_at),
                "owned_by": "vllama",
                "vllama": {
                    "state": inst.state.value if inst else "stopped",
                    "sleep_level": (inst.sleep_level or None) if inst else None,
                    "source": source,
                    "configured": cfg is not None,
                    "aliases": list(cfg.aliases) if cfg else [],
                    "pinned": bool(cfg and cfg.pinned),
                },
            },
        )

    for name in models.models:
        add(name, "models.yaml")
    for name in manager.instances:
        add(name, "requested")
    for name in cached_hf_models():
        add(name, "hf-cache")
    return {"object": "list", "data": list(entries.values())}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    states: dict[str, int] = {}
    for inst in manager.instances.values():
        states[inst.state.value] = states.get(inst.state.value, 0) + 1
    return {"status": "ok", "time": time.time(), "instances": states}
