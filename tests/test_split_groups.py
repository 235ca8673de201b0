"""Near-duplicate-aware splits (ingest.split_groups, issue 29): perceptual hashes, their groups and the split."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

import fixtures_adversarial as fa
from beam_pipelines import ingest, records
from beam_pipelines.records import assign_split, near_duplicate_groups, perceptual_hash, route_record
from conftest import ROOT
from medpipe.config import load_config
from medpipe.errors import ConfigError
from medpipe.imaging import preprocess_bytes
from models.evaluate import load_records

CONFIG_FILE = str(ROOT / "config" / "brain_mri.yaml")
IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def resaved(path, size: int, quality: int = 70) -> bytes:
    """A near-duplicate: the same slice resized and re-compressed, as another source set would have stored it."""
    buffer = io.BytesIO()
    Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR).save(buffer, "JPEG",
                                                                                       quality=quality)
    return buffer.getvalue()


def test_perceptual_hash_survives_resizing_and_recompression_but_tells_slices_apart():
    config = load_config(CONFIG_FILE)
    first, second = fa.sample_jpegs("glioma", 2)
    hash_of = lambda data: perceptual_hash(preprocess_bytes(data, config, encode=False).pixels)  # noqa: E731
    original = hash_of(first.read_bytes())
    copy = hash_of(resaved(first, 300))
    other = hash_of(second.read_bytes())
    distance = lambda a, b: bin(a ^ b).count("1")  # noqa: E731
    assert distance(original, copy) <= 4 < distance(original, other)
    assert 0 <= original < 2**64


def test_groups_match_brute_force_connected_components(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(1 << int(bit)) for bit in rng.integers(0, 64, 200)]
    values = list(base) + [base[i % 40] ^ flips[i] ^ flips[i + 1] for i in range(60)]  # 2-bit near-copies
    hashes = [(f"{i:04d}", int(v)) for i, v in enumerate(values)]
    for distance in (0, 2, 4):
        groups = near_duplicate_groups(hashes, distance)
        # brute force: union-find over all pairs
        parent = list(range(len(values)))

        def root(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(len(values)):
            for j in range(i):
                if bin(int(values[i]) ^ int(values[j])).count("1") <= distance:
                    parent[root(i)] = root(j)
        components: dict[int, list[str]] = {}
        for i in range(len(values)):
            components.setdefault(root(i), []).append(f"{i:04d}")
        expected = {name: min(members) for members in components.values() if len(members) > 1 for name in members}
        assert groups == expected, distance
        monkeypatch.setattr(records, "PAIR_BLOCK", 7)  # a bucket compared in several row blocks: the same groups
        assert near_duplicate_groups(hashes, distance) == expected
        monkeypatch.undo()
    assert near_duplicate_groups([("a", 1)], 4) == {} and near_duplicate_groups([], 4) == {}


def test_route_record_splits_a_group_together_and_patients_still_win():
    config = load_config(CONFIG_FILE, ["ingest.split={train: 0.5, val: 0.25, test: 0.25}"])
    keys = [f"{i:064x}" for i in range(40)]
    splits = {h: assign_split(h, config.ingest.split_salt, config.ingest.split) for h in keys}
    a, b = next((x, y) for x in splits for y in splits if splits[x] != splits[y])
    record = {"path": "p", "label": "glioma", "pixel_hash": b, "split_key": b, "holdout": False, "pseudonym": "",
              "source_id": "00" * 32, "png": b"", "dicom": {}, "hist": [0], "sum": 0.0, "sumsq": 0.0, "count": 1,
              "input_size": "1x1", "input_mode": "JPEG/L"}

    def split_of(rec: dict, groups) -> str:
        return next(value for tag, value in route_record(rec, 0, config, groups) if tag == "meta")[1]["split"]

    assert split_of(record, None) == splits[b]
    assert split_of(record, {b: a}) == splits[a]  # the group's key decides
    patient = {**record, "pseudonym": "p1", "split_key": "p1"}
    assert split_of(patient, {b: a}) == assign_split("p1", config.ingest.split_salt, config.ingest.split)
    with pytest.raises(ConfigError, match="max_distance"):
        load_config(CONFIG_FILE, ["ingest.split_groups={method: phash, max_distance: 40}"])


def test_ingest_puts_near_duplicates_in_one_split_and_reports_the_groups(tmp_path):
    source = tmp_path / "in"
    slices = fa.sample_jpegs("glioma", 6) + fa.sample_jpegs("pituitary", 6)
    for path in slices:
        (source / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, source / path.parent.name / path.name)
        for size in (200, 420):  # two resized copies of each slice: near-duplicates, not identical pixels
            (source / path.parent.name / f"copy{size}-{path.name}").write_bytes(resaved(path, size))
    out = tmp_path / "out"
    stats = ingest.run(["--config", CONFIG_FILE, "--input", str(source), "--output", str(out), "--set",
                        "image.size=64", *IN_PROCESS])
    assert stats["written"] == 36
    assert stats["split_groups"]["groups"] == 12 and stats["split_groups"]["images"] == 36
    config = load_config(CONFIG_FILE, ["image.size=64"])
    slice_of = {}  # pixel hash (the source id without a de-identification key) -> the slice it was made from
    for path in slices:
        folder = source / path.parent.name
        for name in (path.name, f"copy200-{path.name}", f"copy420-{path.name}"):
            slice_of[preprocess_bytes((folder / name).read_bytes(), config, encode=False).pixel_hash] = path.name
    split_of_slice: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        if stats["splits"][split]["total"]:
            for source_id in load_records(out, split, config).ids:
                split_of_slice.setdefault(slice_of[source_id], set()).add(split)
    assert len(split_of_slice) == 12 and all(len(s) == 1 for s in split_of_slice.values())
    # without the groups the copies would straddle splits: each copy's own pixel hash decides
    plain = {}
    for digest, name in slice_of.items():
        plain.setdefault(name, set()).add(assign_split(digest, config.ingest.split_salt, config.ingest.split))
    assert any(len(s) > 1 for s in plain.values())
