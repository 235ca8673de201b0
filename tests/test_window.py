"""The training window (medpipe/window.py), the combined blessing (models/gate.py) and batch outcomes
(serving/batch.py): the pure parts, on real ingested partitions where they read files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medpipe.config import load_config
from medpipe.errors import ConfigError, DataError
from medpipe.window import build_window, parse_window, select_partitions

ROOT = Path(__file__).resolve().parent.parent
ORDERED = ["2026-11-01", "2026-11-02", "feedback-2026-11-02", "2026-11-03"]


def test_window_spec_forms():
    assert parse_window("all") == ("all", None)
    assert parse_window({"last": 2}) == ("last", 2)
    assert parse_window(["2026-11-01"]) == ("list", ("2026-11-01",))
    for bad in ({"last": 0}, {"last": "2"}, {"first": 2}, "some", [], [3]):
        with pytest.raises(ConfigError, match="training.partitions"):
            parse_window(bad)


def test_window_selection_keeps_order_and_adds_feedback():
    assert select_partitions(ORDERED, "all") == ["2026-11-01", "2026-11-02", "2026-11-03", "feedback-2026-11-02"]
    assert select_partitions(ORDERED, {"last": 1}) == ["2026-11-03", "feedback-2026-11-02"]
    assert select_partitions(ORDERED, {"last": 1}, include_feedback=False) == ["2026-11-03"]
    assert select_partitions(ORDERED, ("2026-11-03", "2026-11-01")) == ["2026-11-01", "2026-11-03",
                                                                         "feedback-2026-11-02"]
    with pytest.raises(DataError, match=r"\['2026-12-01'\], which are not ingested"):
        select_partitions(ORDERED, ["2026-12-01"])


def test_config_takes_the_window_and_refuses_a_bad_one():
    config = load_config(ROOT / "config" / "brain_mri.yaml", ["training.partitions={last: 3}"])
    assert config.training.partitions == {"last": 3} and config.training.include_feedback is True
    assert load_config(ROOT / "config" / "brain_mri.yaml", ["training.partitions=[a, b]"]).training.partitions == \
        ("a", "b")
    with pytest.raises(ConfigError, match="training.partitions"):
        load_config(ROOT / "config" / "brain_mri.yaml", ["training.partitions=newest"])


def test_partition_dates_are_taken_as_typed():
    """docs/operations.md's window syntax: YAML would read 2026-11-24 as a date; partition names are strings."""
    config = load_config(ROOT / "config" / "brain_mri.yaml", ["training.partitions=[2026-11-24, 2026-11-25]"])
    assert config.training.partitions == ("2026-11-24", "2026-11-25")
    assert load_config(ROOT / "config" / "brain_mri.yaml", ["training.epochs=3"]).training.epochs == 3


def test_window_folder_links_every_shard_and_records_fingerprints(ingested_sample, tmp_path):
    first, second = tmp_path / "2026-11-01", tmp_path / "2026-11-02"
    shutil.copytree(ingested_sample, first)
    shutil.copytree(ingested_sample, second)
    record = build_window([first, second], tmp_path / "window", {"2026-11-01": "t1"})
    window = tmp_path / "window"
    shards = sorted(path.name for path in window.glob("train-*.tfrecord.gz"))
    assert len(shards) == 2 * len(list(ingested_sample.glob("train-*.tfrecord.gz")))
    assert shards[0].startswith("train-000-2026-11-01-") and all((window / name).resolve().is_file()
                                                                    for name in shards)
    assert json.loads((window / "window.json").read_text()) == record
    assert [part["name"] for part in record["partitions"]] == ["2026-11-01", "2026-11-02"]
    assert record["partitions"][0]["ingested_at"] == "t1" and record["partitions"][1]["ingested_at"] is None
    assert record["partitions"][0]["sha256"] == record["partitions"][1]["sha256"]  # same bytes, same fingerprint
    assert record["image_size"] == 64 and record["channels"] == 1
    # the trainer reads the window like any partition
    from models.data import check_data

    config = load_config(ROOT / "config" / "brain_mri.yaml", ["image.size=64"])
    assert check_data(window, config).image_size == 64


def test_window_refuses_partitions_with_different_schemas(ingested_sample, tmp_path):
    other = tmp_path / "2026-11-02"
    shutil.copytree(ingested_sample, other)
    schema = json.loads((other / "schema.json").read_text())
    schema["image"]["height"] = schema["image"]["width"] = 128
    schema["fingerprint"] = "different"
    (other / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataError, match="do not share one schema.*128 px"):
        build_window([ingested_sample, other], tmp_path / "window")
    assert not (tmp_path / "window").exists()


def test_combined_blessing_needs_every_evaluation():
    from models.gate import combine

    good = {"blessed": True, "reasons": [], "baseline": {"label": "stable", "version": 7},
            "metrics": {"candidate": {"accuracy": 0.9}, "stable": {"accuracy": 0.8}}}
    bad = {"blessed": False, "reasons": ["accuracy 0.5 is worse than the stable model (version 7)'s 0.8"],
           "baseline": {"label": "stable", "version": 7}}
    combined = combine({"partition_test": good, "golden": bad})
    assert combined["blessed"] is False and combined["baseline"]["version"] == 7
    assert combined["reasons"] == ["golden: accuracy 0.5 is worse than the stable model (version 7)'s 0.8"]
    assert combined["evaluations"]["partition_test"]["metrics"]["stable"] == {"accuracy": 0.8}
    assert combine({"partition_test": good})["blessed"] is True
    # `medpipe publish` accepts a verdict made on a test split only: the golden set (external images) may join it,
    # a val split or images alone may not
    test, images = {"split": "test", "fingerprint": "f1"}, {"split": "images", "fingerprint": "f2"}
    data = combine({"partition_test": {**good, "data": test}, "golden": {**good, "data": images}})["data"]
    assert (data["split"], data["fingerprint"], data["evaluations"]["golden"]) == ("test", "f1", images)
    assert combine({"golden": {**good, "data": images}})["data"]["split"] == "images"
    assert combine({"p": {**good, "data": test}, "v": {**good, "data": {"split": "val"}}})["data"]["split"] == "val"
    assert combine({"partition_test": good})["data"]["split"] == "unrecorded data"
    shift = {"split": "test_shift", "fingerprint": "f3"}  # the shift-aware test split gates like test
    assert combine({"p": {**good, "data": shift}, "golden": {**good, "data": images}})["data"]["split"] == "test_shift"
    assert combine({"p": {**good, "data": shift}, "v": {**good, "data": {"split": "val_shift"}}})["data"]["split"] \
        == "val_shift"


def test_batch_outcomes_and_the_rejected_fraction(tmp_path):
    from serving.batch import list_files, outcome_rows, summarize, write_partition

    drop = tmp_path / "drop"
    (drop / "a").mkdir(parents=True)
    for name in ("a/1.png", "a/2.png", "notes.txt", ".hidden"):
        (drop / name).write_bytes(b"x")
    assert [path.relative_to(drop).as_posix() for path in list_files(drop)] == ["a/1.png", "a/2.png", "notes.txt"]
    lines = [{"file": str(drop / "a/1.png"), "class": "glioma", "model_version": 3},
             {"file": str(drop / "a/2.png"), "class": "notumor", "model_version": 3},
             {"file": str(drop / "notes.txt"), "error": "cannot use this file", "reason": "not_image"}]
    rows = outcome_rows(lines, drop)
    assert [(row["file"], row["outcome"]) for row in rows] == [("a/1.png", "predicted"), ("a/2.png", "predicted"),
                                                               ("notes.txt", "rejected")]
    summary = summarize(rows, 0.5)
    assert (summary["files"], summary["predicted"], summary["rejected"]) == (3, 2, 1)
    assert summary["rejected_reasons"] == {"not_image": 1} and summary["passed"] is True
    assert summarize(rows, 0.2)["passed"] is False
    out = tmp_path / "out"
    write_partition(out, rows, summary)
    write_partition(out, rows[:1], summarize(rows[:1], 0.5))  # a re-run replaces the partition
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["drop", "out"]
