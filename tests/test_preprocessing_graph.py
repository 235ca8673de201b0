"""models.preprocessing (graph side) against Pillow (what medpipe.imaging uses on the host side)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE

tf = pytest.importorskip("tensorflow")

from models.preprocessing import decode_image_tensor  # noqa: E402


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_png_at_size_is_decoded_losslessly():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    out = decode_image_tensor(tf.constant(encode(Image.fromarray(pixels, "L"), "PNG")), 32, 1).numpy()
    assert out.dtype == np.float32 and out.shape == (32, 32, 1)
    np.testing.assert_array_equal(out[..., 0], pixels.astype(np.float32))


def test_rgb_to_grey_matches_pillow_L():
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(rgb, "RGB")
    out = decode_image_tensor(tf.constant(encode(image, "PNG")), 16, 1).numpy()[..., 0]
    expected = np.asarray(image.convert("L"), dtype=np.float32)
    assert np.abs(out - expected).max() <= 1.0  # Pillow rounds in 16-bit fixed point


def test_real_jpeg_is_padded_centred_and_resized():
    path = next((SAMPLE / "brain_mri" / "glioma").glob("*.jpg"))
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        grey = image.convert("L")
    out = decode_image_tensor(tf.constant(data), 64, 1).numpy()
    assert out.shape == (64, 64, 1) and 0 <= out.min() and out.max() <= 255
    # Pillow reference for the same geometry: pad to a centred black square, then resize.
    side = max(grey.size)
    canvas = Image.new("L", (side, side))
    canvas.paste(grey, ((side - grey.size[0]) // 2, (side - grey.size[1]) // 2))
    reference = np.asarray(canvas.resize((64, 64), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    assert np.abs(out[..., 0] - reference).mean() < 3.0  # different resamplers, same picture


def test_grey_to_three_channels_and_non_square_padding():
    pixels = np.full((10, 20), 200, dtype=np.uint8)
    out = decode_image_tensor(tf.constant(encode(Image.fromarray(pixels, "L"), "PNG")), 20, 3).numpy()
    assert out.shape == (20, 20, 3)
    assert (out[0] == 0).all() and (out[10] == 200).all()  # black bands above and below the centred image
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
