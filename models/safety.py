"""Safety outputs fitted after training and baked into the SavedModel: calibration and an out-of-distribution guard.

    python -m models.safety --run RUN_DIR --data INGEST_DIR    # (re)fit on a finished run (train.py does it itself)

After training restores the best checkpoint, `fit_run` reads the penultimate features (the global-average-pooled
last feature map) and logits of the train and val splits, and writes into RUN_DIR:
- calibration.json: the temperature T (fitted on val by minimising the negative log-likelihood of softmax(z / T),
  or sigmoid(z / T) for sigmoid heads), NLL and ECE on val before and after;
- ood.json + ood_stats.npz: the OOD score is the Mahalanobis distance of the features to the nearest class mean,
  with class means and one shared (Ledoit-Wolf shrunk) covariance fitted on the train split (Lee et al. 2018); the
  threshold is the val score that keeps `evaluation.ood_retention` of the val split in distribution, or with
  `evaluation.ood_retention_confidence` C the val order statistic that keeps that share of new scans with
  probability C (retention_threshold: the plain quantile kept 0.990 of val but 0.973 of new brain MRIs).
docs/DESIGN.md ("Safety outputs") has the measurement behind the choice of score.

`SafeClassifier` is the one graph that computes every served output from float 0..255 images: the exported
signatures, `medpipe evaluate` on a run, and the report's Grad-CAM all call it, so they cannot drift apart.
Temperature scaling divides the logits by one positive number: the argmax, hence the predicted class, accuracy and
F1, never change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medpipe.config import TaskConfig
from medpipe.errors import DataError

log = logging.getLogger("medpipe.safety")

CALIBRATION_FILE = "calibration.json"
OOD_FILE = "ood.json"
OOD_STATS_FILE = "ood_stats.npz"
OOD_METHOD = "mahalanobis"
FEATURES_LAYER = "gap"  # build_model's global average pooling: the penultimate features
HEAD_LAYER = "probs"  # build_model's last Dense layer (its activation is softmax or sigmoid)
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The threshold is a val score computed in float64; the graph recomputes it in float32 (and in other batch sizes),
# which can land a hair above it and flip the very image that defines it. A relative margin far below any real gap.
THRESHOLD_MARGIN = 1e-4


# ------------------------------------------------------------------------------------------------ pure numpy
def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def calibrated_probabilities(logits: np.ndarray, temperature: float, activation: str) -> np.ndarray:
    """softmax(z / T) or sigmoid(z / T): the numpy twin of SafeClassifier's head (for fitting and tests)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if activation == "softmax":
        return np.exp(log_softmax(scaled))
    return 1.0 / (1.0 + np.exp(-scaled))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float, activation: str) -> float:
    """Mean NLL of integer labels (softmax) or of 0/1 targets per unit (sigmoid; labels [N] for one unit)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if activation == "softmax":
        return float(-np.mean(log_softmax(scaled)[np.arange(len(labels)), labels]))
    targets = np.asarray(labels, dtype=np.float64).reshape(scaled.shape)
    # log(1 + exp(-|z|)) form: stable for large |z|
    losses = np.maximum(scaled, 0) - scaled * targets + np.log1p(np.exp(-np.abs(scaled)))
    return float(np.mean(losses))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, activation: str) -> float:
    """The T > 0 minimising the validation NLL (Guo et al. 2017), searched on log T (one-dimensional, convex)."""
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t)), activation),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def ledoit_wolf_covariance(centred: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of already-centred rows (the estimator scikit-learn's LedoitWolf computes):
    well conditioned even with fewer examples than feature dimensions (the sample's tiny training split)."""
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / d
    delta = np.sum((sample - mu * np.eye(d)) ** 2) / d  # distance of the sample covariance to the scaled identity
    squares = x**2
    beta = (np.sum(squares.T @ squares) / n - np.sum(sample**2)) / (d * n)  # variance of the sample covariance
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means [C, D], whitening matrix W [D, D] with W W^T = shared covariance^-1). A class absent from the
    training split gets no mean (it cannot be modelled); DataError when no class is present."""
    features = np.asarray(features, dtype=np.float64)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    if not present:
        raise DataError("no training example to fit the OOD statistics on")
    means = np.stack([features[labels == c].mean(axis=0) for c in present])
    centred = features - means[np.searchsorted(present, labels)]
    covariance = ledoit_wolf_covariance(centred)
    # Cholesky of the precision: distance^2 = ||(f - mu) W||^2 (a matmul in the graph, no per-class inverse)
    precision = np.linalg.inv(covariance)
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return means, whitening


def mahalanobis_scores(features: np.ndarray, means: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Distance (not squared) to the nearest class mean in the whitened space: the numpy twin of the graph score."""
    projected = np.asarray(features, dtype=np.float64) @ whitening
    centres = means @ whitening
    squared = ((projected[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return np.sqrt(squared.min(axis=1))


def energy_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-T logsumexp(z / T) (Liu et al. 2020): higher = less like the training data. Measured for DESIGN.md."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    peak = scaled.max(axis=1)
    return -temperature * (peak + np.log(np.exp(scaled - peak[:, None]).sum(axis=1)))


def retention_threshold(val_scores: np.ndarray, retention: float, confidence: Optional[float] = None) -> float:
    """The val score s below which (score <= s = in distribution) new scans are kept at the `retention` rate.

    confidence None: the smallest val score with at least `retention` of val at or below it (the empirical
    quantile: new scans keep about that share, half the time less). confidence C: the smallest order statistic
    x_(k) whose true retention F(x_(k)) ~ Beta(k, n + 1 - k) is >= `retention` with probability >= C, a
    distribution-free bound that holds for any new scan exchangeable with val (so val must behave like new scans:
    no near-duplicates of train, ingest.split_groups). A val split too small for the bound (1 - retention^n < C)
    gets its largest score; fit() records the confidence reached."""
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))
    if scores.size == 0:
        raise DataError("the val split is empty: no OOD threshold can be chosen")
    if confidence is None:
        index = min(scores.size - 1, int(np.ceil(retention * scores.size)) - 1)
        return float(scores[max(index, 0)])
    reached = retention_confidence(scores.size, retention)
    index = int(np.argmax(reached >= confidence)) if np.any(reached >= confidence) else scores.size - 1
    return float(scores[index])


def retention_confidence(n: int, retention: float) -> np.ndarray:
    """P(F(x_(k)) >= retention) for k = 1..n: the confidence that the k-th smallest of n val scores keeps at
    least `retention` of new scans (F(x_(k)) is Beta(k, n + 1 - k) distributed for continuous scores)."""
    from scipy.stats import beta

    k = np.arange(1, n + 1)
    return beta.sf(retention, k, n + 1 - k)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> Optional[float]:
    """P(score of an OOD image > score of an in-distribution image), ties counted half (OOD = positive class)."""
    from models.metrics import roc_auc

    scores = np.concatenate([np.asarray(in_scores, float), np.asarray(out_scores, float)])
    truth = np.concatenate([np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)])
    return roc_auc(truth, scores)


# ------------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class SafetyParams:
    """What the graph needs: temperature, OOD statistics and threshold."""

    temperature: float
    means: np.ndarray  # [C', D]
    whitening: np.ndarray  # [D, D]
    threshold: float
    method: str = OOD_METHOD


def save_params(run_dir: Path, params: SafetyParams, calibration: dict, ood: dict) -> None:
    np.savez_compressed(run_dir / OOD_STATS_FILE, means=params.means.astype(np.float32),
                        whitening=params.whitening.astype(np.float32))
    (run_dir / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
    (run_dir / OOD_FILE).write_text(json.dumps(ood, indent=2) + "\n")


def load_params(run_dir: str | Path) -> Optional[SafetyParams]:
    """The fitted parameters of a run, or None for a run trained before they existed (see `main`)."""
    run_dir = Path(run_dir)
    files = [run_dir / name for name in (CALIBRATION_FILE, OOD_FILE, OOD_STATS_FILE)]
    if not all(path.is_file() for path in files):
        return None
    calibration = json.loads(files[0].read_text())
    ood = json.loads(files[1].read_text())
    with np.load(files[2]) as stats:
        means, whitening = stats["means"], stats["whitening"]
    return SafetyParams(float(calibration["temperature"]), means, whitening, float(ood["threshold"]),
                        ood.get("method", OOD_METHOD))


def require_params(run_dir: str | Path, data_hint: str = "INGEST_DIR") -> SafetyParams:
    params = load_params(run_dir)
    if params is None:
        raise DataError(
            f"{run_dir} has no {CALIBRATION_FILE}/{OOD_FILE}/{OOD_STATS_FILE} (a run trained before the safety "
            f"outputs existed): fit them with `python -m models.safety --run {run_dir} --data {data_hint}`")
    return params


# ------------------------------------------------------------------------------------------------ the graph
class SafeClassifier:
    """Images (float32 [N, S, S, C], 0..255) -> every served output, in TensorFlow ops (traceable into a SavedModel).

    One forward pass of keras.Model(inputs, [last_conv, gap features]) feeds: logits = features @ kernel + bias of
    the `probs` layer (its activation removed), calibrated probabilities = activation(logits / T), the Mahalanobis
    OOD score from baked-in constants, and (for `explain`) Grad-CAM of the predicted class on last_conv.
    """

    def __init__(self, model: Any, task: str, num_labels: int, params: Optional[SafetyParams],
                 threshold: Optional[float] = None):
        import keras
        import tensorflow as tf

        from models.architectures import LAST_CONV_NAME

        self.model, self.task, self.num_labels, self.params, self.threshold = model, task, num_labels, params, threshold
        try:
            last_conv = model.get_layer(LAST_CONV_NAME)
            features = model.get_layer(FEATURES_LAYER)
            self.head = model.get_layer(HEAD_LAYER)
        except ValueError as exc:
            raise DataError(f"model {model.name} lacks a top-level {exc}; it was not built by "
                            "models.architectures.build_model") from exc
        self.activation = "softmax" if task == "multiclass" else "sigmoid"
        self.extractor = keras.Model(model.input, [last_conv.output, features.output], name="safety_features")
        if params is not None:
            self.temperature = tf.constant(params.temperature, tf.float32)
            self.whitening = tf.constant(params.whitening, tf.float32)
            self.centres = tf.constant(params.means @ params.whitening, tf.float32)  # [C', D] whitened class means
            self.ood_threshold = tf.constant(params.threshold, tf.float32)

    # -- pieces
    def logits(self, features):
        import tensorflow as tf

        return tf.matmul(tf.cast(features, tf.float32), tf.cast(self.head.kernel, tf.float32)) + tf.cast(
            self.head.bias, tf.float32)

    def scores(self, logits, temperature=None):
        """Model outputs (softmax rows or sigmoid units) at temperature T (1 = the raw Keras model)."""
        import tensorflow as tf

        scaled = logits if temperature is None else logits / temperature
        return tf.nn.softmax(scaled, axis=-1) if self.activation == "softmax" else tf.sigmoid(scaled)

    def ood_score(self, features):
        import tensorflow as tf

        projected = tf.matmul(tf.cast(features, tf.float32), self.whitening)  # [N, D]
        # ||a - b||^2 = |a|^2 - 2ab + |b|^2 for every (image, class) pair; clipped at 0 against rounding
        squared = (tf.reduce_sum(projected**2, axis=1, keepdims=True) - 2.0 * tf.matmul(projected, self.centres,
                   transpose_b=True) + tf.reduce_sum(self.centres**2, axis=1)[tf.newaxis, :])
        return tf.sqrt(tf.maximum(tf.reduce_min(squared, axis=1), 0.0))

    def forward(self, images):
        """(feature map, calibrated model outputs, features, logits)."""
        feature_map, features = self.extractor(images, training=False)
        logits = self.logits(features)
        temperature = self.temperature if self.params is not None else None
        return feature_map, self.scores(logits, temperature), features, logits

    # -- the served dicts
    def __call__(self, images, explain: bool = False) -> dict:
        """{probabilities, class_ids, ood_score, in_distribution} (+ heatmap when explain)."""
        import tensorflow as tf

        from models.export import _head
        from models.gradcam import gradcam_from_forward

        images = tf.cast(images, tf.float32)
        predicted = lambda outputs: _head(outputs, self.task, self.num_labels, self.threshold)[1]  # noqa: E731
        if explain:
            heatmap, (_, outputs, features, _) = gradcam_from_forward(self.forward, images, predicted)
        else:
            _, outputs, features, _ = self.forward(images)
        probabilities, class_ids = _head(outputs, self.task, self.num_labels, self.threshold)
        result = {"probabilities": probabilities, "class_ids": class_ids}
        if self.params is not None:
            score = self.ood_score(features)
            result["ood_score"] = score
            result["in_distribution"] = score <= self.ood_threshold
        if explain:
            result["heatmap"] = heatmap
        return result


# ------------------------------------------------------------------------------------------------ fitting a run
def split_features(model: Any, data_dir: Path, split: str, schema: Any, batch_size: int = 64):
    """(features [N, D], logits [N, K], labels [N]) of a split, decoded exactly as in training."""
    from models import data as data_lib

    safe = SafeClassifier(model, schema.task, schema.num_classes, None)
    records = data_lib.read_records(data_dir, split).map(lambda s: data_lib.parse_example(s, schema))
    features, logits, labels = [], [], []
    for images, label in records.batch(batch_size):
        _, pooled = safe.extractor(images, training=False)
        features.append(np.asarray(pooled, np.float64))
        logits.append(np.asarray(safe.logits(pooled), np.float64))
        labels.append(label.numpy())
    if not features:
        raise DataError(f"{data_dir}: the {split} split has no records")
    return np.concatenate(features), np.concatenate(logits), np.concatenate(labels)


def fit(train: tuple, val: tuple, task: str, num_classes: int, retention: float, bins: int,
        confidence: Optional[float] = None) -> tuple:
    """Pure fitting from (features, logits, labels) of train and val -> (SafetyParams, calibration, ood dicts)."""
    from models.metrics import as_probability_matrix, calibration as reliability

    if task == "multilabel":
        raise DataError("calibration and the OOD guard cover multiclass and binary tasks")
    activation = "softmax" if task == "multiclass" else "sigmoid"
    (train_features, _, train_labels), (val_features, val_logits, val_labels) = train, val
    temperature = fit_temperature(val_logits, val_labels, activation)

    def ece(t: float) -> float:
        probs = as_probability_matrix(calibrated_probabilities(val_logits, t, activation), num_classes)
        return reliability(val_labels, probs, bins)["ece"]

    calibration = {
        "method": "temperature scaling (Guo et al. 2017), fitted on the val split",
        "temperature": temperature,
        "val_examples": int(len(val_labels)),
        "val_nll_before": negative_log_likelihood(val_logits, val_labels, 1.0, activation),
        "val_nll_after": negative_log_likelihood(val_logits, val_labels, temperature, activation),
        "val_ece_before": ece(1.0),
        "val_ece_after": ece(temperature),
    }
    means, whitening = fit_mahalanobis(train_features, train_labels, num_classes)
    val_scores = mahalanobis_scores(val_features, means, whitening)
    threshold = retention_threshold(val_scores, retention, confidence) * (1 + THRESHOLD_MARGIN)
    kept = int(np.sum(val_scores <= threshold))
    ood = {
        "method": OOD_METHOD,
        "description": "distance of the penultimate (global-average-pooled) features to the nearest class mean, "
                       "class means and one Ledoit-Wolf shrunk covariance fitted on the train split",
        "threshold": threshold,
        "target_retention": retention,
        "confidence": confidence,
        "threshold_rule": ("empirical quantile of the val scores" if confidence is None else
                           "distribution-free bound: retention >= target_retention with probability >= confidence "
                           "on scans exchangeable with val"),
        # the confidence the chosen val order statistic reaches (< confidence when val is too small)
        "confidence_reached": float(retention_confidence(len(val_scores), retention)[max(kept - 1, 0)]),
        "val_retention": kept / len(val_scores),
        "train_examples": int(len(train_labels)),
        "feature_dimensions": int(train_features.shape[1]),
        "val_score_quantiles": {q: float(np.quantile(val_scores, float(q))) for q in ("0.5", "0.9", "0.99")},
    }
    return SafetyParams(temperature, means, whitening, threshold), calibration, ood


def fit_run(model: Any, config: TaskConfig, data_dir: Path, run_dir: Path, schema: Any) -> dict:
    """Fit on train/val of DATA with the run's (best) model, write the files; returns a summary for train_metadata."""
    if schema.task == "multilabel":  # no single predicted class to calibrate or to centre features on
        log.warning("multilabel task: no calibration or OOD statistics fitted; such a run cannot be exported yet")
        return {"skipped": "multilabel tasks have no calibration or OOD guard yet"}
    train = split_features(model, data_dir, "train", schema)
    val = split_features(model, data_dir, "val", schema)
    params, calibration, ood = fit(train, val, schema.task, schema.num_classes, config.evaluation.ood_retention,
                                   config.evaluation.calibration_bins, config.evaluation.ood_retention_confidence)
    save_params(run_dir, params, calibration, ood)
    fit_study_rule(config, val, params, run_dir)
    log.info("calibration: temperature %.4f (val ECE %.4f -> %.4f); OOD threshold %.3f keeps %.4f of val",
             params.temperature, calibration["val_ece_before"], calibration["val_ece_after"], params.threshold,
             ood["val_retention"])
    return {"temperature": params.temperature, "val_ece_before": calibration["val_ece_before"],
            "val_ece_after": calibration["val_ece_after"], "ood_method": ood["method"],
            "ood_threshold": params.threshold, "ood_val_retention": ood["val_retention"]}


def fit_study_rule(config: TaskConfig, val: tuple, params: SafetyParams, run_dir: Path) -> None:
    """RUN_DIR/study_rule.json (medpipe/study.py), from the val split's calibrated, in-distribution outputs: the
    same outputs the served graph gives, so the point means the same thing in the gateway."""
    from models.metrics import as_probability_matrix
    from models.study_point import fit_rule, write_rule

    features, logits, labels = val
    activation = "softmax" if config.task == "multiclass" else "sigmoid"
    probabilities = as_probability_matrix(calibrated_probabilities(logits, params.temperature, activation),
                                          len(config.labels))
    inside = mahalanobis_scores(features, params.means, params.whitening) <= params.threshold
    try:
        rule = fit_rule(config, probabilities, labels, inside, chosen_on="the val split at training time")
    except ValueError as exc:  # a val split without both normal and abnormal images: no point, said loudly
        log.warning("no study operating point chosen (%s): this run cannot decide studies until one is", exc)
        return
    write_rule(run_dir, rule)
    log.info("study rule %s (operating point %s) written", rule.rule, rule.operating_point)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.safety",
        description="Fit the temperature and the OOD statistics of a finished training run (medpipe train does "
        "this itself after training; use this for a run trained before, or with another ingest of the same data).")
    parser.add_argument("--run", required=True, help="training run directory (model.keras, config.yaml)")
    parser.add_argument("--data", required=True, help="the ingest output the run was trained on")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models import data as data_lib
    from models.train import load_run

    run_dir = Path(args.run)
    model, config, _ = load_run(run_dir)
    schema = data_lib.check_data(Path(args.data), config)
    summary = fit_run(model, config, Path(args.data), run_dir, schema)
    metadata_file = run_dir / "train_metadata.json"
    if metadata_file.is_file():
        metadata = json.loads(metadata_file.read_text())
        metadata["safety"] = summary
        metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
