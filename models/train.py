"""`medpipe train`: train a Keras classifier on ingested TFRecords with MirroredStrategy.

    python -m models.train --config config/brain_mri.yaml --data INGEST_DIR --output RUN_DIR [--set k=v ...]

Every run uses tf.distribute.MirroredStrategy (all GPUs when present; `--cpu-replicas N` splits the CPU into N
logical devices), or MultiWorkerMirroredStrategy when TensorFlow's TF_CONFIG names several workers (`--workers N`
starts N local ones; see models/distributed.py). RUN_DIR receives config.yaml, schema.json, model.keras (best
checkpoint), history.csv, tensorboard/, backup/ (BackupAndRestore: re-running the same command after a crash resumes
at the last finished epoch) and train_metadata.json; with several workers only the chief writes it.
With `training.fine_tune` the fit runs in two stages (see fit_two_stages). Then, with the best checkpoint, the safety
step (models/safety.py) writes calibration.json (the temperature), ood.json and ood_stats.npz, which the export bakes
into the SavedModel.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from medpipe.config import TaskConfig, config_from_dict, dump_config, load_config
from medpipe.errors import ConfigError, DataError

log = logging.getLogger("medpipe.train")

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe train",
        description="Train a classifier on ingested TFRecords (MirroredStrategy; resumable with the same command).",
        epilog="Example: medpipe train --config config/brain_mri.yaml --data data/brain_mri --output runs/brain_mri "
        "--set training.epochs=5",
    )
    parser.add_argument("--config", required=True, help="task config YAML (a path, or a name from config/)")
    parser.add_argument("--data", required=True, help="ingest output directory (schema.json + *.tfrecord.gz)")
    parser.add_argument("--output", required=True, help="run directory to create or resume (RUN_DIR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=5 (repeatable)")
    parser.add_argument("--epochs", type=int, default=None, help="shortcut for --set training.epochs=N")
    parser.add_argument("--cpu-replicas", type=int, default=None, metavar="N",
                        help="split the CPU into N logical devices and mirror over them (no GPU needed); "
                        "default: all GPUs, else the one CPU")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="start N worker processes on localhost (MultiWorkerMirroredStrategy, TF_CONFIG set for "
                        "each); to join a cluster instead, set TF_CONFIG and omit --workers")
    parser.add_argument("--cache", action="store_true",
                        help="keep decoded images in memory after the first epoch (data that fits in RAM)")
    parser.add_argument("--pushgateway", default=None, metavar="URL",
                        help="push the final figures to this Prometheus Pushgateway (default: env MEDPIPE_PUSHGATEWAY; "
                        "neither = no push)")
    return parser


# ---------------------------------------------------------------------------------------------------------------- pure
def global_batch_size(per_replica: int, replicas: int) -> int:
    return per_replica * replicas


def monitor_mode(monitor: str) -> str:
    """'min' for losses, 'max' for accuracy/AUC-like metrics."""
    return "min" if monitor.endswith("loss") else "max"


def learning_rate_schedule(training: Any, steps_per_epoch: int, rate: float | None = None,
                           epochs: int | None = None) -> Any:
    """training.learning_rate over training.epochs, or `rate` over `epochs` (a fine-tuning stage)."""
    import keras

    rate = training.learning_rate if rate is None else rate
    if training.lr_schedule == "constant":
        return rate
    total = max(1, (training.epochs if epochs is None else epochs) * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(rate, decay_steps=total, alpha=0.01)


def loss_and_metrics(task: str, label_smoothing: float, num_classes: int) -> tuple[Any, list]:
    import keras

    if task == "multiclass":
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
                   keras.metrics.AUC(name="auc", multi_label=True, num_labels=num_classes)]
    else:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"),
                   keras.metrics.AUC(name="auc", multi_label=task == "multilabel",
                                     num_labels=num_classes if task == "multilabel" else None)]
    return loss, metrics


def best_so_far(history_csv: Path, monitor: str) -> float | None:
    """The best monitored value already logged by an interrupted run (so a resumed checkpoint is not worse)."""
    if not history_csv.is_file():
        return None
    with history_csv.open(newline="") as handle:
        values = [float(row[monitor]) for row in csv.DictReader(handle) if row.get(monitor) not in (None, "")]
    if not values:
        return None
    return min(values) if monitor_mode(monitor) == "min" else max(values)


def epochs_logged(history_csv: Path) -> int:
    if not history_csv.is_file():
        return 0
    with history_csv.open(newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "medpipe"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def data_fingerprint(data_dir: Path) -> dict[str, Any]:
    """What identifies the data: schema fingerprint, stats.json hash and per-shard sizes."""
    import hashlib

    schema_body = json.loads((data_dir / "schema.json").read_text())
    stats = data_dir / "stats.json"
    shards = {p.name: p.stat().st_size for p in sorted(data_dir.glob("*.tfrecord.gz"))}
    return {
        "data_dir": str(data_dir.resolve()),
        "schema_fingerprint": schema_body.get("fingerprint"),
        "stats_sha256": hashlib.sha256(stats.read_bytes()).hexdigest() if stats.is_file() else None,
        "shards": shards,
    }


# ---------------------------------------------------------------------------------------------------------------- TF
def make_strategy(cpu_replicas: int | None, cluster: Any = None) -> Any:
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers; else MirroredStrategy over all GPUs, or over
    N logical CPU devices (must run before TensorFlow initialises)."""
    import tensorflow as tf

    if cluster is not None and cluster.multi_worker:
        if cpu_replicas is not None:
            raise ConfigError("--cpu-replicas splits one process's CPU; with a multi-worker TF_CONFIG each worker is "
                              "one replica (or mirrors over its GPUs): drop --cpu-replicas")
        from models.distributed import patch_keras_for_multi_worker

        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; ring all-reduce on CPU, NCCL on GPU
        patch_keras_for_multi_worker()
        return strategy
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_replicas is not None:
        if cpu_replicas < 1:
            raise ConfigError(f"--cpu-replicas must be >= 1, got {cpu_replicas}")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if gpus:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy(devices=["/cpu:0"])


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    # Deterministic kernels: cheap on CPU, and makes two seeded runs give the same losses.
    tf.config.experimental.enable_op_determinism()


def gpu_names() -> list[str]:
    """The physical GPUs' names (e.g. 'NVIDIA A100-SXM4-40GB'), for the run metadata."""
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]


def callbacks_for(run_dir: Path, training: Any, restore_dir: Path | None = None, backup: str = "backup",
                  delete_backup: bool = True) -> list:
    """Keras callbacks writing into run_dir; BackupAndRestore backs up into run_dir/`backup` and restores from
    restore_dir (default: the same; on a non-chief worker: the chief's)."""
    import keras

    from models.distributed import worker_backup

    monitor = training.monitor
    mode = monitor_mode(monitor)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(run_dir / "model.keras"), monitor=monitor, mode=mode, save_best_only=True,
        initial_value_threshold=best_so_far(run_dir / "history.csv", monitor),
    )
    callbacks = [
        worker_backup(run_dir / backup, restore_dir or run_dir / backup, delete_checkpoint=delete_backup),
        checkpoint,
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=training.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        tensorboard_callback(run_dir / "tensorboard"),
    ]
    return callbacks


def tensorboard_callback(log_dir: Path) -> Any:
    """keras.callbacks.TensorBoard when the tensorboard package is installed; otherwise the same per-epoch scalars
    (train/ and validation/ epoch_<metric>) written as TensorBoard event files with TensorFlow's own summary ops,
    so RUN_DIR/tensorboard is readable by any TensorBoard without the package being a training dependency."""
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(str(log_dir), update_freq="epoch", profile_batch=0)
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    scalar = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    class EpochScalars(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.writers = {part: tf.summary.create_file_writer(str(log_dir / part)) for part in ("train", "validation")}

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            for key, value in (logs or {}).items():
                part, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                with self.writers[part].as_default():
                    tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch, metadata=scalar)
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs: Any = None) -> None:
            for writer in self.writers.values():
                writer.close()

    return EpochScalars()


def epoch_log_callback() -> Any:
    """One plain log line per epoch (Airflow/CI logs) for when stdout is not a terminal (no progress bar then)."""
    import keras

    started = {}
    return keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs=None: started.__setitem__("t", time.monotonic()),
        on_epoch_end=lambda epoch, logs=None: log.info(
            "epoch %d: %s (%.1fs)", epoch + 1,
            " ".join(f"{k}={float(v):.4f}" for k, v in sorted((logs or {}).items()) if k != "learning_rate"),
            time.monotonic() - started.get("t", time.monotonic())),
    )


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE` (what the launcher passes on to its workers)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def fit_two_stages(model: Any, training: Any, compile_model: Any, fit: Any, run_dir: Path,
                   write_dir: Path) -> dict[str, list]:
    """training.fine_tune: stage 1 ("warmup", epochs [0, warmup_epochs)) trains with the `freeze` part of the backbone
    frozen at training.learning_rate; stage 2 ("finetune", up to training.epochs) trains every layer at
    unfreeze_learning_rate. The backbone's BatchNorm stays in inference mode throughout (architectures.backbone).

    Each stage backs up into its own folder (their optimizers hold different variables), and the warmup backup is
    kept until the run ends, so a re-run after a crash resumes in the right stage (the chief's run_dir says which;
    this process writes into write_dir).
    """
    from models.architectures import BACKBONE_LAYER, frozen_count, set_frozen

    tune = training.fine_tune
    backbone = model.get_layer(BACKBONE_LAYER)
    frozen = frozen_count([layer.name for layer in backbone.layers], tune.freeze)
    history: dict[str, list] = {}
    if not (run_dir / "backup" / "finetune").exists():  # stage 2 never checkpointed: (re)run or restore stage 1
        set_frozen(backbone, frozen)
        log.info("fine-tune stage 1: %d of %d backbone layers frozen (up to %s) for %d epochs", frozen,
                 len(backbone.layers), backbone.layers[frozen - 1].name, tune.warmup_epochs)
        compile_model(training.learning_rate, tune.warmup_epochs)
        history = fit(tune.warmup_epochs, 0, "backup/warmup", delete_backup=False)
    set_frozen(backbone, 0)
    log.info("fine-tune stage 2: every layer trainable, learning rate %g, epochs %d-%d", tune.unfreeze_learning_rate,
             tune.warmup_epochs + 1, training.epochs)
    compile_model(tune.unfreeze_learning_rate, training.epochs - tune.warmup_epochs)
    model._initial_epoch = None  # Keras keeps a restored start epoch across fit() calls; stage 2 starts at warmup
    for name, values in fit(training.epochs, tune.warmup_epochs, "backup/finetune").items():
        history[name] = history.get(name, []) + values
    shutil.rmtree(write_dir / "backup" / "warmup", ignore_errors=True)  # ours; the run is complete
    if (write_dir / "backup").is_dir() and not any((write_dir / "backup").iterdir()):
        (write_dir / "backup").rmdir()
    return history


# ---------------------------------------------------------------------------------------------------------------- run
def train(config: TaskConfig, data_dir: Path, run_dir: Path, cpu_replicas: int | None = None, cache: bool = False,
          pushgateway: str | None = None) -> dict:
    """Train and write RUN_DIR; returns train_metadata. Data/config problems raise before any model is built."""
    from models import data as data_lib

    started = time.monotonic()
    schema = data_lib.check_data(data_dir, config)  # missing/empty dir, schema mismatch, missing shards: fail now

    import keras
    import tensorflow as tf

    from models import safety
    from models.architectures import build_model
    from models.distributed import artefact_dir, cluster_from_env

    cluster = cluster_from_env()
    strategy = make_strategy(cpu_replicas, cluster)  # first TensorFlow use: must come before any op
    write_dir = artefact_dir(run_dir, cluster)  # the run folder on the chief, a private temp folder elsewhere
    log.info("workers: %d (this process: %s)", cluster.workers, cluster.describe())
    train_counts = data_lib.label_counts(data_dir, "train", schema)
    val_counts = data_lib.label_counts(data_dir, config.training.validation_split, schema)
    replicas = strategy.num_replicas_in_sync
    log.info("replicas: %d (%s)", replicas, ", ".join(strategy.extended.worker_devices))
    training = config.training
    seed_everything(training.seed)
    if training.mixed_precision and tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")

    write_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, write_dir / "config.yaml")
    shutil.copyfile(data_dir / "schema.json", write_dir / "schema.json")

    batch = global_batch_size(training.batch_size, replicas)
    class_weights = None
    if training.class_weights == "balanced" and schema.task != "multilabel":
        class_weights = data_lib.balanced_class_weights(train_counts).tolist()
    train_ds = data_lib.make_dataset(data_dir, "train", schema, batch, training=True, config=config,
                                     class_weights=class_weights, seed=training.seed, cache=cache,
                                     num_examples=int(train_counts.sum()), replicas=replicas)
    val_ds = data_lib.make_dataset(data_dir, training.validation_split, schema, batch, cache=cache,
                                   num_examples=int(val_counts.sum()), replicas=replicas)
    steps_per_epoch = (int(train_counts.sum()) // batch if replicas > 1 else math.ceil(int(train_counts.sum()) / batch))
    if steps_per_epoch < 1:
        raise DataError(f"{data_dir}: {int(train_counts.sum())} training examples is less than one global batch "
                        f"({batch}); lower training.batch_size or ingest more data")
    log.info("train %s, val %s examples per class %s; global batch %d; %d steps/epoch; class weights %s",
             train_counts.tolist(), val_counts.tolist(), list(schema.labels), batch, steps_per_epoch,
             None if class_weights is None else [round(w, 3) for w in class_weights])

    def compile_model(rate: float | None = None, epochs: int | None = None) -> None:
        with strategy.scope():
            loss, metrics = loss_and_metrics(schema.task, training.label_smoothing, schema.num_classes)
            optimizer = keras.optimizers.AdamW(learning_rate_schedule(training, steps_per_epoch, rate, epochs),
                                               weight_decay=training.weight_decay)
            # weighted_metrics: the zero-weight rows that pad multi-replica validation batches do not count (train
            # metrics are then class-weighted, i.e. balanced, like the loss).
            model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics)

    interactive = sys.stdout.isatty()

    def fit(epochs: int, initial_epoch: int = 0, backup: str = "backup", delete_backup: bool = True) -> dict:
        callbacks = callbacks_for(write_dir, training, restore_dir=run_dir / backup, backup=backup,
                                  delete_backup=delete_backup)
        if not interactive:
            callbacks.append(epoch_log_callback())
        return model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
                         callbacks=callbacks, shuffle=False,  # tf.data already shuffles
                         verbose=1 if interactive else 0).history

    with strategy.scope():
        model = build_model(config, data_lib.num_outputs(schema), steps_per_epoch=steps_per_epoch)
    resumed_from = epochs_logged(run_dir / "history.csv") if (run_dir / "backup").exists() else 0
    if resumed_from:
        log.info("resuming from %s after %d logged epochs", run_dir / "backup", resumed_from)
    fit_started = time.monotonic()
    if training.fine_tune is None:
        compile_model()
        history = fit(training.epochs)
    else:
        history = fit_two_stages(model, training, compile_model, fit, run_dir, write_dir)
    fit_seconds = time.monotonic() - fit_started

    if not (write_dir / "model.keras").is_file():  # e.g. a metric that never improved from a NaN start
        model.save(write_dir / "model.keras")
    # Calibration and the OOD statistics belong to the weights that ship: the best checkpoint, not the last epoch.
    safety_started = time.monotonic()
    best = keras.models.load_model(write_dir / "model.keras", compile=False)
    safety_summary = safety.fit_run(best, config, data_dir, write_dir, schema)
    safety_summary["seconds"] = round(time.monotonic() - safety_started, 1)
    monitor = training.monitor
    metadata = {
        "config": config.name,
        "config_source": config.source,
        "data": data_fingerprint(data_dir),
        "train_examples_per_class": dict(zip(schema.labels, train_counts.tolist())),
        "val_examples_per_class": dict(zip(schema.labels, val_counts.tolist())),
        "code_version": git_commit(),
        "packages": package_versions(),
        "replicas": replicas,
        "workers": cluster.workers,
        "strategy": "MultiWorkerMirroredStrategy" if cluster.multi_worker else "MirroredStrategy",
        "devices": list(strategy.extended.worker_devices),
        "gpus": len(gpu_names()),
        "gpu_names": gpu_names(),
        "mixed_precision": keras.mixed_precision.global_policy().name,
        "global_batch_size": batch,
        "model": training.model,
        "parameters": int(model.count_params()),
        "epochs_requested": training.epochs,
        "backbone_weights": training.backbone_weights,
        "epochs_run": epochs_logged(write_dir / "history.csv"),
        "epochs_this_invocation": len(next(iter(history.values()), [])),
        "resumed_from_epoch": resumed_from,
        "monitor": monitor,
        "best_metric": best_so_far(write_dir / "history.csv", monitor),
        "fit_seconds": round(fit_seconds, 1),
        "safety": safety_summary,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (write_dir / "train_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("done: %d epochs, best %s=%s, %.0fs wall; model in %s", metadata["epochs_run"], monitor,
             metadata["best_metric"], metadata["wall_seconds"], write_dir / "model.keras")
    if not cluster.is_chief:
        return metadata  # the chief pushes the figures; this worker's copies vanish with its temp folder
    # Batch jobs end before Prometheus could scrape them: push the final figures (a no-op without a Pushgateway).
    final = {name: values[-1] for name, values in history.items() if values}
    if metadata["best_metric"] is not None:
        final[f"best_{monitor}"] = metadata["best_metric"]
    push_training_metrics(final, config.name, epoch=metadata["epochs_run"], duration_seconds=metadata["wall_seconds"],
                          url=pushgateway)
    return metadata


def load_run(run_dir: str | Path) -> tuple[Any, TaskConfig, Any]:
    """(keras model, TaskConfig, DatasetSchema) of a finished run directory (for evaluation and export)."""
    import yaml

    from medpipe.schema import read_schema

    run = Path(run_dir)
    for name in ("model.keras", "config.yaml", "schema.json"):
        if not (run / name).is_file():
            raise DataError(f"{run / name} not found: {run} is not a finished training run (run `medpipe train`)")
    import keras

    config = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()), origin=str(run / "config.yaml"))
    model = keras.models.load_model(run / "model.keras", compile=False)
    return model, config, read_schema(run)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"training.epochs={args.epochs}"] if args.epochs is not None else [])
    config = load_config(args.config, overrides)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.workers is not None and args.workers != 1:
        from models.distributed import launch_local_workers

        return launch_local_workers(strip_option(list(sys.argv[1:] if argv is None else argv), "--workers"),
                                    args.workers)
    train(config, Path(args.data), Path(args.output), cpu_replicas=args.cpu_replicas, cache=args.cache,
          pushgateway=args.pushgateway)
    return 0


def push_training_metrics(metrics: dict[str, float], dataset: str, epoch: int | None = None,
                          duration_seconds: float | None = None, url: str | None = None) -> bool:
    """Epoch or final training figures, e.g. {"val_accuracy": 0.91, "loss": 0.3} -> medpipe_training_<name>."""
    from medpipe.metrics_push import push_gauges

    gauges = {f"medpipe_training_{name}": (float(value), f"training {name} (latest epoch or final)")
              for name, value in metrics.items() if isinstance(value, (int, float))}
    if epoch is not None:
        gauges["medpipe_training_epoch"] = (float(epoch), "last completed epoch")
    if duration_seconds is not None:
        gauges["medpipe_training_duration_seconds"] = (float(duration_seconds), "training wall time")
    return push_gauges("medpipe_training", gauges, labels={"dataset": dataset}, grouping_key={"dataset": dataset},
                       url=url)


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
