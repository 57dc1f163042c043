"""Prometheus metrics (GET /metrics), kept cheap: counters move once per request or lifecycle operation, never
per streamed chunk; model states, in-flight counts and device memory are read from the manager at scrape time.

Each Manager owns its own registry (no process-global state), so several apps can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from vllama.manager import Manager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# no `*_created` series: they double the output and no dashboard uses them
disable_created_metrics()  # type: ignore[no-untyped-call]

# lifecycle operations take from ~0.05 s (a level-1 sleep) to many minutes (a cold start of a large model)
_OPERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STATES = ("stopped", "starting", "running", "draining", "sleeping", "waking", "stopping", "error")


class Metrics:
    """The daemon's metrics. `observe_*` methods are called by the manager and the request middleware."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vllama_requests",
            "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.errors = Counter(
            "vllama_request_errors", "HTTP requests answered with a status >= 400", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "vllama_request_duration_seconds",
            "time from a request's arrival to the last byte of its answer (streams included)",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.operations = Counter(
            "vllama_model_operations",
            "lifecycle operations on model instances (start, wake, sleep, stop), by outcome",
            ["model", "operation", "outcome"],
            registry=r,
        )
        self.operation_seconds = Histogram(
            "vllama_model_operation_duration_seconds",
            "duration of lifecycle operations on model instances",
            ["model", "operation"],
            buckets=_OPERATION_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "vllama_evictions",
            "models put to sleep or stopped without being asked: to make room (capacity), by the keep-alive "
            "ladder (keep_alive), or after a request with keep_alive 0 (request)",
            ["model", "reason", "action"],
            registry=r,
        )
        self.lora_operations = Counter(
            "vllama_lora_operations",
            "LoRA adapter operations on a running base model (load, unload, reload after a wake), by outcome",
            ["model", "adapter", "operation", "outcome"],
            registry=r,
        )
        self.lora_seconds = Histogram(
            "vllama_lora_operation_duration_seconds",
            "duration of LoRA adapter loads, unloads and reloads",
            ["model", "operation"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.model_wait = Histogram(
            "vllama_model_wait_seconds",
            "time a request waited for its model to be started or woken (requests to a running model do not wait)",
            ["model"],
            buckets=_OPERATION_BUCKETS,
            registry=r,
        )

    def bind(self, manager: Manager) -> None:
        """Collect the manager's live state at scrape time."""
        self.registry.register(_ManagerCollector(manager))

    # --- called by the manager -----------------------------------------------------------------------------

    def observe_operation(self, model: str, operation: str, seconds: float, ok: bool) -> None:
        self.operations.labels(model, operation, "ok" if ok else "error").inc()
        if ok:
            self.operation_seconds.labels(model, operation).observe(seconds)

    def observe_eviction(self, model: str, reason: str, action: str) -> None:
        self.evictions.labels(model, reason, action).inc()

    def observe_lora(self, model: str, adapter: str, operation: str, seconds: float, ok: bool) -> None:
        self.lora_operations.labels(model, adapter, operation, "ok" if ok else "error").inc()
        if ok:
            self.lora_seconds.labels(model, operation).observe(seconds)

    def observe_wait(self, model: str, seconds: float) -> None:
        self.model_wait.labels(model).observe(seconds)

    # --- called once per request by the middleware ---------------------------------------------------------

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        code = str(status)
        self.requests.labels(endpoint, method, code).inc()
        if status >= 400:
            self.errors.labels(endpoint, code).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ManagerCollector(Collector):
    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def describe(self) -> list[Metric]:
        return []  # collected live: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        state = GaugeMetricFamily(
            "vllama_model_state", "1 for the state each model instance is in", labels=["model", "state"]
        )
        level = GaugeMetricFamily(
            "vllama_model_sleep_level", "sleep level of each model (0 when awake)", labels=["model"]
        )
        in_flight = GaugeMetricFamily("vllama_model_in_flight", "requests in flight per model", labels=["model"])
        memory = GaugeMetricFamily(
            "vllama_model_memory_bytes", "memory a model holds (or has reserved) per device", labels=["model", "device"]
        )
        idle = GaugeMetricFamily(
            "vllama_model_idle_seconds", "seconds since each model's last request", labels=["model"]
        )
        host_held = GaugeMetricFamily(
            "vllama_model_host_memory_bytes", "host memory a model asleep at level 1 holds", labels=["model"]
        )
        adapters = GaugeMetricFamily(
            "vllama_lora_loaded",
            "1 for each LoRA adapter loaded into its running base model, else 0",
            labels=["model", "adapter"],
        )
        for row in m.ps():
            name = str(row["model"])
            for s in _STATES:
                state.add_metric([name, s], 1.0 if row["state"] == s else 0.0)
            level.add_metric([name], float(row.get("sleep_level") or 0))
            in_flight.add_metric([name], float(row["in_flight"]))
            idle.add_metric([name], float(row["idle_seconds"]))
            host_held.add_metric([name], float(row.get("host_memory_bytes") or 0))
            for device, n in dict(row.get("memory_bytes") or {}).items():
                memory.add_metric([name, str(device)], float(n))
            for adapter in row.get("adapters") or []:
                adapters.add_metric([name, str(adapter["name"])], 1.0 if adapter["loaded"] else 0.0)
        yield from (state, level, in_flight, memory, idle, host_held, adapters)

        total = GaugeMetricFamily(
            "vllama_device_memory_total_bytes", "device memory", labels=["device", "name", "kind"]
        )
        free = GaugeMetricFamily(
            "vllama_device_memory_free_bytes", "free device memory (measured)", labels=["device", "name", "kind"]
        )
        available = GaugeMetricFamily(
            "vllama_device_memory_available_bytes",
            "free device memory less what starting models reserved",
            labels=["device", "name", "kind"],
        )
        for d in m.devices_snapshot():
            labels = [str(d["index"]), str(d["name"]), str(d["kind"])]
            total.add_metric(labels, float(d["total_bytes"]))
            free.add_metric(labels, float(d["free_bytes"]))
            available.add_metric(labels, float(d["available_bytes"]))
        yield from (total, free, available)

        host = m.host_memory()
        budget = GaugeMetricFamily(
            "vllama_host_memory_budget_bytes", "host memory allowed for level-1 sleepers' weights"
        )
        budget.add_metric([], float(host["budget_bytes"]))
        l1 = GaugeMetricFamily("vllama_host_memory_l1_bytes", "host memory level-1 sleepers' weights hold")
        l1.add_metric([], float(host["l1_bytes"]))
        yield from (budget, l1)

        uptime = GaugeMetricFamily("vllama_uptime_seconds", "seconds since the daemon started")
        uptime.add_metric([], time.time() - m.started_at)
        yield uptime


class MetricsMiddleware:
    """Counts each HTTP request once, when its answer is complete: endpoint (the route's path template, so
    unknown paths do not make new series), method and status. Per chunk it only passes `send` through."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        def send_status(message: Message) -> Any:  # a plain function: no extra coroutine frame per chunk
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = _endpoint(scope)
            if endpoint != "/metrics":
                self.metrics.observe_request(endpoint, scope["method"], status[0], time.perf_counter() - t0)


def _endpoint(scope: Scope) -> str:
    """The route's path template; for a request answered before routing (a 401), the route it would have taken;
    "unmatched" for paths no route knows (so random paths make no new series)."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    app = scope.get("app")
    for candidate in _leaf_routes(getattr(getattr(app, "router", None), "routes", ())):
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes that answer requests. Newer FastAPI keeps an included router as one entry (its
    `original_router`) and sets no `route` in the scope the middleware sees: look inside."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route
