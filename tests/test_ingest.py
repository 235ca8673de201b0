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
from conftest import ROOT, SAMPLE_OVERRIDES, SHARED_DATA, TEST_DEID_KEY, overrides, run_module
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


def input_report_of(directory: Path) -> list[dict]:
    """The paths of rejected and duplicate inputs, written beside (never inside) the output: PHI."""
    path = directory.with_name(directory.name + ".input-report.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def rejected_paths(directory: Path) -> dict[str, str]:
    """{input path: reason} of the rejected inputs, joined from the output's rejected.jsonl and the input report."""
    paths = {e["input_id"]: e["path"] for e in input_report_of(directory)}
    return {paths[r["input_id"]]: r["reason"] for r in rejected_of(directory)}


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


def test_listing_file_round_trips_any_path_and_is_private(tmp_path):
    """The decoding stage reads the listing back from write_listing's file, batch by batch, exactly: paths with
    separators, quotes, a newline, non-ASCII and undecodable bytes (surrogate escapes), manifest patient IDs."""
    paths = ["/in/glioma/a,b\"c'.jpg", "/in/glioma/line\nbreak.jpg", "/in/glioma/naïve é.jpg",
             "/in/glioma/" + b"\xff\xfe.jpg".decode("utf-8", "surrogateescape")]
    items = [ingest.InputItem(path=f"{path}.{copy}", label="glioma", size=copy,
                              patient_id=f"P{copy}" if copy else None) for copy in range(50) for path in paths]
    batches = ingest.input_batches(items)
    refs = ingest.write_listing(batches, str(tmp_path / "_spill"))
    assert len(refs) == len(batches) == 4
    assert [ingest.read_listed_batch(ref) for ref in refs] == [[list(row) for row in batch] for batch in batches]
    assert sorted(row[0] for ref in refs for row in ingest.read_listed_batch(ref)) == list(range(200))
    assert (tmp_path / "_spill" / ingest.LISTING_FILE).stat().st_mode & 0o777 == 0o600  # paths are PHI


def test_stats_histogram_from_counts_is_the_drift_binning():
    from beam_pipelines.records import histogram32, histogram32_from_counts

    rng = np.random.default_rng(7)
    for pixels in (rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), np.zeros((9, 9, 1), np.uint8),
                   np.full((5, 7, 1), 255, np.uint8), np.arange(256, dtype=np.uint8).reshape(16, 16, 1)):
        counts = np.bincount(pixels.reshape(-1), minlength=256)
        assert histogram32_from_counts(counts) == histogram32(pixels)
    assert histogram32_from_counts(np.bincount(np.array([0, 7, 8, 255], np.uint8), minlength=256))[:2] == [2, 1]


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
    # by input count: a small local run stays in one process; a large one, or any explicit choice, gets the workers
    small = ingest.pipeline_options([], ingest.IN_PROCESS_BELOW - 1).get_all_options()
    assert small["direct_running_mode"] == "in_memory" and small["direct_num_workers"] == 1
    large = ingest.pipeline_options([], ingest.IN_PROCESS_BELOW).get_all_options()
    assert large["direct_running_mode"] == "multi_processing" and large["direct_num_workers"] == 2
    asked = ingest.pipeline_options(["--direct_num_workers=3"], 10).get_all_options()
    assert asked["direct_running_mode"] == "multi_processing" and asked["direct_num_workers"] == 3


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


PHI_FILE_NAME = "ZZSECRET_JANE_MRN99887766.dcm"  # the trial's file name: a patient's name and MRN


def log_file_of(result) -> Path:
    """The log file a quiet command names on its last stderr line."""
    return Path(result.stderr.strip().splitlines()[-1].split("log: ", 1)[1])


def test_adversarial_inputs_and_phi(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    markers, expected = build_adversarial_input(source)
    fa.text_named_dcm(source / "notumor" / PHI_FILE_NAME)  # rejected (not_image) under a name full of PHI
    shutil.copy(fa.sample_jpegs("pituitary", 1)[0], source / "pituitary" / f"copy_{PHI_FILE_NAME}.jpg")  # duplicate
    expected[PHI_FILE_NAME] = "not_image"
    markers = [*markers, "ZZSECRET", "JANE", "MRN99887766"]
    out.mkdir()  # an earlier ingest output (its marker lists its files) plus a file someone else put there
    (out / "train-00000-of-00009.tfrecord.gz").write_bytes(b"stale")  # a re-run must replace, never add
    (out / ".medpipe-ingest").write_text(json.dumps({"written_by": "medpipe ingest", "state": "complete",
                                                     "files": ["train-00000-of-00009.tfrecord.gz"]}))
    (out / "NOTES.txt").write_text("the radiologist's notes: not ingest's to delete")
    result = run_module("beam_pipelines.ingest", "--config", CONFIG_FILE, "--input", str(source), "--output", str(out),
                        *overrides("image.size=64", "ingest.max_pixels=600000"))
    stats = check_bookkeeping(out)
    assert not (out / "train-00000-of-00009.tfrecord.gz").exists()
    assert (out / "NOTES.txt").read_text().startswith("the radiologist's notes")
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))
    assert not list(tmp_path.glob("*.tmp-*"))
    reasons = {Path(path).name: reason for path, reason in rejected_paths(out).items()}
    assert reasons == expected
    assert stats["duplicates"] == {"groups": 2, "dropped": 2}
    assert stats["written"] == 2 + 6 + 1 + 1  # glioma originals kept, 3 classes x 2, jpeg named .png, the DICOM
    assert stats["input_modes"].get("dicom/MONOCHROME2") == 1
    # the duplicates name the kept record by the source id it has in the TFRecords, and inputs by input id only
    examples = [parse(r) for records in read_records(out).values() for r in records]
    sources = {e["image/source_id"][0].decode() for e in examples}
    groups = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert all(g["source_id"] in sources and set(g) == {"source_id", "label", "kept", "dropped"} for g in groups)
    report = input_report_of(out)
    by_id = {e["input_id"]: e for e in report}
    assert {Path(by_id[i]["path"]).name for g in groups for i in g["dropped"]} == {
        "copy_of_first.jpg", f"copy_{PHI_FILE_NAME}.jpg"}
    assert all(set(r) == {"input_id", "reason", "detail"} and r["input_id"] in by_id for r in rejected_of(out))
    report_file = tmp_path / "out.input-report.jsonl"
    assert (report_file.stat().st_mode & 0o777) == 0o600 and PHI_FILE_NAME in report_file.read_text()
    # the DICOM was written with its pseudonym and allow-listed fields, and nothing of its PHI anywhere
    dicom = [e for e in examples if "dicom/modality" in e]
    assert len(dicom) == 1 and dicom[0]["patient/pseudonym"][0].decode() == pseudonym(fa.PHI_PATIENT_ID, TEST_DEID_KEY)
    assert set(dicom[0]) <= set(__import__("medpipe.schema", fromlist=["FEATURES"]).FEATURES)
    haystacks = {
        "tfrecords": b"".join(gzip.decompress(p.read_bytes()) for p in out.glob("*.tfrecord.gz")),
        "output folder": b"".join(p.name.encode() + b"\n" + p.read_bytes() for p in out.iterdir()
                                  if not p.name.endswith(".tfrecord.gz")),
        "logs": (result.stdout + result.stderr).encode(),
        "log file": log_file_of(result).read_bytes(),
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
    assert [(Path(p).name, r) for p, r in rejected_paths(out).items()] == [("ct_with_phi.dcm", "deid_key_missing")]
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
    accounted = {e["path"] for e in input_report_of(out)}  # every rejected or dropped input, by path
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
    copies: dict[str, set[str]] = {}  # kept path -> every copy's path, from the input report
    for entry in input_report_of(out):
        if entry["status"] == "duplicate":
            copies.setdefault(entry["kept_path"], {entry["kept_path"]}).add(entry["path"])
    found_sets = [{"/".join(Path(p).parts[-2:]) for p in group} for group in copies.values()]
    conflicts = {"/".join(Path(p).parts[-2:]) for p, reason in rejected_paths(out).items()
                 if reason == "label_conflict"}
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
def test_dask_runner_on_a_dask_scheduler_and_two_workers(tmp_path, ingested_sample):
    """A real distributed run as an operator starts one: `dask scheduler` and two `dask worker` processes on
    loopback (medpipe on their path, the key in their environment), Beam's DaskRunner; the DirectRunner's bytes."""
    import os
    import re
    import subprocess
    import sys
    import time

    distributed = pytest.importorskip("distributed")
    dask = str(Path(sys.executable).parent / "dask")
    env = {**os.environ, "MEDPIPE_DEID_KEY": TEST_DEID_KEY, "PYTHONPATH": str(ROOT)}
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("scheduler", "worker1", "worker2")}
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                                  stdout=logs["scheduler"], stderr=subprocess.STDOUT, env=env, cwd=ROOT)]
    try:
        address, deadline = None, time.monotonic() + 60
        while address is None and time.monotonic() < deadline:
            found = re.search(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", (tmp_path / "scheduler.log").read_text())
            address = found.group(1) if found else time.sleep(0.2)
        assert address, (tmp_path / "scheduler.log").read_text()
        for name in ("worker1", "worker2"):
            processes.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard"], stdout=logs[name], stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            out = tmp_path / "dask"
            run_module("beam_pipelines.ingest", "--config", CONFIG_FILE, "--input", str(fa.SAMPLE_MRI),
                       "--output", str(out), *overrides("image.size=64", "ingest.shards={train: 2, val: 1, test: 1}"),
                       "--runner", "DaskRunner", "--dask_client_address", address,
                       env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
            # both worker processes ran tasks of the pipeline (task state transitions counted by each worker)
            transitions = client.run(lambda dask_worker: dask_worker.state.transition_counter)
            assert len(transitions) == 2 and all(count > 0 for count in transitions.values()), transitions
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs.values():
            handle.close()
    stats = check_bookkeeping(out)
    assert stats["written"] == 100
    ours, reference = read_records(out), read_records(ingested_sample)
    assert ours == reference  # byte-identical to the DirectRunner output


@pytest.mark.slow
def test_local_workers_forked_or_fresh_write_the_same_bytes(tmp_path, ingested_sample, monkeypatch, caplog):
    """The local multi-processing runner forks its two SDK workers from the ingest process (beam_pipelines.
    local_runner); while another thread runs it cannot fork safely and starts Beam's fresh worker interpreters.
    Either way the records are the in-process run's, byte for byte."""
    import logging
    import threading

    argv = ["--config", CONFIG_FILE, "--input", str(fa.SAMPLE_MRI), *overrides(*SAMPLE_OVERRIDES),
            "--direct_running_mode=multi_processing"]
    run_module("beam_pipelines.ingest", *argv, "--output", str(tmp_path / "forked"))  # forked: see the SIGKILL test
    assert read_records(tmp_path / "forked") == read_records(ingested_sample)

    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    monkeypatch.chdir(ROOT)  # the fresh workers run `python -m beam_pipelines.worker`
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="medpipe.ingest"):
            ingest.run([*argv, "--output", str(tmp_path / "fresh")])
    finally:
        stop.set()
        other.join()
    assert "ingest: 0 of 2 SDK workers forked" in caplog.text
    assert read_records(tmp_path / "fresh") == read_records(ingested_sample)


# ----------------------------------------------------------------------------------------------------------------
# the output folder is ours only when we made it; crashes leave nothing behind; exit statuses; a quiet console
def small_input(root: Path, per_class: int = 2) -> Path:
    for label in ("glioma", "pituitary"):
        (root / label).mkdir(parents=True)
        for source in fa.sample_jpegs(label, per_class):
            shutil.copy(source, root / label / source.name)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def medpipe_cli(*args: str, expect: int, env: dict | None = None):
    return run_module("medpipe.cli", *args, env=env, expect=expect, timeout=300)


def test_output_overlapping_input_is_refused_and_nothing_is_touched(tmp_path):
    source = small_input(tmp_path / "in")
    before = snapshot(tmp_path)
    for output, says in ((source, "is --input"), (source / "glioma" / "out", "is inside --input"),
                         (tmp_path, "contains --input")):
        result = medpipe_cli("ingest", "--config", CONFIG_FILE, "--input", str(source), "--output", str(output),
                             "--force", expect=2)
        assert says.split(" --")[0] in result.stderr and "--output" in result.stderr, result.stderr
        assert snapshot(tmp_path) == before  # the source images are all there, unchanged; nothing was added
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},glioma\n" for p in sorted(source.rglob("*.jpg"))))
    with pytest.raises(ingest.DataError, match="contains 4 of the manifest's input files"):
        ingest.run(["--config", CONFIG_FILE, "--input", str(manifest), "--output", str(source), *IN_PROCESS])
    with pytest.raises(ingest.DataError, match="PHI"):
        ingest.run(["--config", CONFIG_FILE, "--input", str(source), "--output", str(tmp_path / "out"),
                    "--input-report", str(tmp_path / "out" / "paths.jsonl"), *IN_PROCESS])


def test_non_empty_output_is_refused_force_and_reruns_keep_other_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_DEID_KEY)
    source, out = small_input(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    (out / "train-00000-of-00001.tfrecord.gz").write_bytes(b"an older ingest's shard")
    argv = ["--config", CONFIG_FILE, "--input", str(source), "--output", str(out), "--set", "image.size=32",
            "--set", "ingest.shards={train: 1, val: 1, test: 1}", *IN_PROCESS]
    result = medpipe_cli("ingest", *argv, expect=2)
    assert "not a medpipe ingest output" in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx", "train-00000-of-00001.tfrecord.gz"]
    assert not list(tmp_path.glob("out.*"))  # refused before anything was written
    stats = ingest.run([*argv, "--force"])  # --force: our names are replaced, the rest is kept
    assert (out / "thesis.docx").read_bytes() == b"years of work" and stats["written"] == 4
    check_bookkeeping(out)
    (out / "my_notes.txt").write_text("added after the run")
    ingest.run([*argv[:-4], "--set", "ingest.shards={train: 2, val: 1, test: 1}", *IN_PROCESS])  # a re-run, no --force
    names = sorted(p.name for p in out.iterdir())
    assert "thesis.docx" in names and "my_notes.txt" in names and ".medpipe-ingest" in names
    assert "train-00000-of-00001.tfrecord.gz" not in names and "train-00001-of-00002.tfrecord.gz" in names
    check_bookkeeping(out)


def test_no_record_written_exits_3_with_reasons_and_no_shards(tmp_path):
    source = tmp_path / "flat"  # images, but no class folders
    source.mkdir()
    for image in fa.sample_jpegs("glioma", 3):
        shutil.copy(image, source / image.name)
    out = tmp_path / "out"
    result = medpipe_cli("ingest", "--config", CONFIG_FILE, "--input", str(source), "--output", str(out),
                         "--set", "image.size=32", *IN_PROCESS, expect=3)
    assert "no record" in result.stderr and "missing_label 3" in result.stderr and "class folders" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    assert [e["reason"] for e in input_report_of(out)] == ["missing_label"] * 3  # what the operator fixes


def test_cloud_paths_without_their_extra_name_the_extra(tmp_path):
    result = medpipe_cli("ingest", "--config", CONFIG_FILE, "--input", "gs://medpipe-no-bucket/images",
                         "--output", str(tmp_path / "out"), expect=2)
    assert "medpipe[gcp]" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    with pytest.raises(ingest.ConfigError, match=r"medpipe\[aws\]"):
        ingest.run(["--config", CONFIG_FILE, "--input", str(tmp_path), "--output", "s3://medpipe-no-bucket/out"])


def test_sample_ingest_prints_its_progress_and_result_only(ingested_sample):
    from conftest import CONSOLE

    lines = (ingested_sample.parent / CONSOLE).read_text().splitlines()
    assert len(lines) <= 15, "\n".join(lines)
    assert not [line for line in lines if "apache_beam" in line or "apitools" in line or "Worker" in line]
    assert any("100 written" in line for line in lines)
    log = Path(lines[-1].split("log: ", 1)[1])
    assert "apache_beam" in log.read_text()  # the framework's output is in the log file named at the end


def test_help_is_quiet():
    result = medpipe_cli("ingest", "--help", expect=0)
    assert "--input-report" in result.stdout and "apitools" not in result.stdout + result.stderr


@pytest.mark.slow
def test_sigkill_leaves_no_worker_and_the_next_run_cleans_up(tmp_path):
    """The trial: SIGKILL ingest mid-run; its Beam workers must go with it, and the next run removes its temp."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = ["--config", CONFIG_FILE, "--input", str(fa.SAMPLE_MRI), "--output", str(out), "--set", "image.size=64"]
    # the sample is small enough to run in one process by default: the workers are asked for
    process = subprocess.Popen([sys.executable, "-m", "beam_pipelines.ingest", *args,
                                "--direct_running_mode=multi_processing"], cwd=ROOT,
                               env={**os.environ, "MEDPIPE_DEID_KEY": TEST_DEID_KEY},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        """The ingest process's children: its two SDK workers (forked copies of it)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == process.pid:  # fields: state, ppid, ...
                found.append(int(stat.parent.name))
        return found

    def alive(pids: list[int]) -> list[int]:
        running = []
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(pid)
            except OSError:
                pass  # gone
        return running

    deadline = time.monotonic() + 120
    while len(children()) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = children()
    assert len(workers) == 2, "the two multi-processing workers did not start"
    own_command = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert all(Path(f"/proc/{pid}/cmdline").read_bytes() == own_command for pid in workers)  # forked copies
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(workers) == [], "Beam workers outlived the killed ingest"
    stale = list(tmp_path.glob("out.tmp-*"))
    assert stale and not out.exists()
    run_module("beam_pipelines.ingest", *args[:-2], "--set", "image.size=32", *IN_PROCESS)
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("*.tmp-*"))
    assert check_bookkeeping(out)["written"] == 100
