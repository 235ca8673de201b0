"""The audit log: one hash-chained JSON line per access to a model, written by one writer.

    AuditLog(path).append({"event": "predict", ...}) -> the record as written (with seq, ts, prev)
    verify(path) -> None when intact, else the number (1-based) of the first bad line
    medpipe audit verify FILE

Each line is a JSON object whose `prev` is the SHA-256 (hex) of the previous line's bytes (without its newline);
the first line's `prev` is 64 zeros and `seq` counts from 1. Editing, deleting or reordering any line breaks the
chain at the line after the change; deleting the last lines cannot be seen from the file alone (keep the log on
append-only storage, or compare `seq` with a copy shipped elsewhere). The writer continues the chain of an existing
file, so a restart does not start a new one. Records carry no pixels, no DICOM header values and no patient
identity: the callers (serving.gateway.core) build them from an allow-list of keys.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

GENESIS = "0" * 64
SYNC_SECONDS = 1.0  # the most a host crash can take from the end of the log


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last non-empty line of a file, read from its end (audit logs grow large)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        block, data = 4096, b""
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
            stripped = data.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        stripped = data.rstrip(b"\n")
        return stripped or None


class AuditLog:
    """The only writer of the audit file: one lock, append, flush. Thread-safe.

    Durability: every line reaches the OS before append() returns (a crashed gateway loses nothing), and a
    background thread fsyncs the file at most `sync_seconds` after a write (a crashed host or a power cut loses at
    most that window), outside the lock: one fsync per window, not one per request on the request's path."""

    def __init__(self, path: str | os.PathLike, sync_seconds: float = SYNC_SECONDS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._seq = GENESIS, 0
        if self.path.is_file() and self.path.stat().st_size:
            last = _last_line(self.path)
            if last:
                try:
                    self._seq = int(json.loads(last)["seq"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"audit log {self.path} does not end with an audit record; "
                                     f"check it with `medpipe audit verify {self.path}`") from exc
                self._prev = line_hash(last)
        self._handle = open(self.path, "ab")
        self._sync_fd = os.dup(self._handle.fileno())  # the syncer's own descriptor of the same file
        self._dirty, self._stop = threading.Event(), threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, args=(sync_seconds,), name="audit-fsync",
                                        daemon=True)
        self._syncer.start()

    def append(self, record: dict) -> dict:
        with self._lock:
            full = {"seq": self._seq + 1, "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                    **record, "prev": self._prev}
            line = json.dumps(full, separators=(",", ":"), sort_keys=False, default=str).encode()
            self._handle.write(line + b"\n")
            self._handle.flush()  # to the OS at once; the syncer takes it to the disk
            self._prev, self._seq = line_hash(line), self._seq + 1
        self._dirty.set()
        return full

    def _sync_loop(self, sync_seconds: float) -> None:
        while not self._stop.is_set():
            # wait for a write, then let the window's other writes join it: one fsync for all of them
            if self._dirty.wait(timeout=1.0) and not self._stop.wait(sync_seconds):
                self._dirty.clear()  # a write after this sets it again: the next round syncs it
                os.fsync(self._sync_fd)

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()  # wakes the syncer now rather than at its next timeout
        self._syncer.join()
        with self._lock:
            if self._handle.closed:
                return
            self._handle.flush()
            os.fsync(self._sync_fd)
            self._handle.close()
            os.close(self._sync_fd)


def verify(path: str | os.PathLike) -> int | None:
    """None when every line chains to the one before it; else the first bad line number (1-based)."""
    prev, seq = GENESIS, 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n")
            try:
                record = json.loads(line)
            except ValueError:
                return number
            if not isinstance(record, dict) or record.get("prev") != prev or record.get("seq") != seq + 1:
                return number
            prev, seq = line_hash(line), seq + 1
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medpipe audit", description="Check the gateway's hash-chained audit log.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="exit 0 when the chain is intact, 1 naming the first bad line")
    check.add_argument("file", help="the gateway's --audit-log file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"medpipe audit: {path} does not exist (the gateway's --audit-log file)", file=sys.stderr)
        return 2
    bad = verify(path)
    if bad is not None:
        print(f"{path}: line {bad} breaks the hash chain (edited, removed or reordered at or before it); "
              f"lines 1-{bad - 1} are intact", file=sys.stderr)
        return 1
    with open(path, "rb") as handle:
        count = sum(1 for _ in handle)
    print(f"{path}: {count} records, hash chain intact")
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
