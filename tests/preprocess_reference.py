"""The host preprocessing as it was before issue 21 (medpipe.imaging at 0e71907), pinned as a reference.

preprocess_bytes now keeps rasters as Pillow images from decode to PNG; this copy goes through numpy at source
resolution (pil_to_uint8 -> to_channels -> pixel_hash -> pad_to_square -> resize_square -> encode_png), as the
pipeline did. tests/test_imaging.py holds the two to the same PNG bytes, pixels and pixel hash. The DICOM grey
pipeline itself is shared (medpipe.imaging.decode_dicom, unchanged); only the geometry after it is pinned here.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

from medpipe import imaging


def preprocess_bytes(data: bytes, config: Any) -> tuple[bytes, np.ndarray, str]:
    """(png, pixels [S, S, C], pixel_hash) as the pre-issue-21 code computed them."""
    kind = imaging.sniff(data)
    if kind == "dicom":
        image, decoded = imaging.decode_dicom(data, config)
    else:
        image, decoded = decode_raster(data, config, kind)
    imaging.check_min_size(decoded.width, decoded.height, config.ingest.min_size)
    image = to_channels(image, config.image.channels)
    digest = pixel_hash(image)
    pixels = resize_square(pad_to_square(image), config.image.size)
    return encode_png(pixels), pixels, digest


def decode_raster(data: bytes, config: Any, kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        mode = im.mode
        if kind == "jpeg":
            imaging.request_draft(im, config.image.size, config.image.channels)
        im.seek(0)
        im.load()
        image = pil_to_uint8(im, config.dicom.voi_percentiles, config.image.channels)
    return image, imaging.DecodedImage(format=kind, mode=mode, width=width, height=height)


def pil_to_uint8(im: Image.Image, percentiles: tuple[float, float], channels: int) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return imaging.robust_window(np.asarray(im).astype(np.float64), *percentiles)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode == "L":
        return np.asarray(im)
    has_alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"))
        colour = rgba[..., :3] if channels == 3 else rgb_to_grey(rgba[..., :3])
        return imaging.composite_on_black(colour, rgba[..., 3])
    rgb = np.asarray(im.convert("RGB"))
    return rgb if channels == 3 else rgb_to_grey(rgb)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").convert("L"))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    return rgb_to_grey(image)[..., None]


def pad_to_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image, "L" if channels == 1 else "RGB")
    resized = np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=2.0))
    return resized[..., None] if channels == 1 else resized


def encode_png(pixels: np.ndarray) -> bytes:
    channels = pixels.shape[2]
    pil = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def pixel_hash(pixels: np.ndarray) -> str:
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
