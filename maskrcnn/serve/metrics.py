"""The service's Prometheus metrics (prometheus-client), one registry per app, served at GET /metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a health probe's milliseconds to a large image queued behind others.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class ServeMetrics:
    """Requests by route and status, latency, queue wait, queue depth and bytes, batch sizes, inference time."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("maskrcnn_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("maskrcnn_http_request_seconds", "time from the request's arrival to the end of "
                                 "its response, by route", ["route"], buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("maskrcnn_queue_wait_seconds", "time an admitted image waited for the model",
                                    buckets=SECONDS, registry=r)
        self.inference = Histogram("maskrcnn_inference_seconds", "time one batch spent in the model",
                                   buckets=SECONDS, registry=r)
        self.batch_size = Histogram("maskrcnn_batch_size", "images per batch given to the model",
                                    buckets=BATCH_SIZES, registry=r)
        self.queue_depth = Gauge("maskrcnn_queue_depth", "images waiting for the model", registry=r)
        self.queue_bytes = Gauge("maskrcnn_queue_bytes", "bytes of the decoded images waiting", registry=r)
        self.running = Gauge("maskrcnn_running", "images in the model now", registry=r)
        self.uploads = Gauge("maskrcnn_uploads_reading", "request bodies being read now", registry=r)
        self.dropped = Counter("maskrcnn_dropped", "queued requests dropped before they ran (deadline passed, "
                               "client left)", ["reason"], registry=r)
        self.expired_running = Counter("maskrcnn_expired_while_running", "requests whose deadline passed while "
                                       "their batch ran (answered 504, the result dropped)", registry=r)
        self.rejected = Counter("maskrcnn_rejected", "requests refused with 503 at admission", ["reason"], registry=r)
        self.ready = Gauge("maskrcnn_ready", "1 once the model is loaded and warmed up", registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """Return the Prometheus text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
