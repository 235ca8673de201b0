"""Prometheus metrics of the server. (The request log, class mix and drift gauges live in the gateway:
serving/gateway/metrics.py.)

TF Serving's own metric names (`:tensorflow:serving:request_count`, `:tensorflow:serving:request_latency`, ...)
are rendered by hand in TF Serving's exposition format (prometheus_client would rename a counter to `*_total`), so
dashboards and alerts written for the real binary work unchanged. medpipe's own metrics use prometheus_client.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict

# TF Serving's request_latency buckets are in microseconds.
LATENCY_BUCKETS_US = (500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000, 1000000, 5000000)


def _labels(pairs: dict[str, str]) -> str:
    body = ",".join(f'{k}="{str(v)}"' for k, v in pairs.items())
    return "{" + body + "}"


class TfServingMetrics:
    """request_count{model_name,status}, request_latency{model_name,API,entrypoint} (µs), model load counts."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], list] = {}
        self.loads: dict[tuple[str, str], int] = defaultdict(int)

    def request(self, model: str, api: str, ok: bool, seconds: float) -> None:
        micros = seconds * 1e6
        with self._lock:
            self.counts[(model, "OK" if ok else "ERROR")] += 1
            buckets = self.latency.setdefault((model, api), [0] * (len(LATENCY_BUCKETS_US) + 1) + [0.0])
            for i, bound in enumerate(LATENCY_BUCKETS_US):
                if micros <= bound:
                    buckets[i] += 1
            buckets[len(LATENCY_BUCKETS_US)] += 1  # +Inf == count
            buckets[-1] += micros

    def load(self, model: str, ok: bool) -> None:
        with self._lock:
            self.loads[(model, "OK" if ok else "ERROR")] += 1

    def render(self) -> str:
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            for (model, status), value in sorted(self.counts.items()):
                lines.append(f":tensorflow:serving:request_count{_labels({'model_name': model, 'status': status})} {value}")
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api), b in sorted(self.latency.items()):
                base = {"model_name": model, "API": api, "entrypoint": "GRPC_OR_REST"}
                for i, bound in enumerate(LATENCY_BUCKETS_US):
                    lines.append(f":tensorflow:serving:request_latency_bucket{_labels({**base, 'le': bound})} {b[i]}")
                n = b[len(LATENCY_BUCKETS_US)]
                lines.append(f":tensorflow:serving:request_latency_bucket{_labels({**base, 'le': '+Inf'})} {n}")
                lines.append(f":tensorflow:serving:request_latency_sum{_labels(base)} {b[-1]}")
                lines.append(f":tensorflow:serving:request_latency_count{_labels(base)} {n}")
            lines.append("# TYPE :tensorflow:cc:saved_model:load_attempt_count counter")
            for (model, status), value in sorted(self.loads.items()):
                lines.append(f":tensorflow:cc:saved_model:load_attempt_count"
                             f"{_labels({'model_path': model, 'status': 'success' if status == 'OK' else 'fail'})} {value}")
        return "\n".join(lines) + "\n"


class MedpipeMetrics:
    """medpipe's own series of the server: batch sizes and loaded versions."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.batch_size = Histogram("medpipe_batch_size", "images per model call after server-side batching",
                                    ["model"], buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=self.registry)
        self.loaded_versions = Gauge("medpipe_loaded_versions", "1 for each version currently AVAILABLE",
                                     ["model", "version"], registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def request_ids(base: str | None, count: int) -> list[str]:
    """One id per image: the caller's id (or a fresh uuid4), suffixed -<index> when a request has several."""
    base = base or uuid.uuid4().hex
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
