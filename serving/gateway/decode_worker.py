"""One decode worker of the gateway's decode pool (serving/gateway/decode_pool.py): a process that turns the bytes of
one image into model-ready pixels with medpipe.imaging, under a hard address-space limit (RLIMIT_AS).

Kept small on purpose: the forkserver preloads this module (numpy, Pillow, pydicom, ISA-L; never TensorFlow or
gRPC), so a replacement worker is a fork of an already-warm process. A hostile file can at worst exhaust this
process's memory or time; the pool then kills and replaces it, and the gateway refuses that one input.
"""

from __future__ import annotations

import os

# One thread per worker: the pool is the parallelism, and BLAS thread pools reserve address space under RLIMIT_AS.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import resource  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import pydicom.pixels  # noqa: E402,F401 - imported by the forkserver once, not by every worker

from medpipe import imaging  # noqa: E402
from medpipe.errors import RejectedInput  # noqa: E402

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class Decoded:
    """What a worker sends back for one image: the PNG to forward (b"" = forward the input as sent, it already is
    the exact PNG), the pixels the model sees, what the source was, and the DICOM UIDs for the response."""

    png: bytes
    pixels: np.ndarray
    decoded: imaging.DecodedImage
    pixel_hash: str
    uids: Optional[dict]
    exact: bool


def is_exact_png(data: bytes, prepared, config) -> bool:
    """True when the input already is the PNG preprocessing would produce pixel for pixel: an 8-bit grey (or RGB
    for 3-channel models) PNG of exactly image.size x image.size without transparency, which preprocess_bytes
    passes through unchanged. It is then forwarded as sent: re-encoding it would cost time and change nothing."""
    if prepared.decoded.format != "png" or not (prepared.decoded.width == prepared.decoded.height == config.image.size):
        return False
    return exact_png_header(data, config)


def exact_png_header(data: bytes, config) -> bool:
    """The header-only half of is_exact_png: PNG magic, IHDR of image.size x image.size at 8 bits in the model's
    colour type, no tRNS before the pixel data. Such a file decodes in bounded memory (image.size squared pixels;
    Pillow caps its text chunks), so the gateway may decode it in its own process."""
    if len(data) < 33 or not data.startswith(imaging.PNG_MAGIC) or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]  # IHDR, right after the signature and the chunk header
    wanted = 0 if config.image.channels == 1 else 2
    idat = data.find(b"IDAT")
    head = data[:idat] if idat >= 0 else data
    return width == height == config.image.size and bit_depth == 8 and colour_type == wanted and b"tRNS" not in head


def dicom_uids(data: bytes) -> Optional[dict]:
    """Study/Series/SOP Instance UIDs of a DICOM object (bounded header read), for the response only."""
    try:
        header = imaging.read_dicom_header(data)
        return {keyword: str(header.get(keyword, "")) for keyword in UID_KEYWORDS}
    except Exception:  # noqa: BLE001 - the image was already decoded; missing UIDs are simply not returned
        return None


def decode(data: bytes, config) -> Decoded:
    """preprocess_bytes + what the gateway needs besides: the PNG to forward and the UIDs. RejectedInput passes."""
    prepared = imaging.preprocess_bytes(data, config, encode=False)
    exact = is_exact_png(data, prepared, config)
    uids = dicom_uids(data) if prepared.decoded.format == "dicom" else None
    png = b"" if exact else imaging.encode_png(prepared.pixels)
    return Decoded(png, prepared.pixels, prepared.decoded, prepared.pixel_hash, uids, exact)


def rss_mb() -> float:
    """Resident memory of this process now (not the peak): the pool recycles a worker that does not give it back."""
    with open("/proc/self/statm", "rb") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def serve(connection, memory_bytes: int) -> None:
    """The worker loop: (data, config) in, ("ok", Decoded) | ("rejected", reason, detail) | ("memory",) |
    ("error", type name) out, each with the resident memory after the task. Ends on None or a closed pipe."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        data, config = message
        try:
            result = ("ok", decode(data, config))
        except RejectedInput as exc:
            result = ("rejected", exc.reason, exc.detail)
        except MemoryError:
            result = ("memory",)
        except Exception as exc:  # noqa: BLE001 - a decoder bug is a refusal of this input, never a dead pool
            result = ("error", type(exc).__name__)
        del data, message
        connection.send((result, rss_mb()))
