"""Prometheus metrics, one registry per server (so several servers can live in one process, e.g. tests),
and the structured per-request log line.

The `adapter` label is capped: the first `max_adapter_labels` distinct adapter ids get their own series,
later ones are reported as "other" (no adapter is "base"), so a server with thousands of adapters cannot
explode the number of series. The `tenant` label of the scheduling metrics is capped the same way by
`max_tenant_labels` (--metrics-max-tenants; the base's tenant, "", is "base"). See docs/metrics.md for every
metric and docs/scheduling.md for the tenant ones.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

request_log = logging.getLogger("deltaserve.requests")

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


class FinishedRequest(Protocol):
    """What the metrics read of a finished request (the engine's Request has these); metrics sit below the
    engine, so they name the fields rather than import the class."""

    request_id: str
    prompt_ids: list[int]
    generated: list[int]
    arrival: float
    prefilled_at: float | None
    first_token_at: float | None

    @property
    def adapter_id(self) -> str: ...


BASE_LABEL = "base"
OTHER_LABEL = "other"
TIERS = ("device", "host")
KV_BLOCK_STATES = ("free", "used", "cached")


class Metrics:
    def __init__(self, max_adapter_labels: int = 64, max_tenant_labels: int = 64) -> None:
        self.registry = r = CollectorRegistry()
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._max_tenant_labels = max_tenant_labels
        self._tenant_labels: set[str] = set()
        self._load_labels: set[str] = set()  # tenant labels whose running/waiting gauges were set
        self._lock = threading.Lock()
        # requests and tokens
        self.requests = Counter(
            "deltaserve_requests", "Finished requests by final status", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "deltaserve_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r
        )
        self.generated_tokens = Counter("deltaserve_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.ttft = self._latency("deltaserve_time_to_first_token_seconds", "Arrival to first token")
        self.tpot = self._latency("deltaserve_time_per_output_token_seconds", "Mean time per token after the first")
        self.duration = self._latency("deltaserve_request_duration_seconds", "Arrival to last token")
        self.queue = self._latency("deltaserve_request_queue_seconds", "Arrival to prefill")
        self.requests_running = Gauge("deltaserve_requests_running", "Requests decoding", registry=r)
        self.requests_waiting = Gauge("deltaserve_requests_waiting", "Requests queued", registry=r)
        self.batch_size = Histogram("deltaserve_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS, registry=r)
        # adapters
        self.adapter_loads = Counter(
            "deltaserve_adapter_loads", "LoadAdapter calls by kind and result", ["kind", "result"], registry=r
        )
        self.adapter_load_duration = Histogram(
            "deltaserve_adapter_load_duration_seconds",
            "Parse, validate and place an adapter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # adapters from --adapter-source stores (the source label is operator configuration: bounded)
        self.source_downloads = Counter(
            "deltaserve_adapter_source_downloads",
            "Adapter downloads by source and outcome (ok, error, not_found)",
            ["source", "outcome"],
            registry=r,
        )
        self.source_download_bytes = Counter(
            "deltaserve_adapter_source_download_bytes", "Bytes downloaded from adapter sources", ["source"], registry=r
        )
        self.source_download_seconds = Histogram(
            "deltaserve_adapter_source_download_seconds",
            "Time to download one adapter",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.source_loads = Counter(
            "deltaserve_adapter_source_loads", "Loads of source adapters by outcome", ["source", "outcome"], registry=r
        )
        self.source_load_seconds = Histogram(
            "deltaserve_adapter_source_load_seconds",
            "Digest, parse, validate and place a downloaded adapter",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_cache_bytes = Gauge("deltaserve_adapter_cache_bytes", "Bytes in the adapter cache", registry=r)
        self.adapter_cache_entries = Gauge(
            "deltaserve_adapter_cache_entries", "Adapters in the adapter cache", registry=r
        )
        self.adapter_cache_lookups = Counter(
            "deltaserve_adapter_cache_lookups", "Adapter cache lookups by result (hit, miss)", ["result"], registry=r
        )
        self.adapter_cold_start = Histogram(
            "deltaserve_adapter_cold_start_seconds",
            "Arrival to first token of requests that waited for their adapter to load from a source",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapters_resident = Gauge("deltaserve_adapters_resident", "Adapters held, by tier", ["tier"], registry=r)
        self.adapter_evictions = Counter("deltaserve_adapter_evictions", "Adapters evicted from a tier", registry=r)
        self.merge_switches = Counter(
            "deltaserve_merge_switches", "Merges and unmerges of an adapter into the base", registry=r
        )
        self.merged_adapter = Gauge(
            "deltaserve_merged_adapter_info", "1 for the adapter merged into the base", ["adapter"], registry=r
        )
        # memory
        self.model_memory = Gauge("deltaserve_model_memory_bytes", "Bytes of the base model's weights", registry=r)
        self.adapter_memory = Gauge("deltaserve_adapter_memory_bytes", "Bytes of device adapter slots", registry=r)
        self.kv_cache_bytes = Gauge("deltaserve_kv_cache_bytes", "Bytes of the KV-cache block pool", registry=r)
        self.kv_cache_usage = Gauge(
            "deltaserve_kv_cache_usage_ratio", "KV-cache blocks held by requests / usable blocks", registry=r
        )
        self.kv_cache_blocks = Gauge(
            "deltaserve_kv_cache_blocks",
            "KV-cache blocks by state: free, used (held by requests), cached (prefix cache, evictable)",
            ["state"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "deltaserve_prefix_cache_queries", "Prompt positions looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "deltaserve_prefix_cache_hits", "Prompt positions whose K/V came from the prefix cache", registry=r
        )
        self.preemptions = Counter(
            "deltaserve_preemptions", "Requests preempted (blocks released, recomputed later)", registry=r
        )
        # tenants (the scheduler: docs/scheduling.md)
        self.tenant_queue = Histogram(
            "deltaserve_tenant_queue_seconds",
            "Arrival to prefill, by tenant",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_prompt_tokens = Counter(
            "deltaserve_tenant_prompt_tokens", "Prompt tokens served (prefilled), by tenant", ["tenant"], registry=r
        )
        self.tenant_generated_tokens = Counter(
            "deltaserve_tenant_generated_tokens",
            "Tokens generated, by tenant, as they are computed",
            ["tenant"],
            registry=r,
        )
        self.tenant_running = Gauge(
            "deltaserve_tenant_requests_running", "Requests holding a batch place, by tenant", ["tenant"], registry=r
        )
        self.tenant_waiting = Gauge(
            "deltaserve_tenant_requests_waiting", "Requests queued, by tenant", ["tenant"], registry=r
        )
        self.tenant_rejections = Counter(
            "deltaserve_tenant_rejections",
            "Requests refused at once for a full queue or a tenant limit (RESOURCE_EXHAUSTED / 429), by tenant",
            ["tenant"],
            registry=r,
        )
        self.tenant_preemptions = Counter(
            "deltaserve_tenant_preemptions", "Requests preempted, by tenant", ["tenant"], registry=r
        )
        self.info = Gauge(
            "deltaserve_info",
            "The served model (always 1)",
            ["model", "version", "dtype", "device", "quantization"],
            registry=r,
        )

    def _latency(self, name: str, documentation: str) -> Histogram:
        return Histogram(name, documentation, ["adapter"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def bind(
        self,
        *,
        model_bytes: int,
        kv_cache_bytes: int,
        adapter_bytes: Callable[[], float],
        kv_usage: Callable[[], float],
        kv_blocks: Callable[[str], float],
        resident: Callable[[str], float],
        info: dict[str, str],
    ) -> None:
        """Attach the live sources of the resource gauges (read at scrape time)."""
        self.model_memory.set(model_bytes)
        self.kv_cache_bytes.set(kv_cache_bytes)
        self.adapter_memory.set_function(adapter_bytes)
        self.kv_cache_usage.set_function(kv_usage)
        for state in KV_BLOCK_STATES:
            self.kv_cache_blocks.labels(state).set_function(lambda state=state: kv_blocks(state))
        for tier in TIERS:
            self.adapters_resident.labels(tier).set_function(lambda tier=tier: resident(tier))
        self.info.labels(**info).set(1)

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

    def tenant_label(self, tenant: str) -> str:
        """The tenant's label: itself for the first `max_tenant_labels` tenants seen, then "other"."""
        if not tenant:
            return BASE_LABEL
        with self._lock:
            if tenant in self._tenant_labels:
                return tenant
            if len(self._tenant_labels) < self._max_tenant_labels:
                self._tenant_labels.add(tenant)
                return tenant
        return OTHER_LABEL

    def observe_tenant_queue(self, tenant: str, seconds: float) -> None:
        self.tenant_queue.labels(self.tenant_label(tenant)).observe(seconds)

    def observe_tenant_tokens(self, tenant: str, prompt: int, generated: int) -> None:
        label = self.tenant_label(tenant)
        if prompt:
            self.tenant_prompt_tokens.labels(label).inc(prompt)
        if generated:
            self.tenant_generated_tokens.labels(label).inc(generated)

    def observe_rejection(self, tenant: str) -> None:
        self.tenant_rejections.labels(self.tenant_label(tenant)).inc()

    def observe_tenant_preemption(self, tenant: str) -> None:
        self.tenant_preemptions.labels(self.tenant_label(tenant)).inc()

    def set_tenant_load(self, running: dict[str, int], waiting: dict[str, int]) -> None:
        """Set the running and waiting gauges from per-tenant counts (tenants folded into "other" add up; a
        label that had requests and has none now reads 0)."""
        by_label: dict[str, list[int]] = {label: [0, 0] for label in self._load_labels}
        for column, counts in enumerate((running, waiting)):
            for tenant, count in counts.items():
                by_label.setdefault(self.tenant_label(tenant), [0, 0])[column] += count
        for label, (run, wait) in by_label.items():
            self.tenant_running.labels(label).set(run)
            self.tenant_waiting.labels(label).set(wait)
        self._load_labels = {label for label, counts in by_label.items() if any(counts)}

    def observe_queue(self, adapter_id: str, seconds: float) -> None:
        self.queue.labels(self.adapter_label(adapter_id)).observe(seconds)

    def observe_first_token(self, adapter_id: str, seconds: float) -> None:
        self.ttft.labels(self.adapter_label(adapter_id)).observe(seconds)

    def observe_load(self, kind: str, result: str, seconds: float) -> None:
        self.adapter_loads.labels(kind or "unknown", result).inc()
        self.adapter_load_duration.observe(seconds)

    # the resolver's SourceMetrics (server/residency/sources.py)
    def download(self, source: str, outcome: str, size: int, seconds: float) -> None:
        self.source_downloads.labels(source, outcome).inc()
        if outcome == "ok":
            self.source_download_bytes.labels(source).inc(size)
            self.source_download_seconds.labels(source).observe(seconds)

    def load(self, source: str, outcome: str, seconds: float) -> None:
        self.source_loads.labels(source, outcome).inc()
        self.source_load_seconds.labels(source).observe(seconds)

    def cache(self, size_bytes: int, entries: int, hit: bool | None) -> None:
        self.adapter_cache_bytes.set(size_bytes)
        self.adapter_cache_entries.set(entries)
        if hit is not None:
            self.adapter_cache_lookups.labels("hit" if hit else "miss").inc()

    def observe_finished(self, request: FinishedRequest, status: str, now: float) -> None:
        """`status` is the finish reason's value, or "error"."""
        label = self.adapter_label(request.adapter_id)
        self.requests.labels(label, status).inc()
        self.prompt_tokens.labels(label).inc(len(request.prompt_ids))
        self.generated_tokens.labels(label).inc(len(request.generated))
        self.duration.labels(label).observe(now - request.arrival)
        if request.first_token_at is not None and len(request.generated) > 1:
            self.tpot.labels(label).observe((now - request.first_token_at) / (len(request.generated) - 1))
        _log_request(request, status, now)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)


def _milliseconds(start: float, end: float | None) -> float | None:
    return None if end is None else round((end - start) * 1000, 3)


def _log_request(request: FinishedRequest, status: str, now: float) -> None:
    """One JSON line per finished request: ids, sizes and timings; never the prompt or the output text."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    record = {
        "request_id": request.request_id,
        "adapter": request.adapter_id or None,
        "status": status,
        "prompt_tokens": len(request.prompt_ids),
        "generated_tokens": len(request.generated),
        "queue_ms": _milliseconds(request.arrival, request.prefilled_at),
        "ttft_ms": _milliseconds(request.arrival, request.first_token_at),
        "duration_ms": _milliseconds(request.arrival, now),
    }
    request_log.info(json.dumps(record))
