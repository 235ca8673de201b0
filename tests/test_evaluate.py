"""medpipe evaluate end to end: a training run on the ingested records and the published SavedModel on the raw
images give the same predictions for the same images; the report renders; the gate compares against `stable`."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SAMPLE, SAMPLE_OVERRIDES, overrides, run_module

pytestmark = pytest.mark.slow

LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
FAST = overrides(*SAMPLE_OVERRIDES, "evaluation.bootstrap_samples=100")


def _pixel_key(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def _sharpen(run_dir: Path, data_dir: Path) -> None:
    """The shared fixture trains 3 epochs only and its best checkpoint predicts nearly the same for every image,
    which would make 'same predictions' trivially true. Fit the run's own model further on the train records
    (same run layout) so predictions differ from image to image."""
    import keras

    from medpipe.config import load_config
    from models.evaluate import load_records
    from models.train import load_run

    model, _, _ = load_run(run_dir)
    train = load_records(data_dir, "train", load_config(run_dir / "config.yaml"))
    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(train.images, train.labels, epochs=3, batch_size=16, verbose=0)
    # a handful of steps barely moves the batch-norm moving statistics (momentum 0.99): set them from the
    # whole train split in one pass, as inference needs them
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(train.images, training=True)
    model.save(run_dir / "model.keras")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_sample_run, ingested_sample):
    from medpipe.config import load_config
    from medpipe.imaging import preprocess_file
    from models.evaluate import load_records

    work = tmp_path_factory.mktemp("evaluate")
    run = work / "run"
    shutil.copytree(trained_sample_run, run)  # evaluate writes into the run: keep the shared fixture pristine
    _sharpen(run, ingested_sample)

    # the trial: a model the gate does not bless exits 3 ("not blessed"), not 0
    result = run_module("models.evaluate", "--model", str(run), "--data", str(ingested_sample), "--split", "test",
                        *FAST, expect=3)
    assert "NOT BLESSED" in result.stdout
    repository = work / "repository"
    from models.evaluate import main as evaluate_main
    from serving.publish import main as publish_main

    # in-process from here on (TensorFlow is loaded already); the subprocess above proves the command line
    assert publish_main(["--run", str(run), "--repository", str(repository), "--model-name", "brain_mri",
                         "--label", "stable", "--force"]) == 0
    (version_dir,) = [p for p in (repository / "brain_mri").iterdir() if p.name.isdigit()]

    # The raw files behind the test records, found by their preprocessed pixels, copied as class folders.
    config = load_config(ROOT / "config" / "brain_mri.yaml", SAMPLE_OVERRIDES)
    test = load_records(ingested_sample, "test", config)
    record_keys = {source_id: _pixel_key(image) for source_id, image in zip(test.ids, test.images)}
    wanted = set(record_keys.values())
    folder = work / "external"
    file_keys = {}
    for path in sorted((SAMPLE / "brain_mri").rglob("*.*")):
        key = _pixel_key(preprocess_file(path, config).pixels)
        if key in wanted and key not in file_keys.values():
            target = folder / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            file_keys[f"{path.parent.name}/{path.name}"] = key
    assert evaluate_main(["--model", str(version_dir), "--images", str(folder), "--config", "brain_mri",
                          "--output", str(work / "savedmodel_eval"), *FAST]) == 3  # evaluated, not blessed
    return {"run": run, "records_eval": run / "evaluation", "images_eval": work / "savedmodel_eval",
            "record_keys": record_keys, "file_keys": file_keys, "repository": repository, "data": ingested_sample,
            "version_dir": version_dir}


def _predictions(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def test_savedmodel_on_raw_images_equals_run_on_records(evaluated):
    by_record = _predictions(evaluated["records_eval"] / "predictions.csv")
    by_file = _predictions(evaluated["images_eval"] / "predictions.csv")
    record_keys, file_keys = evaluated["record_keys"], evaluated["file_keys"]
    assert set(by_record) == set(record_keys) and len(by_record) >= 8
    # every test record's raw file was found: preprocess_file gives exactly the pixels ingest stored
    assert sorted(file_keys.values()) == sorted(set(record_keys.values()))
    assert len(by_file) == len(file_keys)

    key_to_record = {key: by_record[source_id] for source_id, key in record_keys.items()}
    columns = [f"p_{label}" for label in LABELS]
    record_probs, file_probs = [], []
    for name, key in file_keys.items():
        record, file_row = key_to_record[key], by_file[name]
        assert file_row["true"] == record["true"]
        assert file_row["predicted"] == record["predicted"], name
        record_probs.append([float(record[c]) for c in columns])
        file_probs.append([float(file_row[c]) for c in columns])
    record_probs, file_probs = np.array(record_probs), np.array(file_probs)
    np.testing.assert_allclose(file_probs, record_probs, atol=2e-5)
    assert record_probs.std(axis=0).max() > 0.01, "predictions do not vary: the comparison would prove nothing"

    records_metrics = json.loads((evaluated["records_eval"] / "metrics.json").read_text())
    images_metrics = json.loads((evaluated["images_eval"] / "metrics.json").read_text())
    assert images_metrics["confusion_matrix"] == records_metrics["confusion_matrix"]
    assert images_metrics["accuracy"] == pytest.approx(records_metrics["accuracy"])


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.parametrize("which", ["records_eval", "images_eval"])
def test_report_renders_with_every_image_embedded(evaluated, which):
    page = (evaluated[which] / "report.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    parser.close()
    text = " ".join(parser.text)
    plots = 3 + (len(LABELS) if which == "records_eval" else 0)  # Grad-CAM for Keras runs only
    assert len(parser.sources) >= plots
    for source in parser.sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), "images must be embedded (self-contained page)"
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):])))
        image.load()
        assert image.format == "PNG" and min(image.size) > 50
    metrics = json.loads((evaluated[which] / "metrics.json").read_text())
    for label in LABELS:
        assert label in text
    assert metrics["model"]["fingerprint"] in text and metrics["data"]["fingerprint"] in text
    assert "quality gate" in text and "Sensitivity" in text


def test_outputs_and_blessing(evaluated):
    out = evaluated["records_eval"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == len(evaluated["record_keys"])
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_examples"]
    assert set(metrics["per_class"]) == set(LABELS)
    low, high = metrics["confidence_intervals"]["accuracy"]
    assert low <= metrics["accuracy"] <= high
    blessing = json.loads((out / "blessing.json").read_text())
    assert json.loads((evaluated["run"] / "blessing.json").read_text()) == blessing  # what publish checks
    assert blessing["blessed"] is False  # a few epochs on 73 images cannot reach 0.90 accuracy
    assert all(c["kind"] == "absolute" for c in blessing["checks"])  # no --baseline-repository: first model
    stored = json.loads((evaluated["version_dir"] / "assets.extra" / "medpipe_metrics.json").read_text())
    assert stored["accuracy"] == metrics["accuracy"]  # publish ships the metrics the gate reads as `stable`


def test_gate_compares_with_the_stable_version(evaluated, tmp_path):
    """The stable SavedModel predicts the same records; the paired comparison of a model with itself has a
    difference of exactly 0. With fewer records than evaluation.min_paired_examples: insufficient evidence."""
    from models.evaluate import main

    assert main(["--model", str(evaluated["run"]), "--data", str(evaluated["data"]),
                 "--output", str(tmp_path / "again"), "--baseline-repository", str(evaluated["repository"]),
                 "--model-name", "brain_mri", "--no-gradcam", *FAST, "--set", "evaluation.min_paired_examples=5"]) == 3
    blessing = json.loads((tmp_path / "again" / "blessing.json").read_text())
    paired = [c for c in blessing["checks"] if c["kind"] == "non_inferiority"]
    assert {c["metric"] for c in paired} == {"accuracy", "macro_f1", "macro_auc"}
    assert all(c["passed"] and c["difference"] == c["lower"] == 0 for c in paired)  # the same model
    assert blessing["comparison"]["mcnemar"] == {"candidate_only_correct": 0, "baseline_only_correct": 0,
                                                 "p_value": 1.0}
    assert blessing["metrics"]["stable"] == blessing["metrics"]["candidate"]
    assert blessing["baseline"]["version"] == int(evaluated["version_dir"].name)
    assert "Paired with the stable model on" in (tmp_path / "again" / "report.html").read_text()

    assert main(["--model", str(evaluated["run"]), "--data", str(evaluated["data"]),
                 "--output", str(tmp_path / "few"), "--baseline-repository", str(evaluated["repository"]),
                 "--model-name", "brain_mri", "--no-gradcam", *FAST]) == 3
    few = json.loads((tmp_path / "few" / "blessing.json").read_text())
    assert few["verdict"] == "insufficient_evidence" and few["comparison"]["n"] < 50
    assert not [c for c in few["checks"] if c["kind"] != "absolute"]


def test_gate_evaluates_the_stable_savedmodel_when_it_has_no_stored_metrics(evaluated, tmp_path):
    from models.evaluate import main

    repository = tmp_path / "repository"
    shutil.copytree(evaluated["repository"], repository)
    version = evaluated["version_dir"].name
    (repository / "brain_mri" / version / "assets.extra" / "medpipe_metrics.json").unlink()
    assert main(["--model", str(evaluated["run"]), "--data", str(evaluated["data"]), "--output", str(tmp_path / "out"),
                 "--baseline-repository", str(repository), "--no-gradcam", *FAST]) == 3  # name from serving.model_name
    blessing = json.loads((tmp_path / "out" / "blessing.json").read_text())
    # the stable SavedModel, evaluated here on the same records, scores what the run scores
    assert blessing["metrics"]["stable"]["accuracy"] == pytest.approx(blessing["metrics"]["candidate"]["accuracy"])
    assert blessing["metrics"]["stable"]["macro_auc"] == pytest.approx(blessing["metrics"]["candidate"]["macro_auc"],
                                                                       abs=1e-6)


def test_binary_threshold_is_chosen_on_val_and_stored_with_the_run(tmp_path):
    """Binary task: the operating threshold comes from the val split (Youden) and lands in the run directory."""
    import keras

    from medpipe.config import dump_config, load_config
    from models.architectures import build_model

    settings = ("image.size=32", "ingest.split={train: 0.2, val: 0.4, test: 0.4}",
                "ingest.shards={train: 1, val: 1, test: 1}", "training.width=4", "evaluation.bootstrap_samples=50",
                # a folder has no patients, so no shift-aware holdout (tests/test_shift_split.py covers it)
                "ingest.shift_holdout=null", "evaluation.threshold_split=val", "evaluation.gate_split=test",
                "training.validation_split=val")
    data = tmp_path / "chest"
    run_module("beam_pipelines.ingest", "--config", str(ROOT / "config" / "chest_xray.yaml"),
               "--input", str(SAMPLE / "chest_xray"), "--output", str(data), *overrides(*settings))
    run = tmp_path / "run"  # an untrained model in the run layout: the threshold logic does not need a good model
    run.mkdir()
    config = load_config(ROOT / "config" / "chest_xray.yaml", settings)
    dump_config(config, run / "config.yaml")
    shutil.copyfile(data / "schema.json", run / "schema.json")
    keras.utils.set_random_seed(1)
    build_model(config, 1).save(run / "model.keras")

    from models.evaluate import load_records, main, open_model
    from models.metrics import choose_threshold

    assert main(["--model", str(run), "--data", str(data), "--no-gradcam"]) in (0, 3)  # untrained: any verdict
    val = load_records(data, "val", config)
    assert 0 < val.labels.sum() < len(val.labels), "the val split needs both classes for this test"
    expected = choose_threshold(val.labels, open_model(run).predict(val.images)[:, 1], "youden")
    stored = json.loads((run / "operating_point.json").read_text())
    assert stored["threshold"] == pytest.approx(expected["threshold"]) and stored["split"] == "val"
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["operating_point"]["threshold"] == pytest.approx(expected["threshold"])
    assert "val split" in metrics["operating_point"]["chosen_on"]
    assert (run / "blessing.json").is_file()
