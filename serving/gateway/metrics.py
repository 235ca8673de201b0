"""The gateway's Prometheus metrics and the request summaries `medpipe monitor` and `medpipe feedback` read.

Metrics (prometheus_client, one registry, served on the REST port at /monitoring/prometheus/metrics):
  medpipe_gateway_requests_total{door,model,version,outcome}      outcome = OK or the gateway error code
  medpipe_gateway_request_latency_seconds{model,version,outcome}
  medpipe_gateway_upstream_latency_seconds                         the TF Serving call alone
  medpipe_gateway_limit_rejections_total{limit}                    body_size, max_images, pixel_budget, rate,
                                                                   concurrency, deadline, connections, read_timeout
  medpipe_gateway_auth_refusals_total{door,code}
  medpipe_predictions_total{model,version,class_name}, medpipe_prediction_confidence{model}
  medpipe_drift_psi / medpipe_drift_class_shift / medpipe_low_confidence_rate{model}  (with --drift-baseline)
Labels never carry anything a caller typed unchecked: `model` is set only once the model was found upstream.

Request log: DIR/requests-YYYY-MM-DD.jsonl (UTC), one line per image, in the format `medpipe serve` used to write
(ts, request_id, model, version, class, confidence, probabilities, pixel_histogram, pixel_mean): never the image,
never an identity, never a DICOM header value.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from medpipe.drift import HISTOGRAM_BINS, histogram

LIMITS = ("body_size", "max_images", "pixel_budget", "rate", "concurrency", "deadline", "connections", "accept_rate",
          "read_timeout", "upstream")


class GatewayMetrics:
    def __init__(self, drift_baseline: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, Gauge

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("medpipe_gateway_requests", "requests by door, model, version and outcome",
                                ["door", "model", "version", "outcome"], registry=registry)
        self.latency = Histogram("medpipe_gateway_request_latency_seconds", "end-to-end request latency",
                                 ["model", "version", "outcome"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.upstream_latency = Histogram("medpipe_gateway_upstream_latency_seconds", "TF Serving Predict latency",
                                          registry=registry,
                                          buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
        self.limits = Counter("medpipe_gateway_limit_rejections", "requests refused by a limit", ["limit"],
                              registry=registry)
        for name in LIMITS:
            self.limits.labels(name)
        self.auth_refusals = Counter("medpipe_gateway_auth_refusals", "refused credentials or scopes",
                                     ["door", "code"], registry=registry)
        self.predictions_total = Counter("medpipe_predictions", "images classified, by predicted class",
                                         ["model", "version", "class_name"], registry=registry)
        self.confidence = Histogram("medpipe_prediction_confidence", "probability of the predicted class",
                                    ["model"], buckets=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                                    registry=registry)
        self.drift_psi = Gauge("medpipe_drift_psi", "population stability index of input pixel histograms",
                               ["model"], registry=registry)
        self.drift_class_shift = Gauge("medpipe_drift_class_shift", "shift of the predicted class distribution",
                                       ["model"], registry=registry)
        self.low_confidence = Gauge("medpipe_low_confidence_rate", "share of recent predictions with low confidence",
                                    ["model"], registry=registry)
        self.trackers: dict = {}
        self.baseline = None
        self._drift_lock = threading.Lock()
        if drift_baseline:
            from medpipe import drift

            self._drift = drift
            self.baseline = drift.load_baseline(drift_baseline)

    def request(self, door: str, model: str | None, version, outcome: str, seconds: float,
                limit: str | None) -> None:
        model_label, version_label = model or "-", str(version) if version is not None else "-"
        self.requests.labels(door, model_label, version_label, outcome).inc()
        self.latency.labels(model_label, version_label, outcome).observe(seconds)
        if limit:
            self.limits.labels(limit).inc()
        if outcome in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.auth_refusals.labels(door, outcome).inc()

    def refused(self, door: str, error) -> None:
        if error.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.auth_refusals.labels(door, error.code).inc()
        if error.reason:
            self.limits.labels(error.reason).inc()
        self.requests.labels(door, "-", "-", error.code).inc()

    def predictions(self, model: str, records: list[dict]) -> None:
        for record in records:
            self.predictions_total.labels(model, str(record["version"]), record["class"]).inc()
            self.confidence.labels(model).observe(record["confidence"])
        if self.baseline is None:
            return
        with self._drift_lock:
            tracker = self.trackers.setdefault(model, self._drift.DriftTracker(self.baseline))
            for record in records:
                tracker.observe(record["pixel_histogram"], record["probabilities"])

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self._refresh_drift()  # at scrape time, so the gauges never lag behind a burst of requests
        return generate_latest(self.registry)

    def _refresh_drift(self) -> None:
        with self._drift_lock:
            snapshots = {model: tracker.snapshot() for model, tracker in self.trackers.items()}
        for model, snap in snapshots.items():
            self.drift_psi.labels(model).set(snap.get("psi") or 0.0)
            self.drift_class_shift.labels(model).set(snap.get("class_shift") or 0.0)
            self.low_confidence.labels(model).set(snap.get("low_confidence_rate") or 0.0)


def pixel_histogram(pixels: np.ndarray) -> list[int]:
    """32 equal bins over 0..255 of one preprocessed image: the same binning as the ingest baseline."""
    return histogram(pixels, HISTOGRAM_BINS)


def summaries(prediction, pixels: Sequence[np.ndarray]) -> list[dict]:
    """One request-log record per image of a Prediction (the keys serving.monitoring and feedback read)."""
    from serving.metrics import request_ids

    ids = request_ids(prediction.request_id, len(prediction.items))
    records = []
    for item, request_id, image in zip(prediction.items, ids, pixels):
        probabilities = list(item.probabilities.values())
        record = {"request_id": request_id, "model": prediction.model, "version": prediction.version,
                  "class": item.class_name if item.class_name is not None else
                  max(item.probabilities, key=item.probabilities.get),
                  "confidence": item.confidence, "probabilities": probabilities,
                  "pixel_histogram": pixel_histogram(image), "pixel_mean": float(np.mean(image))}
        if item.in_distribution is not None:
            record["in_distribution"] = item.in_distribution
            record["ood_score"] = item.ood_score
        records.append(record)
    return records


class RequestLog:
    """DIR/requests-YYYY-MM-DD.jsonl (UTC), one line per image."""

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
