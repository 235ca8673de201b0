"""Graph-side preprocessing: the one decode used by tf.data (training, evaluation) and by the SavedModel signature.

Host-side image code lives in `medpipe.imaging` (ingest, `evaluate --images`, the predict client); this module is
its in-graph counterpart for bytes that are already PNG/JPEG. Ingest writes PNGs at exactly image.size x image.size,
so for records the decode is lossless and pad/resize is skipped. For other bytes (a JPEG sent to the server) the
result differs slightly from `medpipe.imaging.preprocess_bytes`:
- grey conversion uses the same ITU-R 601-2 weights as Pillow's "L" mode (299/587/114 per mille) in float32 and
  rounds to the nearest integer, where Pillow uses 16-bit fixed point: at most 1 grey level apart;
- resizing is `tf.image.resize` bilinear with antialiasing, not Pillow BILINEAR with reducing_gap: a few grey
  levels apart on strongly downscaled images;
- no DICOM: DICOM is decoded on the host (`medpipe.imaging`) and sent as PNG.
Normalisation (/255) is not done here: it is the first layer inside the model, so 0..255 floats are the model input.
"""

from __future__ import annotations

import tensorflow as tf

from medpipe import schema as record_keys
from medpipe.schema import DatasetSchema

# Pillow's "L" conversion weights (ITU-R 601-2 luma).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8/float [H, W, c] with c in {1, 3, 4} -> float32 [H, W, channels] (0..255)."""
    image = tf.cast(image, tf.float32)
    have = tf.shape(image)[-1]
    image = tf.cond(have == 4, lambda: image[..., :3], lambda: image)  # drop alpha like Pillow's RGBA -> L/RGB
    if channels == 1:
        return tf.cond(
            tf.shape(image)[-1] == 3,
            lambda: tf.round(tf.reduce_sum(image * tf.constant(GREY_WEIGHTS, tf.float32), -1, keepdims=True)),
            lambda: image[..., :1],
        )
    return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image)


def pad_to_square(image: tf.Tensor) -> tf.Tensor:
    """Centre the image on a black square canvas (the same placement rule as medpipe.imaging)."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.maximum(height, width)
    return tf.image.pad_to_bounding_box(image, (side - height) // 2, (side - width) // 2, side, side)


def fit_to_size(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Pad to square and resize, only when the image is not already image_size x image_size (records never are)."""
    shape = tf.shape(image)
    already = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))

    def fit() -> tf.Tensor:
        resized = tf.image.resize(pad_to_square(image), (image_size, image_size), method="bilinear", antialias=True)
        return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

    return tf.cond(already, lambda: image, fit)


def decode_image_tensor(image_bytes: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """PNG/JPEG bytes (tf.string scalar) -> float32 [image_size, image_size, channels] in 0..255."""
    image = tf.io.decode_image(image_bytes, channels=0, expand_animations=False, dtype=tf.uint8)
    image = to_channels(image, channels)
    image = fit_to_size(image, image_size)
    return tf.ensure_shape(image, (image_size, image_size, channels))


def parse_example(serialized: tf.Tensor, schema: DatasetSchema) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized tf.train.Example -> (float32 image [S, S, C] 0..255, label).

    The label is the int64 class index for multiclass/binary tasks and a float32 multi-hot [num_classes] vector for
    multilabel tasks (whose records carry every positive index in image/class/label). Only the image and label are
    parsed: the other schema features (pseudonym, DICOM fields) are metadata.
    """
    multilabel = schema.task == "multilabel"
    spec = {
        record_keys.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        record_keys.LABEL: tf.io.VarLenFeature(tf.int64) if multilabel else tf.io.FixedLenFeature([], tf.int64),
    }
    parsed = tf.io.parse_single_example(serialized, spec)
    image = decode_image_tensor(parsed[record_keys.IMAGE_ENCODED], schema.image_size, schema.channels)
    label = parsed[record_keys.LABEL]
    if multilabel:
        label = tf.minimum(tf.reduce_sum(tf.one_hot(tf.sparse.to_dense(label), schema.num_classes), axis=0), 1.0)
        label = tf.ensure_shape(label, (schema.num_classes,))
    return image, label
