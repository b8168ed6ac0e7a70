"""Prometheus metrics: requests, latencies, search stages, batch sizes, reloads and the index.

Each app owns its registry, so several apps in one process (tests, benchmarks) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TypeVar

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

M = TypeVar("M", Counter, Gauge, Histogram)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)  # a stage may take well under 5 ms


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for no use
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = self._metric(
            Counter,
            "convirt_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
        )
        self.latency = self._metric(
            Histogram,
            "convirt_http_request_seconds",
            "Time from request to the end of the response, by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = self._metric(
            Histogram,
            "convirt_batch_size",
            "Queries embedded per encoder call (micro-batching), by modality",
            ["kind"],
            buckets=BATCH_BUCKETS,
        )
        self.inference = self._metric(
            Histogram,
            "convirt_inference_seconds",
            "Time of one encoder call, by modality",
            ["kind"],
            buckets=LATENCY_BUCKETS,
        )
        self.stages = self._metric(
            Histogram,
            "convirt_search_stage_seconds",
            "Time of one stage of a search, by stage (index.read.timings: decode, queue, "
            "encode, filter, faiss, reports, grouping, describe, audit)",
            ["stage"],
            buckets=STAGE_BUCKETS,
        )
        self.index_images = self._metric(
            Gauge, "convirt_index_images", "Images in the index version being served"
        )
        self.index_info = self._metric(
            Gauge,
            "convirt_index_info",
            "1 for the index version and model fingerprint being served",
            ["version", "fingerprint"],
        )
        self.reloads = self._metric(
            Counter,
            "convirt_index_reloads",
            "Index reload attempts, by outcome (switched, unchanged, failed)",
            ["outcome"],
        )
        self.audit_refused = self._metric(
            Counter,
            "convirt_audit_refused",
            "Requests refused (503) because their audit entry could not be written, by reason "
            "(disk_reserve: under CONVIRT_AUDIT_MIN_FREE_MB, disk_full, write_failed)",
            ["reason"],
        )
        self.audit_torn_sealed = self._metric(
            Counter,
            "convirt_audit_torn_writes_sealed",
            "Audit lines cut short (a full disk) and sealed by a recovery entry",
        )
        self.audit_free_bytes = self._metric(
            Gauge,
            "convirt_audit_disk_free_bytes",
            "Free bytes on the audit log's disk (requests are refused under the reserve)",
        )

    def _metric(self, kind: type[M], name: str, documentation: str, labels=(), **options) -> M:
        """One metric of this app's registry (Counter, Gauge or Histogram; buckets as options)."""
        return kind(name, documentation, labels, registry=self.registry, **options)

    def audit_event(self, event: str) -> None:
        """What the audit log reports (service.guard.audit.store): a refusal's reason, or a seal."""
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

    def observe_stages(self, ms: Mapping[str, float]) -> None:
        """A search's Timings (stage: milliseconds), each stage into its histogram."""
        for stage, taken in ms.items():
            self.stages.labels(stage).observe(taken / 1000)

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
