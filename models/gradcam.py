"""Grad-CAM (Selvaraju et al. 2017): where in the image the model looked for a class.

The layer is found automatically: the last layer, in topological order and looking inside nested models (the
keras.applications backbones are nested as one layer), whose output is a 4-D feature map with more than one pixel,
pooling layers excluded. That is `top_activation` for EfficientNetB0, `conv5_block3_out` for ResNet50, `relu` for
DenseNet121 and the last conv block of the compact CNN.

The activations are captured by wrapping the chosen layer's `call` for the duration of one forward pass, so the
same code works whether the layer sits in the top-level model or inside a nested backbone (where
`keras.Model(model.inputs, inner_layer.output)` cannot be built).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np

_SKIPPED_KINDS = ("Pooling", "Dropout", "InputLayer")


def _flatten_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # a nested Model / Sequential
            yield from _flatten_layers(layer)
        yield layer


def _feature_map_rank_ok(layer: Any) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # a layer never called, or called several times
        return False
    if len(shape) != 4:
        return False
    height, width = shape[1], shape[2]
    return height is None or width is None or height * width > 1


def find_last_conv_layer(model: Any) -> Any:
    """The layer Grad-CAM reads (see the module docstring); ValueError when the model has no feature map."""
    candidates = [
        layer for layer in _flatten_layers(model)
        if not any(kind in type(layer).__name__ for kind in _SKIPPED_KINDS)
        and not (hasattr(layer, "layers") and layer.layers)
        and _feature_map_rank_ok(layer)
    ]
    if not candidates:
        raise ValueError(f"model {model.name!r} has no 4-D feature map layer; Grad-CAM needs a convolutional model")
    return candidates[-1]


def find_layer(model: Any, name: str) -> Any:
    for layer in _flatten_layers(model):
        if layer.name == name:
            return layer
    raise ValueError(f"no layer named {name!r} in model {model.name!r} (nested models searched too)")


@contextlib.contextmanager
def _capture_output(layer: Any, tape: Any, store: dict) -> Iterator[None]:
    original = layer.call

    def call(*args, **kwargs):
        output = original(*args, **kwargs)
        tape.watch(output)
        store["activations"] = output
        return output

    layer.call = call  # an instance attribute shadows the class method for this forward pass only
    try:
        yield
    finally:
        del layer.call


def class_scores(outputs: Any, class_ids: Any) -> Any:
    """The score of each image's class: softmax column, or for one sigmoid output p (class 1) / 1 - p (class 0)."""
    import tensorflow as tf

    outputs = tf.cast(outputs, tf.float32)
    class_ids = tf.cast(class_ids, tf.int32)
    if outputs.shape[-1] == 1:
        positive = outputs[:, 0]
        return tf.where(class_ids == 1, positive, 1.0 - positive)
    return tf.gather(outputs, class_ids, axis=1, batch_dims=1)


def gradcam(
    model: Any, images: np.ndarray, class_ids: Optional[Sequence[int]] = None, layer: Any = None
) -> np.ndarray:
    """Heat maps [N, H, W] in 0..1 at the input resolution, for `class_ids` (default: the predicted class).

    `images` are what the model takes (float32 0..255, [N, H, W, C]); `layer` a layer or its name (default: found
    automatically).
    """
    import tensorflow as tf

    if layer is None:
        layer = find_last_conv_layer(model)
    elif isinstance(layer, str):
        layer = find_layer(model, layer)
    images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    store: dict = {}
    with tf.GradientTape() as tape:
        with _capture_output(layer, tape, store):
            outputs = model(images, training=False)
        if "activations" not in store:
            raise ValueError(f"layer {layer.name!r} was not used in the forward pass of {model.name!r}")
        if class_ids is None:
            class_ids = _predicted_classes(outputs)
        scores = class_scores(outputs, class_ids)
    activations = tf.cast(store["activations"], tf.float32)
    gradients = tf.cast(tape.gradient(scores, store["activations"]), tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # one weight per channel
    cams = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))[..., tf.newaxis]
    cams = tf.image.resize(cams, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def _predicted_classes(outputs: Any) -> np.ndarray:
    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        return (outputs[:, 0] >= 0.5).astype(np.int32)
    return outputs.argmax(axis=-1).astype(np.int32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture: the grey (or RGB) image with the heat map in the 'jet' colours on top."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)
