"""The FastAPI app factory. The lifespan owns the Manager: it opens it at start-up and, on shutdown, lets
in-flight requests finish (bounded) and stops every vLLM child."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from vllama import __version__, metrics
from vllama.api import admin, ollama, openai, ui
from vllama.auth import ApiKeyMiddleware
from vllama.config import Settings
from vllama.errors import ConfigError, VllamaError, error_body
from vllama.gpu import GIB, GpuProbe, device_selection, make_probe
from vllama.manager import Manager

log = logging.getLogger("vllama")


def probe_from_settings(settings: Settings) -> GpuProbe:
    selection, source = device_selection(settings.devices, os.environ)
    return make_probe(
        settings.gpu_probe,
        cpu_budget=int(settings.cpu_memory_gib * GIB) if settings.cpu_memory_gib else None,
        ledger=settings.fake_gpu_ledger,
        fake_totals=[int(g * GIB) for g in settings.fake_gpu_total_gib],
        selection=selection,
        source=source,
        fake_mig=settings.fake_gpu_mig,
        fake_links=settings.fake_gpu_nvlink,
    )


def create_app(settings: Settings, probe: GpuProbe | None = None) -> FastAPI:
    manager = Manager(settings, probe or probe_from_settings(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await manager.open()
        log.info(
            "vllama %s: %s devices %s, models file %s",
            __version__,
            manager.probe.kind,
            [
                f"{d.index}: {d.name} {d.uuid} (NVML {d.physical})" if d.uuid else d.name
                for d in manager.probe.devices()
            ],
            settings.models_path,
        )
        if not settings.api_key and settings.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "listening on %s without an API key: anyone who can reach port %d can use every model and the "
                "admin API (set VLLAMA_API_KEY, or --host 127.0.0.1)",
                settings.host,
                settings.port,
            )
        try:
            yield
        finally:
            log.info("shutting down: stopping %d instance(s)", len(manager.instances))
            await manager.close()

    app = FastAPI(title="vllama", version=__version__, lifespan=lifespan)
    app.state.manager = manager
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(ollama.router)
    app.include_router(ui.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(manager.metrics.render(), media_type=metrics.CONTENT_TYPE)

    if settings.api_key or settings.admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, admin_api_key=settings.admin_api_key)
    app.add_middleware(metrics.MetricsMiddleware, metrics=manager.metrics)  # outermost: counts 401s too

    @app.exception_handler(VllamaError)
    async def vllama_error(request: Request, exc: VllamaError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(message, "invalid_request_error", "bad_request", loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error", "internal_error"), status_code=500)

    return app


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except ConfigError as exc:  # e.g. a CUDA_VISIBLE_DEVICES / VLLAMA_DEVICES that names no GPU
        print(f"vllama: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler found at start-up:
    # make that one exit 0, so a clean `kill PID` is a clean exit (and not "killed by SIGTERM")
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),  # int(0.5) would be no grace at all
        access_log=False,
    )
