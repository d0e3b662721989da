"""`GET /metrics`: Prometheus text, gathered at scrape time from Redis and this process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.events import EventHub
from app.registry import ModelRegistry
from app.service import GenerationService

router = APIRouter(tags=["health"])


class ServiceCollector(Collector):
    """Reads queue depths and live workers from Redis — the same for every gateway replica —
    and this process's own open streams and tasks."""

    def __init__(self, registry: ModelRegistry, service: GenerationService, hub: EventHub):
        self.registry = registry
        self.service = service
        self.hub = hub
        self.tasks = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "imagegen_queue_depth", "Jobs waiting in a model's queue.", labels=["model"]
        )
        workers = GaugeMetricFamily(
            "imagegen_workers", "Live workers serving a model.", labels=["model"]
        )
        for info, live in self.registry.models():
            depth.add_metric([info.id], self.service.queue(info.id).count)
            workers.add_metric([info.id], live)
        yield depth
        yield workers
        yield GaugeMetricFamily(
            "imagegen_gateway_event_streams",
            "Open event streams in this gateway process.",
            value=self.hub.open_streams,
        )
        yield GaugeMetricFamily(
            "imagegen_gateway_asyncio_tasks",
            "Asyncio tasks alive in this gateway process.",
            value=self.tasks,
        )


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    collector: ServiceCollector = request.app.state.collector
    collector.tasks = len(asyncio.all_tasks())
    registry = CollectorRegistry()
    registry.register(collector)
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
