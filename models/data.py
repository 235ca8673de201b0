"""tf.data input pipelines over the ingest shards (`DIR/{split}-*.tfrecord.gz` + `DIR/schema.json`).

Everything runs in the TensorFlow graph (no Python in the hot path): parallel interleave over GZIP shards, parse
and decode with `models.preprocessing` (the same code the SavedModel signature uses), augmentation for the
training split only, shuffle with the run's seed, batch by the global batch size, prefetch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from medpipe import schema as record_keys
from medpipe.config import SHIFT_SPLITS, TaskConfig
from medpipe.errors import DataError
from medpipe.schema import DatasetSchema, check_schema_matches_config, read_schema
from models.architectures import output_units
from models.preprocessing import parse_example

AUTOTUNE = tf.data.AUTOTUNE


def load_schema(data_dir: str | Path) -> DatasetSchema:
    """DIR/schema.json, with a clear DataError when DIR is missing, empty or not an ingest output."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist (pass --data with the output of `medpipe ingest`)")
    if not any(directory.iterdir()):
        raise DataError(f"data directory {directory} is empty (run `medpipe ingest --output {directory}` first)")
    return read_schema(directory)


def shard_files(data_dir: str | Path, split: str) -> list[str]:
    """The split's shards, sorted (a stable order is part of reproducibility); DataError when there are none."""
    files = sorted(str(path) for path in Path(data_dir).glob(f"{split}-*.tfrecord.gz"))
    if not files:
        raise DataError(
            f"no {split}-*.tfrecord.gz shards in {data_dir}; the ingest output is incomplete or the {split} split "
            f"is empty (check ingest.split in the config and stats.json)"
        )
    return files


def check_data(data_dir: str | Path, config: TaskConfig, splits: Sequence[str] = ("train", "val")) -> DatasetSchema:
    """Everything that can be checked before a model is built: schema present, matching the config, shards there."""
    schema = load_schema(data_dir)
    check_schema_matches_config(schema, config, where=str(data_dir))
    for split in splits:
        shard_files(data_dir, split)
    return schema


def read_records(data_dir: str | Path, split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    """Serialized Examples from the split's shards, read in parallel (interleave) and in a deterministic order."""
    files = tf.data.Dataset.from_tensor_slices(shard_files(data_dir, split))
    if shuffle_files:
        files = files.shuffle(len(shard_files(data_dir, split)), seed=seed, reshuffle_each_iteration=True)
    return files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP", buffer_size=1 << 20),
        cycle_length=4,
        block_length=16,
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def label_counts(data_dir: str | Path, split: str, schema: DatasetSchema) -> np.ndarray:
    """Examples per class in a split (parses labels only: a second or two for thousands of records)."""
    multilabel = schema.task == "multilabel"
    spec = {record_keys.LABEL: tf.io.VarLenFeature(tf.int64)}
    counts = np.zeros(schema.num_classes, dtype=np.int64)
    for batch in read_records(data_dir, split).batch(1024).map(lambda s: tf.io.parse_example(s, spec)):
        values = batch[record_keys.LABEL].values.numpy()
        if values.size and (values.min() < 0 or values.max() >= schema.num_classes):
            raise DataError(f"{data_dir}: {split} has label ids outside 0..{schema.num_classes - 1}; re-run ingest")
        counts += np.bincount(values, minlength=schema.num_classes)
    if not multilabel and counts.sum() == 0:
        hint = ("it holds the patients ingest.shift_holdout selects: give ingest the patients through a manifest "
                "(scripts/make_manifest.py --patient-regex)" if split in SHIFT_SPLITS else "check ingest.split")
        raise DataError(f"{data_dir}: the {split} split has no records; {hint} and stats.json")
    return counts


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights, mean 1 over examples (sklearn's 'balanced'); 0 for absent classes."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def augmenter(augmentation: Any, seed: int) -> Any:
    """Keras preprocessing layers for the training split (None when every augmentation is off)."""
    import keras
    from keras import layers

    steps = []
    if augmentation.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if augmentation.rotation > 0:
        steps.append(layers.RandomRotation(augmentation.rotation, fill_mode="constant", seed=seed + 1))
    if augmentation.zoom > 0:
        steps.append(layers.RandomZoom(augmentation.zoom, fill_mode="constant", seed=seed + 2))
    if augmentation.shift > 0:
        steps.append(layers.RandomTranslation(augmentation.shift, augmentation.shift, fill_mode="constant",
                                              seed=seed + 3))
    if augmentation.contrast > 0:
        steps.append(layers.RandomContrast(augmentation.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(steps, name="augmentation") if steps else None


def encode_label(label: tf.Tensor, task: str, num_classes: int, class_weights: tf.Tensor | None) -> tuple:
    """Batched indices -> the target the loss expects (one-hot / [1] float / multi-hot) plus a sample weight when weighted."""
    if task == "multiclass":
        target = tf.one_hot(label, num_classes)
    elif task == "binary":
        target = tf.cast(tf.expand_dims(label, -1), tf.float32)  # [B, 1] for the 1-unit sigmoid
    else:
        target = label
    if class_weights is None or task == "multilabel":
        return (target,)
    return target, tf.gather(class_weights, label)


def make_dataset(
    data_dir: str | Path,
    split: str,
    schema: DatasetSchema,
    batch_size: int,
    *,
    training: bool = False,
    config: TaskConfig | None = None,
    class_weights: Sequence[float] | None = None,
    seed: int = 0,
    cache: bool = False,
    num_examples: int | None = None,
    replicas: int = 1,
) -> tf.data.Dataset:
    """(images float32 [B,S,S,C] 0..255, targets[, sample weights]) batches; `training` adds shuffle+augmentation.

    batch_size is the global batch (per-replica x replicas); MirroredStrategy splits each batch across replicas.
    cache=True keeps the records in memory after the first epoch (no re-reading/decompressing shards).
    num_examples (when known, e.g. from label_counts) sets the batch count so Keras shows progress and sizes epochs.
    replicas > 1: every batch must split evenly over the replicas (Keras + MirroredStrategy fail on a final batch
    of e.g. 15 over 2 devices), so training drops the last partial batch (reshuffled each epoch, nothing is lost for
    good) and other splits pad it with zero-weight copies (weighted metrics stay exact).
    """
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = read_records(data_dir, split, shuffle_files=training, seed=seed)
    if cache:
        dataset = dataset.cache()  # serialized PNG records: a few KB each, so whole splits fit in memory
    if training:
        # Shuffle the small serialized records, not decoded images: the buffer can then hold a whole split, which
        # matters because shards may be written class by class (a partial buffer would feed classes in runs).
        buffer = config.training.shuffle_buffer if config is not None else 1024
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda s: parse_example(s, schema), num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=training and replicas > 1)
    if training and config is not None:
        augment = augmenter(config.training.augmentation, seed)
        if augment is not None:
            # Batched: one vectorised call per batch, each image still gets its own random transform.
            dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=AUTOTUNE)
    weights = tf.constant(class_weights, tf.float32) if class_weights is not None else None
    dataset = dataset.map(
        lambda x, y: (x, *encode_label(y, schema.task, schema.num_classes, weights)), num_parallel_calls=AUTOTUNE
    )
    if replicas > 1 and not training:
        dataset = dataset.map(lambda *batch: pad_to_multiple(batch, replicas), num_parallel_calls=AUTOTUNE)
    if num_examples is not None:
        batches = num_examples // batch_size if training and replicas > 1 else -(-num_examples // batch_size)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.prefetch(AUTOTUNE).with_options(options)


def pad_to_multiple(batch: tuple, multiple: int) -> tuple:
    """(x, y[, w]) -> the batch padded to a multiple of `multiple` rows with copies of row 0 at sample weight 0."""
    x, y = batch[0], batch[1]
    weight = batch[2] if len(batch) > 2 else tf.ones(tf.shape(x)[:1], tf.float32)
    size = tf.shape(x)[0]
    missing = (multiple - size % multiple) % multiple

    def pad(tensor: tf.Tensor, fill: tf.Tensor | None = None) -> tf.Tensor:
        extra = tf.repeat(tensor[:1], missing, axis=0) if fill is None else tf.fill([missing], fill)
        return tf.concat([tensor, extra], axis=0)

    return pad(x), pad(y), pad(weight, tf.constant(0.0))


def num_outputs(schema: DatasetSchema) -> int:
    return output_units(schema.task, schema.num_classes)
