"""Pure helpers that turn a prediction into what the page shows: data URIs, a coloured heat map, probability bars."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# A perceptually ordered ramp (dark blue -> cyan -> yellow -> red), 5 anchors interpolated to 256 entries: readable
# over a grey MRI slice and still ordered for readers with red-green colour blindness.
_ANCHORS = np.array([[0, 0, 96], [0, 128, 255], [0, 230, 200], [255, 230, 0], [230, 0, 0]], dtype=np.float32)


def _ramp() -> np.ndarray:
    positions = np.linspace(0, len(_ANCHORS) - 1, 256)
    low = np.floor(positions).astype(int).clip(0, len(_ANCHORS) - 2)
    fraction = (positions - low)[:, None]
    return (_ANCHORS[low] * (1 - fraction) + _ANCHORS[low + 1] * fraction).astype(np.uint8)


RAMP = _ramp()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heatmap_png(heatmap: np.ndarray, size: int) -> bytes:
    """A [H, W] map in 0..1 as an RGBA PNG of size x size; alpha follows the heat so cold areas stay see-through."""
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0).clip(0.0, 1.0)
    index = (heat * 255).round().astype(np.uint8)
    rgba = np.concatenate([RAMP[index], (64 + heat * 191).astype(np.uint8)[..., None]], axis=-1)
    image = Image.fromarray(rgba, mode="RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def probability_rows(probabilities: dict[str, float], predicted: str | None) -> list[dict]:
    """Rows for the bar chart, highest first: label, percentage text and bar width, and whether it is the finding."""
    rows = []
    for label, value in sorted(probabilities.items(), key=lambda item: -item[1]):
        percent = 100.0 * float(value)
        rows.append({"label": label, "percent": f"{percent:.1f}", "width": f"{max(percent, 0.5):.1f}",
                     "predicted": label == predicted})
    return rows
