"""Prometheus exposition of the replicas' counters (text format 0.0.4), one `replica` label each."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

CONTENT_TYPE = CONTENT_TYPE_LATEST

_GAUGES = {
    "queue_depth": "jobs waiting for rows",
    "active_requests": "jobs holding rows",
    "active_rows": "engine rows in use (a row is a sample's CFG branch)",
    "max_rows": "engine rows of the bundle",
}
_COUNTERS = {
    "steps_total": "engine passes (each advances every active job one step)",
    "step_seconds_total": "seconds spent in engine passes",
    "nfe_run_total": "sample evaluations of the blocks",
    "nfe_saved_total": "sample steps served from the cache instead of the blocks",
    "row_steps_total": "rows times steps of ended jobs (rows busy per step = this / steps_total)",
}
_OUTCOMES = {
    "submitted": "requests_submitted_total",
    "finished": "requests_finished_total",
    "cancelled": "requests_cancelled_total",
    "failed": "requests_failed_total",
    "rejected": "requests_rejected_total",
}
_HISTOGRAMS = {
    "latency_seconds": "sencache_request_latency_seconds",
    "queue_wait_seconds": "sencache_queue_wait_seconds",
}


class _Snapshot(Collector):
    def __init__(self, replicas: dict[int, dict[str, Any] | None]) -> None:
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sencache_replica_up", "1 when the replica answered this scrape", labels=["replica"])
        for slot, stats in self.replicas.items():
            up.add_metric([str(slot)], 0.0 if stats is None else 1.0)
        yield up
        live = {slot: stats for slot, stats in self.replicas.items() if stats is not None}
        for key, help_text in _GAUGES.items():
            family = GaugeMetricFamily(f"sencache_{key}", help_text, labels=["replica"])
            for slot, stats in live.items():
                family.add_metric([str(slot)], float(stats[key]))
            yield family
        for key, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"sencache_{key.removesuffix('_total')}", help_text, labels=["replica"])
            for slot, stats in live.items():
                family.add_metric([str(slot)], float(stats[key]))
            yield family
        yield from _rates(live)
        requests = CounterMetricFamily("sencache_requests", "video requests by outcome", labels=["replica", "outcome"])
        for slot, stats in live.items():
            for outcome, key in _OUTCOMES.items():
                requests.add_metric([str(slot), outcome], float(stats[key]))
        yield requests
        for key, name in _HISTOGRAMS.items():
            family = HistogramMetricFamily(name, f"{key.replace('_', ' ')} of completed requests", labels=["replica"])
            for slot, stats in live.items():
                h = stats[key]
                bounds = [*(f"{b:g}" for b in h["buckets"]), "+Inf"]
                family.add_metric([str(slot)], list(zip(bounds, map(float, h["counts"]), strict=True)), h["sum"])
            yield family


def _rates(live: dict[int, dict[str, Any]]) -> Iterator[Metric]:
    """Passes per second of stepping and the share of sample steps served from the cache."""
    rate = GaugeMetricFamily("sencache_steps_per_second", "engine passes per second of stepping", labels=["replica"])
    reuse = GaugeMetricFamily("sencache_reuse_ratio", "share of sample steps served from the cache", labels=["replica"])
    for slot, stats in live.items():
        seconds = stats["step_seconds_total"]
        rate.add_metric([str(slot)], stats["steps_total"] / seconds if seconds else 0.0)
        evaluated = stats["nfe_run_total"] + stats["nfe_saved_total"]
        reuse.add_metric([str(slot)], stats["nfe_saved_total"] / evaluated if evaluated else 0.0)
    yield rate
    yield reuse


def render(replicas: dict[int, dict[str, Any] | None]) -> bytes:
    """The exposition of each replica's `VideoService.metrics()` (None: it did not answer)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(replicas))
    return generate_latest(registry)
