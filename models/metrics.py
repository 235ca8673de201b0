"""Classification metrics: the numbers in metrics.json, the report and the quality gate.

scikit-learn computes the counts, ROC and F1 scores and SciPy the bootstrap intervals; the conventions on undefined
values are scikit-learn's with `zero_division=0`:

- precision of a class the model never predicts is 0; recall of a class absent from `y_true` is 0; F1 is 0 when
  precision + recall is 0.
- macro F1 averages over *all* configured labels (a missing class counts as 0, so a split without a class cannot
  look better than it is); weighted F1 weights by support.
- balanced accuracy averages recall over the classes present in `y_true` (as scikit-learn does).
- specificity of a class is null when the split has no negatives for it (a single-class split).
- one-vs-rest ROC AUC of a class is null when the class is absent from `y_true` or is the only class (AUC needs
  positives and negatives); macro AUC averages the defined ones and is null when none is defined.
- calibration is top-label: confidence = the highest probability, correct = argmax equals the truth; the expected
  calibration error (ECE) uses `calibration_bins` equal-width bins over [0, 1].
- binary tasks: probabilities may be [N] or [N, 1] (positive class) or [N, 2]; predictions use the operating
  `threshold` on the positive probability (0.5 when not given).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk

CI_LEVEL = 0.95


# ------------------------------------------------------------------------------------------------ input handling
def as_probability_matrix(probs: Any, num_classes: int) -> np.ndarray:
    """[N, C] float64 probabilities; a binary positive-class vector [N] or [N, 1] becomes [1 - p, p]."""
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 1:
        if num_classes != 2:
            raise ValueError(f"a vector of scores needs exactly 2 labels (binary), got {num_classes} labels")
        return np.stack([1.0 - array, array], axis=1)
    if array.ndim != 2 or array.shape[1] != num_classes:
        raise ValueError(f"probabilities must have shape [N, {num_classes}], got {list(array.shape)}")
    return array


def predict_classes(probs: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """argmax; for two classes with a threshold, positive (1) when p(positive) >= threshold."""
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return np.argmax(probs, axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------------ building blocks
def roc_auc(y_binary: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve as the Mann-Whitney statistic (ties counted half, = sklearn's roc_auc_score, which is
    20x slower inside the bootstrap); None without both positives and negatives."""
    y_binary = np.asarray(y_binary, dtype=bool)
    positives, negatives = int(y_binary.sum()), int((~y_binary).sum())
    if not positives or not negatives:
        return None
    rank_sum = float(stats.rankdata(scores)[y_binary].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _macro_f1(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean over classes of F1 = 2 TP / (support + predicted), 0 when both are 0 (the bootstrap's fast path)."""
    true_positives = np.bincount(truth[truth == predicted], minlength=num_classes)
    denominator = np.bincount(truth, minlength=num_classes) + np.bincount(predicted, minlength=num_classes)
    return float(np.mean(np.divide(2 * true_positives, denominator, out=np.zeros(num_classes), where=denominator > 0)))


def roc_curve(y_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score (positive when score >= t), from (0, 0) at threshold +inf."""
    return sk.roc_curve(np.asarray(y_binary, dtype=bool), scores, drop_intermediate=False)


def choose_threshold(
    y_true: Any, scores: Any, method: str = "youden", target: float = 0.95
) -> dict[str, float]:
    """Operating threshold for a binary task, chosen on the validation split.

    `youden` maximises sensitivity + specificity - 1; `target_sensitivity` takes the highest threshold whose
    sensitivity reaches `target` (the best specificity that still finds that share of positives).
    `y_true` holds 0/1 labels (1 = positive), `scores` the positive-class probabilities.
    Returns {"threshold", "sensitivity", "specificity", "method"}.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    if y_true.min(initial=0) < 0 or y_true.max(initial=0) > 1:
        raise ValueError("choose_threshold needs binary labels 0/1")
    if y_true.sum() == 0 or y_true.sum() == y_true.size:
        raise ValueError(
            "choose_threshold needs both positive and negative examples in the validation split; "
            "this split has only one class (ingest more data or change ingest.split)"
        )
    fpr, tpr, thresholds = (values[1:] for values in roc_curve(y_true == 1, scores))  # drop the +inf point
    if method == "youden":
        best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    elif method == "target_sensitivity":
        best = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # thresholds descend: the first reaching is highest
    else:
        raise ValueError(f"unknown threshold method {method!r}; expected youden or target_sensitivity")
    return {
        "threshold": float(thresholds[best]),
        "sensitivity": float(tpr[best]),
        "specificity": float(1.0 - fpr[best]),
        "method": method,
    }


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int) -> dict[str, Any]:
    """Top-label reliability: per equal-width confidence bin, the count, mean confidence and accuracy; and ECE."""
    confidence = probs.max(axis=1)
    correct = (np.argmax(probs, axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; confidence 0 goes into the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):  # empty bins are NaN (null in JSON)
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return {
        "ece": float(np.nansum(np.abs(accuracy - mean_confidence) * counts) / max(counts.sum(), 1)),
        "bins": bins,
        "bin_edges": edges.tolist(),
        "bin_count": counts.tolist(),
        "bin_confidence": [_none_if_nan(v) for v in mean_confidence],
        "bin_accuracy": [_none_if_nan(v) for v in accuracy],
    }


def _none_if_nan(value: float) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)


def _macro_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[list[Optional[float]], Optional[float]]:
    per_class = [roc_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    defined = [v for v in per_class if v is not None]
    return per_class, (float(np.mean(defined)) if defined else None)


# ------------------------------------------------------------------------------------------------ bootstrap
def bootstrap_intervals(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, samples: int, seed: int
) -> dict[str, Any]:
    """Percentile 95% intervals over `samples` resamples (with replacement) of the examples; the macro AUC interval
    is null when a resample holds a single class (AUC undefined there), e.g. on a single-class split."""
    names = ("accuracy", "macro_f1", "macro_auc")
    if samples <= 0 or y_true.size == 0:
        return {"level": CI_LEVEL, "samples": 0, **dict.fromkeys(names)}

    def statistic(index: np.ndarray) -> list[float]:
        truth, predicted = y_true[index], y_pred[index]
        auc = _macro_auc(truth, probs[index])[1]
        return [np.mean(truth == predicted), _macro_f1(truth, predicted, probs.shape[1]),
                np.nan if auc is None else auc]

    low, high = stats.bootstrap((np.arange(y_true.size),), statistic, n_resamples=samples, vectorized=False,
                                confidence_level=CI_LEVEL, method="percentile",
                                rng=np.random.default_rng(seed)).confidence_interval
    return {"level": CI_LEVEL, "samples": samples,
            **{name: None if np.isnan(low[i]) else [float(low[i]), float(high[i])] for i, name in enumerate(names)}}


# ------------------------------------------------------------------------------------------------ paired comparison
GATED = ("accuracy", "macro_f1", "macro_auc")
NON_INFERIORITY_LEVEL = 0.95  # one-sided: the gate blesses when the 5th percentile of the difference clears -margin


def _gated_values(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray) -> list[float]:
    auc = _macro_auc(y_true, probs)[1]
    return [float(np.mean(y_true == y_pred)), _macro_f1(y_true, y_pred, probs.shape[1]),
            np.nan if auc is None else auc]


def paired_comparison(y_true: Any, candidate: Any, baseline: Any, *, candidate_threshold: Optional[float] = None,
                      baseline_threshold: Optional[float] = None, margins: dict[str, float], min_examples: int,
                      samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Candidate against baseline on the SAME examples (probabilities [N, C] of each): per gated metric the
    difference candidate - baseline with a paired bootstrap (both models resampled with the same indices) and its
    one-sided 95% lower bound, judged for non-inferiority against its `margins[name]`; McNemar's exact test on the examples
    exactly one of the two gets right. Fewer than `min_examples` examples: `sufficient` False and no judgement
    (one flipped image on a small set must not decide a release either way)."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    num_classes = np.asarray(candidate).shape[-1] if np.asarray(candidate).ndim == 2 else 2
    candidate, baseline = as_probability_matrix(candidate, num_classes), as_probability_matrix(baseline, num_classes)
    if not (candidate.shape == baseline.shape and candidate.shape[0] == y_true.size):
        raise ValueError(f"paired comparison needs both models on the same {y_true.size} examples, got "
                         f"{candidate.shape} and {baseline.shape}")
    binary = num_classes == 2
    predicted_c = predict_classes(candidate, candidate_threshold if binary else None)
    predicted_b = predict_classes(baseline, baseline_threshold if binary else None)
    right_c, right_b = predicted_c == y_true, predicted_b == y_true
    only_c, only_b = int(np.sum(right_c & ~right_b)), int(np.sum(right_b & ~right_c))
    mcnemar = {"candidate_only_correct": only_c, "baseline_only_correct": only_b,
               "p_value": float(stats.binomtest(only_c, only_c + only_b, 0.5).pvalue) if only_c + only_b else 1.0}
    n = int(y_true.size)
    result: dict[str, Any] = {"n": n, "min_examples": int(min_examples), "sufficient": n >= min_examples,
                              "level": NON_INFERIORITY_LEVEL, "samples": int(samples),
                              "mcnemar": mcnemar, "metrics": {}}
    point = np.subtract(_gated_values(y_true, candidate, predicted_c), _gated_values(y_true, baseline, predicted_b))
    rng = np.random.default_rng(seed)
    differences = np.empty((max(samples, 0), len(GATED)))
    for row in range(differences.shape[0]):
        index = rng.integers(0, n, n)
        truth = y_true[index]
        differences[row] = np.subtract(_gated_values(truth, candidate[index], predicted_c[index]),
                                       _gated_values(truth, baseline[index], predicted_b[index]))
    tail = (1 - NON_INFERIORITY_LEVEL) * 100
    for column, name in enumerate(GATED):
        values = differences[:, column]
        values = values[~np.isnan(values)]
        defined = not np.isnan(point[column]) and values.size > 0
        lower = float(np.percentile(values, tail)) if defined else None
        upper = float(np.percentile(values, 100 - tail)) if defined else None
        margin = float(margins[name])
        result["metrics"][name] = {
            "difference": _none_if_nan(point[column]), "lower": lower, "upper": upper, "margin": margin,
            # None: undefined (a class without positives), or not judged (too few examples)
            "non_inferior": (lower >= -margin) if defined and result["sufficient"] else None}
    return result


# ------------------------------------------------------------------------------------------------ the whole set
def classification_metrics(
    y_true: Any,
    probs: Any,
    labels: Sequence[str],
    threshold: Optional[float] = None,
    bootstrap_samples: int = 1000,
    calibration_bins: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of metrics.json for integer labels `y_true` [N] and probabilities `probs` [N, C].

    JSON-ready (floats, ints, lists, None). See the module docstring for the conventions on undefined values.
    """
    labels = list(labels)
    num_classes = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = as_probability_matrix(probs, num_classes)
    if probs.shape[0] != y_true.size:
        raise ValueError(f"{y_true.size} labels but {probs.shape[0]} rows of probabilities")
    if y_true.size == 0:
        raise ValueError("no examples to evaluate (the split is empty)")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"labels must be integers in [0, {num_classes - 1}], got {y_true.min()}..{y_true.max()}")
    binary = num_classes == 2
    y_pred = predict_classes(probs, threshold if binary else None)

    ids = list(range(num_classes))
    matrix = sk.confusion_matrix(y_true, y_pred, labels=ids)
    precision, recall, f1, support = sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    negatives = y_true.size - support
    true_negatives = negatives - (matrix.sum(axis=0) - np.diag(matrix))  # negatives minus false positives
    specificity = [float(true_negatives[c] / negatives[c]) if negatives[c] > 0 else None for c in ids]
    auc_per_class, macro_auc = _macro_auc(y_true, probs)
    calib = calibration(y_true, probs, calibration_bins)

    result: dict[str, Any] = {
        "num_examples": int(y_true.size),
        "labels": labels,
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float(np.average(f1, weights=support)),
        "macro_auc": macro_auc,
        "ece": calib["ece"],
        "per_class": {
            label: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "sensitivity": float(recall[c]),
                "specificity": specificity[c],
                "f1": float(f1[c]),
                "support": int(support[c]),
                "predicted": int(matrix[:, c].sum()),
                "auc": auc_per_class[c],
            }
            for c, label in enumerate(labels)
        },
        "confusion_matrix": matrix.astype(int).tolist(),
        "calibration": calib,
        "confidence_intervals": bootstrap_intervals(y_true, probs, y_pred, bootstrap_samples, seed),
    }
    if binary:
        positive = labels[1]
        result["operating_point"] = {
            "positive_label": positive,
            "threshold": 0.5 if threshold is None else float(threshold),
            "sensitivity": float(recall[1]),
            "specificity": specificity[1],
        }
    return result


def roc_curves(y_true: Any, probs: Any, labels: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC curve per class present with both positives and negatives (for plots)."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = as_probability_matrix(probs, len(labels))
    curves = {}
    for c, label in enumerate(labels):
        positives = y_true == c
        if 0 < positives.sum() < y_true.size:
            fpr, tpr, _ = roc_curve(positives, probs[:, c])
            curves[label] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return curves
