"""`medpipe ingest`: DICOM/PNG/JPEG/TIFF -> validated, de-identified, patient-split TFRecords (Apache Beam).

    medpipe ingest --config config/brain_mri.yaml --input ../shared/data/brain-tumor-mri/Training --output data/brain
    python -m beam_pipelines.ingest --config brain_mri --input manifest.csv --output gs://bucket/x \
        --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp

    ListInputs -> PreprocessImages (ok | rejected) -> Deduplicate (by decoded-pixel hash; label conflicts rejected)
    -> AssignSplit (by patient pseudonym, else pixel hash; salted, stable) -> WriteSplits (sharded GZIP TFRecords)
    + WriteReports (stats.json, rejected.jsonl, duplicates.jsonl); schema.json; then the temp folder moves into place.

Inputs: a folder of class folders (label = first folder under --input) or a CSV manifest (path,label[,patient_id,
study_id]; relative paths are relative to the manifest). Every path goes through Beam FileSystems, so local, gs://
and s3:// (with the extra) work. Unknown flags are Beam pipeline options; without --runner the DirectRunner's
engine (FnApiRunner) runs in multi-processing mode with 2 workers. The de-identification key comes from
MEDPIPE_DEID_KEY in the workers' environment (read in DoFn.setup, never pickled into the pipeline graph).

Other runners, through the same pass-through options:
    --runner DaskRunner --dask_client_address tcp://HOST:8786          (dask.distributed; tested in test_ingest.py)
    --runner FlinkRunner --flink_master HOST:8081 --environment_type LOOPBACK   (Beam's Flink job server)
    --runner SparkRunner --spark_master_url spark://HOST:7077 --environment_type LOOPBACK
    --runner PortableRunner --job_endpoint HOST:8099 --environment_type LOOPBACK   (any running job server)
With a remote cluster, inputs and --output must be paths every worker can reach (gs://, s3://, a shared mount).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from medpipe import schema as keys
from medpipe.config import SPLITS, TaskConfig, load_config
from medpipe.errors import DataError, RejectedInput

LOG = logging.getLogger("medpipe.ingest")
NAMESPACE = "medpipe.ingest"
HIST_BINS = 32
DUPLICATES_FILE = "duplicates.jsonl"
PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class InputItem:
    path: str
    label: Optional[str]
    size: int = -1  # bytes, when the listing knows it
    patient_id: Optional[str] = None  # from a manifest; pseudonymised in PreprocessImages, never written
    study_id: Optional[str] = None


# ---------------------------------------------------------------------------------------------------------------
# listing (at construction time: the list of names is small; the bytes are read by the workers)
def list_inputs(source: str) -> list[InputItem]:
    """A CSV manifest or a folder of class folders -> InputItems, sorted by path."""
    if source.lower().endswith(".csv"):
        return read_manifest(source)
    root = source.rstrip("/")
    matches = FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list
    items = []
    for meta in matches:
        relative = posixpath.relpath(meta.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or relative in (".", ""):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are not inputs
        label = parts[0] if len(parts) >= 2 else None
        items.append(InputItem(path=meta.path, label=label, size=meta.size_in_bytes))
    if not items:
        raise DataError(f"no files under {source}: expected one folder per class (or pass a CSV manifest)")
    return sorted(items, key=lambda item: item.path)


def read_manifest(path: str) -> list[InputItem]:
    """CSV with a header: path,label[,patient_id,study_id]; relative paths are relative to the manifest's folder."""
    base = posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        text = handle.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
        raise DataError(f"{path}: a manifest needs a header with at least the columns path,label "
                        f"(optional patient_id, study_id); got {reader.fieldnames}")
    items = []
    for row in reader:
        raw = (row.get("path") or "").strip()
        if not raw:
            continue
        full = raw if ("://" in raw or os.path.isabs(raw)) else FileSystems.join(base, raw)
        items.append(InputItem(
            path=full, label=(row.get("label") or "").strip() or None,
            patient_id=(row.get("patient_id") or "").strip() or None,
            study_id=(row.get("study_id") or "").strip() or None,
        ))
    if not items:
        raise DataError(f"{path}: the manifest lists no files")
    return items


# ---------------------------------------------------------------------------------------------------------------
# pure element functions
def rejection(path: str, reason: str, detail: str) -> dict:
    return {"path": path, "reason": reason, "detail": detail}


def histogram32(pixels) -> list[int]:
    import numpy as np

    return np.bincount(pixels.reshape(-1) >> 3, minlength=HIST_BINS).astype(int).tolist()


def prepare_record(item: InputItem, data: bytes, config: TaskConfig, key: Optional[bytes]) -> dict:
    """One file -> the record the rest of the pipeline carries. Raises RejectedInput."""
    from medpipe.deid import pseudonym
    from medpipe.imaging import check_file_size, preprocess_bytes
    import numpy as np

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
    return {
        "path": item.path,
        "label": item.label,
        "pixel_hash": digest,
        "split_key": pseudo or digest,
        "pseudonym": pseudo,
        "source_id": source_id,
        "png": prepared.png,
        "dicom": dict(decoded.dicom),
        "hist": histogram32(pixels),
        "sum": float(pixels.sum(dtype=np.float64)),
        "sumsq": float(np.square(pixels, dtype=np.float64).sum()),
        "count": int(pixels.size),
        "input_size": f"{decoded.width}x{decoded.height}",
        "input_mode": f"{decoded.format}/{decoded.mode}",
    }


def resolve_duplicates(pixel_hash: str, records: Iterable[dict]) -> tuple[Optional[dict], list[dict], Optional[dict]]:
    """Records sharing decoded pixels -> (kept or None, rejected, duplicate group or None).

    One label: keep the first path (sorted, so the choice is deterministic) and list the others. Two or more
    labels: a label conflict, every copy rejected (which label is right is for a human to decide)."""
    group = sorted(records, key=lambda record: record["path"])
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


def assign_split(split_key: str, salt: str, ratios: Any) -> str:
    """Deterministic split from a salted sha256 of the key: adding files never moves an existing key."""
    import hashlib

    unit = int(hashlib.sha256(f"{salt}:{split_key}".encode()).hexdigest()[:15], 16) / float(16**15)
    if unit < ratios.train:
        return "train"
    if unit < ratios.train + ratios.val:
        return "val"
    return "test"


def to_example(record: dict, config: TaskConfig) -> bytes:
    from beam_pipelines.tf_example import encode_example

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


# ---------------------------------------------------------------------------------------------------------------
# DoFns and composite transforms
class PreprocessFn(beam.DoFn):
    """Read one file through FileSystems and prepare it; failures go to the `rejected` output, never stop the run."""

    def __init__(self, config: TaskConfig):
        self.config = config
        self.read = Metrics.counter(NAMESPACE, "read")
        self.ok = Metrics.counter(NAMESPACE, "decoded")
        self._rejected: dict = {}

    def setup(self):
        from medpipe import imaging  # noqa: F401 - warm the import (Pillow, numpy) once per worker
        from medpipe.deid import deid_key_from_env

        self.key = deid_key_from_env(required=False)
        self.seen = 0

    def _reject(self, path: str, reason: str, detail: str):
        if reason not in self._rejected:
            self._rejected[reason] = Metrics.counter(NAMESPACE, f"rejected_{reason}")
        self._rejected[reason].inc()
        return ("rejected", rejection(path, reason, detail))

    def process(self, item: InputItem):
        self.read.inc()
        self.seen += 1
        if self.seen % PROGRESS_EVERY == 0:
            LOG.info("ingest worker %s: %d inputs preprocessed", os.getpid(), self.seen)
        try:
            if item.size > self.config.ingest.max_file_mb * 2**20:
                raise RejectedInput("pixel_budget", f"file over ingest.max_file_mb={self.config.ingest.max_file_mb}")
            with FileSystems.open(item.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
            record = prepare_record(item, data, self.config, self.key)
        except RejectedInput as exc:
            yield self._reject(item.path, exc.reason, exc.detail)
            return
        except OSError as exc:
            yield self._reject(item.path, "corrupt", f"cannot read the file ({type(exc).__name__})")
            return
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the pipeline; no message (may hold PHI)
            yield self._reject(item.path, "corrupt", f"unexpected {type(exc).__name__} while decoding")
            return
        self.ok.inc()
        yield ("ok", record)


def _select(element: tuple, tag: str):
    if element[0] == tag:
        yield element[1]


class SplitByTag(beam.PTransform):
    """(tag, value) pairs -> {tag: PCollection of values}.

    Multi-output DoFns here emit their tag as data instead of pvalue.TaggedOutput: Beam 2.77's DaskRunner sends
    every TaggedOutput to every consumer, so with_outputs() would mix rejected and decoded records on Dask. This
    form means the same on every runner and fuses into the producing stage."""

    def __init__(self, *tags: str):
        super().__init__()
        self.tags = tags

    def expand(self, tagged):
        return {tag: tagged | f"Select{tag.title()}" >> beam.FlatMap(_select, tag) for tag in self.tags}


class PreprocessImages(beam.PTransform):
    """InputItems -> {"ok": records, "rejected": rejections}."""

    def __init__(self, config: TaskConfig):
        super().__init__()
        self.config = config

    def expand(self, items):
        # beam.Create already reshuffles its elements across workers: no extra Reshuffle here.
        return (items
                | "Decode" >> beam.ParDo(PreprocessFn(self.config))
                | "ByOutcome" >> SplitByTag("ok", "rejected"))


class ResolveGroupFn(beam.DoFn):
    def __init__(self):
        self.dropped = Metrics.counter(NAMESPACE, "duplicates_dropped")
        self.conflicts = Metrics.counter(NAMESPACE, "rejected_label_conflict")

    def process(self, element):
        pixel_hash, records = element
        kept, rejected, group = resolve_duplicates(pixel_hash, records)
        for item in rejected:
            self.conflicts.inc()
            yield ("rejected", item)
        if group is not None:
            self.dropped.inc(len(group["dropped"]))
            yield ("duplicates", group)
        if kept is not None:
            yield ("kept", kept)


class Deduplicate(beam.PTransform):
    """Records -> {"kept": one per decoded-pixel hash, "rejected": label conflicts, "duplicates": groups listed}."""

    def expand(self, records):
        return (records
                | "KeyByPixelHash" >> beam.Map(lambda record: (record["pixel_hash"], record))
                | "GroupByPixelHash" >> beam.GroupByKey()
                | "Resolve" >> beam.ParDo(ResolveGroupFn())
                | "ByOutcome" >> SplitByTag("kept", "rejected", "duplicates"))


class AssignSplit(beam.PTransform):
    def __init__(self, config: TaskConfig):
        super().__init__()
        self.salt, self.ratios = config.ingest.split_salt, config.ingest.split

    def expand(self, records):
        salt, ratios = self.salt, self.ratios
        return records | "Split" >> beam.Map(lambda r: {**r, "split": assign_split(r["split_key"], salt, ratios)})


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord.gz"


def shard_of(source_id: str, num_shards: int) -> int:
    """Deterministic shard from the record's keyed id: a re-run writes byte-identical shards."""
    return int(source_id[:8], 16) % num_shards


class WriteShardFn(beam.DoFn):
    """One GZIP TFRecord file per (split, shard), records sorted by source id (reproducible bytes)."""

    def __init__(self, directory: str, shards: Any):
        self.directory, self.shards = directory, shards
        self.written = Metrics.counter(NAMESPACE, "written")

    def process(self, element):
        import gzip

        from beam_pipelines.tf_example import tfrecord_frame

        (split, shard), examples = element
        examples = sorted((e for e in examples if e is not None), key=lambda e: e[0])
        path = FileSystems.join(self.directory, shard_name(split, shard, getattr(self.shards, split)))
        # gzip level 1 with mtime 0: the payload is PNG (already deflated), so higher levels cost CPU for ~nothing,
        # and a fixed header timestamp keeps re-runs byte-identical.
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:
                for _, example in examples:
                    out.write(tfrecord_frame(example))
        self.written.inc(len(examples))
        yield path


class WriteSplits(beam.PTransform):
    """{train,val,test}-SSSSS-of-NNNNN.tfrecord.gz, ingest.shards files per split (empty shards written too).

    Sharding is done here (GroupByKey on (split, shard)) rather than by WriteToTFRecord: its Impulse-based
    initialisation does not run on Beam 2.77's DaskRunner, and a keyed shard makes the output deterministic."""

    def __init__(self, config: TaskConfig, directory: str):
        super().__init__()
        self.config, self.directory = config, directory

    def expand(self, records):
        config, shards = self.config, self.config.ingest.shards
        every_shard = [((split, shard), None) for split in SPLITS for shard in range(getattr(shards, split))]
        keyed = records | "ToExample" >> beam.Map(
            lambda r: ((r["split"], shard_of(r["source_id"], getattr(shards, r["split"]))),
                       (r["source_id"], to_example(r, config))))
        placeholders = records.pipeline | "EveryShard" >> beam.Create(every_shard)
        return ((keyed, placeholders)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(WriteShardFn(self.directory, shards)))


class StatsFn(beam.CombineFn):
    """Counts and pixel moments of the written records (small accumulators: no image travels)."""

    def create_accumulator(self):
        return {"splits": {}, "hist": [0] * HIST_BINS, "sum": 0.0, "sumsq": 0.0, "count": 0}

    def add_input(self, acc, record):
        split = acc["splits"].setdefault(record["split"], {})
        split[record["label"]] = split.get(record["label"], 0) + 1
        acc["hist"] = [a + b for a, b in zip(acc["hist"], record["hist"])]
        acc["sum"] += record["sum"]
        acc["sumsq"] += record["sumsq"]
        acc["count"] += record["count"]
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            for split, classes in acc["splits"].items():
                target = out["splits"].setdefault(split, {})
                for label, n in classes.items():
                    target[label] = target.get(label, 0) + n
            out["hist"] = [a + b for a, b in zip(out["hist"], acc["hist"])]
            for name in ("sum", "sumsq", "count"):
                out[name] += acc[name]
        return out

    def extract_output(self, acc):
        return acc


def build_stats(config: TaskConfig, input_files: int, written: dict, rejected: list[dict], duplicates: list[dict],
                sizes: dict, modes: dict) -> dict:
    """The stats.json body; `input_files == written + rejected + duplicates_dropped` by construction (checked)."""
    import math

    splits = {split: {"total": sum(written["splits"].get(split, {}).values()),
                      "classes": {label: written["splits"].get(split, {}).get(label, 0) for label in config.labels}}
              for split in SPLITS}
    total = sum(s["total"] for s in splits.values())
    by_class = {label: sum(s["classes"][label] for s in splits.values()) for label in config.labels}
    by_reason: dict[str, int] = {}
    for item in rejected:
        by_reason[item["reason"]] = by_reason.get(item["reason"], 0) + 1
    dropped = sum(len(group["dropped"]) for group in duplicates)
    count = written["count"]
    mean = written["sum"] / count if count else 0.0
    std = math.sqrt(max(written["sumsq"] / count - mean * mean, 0.0)) if count else 0.0
    stats = {
        "name": config.name,
        "input_files": input_files,
        "written": total,
        "rejected": len(rejected),
        "duplicates_dropped": dropped,
        "splits": splits,
        "classes": by_class,
        "class_distribution": {label: (n / total if total else 0.0) for label, n in by_class.items()},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "duplicates": {"groups": len(duplicates), "dropped": dropped},
        "pixel_mean": mean,
        "pixel_std": std,
        "pixel_histogram": list(written["hist"]),
        "pixel_histogram_bins": {"count": HIST_BINS, "range": [0, 256], "width": 256 // HIST_BINS},
        "image": {"height": config.image.size, "width": config.image.size, "channels": config.image.channels},
        "input_sizes": dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "input_modes": dict(sorted(modes.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    if input_files != total + len(rejected) + dropped:
        raise DataError(f"ingest bookkeeping error: {input_files} inputs but {total} written + {len(rejected)} "
                        f"rejected + {dropped} duplicates (please report this bug)")
    return stats


def write_reports(_, config: TaskConfig, directory: str, input_files: int, written, rejected, duplicates, sizes, modes,
                  shard_paths):
    """stats.json, rejected.jsonl and duplicates.jsonl through FileSystems (one small write each)."""
    stats = build_stats(config, input_files, written, rejected, duplicates, dict(sizes), dict(modes))
    stats["files"] = sorted(posixpath.basename(path.replace(os.sep, "/")) for path in shard_paths)
    _write_text(FileSystems.join(directory, keys.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    _write_text(FileSystems.join(directory, keys.REJECTED_FILE),
                "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(rejected, key=lambda r: r["path"])))
    _write_text(FileSystems.join(directory, DUPLICATES_FILE),
                "".join(json.dumps(g, sort_keys=True) + "\n" for g in sorted(duplicates, key=lambda g: g["kept"])))
    return stats["written"]


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode("utf-8"))


class WriteReports(beam.PTransform):
    def __init__(self, config: TaskConfig, directory: str, input_files: int):
        super().__init__()
        self.config, self.directory, self.input_files = config, directory, input_files

    def expand(self, inputs):
        split_records, rejected, duplicates, decoded, shard_paths = inputs
        side = beam.pvalue.AsSingleton
        written = split_records | "Summarise" >> beam.CombineGlobally(StatsFn())
        rejected_list = rejected | "CollectRejected" >> beam.combiners.ToList()
        duplicate_list = duplicates | "CollectDuplicates" >> beam.combiners.ToList()
        sizes = (decoded
                 | "InputSize" >> beam.Map(lambda r: r["input_size"])
                 | "CountSizes" >> beam.combiners.Count.PerElement()
                 | "SizesToList" >> beam.combiners.ToList())
        modes = (decoded
                 | "InputMode" >> beam.Map(lambda r: r["input_mode"])
                 | "CountModes" >> beam.combiners.Count.PerElement()
                 | "ModesToList" >> beam.combiners.ToList())
        return (inputs[0].pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.Map(write_reports, self.config, self.directory, self.input_files, side(written),
                                      side(rejected_list), side(duplicate_list), side(sizes), side(modes),
                                      beam.pvalue.AsList(shard_paths)))


def build_pipeline(pipeline: beam.Pipeline, config: TaskConfig, items: list[InputItem], directory: str) -> None:
    """The whole graph; reads like the module docstring."""
    listed = pipeline | "ListInputs" >> beam.Create(items)
    prepared = listed | "PreprocessImages" >> PreprocessImages(config)
    unique = prepared["ok"] | "Deduplicate" >> Deduplicate()
    split = unique["kept"] | "AssignSplit" >> AssignSplit(config)
    shards = split | "WriteSplits" >> WriteSplits(config, directory)
    rejected = (prepared["rejected"], unique["rejected"]) | "AllRejected" >> beam.Flatten()
    # Applied last and fed the shard paths: the reports are written after the TFRecords (and a runner that computes
    # only the final step's ancestors, like Beam 2.77's DaskRunner, still runs every branch).
    ((split, rejected, unique["duplicates"], prepared["ok"], shards)
     | "WriteReports" >> WriteReports(config, directory, len(items)))


# ---------------------------------------------------------------------------------------------------------------
# publishing: a temp folder beside the output, moved into place when everything is written
OUTPUT_PATTERNS = ("train-*.tfrecord.gz", "val-*.tfrecord.gz", "test-*.tfrecord.gz", keys.SCHEMA_FILE,
                   keys.STATS_FILE, keys.REJECTED_FILE, DUPLICATES_FILE)


def is_local(path: str) -> bool:
    return "://" not in path


def temp_directory(output: str) -> str:
    return f"{output.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"


def publish(temp: str, output: str) -> None:
    """Replace the output with the temp folder: a re-run replaces, never adds to, an earlier output."""
    if is_local(output):
        old = None
        if os.path.exists(output):
            old = f"{output.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, old)
        os.replace(temp, output)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    stale = [m.path for pattern in OUTPUT_PATTERNS
             for m in FileSystems.match([FileSystems.join(output, pattern)])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)
    produced = [m.path for m in FileSystems.match([FileSystems.join(temp, "*")])[0].metadata_list]
    FileSystems.rename(produced, [FileSystems.join(output, posixpath.basename(p)) for p in produced])
    FileSystems.delete([temp])


def write_schema_file(config: TaskConfig, directory: str) -> None:
    body = keys.DatasetSchema.from_config(config).to_json()
    _write_text(FileSystems.join(directory, keys.SCHEMA_FILE), json.dumps(body, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# entry points
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe ingest",
        description="Beam pipeline: DICOM/PNG/JPEG/TIFF -> validated, de-identified, patient-split TFRecords. "
                    "Unknown options are passed to Beam (e.g. --runner DaskRunner --dask_client_address HOST:PORT); "
                    "default: the direct runner (FnApiRunner), multi_processing, 2 workers. Set MEDPIPE_DEID_KEY "
                    "for DICOM with patient IDs.",
    )
    parser.add_argument("--config", required=True, help="task config YAML (or a name in config/, e.g. brain_mri)")
    parser.add_argument("--input", required=True,
                        help="folder of class folders, or a CSV manifest (path,label[,patient_id,study_id]); "
                             "any Beam FileSystems path")
    parser.add_argument("--output", required=True, help="output folder (replaced when the run succeeds)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set image.size=64 (repeatable)")
    return parser


# Short names Beam 2.77's registry lacks or resolves unhelpfully. DirectRunner -> its own engine, FnApiRunner:
# the DirectRunner first tries the Prism runner, whose binary it downloads from GitHub (slow or failing offline) and
# which ignores direct_running_mode.
RUNNER_ALIASES = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "DirectRunner": "FnApiRunner",
}
LOCAL_DEFAULTS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def split_runner(beam_args: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """(--runner value or None, the other options)."""
    runner, rest, items = None, [], list(beam_args)
    index = 0
    while index < len(items):
        arg = items[index]
        if arg == "--runner" and index + 1 < len(items):
            runner, index = items[index + 1], index + 2
            continue
        if arg.startswith("--runner="):
            runner = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return runner, rest


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Pass-through Beam options. Without a runner (or DirectRunner): FnApiRunner, multi-processing, 2 workers,
    unless --direct_running_mode / --direct_num_workers say otherwise."""
    runner, rest = split_runner(beam_args)
    runner = RUNNER_ALIASES.get(runner or "DirectRunner", runner)
    if runner == "FnApiRunner":
        rest += [flag for flag in LOCAL_DEFAULTS if not any(a.startswith(flag.split("=")[0]) for a in rest)]
    return PipelineOptions([f"--runner={runner}", *rest])


def log_counters(result) -> dict[str, int]:
    counters = {}
    try:
        for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]:
            name = counter.key.metric.name
            counters[name] = counters.get(name, 0) + int(counter.committed or counter.attempted or 0)
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics; the stats file still does
        LOG.info("ingest: the runner reports no Beam metrics (%s)", type(exc).__name__)
    for name in sorted(counters):
        LOG.info("ingest counter %s = %d", name, counters[name])
    return counters


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the pipeline; returns the stats written to OUTPUT/stats.json."""
    args, beam_args = build_parser().parse_known_args(argv)
    config = load_config(args.config, args.overrides)
    items = list_inputs(args.input)
    if not os.environ.get("MEDPIPE_DEID_KEY"):
        LOG.warning("MEDPIPE_DEID_KEY is not set: inputs with patient IDs will be rejected (deid_key_missing)")
    output = args.output.rstrip("/")
    temp = temp_directory(output)
    if is_local(temp):
        os.makedirs(temp, exist_ok=True)
    LOG.info("ingest: %d inputs from %s -> %s (image %dx%d, %d channel(s))", len(items), args.input, output,
             config.image.size, config.image.size, config.image.channels)
    try:
        pipeline = beam.Pipeline(options=pipeline_options(beam_args))
        build_pipeline(pipeline, config, items, temp)
        result = pipeline.run()
        result.wait_until_finish()
        log_counters(result)
        write_schema_file(config, temp)
        with FileSystems.open(FileSystems.join(temp, keys.STATS_FILE)) as handle:
            stats = json.loads(handle.read().decode("utf-8"))
        publish(temp, output)
    except BaseException:
        if is_local(temp):
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if stats["written"] == 0:
        LOG.warning("ingest: no image was written (see %s/rejected.jsonl); --input must be a folder of class folders "
                    "named like the config's labels %s, or a manifest", output, list(config.labels))
    LOG.info("ingest: %d written (%s), %d rejected, %d duplicates dropped -> %s", stats["written"],
             ", ".join(f"{s} {stats['splits'][s]['total']}" for s in SPLITS), stats["rejected"],
             stats["duplicates_dropped"], output)
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Importing Beam may already have configured the root logger at WARNING; our progress lines are INFO.
    logging.getLogger("medpipe").setLevel(logging.INFO)
    run(argv)
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    # Run the importable module, not __main__: Beam workers unpickle classes by module path.
    from beam_pipelines import ingest as _ingest

    module_main(_ingest.main)
