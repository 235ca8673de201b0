"""models/safety.py (calibration + OOD guard), the gate's safety checks, the model card, and the acceptance test:
a model trained on the sample flags chest X-rays outside its intended use and keeps held-back brain MRI slices."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, SAMPLE

from models import safety  # noqa: E402


# ---- pure numpy, against independent references ---------------------------------------------------------------
def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))  # fewer rows than a comfortable fit would want
    centred = x - x.mean(axis=0)
    expected = LedoitWolf(assume_centered=True).fit(centred).covariance_
    np.testing.assert_allclose(safety.ledoit_wolf_covariance(centred), expected, rtol=1e-10, atol=1e-10)


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 50)
    features = rng.normal(size=(150, 5)) + labels[:, None] * 3.0
    means, whitening = safety.fit_mahalanobis(features, labels, 3)
    np.testing.assert_allclose(means[1], features[labels == 1].mean(axis=0))
    precision = whitening @ whitening.T
    probe = rng.normal(size=(7, 5)) * 4
    expected = [min(mahalanobis(p, m, precision) for m in means) for p in probe]
    np.testing.assert_allclose(safety.mahalanobis_scores(probe, means, whitening), expected, rtol=1e-9)


def test_temperature_recovers_the_one_that_made_the_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4000, 4)) * 3.0
    true_t = 2.5  # labels drawn from softmax(z / 2.5): the model is overconfident by that factor
    probs = safety.calibrated_probabilities(logits, true_t, "softmax")
    labels = np.array([rng.choice(4, p=p) for p in probs])
    fitted = safety.fit_temperature(logits, labels, "softmax")
    assert abs(fitted - true_t) < 0.2
    assert safety.negative_log_likelihood(logits, labels, fitted, "softmax") < \
        safety.negative_log_likelihood(logits, labels, 1.0, "softmax")
    # scaling never moves the argmax
    assert (safety.calibrated_probabilities(logits, fitted, "softmax").argmax(1) == logits.argmax(1)).all()


def test_sigmoid_temperature_and_uncalibrate_invert_each_other():
    from models.evaluate import uncalibrate

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2000, 1)) * 4
    labels = (rng.uniform(size=2000) < safety.calibrated_probabilities(logits, 3.0, "sigmoid")[:, 0]).astype(int)
    assert abs(safety.fit_temperature(logits, labels, "sigmoid") - 3.0) < 0.3
    raw = safety.calibrated_probabilities(logits, 1.0, "sigmoid")[:, 0]
    calibrated = safety.calibrated_probabilities(logits, 3.0, "sigmoid")[:, 0]
    back = uncalibrate(np.stack([1 - calibrated, calibrated], axis=1), 3.0)
    np.testing.assert_allclose(back[:, 1], raw, atol=1e-9)


def test_retention_threshold_keeps_at_least_the_share():
    scores = np.arange(1, 201, dtype=float)  # 200 val images
    threshold = safety.retention_threshold(scores, 0.99)
    assert threshold == 198.0 and np.mean(scores <= threshold) == 0.99
    assert safety.retention_threshold(np.array([5.0, 1.0, 3.0]), 0.99) == 5.0  # small split: keeps everything
    assert safety.auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0



def test_retention_threshold_with_confidence_keeps_the_share_of_new_scans():
    # 525 val scores (the brain MRI val split's size): the bound allows one val score above the threshold, so
    # retention >= 0.99 holds with probability P(Binom(525, 0.01) >= 2) = 0.967 >= 0.95; the quantile allows five
    scores = np.arange(1, 526, dtype=float)
    assert safety.retention_threshold(scores, 0.99, 0.95) == 524.0
    assert safety.retention_threshold(scores, 0.99) == 520.0
    reached = safety.retention_confidence(525, 0.99)
    assert abs(reached[523] - 0.967) < 0.001 and reached[522] < 0.95
    # distribution-free: on 2,000 draws of (val, new scans) from any continuous distribution, the bound's threshold
    # keeps >= 99% of the new scans in at least 95% of draws; the plain quantile in about half of them
    rng = np.random.default_rng(0)
    val, new = rng.lognormal(3, 0.2, (2000, 525)), rng.lognormal(3, 0.2, (2000, 2000))
    bound = np.array([safety.retention_threshold(v, 0.99, 0.95) for v in val])
    quantile = np.array([safety.retention_threshold(v, 0.99) for v in val])
    assert np.mean(np.mean(new <= bound[:, None], axis=1) >= 0.99) >= 0.95
    assert np.mean(np.mean(new <= quantile[:, None], axis=1) >= 0.99) < 0.7
    # too small a val split for the bound: its largest score, and fit() says the confidence reached
    assert safety.retention_threshold(np.array([5.0, 1.0, 3.0]), 0.99, 0.95) == 5.0
    assert safety.retention_confidence(3, 0.99)[-1] < 0.03


def test_fit_records_the_threshold_rule_and_the_config_checks_it():
    from medpipe.config import load_config
    from medpipe.errors import ConfigError

    rng = np.random.default_rng(1)
    split = lambda n: (rng.normal(size=(n, 8)), rng.normal(size=(n, 2)), rng.integers(0, 2, n))  # noqa: E731
    _, _, ood = safety.fit(split(400), split(400), "multiclass", 2, 0.99, 10, confidence=0.95)
    assert ood["confidence"] == 0.95 and ood["confidence_reached"] >= 0.95 and ood["val_retention"] >= 0.995
    _, _, plain = safety.fit(split(400), split(400), "multiclass", 2, 0.99, 10)
    assert plain["confidence"] is None and 0.99 <= plain["val_retention"] < 0.995
    assert load_config(ROOT / "config" / "brain_mri.yaml").evaluation.ood_retention_confidence == 0.95
    with pytest.raises(ConfigError, match="ood_retention_confidence"):
        load_config(ROOT / "config" / "brain_mri.yaml", ["evaluation.ood_retention_confidence=1.5"])


def test_gate_checks_the_share_each_probe_set_has_flagged():
    from medpipe.config import load_config
    from models.gate import judge

    config = load_config(ROOT / "config" / "brain_mri.yaml", ["evaluation.thresholds.min_ood_flagged=0.9"])
    probes = [{"name": "chest", "flagged_out_of_distribution": 0.984},
              {"name": "non-MR DICOM", "flagged_out_of_distribution": 0.711}]
    good = {"accuracy": 0.95, "macro_f1": 0.95, "macro_auc": 0.99, "ece": 0.02,
            "ood": {"auroc": 0.999, "probe_sets": probes[:1]}}
    assert judge(good, config.evaluation)["blessed"]
    verdict = judge({**good, "ood": {"auroc": 0.999, "probe_sets": probes}}, config.evaluation)
    assert not verdict["blessed"]
    assert verdict["reasons"] == ["the OOD guard flags only 0.7110 of probe set non-MR DICOM, below 0.9000"]
    unmeasured = judge({**good, "ood": {"auroc": None, "probe_sets": []}}, config.evaluation)
    assert not unmeasured["blessed"] and "pass --ood DIR" in unmeasured["reasons"][0]


def test_gate_checks_ece_and_ood_auroc():
    from medpipe.config import load_config
    from models.gate import judge

    config = load_config(ROOT / "config" / "brain_mri.yaml", ["evaluation.thresholds.min_ood_auroc=0.99"])
    good = {"accuracy": 0.95, "macro_f1": 0.95, "macro_auc": 0.99, "ece": 0.02,
            "ood": {"auroc": 0.995, "probe_sets": [{"name": "chest"}]}}
    assert judge(good, config.evaluation)["blessed"]
    verdict = judge({**good, "ece": 0.08, "ood": {"auroc": None, "probe_sets": []}}, config.evaluation)
    assert not verdict["blessed"]
    assert any("ece 0.0800 is above the maximum 0.0500" in r for r in verdict["reasons"])
    assert any("--ood" in r for r in verdict["reasons"])
    ece_check = next(c for c in verdict["checks"] if c["metric"] == "ece")
    assert ece_check["direction"] == "max" and ece_check["passed"] is False
    ungated = load_config(ROOT / "config" / "chest_xray.yaml")
    assert not any(c["metric"] in ("ece", "ood_auroc") for c in judge(good, ungated.evaluation)["checks"])


def test_rows_say_outside_intended_use_and_accept_old_models():
    from serving.client import OUTSIDE_INTENDED_USE, rows

    outputs = {"probabilities": np.array([[0.7, 0.3], [0.2, 0.8]]), "class_ids": np.array([0, 1]),
               "class_names": np.array([b"a", b"b"], dtype=object)}
    old = rows(outputs, 3, "rid")  # a model exported before the guard: no OOD information
    assert [r["class"] for r in old] == ["a", "b"] and old[0]["in_distribution"] is None
    new = rows({**outputs, "ood_score": np.array([1.0, 9.0], np.float32),
                "in_distribution": np.array([True, False])}, 4, "rid")
    assert new[0]["finding"] == "a" and new[0]["confidence"] == pytest.approx(0.7)
    assert new[1]["finding"] == OUTSIDE_INTENDED_USE and new[1]["class"] is None
    assert new[1]["probabilities"] is None and new[1]["ood_score"] == pytest.approx(9.0)


# ---- the acceptance test ---------------------------------------------------------------------------------------
# The session's tiny model (width 8, 3 epochs, 8 test slices) keeps 7 of its 8 test slices: one miss is 12.5%. With
# 15% of the sample for val and for test and a slightly bigger budget, the threshold rests on 22 val slices and the
# held-back test split has 13 (a minute more of CI). The split is by pixel hash: with 22 val slices the threshold is
# val's largest score under any rule, and the near-duplicate groups (ingest.split_groups) move slices between splits
# this small, which once let 5 of the 24 chest X-rays through; tests/test_split_groups.py covers the groups.
GUARDED_SETTINGS = ("image.size=64", "ingest.shards={train: 2, val: 1, test: 1}",
                    "ingest.split={train: 0.7, val: 0.15, test: 0.15}", "ingest.split_groups=null")


@pytest.fixture(scope="module")
def guarded_sample(tmp_path_factory):
    from conftest import overrides, run_module

    base = tmp_path_factory.mktemp("guarded")
    config = str(ROOT / "config" / "brain_mri.yaml")
    run_module("beam_pipelines.ingest", "--config", config, "--input", str(SAMPLE / "brain_mri"),
               "--output", str(base / "ingest"), *overrides(*GUARDED_SETTINGS))
    run_module("models.train", "--config", config, "--data", str(base / "ingest"), "--output", str(base / "run"),
               *overrides(*GUARDED_SETTINGS, "training.epochs=6", "training.width=16"))
    return base / "run", base / "ingest"


@pytest.mark.slow
def test_published_sample_model_flags_chest_xrays_and_keeps_brain_mri(guarded_sample, tmp_path):
    """Trained on the sample, published, served: >= 90% of the 24 sample chest X-rays answer in_distribution=false
    and >= 90% of the held-back brain MRI slices (the test split: never trained on, not used for the threshold)
    answer true, over gRPC."""
    import tensorflow as tf

    trained_sample_run, ingested_sample = guarded_sample

    from medpipe.config import load_config
    from serving.client import OUTSIDE_INTENDED_USE, predict_files, predict_images
    from test_serving import MODEL, publish, start_server, stop_server

    chest = sorted(p for p in (SAMPLE / "chest_xray").rglob("*") if p.is_file() and p.suffix.lower() in
                   (".jpeg", ".jpg", ".png"))
    assert len(chest) == 24
    held_back = [example.numpy() for example in tf.data.TFRecordDataset(
        sorted(str(p) for p in ingested_sample.glob("test-*.tfrecord.gz")), compression_type="GZIP")]
    pngs = [tf.train.Example.FromString(record).features.feature["image/encoded"].bytes_list.value[0]
            for record in held_back]
    assert len(pngs) >= 5, "the sample's test split is the held-back set"

    version = publish(trained_sample_run, tmp_path / "models", "--label", "stable")
    process, grpc_address, _ = start_server(tmp_path / "models", tmp_path)
    try:
        config = load_config(trained_sample_run / "config.yaml")
        chest_rows = list(predict_files([str(p) for p in chest], config, MODEL, server=grpc_address, label="stable"))
        brain_rows = predict_images(grpc_address, MODEL, pngs, label="stable")
    finally:
        stop_server(process)
    assert all(r["model_version"] == version for r in chest_rows + brain_rows)
    flagged = [r["in_distribution"] is False for r in chest_rows]
    kept = [r["in_distribution"] is True for r in brain_rows]
    assert np.mean(flagged) >= 0.9, f"only {sum(flagged)}/{len(flagged)} chest X-rays flagged: {chest_rows}"
    assert np.mean(kept) >= 0.9, f"only {sum(kept)}/{len(kept)} held-back MRI slices kept: {brain_rows}"
    assert all(r["finding"] == OUTSIDE_INTENDED_USE and r["class"] is None for r in chest_rows
               if r["in_distribution"] is False)
    chest_scores = [r["ood_score"] for r in chest_rows]
    assert min(chest_scores) > 0 and np.median(chest_scores) > max(r["ood_score"] for r in brain_rows if
                                                                   r["in_distribution"])


@pytest.mark.slow
def test_model_card_and_evaluate_ood_report(trained_sample_run, ingested_sample, tmp_path):
    """`medpipe evaluate --ood` (a folder and an ingest output) writes ECE before/after, the OOD AUROC and
    retention into metrics.json, the reliability diagram, and the model card section; the card's numbers are the
    run's own files."""
    from conftest import run_module

    run = tmp_path / "run"
    shutil.copytree(trained_sample_run, run)
    out = tmp_path / "eval"
    args = ("--model", str(run), "--data", str(ingested_sample), "--output", str(out), "--ood",
            str(SAMPLE / "chest_xray"), "--ood", str(ingested_sample), "--set", "evaluation.bootstrap_samples=50",
            "--set", "evaluation.gradcam_per_class=1")
    try:
        run_module("models.evaluate", *args)
    except pytest.fail.Exception:  # exit 3 = evaluated, not blessed: the tiny sample model may not pass the gate
        assert not json.loads((out / "blessing.json").read_text())["blessed"]
    metrics = json.loads((out / "metrics.json").read_text())
    calibration = json.loads((run / "calibration.json").read_text())
    assert metrics["temperature"] == pytest.approx(calibration["temperature"])
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_uncalibrated"] <= 1
    assert metrics["predictions_unchanged_by_calibration"] == 1.0
    ood = metrics["ood"]
    ingested_name = f"{ingested_sample.parent.name}/{ingested_sample.name}"
    assert [p["name"] for p in ood["probe_sets"]] == ["sample_data/chest_xray", ingested_name]
    assert ood["probe_sets"][0]["examples"] == 24
    assert ood["threshold"] == pytest.approx(json.loads((run / "ood.json").read_text())["threshold"], rel=1e-6)
    assert 0 <= ood["retention"] <= 1 and ood["probe_sets"][0]["auroc"] > 0.9
    assert (out / "plots" / "reliability.png").is_file() and (out / "plots" / "ood_scores.png").is_file()
    # study-level figures with the run's own study rule (k normal + 0 or 1 abnormal images, k = 1..20)
    study = metrics["study"]
    rule = json.loads((run / "study_rule.json").read_text())
    assert study["rule"] == "abnormal_first" and study["operating_point"] == rule["operating_point"]
    assert sorted(map(int, study["sizes"])) == list(range(1, 21))
    assert all(0 <= row["sensitivity"] <= 1 and 0 <= row["specificity"] <= 1 for row in study["sizes"].values())
    assert study["min_sensitivity"] == min(row["sensitivity"] for row in study["sizes"].values())
    page = (out / "report.html").read_text()
    for text in ("Model card", "Intended use", "Known limits", "ECE before calibration", "chest_xray", "Studies"):
        assert text in page
    assert "Where the model looked (Grad-CAM)" in page
