"""Grad-CAM: a small model trained to find a bright blob looks at the blob on images it never saw."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.gradcam import find_last_conv_layer, gradcam, overlay  # noqa: E402

SIZE = 32
RADIUS = 4


def _blob_images(count: int, seed: int):
    """Grey noise; half the images carry one bright disc at a random place. Returns images, labels, centres."""
    rng = np.random.default_rng(seed)
    images = rng.normal(50, 12, (count, SIZE, SIZE, 1)).clip(0, 255).astype(np.float32)
    labels = np.arange(count) % 2
    centres = rng.integers(RADIUS + 1, SIZE - RADIUS - 1, (count, 2))
    rows, cols = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(labels):
        disc = (rows - centres[i, 0]) ** 2 + (cols - centres[i, 1]) ** 2 <= RADIUS**2
        images[i, disc, 0] = 220.0
    return images, labels, centres


def _nested_blob_model() -> keras.Model:
    """Input -> rescale -> a nested backbone model (as keras.applications are nested) -> pooling -> softmax."""
    inner_input = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inner_input)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    backbone = keras.Model(inner_input, x, name="backbone")
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="blob_detector")


@pytest.fixture(scope="module")
def blob_model():
    keras.utils.set_random_seed(0)
    images, labels, _ = _blob_images(400, seed=1)
    model = _nested_blob_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=6, batch_size=32, verbose=0)
    return model


def test_last_conv_layer_is_found_inside_the_nested_backbone(blob_model):
    assert find_last_conv_layer(blob_model).name == "last_conv"


def test_heatmap_peak_is_inside_the_blob_on_held_aside_images(blob_model):
    images, labels, centres = _blob_images(40, seed=99)
    predicted = blob_model.predict(images, verbose=0).argmax(axis=1)
    assert np.mean(predicted == labels) >= 0.9, "the blob detector did not learn; Grad-CAM would mean nothing"
    positives = np.flatnonzero(labels == 1)
    maps = gradcam(blob_model, images[positives], class_ids=np.ones(len(positives), dtype=int))
    assert maps.shape == (len(positives), SIZE, SIZE)
    assert maps.min() >= 0 and np.allclose(maps.reshape(len(positives), -1).max(axis=1), 1.0)
    hits = 0
    for heatmap, centre in zip(maps, centres[positives]):
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        # within the disc, allowing one pixel for the 2x-down-sampled feature map
        hits += np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= RADIUS + 1
    assert hits / len(positives) >= 0.9, f"peak inside the blob for only {hits}/{len(positives)} images"

    picture = overlay(images[positives[0]], maps[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.dtype == np.uint8


def test_backbone_layer_names():
    """The automatic choice for a keras.applications backbone nested in a classifier, as architectures builds."""
    inputs = keras.Input((64, 64, 3))
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    assert find_last_conv_layer(model).name == "conv5_block3_out"
    maps = gradcam(model, np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
