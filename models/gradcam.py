"""Grad-CAM (Selvaraju et al. 2017): where in the image the model looked for a class.

The layer is found automatically: the last layer, in topological order and looking inside nested models (the
keras.applications backbones are nested as one layer), whose output is a 4-D feature map with more than one pixel,
pooling layers excluded. That is `top_activation` for EfficientNetB0, `conv5_block3_out` for ResNet50, `relu` for
DenseNet121 and the last conv block of the compact CNN.

One computation serves everywhere: `gradcam_from_forward` takes a forward function returning (feature map, model
outputs) and runs in TensorFlow ops only, so the SavedModel's `explain` signature traces it into the graph
(models.safety.SafeClassifier) and the report calls the very same function eagerly. For a layer of the top-level
model (every model of models.architectures.build_model has a top-level `last_conv`), the forward function is
keras.Model(inputs, [layer.output, outputs]); only a layer inside a nested model (where that model cannot be built)
is captured by wrapping its `call` for one forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

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


def predicted_class_ids(outputs: Any) -> Any:
    """argmax of softmax rows; p >= 0.5 for one sigmoid unit (tf ops)."""
    import tensorflow as tf

    outputs = tf.cast(outputs, tf.float32)
    if outputs.shape[-1] == 1:
        return tf.cast(outputs[:, 0] >= 0.5, tf.int32)
    return tf.argmax(outputs, axis=-1, output_type=tf.int32)


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


def gradcam_from_forward(forward: Callable, images: Any, class_ids: Any = None) -> tuple[Any, tuple]:
    """(heat maps [N, H, W] float32 0..1, everything `forward` returned), in TensorFlow ops (graph or eager).

    `forward(images)` returns (feature map [N, h, w, k], model outputs [N, C], ...); `class_ids` is the class to
    explain per image: a tensor, or a function of the outputs (default: the predicted class, argmax / p >= 0.5).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)  # every op from the pixels on is recorded, the feature map included
        results = forward(images)
        feature_map, outputs = results[0], results[1]
        if class_ids is None:
            class_ids = predicted_class_ids(outputs)
        elif callable(class_ids):
            class_ids = class_ids(outputs)
        scores = class_scores(outputs, class_ids)
    gradients = tape.gradient(scores, feature_map)
    return cam_maps(feature_map, gradients, tf.shape(images)[1:3]), results


def feature_forward(model: Any, layer: Any) -> Callable:
    """forward(images) -> (layer's output, model outputs) for gradcam_from_forward."""
    import keras

    if any(layer is top for top in model.layers):
        two_outputs = keras.Model(model.input, [layer.output, model.output])
        return lambda images: tuple(two_outputs(images, training=False))

    def captured(images):  # a layer inside a nested model: see the module docstring
        import tensorflow as tf

        store: dict = {}
        with tf.GradientTape() as inner, _capture_output(layer, inner, store):
            outputs = model(images, training=False)
        if "activations" not in store:
            raise ValueError(f"layer {layer.name!r} was not used in the forward pass of {model.name!r}")
        return store["activations"], outputs

    return captured


def gradcam(
    model: Any, images: np.ndarray, class_ids: Optional[Sequence[int]] = None, layer: Any = None
) -> np.ndarray:
    """Heat maps [N, H, W] in 0..1 at the input resolution, for `class_ids` (default: the predicted class).

    `images` are what the model takes (float32 0..255, [N, H, W, C]); `layer` a layer or its name (default: found
    automatically).
    """
    if layer is None:
        layer = find_last_conv_layer(model)
    elif isinstance(layer, str):
        layer = find_layer(model, layer)
    ids = None if class_ids is None else np.asarray(class_ids, dtype=np.int32)
    maps, _ = gradcam_from_forward(feature_forward(model, layer), np.asarray(images, dtype=np.float32), ids)
    return np.asarray(maps)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture: the grey (or RGB) image with the heat map in the 'jet' colours on top."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)
