"""Prometheus metrics: request counts and latencies by route, queue and stage times, engine state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ditserve.runtime.scheduler import Scheduler, Ticket

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """One registry per app, so several servers in one process (tests) do not collide."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ditserve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("ditserve_request_latency_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("ditserve_queue_time_seconds", "Time a generation waited in the queue",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_time = Histogram("ditserve_stage_seconds", "Pipeline stage wall time per batch",
                                    ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("ditserve_batch_images", "Images in the pipeline call of a request",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.job_time = Histogram("ditserve_video_job_seconds", "Video job wall time, by outcome", ["status"],
                                  buckets=_LATENCY_BUCKETS + (1200, 1800, 3600), registry=r)
        self.step_time = Histogram("ditserve_step_seconds", "Denoising step time (mean over a batch)",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.jobs = None  # the video-job store, when the model makes videos: counts by status at scrape
        r.register(_EngineState(scheduler))
        r.register(_JobState(self))

    def observe_job(self, status: str, seconds: float) -> None:
        self.job_time.labels(status).observe(seconds)

    def observe_steps(self, steps: list[float]) -> None:
        if steps:
            self.step_time.observe(sum(steps) / len(steps))

    def observe_generation(self, ticket: Ticket, stages: dict[str, float]) -> None:
        self.queue_time.observe(ticket.queue_s)
        self.batch_images.observe(ticket.batch_images)
        for stage, seconds in stages.items():
            self.stage_time.labels(stage).observe(seconds)


class _EngineState:
    """Read at scrape time from the scheduler and the worker handle."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        s, w = self.scheduler, self.scheduler.worker
        yield _gauge("ditserve_queue_length", "Requests waiting in the queue", s.queue_length)
        yield _gauge("ditserve_running_requests", "Requests in the batch the worker is running", s.running)
        yield _gauge("ditserve_worker_ready", "1 when the worker has its model loaded", int(w.ready))
        yield _counter("ditserve_worker_restarts", "Worker processes started after a crash", w.restarts)
        yield _counter("ditserve_denoise_steps", "Denoising steps run by the worker (one per batch step)",
                       s.steps_total)
        yield _counter("ditserve_cancelled_requests", "Requests cancelled (disconnect or timeout)",
                       s.cancelled_total)
        yield _counter("ditserve_stopped_runs", "Batches stopped between steps because all were cancelled",
                       s.runs_stopped_total)
        memory = GaugeMetricFamily("ditserve_gpu_memory_bytes", "Worker GPU memory after its last batch",
                                   labels=["kind"])
        for kind, value in w.memory.items():
            memory.add_metric([kind], value)
        yield memory


class _JobState:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        if self.metrics.jobs is None:
            return
        family = GaugeMetricFamily("ditserve_video_jobs", "Video jobs in the store, by status", labels=["status"])
        for status, count in self.metrics.jobs.counts().items():
            family.add_metric([status], count)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
