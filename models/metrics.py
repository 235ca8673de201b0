"""Classification metrics in plain numpy: the numbers in metrics.json, the report and the quality gate.

No scikit-learn in product code (it is only the test oracle). Conventions, chosen to match scikit-learn with
`zero_division=0` so that the oracle tests are exact:

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
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    index = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, empty: float = 0.0) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(numerator.shape, empty, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def per_class_counts(matrix: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    tn = matrix.sum() - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = per_class_counts(matrix)
    precision = _safe_divide(counts["tp"], counts["tp"] + counts["fp"])
    recall = _safe_divide(counts["tp"], counts["tp"] + counts["fn"])
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def macro_f1_from_matrix(matrix: np.ndarray) -> float:
    return float(np.mean(precision_recall_f1(matrix)[2]))


def roc_auc(y_binary: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve via the rank (Mann-Whitney) statistic, ties counted half; None without both
    positives and negatives."""
    y_binary = np.asarray(y_binary, dtype=bool)
    positives = int(y_binary.sum())
    negatives = y_binary.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    rank_sum = float(ranks[y_binary].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # boundaries of runs of equal values
    distinct = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    run_id = np.cumsum(distinct) - 1
    run_start = np.flatnonzero(distinct)
    run_end = np.concatenate((run_start[1:], [values.size]))
    mean_rank = (run_start + run_end + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def roc_curve(y_binary: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """False and true positive rates at every distinct score used as threshold (positive when score >= t),
    starting at (0, 0) with threshold +inf. Rates are NaN-free only when both classes are present."""
    y_binary = np.asarray(y_binary, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_truth = y_binary[order]
    last_of_run = np.concatenate((sorted_scores[1:] != sorted_scores[:-1], [True]))
    tps = np.cumsum(sorted_truth)[last_of_run]
    fps = np.cumsum(~sorted_truth)[last_of_run]
    thresholds = sorted_scores[last_of_run]
    tps = np.concatenate(([0], tps)).astype(np.float64)
    fps = np.concatenate(([0], fps)).astype(np.float64)
    thresholds = np.concatenate(([np.inf], thresholds))
    positives, negatives = tps[-1], fps[-1]
    tpr = tps / positives if positives else np.full(tps.shape, np.nan)
    fpr = fps / negatives if negatives else np.full(fps.shape, np.nan)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


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
    curve = roc_curve(y_true == 1, scores)
    tpr, fpr, thresholds = curve["tpr"][1:], curve["fpr"][1:], curve["thresholds"][1:]  # drop the +inf point
    if method == "youden":
        best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    elif method == "target_sensitivity":
        reaching = np.flatnonzero(tpr >= target - 1e-12)
        best = int(reaching[0])  # thresholds descend, so the first reaching one is the highest
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
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    mean_confidence = _safe_divide(np.bincount(which, weights=confidence, minlength=bins), counts, np.nan)
    accuracy = _safe_divide(np.bincount(which, weights=correct, minlength=bins), counts, np.nan)
    gaps = np.where(counts > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float(np.sum(gaps * counts) / max(counts.sum(), 1.0))
    return {
        "ece": ece,
        "bins": bins,
        "bin_edges": edges.tolist(),
        "bin_count": counts.astype(int).tolist(),
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
    """Percentile 95% intervals over `samples` resamples (with replacement) of the examples."""
    if samples <= 0 or y_true.size == 0:
        return {"level": CI_LEVEL, "samples": 0, "accuracy": None, "macro_f1": None, "macro_auc": None}
    rng = np.random.default_rng(seed)
    num_classes = probs.shape[1]
    accuracy, macro_f1, macro_auc = [], [], []
    for _ in range(samples):
        index = rng.integers(0, y_true.size, y_true.size)
        truth, predicted = y_true[index], y_pred[index]
        accuracy.append(float(np.mean(truth == predicted)))
        macro_f1.append(macro_f1_from_matrix(confusion_matrix(truth, predicted, num_classes)))
        auc = _macro_auc(truth, probs[index])[1]
        if auc is not None:
            macro_auc.append(auc)
    low, high = 100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2

    def interval(values: list[float]) -> Optional[list[float]]:
        return [float(np.percentile(values, low)), float(np.percentile(values, high))] if values else None

    return {
        "level": CI_LEVEL,
        "samples": samples,
        "accuracy": interval(accuracy),
        "macro_f1": interval(macro_f1),
        # resamples where no class has both positives and negatives are left out of the AUC interval
        "macro_auc": interval(macro_auc),
    }


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

    matrix = confusion_matrix(y_true, y_pred, num_classes)
    counts = per_class_counts(matrix)
    precision, recall, f1 = precision_recall_f1(matrix)
    support = matrix.sum(axis=1)
    negatives = counts["tn"] + counts["fp"]
    specificity = [
        float(counts["tn"][c] / negatives[c]) if negatives[c] > 0 else None for c in range(num_classes)
    ]
    auc_per_class, macro_auc = _macro_auc(y_true, probs)
    present = support > 0
    calib = calibration(y_true, probs, calibration_bins)

    result: dict[str, Any] = {
        "num_examples": int(y_true.size),
        "labels": labels,
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float(np.sum(f1 * support) / support.sum()),
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
            curve = roc_curve(positives, probs[:, c])
            curves[label] = {"fpr": curve["fpr"].tolist(), "tpr": curve["tpr"].tolist()}
    return curves
