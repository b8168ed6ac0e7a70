"""Prometheus metrics: requests, latencies, batch sizes, reloads and the index being served.

Each app owns its registry, so several apps in one process (tests, benchmarks) never collide.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for no use
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "convirt_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "convirt_http_request_seconds",
            "Time from request to the end of the response, by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "convirt_batch_size",
            "Queries embedded per encoder call (micro-batching), by modality",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "convirt_inference_seconds",
            "Time of one encoder call, by modality",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.index_images = Gauge(
            "convirt_index_images",
            "Images in the index version being served",
            registry=self.registry,
        )
        self.index_info = Gauge(
            "convirt_index_info",
            "1 for the index version and model fingerprint being served",
            ["version", "fingerprint"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "convirt_index_reloads",
            "Index reload attempts, by outcome (switched, unchanged, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.audit_refused = Counter(
            "convirt_audit_refused",
            "Requests refused (503) because their audit entry could not be written, by reason "
            "(disk_reserve: under CONVIRT_AUDIT_MIN_FREE_MB, disk_full, write_failed)",
            ["reason"],
            registry=self.registry,
        )
        self.audit_torn_sealed = Counter(
            "convirt_audit_torn_writes_sealed",
            "Audit lines cut short (a full disk) and sealed by a recovery entry",
            registry=self.registry,
        )
        self.audit_free_bytes = Gauge(
            "convirt_audit_disk_free_bytes",
            "Free bytes on the audit log's disk (requests are refused under the reserve)",
            registry=self.registry,
        )

    def audit_event(self, event: str) -> None:
        """What the audit log reports (service.audit.store): a refusal's reason, or a seal."""
        if event == "torn_write_sealed":
            self.audit_torn_sealed.inc()
        else:
            self.audit_refused.labels(event).inc()

    def set_index(self, version: str, fingerprint: str, count: int) -> None:
        self.index_info.clear()
        self.index_info.labels(version, fingerprint).set(1)
        self.index_images.set(count)

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.inference.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting requests and timing them by route template (not raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's route list, to label requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route, method = route_label(scope, self.routes), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)


def route_label(scope: Scope, routes: list[BaseRoute]) -> str:
    """The matched route's template (/v1/images/{image_id}), so ids never become labels."""
    matched = getattr(scope.get("route"), "path", None)
    if matched:
        return matched
    path = scope.get("path", "")
    if path.startswith("/static/"):
        return "/static"
    if any(getattr(route, "path", None) == path for route in routes):
        return path  # refused before routing (e.g. 413 from the body size limit)
    return "unmatched"
