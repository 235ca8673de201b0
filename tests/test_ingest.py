"""The real Beam ingest: bookkeeping, determinism, de-identification, adversarial inputs, shared data, Dask."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import fixtures_adversarial as fa
from beam_pipelines import ingest
from beam_pipelines.tf_example import encode_example, tfrecord_frame
from conftest import ROOT, SHARED_DATA, TEST_DEID_KEY, overrides, run_module
from medpipe.config import load_config
from medpipe.deid import pseudonym

CONFIG_FILE = str(ROOT / "config" / "brain_mri.yaml")
IN_PROCESS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def read_records(directory: Path, pattern: str = "*.tfrecord.gz") -> dict[str, list[bytes]]:
    """{file name: [serialised examples]} by plain TFRecord framing (TF itself is used in one test below)."""
    out = {}
    for path in sorted(directory.glob(pattern)):
        data, records, offset = gzip.decompress(path.read_bytes()), [], 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            records.append(data[offset + 12:offset + 12 + length])
            offset += 16 + length
        out[path.name] = records
    return out


def parse(record: bytes) -> dict:
    from tensorflow.core.example import example_pb2  # the proto only: no TF runtime needed

    example = example_pb2.Example.FromString(record)
    return {key: (list(f.bytes_list.value) or list(f.int64_list.value) or list(f.float_list.value))
            for key, f in example.features.feature.items()}


def stats_of(directory: Path) -> dict:
    return json.loads((directory / "stats.json").read_text())


def rejected_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "rejected.jsonl").read_text().splitlines() if line]


def check_bookkeeping(directory: Path) -> dict:
    stats = stats_of(directory)
    assert stats["input_files"] == stats["written"] + stats["rejected"] + stats["duplicates_dropped"]
    assert stats["rejected"] == len(rejected_of(directory)) == sum(stats["rejected_by_reason"].values())
    records = read_records(directory)
    assert sum(len(r) for r in records.values()) == stats["written"]
    for split in ("train", "val", "test"):
        assert sum(len(r) for name, r in records.items() if name.startswith(f"{split}-")) == stats["splits"][split]["total"]
    return stats


# ----------------------------------------------------------------------------------------------------------------
# pure functions
def test_split_is_deterministic_stable_and_follows_ratios():
    ratios = load_config(CONFIG_FILE).ingest.split
    keys = [f"key-{i}" for i in range(20000)]
    first = {k: ingest.assign_split(k, "salt", ratios) for k in keys}
    more = {k: ingest.assign_split(k, "salt", ratios) for k in keys + [f"new-{i}" for i in range(5000)]}
    assert all(more[k] == first[k] for k in keys)  # adding files never moves an existing one
    share = {s: sum(v == s for v in first.values()) / len(keys) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.01) and share["val"] == pytest.approx(0.1, abs=0.01)
    assert any(ingest.assign_split(k, "other-salt", ratios) != first[k] for k in keys[:100])


def test_duplicates_are_kept_once_and_conflicts_rejected():
    a, b, c = ({"path": p, "label": label} for p, label in (("/x/b.jpg", "glioma"), ("/x/a.jpg", "glioma"),
                                                          ("/y/c.jpg", "glioma")))
    kept, rejected, group = ingest.resolve_duplicates("h", [a, b, c])
    assert kept["path"] == "/x/a.jpg" and rejected == [] and group["dropped"] == ["/x/b.jpg", "/y/c.jpg"]
    kept, rejected, group = ingest.resolve_duplicates("h", [a, {"path": "/z.jpg", "label": "notumor"}])
    assert kept is None and group is None and {r["reason"] for r in rejected} == {"label_conflict"}


def test_example_and_tfrecord_encoding_parse_with_tensorflow(tmp_path):
    import tensorflow as tf

    features = {"a/bytes": ("bytes", [b"\x00\xff", "text"]), "b/int": ("int64", [0, -5, 2**40]),
                "c/float": ("float", [0.5, -1.25]), "d/empty": ("int64", [])}
    record = encode_example(features)
    path = tmp_path / "x.tfrecord.gz"
    path.write_bytes(gzip.compress(tfrecord_frame(record) * 2))
    parsed = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path), "GZIP")]
    assert len(parsed) == 2
    feature = parsed[0].features.feature
    assert list(feature["a/bytes"].bytes_list.value) == [b"\x00\xff", b"text"]
    assert list(feature["b/int"].int64_list.value) == [0, -5, 2**40]
    assert list(feature["c/float"].float_list.value) == [0.5, -1.25]


def test_parser_help_and_runner_defaults():
    assert "--input" in ingest.build_parser().format_help()
    options = ingest.pipeline_options([]).get_all_options()
    assert options["runner"] == "FnApiRunner" and options["direct_running_mode"] == "multi_processing"
    assert options["direct_num_workers"] == 2
    explicit = ingest.pipeline_options(["--runner", "DirectRunner", "--direct_num_workers=1"]).get_all_options()
    assert explicit["runner"] == "FnApiRunner" and explicit["direct_num_workers"] == 1
    dask = ingest.pipeline_options(["--runner", "DaskRunner"]).get_all_options()
    assert dask["runner"].endswith("dask_runner.DaskRunner")


# ----------------------------------------------------------------------------------------------------------------
# the session fixture (the sample, through `python -m beam_pipelines.ingest`, DirectRunner multi-processing)
def test_ingested_sample_is_complete_and_decodes(ingested_sample):
    import tensorflow as tf

    stats = check_bookkeeping(ingested_sample)
    assert stats["input_files"] == 100 and stats["rejected"] == 0
    schema = json.loads((ingested_sample / "schema.json").read_text())
    assert schema["labels"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert schema["image"] == {"height": 64, "width": 64, "channels": 1, "format": "png"}
    assert len(stats["pixel_histogram"]) == 32 and sum(stats["pixel_histogram"]) == stats["written"] * 64 * 64
    assert sum(stats["class_distribution"].values()) == pytest.approx(1.0)
    names = sorted(p.name for p in ingested_sample.glob("*.tfrecord.gz"))
    assert names == ["test-00000-of-00001.tfrecord.gz", "train-00000-of-00002.tfrecord.gz",
                     "train-00001-of-00002.tfrecord.gz", "val-00000-of-00001.tfrecord.gz"]
    source_split: dict[bytes, str] = {}
    pixels = []
    for name in names:
        for raw in tf.data.TFRecordDataset(str(ingested_sample / name), "GZIP"):
            example = parse(raw.numpy())
            image = tf.io.decode_png(example["image/encoded"][0]).numpy()
            assert image.shape == (64, 64, 1)
            assert example["image/class/text"][0].decode() == schema["labels"][example["image/class/label"][0]]
            source = example["image/source_id"][0]
            assert source not in source_split  # no pixel hash in two splits (nor twice in one)
            source_split[source] = name.split("-")[0]
            assert len(source) == 64 and int(source, 16) >= 0  # a keyed hash, never a path
            pixels.append(image)
    all_pixels = np.concatenate([p.reshape(-1) for p in pixels]).astype(np.float64)
    assert stats["pixel_mean"] == pytest.approx(all_pixels.mean()) and stats["pixel_std"] == pytest.approx(all_pixels.std())


# ----------------------------------------------------------------------------------------------------------------
# adversarial inputs and PHI through the real command
def build_adversarial_input(root: Path) -> tuple[list[str], dict[str, str]]:
    """Class folders with real JPEGs plus every adversarial case; returns (PHI markers, expected file -> reason)."""
    for label in ("glioma", "meningioma", "notumor", "pituitary", "unknownclass"):
        (root / label).mkdir(parents=True)
    glioma = fa.sample_jpegs("glioma", 4)
    for source in glioma[:3]:
        shutil.copy(source, root / "glioma" / source.name)
    shutil.copy(glioma[0], root / "glioma" / "copy_of_first.jpg")  # duplicate, same label
    shutil.copy(glioma[1], root / "meningioma" / "relabelled.jpg")  # same pixels, another label
    for label in ("meningioma", "notumor", "pituitary"):
        for source in fa.sample_jpegs(label, 2):
            shutil.copy(source, root / label / source.name)
    fa.jpeg_named_png(glioma[3], root / "pituitary" / "jpeg_named.png")
    expected = {
        fa.truncated_jpeg(glioma[3], root / "glioma" / "cut.jpg").name: "truncated",
        fa.zero_bytes(root / "notumor" / "empty.png").name: "empty",
        fa.text_named_dcm(root / "notumor" / "notes.dcm").name: "not_image",
        fa.large_png(root / "meningioma" / "big.png", 1000, 1000).name: "pixel_budget",
        fa.png_bomb_header(root / "meningioma" / "bomb.png").name: "pixel_budget",
        fa.tiny_png(root / "pituitary" / "tiny.png").name: "too_small",
        (root / "stray.jpg").name: "missing_label",
        (root / "unknownclass" / "x.jpg").name: "unknown_label",
        glioma[1].name: "label_conflict",
        "relabelled.jpg": "label_conflict",
    }
    shutil.copy(glioma[2], root / "stray.jpg")
    shutil.copy(glioma[2], root / "unknownclass" / "x.jpg")
    markers = fa.phi_dicom(root / "notumor" / "ct_with_phi.dcm")
    return markers, expected


def test_adversarial_inputs_and_phi(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    markers, expected = build_adversarial_input(source)
    out.mkdir()
    (out / "train-00000-of-00009.tfrecord.gz").write_bytes(b"stale")  # a re-run must replace, never add
    result = run_module("beam_pipelines.ingest", "--config", CONFIG_FILE, "--input", str(source), "--output", str(out),
                        *overrides("image.size=64", "ingest.max_pixels=600000"))
    stats = check_bookkeeping(out)
    assert not (out / "train-00000-of-00009.tfrecord.gz").exists()
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected_of(out)}
    assert reasons == expected
    assert stats["duplicates"] == {"groups": 1, "dropped": 1}
    assert stats["written"] == 2 + 6 + 1 + 1  # glioma originals kept, 3 classes x 2, jpeg named .png, the DICOM
    assert stats["input_modes"].get("dicom/MONOCHROME2") == 1
    # the DICOM was written with its pseudonym and allow-listed fields, and nothing of its PHI anywhere
    examples = [parse(r) for records in read_records(out).values() for r in records]
    dicom = [e for e in examples if "dicom/modality" in e]
    assert len(dicom) == 1 and dicom[0]["patient/pseudonym"][0].decode() == pseudonym(fa.PHI_PATIENT_ID, TEST_DEID_KEY)
    assert set(dicom[0]) <= set(__import__("medpipe.schema", fromlist=["FEATURES"]).FEATURES)
    haystacks = {
        "tfrecords": b"".join(gzip.decompress(p.read_bytes()) for p in out.glob("*.tfrecord.gz")),
        "reports": b"".join((out / name).read_bytes() for name in ("stats.json", "rejected.jsonl", "duplicates.jsonl",
                                                                   "schema.json")),
        "logs": (result.stdout + result.stderr).encode(),
    }
    for where, haystack in haystacks.items():
        for marker in markers:
            assert marker.encode() not in haystack, f"PHI {marker!r} leaked into {where}"


def test_dicom_with_patient_id_is_refused_without_key(tmp_path, monkeypatch):
    source, out = tmp_path / "in", tmp_path / "out"
    (source / "notumor").mkdir(parents=True)
    fa.phi_dicom(source / "notumor" / "ct_with_phi.dcm")
    shutil.copy(fa.SAMPLE_DICOM / "CT-MONO2-16-brain.dcm", source / "notumor" / "ct_without_patient_id.dcm")
    monkeypatch.delenv("MEDPIPE_DEID_KEY", raising=False)
    stats = ingest.run(["--config", CONFIG_FILE, "--input", str(source), "--output", str(out),
                        "--set", "image.size=32", *IN_PROCESS])
    assert [(Path(r["path"]).name, r["reason"]) for r in rejected_of(out)] == [("ct_with_phi.dcm", "deid_key_missing")]
    assert stats["written"] == 1


def test_manifest_input_with_patients(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    rows = []
    for index, source in enumerate(fa.sample_jpegs("glioma", 6) + fa.sample_jpegs("pituitary", 6)):
        rows.append({"path": str(source.relative_to(fa.SAMPLE)), "label": source.parent.name,
                     "patient_id": f"patient-{index % 3}", "study_id": f"study-{index}"})
    manifest = tmp_path / "manifest.csv"
    for row in rows:
        row["path"] = str(fa.SAMPLE / row["path"])
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "study_id"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    stats = ingest.run(["--config", CONFIG_FILE, "--input", str(manifest), "--output", str(out),
                        "--set", "image.size=32", *IN_PROCESS])
    assert stats["written"] == 12
    by_patient: dict[bytes, set[str]] = {}
    for name, records in read_records(out).items():
        for record in records:
            by_patient.setdefault(parse(record)["patient/pseudonym"][0], set()).add(name.split("-")[0])
    assert len(by_patient) == 3 and all(len(splits) == 1 for splits in by_patient.values())  # split by patient
    expected = {pseudonym(f"patient-{i}", TEST_DEID_KEY).encode() for i in range(3)}
    assert set(by_patient) == expected


# ----------------------------------------------------------------------------------------------------------------
# shared data (skipped when ../shared/data is absent)
@pytest.mark.shared_data
def test_every_shared_dicom_is_written_or_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    folder = SHARED_DATA / "dicom"
    files = [row["file"] for row in csv.DictReader((folder / "inventory.csv").open())]
    manifest = tmp_path / "dicom.csv"
    manifest.write_text("path,label\n" + "".join(f"{folder / f},NORMAL\n" for f in files))
    out = tmp_path / "out"
    stats = ingest.run(["--config", str(ROOT / "config" / "chest_xray.yaml"), "--input", str(manifest),
                        "--output", str(out), "--set", "image.size=32"])
    check_bookkeeping(out)
    assert stats["input_files"] == len(files) == 106
    duplicates = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    accounted = {r["path"] for r in rejected_of(out)} | {p for g in duplicates for p in g["dropped"]}
    assert len(accounted) == stats["rejected"] + stats["duplicates_dropped"]
    assert stats["written"] >= 55 and set(stats["rejected_by_reason"]) <= {
        "no_pixel_data", "corrupt", "truncated", "unsupported_photometric"}


@pytest.mark.shared_data
@pytest.mark.slow
def test_brain_mri_training_set_acceptance(tmp_path):
    source = SHARED_DATA / "brain-tumor-mri" / "Training"
    out = tmp_path / "brain"
    run_module("beam_pipelines.ingest", "--config", CONFIG_FILE, "--input", str(source), "--output", str(out),
               *overrides("image.size=64"))
    stats = check_bookkeeping(out)
    assert stats["input_files"] == 5712
    # the known byte-identical groups (same md5 in the data set's manifest) are all found
    by_md5: dict[str, set[str]] = {}
    for row in csv.DictReader((SHARED_DATA / "brain-tumor-mri" / "manifest.csv").open()):
        if row["split"] == "Training":
            by_md5.setdefault(row["md5"], set()).add(f"{row['class']}/{row['file']}")
    known = [group for group in by_md5.values() if len(group) > 1]
    found = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    found_sets = [{"/".join(Path(p).parts[-2:]) for p in [g["kept"], *g["dropped"]]} for g in found]
    conflicts = {"/".join(Path(r["path"]).parts[-2:]) for r in rejected_of(out) if r["reason"] == "label_conflict"}
    for group in known:
        assert group <= conflicts or any(group <= f for f in found_sets), f"duplicate group {sorted(group)} missed"
    assert stats["duplicates"]["groups"] >= len([g for g in known if not g <= conflicts])
    sources: set[bytes] = set()
    for records in read_records(out).values():
        for record in records:
            source_id = parse(record)["image/source_id"][0]
            assert source_id not in sources
            sources.add(source_id)
    assert len(sources) == stats["written"]


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dask_runner_on_a_local_two_worker_cluster(tmp_path, ingested_sample, monkeypatch):
    """A real distributed run: Beam's DaskRunner on dask.distributed with two worker processes; same bytes."""
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)  # the workers read the key from their environment
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        out = tmp_path / "dask"
        run_module("beam_pipelines.ingest", "--config", CONFIG_FILE, "--input", str(fa.SAMPLE_MRI),
                   "--output", str(out), *overrides("image.size=64", "ingest.shards={train: 2, val: 1, test: 1}"),
                   "--runner", "DaskRunner", "--dask_client_address", cluster.scheduler_address,
                   env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
        assert len(client.scheduler_info()["workers"]) == 2
    finally:
        client.close()
        cluster.close()
    stats = check_bookkeeping(out)
    assert stats["written"] == 100
    ours, reference = read_records(out), read_records(ingested_sample)
    assert ours == reference  # byte-identical to the DirectRunner output
