"""Typed task configuration, loaded from one commented YAML file at an entry point (never at import).

`load_config("config/brain_mri.yaml", overrides=["training.epochs=3"])` returns a frozen `TaskConfig`.
An unknown key, a wrong type or a missing file raises `ConfigError` naming the file and the dotted key, so a
typo in a YAML file fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from medpipe.errors import ConfigError

TaskType = Literal["multiclass", "binary", "multilabel"]
SPLITS = ("train", "val", "test")
# Shift-aware splits: patients held out by acquisition order (ingest.shift_holdout), never carved at random.
SHIFT_SPLITS = ("val_shift", "test_shift")
GATE_SPLITS = ("test", "test_shift")  # held out from every choice: the only splits whose verdict publishes

# The repository's config folder; entry points use it to resolve a bare name such as "brain_mri".
CONFIG_DIR = Path(os.environ.get("MEDPIPE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "config"))


@dataclass(frozen=True)
class ImageConfig:
    size: int = 128
    channels: int = 1


@dataclass(frozen=True)
class WindowConfig:
    center: float
    width: float


@dataclass(frozen=True)
class DicomConfig:
    window: Optional[WindowConfig] = None
    # no configured or header window: min..max (BENCHMARKS.md dicom_parity: 0.5/99.5 changed 8 of 80 answers)
    voi_percentiles: tuple[float, float] = (0.0, 100.0)
    multiframe: Literal["middle", "max"] = "middle"


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1


@dataclass(frozen=True)
class ShardConfig:
    train: int = 4
    val: int = 1
    test: int = 1

    def of(self, split: str) -> int:
        """Files per split; the shift-aware splits (a few hundred images) get one each."""
        return getattr(self, split, 1)


@dataclass(frozen=True)
class ShiftHoldoutConfig:
    """Shift-aware validation: a patient whose ID matches `pattern` (group 1 = acquisition series, group 2 = its
    running number) and whose number is below the series' cut in `before` is held out of training, in val_shift or
    test_shift (half each, by the salted patient hash). Running numbers follow acquisition order, so a cut holds out
    a series' earliest acquisitions, and a cut above its last number the whole batch: data the model meets the way
    it meets new patients, not a random carve."""

    pattern: str
    before: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SplitGroupsConfig:
    """Near-duplicate-aware splits: images whose perceptual hashes (64-bit DCT pHash of the preprocessed pixels) lie
    within `max_distance` bits of each other, directly or through a chain, share one split, so a slice and its
    re-exported, re-windowed or resized copy never land on both sides of the train/test line. Patient IDs still
    win: a record with a patient pseudonym is split by patient."""

    method: Literal["phash"] = "phash"
    max_distance: int = 4  # Hamming bits; brain MRI: 4 finds 716 groups (2,248 images), 8 chains 1,949 into one


@dataclass(frozen=True)
class IngestConfig:
    min_size: int = 32
    max_pixels: int = 50_000_000
    max_file_mb: int = 512
    split: SplitConfig = field(default_factory=SplitConfig)
    split_salt: str = "medpipe-split-v1"
    shards: ShardConfig = field(default_factory=ShardConfig)
    shift_holdout: Optional[ShiftHoldoutConfig] = None
    split_groups: Optional[SplitGroupsConfig] = None  # null: split by patient, else by exact pixel hash


@dataclass(frozen=True)
class AugmentationConfig:
    horizontal_flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    shift: float = 0.05
    contrast: float = 0.1


@dataclass(frozen=True)
class FineTuneConfig:
    """Two-stage transfer learning: `warmup_epochs` with the `freeze` part of the backbone frozen, then the whole
    model at `unfreeze_learning_rate` for the remaining epochs."""

    freeze: float | str = 1.0  # fraction of the backbone's layers from the input (0..1], or the last frozen layer's name
    warmup_epochs: int = 1
    unfreeze_learning_rate: float = 0.00001


@dataclass(frozen=True)
class TrainingConfig:
    model: Literal["compact_cnn", "efficientnet_b0", "resnet50", "densenet121", "mobilenet"] = "compact_cnn"
    weights: Literal["none", "imagenet"] = "none"
    backbone_weights: Optional[str] = None  # a local .weights.h5 / .keras / keras.applications *_notop.h5 file
    fine_tune: Optional[FineTuneConfig] = None
    width: int = 32
    dropout: float = 0.2
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 0.001
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0001
    label_smoothing: float = 0.0
    early_stopping_patience: int = 8
    monitor: str = "val_accuracy"
    class_weights: Literal["balanced", "none"] = "balanced"
    seed: int = 42
    mixed_precision: bool = True
    shuffle_buffer: int = 2048
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    # the training window over the dataset's ingested partitions (medpipe/window.py): all | {last: N} | [names]
    partitions: Any = "all"
    include_feedback: bool = True  # always add the `feedback*` partitions (confirmed labels) to the window
    validation_split: Literal["val", "val_shift"] = "val"  # what `monitor` (early stopping, best epoch) reads


@dataclass(frozen=True)
class GateThresholds:
    accuracy: float = 0.9
    macro_f1: float = 0.9
    macro_auc: float = 0.95
    max_ece: Optional[float] = None  # calibrated ECE must be <= this (null: not gated)
    min_ood_auroc: Optional[float] = None  # OOD AUROC over the --ood probe sets must be >= this (null: not gated)
    min_study_sensitivity: Optional[float] = None  # lowest study-level sensitivity over k = 1..20 (null: not gated)
    min_study_specificity: Optional[float] = None  # lowest study-level specificity over k = 1..20 (null: not gated)
    # every --ood probe set must have at least this share flagged at the model's threshold (null: not gated)
    min_ood_flagged: Optional[float] = None


@dataclass(frozen=True)
class RegressionMargins:
    """Per-metric non-inferiority margins (evaluation.max_regression as a mapping)."""
    accuracy: float = 0.02
    macro_f1: float = 0.02
    macro_auc: float = 0.02


@dataclass(frozen=True)
class EvaluationConfig:
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    # non-inferiority margin against `stable`: one number for every gated metric, or {accuracy:, macro_f1:, macro_auc:}
    max_regression: float | RegressionMargins = 0.02
    # below this many examples (paired, the same images for both models) the gate says "insufficient evidence"
    min_paired_examples: int = 50
    binary_threshold: Literal["youden", "target_sensitivity"] = "youden"
    target_sensitivity: float = 0.95
    bootstrap_samples: int = 1000
    calibration_bins: int = 10
    gradcam_per_class: int = 2
    ood_retention: float = 0.99  # share of the val split the OOD threshold keeps in distribution
    # null: the threshold is val's ood_retention quantile; C: it keeps ood_retention of new scans with probability C
    ood_retention_confidence: Optional[float] = None
    threshold_split: Literal["val", "val_shift"] = "val"  # where the binary operating threshold is chosen
    gate_split: Literal["test", "test_shift"] = "test"  # the split whose verdict blesses a run for publishing
    # the label meaning "no finding": tasks with one decide a study abnormal-first (medpipe/study.py); null = none
    normal_class: Optional[str] = None
    study_sensitivity: float = 0.98  # image-level sensitivity the study operating point keeps on the val split


@dataclass(frozen=True)
class ServingConfig:
    model_name: str = "medpipe"
    version_policy: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1


@dataclass(frozen=True)
class TaskConfig:
    name: str
    task: TaskType
    labels: tuple[str, ...]
    image: ImageConfig = field(default_factory=ImageConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    source: str = ""  # the file it was loaded from (set by load_config, not by YAML)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits ingest writes: train/val/test, plus the shift-aware pair when a holdout rule is set."""
        return SPLITS + SHIFT_SPLITS if self.ingest.shift_holdout is not None else SPLITS


def is_config_name(value: str | os.PathLike) -> bool:
    """The one rule for a bare config name ("brain_mri") as opposed to a path: no folder, no YAML suffix."""
    return os.sep not in str(value) and Path(value).suffix not in (".yaml", ".yml")


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path as given, or a bare name ("brain_mri") looked up in the repository's config folder."""
    path = Path(name_or_path)
    return CONFIG_DIR / f"{name_or_path}.yaml" if is_config_name(name_or_path) and not path.exists() else path


def load_yaml(text: str) -> Any:
    """YAML as an operator types it into a config file or a `--set`: safe_load, except that dates stay the strings
    they were typed as. No config key is a date, and partition names are (`training.partitions=[2026-11-24]`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                           if tag != "tag:yaml.org,2002:timestamp"]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TaskConfig:
    """Load, override and validate a task config. Raises ConfigError naming the file and key on any problem."""
    import yaml  # PyYAML: imported here so `import medpipe.config` stays cheap

    file = resolve_config_path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist (pass --config with a YAML file from config/)")
    try:
        raw = load_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, file, yaml)
    raw["source"] = str(file)
    config = _build(TaskConfig, raw, str(file), "")
    _check_consistency(config, str(file))
    return config


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>") -> TaskConfig:
    """Build a TaskConfig from a plain dict (e.g. the resolved config.yaml saved in a run directory)."""
    config = _build(TaskConfig, dict(raw), origin, "")
    _check_consistency(config, origin)
    return config


def dump_config(config: TaskConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (what a run actually used, for reproducibility)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def replace(config: TaskConfig, **sections: Any) -> TaskConfig:
    """dataclasses.replace for a frozen config, re-validated."""
    new = dataclasses.replace(config, **sections)
    _check_consistency(new, new.source or "<replace>")
    return new


# ----------------------------------------------------------------------------------------------------------------
def set_flags(overrides: Sequence[str]) -> list[str]:
    """["a.b=1", ...] -> ["--set", "a.b=1", ...]: overrides passed on to a stage's command line, checked first."""
    return [arg for override in overrides for arg in ("--set", _checked(override))]


def _checked(override: str) -> str:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. training.epochs=3)")
    return override


def _apply_override(raw: dict, override: str, file: Path, yaml: Any) -> None:
    dotted, _, text = _checked(override).partition("=")
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or an optional section left null (e.g. training.fine_tune)
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key} in {file} is not a section")
    try:
        node[keys[-1]] = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {exc}") from exc


# keys that configured nothing (the server's ports, limits and batching are its flags and batching.config): still
# accepted, and ignored, so the config.yaml of a run trained before they went loads
RETIRED = {"serving.grpc_port", "serving.rest_port", "serving.max_request_mb", "serving.batching"}


def _build(cls: type, raw: Any, file: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(key for key in set(raw) - names if f"{prefix}.{key}" not in RETIRED)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{file}: unknown key {where}{unknown[0]} (known keys here: {', '.join(sorted(names - {'source'}))})"
        )
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], file, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{file}: missing required key {key}")
    return cls(**values)


def _coerce(tp: Any, value: Any, file: str, key: str) -> Any:
    if tp is Any:  # a free-form value validated by _check_consistency (e.g. training.partitions)
        return tuple(value) if isinstance(value, list) else value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:  # e.g. float | str: the first type that accepts the value wins
            try:
                return _coerce(candidate, value, file, key)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, file, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{file}: {key} is {value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, file, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{file}: {key} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{file}: {key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, file, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{file}: {key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{file}: {key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: {key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{file}: {key}: unsupported config type {tp}")  # a bug in a dataclass, not in the YAML


def _check_consistency(config: TaskConfig, file: str) -> None:
    if len(config.labels) < 1 or len(set(config.labels)) != len(config.labels):
        raise ConfigError(f"{file}: labels must be a non-empty list of distinct names, got {list(config.labels)}")
    if config.task == "binary" and len(config.labels) != 2:
        raise ConfigError(f"{file}: task binary needs exactly 2 labels (negative first), got {list(config.labels)}")
    if config.task == "multiclass" and len(config.labels) < 2:
        raise ConfigError(f"{file}: task multiclass needs at least 2 labels")
    if config.image.channels not in (1, 3):
        raise ConfigError(f"{file}: image.channels must be 1 (grey) or 3 (RGB), got {config.image.channels}")
    if not 16 <= config.image.size <= 1024:
        raise ConfigError(f"{file}: image.size must be between 16 and 1024, got {config.image.size}")
    split = config.ingest.split
    total = split.train + split.val + split.test
    if abs(total - 1.0) > 1e-6 or min(split.train, split.val, split.test) < 0:
        raise ConfigError(f"{file}: ingest.split ratios must be >= 0 and sum to 1, got {total:g}")
    groups = config.ingest.split_groups
    if groups is not None and not 0 <= groups.max_distance <= 16:
        raise ConfigError(f"{file}: ingest.split_groups.max_distance must be 0..16 bits of the 64-bit hash, got "
                          f"{groups.max_distance} (above ~10 unrelated slices chain into one group)")
    holdout = config.ingest.shift_holdout
    if holdout is not None:
        try:
            groups = re.compile(holdout.pattern).groups
        except re.error as exc:
            raise ConfigError(f"{file}: ingest.shift_holdout.pattern is not a regular expression: {exc}") from exc
        if groups < 2:
            raise ConfigError(f"{file}: ingest.shift_holdout.pattern needs two groups (series, running number)")
    uses = {"evaluation.threshold_split": config.evaluation.threshold_split,
            "evaluation.gate_split": config.evaluation.gate_split,
            "training.validation_split": config.training.validation_split}
    for key, split in uses.items():
        if split in SHIFT_SPLITS and holdout is None:
            raise ConfigError(f"{file}: {key} is {split} but ingest.shift_holdout is not set, so no such split "
                              f"exists; set ingest.shift_holdout or use {key.split('.')[0]}'s carved split")
    low, high = config.dicom.voi_percentiles
    if not 0 <= low < high <= 100:
        raise ConfigError(f"{file}: dicom.voi_percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    if not 0 < config.evaluation.ood_retention <= 1:
        raise ConfigError(f"{file}: evaluation.ood_retention must be in (0, 1], got {config.evaluation.ood_retention}")
    confidence = config.evaluation.ood_retention_confidence
    if confidence is not None and not 0 < confidence < 1:
        raise ConfigError(f"{file}: evaluation.ood_retention_confidence must be in (0, 1) or null, got {confidence}")
    if config.dicom.window is not None and config.dicom.window.width <= 0:
        raise ConfigError(f"{file}: dicom.window.width must be > 0")
    from medpipe.window import parse_window

    parse_window(config.training.partitions, f"{file}: training.partitions")
    _check_transfer_learning(config.training, file)


def _check_transfer_learning(training: TrainingConfig, file: str) -> None:
    pretrained = training.backbone_weights is not None or training.weights == "imagenet"
    if training.model == "compact_cnn" and (pretrained or training.fine_tune is not None):
        raise ConfigError(f"{file}: training.weights, training.backbone_weights and training.fine_tune apply to "
                          f"keras.applications backbones; training.model is compact_cnn (choose efficientnet_b0, "
                          f"resnet50, densenet121 or mobilenet)")
    if training.backbone_weights is not None and training.weights == "imagenet":
        raise ConfigError(f"{file}: training.weights is imagenet and training.backbone_weights is set; keep one "
                          f"(weights: none with a local backbone_weights file)")
    tune = training.fine_tune
    if tune is None:
        return
    if not pretrained:
        raise ConfigError(f"{file}: training.fine_tune needs pretrained weights: set training.backbone_weights to a "
                          f"local weights file (or weights: imagenet where the network allows it)")
    if isinstance(tune.freeze, float) and not 0 < tune.freeze <= 1:
        raise ConfigError(f"{file}: training.fine_tune.freeze must be a fraction in (0, 1] or a layer name, "
                          f"got {tune.freeze}")
    if not 1 <= tune.warmup_epochs < training.epochs:
        raise ConfigError(f"{file}: training.fine_tune.warmup_epochs must be >= 1 and < training.epochs "
                          f"({training.epochs}) so that both stages run, got {tune.warmup_epochs}")
    if tune.unfreeze_learning_rate <= 0:
        raise ConfigError(f"{file}: training.fine_tune.unfreeze_learning_rate must be > 0")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value
