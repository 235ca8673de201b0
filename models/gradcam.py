"""Grad-CAM (Selvaraju et al. 2017): where in the image the model looked for a class.

Every model of models.architectures.build_model has a top-level `last_conv` layer (the compact CNN's last conv
block, or a backbone's output), so the feature map and the outputs come from one keras.Model(inputs,
[last_conv.output, ...]) forward pass (models.safety.SafeClassifier.forward). `gradcam_from_forward` takes that
forward function and runs in TensorFlow ops only, so the SavedModel's `explain` signature traces it into the graph
and the report (models.evaluate) gets its heat maps from that same signature or the same SafeClassifier.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def class_scores(outputs: Any, class_ids: Any) -> Any:
    """The score of each image's class: softmax column, or for one sigmoid output p (class 1) / 1 - p (class 0)."""
    import tensorflow as tf

    outputs = tf.cast(outputs, tf.float32)
    class_ids = tf.cast(class_ids, tf.int32)
    if outputs.shape[-1] == 1:
        positive = outputs[:, 0]
        return tf.where(class_ids == 1, positive, 1.0 - positive)
    return tf.gather(outputs, class_ids, axis=1, batch_dims=1)


def cam_maps(feature_map: Any, gradients: Any, size: Any) -> Any:
    """Grad-CAM maps [N, H, W] in 0..1 (tf ops): channel weights = mean gradient, ReLU of the weighted sum, bilinear
    resize to the input's H x W, divided by each map's peak (an all-zero map stays zero)."""
    import tensorflow as tf

    feature_map, gradients = tf.cast(feature_map, tf.float32), tf.cast(gradients, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # one weight per channel
    cams = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))[..., tf.newaxis]
    cams = tf.image.resize(cams, size, method="bilinear")[..., 0]
    peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
    return tf.where(peak > 0, cams / tf.where(peak > 0, peak, 1.0), 0.0)


def gradcam_from_forward(forward: Callable, images: Any, class_ids: Any) -> tuple[Any, tuple]:
    """(heat maps [N, H, W] float32 0..1, everything `forward` returned), in TensorFlow ops (graph or eager).

    `forward(images)` returns (feature map [N, h, w, k], model outputs [N, C], ...); `class_ids` is the class to
    explain per image: a tensor, or a function of the outputs (the served predicted class, in SafeClassifier).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)  # every op from the pixels on is recorded, the feature map included
        results = forward(images)
        feature_map, outputs = results[0], results[1]
        if callable(class_ids):
            class_ids = class_ids(outputs)
        scores = class_scores(outputs, class_ids)
    gradients = tape.gradient(scores, feature_map)
    return cam_maps(feature_map, gradients, tf.shape(images)[1:3]), results


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture: the grey (or RGB) image with the heat map in the 'jet' colours on top."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)
