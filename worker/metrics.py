"""The worker's own Prometheus metrics, served on IMAGEGEN_METRICS_PORT when set.

Cluster-wide figures (queue depth, jobs by status, run-time histograms) live in Redis and are
exported by every gateway; these are the per-worker ones a scrape of each worker adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagegen.core.contract import ServedModel


class WorkerMetrics:
    """Job and step durations, batch sizes and GPU memory of one worker process."""

    def __init__(self, model_id: str, device: torch.device, exact_steps: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.device = device
        # CUDA runs asynchronously: a step's time is only its GPU time once the GPU caught
        # up. Synchronizing costs the overlap of one step's launch with the last one's work,
        # so it is done only where the step times are scraped.
        self.synchronize = exact_steps and device.type == "cuda"
        self._job_seconds = Histogram(
            "imagegen_worker_job_seconds",
            "Run time of succeeded jobs.",
            ["model"],
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self._step_seconds = Histogram(
            "imagegen_worker_step_seconds",
            "Time of one denoising step.",
            ["model"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self._batch_size = Histogram(
            "imagegen_worker_batch_size",
            "Images per denoising loop.",
            ["model"],
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self._images = Counter(
            "imagegen_worker_images", "Images generated.", ["model"], registry=self.registry
        )
        self.use_model(model_id)
        gpu = Gauge(
            "imagegen_worker_gpu_memory_bytes",
            "GPU memory held by torch.",
            ["model", "kind"],
            registry=self.registry,
        )
        if device.type == "cuda":
            gpu.labels(model_id, "allocated").set_function(
                lambda: torch.cuda.memory_allocated(device)
            )
            gpu.labels(model_id, "reserved").set_function(
                lambda: torch.cuda.memory_reserved(device)
            )

    def use_model(self, model_id: str) -> None:
        """Label what follows (jobs, steps, batches) with `model_id`."""
        self.job_seconds = self._job_seconds.labels(model=model_id)
        self.step_seconds = self._step_seconds.labels(model=model_id)
        self.batch_size = self._batch_size.labels(model=model_id)
        self.images = self._images.labels(model=model_id)

    def watch_models(self, served: Callable[[], list[ServedModel]], budget_bytes: int) -> None:
        """Gauges of a multi-model worker: its memory budget, and per model whether it is
        loaded and the bytes it holds (or would take), read at each scrape."""
        Gauge(
            "imagegen_worker_model_memory_budget_bytes",
            "Memory the worker's loaded models may hold together.",
            registry=self.registry,
        ).set(budget_bytes)
        self.registry.register(_ServedCollector(served))

    def observe_job(self, seconds: float, images: int) -> None:
        self.job_seconds.observe(seconds)
        self.images.inc(images)

    def observe_step(self, seconds: float, batch: int, first: bool) -> None:
        self.step_seconds.observe(seconds)
        if first:
            self.batch_size.observe(batch)

    def step_clock(self) -> Callable[[int, int], None]:
        """A loop-step callback (step, rows) that times each denoising step."""
        last = time.perf_counter()

        def on_loop_step(step: int, rows: int) -> None:
            nonlocal last
            if self.synchronize:
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.observe_step(now - last, rows, first=step == 0)
            last = now

        return on_loop_step

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


class _ServedCollector(Collector):
    def __init__(self, served: Callable[[], list[ServedModel]]) -> None:
        self.served = served

    def collect(self) -> list[GaugeMetricFamily]:
        loaded = GaugeMetricFamily(
            "imagegen_worker_model_loaded",
            "1 while the model is held warm, else 0 (-1: it cannot be loaded).",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            "imagegen_worker_model_memory_bytes",
            "Bytes the model holds while loaded, else what loading it takes.",
            labels=["model"],
        )
        for model in self.served():
            state = 1 if model.loaded else (-1 if model.unavailable else 0)
            loaded.add_metric([model.info.id], state)
            memory.add_metric([model.info.id], model.memory_bytes)
        return [loaded, memory]
