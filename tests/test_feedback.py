"""`medpipe feedback`: confirmed labels joined with the request log -> a labelled partition and live accuracy."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import feedback

ROOT = Path(__file__).resolve().parent.parent
BRAIN = ROOT / "sample_data" / "brain_mri"


def _request_log(folder: Path, served: dict[str, str], day: str = "2026-11-27") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"requests-{day}.jsonl").open("w") as handle:
        for request_id, predicted in served.items():
            handle.write(json.dumps({"ts": f"{day}T09:00:00Z", "request_id": request_id, "model": "brain_mri",
                                     "version": 1, "class": predicted, "confidence": 0.9,
                                     "probabilities": [0.9, 0.05, 0.03, 0.02], "pixel_histogram": [1] * 32,
                                     "pixel_mean": 80.0}) + "\n")
        handle.write("{truncated line\n")  # a crash mid-write must not break the join
    return folder


def _feedback(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.feedback", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.fixture()
def case(tmp_path):
    images = {label: sorted((BRAIN / label).iterdir())[0] for label in ("glioma", "pituitary", "notumor")}
    studies = tmp_path / "studies"
    studies.mkdir()
    for label, path in images.items():
        shutil.copy(path, studies / f"{label}{path.suffix}")
    logs = _request_log(tmp_path / "logs", {"r1": "glioma", "r2": "glioma", "r3": "notumor", "r4": "pituitary",
                                            "r5": "glioma"})
    labels = tmp_path / "confirmed.csv"
    rows = [
        ("r1", "glioma", "studies/glioma.jpg"),      # correct, with image
        ("r2", "pituitary", "studies/pituitary.jpg"),  # served glioma: wrong
        ("r3", "notumor", ""),                       # correct, no image: accuracy only
        ("r4", "pituitary", "studies/missing.jpg"),  # image_missing
        ("r9", "glioma", "studies/glioma.jpg"),      # unknown_request_id
        ("r5", "tumour", ""),                        # unknown_label (with --config)
        ("r1", "glioma", "studies/glioma.jpg"),      # exact duplicate: counted once
        ("", "glioma", ""),                          # missing_request_id
        ("../r3", "glioma", ""),                     # unsafe_request_id
    ]
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request_id", "label", "image_path"])
        writer.writerows(rows)
    return tmp_path, logs, labels


def test_feedback_partition_and_live_accuracy(case):
    tmp_path, logs, labels = case
    out = tmp_path / "partition"
    result = _feedback("--labels", str(labels), "--requests", str(logs), "--output", str(out), "--config", "brain_mri")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "feedback_summary.json").read_text())
    assert summary["accepted"] == 3 and summary["n"] == 3
    assert summary["live_accuracy"] == pytest.approx(2 / 3)
    assert summary["per_class"]["pituitary"] == {"recall": 0.0, "n": 1}
    assert summary["rejected_by_reason"] == {"image_missing": 1, "unknown_request_id": 1, "unknown_label": 1,
                                             "missing_request_id": 1, "unsafe_request_id": 1}
    assert {(r["row"], r["reason"]) for r in summary["rejected"]} >= {(5, "image_missing"), (6, "unknown_request_id")}
    assert summary["without_image"] == ["r3"]
    with (out / "manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    assert manifest == [{"path": "glioma/r1.jpg", "label": "glioma"}, {"path": "pituitary/r2.jpg", "label": "pituitary"}]
    assert (out / "pituitary" / "r2.jpg").read_bytes() == (tmp_path / "studies" / "pituitary.jpg").read_bytes()
    assert "r9" in result.stderr or "unknown" in result.stderr  # every unused row is logged with its reason
    # the ingest stage reads the partition's manifest as it is (labels and paths resolved from the manifest)
    from beam_pipelines.ingest import list_inputs

    items = list_inputs(str(out / "manifest.csv"))
    assert [(Path(item.path).relative_to(out).as_posix(), item.label) for item in items] == \
        [("glioma/r1.jpg", "glioma"), ("pituitary/r2.jpg", "pituitary")]
    # re-running rewrites the same partition
    again = _feedback("--labels", str(labels), "--requests", str(logs), "--output", str(out), "--config", "brain_mri")
    assert again.returncode == 0 and sorted(p.name for p in out.rglob("*.jpg")) == ["r1.jpg", "r2.jpg"]


def test_conflicting_labels_are_refused(tmp_path):
    requests = {"a": {"class": "glioma", "model": "m"}}
    rows = [{"row": 2, "request_id": "a", "label": "glioma", "image_path": ""},
            {"row": 3, "request_id": "a", "label": "notumor", "image_path": ""}]
    accepted, rejected = feedback.validate(rows, requests, ["glioma", "notumor"])
    assert accepted == [] and [r["reason"] for r in rejected] == ["label_conflict", "label_conflict"]


def test_without_config_any_safe_label_is_kept(tmp_path):
    requests = {"a": {"class": "x", "model": "m"}, "b": {"class": "y", "model": "m"}}
    rows = [{"row": 2, "request_id": "a", "label": "x", "image_path": ""},
            {"row": 3, "request_id": "b", "label": "../etc", "image_path": ""}]
    accepted, rejected = feedback.validate(rows, requests, None)
    assert [r["request_id"] for r in accepted] == ["a"] and rejected[0]["reason"] == "unknown_label"
    assert feedback.live_accuracy(accepted, requests)["live_accuracy"] == 1.0


def test_bad_inputs_fail_with_a_clear_message(tmp_path):
    logs = _request_log(tmp_path / "logs", {"r1": "glioma"})
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("id,diagnosis\nr1,glioma\n")
    result = _feedback("--labels", str(bad_header), "--requests", str(logs), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "header must be request_id,label" in result.stderr
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("request_id,label\nzz,glioma\n")
    result = _feedback("--labels", str(nothing), "--requests", str(logs), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "none of the 1 rows" in result.stderr and "unknown_request_id" in result.stderr
