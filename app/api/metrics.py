"""Prometheus metrics (prometheus_client): requests by route and status, latencies, queue depth, jobs by state.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never clash.
Queue figures are read from Redis at scrape time; with Redis down they are simply absent.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("resa.api")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "resa_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "resa_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self._jobs = None
        self._generation = None
        self.registry.register(self)

    def bind(self, jobs, generation) -> None:
        self._jobs, self._generation = jobs, generation

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def collect(self):
        """Scrape-time gauges (prometheus_client custom collector protocol)."""
        if self._generation is not None:
            loaded = GaugeMetricFamily("resa_models_loaded", "Models loaded in this API process.")
            loaded.add_metric([], len(self._generation.loaded_models))
            yield loaded
        if self._jobs is None:
            return
        try:
            depth = self._jobs.depth()
            counts = self._jobs.counts()
        except Exception as exc:  # noqa: BLE001 - Redis down: no queue figures, the scrape still succeeds
            log.debug("queue metrics unavailable: %s", exc)
            return
        queue = GaugeMetricFamily("resa_queue_depth", "Jobs waiting in the queue.", labels=["queue"])
        queue.add_metric([self._jobs.queue_name], depth)
        yield queue
        jobs = GaugeMetricFamily("resa_jobs", "Known jobs by state.", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs

    def render(self) -> bytes:
        return generate_latest(self.registry)
