"""Typed configuration: every shipped config loads; mistakes name the file and the key."""

from pathlib import Path

import pytest

from medpipe.config import TaskConfig, config_from_dict, dump_config, load_config
from medpipe.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# task configs are the YAML files with a top-level `task:`; config/ also holds the gateway's and the PACS road's own
TASK_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if "\ntask:" in "\n" + p.read_text())


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, TaskConfig)
    assert config.num_classes == len(config.labels) >= 2
    assert config.source == str(path)


def test_brain_mri_values_and_bare_name_lookup():
    config = load_config("brain_mri")
    assert config.labels == ("glioma", "meningioma", "notumor", "pituitary")
    assert config.task == "multiclass"
    assert (config.image.size, config.image.channels) == (160, 1)
    assert config.ingest.split.train == pytest.approx(0.8)
    assert load_config("chest_xray").task == "binary"


def test_overrides_are_typed():
    config = load_config("brain_mri", ["training.epochs=3", "image.size=64", "dicom.window={center: 40, width: 80}"])
    assert config.training.epochs == 3
    assert config.image.size == 64
    assert (config.dicom.window.center, config.dicom.window.width) == (40.0, 80.0)
    assert config.training.learning_rate == pytest.approx(0.002)  # untouched keys keep the file's value


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochz=3", "unknown key training.epochz"),
        ("training.epochs=three", "training.epochs must be an integer"),
        ("training.model=vgg", "training.model is 'vgg'; expected one of"),
        ("image.channels=2", "image.channels must be 1"),
        ("ingest.split={train: 0.9, val: 0.2, test: 0.1}", "ingest.split ratios must be >= 0 and sum to 1"),
        ("labels=[a]", "at least 2 labels"),
        ("training.epochs", "must look like section.key=value"),
    ],
)
def test_mistakes_name_the_file_and_key(override, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config("brain_mri", [override])
    assert message in str(excinfo.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: x\ntask: binary\n")
    with pytest.raises(ConfigError, match="missing required key labels"):
        load_config(missing)


def test_resolved_config_round_trips(tmp_path):
    config = load_config("chest_xray", ["training.epochs=2"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() | {"source": ""} == config.to_dict() | {"source": ""}
    assert config_from_dict(config.to_dict()).training.epochs == 2


def test_config_is_frozen():
    config = load_config("brain_mri")
    with pytest.raises(AttributeError):
        config.training.epochs = 5  # type: ignore[misc]


def test_a_run_config_with_the_retired_serving_keys_still_loads():
    """serving.grpc_port/rest_port/max_request_mb/batching configured nothing and went; a run trained before keeps
    them in its config.yaml, which must still load (the keys are ignored), while other unknown keys are refused."""
    old = ["serving.grpc_port=8500", "serving.rest_port=8501", "serving.max_request_mb=16",
           "serving.batching={enabled: true, max_batch_size: 32}"]
    assert not hasattr(load_config("brain_mri", old).serving, "grpc_port")
    with pytest.raises(ConfigError, match="unknown key serving.port"):
        load_config("brain_mri", ["serving.port=8500"])
