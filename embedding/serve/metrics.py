"""Prometheus metrics of one app (its own registry, so several apps in one process do not
collide): requests by route and status, errors by code, request latency, images, model
batch sizes and seconds, images waiting for the model. `GET /metrics` serves them."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}  # others: "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's metrics; `queue_depth` is read when scraped."""

    def __init__(self, max_batch: int, queue_depth=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedding_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "embedding_request_errors", "Refused or failed requests by route and error code",
            ["route", "code"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "embedding_request_seconds", "Request latency (seconds) by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.images = Counter(
            "embedding_images", "Images (or face crops) embedded", registry=self.registry
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        buckets = sorted({size for size in sizes if size < max_batch} | {max_batch})
        self.batch_size = Histogram(
            "embedding_batch_size", "Images per model call", buckets=buckets,
            registry=self.registry,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "embedding_batch_seconds", "Model call duration (seconds)",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "embedding_queue_depth", "Images waiting for the model", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by its route template (`/v1/galleries/{name}/identify`,
    not the path: bounded label values), status and error code, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                code = dict(message.get("headers", [])).get(b"x-error-code")
                if code is not None:
                    self.metrics.errors.labels(_route(scope), code.decode("latin-1")).inc()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
