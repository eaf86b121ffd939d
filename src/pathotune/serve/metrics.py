"""Prometheus metrics of one server, in a registry of its own (never the process-wide default one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests by task and status, latencies, batch sizes, tasks per batch, queue depth, the bundle cache."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pathotune_requests", "Prediction requests by task and HTTP status", ["task", "status"], registry=r
        )
        self.latency = Histogram(
            "pathotune_request_seconds", "Prediction request latency (seconds)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("pathotune_images", "Images predicted", registry=r)
        self.batch_images = Histogram(
            "pathotune_batch_images", "Images per mixed forward", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "pathotune_batch_tasks", "Distinct tasks per mixed forward", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "pathotune_batch_seconds", "Time of one mixed forward (seconds)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("pathotune_queue_images", "Images admitted and waiting for a forward", registry=r)
        self.in_flight = Gauge("pathotune_requests_in_flight", "Prediction requests being served", registry=r)
        self.cache_hits = Counter("pathotune_bundle_cache_hits", "Task models found loaded", registry=r)
        self.cache_misses = Counter("pathotune_bundle_cache_misses", "Task models loaded from their bundle", registry=r)
        self.cache_evictions = Counter(
            "pathotune_bundle_cache_evictions", "Task models dropped to keep the cache within its bound", registry=r
        )
        self.cache_bytes = Gauge("pathotune_bundle_cache_bytes", "Bytes of the cached task models' tensors", registry=r)
        self.cache_limit = Gauge("pathotune_bundle_cache_limit_bytes", "The bundle cache's bound", registry=r)
        self.cache_tasks = Gauge("pathotune_bundle_cache_tasks", "Task models in the cache", registry=r)
        self.registered = Gauge("pathotune_tasks_registered", "Bundles found in the bundle folders", registry=r)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
