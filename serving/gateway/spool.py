"""The PACS doors' durable spool: an instance is on disk (fsync'd) before it is acknowledged, and every later step
can be replayed after a crash without a second result.

    SPOOL/incoming/<model>/<study key>/<instance key>.dcm (+ .json: door, identity, series key, no PHI)
    SPOOL/outbox/<job key>/   result objects (SR, optional SC) + job.json, ready to send; removed once delivered
    SPOOL/done/<idempotency key>   one empty marker per (SOP Instance UID, model, version) whose result was produced
    SPOOL/rejected/<model>/<study key>/   instances the model's preprocessing refused (kept for the operator)
    SPOOL/quarantine/<model>/<study key>/   instances whose processing failed or crashed the gateway
                           `quarantine_after` times (+ reason.json: attempts, last error; no PHI); never replayed

Every processing attempt is counted on disk (<instance key>.attempts) *before* it starts, so a study that kills the
whole process (OOM, SIGKILL) is still counted, and quarantined after N restarts instead of killing every restart.

Keys are sha256 digests of UIDs (file names never carry a UID). Every write goes to a temporary name, is fsync'd,
renamed into place and the folder fsync'd, so a power cut leaves either the old state or the new one.
The result objects get UIDs derived from the idempotency keys (`derived_uid`), so even a replay that re-sends a
result after a crash between "delivered" and "marked" stores the *same* SOP instance again, which a PACS keeps once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

INCOMING, OUTBOX, DONE, REJECTED, QUARANTINE = "incoming", "outbox", "done", "rejected", "quarantine"
JOB_FILE = "job.json"
REASON_FILE = "reason.json"
RECEIVING = ".receiving"
COPY_CHUNK = 1 << 20  # instances are copied into the spool in 1 MiB pieces, never whole in memory


def key_of(*parts: str) -> str:
    """A file-name-safe digest of UIDs and names (no UID appears on disk as a name)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:40]


def idempotency_key(sop_instance_uid: str, model: str, version: int) -> str:
    return key_of(sop_instance_uid, model, str(int(version)))


def derived_uid(*parts: str) -> str:
    """A valid UID (2.25.<decimal of 128 bits>) derived from the parts: the same inputs give the same UID."""
    digest = hashlib.sha256("\x1f".join(("medpipe-result-v1",) + parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def write_durable(path: Path, data: "bytes | os.PathLike") -> None:
    """Write `data` (bytes, or the path of a file copied in 1 MiB pieces), fsync, rename into place, fsync the
    folder. Any failure (ENOSPC half-way) removes the temporary file: a partial file never stays behind. A study
    folder emptied and removed by a concurrent finish() between mkdir and open is simply made again (once)."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    for attempt in (1, 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(temp, "wb") as handle:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    handle.write(data)
                else:
                    with open(data, "rb") as source:
                        shutil.copyfileobj(source, handle, COPY_CHUNK)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
            break
        except FileNotFoundError:
            temp.unlink(missing_ok=True)
            if attempt == 2:
                raise
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def size_of(data: "bytes | os.PathLike") -> int:
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.stat(data).st_size


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class SpooledInstance:
    path: Path
    model: str
    study_key: str
    meta: dict  # door, identity, series_key, received (UNIX seconds)

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class StudyBatch:
    model: str
    study_key: str
    instances: tuple[SpooledInstance, ...]
    newest: float  # UNIX time of the latest arrival


class Spool:
    """The folder and its three areas. Thread-safe by construction: every change is one atomic rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for area in (INCOMING, OUTBOX, DONE, REJECTED, QUARANTINE):
            (self.root / area).mkdir(parents=True, exist_ok=True)
        self.receiving = self.root / RECEIVING  # bodies being received (STOW-RS parts): on the spool's disk

    # ----- incoming
    def put(self, model: str, study_uid: str, series_uid: str, sop_uid: str, data: "bytes | os.PathLike",
            door: str, identity: str, via: str = "dimse") -> SpooledInstance:
        """Store one received instance (bytes, or a received file copied in pieces) for one model; returns once it is
        durable (then the sender may be acked). A failure (a full disk) leaves neither file behind and raises."""
        study_key = key_of(study_uid)
        folder = self.root / INCOMING / _safe(model) / study_key
        base = key_of(sop_uid)
        meta = {"door": door, "identity": identity, "via": via, "series_key": key_of(series_uid), "received": time.time()}
        # the sidecar first: a .dcm without one is still processed (defaults), a sidecar alone is ignored
        write_durable(folder / f"{base}.json", json.dumps(meta).encode())
        try:
            write_durable(folder / f"{base}.dcm", data)
        except BaseException:
            if not (folder / f"{base}.dcm").exists():  # a re-sent instance keeps its earlier, complete copy
                (folder / f"{base}.json").unlink(missing_ok=True)
                _remove_empty(folder)
            raise
        return SpooledInstance(folder / f"{base}.dcm", model, study_key, meta)

    def free_bytes(self) -> int:
        """Free space of the spool's file system, as an unprivileged writer sees it."""
        return shutil.disk_usage(self.root).free

    def studies(self) -> list[StudyBatch]:
        """Every pending (model, study) with its instances, oldest activity first. Arrival time = file mtime, so it
        survives a restart. Folders may vanish while they are listed (a concurrent finish): skipped, not an error."""
        batches = []
        for model_dir in _children(self.root / INCOMING):
            for study_dir in _children(model_dir):
                instances, newest = [], 0.0
                for path in sorted(_files(study_dir, ".dcm")):
                    try:
                        mtime = path.stat().st_mtime
                    except FileNotFoundError:
                        continue  # taken by a concurrent finish()
                    newest = max(newest, mtime)
                    instances.append(SpooledInstance(path, model_dir.name, study_dir.name, _read_meta(path)))
                if instances:
                    batches.append(StudyBatch(model_dir.name, study_dir.name, tuple(instances), newest))
        return sorted(batches, key=lambda batch: batch.newest)

    def stable(self, stable_seconds: float, now: Optional[float] = None) -> list[StudyBatch]:
        now = time.time() if now is None else now
        return [batch for batch in self.studies() if now - batch.newest >= stable_seconds]

    def finish(self, instances: Iterable[SpooledInstance]) -> None:
        """Remove processed instances (only these: later arrivals of the same study stay for the next batch)."""
        folders = set()
        for instance in instances:
            for path in _sidecars(instance):
                path.unlink(missing_ok=True)
            folders.add(instance.path.parent)
        for folder in folders:
            _remove_empty(folder)

    def reject(self, instances: Iterable[SpooledInstance]) -> None:
        """Move instances that cannot be inferred out of the way (never deleted: they were acknowledged)."""
        for instance in instances:
            self._move(instance, self.root / REJECTED / instance.model / instance.study_key)

    def _move(self, instance: SpooledInstance, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for path in _sidecars(instance):
            if path.exists():
                os.replace(path, target / path.name)
        _fsync_dir(target)
        _remove_empty(instance.path.parent)

    # ----- attempts and quarantine
    def attempts(self, instance: SpooledInstance) -> int:
        """How many processing attempts of this instance started (and did not finish) so far."""
        return int(_read_json(instance.path.with_suffix(".attempts")).get("attempts", 0))

    def last_error(self, instance: SpooledInstance) -> str:
        return str(_read_json(instance.path.with_suffix(".attempts")).get("last_error", "unknown"))[:300]

    def begin_attempt(self, instances: Iterable[SpooledInstance]) -> None:
        """Count one attempt of each instance, durably, before processing starts: if the process dies during it,
        the count is already on disk. Raises OSError when it cannot be recorded (then do not process)."""
        for instance in instances:
            path = instance.path.with_suffix(".attempts")
            state = _read_json(path)
            state["attempts"] = int(state.get("attempts", 0)) + 1
            state.setdefault("last_error", "the gateway stopped while processing (crash, OOM kill or SIGKILL)")
            write_durable(path, json.dumps(state).encode())

    def end_attempt(self, instances: Iterable[SpooledInstance], error: str, counts: bool) -> None:
        """An attempt ended in an error (no PHI in `error`). counts=False gives the attempt back: the failure was
        not the instance's (the model server was down, the disk full), so it must not bring quarantine closer."""
        for instance in instances:
            path = instance.path.with_suffix(".attempts")
            state = _read_json(path)
            if not state:
                continue  # finished or moved meanwhile
            state["attempts"] = max(0, int(state.get("attempts", 1)) - (0 if counts else 1))
            state["last_error"] = error
            try:
                write_durable(path, json.dumps(state).encode())
            except OSError:
                pass  # best effort: the attempt stays counted, which errs towards quarantine, never towards a loop

    def quarantine(self, instances: list[SpooledInstance], reason: dict) -> Path:
        """Move instances out of the road for good (kept, never deleted: they were acknowledged), with reason.json
        (attempts, last error, when; no PHI). Returns the quarantine folder."""
        first = instances[0]
        target = self.root / QUARANTINE / first.model / first.study_key
        for instance in instances:
            self._move(instance, target)
        write_durable(target / REASON_FILE, json.dumps({**reason, "quarantined": time.time()}, indent=1).encode())
        return target

    def quarantined_instances(self) -> int:
        return sum(name.endswith(".dcm") for _, _, names in os.walk(self.root / QUARANTINE) for name in names)

    def pending_instances(self) -> int:
        return sum(name.endswith(".dcm") for _, _, names in os.walk(self.root / INCOMING) for name in names)

    # ----- done markers
    def is_done(self, key: str) -> bool:
        return (self.root / DONE / key).exists()

    def mark_done(self, keys: Iterable[str]) -> None:
        for key in keys:
            write_durable(self.root / DONE / key, b"")

    # ----- outbox
    def add_job(self, job_key: str, objects: dict[str, bytes], job: dict) -> Path:
        """A result ready to deliver: objects (name -> DICOM bytes) then job.json last, in a folder renamed into
        place whole. Re-adding the same job (a replay) replaces it: same key, same UIDs, one delivery."""
        final = self.root / OUTBOX / job_key
        staging = self.root / OUTBOX / f".{job_key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for name, data in objects.items():
                write_durable(staging / name, data)
            write_durable(staging / JOB_FILE, json.dumps({**job, "objects": sorted(objects)}).encode())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk must not fill up further with each retry
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        return final

    def jobs(self) -> list[Path]:
        """Outbox folders with a complete job.json, oldest first."""
        found = []
        for folder in _children(self.root / OUTBOX):
            try:
                found.append(((folder / JOB_FILE).stat().st_mtime, folder))
            except FileNotFoundError:
                continue  # being written (no job.json yet) or just delivered
        return [folder for _, folder in sorted(found)]

    def remove_job(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def outbox_length(self) -> int:
        return len(self.jobs())

    def clean_temporaries(self) -> None:
        """Half-written files and bodies being received by a crashed process (never acknowledged, so never owed to
        anyone)."""
        shutil.rmtree(self.receiving, ignore_errors=True)
        self.receiving.mkdir(exist_ok=True)
        for path in self.root.glob("**/.*.tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def read_job(folder: Path) -> dict:
    return json.loads((folder / JOB_FILE).read_text())


def _sidecars(instance: SpooledInstance) -> tuple[Path, Path, Path]:
    return instance.path, instance.path.with_suffix(".json"), instance.path.with_suffix(".attempts")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {"door": "unknown", "identity": "unknown", "series_key": "", "received": 0.0}


def _children(folder: Path) -> list[Path]:
    """Sub-folders (not hidden), sorted; [] if the folder itself is gone."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def _files(folder: Path, suffix: str) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")]
    except FileNotFoundError:
        return []


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _safe(model: str) -> str:
    if not model or not all(c.isalnum() or c in "_-." for c in model) or model.startswith("."):
        raise ValueError(f"model name {model!r} is not a plain name")
    return model
