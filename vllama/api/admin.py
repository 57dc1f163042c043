"""The admin API the CLI talks to (under /vllama/). Thin: every operation is a Manager method."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from vllama import __version__
from vllama.api.deps import manager_of
from vllama.config import update_model_entry
from vllama.engine import log_tail
from vllama.errors import BadRequest, ConfigError, NotFound
from vllama.instance import State

router = APIRouter(prefix="/vllama")


class ModelRef(BaseModel):
    model: str


class StartBody(ModelRef):
    wait: bool = True  # False: return once the start is under way (the CLI then polls ps for progress)


class SleepBody(ModelRef):
    level: Literal[1, 2, 3] = 2


class AssignBody(ModelRef):
    devices: list[int] | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    keep_alive: Any = None
    pinned: bool | None = None
    restart: bool = False


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    m = manager_of(request)
    s = m.settings
    configured = sorted(m.models.models)  # reloads models.yaml if it changed, which sets config_error
    return {
        "version": __version__,
        "host": s.host,
        "port": s.port,
        "home": str(s.home),
        "models_file": str(s.models_path),
        "logs_dir": str(s.logs_dir),
        "child_transport": s.child_transport,  # uds: children on Unix sockets in socket_dir; tcp: on port_range
        "socket_dir": str(s.run_dir) if s.child_transport == "uds" else None,
        "port_range": list(s.port_range) if s.child_transport == "tcp" else None,
        "config_error": m.config_error,
        "configured_models": configured,
        "device_kind": m.probe.kind,
        "sleep_mode": m.probe.supports_sleep,
        "devices": m.devices_snapshot(),
        "host_memory": m.host_memory(),
        "vllm_command": s.vllm_command,
        "uptime_seconds": round(time.time() - m.started_at, 1),
        "evictions": m.evictions,
        "last_eviction": m.last_eviction,
        "recent_evictions": list(m.recent_evictions),
        "keep_alive_default": s.keep_alive.model_dump(),
        "strays": m.live_strays(),
        "warm_pool": m.pool.snapshot(),
        "health": "ok",
    }


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    m = manager_of(request)
    return {
        "models": m.ps(),
        "devices": m.devices_snapshot(),
        "host_memory": m.host_memory(),
        "last_eviction": m.last_eviction,
        "recent_evictions": list(m.recent_evictions),
    }


@router.post("/start")
async def start(body: StartBody, request: Request) -> dict[str, Any]:
    m = manager_of(request)
    inst = m.instance(body.model)
    if body.wait:
        return await m.start(body.model)
    task = asyncio.get_running_loop().create_task(m.start(body.model))
    m.background(task)
    # give the start a moment to be placed, so the answer carries the log path
    for _ in range(40):
        if task.done() or inst.state is not State.STOPPED or inst.engine is not None:
            break
        await asyncio.sleep(0.05)
    return inst.snapshot()


@router.post("/stop")
async def stop(body: ModelRef, request: Request) -> dict[str, Any]:
    return await manager_of(request).stop(body.model)


@router.post("/sleep")
async def sleep(body: SleepBody, request: Request) -> dict[str, Any]:
    snapshot, note = await manager_of(request).sleep(body.model, body.level)
    return {**snapshot, "note": note}


@router.post("/assign")
async def assign(body: AssignBody, request: Request) -> dict[str, Any]:
    m = manager_of(request)
    name, _ = m.resolve(body.model)
    changes = body.model_dump(exclude={"model", "restart"}, exclude_none=True)
    if not changes and not body.restart:
        raise BadRequest("nothing to assign: give --devices, --gpu-memory or another setting")
    # the two memory settings are exclusive: setting one clears the other (setting both is refused below)
    if "gpu_memory_utilization" in changes and "gpu_memory_gib" not in changes:
        changes["gpu_memory_gib"] = None
    elif "gpu_memory_gib" in changes and "gpu_memory_utilization" not in changes:
        changes["gpu_memory_utilization"] = None
    try:
        cfg = update_model_entry(m.settings.models_path, name, {k: v for k, v in changes.items()})
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    m.load_config()
    restarted = False
    inst = m.instances.get(name)
    if body.restart and inst is not None and inst.state is not State.STOPPED:
        await m.stop(name)
        await m.start(name)
        restarted = True
    return {"model": name, "config": cfg.model_dump(exclude_defaults=True), "restarted": restarted}


@router.get("/logs")
async def logs(request: Request, model: str, lines: int = 50, offset: int | None = None) -> dict[str, Any]:
    """The last `lines` of MODEL's current vLLM log; or, with `offset` (a byte position, as answered in `offset`
    by the previous call), the complete lines written since (`vllama logs -f` and `vllama start` follow it so)."""
    m = manager_of(request)
    name, _ = m.resolve(model)
    inst = m.instances.get(name)
    if inst is None or inst.last_log is None:
        raise NotFound(f"{name} has no log yet (it has not been started by this vllama)")
    if offset is None:
        text, end = log_tail(inst.last_log, max(1, min(lines, 2000)))
    else:
        text, end = _log_from(inst.last_log, max(0, offset))
    return {"model": name, "log": str(inst.last_log), "lines": text, "offset": end}


_LOG_CHUNK = 1024 * 1024


def _log_from(path: Path, offset: int) -> tuple[str, int]:
    """Complete lines from `offset` (at most 1 MiB) and the offset after them. A log shorter than `offset` was
    replaced (a restart writes a new file): read it from the start."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read(_LOG_CHUNK)
    except OSError:
        return "", offset
    if len(data) < _LOG_CHUNK:
        data = data[: data.rfind(b"\n") + 1]  # only whole lines: the rest comes with the next call
    return data.decode(errors="replace"), offset + len(data)
