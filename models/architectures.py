"""Model builders: a compact CNN sized for a 2-core CPU, and keras.applications backbones.

`build_model(config, num_outputs)` is a pure function called inside `strategy.scope()`. Every model takes raw
0..255 float images [S, S, C]; normalisation is its first layer, so tf.data, evaluation and the SavedModel feed the
same tensors. Outputs: softmax over the classes for multiclass, sigmoid for binary (1 unit = P(labels[1])) and
multilabel (one unit per label); see `output_units`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import keras
from keras import layers

from medpipe.config import TaskConfig
from medpipe.errors import ConfigError

LAST_CONV_NAME = "last_conv"  # the top-level feature map Grad-CAM explains, in every model build_model makes

# Batch-norm statistics must settle within the first epoch of a ~150-step epoch (Keras' 0.99 needs ~500 steps, so
# validation looked like chance for several epochs).
BN_MOMENTUM = 0.9


def bn_momentum_for(steps_per_epoch: int) -> float:
    """Moving statistics that settle within one epoch (weight of the initial value <= 1%), at most BN_MOMENTUM.

    A short run (the demo: 2 steps an epoch) with 0.9 keeps the initial mean 0 / variance 1; stacked batch norms then
    shrink every activation towards 0 at inference and the model answers a uniform distribution for every image.
    """
    return min(BN_MOMENTUM, 0.01 ** (1.0 / max(1, steps_per_epoch)))

BACKBONES: dict[str, str] = {"efficientnet_b0": "EfficientNetB0", "resnet50": "ResNet50", "densenet121": "DenseNet121",
                             "mobilenet": "MobileNet"}

# The input scaling each backbone's ImageNet weights expect, from 0..255 RGB, as (mean, std) per channel; written as
# a Normalization layer (not a Lambda) so model.keras loads in safe mode. EfficientNet scales inside itself.
# ResNet50's "caffe" mode also flips RGB to BGR: identical for grey input (every task here); with RGB input and
# ImageNet weights the channel order differs from Keras' own preprocess_input, which fine-tuning absorbs.
BACKBONE_SCALING: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "resnet50": ((123.68, 116.779, 103.939), (1.0, 1.0, 1.0)),
    "densenet121": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "mobilenet": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),  # "tf" mode: -1..1
}


def output_units(task: str, num_classes: int) -> int:
    """binary -> 1 sigmoid unit (probability of the second label); otherwise one unit per label."""
    return 1 if task == "binary" else num_classes


def output_activation(task: str) -> str:
    return "softmax" if task == "multiclass" else "sigmoid"


def conv_block(filters: int, name: str, bn_momentum: float = BN_MOMENTUM) -> Callable[[Any], Any]:
    """Two depthwise-separable 3x3 convolutions with batch norm: ~8x fewer FLOPs than plain convs at equal width."""

    def apply(x: Any) -> Any:
        for index in (1, 2):
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sepconv{index}")(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{index}")(x)
            x = layers.ReLU(name=f"{name}_relu{index}")(x)
        return x

    return apply


def compact_cnn(inputs: Any, width: int, blocks: int = 4, bn_momentum: float = BN_MOMENTUM) -> Any:
    """Stride-2 stem then `blocks` separable blocks (width doubling, max-pool between): the CPU-budget default.

    At 128x128 and width 32 a forward pass is about 60 MFLOPs, so an epoch of the brain MRI set is a minute or two
    on two cores, while the receptive field still covers the whole 128-pixel image.
    """
    x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for index in range(blocks):
        if index:
            x = layers.MaxPooling2D(2, name=f"block{index}_pool")(x)
        x = conv_block(width * 2**index, name=f"block{index}", bn_momentum=bn_momentum)(x)
    # A named identity so Grad-CAM finds the last feature map without knowing the block structure.
    return layers.Activation("linear", name=LAST_CONV_NAME)(x)


BACKBONE_LAYER = "backbone"  # the nested keras.applications model inside a classifier (what fine_tune freezes)
WEIGHT_FILE_SUFFIXES = (".weights.h5", ".keras", ".h5")


def build_backbone(name: str, size: int, weights: str = "none") -> keras.Model:
    """The keras.applications model `name` without its top, for size x size RGB input; weights 'none' or 'imagenet'
    (a download: network needed)."""
    constructor = getattr(keras.applications, BACKBONES[name])
    try:
        return constructor(include_top=False, weights=None if weights == "none" else weights,
                           input_shape=(size, size, 3), name=BACKBONE_LAYER)
    except Exception as exc:  # keras raises a bare Exception("URL fetch failure ...") without network
        if weights == "imagenet":
            raise ConfigError(
                f"could not download ImageNet weights for {BACKBONES[name]} ({exc}); this machine has no network: "
                f"download the *_notop.h5 file elsewhere (docs/operations.md, Transfer learning) and pass "
                f"--set training.weights=none --set training.backbone_weights=/path/to/file.h5"
            ) from exc
        raise


def load_backbone_weights(model: keras.Model, file: str, name: str) -> None:
    """Load a local weights file into a backbone built by build_backbone; ConfigError when it is missing or does not
    fit. Accepted: model.save_weights' *.weights.h5, a saved *.keras model of the same backbone, and the standard
    ImageNet *_notop.h5 files that keras.applications downloads."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"training.backbone_weights: {path} does not exist; give the path to a local "
                          f"{BACKBONES[name]} weights file (docs/operations.md says where to get ImageNet weights)")
    if not path.name.endswith(WEIGHT_FILE_SUFFIXES):
        raise ConfigError(f"training.backbone_weights: {path} is not a Keras weights file; expected a name ending in "
                          f"{', '.join(WEIGHT_FILE_SUFFIXES)}")
    try:
        with warnings.catch_warnings():  # a mismatch also warns once per layer before it raises: the error says it
            warnings.simplefilter("ignore")
            model.load_weights(str(path))
    except Exception as exc:  # ValueError/KeyError/OSError from h5py or keras' loaders, depending on the mismatch
        raise ConfigError(f"training.backbone_weights: {path} does not fit training.model {name} "
                          f"({BACKBONES[name]} without its top): {type(exc).__name__}: {str(exc)[:300]}. "
                          f"Use weights saved from the same keras.applications model (include_top=False)") from exc


def backbone(inputs: Any, name: str, weights: str, channels: int, backbone_weights: str | None = None) -> Any:
    """A keras.applications model nested as one layer named `backbone` (Grad-CAM looks inside nested models).

    With pretrained weights (imagenet or a local file) the backbone's BatchNorm layers are frozen: they run in
    inference mode on the ImageNet statistics, while the rest is frozen and after unfreezing (Keras' transfer-learning
    recipe: statistics updated from a few small medical batches would wreck the pretrained features). It is done
    with `trainable = False` on each BatchNorm layer, because Keras 3 overrides a `training=False` given when the
    nested model is called inside a functional graph. Trained from scratch, BatchNorm learns as usual.
    """
    x = inputs
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])  # backbones expect 3 channels
    if name in BACKBONE_SCALING:
        mean, std = BACKBONE_SCALING[name]
        x = layers.Normalization(mean=list(mean), variance=[s**2 for s in std], name="backbone_scaling")(x)
    model = build_backbone(name, inputs.shape[1], weights)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights, name)
    if weights == "imagenet" or backbone_weights is not None:
        set_frozen(model, 0)
    return model(x)


def frozen_count(layer_names: list[str], freeze: float | str) -> int:
    """How many of the backbone's layers (from the input) fine_tune.freeze names: a fraction of them (at least one),
    or every layer up to and including the named one."""
    if isinstance(freeze, str):
        if freeze not in layer_names:
            close = [name for name in layer_names if name.split("_")[0] == freeze.split("_")[0]][:5]
            raise ConfigError(f"training.fine_tune.freeze: the backbone has no layer {freeze!r} (e.g. "
                              f"{', '.join(close or layer_names[-5:])}); give a layer name or a fraction such as 0.7")
        return layer_names.index(freeze) + 1
    return max(1, min(len(layer_names), round(freeze * len(layer_names))))


def set_frozen(backbone_model: keras.Model, count: int) -> None:
    """Freeze the first `count` layers of a pretrained backbone and make the others trainable, except BatchNorm
    layers, which stay frozen (inference mode) throughout. Recompile afterwards."""
    backbone_model.trainable = True
    for index, layer in enumerate(backbone_model.layers):
        layer.trainable = index >= count and not isinstance(layer, layers.BatchNormalization)


def build_model(config: TaskConfig, num_outputs: int, steps_per_epoch: int | None = None) -> keras.Model:
    """The classifier for a TaskConfig: raw 0..255 images in, probabilities out (steps_per_epoch sizes BN momentum)."""
    training = config.training
    size, channels = config.image.size, config.image.channels
    inputs = keras.Input((size, size, channels), name="image", dtype="float32")
    if training.model == "compact_cnn":
        momentum = BN_MOMENTUM if steps_per_epoch is None else bn_momentum_for(steps_per_epoch)
        features = compact_cnn(layers.Rescaling(1.0 / 255, name="rescale")(inputs), training.width,
                               bn_momentum=momentum)
    elif training.model in BACKBONES:
        features = backbone(inputs, training.model, training.weights, channels, training.backbone_weights)
        features = layers.Activation("linear", name=LAST_CONV_NAME)(features)
    else:  # load_config already restricts the names; this guards direct callers
        raise ConfigError(f"training.model {training.model!r} is not one of compact_cnn, {', '.join(BACKBONES)}")
    x = layers.GlobalAveragePooling2D(name="gap")(features)
    x = layers.Dropout(training.dropout, name="dropout")(x)
    # float32 output even under mixed precision, so probabilities and losses stay exact.
    outputs = layers.Dense(num_outputs, activation=output_activation(config.task), dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"{config.name}_{training.model}")
