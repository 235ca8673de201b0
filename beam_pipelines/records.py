"""The ingest's per-record functions, free of Beam: the pipeline's DoFns call them, and so does the benchmark's plain
loop baseline (benchmarks/bench_ingest.py), which must do the same per-image work without paying for a Beam import.

beam_pipelines.ingest re-exports every name here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from beam_pipelines.tf_example import encode_example
from medpipe import schema as keys
from medpipe.config import SHIFT_SPLITS, TaskConfig
from medpipe.deid import pseudonym
from medpipe.drift import HISTOGRAM_BINS as HIST_BINS
from medpipe.drift import histogram
from medpipe.errors import RejectedInput
from medpipe.imaging import check_file_size, preprocess_bytes  # imported once per worker, not once per record


@dataclass(frozen=True)
class InputItem:
    path: str
    label: Optional[str]
    size: int = -1  # bytes, when the listing knows it
    patient_id: Optional[str] = None  # from a manifest; pseudonymised in PreprocessImages, never written
    study_id: Optional[str] = None


# pure element functions (one record at a time)
def rejection(path: str, reason: str, detail: str) -> dict:
    return {"path": path, "reason": reason, "detail": detail}


def histogram32(pixels) -> list[int]:
    return histogram(pixels, HIST_BINS)  # the binning the drift monitor compares served images against


def histogram32_from_counts(counts) -> list[int]:
    """histogram32 of uint8 pixels from their 256-bin count (equal bins of 256 // HIST_BINS levels, as
    medpipe.drift.histogram bins uint8; tests/test_ingest.py holds the two equal)."""
    return counts.reshape(HIST_BINS, 256 // HIST_BINS).sum(axis=1).astype(int).tolist()


def prepare_record(item: InputItem, data: bytes, config: TaskConfig, key: Optional[bytes]) -> dict:
    """One file -> the record the rest of the pipeline carries. Raises RejectedInput."""
    if item.label is None:
        raise RejectedInput("missing_label", "no label: the file is not inside a class folder or the manifest row "
                                             "has no label")
    if item.label not in config.labels:
        raise RejectedInput("unknown_label", f"label {item.label!r} is not one of the config's labels "
                                             f"{list(config.labels)}")
    check_file_size(len(data), config.ingest.max_file_mb)
    prepared = preprocess_bytes(data, config)
    patient = item.patient_id or prepared.decoded.patient_id
    if patient and key is None:
        raise RejectedInput("deid_key_missing", "the file has a patient ID but MEDPIPE_DEID_KEY is not set; "
                                                "refusing to process it without a pseudonym key")
    pseudo = pseudonym(patient, key) if patient else ""
    digest = prepared.pixel_hash
    source_id = pseudonym(digest, key) if key else digest  # without a key: the pixel hash itself (not an identifier)
    pixels = prepared.pixels
    decoded = prepared.decoded
    # one 256-bin count gives the drift histogram and the moments: exact integer sums (the same floats as summing
    # the pixels), no float64 copy
    counts = np.bincount(pixels.reshape(-1), minlength=256)
    levels = np.arange(256, dtype=np.int64)
    return {
        "path": item.path,
        "label": item.label,
        "pixel_hash": digest,
        "split_key": pseudo or digest,
        "holdout": in_shift_holdout(patient, config.ingest.shift_holdout),
        "pseudonym": pseudo,
        "source_id": source_id,
        "png": prepared.png,
        "dicom": dict(decoded.dicom),
        "hist": histogram32_from_counts(counts),
        "sum": float(counts @ levels),
        "sumsq": float(counts @ (levels * levels)),
        "count": int(pixels.size),
        "input_size": f"{decoded.width}x{decoded.height}",
        "input_mode": f"{decoded.format}/{decoded.mode}",
    }


def resolve_duplicates(pixel_hash: str, records: Iterable[dict]) -> tuple[Optional[dict], list[dict], Optional[dict]]:
    """Records sharing decoded pixels -> (kept or None, rejected, duplicate group or None).

    One label: keep the first path (sorted, so the choice is deterministic) and list the others. Two or more
    labels: a label conflict, every copy rejected (which label is right is for a human to decide)."""
    group = sorted(records, key=lambda record: (record["path"], record.get("index", 0)))  # a path listed twice: 1st
    labels = sorted({record["label"] for record in group})
    if len(labels) > 1:
        detail = f"the same pixels appear under labels {labels} in {len(group)} files"
        return None, [rejection(r["path"], "label_conflict", detail) for r in group], None
    kept = group[0]
    if len(group) == 1:
        return kept, [], None
    info = {"pixel_hash": pixel_hash, "label": labels[0], "kept": kept["path"],
            "dropped": [r["path"] for r in group[1:]]}
    return kept, [], info


def in_shift_holdout(patient: Optional[str], rule: Any) -> bool:
    """Whether a raw patient ID is one of the earliest acquisitions of its series under ingest.shift_holdout."""
    match = re.match(rule.pattern, patient) if rule is not None and patient else None
    if match is None:
        return False
    cut = dict(rule.before).get(match.group(1))
    return cut is not None and int(match.group(2)) < cut


def assign_split(split_key: str, salt: str, ratios: Any, holdout: bool = False) -> str:
    """Deterministic split from a salted sha256 of the key: adding files never moves an existing key. A held-out
    key goes to val_shift or test_shift (half each), never to train."""
    unit = int(hashlib.sha256(f"{salt}:{split_key}".encode()).hexdigest()[:15], 16) / float(16**15)
    if holdout:
        return SHIFT_SPLITS[unit >= 0.5]
    if unit < ratios.train:
        return "train"
    if unit < ratios.train + ratios.val:
        return "val"
    return "test"


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash, the algorithm of the imagehash package): the image in grey at 32x32
    (Lanczos), its 2-D DCT-II, the top-left 8x8 low frequencies each compared with their median. Resizing,
    re-compression, small intensity changes and a re-exported copy change a few bits, not the hash's identity."""
    import scipy.fft
    from PIL import Image

    grey = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    if grey.ndim == 3:
        grey = grey.mean(axis=-1).astype(np.uint8)
    small = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = scipy.fft.dct(scipy.fft.dct(small, axis=0), axis=1)[:8, :8]
    return int(np.packbits((low > np.median(low)).reshape(-1)).view(">u8")[0])


PAIR_BLOCK = 1024  # rows of one bucket's distance matrix computed at once


def near_duplicate_groups(hashes: Iterable[tuple[str, int]], max_distance: int) -> dict[str, str]:
    """(pixel_hash, perceptual hash) pairs -> {pixel_hash: group key} for every image with a near-duplicate: the
    connected components of "perceptual hashes within max_distance bits", keyed by the smallest pixel hash in the
    component (an image without a near-duplicate is absent and keeps its own pixel hash as its split key).

    Candidate pairs by the pigeonhole principle: two 64-bit hashes within d bits agree exactly on at least one of
    d + 1 disjoint bit bands, so each band is a sort, not an all-pairs comparison."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    unique = dict(hashes)  # copies with identical pixels are one image here (dedup keeps one of them)
    names = sorted(unique)
    if len(names) < 2:
        return {}
    values = np.array([unique[name] for name in names], dtype=np.uint64)
    bands = np.array_split(np.arange(64), max_distance + 1)
    left, right = [], []
    for band in bands:
        mask = np.uint64(sum(1 << (63 - int(bit)) for bit in band))
        keys = values & mask
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1], True])
        for begin, end in zip(starts[:-1], starts[1:]):
            members = order[begin:end]
            for row in range(0, len(members) - 1, PAIR_BLOCK):  # row blocks: memory bounded in a large bucket
                block = members[row:row + PAIR_BLOCK]
                close = np.bitwise_count(values[block][:, None] ^ values[members][None, :]) <= max_distance
                i, j = np.nonzero(close)
                later = j > i + row  # each pair once, no self pairs
                left.append(block[i[later]])
                right.append(members[j[later]])
    if not left:
        return {}
    i, j = np.concatenate(left), np.concatenate(right)
    _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(names),) * 2),
                                        directed=False)
    sizes = np.bincount(component)
    key: dict[int, str] = {}
    for index in np.flatnonzero(sizes[component] > 1):  # names are sorted: the first seen is the smallest
        key.setdefault(int(component[index]), names[index])
    return {names[index]: key[int(component[index])] for index in np.flatnonzero(sizes[component] > 1)}


def to_example(record: dict, config: TaskConfig) -> bytes:
    size, channels = config.image.size, config.image.channels
    features: dict[str, tuple[str, list]] = {
        keys.IMAGE_ENCODED: ("bytes", [record["png"]]),
        keys.IMAGE_FORMAT: ("bytes", [b"png"]),
        keys.IMAGE_HEIGHT: ("int64", [size]),
        keys.IMAGE_WIDTH: ("int64", [size]),
        keys.IMAGE_CHANNELS: ("int64", [channels]),
        keys.LABEL: ("int64", [config.labels.index(record["label"])]),
        keys.LABEL_TEXT: ("bytes", [record["label"]]),
        keys.SOURCE_ID: ("bytes", [record["source_id"]]),
        keys.PSEUDONYM: ("bytes", [record["pseudonym"]]),
    }
    for record_key, value in record["dicom"].items():
        kind = keys.FEATURES[record_key]
        features[record_key] = (kind, list(value) if isinstance(value, (list, tuple)) else [value])
    return encode_example(features)


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord.gz"


def shard_of(source_id: str, num_shards: int) -> int:
    """Deterministic shard from the record's keyed id: a re-run writes byte-identical shards."""
    return int(source_id[:8], 16) % num_shards


def route_record(record: dict, index: int, config: TaskConfig, groups: Optional[dict] = None) -> Iterable[tuple]:
    """A decoded record (the index-th input) -> ("shard", ((split, shard), (index, source_id, example))) carrying the
    example, and ("meta", (pixel_hash, meta)) carrying only what dedup and the stats need (no image bytes). The index
    tells copies apart even when a manifest lists one path twice. groups (near_duplicate_groups, when
    ingest.split_groups is set): a record without a patient is split by its near-duplicate group's key."""
    split_key = record["split_key"]
    if groups and not record["pseudonym"]:
        split_key = groups.get(record["pixel_hash"], split_key)
    split = assign_split(split_key, config.ingest.split_salt, config.ingest.split, record["holdout"])
    shard = (split, shard_of(record["source_id"], config.ingest.shards.of(split)))
    yield ("shard", (shard, (index, record["source_id"], to_example(record, config))))
    meta = {name: record[name] for name in ("path", "label", "hist", "sum", "sumsq", "count", "input_size",
                                            "input_mode")}
    yield ("meta", (record["pixel_hash"], {**meta, "index": index, "split": split}))


def shard_examples(entries: Iterable[tuple], dropped: set) -> list[tuple[str, bytes]]:
    """A shard's (index, source_id, example) entries -> (source_id, example) pairs without the dropped copies (by
    input index), sorted by source id (reproducible bytes)."""
    return sorted((source_id, example) for index, source_id, example in entries if index not in dropped)
