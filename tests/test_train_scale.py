"""Training at scale: multi-worker MultiWorkerMirroredStrategy from TF_CONFIG, the local launcher, the Kubernetes
recipe, transfer learning from a local backbone weights file with a two-stage fine-tune, and the GPU lock."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, SAMPLE_OVERRIDES, TEST_DEID_KEY, overrides
from medpipe.config import load_config
from medpipe.errors import ConfigError
from models.distributed import Cluster, free_ports, local_tf_configs, parse_tf_config

CONFIG = str(ROOT / "config" / "brain_mri.yaml")
TINY = (*SAMPLE_OVERRIDES, "training.width=8")


# ------------------------------------------------------------------------------------------------------ TF_CONFIG
def test_no_tf_config_is_one_chief():
    assert parse_tf_config(None) == Cluster(workers=1, task_type="worker", task_index=0, is_chief=True)
    assert not parse_tf_config("").multi_worker


def test_tf_config_roles():
    two = {"cluster": {"worker": ["a:1", "b:2"]}}
    first = parse_tf_config(json.dumps({**two, "task": {"type": "worker", "index": 0}}))
    second = parse_tf_config(json.dumps({**two, "task": {"type": "worker", "index": 1}}))
    assert (first.workers, first.is_chief, first.multi_worker) == (2, True, True)
    assert (second.workers, second.is_chief, second.task_index) == (2, False, 1)
    with_chief = {"cluster": {"chief": ["c:0"], "worker": ["a:1"]}}
    assert parse_tf_config(json.dumps({**with_chief, "task": {"type": "chief", "index": 0}})).is_chief
    worker0 = parse_tf_config(json.dumps({**with_chief, "task": {"type": "worker", "index": 0}}))
    assert worker0.workers == 2 and not worker0.is_chief  # the chief task, not worker 0, writes then


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}}', "names ps tasks"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "not a valid index"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', "task.type"),
])
def test_bad_tf_config_is_a_clear_error(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_tf_config(text)


def test_local_cluster_configs_name_every_worker_and_one_chief():
    ports = free_ports(3)
    clusters = [parse_tf_config(text) for text in local_tf_configs(ports)]
    assert len(set(ports)) == 3
    assert [c.task_index for c in clusters] == [0, 1, 2] and [c.is_chief for c in clusters] == [True, False, False]
    assert json.loads(local_tf_configs(ports)[1])["cluster"]["worker"] == [f"localhost:{port}" for port in ports]


def test_kubernetes_recipe_builds_tf_config_from_the_job_index():
    """The indexed Job's shell line, run for real for pod 1 of 2: a TF_CONFIG naming both pods' DNS names."""
    service, job = yaml.safe_load_all((ROOT / "config" / "kubernetes" / "train-multiworker.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    container = pod["containers"][0]
    workers = next(e["value"] for e in container["env"] if e["name"] == "WORKERS")
    assert int(workers) == spec["completions"]
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    export = next(line for line in container["args"][0].splitlines() if "TF_CONFIG" in line)
    env = {**os.environ, "WORKERS": workers, "JOB_COMPLETION_INDEX": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", f"{export}; echo \"$TF_CONFIG\""], env=env, capture_output=True, text=True,
                         check=True).stdout
    cluster = parse_tf_config(out)
    assert (cluster.workers, cluster.task_index, cluster.is_chief) == (2, 1, False)
    assert json.loads(out)["cluster"]["worker"][0] == "medpipe-train-0.medpipe-train:2222"
    assert "medpipe train" in container["args"][0]


def test_strip_option():
    from models.train import strip_option

    assert strip_option(["--config", "c", "--workers", "2", "--epochs", "1"], "--workers") == \
        ["--config", "c", "--epochs", "1"]
    assert strip_option(["--workers=3", "--cache"], "--workers") == ["--cache"]


@pytest.mark.slow
def test_launcher_stops_on_a_failing_worker_and_returns_its_status(tmp_path):
    """The workers start with their TF_CONFIG and fail on missing data: the launcher returns their status."""
    result = subprocess.run([sys.executable, "-m", "models.train", "--config", CONFIG,
                             "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "run"), "--workers", "2"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "TF_CONFIG"})
    assert result.returncode == 2, result.stderr
    # the workers' own error lines go to the command's log file (quiet console), named on its last line
    log_file = Path(re.search(r"log: (\S+)", result.stderr).group(1))
    assert f"data directory {tmp_path / 'missing'} does not exist" in result.stderr + log_file.read_text()
    assert "started worker 1 of 2" in result.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_refuses_an_existing_tf_config(tmp_path, monkeypatch):
    from models.distributed import launch_local_workers

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(ConfigError, match="TF_CONFIG is already set"):
        launch_local_workers(["--config", "x"], 2)


@pytest.mark.slow
def test_two_workers_on_localhost_train_one_run_written_by_the_chief(tmp_path, ingested_sample):
    """Acceptance: two `medpipe train` processes with a two-worker TF_CONFIG, 1 epoch on the sample."""
    run_dir = tmp_path / "run"
    ports = free_ports(2)
    args = ["--config", CONFIG, "--data", str(ingested_sample), "--output", str(run_dir),
            *overrides(*TINY, "training.epochs=1")]
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]
    processes = []
    try:
        for index, tf_config in enumerate(local_tf_configs(ports)):
            env = {**os.environ, "MEDPIPE_DEID_KEY": TEST_DEID_KEY, "TF_CONFIG": tf_config,
                   "TMPDIR": str(tmp_path / f"tmp{index}")}
            (tmp_path / f"tmp{index}").mkdir()
            with logs[index].open("w") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", "medpipe.cli", "train", *args], cwd=ROOT,
                                                  env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[codes.index(max(codes))][-4000:]
    assert "workers: 2 (this process: worker 0 (chief))" in outputs[0]
    assert "workers: 2 (this process: worker 1)" in outputs[1]
    # Both saw the same all-reduced epoch figures (one synchronous model)
    epoch_lines = [re.search(r"epoch 1: (.*) \(", text).group(1) for text in outputs]
    assert epoch_lines[0] == epoch_lines[1]

    written = sorted(path.name for path in run_dir.iterdir())
    assert written == ["calibration.json", "config.yaml", "history.csv", "model.keras", "ood.json", "ood_stats.npz",
                       "schema.json", "study_rule.json", "tensorboard", "train_metadata.json"]
    metadata = json.loads((run_dir / "train_metadata.json").read_text())
    assert metadata["workers"] == 2 and metadata["replicas"] == 2
    assert metadata["strategy"] == "MultiWorkerMirroredStrategy" and metadata["global_batch_size"] == 64
    assert metadata["gpus"] == 0 and metadata["gpu_names"] == []
    # the other worker wrote only into its private temp folder, and removed it at exit
    assert not any((tmp_path / "tmp1").iterdir())
    assert str(tmp_path / "tmp1") in outputs[1]  # its "model in ..." line

    from models.train import load_run

    model, config, schema = load_run(run_dir)
    images = np.zeros((2, config.image.size, config.image.size, config.image.channels), np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, schema.num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- transfer learning
def test_fine_tune_config_and_its_errors(tmp_path):
    weights = str(tmp_path / "b.weights.h5")
    tuned = load_config(CONFIG, ["training.model=efficientnet_b0", f"training.backbone_weights={weights}",
                                 "training.fine_tune.freeze=0.25", "training.fine_tune.warmup_epochs=2"])
    assert tuned.training.fine_tune.freeze == 0.25 and tuned.training.fine_tune.warmup_epochs == 2
    by_name = load_config(CONFIG, ["training.model=efficientnet_b0", f"training.backbone_weights={weights}",
                                   "training.fine_tune={freeze: block3a_expand_conv}"])
    assert by_name.training.fine_tune.freeze == "block3a_expand_conv"
    bad = [
        (["training.model=efficientnet_b0", "training.fine_tune.warmup_epochs=1"], "needs pretrained weights"),
        ([f"training.backbone_weights={weights}"], "apply to keras.applications backbones"),  # compact_cnn
        (["training.weights=/tmp/x.h5"], "training.weights is '/tmp/x.h5'; expected one of"),
        (["training.model=efficientnet_b0", f"training.backbone_weights={weights}", "training.fine_tune.freeze=1.5"],
         "fraction in \\(0, 1\\] or a layer name"),
    ]
    for pairs, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIG, pairs)
    with pytest.raises(ConfigError, match="warmup_epochs must be >= 1 and < training.epochs"):
        load_config(CONFIG, ["training.model=efficientnet_b0", f"training.backbone_weights={weights}",
                             "training.epochs=2", "training.fine_tune.warmup_epochs=2"])


def test_frozen_count():
    from models.architectures import frozen_count

    names = [f"layer{i}" for i in range(10)]
    assert frozen_count(names, 0.5) == 5 and frozen_count(names, 1.0) == 10 and frozen_count(names, 0.01) == 1
    assert frozen_count(names, "layer3") == 4
    with pytest.raises(ConfigError, match="no layer 'layer99'"):
        frozen_count(names, "layer99")


def test_missing_or_mismatched_backbone_weights_are_clear_errors(tmp_path):
    import keras

    from models.architectures import build_model

    small = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, name="conv")])
    small.save_weights(tmp_path / "other.weights.h5")
    (tmp_path / "notes.txt").write_text("not weights")
    cases = {"missing.weights.h5": "does not exist", "other.weights.h5": "does not fit training.model mobilenet",
             "notes.txt": "is not a Keras weights file"}
    for name, message in cases.items():
        config = load_config(CONFIG, ["image.size=32", "training.model=mobilenet",
                                      f"training.backbone_weights={tmp_path / name}"])
        with pytest.raises(ConfigError, match=message):
            build_model(config, 4)


@pytest.mark.slow
def test_fine_tune_from_a_local_backbone_file(tmp_path, ingested_sample, monkeypatch):
    """Acceptance: a backbone's weights saved to a file, then `train` with them and fine_tune. Stage 1 leaves the
    frozen layers exactly as loaded (and BatchNorm statistics untouched: inference mode); stage 2 changes them."""
    import keras

    from models.architectures import BACKBONE_LAYER, build_backbone, frozen_count
    from models.train import train

    from models import data as data_lib
    from models.architectures import BACKBONE_SCALING

    size = 64  # the ingested sample's size
    keras.utils.set_random_seed(7)
    source = build_backbone("mobilenet", size)  # MobileNet v1: the smallest graph of the backbones, quick to trace
    # Stand-in for pretraining: BatchNorm statistics measured on real images (as ImageNet files carry them), so the
    # frozen-statistics network passes signal; with the initial 0/1 statistics its ReLU6 units saturate.
    schema = data_lib.load_schema(ingested_sample)
    grey = next(iter(data_lib.make_dataset(ingested_sample, "train", schema, 64)))[0]
    mean, std = BACKBONE_SCALING["mobilenet"]
    images = (keras.ops.concatenate([grey] * 3, axis=-1) - mean[0]) / std[0]
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode pass sets the moving statistics to this batch's
    source(images, training=True)
    weights_file = tmp_path / "mobilenet_notop.weights.h5"
    source.save_weights(weights_file)
    loaded = [[w.copy() for w in layer.get_weights()] for layer in source.layers]

    snapshots = []
    original_fit = keras.Model.fit

    def recording_fit(self, *args, **kwargs):  # what the backbone holds when each stage's fit returns
        history = original_fit(self, *args, **kwargs)
        snapshots.append([[w.copy() for w in layer.get_weights()] for layer in self.get_layer(BACKBONE_LAYER).layers])
        return history

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    config = load_config(CONFIG, [*SAMPLE_OVERRIDES, "training.model=mobilenet", "training.epochs=2",
                                  f"training.backbone_weights={weights_file}", "training.batch_size=16",
                                  "training.fine_tune={freeze: 0.5, warmup_epochs: 1, unfreeze_learning_rate: 0.0001}"])
    run_dir = tmp_path / "run"
    metadata = train(config, ingested_sample, run_dir)

    assert len(snapshots) == 2 and metadata["epochs_run"] == 2
    layers = source.layers
    count = frozen_count([layer.name for layer in layers], 0.5)
    is_bn = [isinstance(layer, keras.layers.BatchNormalization) for layer in layers]

    def same(snapshot, index):
        return all(np.array_equal(a, b) for a, b in zip(snapshot[index], loaded[index]))

    frozen = [i for i in range(count) if loaded[i] and not is_bn[i]]
    unfrozen = [i for i in range(count, len(layers)) if loaded[i] and not is_bn[i]]
    assert frozen and all(same(snapshots[0], i) for i in frozen)  # stage 1: frozen layers exactly as loaded
    assert not any(same(snapshots[0], i) for i in unfrozen)  # ... while the unfrozen part did train
    unchanged = [layers[i].name for i in frozen if same(snapshots[1], i)]
    assert not unchanged, f"stage 2 left frozen layers unchanged: {unchanged} of {[layers[i].name for i in frozen]}"
    # BatchNorm stays frozen in inference mode throughout: statistics, gamma and beta as loaded
    batch_norms = [i for i in range(len(layers)) if is_bn[i]]
    assert batch_norms and all(same(stage, i) for stage in snapshots for i in batch_norms)
    assert metadata["backbone_weights"] == str(weights_file)
    assert not (run_dir / "backup").exists()  # both stages' backups are gone once the run is complete
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs


# ------------------------------------------------------------------------------------------------------ GPU build
def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def test_gpu_lock_is_the_cpu_lock_with_cuda_tensorflow():
    cpu, gpu = lock_pins(ROOT / "requirements.lock"), lock_pins(ROOT / "requirements-gpu.lock")
    assert gpu.pop("tensorflow[and-cuda]") == cpu.pop("tensorflow-cpu")
    cuda = {name: version for name, version in gpu.items() if name.startswith("nvidia-")}
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-nccl-cu12"} <= set(cuda)
    assert {name: version for name, version in gpu.items() if name not in cuda} == cpu


@pytest.mark.slow
def test_gpu_lock_resolves_with_pip():
    """The whole GPU lock resolves as one set (pip's resolver, package index only; nothing is installed)."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--disable-pip-version-check", "-r", str(ROOT / "requirements-gpu.lock")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
