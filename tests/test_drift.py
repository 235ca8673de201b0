"""medpipe.drift: histogram, PSI and total variation against hand computations; the tracker; the baseline loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medpipe.drift import DriftTracker, histogram, load_baseline, psi, total_variation
from medpipe.errors import DataError


def test_histogram_bins_uint8_and_float_alike():
    counts = histogram(np.array([0, 7, 8, 255, 255], dtype=np.uint8))
    assert len(counts) == 32 and sum(counts) == 5
    assert counts[0] == 2 and counts[1] == 1 and counts[31] == 2
    assert histogram(np.array([0.0, 7.9, 8.0, 255.0, 300.0])) == counts  # floats on 0..255; out of range clipped
    assert histogram(np.zeros((4, 4, 1), dtype=np.uint8), bins=4) == [16, 0, 0, 0]


def test_psi_matches_hand_computation():
    # proportions e = (0.5, 0.5), a = (0.9, 0.1): 0.4 ln 1.8 + (-0.4) ln 0.2
    expected = 0.4 * math.log(1.8) - 0.4 * math.log(0.2)
    assert psi([50, 50], [90, 10]) == pytest.approx(expected, rel=1e-12)
    assert psi([50, 50], [90, 10]) == pytest.approx(0.878890, abs=1e-6)
    assert psi([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0, abs=1e-12)  # only proportions matter
    assert psi([3, 1], [1, 3]) == pytest.approx(psi([1, 3], [3, 1]))  # symmetric


def test_psi_floors_empty_bins_at_eps():
    eps = 1e-4
    # e = (1, eps) a = (eps, 1): (eps - 1) ln(eps) + (1 - eps) ln(1 / eps) = 2 (1 - eps) ln(1 / eps)
    assert psi([1, 0], [0, 1], eps=eps) == pytest.approx(2 * (1 - eps) * math.log(1 / eps))
    assert math.isfinite(psi([5, 0, 0], [0, 0, 5]))


@pytest.mark.parametrize("expected, actual", [([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, -1], [1, 1]), ([], [])])
def test_psi_rejects_bad_histograms(expected, actual):
    with pytest.raises(ValueError):
        psi(expected, actual)


def test_total_variation():
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert total_variation([0.7, 0.2, 0.1], [0.25, 0.25, 0.5]) == pytest.approx(0.5 * (0.45 + 0.05 + 0.4))


def _baseline(hist=None):
    return {"pixel_histogram": hist or [10, 30, 40, 20], "labels": ["a", "b", "c"],
            "class_distribution": {"a": 0.5, "b": 0.25, "c": 0.25}}


def test_tracker_in_distribution_is_quiet_and_shift_is_loud():
    tracker = DriftTracker(_baseline(), window=100, low_confidence_threshold=0.6)
    for probabilities in ([0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]):
        tracker.observe([1, 3, 4, 2], probabilities)
    quiet = tracker.snapshot()
    assert quiet["n"] == 4
    assert quiet["psi"] == pytest.approx(0.0, abs=1e-12)
    assert quiet["class_shift"] == pytest.approx(0.0, abs=1e-12)  # mix (2,1,1)/4 == baseline
    assert quiet["low_confidence_rate"] == 0.0

    shifted = DriftTracker(_baseline(), window=100, low_confidence_threshold=0.6)
    for _ in range(4):
        shifted.observe([0, 0, 1, 9], [0.1, 0.5, 0.4])  # bright images, all predicted b with low confidence
    snap = shifted.snapshot()
    assert snap["psi"] == pytest.approx(psi([10, 30, 40, 20], [0, 0, 4, 36]))
    assert snap["psi"] > 1.0
    assert snap["class_shift"] == pytest.approx(0.75)  # 0.5 * (|0-.5| + |1-.25| + |0-.25|)
    assert snap["low_confidence_rate"] == 1.0
    assert snap["class_mix"] == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_tracker_window_keeps_only_the_latest():
    tracker = DriftTracker(_baseline(), window=3)
    tracker.observe([0, 0, 0, 9], [1, 0, 0])
    for _ in range(3):
        tracker.observe([1, 3, 4, 2], {"a": 0.2, "b": 0.7, "c": 0.1})  # probabilities by label also accepted
    snap = tracker.snapshot()
    assert snap["n"] == 3 and snap["psi"] == pytest.approx(0.0, abs=1e-12)
    assert snap["class_mix"]["b"] == 1.0


def test_tracker_empty_and_bad_inputs():
    tracker = DriftTracker(_baseline())
    assert tracker.snapshot()["n"] == 0 and tracker.snapshot()["psi"] == 0.0
    with pytest.raises(ValueError, match="bins"):
        tracker.observe([1, 2], [1, 0, 0])
    with pytest.raises(ValueError, match="labels"):
        tracker.observe([1, 2, 3, 4], [0.5, 0.5])


def test_tracker_binary_single_score():
    baseline = {"pixel_histogram": [1, 1], "labels": ["neg", "pos"], "class_distribution": {"neg": 0.5, "pos": 0.5}}
    tracker = DriftTracker(baseline)
    tracker.observe([1, 1], [0.9])  # a single sigmoid score = P(pos)
    tracker.observe([1, 1], [0.2])
    snap = tracker.snapshot()
    assert snap["class_mix"] == {"neg": 0.5, "pos": 0.5} and snap["class_shift"] == pytest.approx(0.0)


def _stats(**keys) -> str:
    return json.dumps({"name": "x", "input_files": 4, "written": 4, "rejected": 0, "duplicates_dropped": 0,
                       "rejected_by_reason": {}, **keys})


def test_load_baseline_from_ingest_dir(tmp_path):
    (tmp_path / "stats.json").write_text(_stats(pixel_histogram=[1] * 32, class_distribution={"b": 3, "a": 1}))
    (tmp_path / "schema.json").write_text(json.dumps({"labels": ["a", "b"]}))
    baseline = load_baseline(tmp_path)
    assert baseline["labels"] == ["a", "b"]  # schema order = class ids
    assert baseline["class_distribution"] == {"a": 0.25, "b": 0.75}
    assert load_baseline(tmp_path / "stats.json")["pixel_histogram"] == [1] * 32


def test_load_baseline_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_baseline(tmp_path / "nope")
    (tmp_path / "stats.json").write_text(json.dumps({"written": {}}))
    with pytest.raises(DataError, match="pixel_histogram"):
        load_baseline(tmp_path)
