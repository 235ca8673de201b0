"""Grad-CAM: a small model trained to find a bright blob looks at the blob on images it never saw."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.gradcam import gradcam_from_forward, overlay  # noqa: E402
from models.safety import SafeClassifier  # noqa: E402

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


def _blob_model() -> keras.Model:
    """Input -> rescale -> conv blocks -> `last_conv` -> gap -> probs: the layer names build_model gives."""
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="blob_detector")


def gradcam(model: keras.Model, images: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Heat maps of CLASS_IDS through the forward pass the `explain` signature uses (no calibration)."""
    maps, _ = gradcam_from_forward(SafeClassifier(model, "multiclass", 2, None).forward, images, class_ids)
    return np.asarray(maps)


@pytest.fixture(scope="module")
def blob_model():
    keras.utils.set_random_seed(0)
    images, labels, _ = _blob_images(400, seed=1)
    model = _blob_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=6, batch_size=32, verbose=0)
    return model


def test_heatmap_peak_is_inside_the_blob_on_held_aside_images(blob_model):
    images, labels, centres = _blob_images(40, seed=99)
    predicted = blob_model.predict(images, verbose=0).argmax(axis=1)
    assert np.mean(predicted == labels) >= 0.9, "the blob detector did not learn; Grad-CAM would mean nothing"
    positives = np.flatnonzero(labels == 1)
    maps = gradcam(blob_model, images[positives], class_ids=np.ones(len(positives), dtype=np.int32))
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


def test_backbone_models_are_explained_on_their_top_level_last_conv():
    """A keras.applications backbone nested in the classifier, as build_model makes it: no layer search needed."""
    from medpipe.config import load_config
    from models.architectures import build_model

    config = load_config("brain_mri", ["image.size=64", "training.model=resnet50"])
    model = build_model(config, len(config.labels))
    assert model.get_layer("last_conv").output.shape[1:3] == (2, 2)
    maps = np.asarray(SafeClassifier(model, "multiclass", len(config.labels), None)(
        np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)), explain=True)["heatmap"])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
