"""Prometheus metrics, one registry per server (so several servers can live in one process, e.g. tests).

The `adapter` label is capped: the first `max_adapter_labels` distinct adapter ids get their own series,
later ones are reported as "other", so a server with thousands of adapters cannot explode the series count.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from deltaserve.server.engine import FinishReason, Request

# Latency buckets from a millisecond to ten minutes: LLM requests span that whole range.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
BASE_LABEL = "base"
OTHER_LABEL = "other"


class Metrics:
    def __init__(self, max_adapter_labels: int = 64) -> None:
        self.registry = CollectorRegistry()
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter("deltaserve_requests", "Finished requests", ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter(
            "deltaserve_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r
        )
        self.generated_tokens = Counter("deltaserve_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.ttft = Histogram(
            "deltaserve_time_to_first_token_seconds",
            "Arrival to first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "deltaserve_time_per_output_token_seconds",
            "Mean time per token after the first",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "deltaserve_request_duration_seconds",
            "Arrival to last token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "deltaserve_request_queue_seconds",
            "Arrival to prefill",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_running = Gauge("deltaserve_requests_running", "Requests decoding", registry=r)
        self.requests_waiting = Gauge("deltaserve_requests_waiting", "Requests queued", registry=r)
        self.batch_size = Histogram("deltaserve_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS, registry=r)

    def adapter_label(self, adapter_id: str) -> str:
        if not adapter_id:
            return BASE_LABEL
        with self._lock:
            if adapter_id in self._labels:
                return adapter_id
            if len(self._labels) < self._max_labels:
                self._labels.add(adapter_id)
                return adapter_id
        return OTHER_LABEL

    def observe_queue(self, adapter_id: str, seconds: float) -> None:
        self.queue.labels(self.adapter_label(adapter_id)).observe(seconds)

    def observe_first_token(self, adapter_id: str, seconds: float) -> None:
        self.ttft.labels(self.adapter_label(adapter_id)).observe(seconds)

    def observe_finished(
        self, request: Request, reason: FinishReason | None, error: BaseException | None, now: float
    ) -> None:
        label = self.adapter_label(request.adapter_id)
        status = "error" if error is not None else reason.value
        self.requests.labels(label, status).inc()
        self.prompt_tokens.labels(label).inc(len(request.prompt_ids))
        self.generated_tokens.labels(label).inc(len(request.generated))
        self.duration.labels(label).observe(now - request.arrival)
        if request.first_token_at is not None and len(request.generated) > 1:
            self.tpot.labels(label).observe((now - request.first_token_at) / (len(request.generated) - 1))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
