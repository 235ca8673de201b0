"""`medpipe train` on the real ingested sample: strategy, learning, resume after SIGKILL, seeds, early errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_OVERRIDES, TEST_DEID_KEY, overrides, run_module
from medpipe.errors import DataError

CONFIG = str(ROOT / "config" / "brain_mri.yaml")
# Tiny and quick: 64x64 (the sample's ingest size), width 8, no augmentation noise unless a test wants it.
TINY = (*SAMPLE_OVERRIDES, "training.width=8")


def history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def train_args(data: Path, run_dir: Path, *pairs: str) -> list[str]:
    return ["--config", CONFIG, "--data", str(data), "--output", str(run_dir), *overrides(*TINY, *pairs)]


def test_help_documents_every_option():
    result = run_module("models.train", "--help")
    for option in ("--config", "--data", "--output", "--set", "--epochs", "--cpu-replicas", "--workers", "--cache"):
        assert option in result.stdout


@pytest.mark.parametrize("make_dir", ["missing", "empty"])
def test_missing_or_empty_data_dir_fails_before_training(tmp_path, make_dir):
    from models.train import main

    data = tmp_path / "data"
    if make_dir == "empty":
        data.mkdir()
    with pytest.raises(DataError, match="does not exist" if make_dir == "missing" else "is empty"):
        main(train_args(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_label_count_mismatch_fails_before_training(tmp_path, ingested_sample):
    from models.train import main

    with pytest.raises(DataError, match="labels .* in the data vs .* in the config"):
        main(train_args(ingested_sample, tmp_path / "run", "labels=[glioma, meningioma, notumor]"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mirrored_strategy_over_two_cpu_replicas(tmp_path, ingested_sample):
    run_dir = tmp_path / "run"
    result = run_module("models.train", *train_args(ingested_sample, run_dir, "training.epochs=1"),
                        "--cpu-replicas", "2")
    assert "replicas: 2" in result.stderr
    metadata = json.loads((run_dir / "train_metadata.json").read_text())
    assert metadata["replicas"] == 2
    assert metadata["global_batch_size"] == 2 * 32
    assert metadata["epochs_run"] == 1 and len(history(run_dir)) == 1
    for name in ("config.yaml", "schema.json", "model.keras", "history.csv"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert "epoch 1:" in result.stderr  # plain per-epoch lines when stdout is not a terminal

    from models.train import load_run

    model, config, schema = load_run(run_dir)
    assert model.output.shape[-1] == len(config.labels) == schema.num_classes


@pytest.mark.slow
def test_overfits_32_real_images(tmp_path, ingested_sample):
    """A real learning test: 32 real MRI slices through the real pipeline and model, no regularisation, must be
    fitted to >= 95% training accuracy (the loss must fall, too)."""
    import keras
    import tensorflow as tf

    from medpipe.config import load_config
    from models import data as data_lib
    from models.architectures import build_model

    data = tmp_path / "data32"
    data.mkdir()
    records = tf.data.TFRecordDataset(sorted(str(p) for p in ingested_sample.glob("train-*.tfrecord.gz")),
                                      compression_type="GZIP").take(32)
    with tf.io.TFRecordWriter(str(data / "train-00000-of-00001.tfrecord.gz"), "GZIP") as writer:
        for record in records:
            writer.write(record.numpy())
    (data / "schema.json").write_bytes((ingested_sample / "schema.json").read_bytes())

    config = load_config(CONFIG, [*TINY, "training.width=16", "training.dropout=0.0"])
    schema = data_lib.check_data(data, config, splits=("train",))
    keras.utils.set_random_seed(0)
    model = build_model(config, data_lib.num_outputs(schema))
    model.compile(keras.optimizers.Adam(0.005), "categorical_crossentropy", metrics=["accuracy"])
    train = data_lib.make_dataset(data, "train", schema, 32, training=True, seed=0)  # shuffled, no augmentation
    history = model.fit(train, epochs=40, verbose=0, shuffle=False).history
    assert max(history["accuracy"][-3:]) >= 0.95, history["accuracy"]
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]


@pytest.mark.slow
def test_sigkilled_run_resumes_from_backup(tmp_path, ingested_sample):
    epochs = 8
    run_dir = tmp_path / "run"
    args = train_args(ingested_sample, run_dir, f"training.epochs={epochs}", "training.early_stopping_patience=100")
    env = {**os.environ, "MEDPIPE_DEID_KEY": TEST_DEID_KEY}
    process = subprocess.Popen([sys.executable, "-m", "models.train", *args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (run_dir / "history.csv").is_file() and len(history(run_dir)) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "training finished (or failed) before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_after = len(history(run_dir))
    assert 2 <= killed_after < epochs
    assert (run_dir / "backup").is_dir()

    result = run_module("models.train", *args)  # the same command
    metadata = json.loads((run_dir / "train_metadata.json").read_text())
    assert "resuming from" in result.stderr
    assert metadata["resumed_from_epoch"] >= 1
    assert metadata["epochs_this_invocation"] <= epochs - 1  # it did not start over
    rows = history(run_dir)
    assert int(rows[-1]["epoch"]) == epochs - 1
    assert not (run_dir / "backup").exists()  # BackupAndRestore deletes its checkpoint once the run finished


@pytest.mark.slow
def test_two_seeded_runs_have_the_same_first_epoch_loss(tmp_path, ingested_sample):
    losses = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_module("models.train", *train_args(ingested_sample, run_dir, "training.epochs=1"))
        losses.append(float(history(run_dir)[0]["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)


def test_short_runs_settle_batch_norm_within_an_epoch(trained_sample_run, ingested_sample):
    """A few-step run (the fixture: ~2 steps an epoch) must not answer the same distribution for every image, which
    is what stacked batch norms with unsettled moving statistics do at inference."""
    import numpy as np

    from models import data as data_lib
    from models.architectures import BN_MOMENTUM, bn_momentum_for
    from models.train import load_run

    assert bn_momentum_for(2) == pytest.approx(0.1)
    assert bn_momentum_for(1000) == BN_MOMENTUM  # full runs keep the recipe's momentum
    model, _, schema = load_run(trained_sample_run)
    images = np.concatenate([batch[0].numpy() for batch in data_lib.make_dataset(ingested_sample, "val", schema, 64)])
    probabilities = model.predict(images, verbose=0)
    assert probabilities.std(axis=0).max() > 0.01, probabilities[:4]
