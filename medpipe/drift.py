"""Input and prediction drift of served traffic against the training data's statistics. Pure numpy.

Three signals, all computable from what the server may log (summary statistics and predictions, never images or
their identities):

- `psi`: Population Stability Index between the pixel-intensity histogram of the ingested training images
  (`stats.json` -> `pixel_histogram`, 32 bins over 0..255) and the histogram of served images after preprocessing.
  Rule of thumb (Siddiqi, credit scoring): < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
- `class_shift`: total variation distance between the mix of predicted classes and the training class distribution
  (0 = same mix, 1 = disjoint).
- `low_confidence_rate`: fraction of requests whose top probability is below a confidence threshold.

The server keeps a `DriftTracker` over a sliding window of requests and exports the snapshot as gauges; the daily
`medpipe monitor` run builds one tracker over a whole day's request log.
"""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medpipe.errors import DataError
from medpipe.schema import SCHEMA_FILE, STATS_FILE, IngestStats

HISTOGRAM_BINS = 32
PSI_EPSILON = 1e-4  # floor for empty bins: keeps ln(a/e) finite; small against any real bin fraction
LOW_CONFIDENCE_THRESHOLD = 0.6  # top probability below this counts as a low-confidence prediction


def histogram(pixels: Any, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of pixel intensities in `bins` equal bins over 0..255 (uint8, or floats on the 0..255 scale).

    The one binning shared by the ingest baseline (stats.json) and the server's request log: PSI compares the two.
    """
    array = np.asarray(pixels)
    if array.dtype == np.uint8 and 256 % bins == 0:  # ingest's hot path: an integer shift, no float copy
        return np.bincount(array.reshape(-1) // (256 // bins), minlength=bins).astype(int).tolist()
    values = array.astype(np.float64).ravel()
    counts, _ = np.histogram(np.clip(values, 0.0, 255.0), bins=bins, range=(0.0, 256.0))
    return [int(count) for count in counts]


def _proportions(counts: Sequence[float], eps: float) -> np.ndarray:
    values = np.asarray(counts, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a histogram must be a non-empty 1-D sequence, got shape {values.shape}")
    if np.any(values < 0):
        raise ValueError("histogram counts must be >= 0")
    total = values.sum()
    if total <= 0:
        raise ValueError("histogram is empty (all counts are 0)")
    return np.clip(values / total, eps, None)


def psi(expected: Sequence[float], actual: Sequence[float], eps: float = PSI_EPSILON) -> float:
    """Population Stability Index: sum over bins of (a - e) * ln(a / e), on proportions floored at eps.

    `expected` and `actual` are counts (or proportions) over the same bins; each is normalised to sum to 1.
    """
    if len(expected) != len(actual):
        raise ValueError(f"histograms have different bin counts: {len(expected)} vs {len(actual)}")
    e = _proportions(expected, eps)
    a = _proportions(actual, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Total variation distance 0.5 * sum |p - q| between two distributions (each normalised to sum to 1)."""
    p_arr = np.asarray(p, dtype=np.float64)
    q_arr = np.asarray(q, dtype=np.float64)
    p_arr = p_arr / p_arr.sum() if p_arr.sum() > 0 else p_arr
    q_arr = q_arr / q_arr.sum() if q_arr.sum() > 0 else q_arr
    return float(0.5 * np.abs(p_arr - q_arr).sum())


# --------------------------------------------------------------------------------------------------------------
# Baseline: the ingest's stats.json (+ schema.json for label order)
# --------------------------------------------------------------------------------------------------------------


def load_baseline(path: str | Path) -> dict:
    """Read the training baseline from an ingest `stats.json` (or the ingest directory holding it).

    Returns {"pixel_histogram": [int]*32, "class_distribution": {label: fraction}, "labels": [...], "source": str}.
    Labels come from schema.json beside stats.json (index order = class ids), else from the class distribution.
    """
    path = Path(path)
    stats_path = path / STATS_FILE if path.is_dir() else path
    stats = IngestStats.read(stats_path)
    if not stats.pixel_histogram or sum(stats.pixel_histogram) <= 0:
        raise DataError(f"{stats_path} has an empty `pixel_histogram` (the ingest wrote no image): ingest the "
                        "training data again")
    schema_path = stats_path.parent / SCHEMA_FILE
    labels = json.loads(schema_path.read_text())["labels"] if schema_path.is_file() else list(stats.class_distribution)
    total = float(sum(stats.class_distribution.get(label, 0.0) for label in labels)) or 1.0
    return {
        "pixel_histogram": [int(count) for count in stats.pixel_histogram],
        "class_distribution": {label: float(stats.class_distribution.get(label, 0.0)) / total for label in labels},
        "labels": labels,
        "source": str(stats_path),
    }


# --------------------------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------------------------


def probability_vector(probabilities: Any, labels: Sequence[str]) -> np.ndarray:
    """A probability list, a {label: p} dict, or a single binary score [p] -> a vector over `labels`."""
    if isinstance(probabilities, Mapping):
        return np.asarray([float(probabilities.get(label, 0.0)) for label in labels], dtype=np.float64)
    vector = np.asarray(probabilities, dtype=np.float64).ravel()
    if vector.size == 1 and len(labels) == 2:
        return np.asarray([1.0 - vector[0], vector[0]])
    return vector


class DriftTracker:
    """Drift of the last `window` requests against a baseline from `load_baseline`. Thread-safe.

    `observe(pixel_histogram, probabilities)` once per served image; `snapshot()` for the current figures.
    `window=None` keeps every observation (a daily batch report).
    """

    def __init__(self, baseline: Mapping[str, Any], window: int | None = 1000,
                 low_confidence_threshold: float = LOW_CONFIDENCE_THRESHOLD, eps: float = PSI_EPSILON):
        self.labels = list(baseline.get("labels") or baseline["class_distribution"])
        self.baseline_histogram = np.asarray(baseline["pixel_histogram"], dtype=np.float64)
        distribution = baseline["class_distribution"]
        self.baseline_classes = np.asarray([float(distribution.get(label, 0.0)) for label in self.labels])
        self.low_confidence_threshold = low_confidence_threshold
        self.eps = eps
        self._window: collections.deque = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, pixel_histogram: Sequence[int], probabilities: Any) -> None:
        counts = np.asarray(pixel_histogram, dtype=np.float64)
        if counts.shape != self.baseline_histogram.shape:
            raise ValueError(f"pixel histogram has {counts.size} bins, the baseline {self.baseline_histogram.size}")
        vector = probability_vector(probabilities, self.labels)
        if vector.size != len(self.labels):
            raise ValueError(f"{vector.size} probabilities for {len(self.labels)} labels {self.labels}")
        with self._lock:
            self._window.append((counts, int(np.argmax(vector)), float(np.max(vector))))

    def observe_many(self, observations: Iterable[tuple[Sequence[int], Any]]) -> None:
        for pixel_histogram, probabilities in observations:
            self.observe(pixel_histogram, probabilities)

    def snapshot(self) -> dict:
        """{"psi", "class_shift", "low_confidence_rate", "n", "histogram", "class_mix"}; zeros when n == 0."""
        with self._lock:
            items = list(self._window)
        n = len(items)
        if n == 0:
            return {"psi": 0.0, "class_shift": 0.0, "low_confidence_rate": 0.0, "n": 0,
                    "histogram": [0] * self.baseline_histogram.size, "class_mix": {l: 0.0 for l in self.labels}}
        summed = np.sum([counts for counts, _, _ in items], axis=0)
        class_counts = np.bincount([cls for _, cls, _ in items], minlength=len(self.labels)).astype(np.float64)
        class_mix = class_counts / n
        low = sum(1 for _, _, confidence in items if confidence < self.low_confidence_threshold)
        return {
            "psi": psi(self.baseline_histogram, summed, self.eps) if summed.sum() > 0 else 0.0,
            "class_shift": total_variation(class_mix, self.baseline_classes),
            "low_confidence_rate": low / n,
            "n": n,
            "histogram": [int(v) for v in summed],
            "class_mix": {label: float(v) for label, v in zip(self.labels, class_mix)},
        }
