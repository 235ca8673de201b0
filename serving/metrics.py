"""Prometheus metrics of the server, and the request log read by the drift monitor and feedback.

TF Serving's own metric names (`:tensorflow:serving:request_count`, `:tensorflow:serving:request_latency`, ...)
are rendered by hand in TF Serving's exposition format (prometheus_client would rename a counter to `*_total`), so
dashboards and alerts written for the real binary work unchanged. medpipe's own metrics use prometheus_client.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from medpipe.drift import HISTOGRAM_BINS, histogram  # one binning for the ingest baseline and served traffic

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
    """medpipe's own series: predicted classes, confidence, batch sizes, loaded versions, drift."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.predictions = Counter("medpipe_predictions", "images classified, by predicted class",
                                   ["model", "version", "class_name"], registry=self.registry)
        self.confidence = Histogram("medpipe_prediction_confidence", "probability of the predicted class",
                                    ["model"], buckets=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                                    registry=self.registry)
        self.batch_size = Histogram("medpipe_batch_size", "images per model call after server-side batching",
                                    ["model"], buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=self.registry)
        self.loaded_versions = Gauge("medpipe_loaded_versions", "1 for each version currently AVAILABLE",
                                     ["model", "version"], registry=self.registry)
        self.drift_psi = Gauge("medpipe_drift_psi", "population stability index of input pixel histograms",
                               ["model"], registry=self.registry)
        self.drift_class_shift = Gauge("medpipe_drift_class_shift", "shift of the predicted class distribution",
                                       ["model"], registry=self.registry)
        self.low_confidence = Gauge("medpipe_low_confidence_rate", "share of recent predictions with low confidence",
                                    ["model"], registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def pixel_histogram(pixels: np.ndarray) -> list[int]:
    """32 equal bins over 0..255 of one preprocessed image: the same binning as the ingest baseline."""
    return histogram(pixels, HISTOGRAM_BINS)


def request_ids(base: str | None, count: int) -> list[str]:
    """One id per image: the caller's id (or a fresh uuid4), suffixed -<index> when a request has several."""
    base = base or uuid.uuid4().hex
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


class RequestLog:
    """DIR/requests-YYYY-MM-DD.jsonl (UTC), one line per image; never the image or any identity."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, records: Sequence[dict]) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        path = self.directory / f"requests-{now:%Y-%m-%d}.jsonl"
        text = "".join(json.dumps({"ts": now.isoformat(), **r}) + "\n" for r in records)
        with self._lock, open(path, "a", encoding="utf-8") as handle:
            handle.write(text)


def log_records(model: str, version: int, ids: Sequence[str], class_ids: Sequence[int], class_names: Sequence,
                probabilities: np.ndarray, pixels: np.ndarray | None) -> list[dict]:
    records = []
    for i, request_id in enumerate(ids):
        probs = [float(p) for p in probabilities[i]]
        name = class_names[i]
        record = {"request_id": request_id, "model": model, "version": int(version),
                  "class": name.decode() if isinstance(name, bytes) else str(name),
                  "confidence": probs[int(class_ids[i])], "probabilities": probs}
        if pixels is not None:
            record["pixel_histogram"] = pixel_histogram(pixels[i])
            record["pixel_mean"] = float(np.mean(pixels[i]))
        records.append(record)
    return records
