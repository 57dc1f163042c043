"""The OpenAI-compatible routes: each one resolves the model and relays to its vLLM instance."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.routing import Route

from vllama import proxy
from vllama.api.deps import manager_of
from vllama.errors import ModelNotFound
from vllama.manager import Manager
from vllama.registry import cached_hf_models


@asynccontextmanager
async def relay_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The relay's upstream client (its pool of connections to the vLLM children) lives as long as the app.

    Start-up done, everything allocated so far (imports, the app, ~100k objects) is moved out of the garbage
    collector's sight (`gc.freeze`): under load its full passes otherwise traverse all of it, pausing every
    stream for 15-50 ms every few seconds on a small CPU; frozen, a full pass takes ~1-2 ms (bench/proxy.py)."""
    app.state.relay_client = proxy.make_client()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        await app.state.relay_client.close()


router = APIRouter(lifespan=relay_lifespan)


def _schema_only(path: str) -> None:
    """An OpenAPI entry (/docs) for a relayed path: the raw route before it always answers first."""

    async def relay() -> None:  # pragma: no cover - never reached
        raise AssertionError(f"{path} is served by proxy.RelayEndpoint")

    relay.__name__ = "relay_" + path.strip("/").replace("/", "_")
    router.add_api_route(path, relay, methods=["POST"], summary=f"relayed to the model's vLLM: {path}")


# the relayed paths are raw ASGI endpoints (vllama/proxy.py: no request object, no dependency solving; the
# app's middleware still applies), first in the table so they match first
for _path in proxy.PROXIED_PATHS:
    router.routes.append(Route(_path, proxy.RelayEndpoint(_path), methods=["POST"], name=f"relay {_path}"))
for _path in proxy.PROXIED_PATHS:
    _schema_only(_path)


def startable_cached_models(manager: Manager) -> list[str]:
    """The models of the local Hugging Face cache that a request may start here (VLLAMA_ALLOW_MODELS): a listing
    shows no model that would answer 403."""
    names = []
    for name in cached_hf_models():
        with contextlib.suppress(ModelNotFound):
            manager.resolve(name)
            names.append(name)
    return names


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
        entries.update(_adapter_entries(manager, name))
    for name in manager.instances:
        add(name, "requested")
    for name in startable_cached_models(manager):
        add(name, "hf-cache")
    return {"object": "list", "data": list(entries.values())}


def _adapter_entries(manager: Manager, base: str) -> dict[str, dict[str, Any]]:
    """The LoRA adapters of `base` (vllama/lora.py), after it: each with its base and whether it is loaded. An
    adapter loaded into a running base shows state "running", else "stopped"; `parent`/`root` as vLLM's own
    listing of adapters has them."""
    cfg = manager.models.models[base]
    inst = manager.instances.get(base)
    out = {}
    for row in manager.loras.snapshot(base, cfg, inst.engine if inst else None):
        out[row["name"]] = {
            "id": row["name"],
            "object": "model",
            "created": int(manager.started_at),
            "owned_by": "vllama",
            "parent": base,
            "root": row["path"],
            "vllama": {
                "state": "running" if row["loaded"] else "stopped",
                "adapter": True,
                "base": base,
                "base_state": inst.state.value if inst else "stopped",
                "loaded": row["loaded"],
                "in_flight": row["in_flight"],
                "source": "models.yaml",
                "configured": True,
                "aliases": [],
                "pinned": False,
            },
        }
    return out


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    manager = manager_of(request)
    states: dict[str, int] = {}
    for inst in manager.instances.values():
        states[inst.state.value] = states.get(inst.state.value, 0) + 1
    return {"status": "ok", "time": time.time(), "instances": states}
