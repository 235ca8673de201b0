"""Prometheus metrics of `medpipe serve`, one registry. (The request log, class mix and drift gauges live in the
gateway: serving/gateway/metrics.py.)

TF Serving's own series (`:tensorflow:serving:request_count`, `:tensorflow:serving:request_latency`, ...) come from
a custom collector, so they keep TF Serving's exact names (a prometheus_client Counter would be renamed `*_total`)
and dashboards and alerts written for the real binary work unchanged; prometheus_client writes and escapes them.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric

# TF Serving's request_latency buckets are in microseconds.
LATENCY_BUCKETS_US = (500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000, 1000000, 5000000)


class TfServingCollector:
    """request_count{model_name,status}, request_latency{model_name,API,entrypoint} (µs), model load attempts."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()  # (model, status)
        self.latency: dict[tuple[str, str, str], list] = {}  # (model, api, entrypoint) -> [cumulative..., sum]
        self.loads: Counter = Counter()  # (version folder, success|fail)

    def request(self, model: str, api: str, entrypoint: str, ok: bool, seconds: float) -> None:
        micros = seconds * 1e6
        with self._lock:
            self.counts[(model, "OK" if ok else "ERROR")] += 1
            buckets = self.latency.setdefault((model, api, entrypoint), [0] * (len(LATENCY_BUCKETS_US) + 2))
            for i, bound in enumerate((*LATENCY_BUCKETS_US, float("inf"))):
                buckets[i] += micros <= bound
            buckets[-1] += micros

    def load(self, model_path: str, ok: bool) -> None:
        """One load attempt of a version folder: labelled model_path, as TF Serving labels it (its full path)."""
        with self._lock:
            self.loads[(model_path, "success" if ok else "fail")] += 1

    def collect(self):
        # TF Serving types its counters "counter" under the bare name, which prometheus_client only writes as
        # *_total: they go out untyped, which Prometheus treats alike (rate, increase)
        requests = Metric(":tensorflow:serving:request_count", "The total number of requests.", "unknown")
        latency = HistogramMetricFamily(":tensorflow:serving:request_latency",
                                        "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
                                        labels=["model_name", "API", "entrypoint"])
        loads = Metric(":tensorflow:cc:saved_model:load_attempt_count", "The number of times a SavedModel was "
                       "successfully loaded.", "unknown")
        with self._lock:
            for (model, status), value in sorted(self.counts.items()):
                requests.add_sample(requests.name, {"model_name": model, "status": status}, value)
            for labels, counts in sorted(self.latency.items()):
                bounds = [str(bound) for bound in LATENCY_BUCKETS_US] + ["+Inf"]
                latency.add_metric(list(labels), list(zip(bounds, counts)), sum_value=counts[-1])
            for (model_path, status), value in sorted(self.loads.items()):
                loads.add_sample(loads.name, {"model_path": model_path, "status": status}, value)
        return [requests, latency, loads]


class ServerMetrics:
    """Everything `medpipe serve` exposes, shared by gRPC and REST: TF Serving's series and medpipe's own (batch
    sizes, loaded versions)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.tf = TfServingCollector()
        self.registry.register(self.tf)
        self.batch_size = Histogram("medpipe_batch_size", "images per model call after server-side batching",
                                    ["model"], buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=self.registry)
        self.loaded_versions = Gauge("medpipe_loaded_versions", "1 for each version currently AVAILABLE",
                                     ["model", "version"], registry=self.registry)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def request_ids(base: str | None, count: int) -> list[str]:
    """One id per image: the caller's id (or a fresh uuid4), suffixed -<index> when a request has several."""
    base = base or uuid.uuid4().hex
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
