"""The ingest's DoFns inside Beam (TestPipeline + assert_that) on a handful of literal elements: ResolveGroupFn (the
dedup shuffle's resolver), ReportFn (the stats combiner) and the spill writer (SpillFile -> WriteShardFn). The pure
functions under them are tested in test_ingest.py; the whole pipeline on real images there too."""

from __future__ import annotations

import gzip
import struct

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline  # (a Test* name pytest would collect)
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines.ingest import ReportFn, ResolveGroupFn, SpillFile, WriteShardFn
from beam_pipelines.tf_example import tfrecord_frame
from medpipe.config import ShardConfig


def _meta(index: int, path: str, label: str, size: str = "64x64", mode: str = "L", split: str = "train") -> dict:
    return {"index": index, "path": path, "label": label, "input_size": size, "input_mode": mode, "split": split,
            "hist": [index, 1], "sum": 10.0 * index, "sumsq": 100.0 * index, "count": 2}


def _counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(counter.committed for counter in counters)


def test_resolve_group_keeps_one_copy_drops_the_others_and_rejects_label_conflicts():
    copy_b, copy_a = _meta(1, "/in/x/b.png", "x"), _meta(0, "/in/x/a.png", "x")
    conflict_x, conflict_y = _meta(2, "/in/x/c.png", "x", mode="RGB"), _meta(3, "/in/y/c.png", "y")
    single = _meta(4, "/in/y/d.png", "y", size="512x512", split="val")
    # one hash bucket as GroupByKey hands it over: the batches of (pixel_hash, meta) that decoding emitted
    bucket = (0, [[("aa", copy_b), ("bb", conflict_x)], [("aa", copy_a), ("bb", conflict_y), ("cc", single)]])
    detail = "the same pixels appear under labels ['x', 'y'] in 2 files"

    def check(outputs):
        assert sorted(value for tag, value in outputs if tag == "drop") == [1, 2, 3]
        reports = [value for tag, value in outputs if tag == "report"]
        assert len(reports) == 1 and reports[0][0] == "partial"  # the bucket's report items, summed
        report = reports[0][1]
        assert report["splits"] == {"train": {"x": 1}, "val": {"y": 1}}  # kept: a.png (first path) and d.png
        assert report["hist"][:2] == [4, 2] and (report["sum"], report["sumsq"], report["count"]) == (40.0, 400.0, 4)
        assert report["sizes"] == {"64x64": 4, "512x512": 1} and report["modes"] == {"L": 4, "RGB": 1}
        assert report["rejected"] == [{"path": "/in/x/c.png", "reason": "label_conflict", "detail": detail},
                                      {"path": "/in/y/c.png", "reason": "label_conflict", "detail": detail}]
        assert report["duplicates"] == [{"pixel_hash": "aa", "label": "x", "kept": "/in/x/a.png",
                                         "dropped": ["/in/x/b.png"]}]

    pipeline = BeamPipeline()
    resolved = pipeline | beam.Create([bucket]) | beam.ParDo(ResolveGroupFn())
    assert_that(resolved, check)
    result = pipeline.run()
    result.wait_until_finish()
    assert _counter(result, "duplicates_dropped") == 1
    assert _counter(result, "rejected_label_conflict") == 2


def test_resolve_group_direct_call_is_the_same_whatever_order_the_batches_came_in():
    """Edge case without Beam: report lists in pixel-hash order, so a bucket's sum does not depend on arrival."""
    fn = ResolveGroupFn()
    first = [("zz", _meta(0, "/z.png", "a")), ("zz", _meta(2, "/y.png", "a"))]
    second = [("aa", _meta(1, "/a.png", "a")), ("aa", _meta(3, "/b.png", "a"))]
    one, other = list(fn.process((7, [first, second]))), list(fn.process((7, [second, first])))
    assert one == other
    assert [group["kept"] for group in one[-1][1][1]["duplicates"]] == ["/a.png", "/y.png"]
    assert [value for tag, value in one if tag == "drop"] == [3, 0]


REPORT_ITEMS = [
    ("kept", {"split": "train", "label": "x", "hist": [1, 2], "sum": 10.0, "sumsq": 60.0, "count": 3}),
    ("kept", {"split": "train", "label": "x", "hist": [0, 4], "sum": 5.0, "sumsq": 25.0, "count": 4}),
    ("kept", {"split": "val", "label": "y", "hist": [3, 0], "sum": 1.0, "sumsq": 1.0, "count": 3}),
    ("decoded", ("64x64", "L")), ("decoded", ("64x64", "L")), ("decoded", ("32x32", "RGB")),
    ("rejected", {"path": "/in/bad.png", "reason": "corrupt", "detail": "truncated"}),
    ("duplicates", {"pixel_hash": "aa", "label": "x", "kept": "/a.png", "dropped": ["/b.png"]}),
    ("shard", ("/out/train-00000-of-00001.tfrecord.gz", 2)), ("shard", ("/out/val-00000-of-00001.tfrecord.gz", 1)),
]


def _check_report(outputs: list) -> None:
    assert len(outputs) == 1
    report = outputs[0]
    assert report["splits"] == {"train": {"x": 2}, "val": {"y": 1}}
    assert report["hist"][:2] == [4, 6] and sum(report["hist"]) == 10
    assert (report["sum"], report["sumsq"], report["count"]) == (16.0, 86.0, 10)
    assert report["sizes"] == {"64x64": 2, "32x32": 1} and report["modes"] == {"L": 2, "RGB": 1}
    assert [item["path"] for item in report["rejected"]] == ["/in/bad.png"]
    assert [group["dropped"] for group in report["duplicates"]] == [["/b.png"]]
    assert sorted(report["shards"]) == ["/out/train-00000-of-00001.tfrecord.gz", "/out/val-00000-of-00001.tfrecord.gz"]
    assert report["shard_records"] == 3


def test_report_combines_every_item_kind_into_one_accumulator():
    with BeamPipeline() as pipeline:
        report = pipeline | beam.Create(REPORT_ITEMS) | beam.CombineGlobally(ReportFn())
        assert_that(report, _check_report)


def test_report_merging_partial_accumulators_equals_one_pass():
    fn = ReportFn()

    def accumulate(items):
        acc = fn.create_accumulator()
        for item in items:
            acc = fn.add_input(acc, item)
        return acc

    for cut in range(len(REPORT_ITEMS) + 1):
        merged = fn.merge_accumulators([accumulate(REPORT_ITEMS[:cut]), accumulate(REPORT_ITEMS[cut:])])
        _check_report([fn.extract_output(merged)])
        # a dedup bucket's items arrive already summed ("partial", ResolveGroupFn) among single items
        _check_report([fn.extract_output(accumulate([("partial", accumulate(REPORT_ITEMS[:cut])),
                                                     *REPORT_ITEMS[cut:]]))])


def _read_tfrecords(path) -> list[bytes]:
    """An independent reader of the TFRecord framing (length, crc, data, crc) inside GZIP."""
    data, records, at = gzip.decompress(path.read_bytes()), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return records


@pytest.mark.parametrize("dropped", [[], [5]])
def test_spilled_examples_are_written_to_their_shard_sorted_by_source_id(tmp_path, dropped):
    spill_dir = tmp_path / "_spill"
    spill_dir.mkdir()
    first, second = SpillFile(str(spill_dir)), SpillFile(str(spill_dir))  # two bundles, two files
    refs = {}
    for spill, index, source_id, payload in [(first, 5, "c3", b"example five"), (first, 6, "a1", b"six"),
                                             (second, 7, "b2", b"example seven, longer")]:
        refs.setdefault(spill.path, []).append((index, source_id, *spill.append(tfrecord_frame(payload))))
    first.close()
    second.close()
    assert first.path != second.path and first.offset == len(tfrecord_frame(b"example five")) + len(
        tfrecord_frame(b"six"))
    element = (("train", 0), [(path, shard_refs) for path, shard_refs in refs.items()])
    out = tmp_path / "out"
    out.mkdir()
    with BeamPipeline() as pipeline:
        drops = pipeline | "Drops" >> beam.Create(dropped)
        written = (pipeline | "Shards" >> beam.Create([element])
                   | beam.ParDo(WriteShardFn(str(out), ShardConfig(train=1, val=1, test=1)),
                                dropped=beam.pvalue.AsList(drops)))
        shard = str(out / "train-00000-of-00001.tfrecord.gz")
        assert_that(written, equal_to([("shard", (shard, 3 - len(dropped)))]))
    expected = [b"six", b"example seven, longer", b"example five"]  # a1, b2, c3
    assert _read_tfrecords(out / "train-00000-of-00001.tfrecord.gz") == (expected[:2] if dropped else expected)
