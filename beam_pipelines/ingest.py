"""`medpipe ingest`: DICOM/PNG/JPEG/TIFF -> validated, de-identified, patient-split TFRecords (Apache Beam).

    medpipe ingest --config config/brain_mri.yaml --input ../shared/data/brain-tumor-mri/Training --output data/brain
    python -m beam_pipelines.ingest --config brain_mri --input manifest.csv --output gs://bucket/x \
        --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp

    ListInputs -> PreprocessImages (decode; split by patient pseudonym, else pixel hash, salted, stable; shard;
    spill | rejected) -> WriteSplits (sharded GZIP TFRecords, minus the copies Deduplicate drops)
    + NearDuplicateGroups when ingest.split_groups is set (a first decode for every image's perceptual hash, linked
    into groups on one worker, a side input of PreprocessImages: a group's images share its split)
    + Deduplicate (small metadata by decoded-pixel hash; label conflicts rejected; kept copy = first path)
    + WriteReports (stats.json, rejected.jsonl, duplicates.jsonl naming inputs by keyed input id; the input report
    mapping ids to paths, PHI, beside the output); schema.json; then the temp folder moves into place.

Safety of the output (run()): --output may not overlap --input, and must be new, empty or an earlier ingest output
(its .medpipe-ingest marker lists the files it wrote; only those are ever replaced or removed; --force writes into
another folder). The next run removes the OUTPUT.tmp-* folders of killed runs; the local workers die with this
process (beam_pipelines/local_runner.py, worker.py). No record written: exit 3, nothing published.

Cost (benchmarks/bench_ingest.py): no image bytes cross a shuffle. The listing goes to the workers as references
to batches of it in a file beside the spill files, not inside the pipeline graph; the decoding stage appends each
framed example to a per-bundle spill file under the temp output and, per input batch, emits one list of (file,
offset, length) references per (split, shard) and one list of per-record dedup metadata per hash bucket: the runner
shuffles a handful of elements per batch, not two per image. The shard writer streams the framed bytes from the
spill files into GZIP (stored blocks: PNG is already deflated). Since every copy is keyed by its own split, the kept
copy is already in its split and shard: a duplicate spanning splits stays impossible. Dedup sums each hash bucket's
report items, and one combine gathers those sums, the rejections and the written shards.

Inputs: a folder of class folders (label = first folder under --input) or a CSV manifest (path,label[,patient_id,
study_id]; relative paths are relative to the manifest). Local paths are listed and read directly, gs:// and s3://
ones through Beam FileSystems with the extras medpipe[gcp] / medpipe[aws] (a clear error names a missing one).
Unknown flags are Beam pipeline options; without --runner the DirectRunner's engine (FnApiRunner) runs in
multi-processing mode with 2 workers. The de-identification key comes from
MEDPIPE_DEID_KEY in the workers' environment (read in DoFn.setup, never pickled into the pipeline graph).

Other runners, through the same pass-through options (docs/operations.md, "Beam runners"):
    --runner DaskRunner --dask_client_address tcp://HOST:8786   (dask.distributed; a `dask scheduler` and two
        `dask worker` processes in test_ingest.py write the DirectRunner's bytes)
    --runner PortableRunner --job_endpoint HOST:8099 --artifact_endpoint HOST:8098 --environment_type EXTERNAL
        --environment_config localhost:50000   (Flink through the compose job server and worker-pool sidecar)
    --runner SparkRunner --spark_master_url spark://HOST:7077   (Beam downloads its Spark job-server jar when the
        job starts: needs network access to Maven Central; not runnable offline)
With a remote cluster, inputs and --output must be paths every worker can reach (gs://, s3://, a shared mount).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines.tf_example import tfrecord_frame
from medpipe import schema as keys
from medpipe.config import TaskConfig, load_config
from medpipe.errors import ConfigError, DataError, NoResult, RejectedInput

# The per-record functions live in a Beam-free module (the benchmark's plain loop uses them); re-exported here.
from beam_pipelines.records import (  # noqa: F401
    HIST_BINS, InputItem, assign_split, histogram32, near_duplicate_groups, perceptual_hash, prepare_record,
    rejection, resolve_duplicates, route_record, shard_examples, shard_name, shard_of, to_example)

LOG = logging.getLogger("medpipe.ingest")
NAMESPACE = "medpipe.ingest"
DUPLICATES_FILE = "duplicates.jsonl"
PROGRESS_EVERY = 1000


# ---------------------------------------------------------------------------------------------------------------
# listing (at construction time: the list of names is small; the bytes are read by the workers)
def list_inputs(source: str, labels: Optional[str] = None) -> list[InputItem]:
    """A CSV manifest, a folder of class folders or a DICOMweb query (+ a labels CSV) -> InputItems."""
    from beam_pipelines import dicomweb_source

    if dicomweb_source.is_dicomweb(source):  # a PACS: QIDO-RS here, WADO-RS in the workers (read_input)
        return dicomweb_source.list_dicomweb_inputs(source, labels)
    if labels is not None:
        raise DataError("--labels is for a DICOMweb --input; a folder's labels are its class folders and a "
                        "manifest has its own label column")
    if source.lower().endswith(".csv"):
        return read_manifest(source)
    root = source.rstrip("/")
    items = []
    prefix = root.replace(os.sep, "/") + "/"
    for path, size in list_files(root):
        posix = path.replace(os.sep, "/")  # under the root as listed: a prefix, not relpath's two abspath calls
        relative = posix[len(prefix):] if posix.startswith(prefix) else posixpath.relpath(posix, prefix[:-1])
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or relative in (".", ""):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are not inputs
        label = parts[0] if len(parts) >= 2 else None
        items.append(InputItem(path=path, label=label, size=size))
    if not items:
        raise DataError(f"no files under {source}: expected one folder per class (or pass a CSV manifest)")
    return sorted(items, key=lambda item: item.path)


def list_files(root: str) -> Iterable[tuple[str, int]]:
    """(path, bytes) of every file under a folder, recursively. Local: the os.walk that Beam's LocalFileSystem runs
    for `root/**`, with one stat per file instead of two and no glob matching (0.03 s for 5,712 files, not 0.08-0.14);
    gs://, s3://: FileSystems.match."""
    if not is_local(root):
        for meta in FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list:
            yield meta.path, meta.size_in_bytes
        return
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                yield path, os.stat(path).st_size
            except OSError:  # gone since the walk saw it, or a dangling link: not an input
                continue


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
# ---------------------------------------------------------------------------------------------------------------
# DoFns and composite transforms
SPILL_DIR = "_spill"
BATCH_INPUTS = 64  # listed inputs per element of ListInputs; the decoding stage emits its outputs per batch
LISTING_FILE = "listing.jsonl"  # in SPILL_DIR: the listing's batches, read by the decoding stage (write_listing)
DEDUP_BUCKET_RECORDS = 50_000  # records per dedup group at most, on average (the bucket count follows the input)


def input_batches(items: Sequence[InputItem]) -> list[list[tuple]]:
    """The listing as batches of rows (index, path, label, size, patient_id, study_id), for write_listing."""
    rows = [(index, item.path, item.label, item.size, item.patient_id, item.study_id)
            for index, item in enumerate(items)]
    # Interleaved, not consecutive: each batch samples the whole (sorted) listing, so batches cost about the same and
    # the runner's even split of them leaves no worker with the expensive folder (colour, large or DICOM inputs).
    count = -(-len(rows) // BATCH_INPUTS)
    return [rows[start::count] for start in range(count)]


def write_listing(batches: list[list[tuple]], spill_directory: str) -> list[tuple[str, int, int]]:
    """The listing's batches as JSON lines in spill_directory/LISTING_FILE -> one (file, offset, length) reference
    per batch, what ListInputs carries. Not the listing itself: Beam pickles a Create's values into the pipeline
    graph, bz2 at level 9, in this process and again in every worker that builds the stage (0.05-0.07 s each for
    5,712 paths), and a runner's job graph has a size limit (Dataflow's job request: 20 MB, a few million paths once
    compressed). The file holds paths and manifest patient IDs (PHI): private (0600) when local, removed with the
    spill files."""
    lines = [json.dumps(batch, separators=(",", ":")) + "\n" for batch in batches]  # ASCII: len() is bytes
    path = FileSystems.join(spill_directory, LISTING_FILE)
    if is_local(path):
        os.makedirs(spill_directory, exist_ok=True)
    _write_text(path, "".join(lines), private=True)
    refs, offset = [], 0
    for line in lines:
        refs.append((path, offset, len(line)))
        offset += len(line)
    return refs


def read_listed_batch(ref: tuple[str, int, int]) -> list[list]:
    """A write_listing reference -> its batch of (index, path, label, size, patient_id, study_id) rows."""
    (data,) = read_spilled([ref])
    return json.loads(data)


def dedup_buckets(num_inputs: int) -> int:
    """Hash buckets for the dedup shuffle: at least 2 (one per local worker), about DEDUP_BUCKET_RECORDS each."""
    return max(2, -(-num_inputs // DEDUP_BUCKET_RECORDS))


def hash_bucket(pixel_hash: str, buckets: int) -> int:
    return int(pixel_hash[:8], 16) % buckets


class SpillFile:
    """One append-only spill file per bundle: framed TFRecord bytes, read back by (offset, length)."""

    def __init__(self, directory: str):
        self.path = FileSystems.join(directory, f"{uuid.uuid4().hex}.bin")  # fresh per bundle: a retried bundle
        self._file = FileSystems.create(self.path, compression_type=CompressionTypes.UNCOMPRESSED)  # never appends
        self.offset = 0

    def append(self, data: bytes) -> tuple[int, int]:
        self._file.write(data)
        start, self.offset = self.offset, self.offset + len(data)
        return start, len(data)

    def close(self) -> None:
        self._file.close()


class PreprocessFn(beam.DoFn):
    """A batch of listed inputs -> per image: read through FileSystems, prepare_record, route_record (split, shard,
    tf.train.Example), the framed example appended to this bundle's spill file. Failures go to the `rejected` output,
    never stop the run.

    What leaves the stage is batched: ("shard", ((split, shard), (spill file, [(index, source_id, offset, length)])))
    and ("meta", (hash bucket, [(pixel_hash, meta)])) once per input batch, so the runner encodes, shuffles and
    decodes a handful of elements per BATCH_INPUTS images instead of two per image; only rejections (rare, small) go
    out one by one. Emitted from process(), not finish_bundle(): Beam 2.77's DaskRunner drops finish_bundle outputs.
    The spill file stays open for the bundle (closed in finish_bundle, before any reader runs)."""

    def __init__(self, config: TaskConfig, spill_directory: str, buckets: int):
        self.config, self.spill_directory, self.buckets = config, spill_directory, buckets
        self.read = Metrics.counter(NAMESPACE, "read")
        self.ok = Metrics.counter(NAMESPACE, "decoded")
        self._rejected: dict = {}

    def setup(self):
        from medpipe import imaging  # noqa: F401 - warm the import (Pillow, numpy) once per worker
        from medpipe.deid import deid_key_from_env

        self.key = deid_key_from_env(required=False)
        self.seen = 0

    def start_bundle(self):
        self._spill = None

    def _reject(self, path: str, reason: str, detail: str):
        if reason not in self._rejected:
            self._rejected[reason] = Metrics.counter(NAMESPACE, f"rejected_{reason}")
        self._rejected[reason].inc()
        return ("rejected", rejection(path, reason, detail))

    def process(self, batch: list[tuple], groups: Optional[dict] = None):
        refs: dict[tuple, list] = {}
        metas: dict[int, list] = {}
        decoded = 0
        for index, path, label, size, patient_id, study_id in batch:
            item = InputItem(path=path, label=label, size=size, patient_id=patient_id, study_id=study_id)
            rejected = self._prepare(index, item, refs, metas, groups)
            if rejected is None:
                decoded += 1
            else:
                yield rejected
        self.read.inc(len(batch))  # counted per batch, not per image: a Beam counter update costs a few us
        self.ok.inc(decoded)
        for shard, shard_refs in sorted(refs.items()):
            yield ("shard", (shard, (self._spill.path, shard_refs)))
        for bucket, bucket_metas in sorted(metas.items()):
            yield ("meta", (bucket, bucket_metas))

    def _prepare(self, index: int, item: InputItem, refs: dict, metas: dict, groups: Optional[dict] = None):
        self.seen += 1
        if self.seen % PROGRESS_EVERY == 0:
            LOG.info("ingest worker %s: %d inputs preprocessed", os.getpid(), self.seen)
        try:
            if item.size > self.config.ingest.max_file_mb * 2**20:
                raise RejectedInput("pixel_budget", f"file over ingest.max_file_mb={self.config.ingest.max_file_mb}")
            data = read_input(item.path)
            record = prepare_record(item, data, self.config, self.key)
        except RejectedInput as exc:
            return self._reject(item.path, exc.reason, exc.detail)
        except OSError as exc:
            return self._reject(item.path, "corrupt", f"cannot read the file ({type(exc).__name__})")
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the pipeline; no message (may hold PHI)
            return self._reject(item.path, "corrupt", f"unexpected {type(exc).__name__} while decoding")
        if self._spill is None:
            self._spill = SpillFile(self.spill_directory)
        for tag, (key, value) in route_record(record, index, self.config, groups):
            if tag == "shard":
                _, source_id, example = value
                offset, length = self._spill.append(tfrecord_frame(example))
                refs.setdefault(key, []).append((index, source_id, offset, length))
            else:
                metas.setdefault(hash_bucket(key, self.buckets), []).append((key, value))
        return None

    def finish_bundle(self):
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def teardown(self):
        if getattr(self, "_spill", None) is not None:
            self._spill.close()
            self._spill = None


def read_input(path: str) -> bytes:
    """An input's bytes: a local file read directly, WADO-RS for a DICOMweb instance, else Beam FileSystems
    (gs://, s3://). Beam's local filesystem would do the same read after ~20 us of scheme lookup per file."""
    if is_local(path):
        with open(path, "rb") as handle:
            return handle.read()
    from beam_pipelines import dicomweb_source

    if dicomweb_source.is_dicomweb(path):
        return dicomweb_source.retrieve(path)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


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
    """Batches of listed inputs -> {"shard": spilled example references by (split, shard), "meta": dedup metadata
    by hash bucket, "rejected": rejections} (PreprocessFn: decode, preprocess, split, shard, spill). groups: the
    near-duplicate groups as a singleton side input (ingest.split_groups), else None."""

    def __init__(self, config: TaskConfig, spill_directory: str, buckets: int, groups: Any = None):
        super().__init__()
        self.config, self.spill_directory, self.buckets, self.groups = config, spill_directory, buckets, groups

    def expand(self, batches):
        # beam.Create already reshuffles its elements across workers: no extra Reshuffle here.
        fn = PreprocessFn(self.config, self.spill_directory, self.buckets)
        decode = beam.ParDo(fn) if self.groups is None else beam.ParDo(fn, groups=self.groups)
        return batches | "Decode" >> decode | "ByOutcome" >> SplitByTag("shard", "meta", "rejected")


class PerceptualHashFn(beam.DoFn):
    """A batch of listed inputs -> one list of (pixel_hash, perceptual hash) for the images that decode (ingest's
    first pass when ingest.split_groups is set: each split needs every image's hash, so the decode runs twice). An
    input that fails here is skipped: the decoding stage rejects and reports it."""

    def __init__(self, config: TaskConfig):
        self.config = config

    def process(self, batch: list[tuple]):
        from medpipe.imaging import preprocess_bytes

        hashes = []
        for _index, path, _label, size, _patient_id, _study_id in batch:
            if size > self.config.ingest.max_file_mb * 2**20:
                continue
            try:
                prepared = preprocess_bytes(read_input(path), self.config, encode=False)
            except Exception:  # noqa: BLE001 - rejected (with its reason) by the decoding stage
                continue
            hashes.append((prepared.pixel_hash, perceptual_hash(prepared.pixels)))
        yield hashes


def group_near_duplicates(batches: list[list[tuple]], max_distance: int) -> dict[str, str]:
    return near_duplicate_groups((pair for batch in batches for pair in batch), max_distance)


class NearDuplicateGroups(beam.PTransform):
    """Batches of listed inputs -> one {pixel_hash: group key} dict (near_duplicate_groups over every image's
    perceptual hash, gathered on one worker: 8 bytes + a 64-character key per image)."""

    def __init__(self, config: TaskConfig):
        super().__init__()
        self.config = config

    def expand(self, batches):
        return (batches
                | "Hash" >> beam.ParDo(PerceptualHashFn(self.config))
                | "Gather" >> beam.combiners.ToList()
                | "Group" >> beam.Map(group_near_duplicates, self.config.ingest.split_groups.max_distance))


class ResolveGroupFn(beam.DoFn):
    """One hash bucket of small metadata -> input indices the shard writer drops + the bucket's report items summed
    into one ReportFn accumulator (("report", ("partial", acc)): one element per bucket, not two per record).

    Only metadata travels through this shuffle: the example went to a spill file in the decoding stage, and its
    reference is keyed by each copy's own (split, shard). The kept copy is therefore already where it belongs (its
    own split key decides the split, as before); every other copy's input index is listed for the shard writer (a
    side input) to skip."""

    def __init__(self):
        self.dropped = Metrics.counter(NAMESPACE, "duplicates_dropped")
        self.conflicts = Metrics.counter(NAMESPACE, "rejected_label_conflict")

    def process(self, element):
        _, batches = element
        by_hash: dict[str, list[dict]] = {}
        for batch in batches:
            for pixel_hash, meta in batch:
                by_hash.setdefault(pixel_hash, []).append(meta)
        report = ReportFn()
        summed = report.create_accumulator()
        for pixel_hash in sorted(by_hash):
            for tag, value in self._resolve(pixel_hash, by_hash[pixel_hash]):
                if tag == "report":
                    summed = report.add_input(summed, value)
                else:
                    yield tag, value
        yield ("report", ("partial", summed))

    def _resolve(self, pixel_hash: str, metas: list[dict]):
        kept, rejected, group = resolve_duplicates(pixel_hash, metas)
        for meta in metas:
            yield ("report", ("decoded", (meta["input_size"], meta["input_mode"])))
            if kept is None or meta["index"] != kept["index"]:
                yield ("drop", meta["index"])
        for item in rejected:
            self.conflicts.inc()
            yield ("report", ("rejected", item))
        if group is not None:
            self.dropped.inc(len(group["dropped"]))
            yield ("report", ("duplicates", group))
        if kept is not None:
            yield ("report", ("kept", kept))


def write_shard(path: str, frames: Iterable[bytes]) -> None:
    """One GZIP TFRecord file from framed records (tfrecord_frame), streamed. SHARD_GZIP_LEVEL (stored blocks: the
    payload is PNG, already deflated) with mtime 0: a fixed header timestamp keeps re-runs byte-identical."""
    import gzip

    from beam_pipelines.tf_example import SHARD_GZIP_LEVEL

    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=SHARD_GZIP_LEVEL, mtime=0) as out:
            chunk: list[bytes] = []
            size = 0
            for frame in frames:  # deflate in ~1 MB pieces: few calls, bounded memory for any shard size
                chunk.append(frame)
                size += len(frame)
                if size >= 2**20:
                    out.write(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                out.write(b"".join(chunk))


def read_spilled(refs: Iterable[tuple[str, int, int]]) -> Iterable[bytes]:
    """(file, offset, length) references -> the bytes, in the same order, streamed; spill files opened once each."""
    handles: dict[str, Any] = {}
    try:
        for path, offset, length in refs:
            handle = handles.get(path)
            if handle is None:
                handle = handles[path] = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
            handle.seek(offset)
            yield handle.read(length)
    finally:
        for handle in handles.values():
            handle.close()


def remove_spill(directory: str) -> None:
    spill = FileSystems.join(directory, SPILL_DIR)
    if is_local(spill):
        shutil.rmtree(spill, ignore_errors=True)
        return
    spilled = [m.path for m in FileSystems.match([FileSystems.join(spill, "*")])[0].metadata_list]
    if spilled:
        FileSystems.delete(spilled)


def shard_paths(directory: str, config: TaskConfig) -> list[str]:
    shards = config.ingest.shards
    return [FileSystems.join(directory, shard_name(split, shard, shards.of(split)))
            for split in config.splits for shard in range(shards.of(split))]


class WriteShardFn(beam.DoFn):
    """One GZIP TFRecord file per (split, shard), records sorted by source id (reproducible bytes)."""

    def __init__(self, directory: str, shards: Any):
        self.directory, self.shards = directory, shards
        self.written = Metrics.counter(NAMESPACE, "written")

    def process(self, element, dropped):
        (split, shard), batches = element
        entries = [(index, source_id, (spill, offset, length))
                   for spill, refs in batches for index, source_id, offset, length in refs]
        examples = shard_examples(entries, set(dropped))  # (source_id, spill reference), sorted
        path = FileSystems.join(self.directory, shard_name(split, shard, self.shards.of(split)))
        write_shard(path, read_spilled(ref for _, ref in examples))
        self.written.inc(len(examples))
        yield ("shard", (path, len(examples)))


class Deduplicate(beam.PTransform):
    """Small per-record metadata in hash buckets -> {"drop": inputs the shard writer skips, "report": decoded
    sizes/modes, label-conflict rejections, duplicate groups and the kept records' stats inputs}."""

    def expand(self, metas):
        return (metas
                | "GroupByHashBucket" >> beam.GroupByKey()
                | "Resolve" >> beam.ParDo(ResolveGroupFn())
                | "ByOutcome" >> SplitByTag("drop", "report"))


class WriteSplits(beam.PTransform):
    """{train,val,test}-SSSSS-of-NNNNN.tfrecord.gz, ingest.shards files per split (shards no record falls into are
    written empty by WriteReports, which knows which ones were written).

    Sharding is done here (GroupByKey on (split, shard)) rather than by WriteToTFRecord: its Impulse-based
    initialisation does not run on Beam 2.77's DaskRunner, and a keyed shard makes the output deterministic. The
    framed examples are in spill files (PreprocessFn) and the shuffle carries batches of references, straight from
    the decoding stage: no Flatten before it (the FnApiRunner materialises a Flatten as an extra stage and round
    trip); the input indices Deduplicate drops come as a small side input."""

    def __init__(self, config: TaskConfig, directory: str):
        super().__init__()
        self.config, self.directory = config, directory

    def expand(self, inputs):
        entries, drops = inputs
        return (entries
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(WriteShardFn(self.directory, self.config.ingest.shards),
                                              dropped=beam.pvalue.AsList(drops)))


class ReportFn(beam.CombineFn):
    """Every report item -> one small accumulator: counts and pixel moments of the kept records, input sizes and
    modes, rejections, duplicate groups, written shards (no image travels)."""

    def create_accumulator(self):
        return {"splits": {}, "hist": [0] * HIST_BINS, "sum": 0.0, "sumsq": 0.0, "count": 0, "sizes": {},
                "modes": {}, "rejected": [], "duplicates": [], "shards": [], "shard_records": 0}

    def add_input(self, acc, item):
        kind, value = item
        if kind == "kept":
            split = acc["splits"].setdefault(value["split"], {})
            split[value["label"]] = split.get(value["label"], 0) + 1
            acc["hist"] = [a + b for a, b in zip(acc["hist"], value["hist"])]
            acc["sum"] += value["sum"]
            acc["sumsq"] += value["sumsq"]
            acc["count"] += value["count"]
        elif kind == "decoded":
            size, mode = value
            acc["sizes"][size] = acc["sizes"].get(size, 0) + 1
            acc["modes"][mode] = acc["modes"].get(mode, 0) + 1
        elif kind == "rejected":
            acc["rejected"].append(value)
        elif kind == "duplicates":
            acc["duplicates"].append(value)
        elif kind == "shard":
            acc["shards"].append(value[0])
            acc["shard_records"] += value[1]
        elif kind == "partial":  # a dedup bucket's items, already summed (ResolveGroupFn)
            return self.merge_accumulators([acc, value])
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            for split, classes in acc["splits"].items():
                target = out["splits"].setdefault(split, {})
                for label, n in classes.items():
                    target[label] = target.get(label, 0) + n
            out["hist"] = [a + b for a, b in zip(out["hist"], acc["hist"])]
            for name in ("sum", "sumsq", "count", "shard_records"):
                out[name] += acc[name]
            for name in ("sizes", "modes"):
                for key, n in acc[name].items():
                    out[name][key] = out[name].get(key, 0) + n
            for name in ("rejected", "duplicates", "shards"):
                out[name].extend(acc[name])
        return out

    def extract_output(self, acc):
        return acc


def build_stats(config: TaskConfig, input_files: int, written: dict, rejected: list[dict], duplicates: list[dict],
                sizes: dict, modes: dict) -> dict:
    """The stats.json body; `input_files == written + rejected + duplicates_dropped` by construction (checked)."""
    import math

    splits = {split: {"total": sum(written["splits"].get(split, {}).values()),
                      "classes": {label: written["splits"].get(split, {}).get(label, 0) for label in config.labels}}
              for split in config.splits}
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


def split_groups_summary(config: TaskConfig, groups: Optional[dict]) -> Optional[dict]:
    """stats.json's account of ingest.split_groups: how many near-duplicate groups held how many images."""
    rule = config.ingest.split_groups
    if rule is None:
        return None
    sizes = collections.Counter((groups or {}).values())
    return {"method": rule.method, "max_distance": rule.max_distance, "groups": len(sizes),
            "images": sum(sizes.values()), "largest": max(sizes.values(), default=0)}


def write_reports(report: dict, config: TaskConfig, directory: str, input_files: int,
                  input_report: Optional[str] = None, groups: Optional[dict] = None):
    """stats.json, rejected.jsonl and duplicates.jsonl through FileSystems (one small write each), naming inputs by
    keyed input id only; the ids' paths go to `input_report` (PHI, written outside the output; see run())."""
    rejected, duplicates = report["rejected"], report["duplicates"]
    stats = build_stats(config, input_files, report, rejected, duplicates, report["sizes"], report["modes"])
    if report["shard_records"] != stats["written"]:
        raise DataError(f"ingest bookkeeping error: {stats['written']} records kept but {report['shard_records']} "
                        f"written to the shards (please report this bug)")
    expected = shard_paths(directory, config)
    for path in sorted(set(expected) - set(report["shards"])):
        write_shard(path, [])  # a shard no record fell into: still written, so every split has its N files
    stats["files"] = sorted(posixpath.basename(path.replace(os.sep, "/")) for path in expected)
    summary = split_groups_summary(config, groups)
    if summary is not None:
        stats["split_groups"] = summary
    inside, outside = report_lines(rejected, duplicates)
    _write_text(FileSystems.join(directory, keys.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    _write_text(FileSystems.join(directory, keys.REJECTED_FILE), inside["rejected"])
    _write_text(FileSystems.join(directory, DUPLICATES_FILE), inside["duplicates"])
    if input_report:
        _write_text(input_report, outside, private=True)
    return stats["written"]


def report_lines(rejected: list[dict], duplicates: list[dict]) -> tuple[dict[str, str], str]:
    """({"rejected": ..., "duplicates": ...} JSON lines for the de-identified output, naming each input by its
    input id; the input report's JSON lines, which map the same ids to paths: PHI, kept outside the output).

    Input id: HMAC-SHA256 of the input's path under MEDPIPE_DEID_KEY (stable across runs), or under a random key of
    this run when there is none: never a plain hash a path or medical record number could be guessed back from.
    A duplicate group is named by the kept record's `image/source_id`, as in the TFRecords."""
    import secrets

    from medpipe.deid import deid_key_from_env, pseudonym

    key = deid_key_from_env(required=False)
    id_key = key or secrets.token_bytes(32)

    def input_id(path: str) -> str:
        return pseudonym(f"input:{path}", id_key)[:20]

    rows = [{"input_id": input_id(r["path"]), "reason": r["reason"], "detail": r["detail"], "path": r["path"]}
            for r in rejected]
    groups = [{"source_id": pseudonym(g["pixel_hash"], key) if key else g["pixel_hash"],  # as prepare_record
               "label": g["label"], "kept": input_id(g["kept"]), "dropped": sorted(map(input_id, g["dropped"])),
               "paths": {input_id(path): path for path in [g["kept"], *g["dropped"]]}} for g in duplicates]
    inside = {
        "rejected": "".join(json.dumps({k: r[k] for k in ("input_id", "reason", "detail")}, sort_keys=True) + "\n"
                            for r in sorted(rows, key=lambda r: r["input_id"])),
        "duplicates": "".join(json.dumps({k: g[k] for k in ("source_id", "label", "kept", "dropped")},
                                         sort_keys=True) + "\n" for g in sorted(groups, key=lambda g: g["source_id"])),
    }
    entries = [{"input_id": r["input_id"], "path": r["path"], "status": "rejected", "reason": r["reason"],
                "detail": r["detail"]} for r in rows]
    for group in groups:
        entries += [{"input_id": ident, "path": group["paths"][ident], "status": "duplicate",
                     "source_id": group["source_id"], "kept_input_id": group["kept"],
                     "kept_path": group["paths"][group["kept"]]} for ident in group["dropped"]]
    outside = "".join(json.dumps(e, sort_keys=True) + "\n" for e in sorted(entries, key=lambda e: e["path"]))
    return inside, outside


def _write_text(path: str, text: str, private: bool = False) -> None:
    """One small file; `private`: a local file is created with mode 0600 (it holds PHI), never readable by others."""
    if private and is_local(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
        return
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode("utf-8"))


class WriteReports(beam.PTransform):
    """(kind, value) report items from every branch -> one combine -> the report files.

    One CombineGlobally (no per-report ToList/Count stages, no side inputs): on the multi-process FnApiRunner every
    extra stage costs a round trip to each worker. The written shards are among the items, so the reports are
    written after the TFRecords (and a runner that computes only the final step's ancestors, like Beam 2.77's
    DaskRunner, still runs every branch). The stream is never empty: every input is either decoded or rejected."""

    def __init__(self, config: TaskConfig, directory: str, input_files: int, input_report: Optional[str] = None,
                 groups: Any = None):
        super().__init__()
        self.config, self.directory, self.input_files = config, directory, input_files
        self.input_report, self.groups = input_report, groups

    def expand(self, items):
        extra = {} if self.groups is None else {"groups": self.groups}
        return (items
                | "Flatten" >> beam.Flatten()
                | "Summarise" >> beam.CombineGlobally(ReportFn()).without_defaults()
                | "Write" >> beam.Map(write_reports, self.config, self.directory, self.input_files,
                                      self.input_report, **extra))


def build_pipeline(pipeline: beam.Pipeline, config: TaskConfig, items: list[InputItem], directory: str,
                   input_report: Optional[str] = None) -> None:
    """The whole graph; reads like the module docstring. Image bytes cross no shuffle (spill files); the shard
    shuffle carries batches of references, dedup shuffles batches of small metadata and tells the writer which copies
    to drop."""
    spill = FileSystems.join(directory, SPILL_DIR)
    listed = (pipeline
              | "ListInputs" >> beam.Create(write_listing(input_batches(items), spill))
              | "ReadListing" >> beam.Map(read_listed_batch))
    groups = None
    if config.ingest.split_groups is not None:  # a first pass: every image's perceptual hash, grouped
        groups = beam.pvalue.AsSingleton(listed | "NearDuplicateGroups" >> NearDuplicateGroups(config))
    prepared = listed | "PreprocessImages" >> PreprocessImages(config, spill, dedup_buckets(len(items)), groups)
    unique = prepared["meta"] | "Deduplicate" >> Deduplicate()
    shards = (prepared["shard"], unique["drop"]) | "WriteSplits" >> WriteSplits(config, directory)
    rejected = prepared["rejected"] | "RejectedItems" >> beam.Map(lambda item: ("rejected", item))
    ((rejected, unique["report"], shards)
     | "WriteReports" >> WriteReports(config, directory, len(items), input_report, groups))


# ---------------------------------------------------------------------------------------------------------------
# publishing: a temp folder beside the output, moved into place when everything is written
OUTPUT_PATTERNS = ("train-*.tfrecord.gz", "val-*.tfrecord.gz", "test-*.tfrecord.gz", keys.SCHEMA_FILE,
                   keys.STATS_FILE, keys.REJECTED_FILE, DUPLICATES_FILE)
MARKER_FILE = ".medpipe-ingest"  # what tells a folder ingest wrote (and which files in it are ours)
INPUT_REPORT_SUFFIX = ".input-report.jsonl"
CLOUD_EXTRAS = {"gs": ("gcp", "google.cloud.storage"), "s3": ("aws", "boto3")}  # scheme -> (medpipe extra, probe)


def is_local(path: str) -> bool:
    return "://" not in path


def _exists(path: str) -> bool:
    return os.path.exists(path) if is_local(path) else FileSystems.exists(path)


def _names(folder: str) -> list[str]:
    """Entries directly in a folder (local: files and folders; remote: objects under the prefix)."""
    if is_local(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = FileSystems.match([FileSystems.join(folder, "**")])[0].metadata_list
    return sorted({posixpath.relpath(m.path, folder.rstrip("/")).split("/")[0] for m in found})


def _read_json(path: str) -> Optional[dict]:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            body = json.loads(handle.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - missing or unreadable (Beam raises its own IO errors): not ours
        return None
    return body if isinstance(body, dict) and body.get("written_by") == "medpipe ingest" else None


def require_filesystem(path: str, flag: str) -> None:
    """A clear error naming the extra to install when a cloud path's Beam filesystem is missing."""
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if not scheme:
        return
    import importlib.util

    extra, probe = CLOUD_EXTRAS.get(scheme, (None, None))
    try:
        available = probe is None or importlib.util.find_spec(probe) is not None
    except ModuleNotFoundError:
        available = False
    if available:
        try:
            FileSystems.get_filesystem(path)
            return
        except ValueError:
            available = False
    hint = (f"install the extra: pip install 'medpipe[{extra}]' (apache-beam[{extra}])" if extra else
            "no Beam filesystem is installed for it; local paths, gs:// (medpipe[gcp]) and s3:// (medpipe[aws]) "
            "are supported")
    raise ConfigError(f"{flag} {path}: {scheme}:// paths need Beam's {scheme} filesystem, which is not installed; "
                      f"{hint}")


def _inside(child: str, parent: str) -> bool:
    child, parent = child.rstrip("/") or "/", parent.rstrip("/") or "/"
    return child == parent or child.startswith(parent if parent.endswith("/") else parent + "/")


def _canonical(path: str) -> str:
    return os.path.realpath(path) if is_local(path) else path.rstrip("/")


def check_placement(source: str, output: str, input_report: str, items: Sequence[InputItem],
                    pacs: bool = False) -> None:
    """Refuse (DataError, exit 2) an --output that overlaps --input (equal, inside or containing, or holding a
    manifest's file) and an input report inside the de-identified output or the input folder. A PACS source
    (pacs=True) has no local files to overlap; only the report's place is checked."""
    out, report = _canonical(output), _canonical(input_report)
    if pacs:
        if _inside(report, out):
            raise DataError(f"--input-report {input_report} is inside --output {output}: it lists input paths (PHI) "
                            f"and must stay out of the de-identified output; put it beside the output folder")
        return
    src = _canonical(source)
    is_folder = not source.lower().endswith(".csv")
    fix = "choose an --output outside the input, e.g. a sibling folder"
    if is_folder and (_inside(out, src) or _inside(src, out)):
        where = "is" if out == src else "is inside" if _inside(out, src) else "contains"
        raise DataError(f"--output {output} {where} --input {source}: ingest would write into (and replace) its own "
                        f"input; {fix}")
    if not is_folder:
        if _inside(src, out):
            raise DataError(f"--output {output} contains the manifest {source}; {fix}")
        inside = sum(_inside(_canonical(item.path), out) for item in items)
        if inside:
            raise DataError(f"--output {output} contains {inside} of the manifest's input files; {fix}")
    if _inside(report, out):
        raise DataError(f"--input-report {input_report} is inside --output {output}: it lists input paths (PHI) "
                        f"and must stay out of the de-identified output; put it beside the output folder")
    if is_folder and _inside(report, src):
        raise DataError(f"--input-report {input_report} is inside --input {source}; put it outside the input")


def check_output(output: str, force: bool) -> Optional[dict]:
    """The previous ingest's marker when --output is one of ours; None when it does not exist or is empty.
    A folder holding anything else is refused (exit 2) unless --force; a file is always refused."""
    if is_local(output) and os.path.lexists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output} is a file, not a folder; choose a folder path")
    names = _names(output)
    if not names:
        return None
    marker = _read_json(FileSystems.join(output, MARKER_FILE)) if MARKER_FILE in names else None
    if marker is not None:
        return marker
    if not force:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DataError(f"--output {output} exists and holds {len(names)} entries ({shown}) but is not a medpipe "
                        f"ingest output (no {MARKER_FILE}); ingest never deletes files it did not write. Choose a "
                        f"new or empty folder, or pass --force to write into it (files named like ingest's outputs "
                        f"are replaced, everything else is kept)")
    LOG.warning("ingest: --force: writing into %s, which is not a medpipe ingest output; its other files are kept",
                output)
    return None


def check_input_report(path: str, force: bool) -> None:
    """The input report replaces only an earlier input report (its first line has an input_id), or an empty file."""
    if not _exists(path):
        return
    if is_local(path) and os.path.isdir(path):
        raise DataError(f"--input-report {path} is a folder; give a file path, e.g. OUTPUT{INPUT_REPORT_SUFFIX}")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        first = handle.read(4096).decode("utf-8", errors="replace").split("\n", 1)[0]
    try:
        ours = not first.strip() or "input_id" in json.loads(first)
    except ValueError:
        ours = False
    if not ours and not force:
        raise DataError(f"--input-report {path} exists and is not a medpipe input report; choose another path, or "
                        f"pass --force to replace it")


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record() -> dict:
    import socket

    return {"written_by": "medpipe ingest", "state": "writing", "pid": os.getpid(), "host": socket.gethostname(),
            "started": _process_start(os.getpid())}


def _running(owner: dict) -> bool:
    """True when the run that wrote this owner record may still be running (another host: assume it is)."""
    import socket

    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return owner.get("started") is None or _process_start(pid) == owner.get("started")


def _remove(path: str) -> None:
    if is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    found = [m.path for m in FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list]
    found += [m.path for m in FileSystems.match([path])[0].metadata_list]
    if found:
        FileSystems.delete(sorted(set(found)))


def _looks_like_ours(folder: str) -> bool:
    """A temp folder without an owner record (an older medpipe, or killed right after mkdir): ours when it holds
    nothing but what ingest writes there."""
    import fnmatch

    return all(name in (MARKER_FILE, SPILL_DIR) or any(fnmatch.fnmatch(name, p) for p in OUTPUT_PATTERNS)
               for name in _names(folder))


def remove_stale_temporaries(output: str, input_report: str) -> list[str]:
    """Remove OUTPUT.tmp-* folders (and their INPUT_REPORT.tmp-* files) left by killed runs of the same output;
    a run still going (same host, its pid alive) is left alone. Returns what was removed."""
    import glob as globbing

    base = output.rstrip("/")
    if is_local(base):
        temps = sorted(globbing.glob(globbing.escape(base) + ".tmp-*"))
    else:
        found = FileSystems.match([base + ".tmp-*/**"])[0].metadata_list
        prefix = base + ".tmp-"
        temps = sorted({prefix + m.path[len(prefix):].split("/")[0] for m in found if m.path.startswith(prefix)})
    removed = []
    for temp in temps:
        token = temp[len(base) + len(".tmp-"):]
        owner = _read_json(FileSystems.join(temp, MARKER_FILE))
        if owner is not None and owner.get("state") == "writing" and _running(owner):
            continue
        if owner is None and not _looks_like_ours(temp):
            LOG.warning("ingest: leaving %s: it holds files ingest does not write", temp)
            continue
        _remove(temp)
        report_temp = f"{input_report}.tmp-{token}"
        if _exists(report_temp):
            _remove(report_temp)
        removed.append(temp)
    if is_local(base):  # a run killed between the two renames of publish(): its previous output is restored
        for old in sorted(globbing.glob(globbing.escape(base) + ".old-*")):
            if not os.path.exists(base) and _read_json(os.path.join(old, MARKER_FILE)) is not None:
                os.replace(old, base)
            elif _read_json(os.path.join(old, MARKER_FILE)) is not None or _looks_like_ours(old):
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    for path in removed:
        LOG.info("ingest: removed %s, left by an interrupted run", path)
    return removed


def temp_directory(output: str) -> str:
    return f"{output.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"


def write_marker(directory: str, body: dict) -> None:
    _write_text(FileSystems.join(directory, MARKER_FILE), json.dumps(body, indent=2, sort_keys=True) + "\n")


def publish(temp: str, output: str, previous: Optional[dict], force: bool = False) -> None:
    """Move the finished temp folder into place. Only our own files are replaced or removed: those the previous
    run's marker lists (with --force, also files named like ingest's outputs); anything else in the folder stays.
    A folder holding only our files is swapped in one rename, so readers never see a mix of two runs."""
    import fnmatch

    produced = [name for name in _names(temp) if name != MARKER_FILE]
    present = _names(output)
    ours = set(previous.get("files", [])) | {MARKER_FILE} if previous else set()
    if force:
        ours |= {name for name in present if any(fnmatch.fnmatch(name, p) for p in OUTPUT_PATTERNS)}
    if is_local(output):
        if not present or set(present) <= ours:
            old = None
            if os.path.exists(output):
                old = f"{output.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
                os.replace(output, old)
            os.replace(temp, output)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        for name in produced + [MARKER_FILE]:  # the marker last: it vouches for the files before it
            os.replace(os.path.join(temp, name), os.path.join(output, name))
        for name in sorted((ours & set(present)) - set(produced) - {MARKER_FILE}):
            os.remove(os.path.join(output, name))
        os.rmdir(temp)
        return
    stale = [FileSystems.join(output, name) for name in sorted((ours & set(present)) - set(produced))]
    if stale:
        FileSystems.delete(stale)
    names = produced + [MARKER_FILE]
    FileSystems.rename([FileSystems.join(temp, n) for n in names], [FileSystems.join(output, n) for n in names])
    _remove(temp)


def place_input_report(temp_report: str, input_report: str) -> None:
    if is_local(input_report):
        os.replace(temp_report, input_report)
    else:
        FileSystems.rename([temp_report], [input_report])


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
                    "default: the direct runner (FnApiRunner), multi_processing, 2 workers (one process below "
                    f"{IN_PROCESS_BELOW} inputs). Set MEDPIPE_DEID_KEY "
                    "for DICOM with patient IDs.",
        epilog="exit status: 0 written; 2 refused (bad options, --output overlapping --input or holding other "
               "files, a missing cloud extra); 3 no record written (the reasons are summarised). Framework output "
               "goes to a log file named at the end (--verbose: to the terminal).",
    )
    parser.add_argument("--config", required=True, help="task config YAML (or a name in config/, e.g. brain_mri)")
    parser.add_argument("--input", required=True,
                        help="folder of class folders, or a CSV manifest (path,label[,patient_id,study_id]); "
                             "local, gs:// (medpipe[gcp]) or s3:// (medpipe[aws]); or a PACS: "
                             "'dicomweb+http://HOST:PORT/ROOT?StudyDate=20261101-20261130&ModalitiesInStudy=MR' "
                             "(QIDO-RS + WADO-RS) with --labels")
    parser.add_argument("--labels", default=None, metavar="CSV",
                        help="DICOMweb input: labels keyed by study (columns StudyInstanceUID,label or "
                             "AccessionNumber,label[,patient_id])")
    parser.add_argument("--output", required=True,
                        help="output folder: new, empty, or an earlier ingest output (whose own files are replaced; "
                             "other files are kept). Must not overlap --input")
    parser.add_argument("--input-report", metavar="FILE",
                        help="where the paths of rejected and duplicate inputs go (PHI: file names can hold patient "
                             f"names; mode 0600, outside the output). Default: OUTPUT{INPUT_REPORT_SUFFIX}")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing non-empty --output that is not an ingest output (its files "
                             "named like ingest's outputs are replaced, the others kept)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set image.size=64 (repeatable)")
    parser.add_argument("--pushgateway", default=None, metavar="URL",
                        help="push the run's counts to this Prometheus Pushgateway (default: env MEDPIPE_PUSHGATEWAY; "
                             "neither = no push)")
    return parser


# Short names Beam 2.77's registry lacks or resolves unhelpfully. DirectRunner -> its own engine, FnApiRunner:
# the DirectRunner first tries the Prism runner, whose binary it downloads from GitHub (slow or failing offline) and
# which ignores direct_running_mode.
RUNNER_ALIASES = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "DirectRunner": "FnApiRunner",
}
LOCAL_DEFAULTS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
# Below this many inputs a local run stays in this one process (in_memory): the workers (forked, local_runner) add the
# runner's gRPC servers and a round trip to each per stage, ~0.25 s; at 200 images one process is faster (1.3 s
# against 1.55 s), at 520 the two are within this VM's noise (2.1-2.8 s against 2.1-2.5 s).
IN_PROCESS_BELOW = 1000
IN_PROCESS_DEFAULTS = ("--direct_running_mode=in_memory", "--direct_num_workers=1")
_LOCAL_FLAGS = ("--direct_running_mode", "--direct_num_workers")


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


def pipeline_options(beam_args: Sequence[str], num_inputs: Optional[int] = None) -> PipelineOptions:
    """Pass-through Beam options. Without a runner (or DirectRunner): FnApiRunner, multi-processing, 2 workers, or
    for fewer than IN_PROCESS_BELOW inputs one process (in_memory), unless --direct_running_mode /
    --direct_num_workers say otherwise (either one given: the multi-processing default for the other)."""
    runner, rest = split_runner(beam_args)
    runner = RUNNER_ALIASES.get(runner or "DirectRunner", runner)
    if runner == "FnApiRunner":
        chosen = any(a.startswith(_LOCAL_FLAGS) for a in rest)
        small = num_inputs is not None and num_inputs < IN_PROCESS_BELOW and not chosen
        defaults = IN_PROCESS_DEFAULTS if small else LOCAL_DEFAULTS
        rest += [flag for flag in defaults if not any(a.startswith(flag.split("=")[0]) for a in rest)]
    return PipelineOptions([f"--runner={runner}", *rest])


def log_counters(result) -> dict[str, int]:
    counters = {}
    try:
        for counter in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]:
            name = counter.key.metric.name
            counters[name] = counters.get(name, 0) + int(counter.committed or counter.attempted or 0)
    except Exception as exc:  # noqa: BLE001 - some runners do not report metrics; the stats file still does
        LOG.info("ingest: the runner reports no Beam metrics (%s)", type(exc).__name__)
    if counters:
        LOG.info("ingest counters: %s", ", ".join(f"{name} {counters[name]}" for name in sorted(counters)))
    return counters


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the pipeline; returns the stats written to OUTPUT/stats.json. Raises DataError/ConfigError (exit 2)
    before anything is written when the paths are unsafe, NoResult (exit 3) when no record was written."""
    started = time.monotonic()
    args, beam_args = build_parser().parse_known_args(argv)
    config = load_config(args.config, args.overrides)
    output = args.output.rstrip("/")
    input_report = args.input_report or output + INPUT_REPORT_SUFFIX
    from beam_pipelines import dicomweb_source

    pacs = dicomweb_source.is_dicomweb(args.input)
    for flag, path in (("--input", args.input), ("--output", output), ("--input-report", input_report)):
        if not (pacs and flag == "--input"):  # a PACS is reached over DICOMweb, not a Beam filesystem
            require_filesystem(path, flag)
    items = list_inputs(args.input, args.labels)
    check_placement(args.input, output, input_report, items, pacs=pacs)
    previous = check_output(output, args.force)
    check_input_report(input_report, args.force)
    from medpipe.deid import deid_key_from_env

    # A set but unusable key (e.g. too short) is a clear error here, before any worker starts, not a worker traceback.
    if deid_key_from_env(required=False) is None:
        LOG.warning("MEDPIPE_DEID_KEY is not set: inputs with patient IDs will be rejected (deid_key_missing)")
    remove_stale_temporaries(output, input_report)
    temp = temp_directory(output)
    temp_report = f"{input_report}.tmp-{temp.rsplit('.tmp-', 1)[1]}"
    if is_local(temp):
        os.makedirs(temp)
    write_marker(temp, owner_record())  # a killed run's temp folder is recognised (and removed) by the next run
    LOG.info("ingest: %d inputs from %s -> %s (image %dx%d, %d channel(s))", len(items), args.input, output,
             config.image.size, config.image.size, config.image.channels)
    try:
        from beam_pipelines.local_runner import make_runner

        options = pipeline_options(beam_args, len(items))
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        build_pipeline(pipeline, config, items, temp, temp_report)
        result = pipeline.run()
        result.wait_until_finish()
        log_counters(result)
        remove_spill(temp)
        with FileSystems.open(FileSystems.join(temp, keys.STATS_FILE)) as handle:
            stats = json.loads(handle.read().decode("utf-8"))
        place_input_report(temp_report, input_report)
        if stats["written"] == 0:
            raise NoResult(nothing_written(stats, args.input, input_report, config))
        write_schema_file(config, temp)
        write_marker(temp, {"written_by": "medpipe ingest", "state": "complete", "files": _names(temp),
                            "input_report": input_report})
        publish(temp, output, previous, args.force)
    except BaseException as exc:
        _remove(temp)
        if _exists(temp_report):
            _remove(temp_report)
        if isinstance(exc, NoResult):
            from beam_pipelines.ingest_metrics import push_ingest_stats

            push_ingest_stats(stats, config.name, url=args.pushgateway,  # the failed run is counted too
                              duration_seconds=time.monotonic() - started)
        raise
    LOG.info("ingest: %d written (%s), %d rejected, %d duplicates dropped -> %s", stats["written"],
             ", ".join(f"{s} {stats['splits'][s]['total']}" for s in config.splits), stats["rejected"],
             stats["duplicates_dropped"], output)
    if stats["rejected"] or stats["duplicates_dropped"]:
        LOG.info("ingest: paths of the rejected and duplicate inputs (PHI, mode 0600): %s", input_report)
    from beam_pipelines.ingest_metrics import push_ingest_stats

    # a batch job ends before a scrape; no-op without a URL
    push_ingest_stats(stats, config.name, url=args.pushgateway, duration_seconds=time.monotonic() - started)
    return stats


def nothing_written(stats: dict, source: str, input_report: str, config: TaskConfig) -> str:
    reasons = ", ".join(f"{reason} {n}" for reason, n in stats["rejected_by_reason"].items()) or "none"
    hint = ""
    if "missing_label" in stats["rejected_by_reason"] or "unknown_label" in stats["rejected_by_reason"]:
        hint = (f"; --input must be a folder of class folders named like the config's labels {list(config.labels)}, "
                f"or a CSV manifest (path,label)")
    return (f"ingest wrote no record: {stats['input_files']} inputs from {source}, {stats['rejected']} rejected "
            f"({reasons}), {stats['duplicates_dropped']} duplicates{hint}. No output was written; the rejected "
            f"files are listed in {input_report} (PHI)")


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
