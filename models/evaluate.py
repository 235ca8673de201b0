"""`medpipe evaluate`: metrics, plots, Grad-CAM, report.html and the quality gate (blessing.json).

    medpipe evaluate --model RUN_DIR --data INGEST_DIR [--split SPLIT] [--output DIR]   # default: the gate's split
    medpipe evaluate --model RUN_DIR_OR_SAVEDMODEL --images FOLDER_OF_CLASS_FOLDERS --output DIR [--config C]
    ... [--baseline-repository REPO --model-name NAME]   # also gate against the model labelled `stable`
    ... [--ood DIR ...]   # out-of-distribution probe sets: folders of images or ingest outputs (repeatable)

MODEL is a training run directory (model.keras + config.yaml + schema.json) or a published SavedModel version
directory (its `predict_preprocessed` signature is called). Ingested records are decoded in the graph by
models.preprocessing (as in training); raw images go through medpipe.imaging.preprocess_file (as in ingest), so
both paths feed the model the same pixels.

The probabilities evaluated are the calibrated ones the SavedModel serves (models.safety); metrics.json also carries
the ECE before calibration, and with --ood the OOD AUROC (probe images against the evaluated split) and the share of
the evaluated split kept in distribution at the model's threshold.

Outputs in DIR (default for a run: RUN_DIR/evaluation for the gate's split, evaluation.gate_split: test, or
test_shift for a task with a shift-aware holdout; RUN_DIR/evaluation-<split|images> otherwise): metrics.json (with
every held-out split's figures at the same threshold under `splits`: carved and shift-aware), predictions.csv,
plots/*.png, report.html, blessing.json, rejected.jsonl (--images only). For a run evaluated on the gate's split,
blessing.json is also copied to RUN_DIR/blessing.json (what `medpipe publish` checks; a verdict on another split or
on external images never unlocks publishing). Exit status 0 when blessed, 3 when not. For binary tasks evaluated on
records the operating threshold is chosen on evaluation.threshold_split (val, or val_shift) and stored in
RUN_DIR/operating_point.json (exported with the model). The gate's baseline is described in
models/gate.py (the `stable` version's assets.extra/medpipe_metrics.json).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medpipe.config import SHIFT_SPLITS, TaskConfig, load_config
from medpipe.errors import EXIT_NO_GO, ConfigError, DataError, RejectedInput

log = logging.getLogger("medpipe.evaluate")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ""}
SPLITS = ("test", "val", "train", *SHIFT_SPLITS)
# The figures reported beside the evaluated split's: carved at random (val, test) and shift-aware (val_shift,
# test_shift), so a reader sees how much a random carve overstates performance on new acquisitions.
REPORTED_SPLITS = ("val", "test", *SHIFT_SPLITS)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe evaluate",
        description="Evaluate a trained run or a published SavedModel: metrics.json, predictions.csv, plots, "
        "Grad-CAM, a self-contained report.html and the quality gate's blessing.json.",
        epilog="exit status: 0 blessed; 3 evaluated but NOT blessed (the reasons are printed and in blessing.json); "
        "2 refused (bad options or data).",
    )
    parser.add_argument("--model", required=True, help="training run directory or published SavedModel version dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="ingest output directory (schema.json + *.tfrecord.gz)")
    source.add_argument("--images", help="folder with one sub-folder of raw images (DICOM/PNG/JPEG/TIFF) per label")
    parser.add_argument("--split", choices=SPLITS,
                        help="split of --data to evaluate (default: the config's evaluation.gate_split, test unless "
                        "the task holds out a shift-aware split)")
    parser.add_argument("--output", help="output directory (default: RUN_DIR/evaluation for a training run)")
    parser.add_argument("--config", help="task config (name or YAML); required for a SavedModel, default for a run: "
                        "its config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set evaluation.bootstrap_samples=200 (repeatable)")
    parser.add_argument("--baseline-repository", "--repository", dest="baseline_repository", help="model repository whose `stable` version is the baseline")
    parser.add_argument("--model-name", help="model name in the repository (default: serving.model_name)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    parser.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM overlays")
    parser.add_argument("--ood", action="append", default=[], metavar="DIR",
                        help="out-of-distribution probe set: a folder of images (searched recursively; DICOM, PNG, "
                        "JPEG, TIFF) or an ingest output (every split); repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model_path = Path(args.model)
    predictor = open_model(model_path)
    config = resolve_config(predictor, args.config, args.overrides)
    split = args.split or config.evaluation.gate_split
    output = Path(args.output) if args.output else default_output(predictor, "images" if args.images else split,
                                                                  config.evaluation.gate_split)
    blessing = evaluate(
        predictor, config, output,
        data_dir=Path(args.data) if args.data else None, split=split,
        images_dir=Path(args.images) if args.images else None,
        baseline_repository=Path(args.baseline_repository) if args.baseline_repository else None,
        model_name=args.model_name, batch_size=args.batch_size, seed=args.seed, gradcam=not args.no_gradcam,
        ood_dirs=[Path(d) for d in args.ood],
    )
    verdict = "BLESSED" if blessing["blessed"] else "NOT BLESSED: " + "; ".join(blessing["reasons"])
    if predictor.kind == "run" and args.data and split != config.evaluation.gate_split:
        verdict += (f" (on {split}, not the gate's split {config.evaluation.gate_split}: this verdict does not unlock "
                    f"`medpipe publish`; run without --split for that)")
    print(f"{verdict}\nreport: {output / 'report.html'}")
    return 0 if blessing["blessed"] else EXIT_NO_GO  # 3: the evaluation ran, and its verdict is "do not publish"


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Predictor:
    """A model that maps float32 [N, S, S, C] 0..255 images to probabilities [N, C]."""

    kind: str  # "run" | "savedmodel"
    path: Path
    labels: tuple[str, ...]
    image_size: int
    channels: int
    task: str
    fingerprint: str
    threshold: Optional[float] = None  # stored binary operating point, if any
    keras_model: Any = None  # run directories only
    run_config: Optional[TaskConfig] = None
    temperature: Optional[float] = None  # None: the model has no calibration (trained before it existed)
    ood_threshold: Optional[float] = None  # None: the model has no OOD outputs
    model_card: Optional[dict] = None  # a SavedModel's assets.extra/model_card.json
    _safe: Any = field(default=None, repr=False)  # models.safety.SafeClassifier (run directories)
    _signature: Any = field(default=None, repr=False)
    _loaded: Any = field(default=None, repr=False)  # keeps the SavedModel's resources alive

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities [N, C], as served."""
        return self.outputs(images, batch_size)["probabilities"]

    def outputs(self, images: np.ndarray, batch_size: int = 64) -> dict[str, Optional[np.ndarray]]:
        """probabilities (calibrated, as served), uncalibrated (temperature 1), ood_score, in_distribution (the
        last two None for a model without the OOD outputs)."""
        import tensorflow as tf

        from models.metrics import as_probability_matrix

        parts: dict[str, list] = {"probabilities": [], "uncalibrated": [], "ood_score": [], "in_distribution": []}
        for start in range(0, len(images), batch_size):
            batch = tf.constant(images[start:start + batch_size], dtype=tf.float32)
            if self.kind == "run":
                served = self._safe(batch)
                _, _, _, logits = self._safe.forward(batch)
                parts["uncalibrated"].append(np.asarray(self._safe.scores(logits), np.float64))
            else:
                served = self._signature(images=batch)
            parts["probabilities"].append(np.asarray(served["probabilities"], np.float64))
            if "ood_score" in served:
                parts["ood_score"].append(np.asarray(served["ood_score"], np.float64))
                parts["in_distribution"].append(np.asarray(served["in_distribution"], bool))
        count = len(self.labels)
        result: dict[str, Optional[np.ndarray]] = {
            "probabilities": as_probability_matrix(
                np.concatenate(parts["probabilities"]) if parts["probabilities"] else np.zeros((0, count)), count)}
        if parts["uncalibrated"]:
            result["uncalibrated"] = as_probability_matrix(np.concatenate(parts["uncalibrated"]), count)
        else:
            result["uncalibrated"] = uncalibrate(result["probabilities"], self.temperature)
        result["ood_score"] = np.concatenate(parts["ood_score"]) if parts["ood_score"] else None
        result["in_distribution"] = np.concatenate(parts["in_distribution"]) if parts["in_distribution"] else None
        return result

    def explain(self, images: np.ndarray, batch_size: int = 16) -> Optional[np.ndarray]:
        """Grad-CAM heat maps [N, S, S] of the predicted class, from the same graph as the `explain` signature
        (None for a SavedModel exported before it existed)."""
        import tensorflow as tf

        maps = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if self.kind == "run":
                maps.append(np.asarray(self._safe(tf.constant(batch, tf.float32), explain=True)["heatmap"]))
            elif "explain" in self._loaded.signatures:
                pngs = [tf.io.encode_png(np.clip(np.round(image), 0, 255).astype(np.uint8)) for image in batch]
                maps.append(np.asarray(self._loaded.signatures["explain"](image_bytes=tf.stack(pngs))["heatmap"]))
            else:
                return None
        return np.concatenate(maps) if maps else np.zeros((0, self.image_size, self.image_size), np.float32)


def uncalibrate(probs: np.ndarray, temperature: Optional[float]) -> np.ndarray:
    """Undo temperature scaling on served probabilities: softmax(T log p) (= softmax(z)) per row; for two classes
    from one sigmoid unit the same as sigmoid(T logit(p)). Without a temperature the probabilities are returned."""
    if temperature is None:
        return probs
    logs = temperature * np.log(np.clip(probs, 1e-12, 1.0))
    logs -= logs.max(axis=1, keepdims=True)
    exps = np.exp(logs)
    return exps / exps.sum(axis=1, keepdims=True)


def is_run_dir(path: Path) -> bool:
    return (path / "model.keras").is_file() and (path / "config.yaml").is_file()


def is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file()


def files_sha256(paths: Sequence[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def open_model(path: Path) -> Predictor:
    if is_run_dir(path):
        from models.export import read_threshold
        from models.safety import SafeClassifier, load_params
        from models.train import load_run

        model, config, _schema = load_run(path)
        threshold = read_threshold(path)
        params = load_params(path)
        if params is None:
            log.warning("%s has no calibration/OOD statistics (trained before they existed): evaluating the raw "
                        "model; fit them with `python -m models.safety --run %s --data INGEST_DIR`", path, path)
        return Predictor("run", path, tuple(config.labels), config.image.size, config.image.channels, config.task,
                         files_sha256([path / "model.keras"], path), threshold, keras_model=model, run_config=config,
                         temperature=None if params is None else params.temperature,
                         ood_threshold=None if params is None else params.threshold,
                         _safe=SafeClassifier(model, config.task, len(config.labels), params, threshold))
    if is_saved_model(path):
        return open_saved_model(path)
    raise DataError(
        f"{path} is neither a training run (model.keras + config.yaml) nor a SavedModel version (saved_model.pb); "
        f"pass --model RUN_DIR or --model REPO/NAME/VERSION"
    )


def open_saved_model(path: Path) -> Predictor:
    import tensorflow as tf

    params_file = path / "assets" / "preprocessing.json"
    if not params_file.is_file():
        raise DataError(f"{params_file} not found: {path} was not exported by medpipe (models/export.py)")
    params = json.loads(params_file.read_text())
    labels_file = path / "assets" / "labels.txt"
    labels = tuple(line for line in labels_file.read_text().splitlines() if line) if labels_file.is_file() \
        else tuple(params["labels"])
    loaded = tf.saved_model.load(str(path))
    if "predict_preprocessed" not in loaded.signatures:
        raise DataError(f"{path} has no predict_preprocessed signature (signatures: {list(loaded.signatures)})")
    model_files = [path / "saved_model.pb", *[p for p in (path / "variables").glob("*") if p.is_file()]]
    from models import safety
    from models.export import MODEL_CARD_FILE

    calibration_file, ood_file = path / "assets" / safety.CALIBRATION_FILE, path / "assets" / safety.OOD_FILE
    card_file = path / "assets.extra" / MODEL_CARD_FILE
    return Predictor("savedmodel", path, labels, int(params["image_size"]), int(params["channels"]), params["task"],
                     files_sha256(model_files, path), params.get("threshold"),
                     temperature=json.loads(calibration_file.read_text())["temperature"]
                     if calibration_file.is_file() else None,
                     ood_threshold=json.loads(ood_file.read_text())["threshold"] if ood_file.is_file() else None,
                     model_card=json.loads(card_file.read_text()) if card_file.is_file() else None,
                     _signature=loaded.signatures["predict_preprocessed"], _loaded=loaded)


def resolve_config(predictor: Predictor, config_arg: Optional[str], overrides: Sequence[str]) -> TaskConfig:
    """The task config: --config if given, else the run's own config.yaml; checked against the model."""
    if config_arg:
        config = load_config(config_arg, overrides)
    elif predictor.kind == "run":
        config = load_config(predictor.path / "config.yaml", overrides)
    else:
        raise ConfigError(f"{predictor.path} is a SavedModel: pass --config with the task config it was trained with "
                          "(e.g. --config brain_mri) so raw images are preprocessed the same way")
    problems = []
    if tuple(config.labels) != predictor.labels:
        problems.append(f"labels {list(config.labels)} vs {list(predictor.labels)} in the model")
    if (config.image.size, config.image.channels) != (predictor.image_size, predictor.channels):
        problems.append(f"image {config.image.size}x{config.image.channels}ch vs "
                        f"{predictor.image_size}x{predictor.channels}ch in the model")
    if problems:
        raise ConfigError(f"{config.source}: the config does not match the model ({'; '.join(problems)})")
    if config.task == "multilabel":
        raise ConfigError("medpipe evaluate covers multiclass and binary tasks; multilabel is not supported yet")
    return config


def default_output(predictor: Predictor, source: str, gate_split: str = "test") -> Path:
    """RUN_DIR/evaluation for the gate's split (what publish ships as the version's metrics), else
    RUN_DIR/evaluation-<split|images>, so evaluating another split never replaces the gate's figures."""
    if predictor.kind != "run":
        raise ConfigError("pass --output DIR when evaluating a SavedModel")
    return predictor.path / ("evaluation" if source == gate_split else f"evaluation-{source}")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Examples:
    images: np.ndarray  # float32 [N, S, S, C], 0..255
    labels: np.ndarray  # int64 [N]
    ids: list[str]  # source_id (records) or relative path (raw images)
    description: str
    fingerprint: str
    rejected: list[dict] = field(default_factory=list)


def load_records(data_dir: Path, split: str, config: TaskConfig) -> Examples:
    """Every example of one split, decoded in the graph exactly as training decoded it."""
    import tensorflow as tf

    from medpipe import schema as keys
    from medpipe.schema import check_schema_matches_config
    from models.data import load_schema, read_records, shard_files
    from models.preprocessing import decode_image_tensor

    data_dir = Path(data_dir)
    schema = load_schema(data_dir)
    check_schema_matches_config(schema, config, where=str(data_dir))
    spec = {
        keys.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        keys.LABEL: tf.io.FixedLenFeature([], tf.int64),
        keys.SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, spec)
        image = decode_image_tensor(parsed[keys.IMAGE_ENCODED], schema.image_size, schema.channels)
        return image, parsed[keys.LABEL], parsed[keys.SOURCE_ID]

    images, labels, ids = [], [], []
    for image, label, source_id in read_records(data_dir, split).map(parse).batch(256).as_numpy_iterator():
        images.append(image)
        labels.append(label)
        ids += [s.decode() for s in source_id]
    if not ids:
        raise DataError(f"{data_dir}: the {split} split has no records; check ingest.split and stats.json")
    shards = [Path(p) for p in shard_files(data_dir, split)]
    fingerprint = files_sha256(shards + [data_dir / "schema.json"], data_dir)
    return Examples(np.concatenate(images), np.concatenate(labels).astype(np.int64), ids,
                    f"the {split} split of {data_dir}", fingerprint)


def preprocess_files(files: Sequence[Path], root: Path, config: TaskConfig) -> tuple[list, list, list, list]:
    """Each file through medpipe.imaging (the ingest preprocessing) -> (float32 images, ids relative to ROOT,
    rejected rows with their reasons, indices of the files kept)."""
    from medpipe.imaging import preprocess_file

    images, ids, rejected, kept = [], [], [], []
    for index, path in enumerate(files):
        relative = str(path.relative_to(root))
        try:
            prepared = preprocess_file(path, config)
        except RejectedInput as exc:
            rejected.append({"path": relative, "reason": exc.reason, "detail": exc.detail})
            continue
        images.append(prepared.pixels.astype(np.float32))
        ids.append(relative)
        kept.append(index)
    return images, ids, rejected, kept


def load_image_folder(folder: Path, config: TaskConfig) -> Examples:
    """FOLDER/<label>/<files>, each through medpipe.imaging (the ingest preprocessing); rejects are listed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory (pass --images with one sub-folder per label)")
    by_name = {label.lower(): index for index, label in enumerate(config.labels)}
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in class_dirs if p.name.lower() not in by_name]
    if unknown or not class_dirs:
        raise DataError(f"{folder}: sub-folders must be named after the labels {list(config.labels)}; "
                        f"found {[p.name for p in class_dirs]}")
    files, labels = [], []
    for class_dir in class_dirs:
        paths = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        files += paths
        labels += [by_name[class_dir.name.lower()]] * len(paths)
    images, ids, rejected, kept = preprocess_files(files, folder, config)
    labels = [labels[index] for index in kept]
    if not images:
        raise DataError(f"{folder}: no usable image ({len(rejected)} rejected); see the reasons in rejected.jsonl")
    return Examples(np.stack(images), np.asarray(labels, dtype=np.int64), ids, f"the image folder {folder}",
                    files_sha256(files, folder), rejected)


def load_ood_set(directory: Path, config: TaskConfig) -> Examples:
    """An OOD probe set: every split of an ingest output (schema.json present; its own image size must match), or
    every file under a folder through medpipe.imaging (the ingest preprocessing); unusable files are listed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--ood {directory}: not a directory (pass a folder of images or an ingest output)")
    if (directory / "schema.json").is_file():
        from medpipe.schema import read_schema
        from models.data import read_records
        from models.preprocessing import parse_example

        schema = read_schema(directory)
        if (schema.image_size, schema.channels) != (config.image.size, config.image.channels):
            raise DataError(f"--ood {directory}: ingested at {schema.image_size}px/{schema.channels}ch but the model "
                            f"takes {config.image.size}px/{config.image.channels}ch; re-ingest with "
                            f"--set image.size={config.image.size} --set image.channels={config.image.channels}")
        chunks = []
        for split in SPLITS:
            if any(directory.glob(f"{split}-*.tfrecord.gz")):
                dataset = read_records(directory, split).map(lambda r: parse_example(r, schema)[0]).batch(256)
                chunks += list(dataset.as_numpy_iterator())
        if not chunks:
            raise DataError(f"--ood {directory}: the ingest output has no records")
        images = np.concatenate(chunks)
        shards = sorted(directory.glob("*.tfrecord.gz"))
        return Examples(images, np.zeros(len(images), np.int64), [f"record {i}" for i in range(len(images))],
                        f"the ingest output {directory}", files_sha256(shards, directory))
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.upper().startswith("LICENSE"))
    images, ids, rejected, _ = preprocess_files(files, directory, config)
    if not images:
        raise DataError(f"--ood {directory}: no usable image among {len(files)} file(s)")
    return Examples(np.stack(images), np.zeros(len(images), np.int64), ids, f"the image folder {directory}",
                    files_sha256(files, directory), rejected)


def ood_metrics(predictor: Predictor, in_scores: Optional[np.ndarray], in_flags: Optional[np.ndarray],
                probe_sets: Sequence[tuple[Path, Examples]], batch_size: int) -> Optional[dict]:
    """AUROC of each probe set (and all pooled) against the evaluated split, and the shares flagged."""
    from models.safety import auroc

    if in_scores is None:
        if probe_sets:
            raise DataError(f"{predictor.path} has no ood_score output (exported before the OOD guard): --ood "
                            "cannot be evaluated; re-export the run with this version of medpipe")
        return None
    result: dict[str, Any] = {"threshold": predictor.ood_threshold,
                              "retention": float(np.mean(in_flags)), "in_distribution_examples": int(len(in_scores)),
                              "probe_sets": []}
    pooled = []
    for directory, examples in probe_sets:
        out = predictor.outputs(examples.images, batch_size)
        pooled.append(out["ood_score"])
        result["probe_sets"].append({
            "name": f"{directory.parent.name}/{directory.name}", "path": str(directory),
            "description": examples.description,
            "fingerprint": examples.fingerprint, "examples": int(len(examples.ids)),
            "rejected": len(examples.rejected), "auroc": auroc(in_scores, out["ood_score"]),
            "flagged_out_of_distribution": float(np.mean(~out["in_distribution"])),
            "scores": out["ood_score"].round(4).tolist()})
    result["auroc"] = auroc(in_scores, np.concatenate(pooled)) if pooled else None
    result["in_distribution_scores"] = in_scores.round(4).tolist()
    return result


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(predictor: Predictor, config: TaskConfig, output: Path, *, data_dir: Optional[Path] = None,
             split: str = "test", images_dir: Optional[Path] = None, baseline_repository: Optional[Path] = None,
             model_name: Optional[str] = None, batch_size: int = 64, seed: int = 0, gradcam: bool = True,
             ood_dirs: Sequence[Path] = ()) -> dict:
    """Run everything and write the outputs; returns the blessing."""
    from models import gate
    from models.metrics import (calibration, choose_threshold, classification_metrics, paired_comparison,
                                predict_classes)

    evaluation = config.evaluation
    examples = load_records(data_dir, split, config) if data_dir else load_image_folder(images_dir, config)
    probe_sets = [(Path(d), load_ood_set(Path(d), config)) for d in ood_dirs]  # bad --ood fails before the work
    log.info("evaluating %s on %d images from %s", predictor.path, len(examples.ids), examples.description)
    served = predictor.outputs(examples.images, batch_size)
    probs = served["probabilities"]

    threshold, threshold_source = predictor.threshold, "stored with the model"
    tuning = evaluation.threshold_split
    loaded = {split: examples}  # splits already decoded here, so the by-split figures do not read them again
    if config.task == "binary" and predictor.kind == "run" and data_dir is not None:
        val = loaded.setdefault(tuning, examples if split == tuning else load_records(data_dir, tuning, config))
        try:
            chosen = choose_threshold(val.labels, predictor.predict(val.images, batch_size)[:, 1],
                                      evaluation.binary_threshold, evaluation.target_sensitivity)
        except ValueError as exc:  # a val split with one class cannot place a threshold: say so everywhere
            log.warning("no operating threshold chosen: %s", exc)
            threshold_source = f"NOT chosen ({exc})"
        else:
            threshold, threshold_source = chosen["threshold"], f"chosen on the {tuning} split ({chosen['method']})"
            (predictor.path / "operating_point.json").write_text(
                json.dumps({**chosen, "split": tuning}, indent=2) + "\n")
    if threshold is None:
        threshold_source = "default 0.5" if threshold_source.startswith("stored") else threshold_source + "; 0.5 used"

    metrics = classification_metrics(examples.labels, probs, config.labels,
                                     threshold=threshold if config.task == "binary" else None,
                                     bootstrap_samples=evaluation.bootstrap_samples,
                                     calibration_bins=evaluation.calibration_bins, seed=seed)
    if "operating_point" in metrics:
        metrics["operating_point"]["chosen_on"] = threshold_source
    binary_cut = threshold if config.task == "binary" else None
    before = calibration(examples.labels, served["uncalibrated"], evaluation.calibration_bins)
    metrics["calibration_before"] = before
    metrics["temperature"] = predictor.temperature
    metrics["ece_uncalibrated"] = before["ece"]
    # temperature scaling must not move any prediction: the share of unchanged predicted classes, shown not assumed
    metrics["predictions_unchanged_by_calibration"] = float(np.mean(
        predict_classes(served["uncalibrated"], binary_cut) == predict_classes(probs, binary_cut)))
    metrics["ood"] = ood_metrics(predictor, served["ood_score"], served["in_distribution"], probe_sets, batch_size)
    study_figures = study_level(predictor, examples, probs, served["in_distribution"], seed)
    if study_figures is not None:
        metrics["study"] = study_figures
    metrics["model"] = {"path": str(predictor.path.resolve()), "kind": predictor.kind,
                        "fingerprint": predictor.fingerprint}
    metrics["data"] = {"description": examples.description, "split": split if data_dir else "images",
                       "fingerprint": examples.fingerprint, "rejected": len(examples.rejected)}
    if data_dir is not None:
        metrics["splits"] = split_figures(predictor, config, data_dir, split, metrics, threshold, batch_size, seed,
                                          loaded)

    baseline_metrics, baseline_version, comparison = None, None, None
    if baseline_repository is not None:
        baseline = load_baseline(baseline_repository, model_name or config.serving.model_name, examples, config,
                                 batch_size, seed)
        if baseline is not None:
            baseline_metrics, baseline_version, baseline_probs, baseline_threshold = baseline
            comparison = paired_comparison(
                examples.labels, probs, baseline_probs, candidate_threshold=binary_cut,
                baseline_threshold=baseline_threshold,
                margins={name: gate.margin_of(evaluation, name) for name in gate.GATED_METRICS},
                min_examples=evaluation.min_paired_examples, samples=evaluation.bootstrap_samples, seed=seed)
    blessing = gate.judge(metrics, evaluation, baseline_metrics, baseline_version, comparison)
    blessing["model"] = metrics["model"]
    blessing["data"] = metrics["data"]

    write_outputs(output, predictor, config, examples, probs, metrics, blessing, gradcam=gradcam,
                  probe_sets=probe_sets)
    if predictor.kind == "run" and data_dir is not None and split == evaluation.gate_split:
        shutil.copyfile(output / "blessing.json", predictor.path / "blessing.json")
    elif predictor.kind == "run":  # a verdict on data the model was tuned on (or not the gate's data) never publishes
        log.info("blessing from %s not copied to %s (only the %s split gates a run)",
                 f"the {split} split" if data_dir is not None else "external images", predictor.path,
                 evaluation.gate_split)
    return blessing


def study_level(predictor: Predictor, examples: Examples, probs: np.ndarray, in_distribution: Optional[np.ndarray],
                seed: int) -> Optional[dict]:
    """Study-level sensitivity and specificity with the model's own study rule (RUN_DIR/study_rule.json or the
    SavedModel's assets/study_rule.json) on studies assembled from the evaluated images: k normal images + 0 or 1
    abnormal, k = 1..20 (medpipe.study.study_metrics). None when the model has no abnormal-first rule."""
    from medpipe.study import ABNORMAL_FIRST, load_rule, study_metrics

    rule = load_rule(predictor.path)
    if rule is None or rule.rule != ABNORMAL_FIRST:
        return None
    try:
        return study_metrics(probs, examples.labels, in_distribution, rule, seed=seed)
    except ValueError as exc:  # a split without both normal and abnormal images
        log.warning("no study-level figures: %s", exc)
        return None


def split_summary(metrics: dict) -> dict:
    """Accuracy, macro-F1 and ROC AUC with their 95% bootstrap intervals: one row of the by-split table."""
    intervals = metrics.get("confidence_intervals") or {}
    return {"examples": metrics["num_examples"],
            **{name: {"value": metrics[name], "ci95": intervals.get(name)} for name in ("accuracy", "macro_f1",
                                                                                        "macro_auc")},
            "per_class_f1": {label: row["f1"] for label, row in metrics["per_class"].items()}}


def split_figures(predictor: Predictor, config: TaskConfig, data_dir: Path, evaluated: str, metrics: dict,
                  threshold: Optional[float], batch_size: int, seed: int, loaded: dict[str, Examples]) -> dict:
    """The evaluated split's summary and, at the same operating threshold, every other held-out split present:
    carved at random (val, test) and shift-aware (val_shift, test_shift). `loaded`: splits already decoded."""
    from models.metrics import classification_metrics

    rows = {}
    for name in REPORTED_SPLITS:
        if name == evaluated:
            figures = metrics
        elif any(Path(data_dir).glob(f"{name}-*.tfrecord.gz")):
            try:
                examples = loaded.get(name) or load_records(data_dir, name, config)
            except DataError:  # an empty split: nothing to report
                continue
            figures = classification_metrics(examples.labels, predictor.outputs(examples.images, batch_size)
                                             ["probabilities"], config.labels,
                                             threshold=threshold if config.task == "binary" else None,
                                             bootstrap_samples=config.evaluation.bootstrap_samples, seed=seed)
        else:
            continue
        rows[name] = {**split_summary(figures), "kind": "shift-aware" if name in SHIFT_SPLITS else "carved"}
    return rows


def load_baseline(repository: Path, model_name: str, examples: Examples, config: TaskConfig, batch_size: int,
                  seed: int) -> Optional[tuple[dict, int, np.ndarray, Optional[float]]]:
    """The `stable` version run on the same examples: (its metrics, its version, its probabilities, its binary
    threshold), for the gate's paired comparison; None when nothing is published as stable."""
    from models import gate
    from models.metrics import classification_metrics

    baseline = gate.find_baseline(repository, model_name)
    if baseline is None:
        log.info("no %s version of %s in %s: judged on absolute thresholds only", gate.STABLE_LABEL, model_name,
                 repository)
        return None
    if baseline.version_dir is None:
        raise DataError(f"{repository}/models.config labels version {baseline.version} of {model_name} as "
                        f"{gate.STABLE_LABEL}, but {repository}/{model_name}/{baseline.version} does not exist")
    stable = open_saved_model(baseline.version_dir)
    images = examples.images
    if (stable.image_size, stable.channels) != (images.shape[1], images.shape[3]):
        # the stable model was trained at another size (e.g. after an image.size change): feed it the same
        # examples resized to its input, so both models still judge the same cases
        import tensorflow as tf

        log.info("resizing the evaluation images to %d px for the stable model (version %s)", stable.image_size,
                 baseline.version)
        resized = tf.image.resize(images, (stable.image_size, stable.image_size), antialias=True).numpy()
        if stable.channels != resized.shape[-1]:
            resized = np.repeat(resized.mean(axis=-1, keepdims=True), stable.channels, axis=-1)
        images = resized.astype(np.float32)
    probs = stable.predict(images, batch_size)
    metrics = classification_metrics(examples.labels, probs, config.labels,
                                     threshold=stable.threshold if config.task == "binary" else None,
                                     bootstrap_samples=0, calibration_bins=config.evaluation.calibration_bins,
                                     seed=seed)
    return metrics, baseline.version, probs, stable.threshold if config.task == "binary" else None


# ------------------------------------------------------------------------------------------------ outputs
def write_outputs(output: Path, predictor: Predictor, config: TaskConfig, examples: Examples, probs: np.ndarray,
                  metrics: dict, blessing: dict, gradcam: bool = True,
                  probe_sets: Sequence[tuple[Path, Examples]] = ()) -> None:
    """metrics.json, predictions.csv, plots/*.png, report.html, blessing.json (+ rejected.jsonl)."""
    from models.metrics import predict_classes, roc_curves
    from models.model_card import build_model_card
    from models.report import render_report

    plots_dir = output / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    labels = list(config.labels)
    threshold = metrics.get("operating_point", {}).get("threshold")
    predicted = predict_classes(probs, threshold)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (output / "blessing.json").write_text(json.dumps(blessing, indent=2) + "\n", encoding="utf-8")
    write_predictions(output / "predictions.csv", examples, probs, predicted, labels)
    rejected = examples.rejected + [{**row, "ood_set": directory.name} for directory, probe in probe_sets
                                    for row in probe.rejected]
    if rejected:
        with open(output / "rejected.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rejected)

    plots = {
        "Confusion matrix (rows: true class; colour: share of the true class)":
            plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), labels, plots_dir / "confusion_matrix.png"),
        "ROC curves, one class against the rest": plot_roc(
            roc_curves(examples.labels, probs, labels), metrics["per_class"], plots_dir / "roc.png"),
        "Reliability diagram (calibration; outline: before temperature scaling)": plot_reliability(
            metrics["calibration"], plots_dir / "reliability.png", metrics.get("calibration_before")),
    }
    if metrics.get("ood") and metrics["ood"]["probe_sets"]:
        plots["Out-of-distribution score: evaluated split against the probe sets"] = plot_ood_scores(
            metrics["ood"], plots_dir / "ood_scores.png")
    gradcam_plots = {}
    if gradcam and config.evaluation.gradcam_per_class > 0:
        gradcam_plots = plot_gradcam_cases(predictor, examples, probs, predicted, labels,
                                           config.evaluation.gradcam_per_class, plots_dir)
    card = predictor.model_card if predictor.kind == "savedmodel" else build_model_card(
        predictor.path, config, metrics)
    context = {
        "task_name": config.name,
        "data_description": examples.description,
        "model": str(predictor.path.resolve()),
        "model kind": "training run (Keras)" if predictor.kind == "run" else "published SavedModel",
        "model fingerprint (sha256)": predictor.fingerprint,
        "data fingerprint (sha256)": examples.fingerprint,
        "cases evaluated": len(examples.ids),
        "inputs rejected": len(examples.rejected),
        "image size": f"{config.image.size} x {config.image.size}, {config.image.channels} channel(s)",
        "config": config.source,
        "bootstrap resamples": config.evaluation.bootstrap_samples,
    }
    page = render_report(metrics, blessing, plots, gradcam_plots, context, model_card=card)
    (output / "report.html").write_text(page, encoding="utf-8")
    log.info("wrote %s (accuracy %.4f, macro F1 %.4f, blessed %s)", output, metrics["accuracy"], metrics["macro_f1"],
             blessing["blessed"])


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    figure, axis = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, f"{count}\n{share[row, col]:.0%}", ha="center", va="center",
                  color="white" if share[row, col] > 0.5 else "black", fontsize=9)
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return _save(figure, path)


def plot_roc(curves: dict, per_class: dict, path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for label, curve in curves.items():
        axis.plot(curve["fpr"], curve["tpr"], label=f"{label} (AUC {per_class[label]['auc']:.3f})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axis.set_xlabel("1 - specificity (false positive rate)")
    axis.set_ylabel("sensitivity (true positive rate)")
    axis.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_reliability(calibration: dict, path: Path, before: Optional[dict] = None) -> Path:
    plt = _pyplot()
    edges = np.asarray(calibration["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = np.array([np.nan if v is None else v for v in calibration["bin_accuracy"]])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=(3, 1), sharex=True)
    top.bar(centres, np.nan_to_num(accuracy), width=edges[1] - edges[0], edgecolor="black", alpha=0.7,
            label="observed accuracy (calibrated)")
    title = f"ECE {calibration['ece']:.3f}"
    if before is not None:
        previous = np.array([np.nan if v is None else v for v in before["bin_accuracy"]])
        top.bar(centres, np.nan_to_num(previous), width=edges[1] - edges[0], fill=False, edgecolor="firebrick",
                linestyle="--", label="before temperature scaling")
        title = f"ECE {before['ece']:.3f} before, {calibration['ece']:.3f} after calibration"
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, calibration["bin_count"], width=edges[1] - edges[0], color="grey")
    bottom.set_xlabel("model confidence (highest probability)")
    bottom.set_ylabel("cases")
    return _save(figure, path)


def plot_ood_scores(ood: dict, path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    sets = [("evaluated split (in distribution)", ood["in_distribution_scores"])]
    sets += [(f"{probe['name']} (AUROC {probe['auroc']:.3f})", probe["scores"]) for probe in ood["probe_sets"]]
    everything = np.concatenate([np.asarray(v, float) for _, v in sets])
    bins = np.linspace(everything.min(), everything.max(), 50)
    for name, values in sets:
        axis.hist(values, bins=bins, alpha=0.55, density=True, label=name)
    axis.axvline(ood["threshold"], color="black", linestyle="--", label=f"threshold {ood['threshold']:.2f}")
    axis.set_xlabel("ood_score (higher = less like the training data)")
    axis.set_ylabel("density")
    axis.legend(fontsize=8)
    return _save(figure, path)


def select_gradcam_cases(labels: np.ndarray, predicted: np.ndarray, probs: np.ndarray, per_class: int,
                         num_classes: int) -> dict[int, list[int]]:
    """Per true class: the `per_class` most confident correct cases and the `per_class` most confident wrong ones."""
    chosen = {}
    confidence = probs[np.arange(len(predicted)), predicted]
    for cls in range(num_classes):
        picks = []
        for correct in (True, False):
            index = np.flatnonzero((labels == cls) & ((predicted == labels) == correct))
            picks += index[np.argsort(-confidence[index], kind="stable")][:per_class].tolist()
        if picks:
            chosen[cls] = picks
    return chosen


def plot_gradcam_cases(predictor: Predictor, examples: Examples, probs: np.ndarray, predicted: np.ndarray,
                       labels: Sequence[str], per_class: int, plots_dir: Path) -> dict[str, Path]:
    """Overlays of the heat maps the `explain` signature serves (the same graph: models.safety.SafeClassifier)."""
    from models.gradcam import overlay

    plt = _pyplot()
    out = {}
    for cls, index in select_gradcam_cases(examples.labels, predicted, probs, per_class, len(labels)).items():
        maps = predictor.explain(examples.images[index])
        if maps is None:
            log.info("%s has no explain signature (exported before it existed): no Grad-CAM", predictor.path)
            return {}
        figure, axes = plt.subplots(1, len(index), figsize=(2.6 * len(index), 3), squeeze=False)
        for axis, i, heatmap in zip(axes[0], index, maps):
            axis.imshow(overlay(examples.images[i], heatmap))
            verdict = "correct" if predicted[i] == examples.labels[i] else "WRONG"
            axis.set_title(f"{verdict}: {labels[predicted[i]]}\np={probs[i, predicted[i]]:.2f}", fontsize=9,
                           color="black" if verdict == "correct" else "firebrick")
            axis.axis("off")
        safe = "".join(ch if ch.isalnum() else "_" for ch in labels[cls])
        out[labels[cls]] = _save(figure, plots_dir / f"gradcam_{cls}_{safe}.png")
    return out


def write_predictions(path: Path, examples: Examples, probs: np.ndarray, predicted: np.ndarray,
                      labels: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "true", "predicted", *[f"p_{label}" for label in labels]])
        for identifier, truth, guess, row in zip(examples.ids, examples.labels, predicted, probs):
            writer.writerow([identifier, labels[truth], labels[guess], *[f"{p:.6f}" for p in row]])


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
