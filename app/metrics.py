"""`GET /metrics`: Prometheus text, gathered at scrape time from Redis and this process."""

from __future__ import annotations

import asyncio
import copy
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.capacity import MemoryGuard, RedisMemory
from app.events import EventHub
from app.service import GenerationService
from imagegen.core.contract import ModelInfo

router = APIRouter(tags=["health"])

# Per-process request counts. Scrape each gateway process, or run several processes of one
# gateway with PROMETHEUS_MULTIPROC_DIR set, and prometheus_client sums them at scrape time.
REQUESTS = Counter(
    "imagegen_http_requests", "HTTP requests answered.", ["method", "route", "status"]
)


class RequestMetrics:
    """Counts every answered request by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status)).inc()


@dataclass(frozen=True)
class ModelFigures:
    info: ModelInfo
    workers: int
    queued: int
    run_buckets: list[tuple[str, float]]
    run_seconds: float


@dataclass(frozen=True)
class RedisFigures:
    """What a scrape shows from Redis (the same for every gateway replica), read on the event
    loop before the collector formats it."""

    jobs: dict[tuple[str, str], int]
    models: list[ModelFigures]
    key_stats: dict[str, dict[str, float]] | None  # None: this scrape has no per-key series
    key_names: list[str]
    key_active: list[int]


async def read_figures(service: GenerationService, per_key: bool) -> RedisFigures:
    store = service.store
    models = []
    for info, live in await service.registry.models():
        buckets, total = await store.run_histogram(info.id)
        queued = await service.queue_depth(info.id)
        models.append(ModelFigures(info, live, queued, buckets, total))
    stats = await store.key_stats() if per_key else None
    names = sorted(set(stats or {}) | set(service.api_keys.names() or [""])) if per_key else []
    return RedisFigures(
        await store.job_stats(), models, stats, names, await store.active_jobs(names)
    )


class ServiceCollector(Collector):
    """Formats one scrape: the figures read from Redis, and this process's own open streams
    and tasks."""

    def __init__(self, hub: EventHub):
        self.hub = hub
        self.tasks = 0
        self.figures: RedisFigures | None = None
        self.memory: RedisMemory | None = None
        self.high_water = 1.0

    def for_scrape(
        self, *, tasks: int, figures: RedisFigures, memory: RedisMemory, high_water: float
    ) -> ServiceCollector:
        """A collector for one scrape (its own copy: concurrent scrapes, one with the
        operator token and one without, never see each other's figures)."""
        scrape = copy.copy(self)
        scrape.tasks, scrape.memory, scrape.high_water = tasks, memory, high_water
        scrape.figures = figures
        return scrape

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        figures = self.figures
        if figures is None:
            return
        jobs = CounterMetricFamily(
            "imagegen_jobs",
            "Jobs that ended, by model and final status.",
            labels=["model", "status"],
        )
        for (model, status), count in sorted(figures.jobs.items()):
            jobs.add_metric([model, status], count)
        yield jobs
        runs = HistogramMetricFamily(
            "imagegen_job_run_seconds", "Run time of succeeded jobs.", labels=["model"]
        )
        depth = GaugeMetricFamily(
            "imagegen_queue_depth", "Jobs waiting in a model's queue.", labels=["model"]
        )
        workers = GaugeMetricFamily(
            "imagegen_workers", "Live workers serving a model.", labels=["model"]
        )
        for served in figures.models:
            depth.add_metric([served.info.id], served.queued)
            workers.add_metric([served.info.id], served.workers)
            runs.add_metric([served.info.id], served.run_buckets, served.run_seconds)
        yield depth
        yield workers
        yield runs
        if figures.key_stats is not None:
            yield from self._per_key(figures)
        if self.memory is not None:
            yield GaugeMetricFamily(
                "imagegen_redis_used_memory_bytes",
                "Redis used_memory: job records and the PNGs kept for IMAGEGEN_RESULT_TTL_S.",
                value=self.memory.used,
            )
            yield GaugeMetricFamily(
                "imagegen_redis_maxmemory_bytes",
                "Redis maxmemory (0 = no limit); with noeviction, writes fail past it.",
                value=self.memory.limit,
            )
            yield GaugeMetricFamily(
                "imagegen_redis_high_water_ratio",
                "Fraction of maxmemory past which the gateway refuses new jobs (503).",
                value=self.high_water,
            )
        yield GaugeMetricFamily(
            "imagegen_gateway_event_streams",
            "Open event streams in this gateway process.",
            value=self.hub.open_streams,
        )
        yield GaugeMetricFamily(
            "imagegen_gateway_event_feeds",
            "Jobs followed for the open event streams in this gateway process (one read and "
            "one formatting per event, whatever the number of streams).",
            value=self.hub.open_feeds,
        )
        yield CounterMetricFamily(
            "imagegen_gateway_event_frames_dropped",
            "Progress and preview events not sent to a stream whose client did not read them.",
            value=self.hub.dropped,
        )
        yield GaugeMetricFamily(
            "imagegen_gateway_asyncio_tasks",
            "Asyncio tasks alive in this gateway process.",
            value=self.tasks,
        )

    def _per_key(self, figures: RedisFigures) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Each API key's totals, labelled by its name (never its secret or hash; the open
        service's one principal is `(open)`)."""
        jobs = CounterMetricFamily(
            "imagegen_key_jobs",
            "Jobs that ended, by API key and final status.",
            labels=["key", "status"],
        )
        work = CounterMetricFamily(
            "imagegen_key_megapixel_steps",
            "Megapixel-steps (width*height/1e6 * steps * n) of the key's jobs that ended, "
            "less those canceled before they ran.",
            labels=["key"],
        )
        hooks = CounterMetricFamily(
            "imagegen_key_webhook_deliveries",
            "Webhook delivery attempts by API key and outcome (delivered; retrying: failed, "
            "will be retried; failed: given up).",
            labels=["key", "outcome"],
        )
        active = GaugeMetricFamily(
            "imagegen_key_active_jobs", "The key's jobs queued or running now.", labels=["key"]
        )
        stats = figures.key_stats or {}
        for name in figures.key_names:
            label = key_label(name)
            counters = stats.get(name, {})
            for status in ("succeeded", "failed", "canceled"):
                jobs.add_metric([label, status], counters.get(status, 0.0))
            work.add_metric([label], counters.get("megapixel_steps", 0.0))
            for outcome in ("delivered", "retrying", "failed"):
                hooks.add_metric([label, outcome], counters.get(f"webhook_{outcome}", 0.0))
        for name, count in zip(figures.key_names, figures.key_active, strict=True):
            active.add_metric([key_label(name)], count)
        yield from (jobs, work, hooks, active)


def key_label(name: str) -> str:
    """How a key is named in metrics and `imagegen usage`: its name; `(open)` without keys."""
    return name or "(open)"


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    collector: ServiceCollector = request.app.state.collector
    guard: MemoryGuard = request.app.state.memory
    scrape = collector.for_scrape(
        tasks=len(asyncio.all_tasks()),
        figures=await read_figures(request.app.state.service, shows_tenants(request)),
        memory=await guard.read(max_age_s=0),
        high_water=guard.high_water,
    )
    registry = CollectorRegistry()
    registry.register(scrape)
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(REQUESTS)
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def shows_tenants(request: Request) -> bool:
    """Whether this scrape gets the per-key series: always on an open service (its one
    principal is `(open)`), else only with `Authorization: Bearer <IMAGEGEN_METRICS_TOKEN>`,
    so the public port never lists another tenant's name or usage."""
    if not request.app.state.keys.enabled:
        return True
    token: SecretStr | None = request.app.state.settings.metrics_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if token is None or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())
