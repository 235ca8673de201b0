"""models.metrics and models.gate against an independent oracle (scikit-learn) on fixed arrays, edge cases included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from medpipe.config import EvaluationConfig, GateThresholds, RegressionMargins
from models import gate
from models.metrics import choose_threshold, classification_metrics, roc_auc

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]


def _probabilities(seed: int, n: int, classes: int, y_true: np.ndarray, signal: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), y_true] += signal
    logits = np.round(logits, 1)  # rounding creates ties, which AUC must count half
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _check_against_sklearn(y_true, probs, labels, metrics, y_pred):
    ids = list(range(len(labels)))
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert metrics["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    )
    assert metrics["weighted_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
    )
    assert metrics["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=ids).tolist()
    precision = sk.precision_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    recall = sk.recall_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    f1 = sk.f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    for c, label in enumerate(labels):
        row = metrics["per_class"][label]
        assert row["precision"] == pytest.approx(precision[c])
        assert row["recall"] == row["sensitivity"] == pytest.approx(recall[c])
        assert row["f1"] == pytest.approx(f1[c])
        assert row["support"] == int(np.sum(y_true == c))
        negatives = y_true != c
        if negatives.any():  # specificity = recall of the "not c" class
            assert row["specificity"] == pytest.approx(sk.recall_score(negatives, y_pred != c))
        if 0 < np.sum(y_true == c) < y_true.size:
            assert row["auc"] == pytest.approx(sk.roc_auc_score(y_true == c, probs[:, c]))
        else:
            assert row["auc"] is None


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    probs = _probabilities(1, 300, 4, y_true)
    metrics = classification_metrics(y_true, probs, LABELS, bootstrap_samples=200, seed=3)
    _check_against_sklearn(y_true, probs, LABELS, metrics, probs.argmax(axis=1))
    assert metrics["macro_auc"] == pytest.approx(sk.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
    json.dumps(metrics)  # JSON-ready
    for name in ("accuracy", "macro_f1", "macro_auc"):
        low, high = metrics["confidence_intervals"][name]
        assert low < metrics[name] < high and high - low < 0.25


def test_ece_against_a_direct_formula():
    y_true = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.35, 0.65], [0.2, 0.8], [0.45, 0.55], [0.15, 0.85]])
    metrics = classification_metrics(y_true, probs, ["a", "b"], bootstrap_samples=0, calibration_bins=10)
    # bins: 0.9 -> (0.8,0.9] correct; 0.65 -> (0.6,0.7] correct; 0.8 -> (0.7,0.8] correct;
    # 0.55 -> (0.5,0.6] wrong; 0.85 -> (0.8,0.9] correct
    expected = (abs(1 - 0.875) * 2 + abs(1 - 0.65) + abs(1 - 0.8) + abs(0 - 0.55)) / 5
    assert metrics["ece"] == pytest.approx(expected)
    assert metrics["calibration"]["bin_count"] == [0, 0, 0, 0, 0, 1, 1, 1, 2, 0]


def test_class_never_predicted_has_precision_zero():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.eye(4)[[0, 0, 1, 0, 2, 2, 0, 1]] * 0.7 + 0.075  # class 3 is never predicted
    metrics = classification_metrics(y_true, probs, LABELS, bootstrap_samples=50)
    _check_against_sklearn(y_true, probs, LABELS, metrics, probs.argmax(axis=1))
    assert metrics["per_class"]["pituitary"]["precision"] == 0.0
    assert metrics["per_class"]["pituitary"]["predicted"] == 0


def test_single_class_split():
    y_true = np.array([2, 2, 2, 2, 2])
    probs = _probabilities(5, 5, 4, y_true, signal=0.5)
    metrics = classification_metrics(y_true, probs, LABELS, bootstrap_samples=50)
    y_pred = probs.argmax(axis=1)
    _check_against_sklearn(y_true, probs, LABELS, metrics, y_pred)
    assert metrics["macro_auc"] is None and metrics["confidence_intervals"]["macro_auc"] is None
    assert metrics["per_class"]["notumor"]["specificity"] is None  # no negatives
    assert metrics["per_class"]["glioma"]["specificity"] is not None
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(y_pred == 2))


def test_absent_class_auc_is_null_and_macro_uses_the_others():
    rng = np.random.default_rng(7)
    y_true = rng.choice([0, 1, 3], 120)  # class 2 absent
    probs = _probabilities(8, 120, 4, y_true)
    metrics = classification_metrics(y_true, probs, LABELS, bootstrap_samples=0)
    assert metrics["per_class"]["notumor"]["auc"] is None
    expected = np.mean([sk.roc_auc_score(y_true == c, probs[:, c]) for c in (0, 1, 3)])
    assert metrics["macro_auc"] == pytest.approx(expected)


def test_binary_threshold_and_operating_point():
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 2, 200)
    scores = np.clip(0.35 * y_true + rng.normal(0.35, 0.2, 200), 0, 1)
    chosen = choose_threshold(y_true, scores, "youden")
    fpr, tpr, thresholds = sk.roc_curve(y_true, scores)
    best = np.argmax(tpr - fpr)
    assert chosen["sensitivity"] - (1 - chosen["specificity"]) == pytest.approx(tpr[best] - fpr[best])
    assert chosen["threshold"] == pytest.approx(thresholds[best])

    target = choose_threshold(y_true, scores, "target_sensitivity", target=0.95)
    assert target["sensitivity"] >= 0.95
    assert target["threshold"] == pytest.approx(thresholds[np.flatnonzero(tpr >= 0.95)[0]])

    metrics = classification_metrics(y_true, scores, ["NORMAL", "PNEUMONIA"], threshold=chosen["threshold"],
                                     bootstrap_samples=0)
    y_pred = (scores >= chosen["threshold"]).astype(int)
    point = metrics["operating_point"]
    assert point["sensitivity"] == pytest.approx(sk.recall_score(y_true, y_pred))
    assert point["specificity"] == pytest.approx(sk.recall_score(1 - y_true, 1 - y_pred))
    assert point["sensitivity"] == pytest.approx(chosen["sensitivity"])
    assert metrics["macro_auc"] == pytest.approx(sk.roc_auc_score(y_true, scores))
    _check_against_sklearn(y_true, np.stack([1 - scores, scores], 1), ["NORMAL", "PNEUMONIA"], metrics, y_pred)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.ones((2, 3)), LABELS)
    with pytest.raises(ValueError, match="only one class"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


# ------------------------------------------------------------------------------------------------ the gate
def _evaluation(**thresholds) -> EvaluationConfig:
    return EvaluationConfig(thresholds=GateThresholds(**thresholds), max_regression=0.01)


def _metrics(accuracy, macro_f1, macro_auc):
    return {"accuracy": accuracy, "macro_f1": macro_f1, "macro_auc": macro_auc}


def test_gate_absolute_only_for_the_first_model():
    blessing = gate.judge(_metrics(0.95, 0.94, 0.99), _evaluation(), None)
    assert blessing["blessed"] is True and blessing["reasons"] == []
    assert {c["kind"] for c in blessing["checks"]} == {"absolute"}

    blessing = gate.judge(_metrics(0.95, 0.85, None), _evaluation(), None)
    assert blessing["blessed"] is False
    assert any("macro_f1" in r for r in blessing["reasons"]) and any("macro_auc" in r for r in blessing["reasons"])


def test_gate_regression_against_stable():
    baseline = _metrics(0.96, 0.95, 0.99)
    ok = gate.judge(_metrics(0.955, 0.945, 0.985), _evaluation(), baseline)  # within 0.01
    assert ok["blessed"] is True
    worse = gate.judge(_metrics(0.94, 0.95, 0.99), _evaluation(), baseline)  # accuracy down by 0.02
    assert worse["blessed"] is False
    assert [c["metric"] for c in worse["checks"] if not c["passed"]] == ["accuracy"]
    assert "stable" in worse["reasons"][0]


def _two_models(n: int, candidate_right: float, stable_right: float, seed: int = 1):
    """Labels of 4 classes and two models' probabilities: each model puts 0.7 on the true class for the given share
    of the images (drawn independently), else on the next class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)

    def model(share):
        right = rng.random(n) < share
        chosen = np.where(right, labels, (labels + 1) % 4)
        probs = np.full((n, 4), 0.1)
        probs[np.arange(n), chosen] = 0.7
        return probs

    return labels, model(candidate_right), model(stable_right)


def test_paired_comparison_bootstrap_and_mcnemar_against_their_definitions():
    from math import comb

    from models.metrics import paired_comparison

    labels, candidate, stable = _two_models(80, 0.7, 0.35)
    margins = dict.fromkeys(gate.GATED_METRICS, 0.02)
    result = paired_comparison(labels, candidate, stable, margins=margins, min_examples=50, samples=400)
    right_c, right_s = candidate.argmax(1) == labels, stable.argmax(1) == labels
    assert result["metrics"]["accuracy"]["difference"] == pytest.approx(right_c.mean() - right_s.mean())
    only_c, only_s = int(np.sum(right_c & ~right_s)), int(np.sum(right_s & ~right_c))
    assert (result["mcnemar"]["candidate_only_correct"], result["mcnemar"]["baseline_only_correct"]) == (only_c, only_s)
    total, low = only_c + only_s, min(only_c, only_s)
    exact = min(1.0, 2 * sum(comb(total, k) for k in range(low + 1)) / 2 ** total)  # two-sided exact binomial
    assert result["mcnemar"]["p_value"] == pytest.approx(exact)
    row = result["metrics"]["accuracy"]
    assert row["lower"] < row["difference"] < row["upper"] and row["non_inferior"] is True
    # the same models compared with themselves: the difference is exactly 0 in every resample
    same = paired_comparison(labels, stable, stable, margins=margins, min_examples=50, samples=50)
    assert all(same["metrics"][name]["lower"] == same["metrics"][name]["upper"] == 0 for name in gate.GATED_METRICS)


def test_gate_decides_with_statistics_on_small_sets():
    """Issue 32: on an 80-image golden set a clearly better candidate is blessed (it used to be refused when one
    metric of a 9-image split moved), a clearly worse one refused, and 20 images give "insufficient evidence"."""
    from models.metrics import classification_metrics, paired_comparison

    evaluation = EvaluationConfig(thresholds=GateThresholds(accuracy=0.0, macro_f1=0.0, macro_auc=0.0),
                                  max_regression=0.05, min_paired_examples=50)
    margins = {name: gate.margin_of(evaluation, name) for name in gate.GATED_METRICS}

    def verdict(n, candidate_share, stable_share, seed=1):
        labels, candidate, stable = _two_models(n, candidate_share, stable_share, seed)
        metrics = classification_metrics(labels, candidate, list("abcd"), bootstrap_samples=0)
        stable_metrics = classification_metrics(labels, stable, list("abcd"), bootstrap_samples=0)
        comparison = paired_comparison(labels, candidate, stable, margins=margins, min_examples=50, samples=400)
        return gate.judge(metrics, evaluation, stable_metrics, 7, comparison)

    better, worse, tiny = verdict(80, 0.7, 0.35), verdict(80, 0.35, 0.7), verdict(20, 0.7, 0.35)
    assert better["blessed"] is True and better["verdict"] == "blessed"
    assert {c["kind"] for c in better["checks"]} == {"absolute", "non_inferiority"}
    assert better["comparison"]["n"] == 80 and better["comparison"]["mcnemar"]["p_value"] < 0.01
    assert worse["blessed"] is False and worse["verdict"] == "not_blessed"
    assert any("does not rule out a regression" in reason for reason in worse["reasons"])
    assert tiny["blessed"] is False and tiny["verdict"] == "insufficient_evidence"
    assert "insufficient evidence" in tiny["reasons"][0] and "20 images" in tiny["reasons"][0]
    # a 9-image test split abstains; the 80-image golden set decides the run
    combined = gate.combine({"test": verdict(9, 0.5, 0.6, seed=3), "golden": better})
    assert combined["blessed"] is True and combined["verdict"] == "blessed"
    assert gate.combine({"test": verdict(9, 0.5, 0.6, seed=3), "golden": tiny})["verdict"] == "insufficient_evidence"
    assert gate.combine({"test": verdict(9, 0.5, 0.6, seed=3), "golden": worse})["blessed"] is False
    # per-metric margins
    per_metric = EvaluationConfig(max_regression=RegressionMargins(accuracy=0.01, macro_f1=0.03, macro_auc=0.05))
    assert [gate.margin_of(per_metric, name) for name in gate.GATED_METRICS] == [0.01, 0.03, 0.05]


MODELS_CONFIG = """
model_config_list {
  config {
    name: "other"
    base_path: "/models/other"
    model_platform: "tensorflow"
    version_labels { key: "stable" value: 5 }
  }
  config {
    name: "brain_mri"
    base_path: "/models/brain_mri"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1700000000 versions: 1700000100 } }
    version_labels { key: "stable" value: 1700000000 }
    version_labels { key: "canary" value: 1700000100 }
  }
}
"""


def test_stable_version_from_models_config(tmp_path):
    assert gate.version_labels(MODELS_CONFIG, "brain_mri") == {"stable": 1700000000, "canary": 1700000100}
    assert gate.version_labels(MODELS_CONFIG, "missing") == {}
    (tmp_path / "models.config").write_text(MODELS_CONFIG)
    version_dir = tmp_path / "brain_mri" / "1700000000"
    (version_dir / "assets.extra").mkdir(parents=True)
    assert gate.find_baseline(tmp_path, "brain_mri").metrics is None
    (version_dir / "assets.extra" / gate.BASELINE_METRICS_FILE).write_text(json.dumps(_metrics(0.9, 0.9, 0.9)))
    baseline = gate.find_baseline(tmp_path, "brain_mri")
    assert baseline.version == 1700000000 and baseline.metrics["accuracy"] == 0.9
    assert gate.find_baseline(tmp_path, "other").version_dir is None  # labelled, but the folder is gone
    assert gate.find_baseline(tmp_path / "empty", "brain_mri") is None


def test_only_a_test_split_verdict_in_the_run_unlocks_publish(tmp_path):
    """publish reads RUN_DIR/blessing.json only (no fallback to evaluation/) and checks the verdict's split."""
    from medpipe.errors import DataError
    from serving.publish import check_blessing

    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    blessed = {"blessed": True, "reasons": [], "data": {"split": "test"}}
    (run / "evaluation" / "blessing.json").write_text(json.dumps(blessed))
    with pytest.raises(DataError, match="no blessing.json"):
        check_blessing(run, force=False)  # evaluation/blessing.json is not the run's verdict
    for data, says in (({"split": "val"}, "made on val, not the test split"),
                       ({"split": "images"}, "made on images, not the test split"),
                       (None, "unrecorded data")):
        (run / "blessing.json").write_text(json.dumps({**blessed, "data": data}))
        with pytest.raises(DataError, match=says):
            check_blessing(run, force=False)
    (run / "blessing.json").write_text(json.dumps({**blessed, "blessed": False, "reasons": ["accuracy 0.5 < 0.9"]}))
    with pytest.raises(DataError, match="not blessed: accuracy 0.5 < 0.9"):
        check_blessing(run, force=False)
    (run / "blessing.json").write_text(json.dumps(blessed))
    check_blessing(run, force=False)  # the test split, blessed: publish goes ahead
    (run / "blessing.json").write_text(json.dumps({**blessed, "data": {"split": "test_shift"}}))
    check_blessing(run, force=False)  # the shift-aware test split gates too; its val half (tuned on) does not
    (run / "blessing.json").write_text(json.dumps({**blessed, "data": {"split": "val_shift"}}))
    with pytest.raises(DataError, match="made on val_shift, not the test split"):
        check_blessing(run, force=False)
