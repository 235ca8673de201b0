"""The audit trail: one chained JSON line per access to a model, written by one writer, keyed, anchored, shipped.

    AuditLog(path, key=None).append({"event": "predict", ...}) -> the record as written (seq, ts, prev[, mac])
    AuditTrail(options...)        the log + its checkpoints (--audit-anchor) + shipping (--audit-syslog)
    check(path, key=None, anchor=None) -> Verdict;  verify(path) -> None or the first bad line (1-based)
    medpipe audit verify FILE [--key KEY] [--anchor ANCHOR]

Each line is a JSON object whose `prev` is the SHA-256 (hex) of the previous line's bytes (without its newline); the
first line's `prev` is 64 zeros and `seq` counts from 1. That hash chain shows an edit, a removal or a reordering
inside the file, but anyone can recompute it. With a key (`--audit-key`, a secret file), each line also ends with
`"mac"`: HMAC-SHA256(key, previous line's mac || this line without its mac), so a recomputed chain cannot be forged
without the key. A cut tail leaves a shorter, valid chain: the checkpoints (`--audit-anchor`: seq, head hash and
mac, time, HMAC-signed) kept in a second place every few seconds show it; `check(..., anchor=...)` fails when the
file ends before the last checkpoint or differs from it. A file is keyed from its first line or not at all: a
gateway refuses to continue a chain in the other mode (start a new file to adopt or rotate a key).

Failure: `append` fails closed. When the line cannot be written whole (ENOSPC, EIO) the bytes that did reach the file
are cut back (ftruncate to the last good offset), AuditUnavailable is raised (the gateway refuses the request, 507)
and the chain stays verifiable once space returns. A line left partial by a crash is cut back on start-up and the
repair is itself audited. Files are created 0600; an existing file's mode is tightened to 0600.

Records carry no pixels, no DICOM header values and no patient identity: the callers (serving.gateway.core) build
them from an allow-list of keys.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import select
import socket
import ssl
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence
from xml.etree import ElementTree as ET

log = logging.getLogger("medpipe.gateway.audit")

GENESIS = "0" * 64
SYNC_SECONDS = 1.0  # the most a host crash can take from the end of the log
CHECKPOINT_SECONDS = 5.0  # the most a cut tail can hide from `verify --anchor`
MIN_KEY_BYTES = 32
MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')
SYSLOG_SCHEME = "syslog+tls://"
APP_NAME = "medpipe-gateway"
# RFC 5424 PRI: facility 10 (security/authorization, as IHE ATNA uses), severity 5 (notice)
SYSLOG_PRI = 10 * 8 + 5


class AuditUnavailable(OSError):
    """The audit line could not be written (disk full, I/O error): nothing may be served unaudited."""


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def line_mac(key: bytes, prev_mac: str, body: bytes) -> str:
    """The HMAC of one line: chained over the previous line's mac; `body` is the line without its mac field."""
    return hmac.new(key, prev_mac.encode() + body, hashlib.sha256).hexdigest()


def split_mac(line: bytes) -> tuple[bytes, str] | None:
    """A keyed line -> (the line without its mac field, the mac); None when the line carries no mac."""
    match = MAC_SUFFIX.search(line)
    if not match:
        return None
    return line[:match.start()] + b"}", match.group(1).decode()


def load_key(path: str | os.PathLike) -> bytes:
    """The HMAC key from a secret file: at least 32 bytes, readable by its owner only."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"audit key {file} does not exist (create one: head -c 32 /dev/urandom | base64 > FILE; "
                         "chmod 600 FILE)")
    mode = stat.S_IMODE(file.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"audit key {file} is readable by others (mode {mode:o}); chmod 600 {file}")
    key = file.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"audit key {file} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                         "(head -c 32 /dev/urandom | base64)")
    return key


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600 for a new file; an existing file's looser mode is tightened (or a clear error)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:
            os.close(fd)
            raise PermissionError(f"{path} has mode {mode:o} and cannot be made 0600 ({exc.strerror}); audit files "
                                  f"must be readable by the gateway only: chmod 600 {path}") from None
        log.warning("%s had mode %o; tightened to 600", path, mode)
    return fd


def _last_line(path: Path) -> tuple[bytes | None, int]:
    """(the last complete line, the offset just after it): audit logs grow large, so read from the end."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = size = handle.tell()
        block, data = 4096, b""
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
            if data.count(b"\n") >= 2 or (end == 0 and b"\n" in data):
                break
        complete = data[:data.rfind(b"\n") + 1] if b"\n" in data else b""
        good = end + len(complete)
        lines = complete.rstrip(b"\n").rsplit(b"\n", 1)
        last = lines[-1] if complete else None
        return last, good if size else 0


def _first_line(path: Path) -> bytes | None:
    with open(path, "rb") as handle:
        line = handle.readline()
    return line.rstrip(b"\n") if line.endswith(b"\n") else None


@dataclass(frozen=True)
class Head:
    """Where the chain stands: the last record's seq, hash and mac, and the committed size of the file."""

    seq: int
    hash: str
    mac: str | None
    size: int
    chain: str | None  # the hash of line 1: names this chain in checkpoints


class AuditLog:
    """The only writer of the audit file: one lock, append, flush. Thread-safe.

    Durability: every line reaches the OS before append() returns (a crashed gateway loses nothing), and a
    background thread fsyncs the file at most `sync_seconds` after a write (a crashed host or a power cut loses at
    most that window), outside the lock: one fsync per window, not one per request on the request's path."""

    def __init__(self, path: str | os.PathLike, sync_seconds: float = SYNC_SECONDS, key: bytes | None = None):
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        self._prev, self._seq, self._mac, self._chain = GENESIS, 0, GENESIS, None
        self._size = os.fstat(self._fd).st_size
        self._failing = False  # log the first failure and the recovery, not one line per refused request
        repaired = self._resume() if self._size else 0
        self._sync_fd = os.dup(self._fd)  # the syncer's own descriptor of the same file
        self._closed = False
        self._dirty, self._stop = threading.Event(), threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, args=(sync_seconds,), name="audit-fsync",
                                        daemon=True)
        self._syncer.start()
        if repaired:
            self.append({"event": "audit.repaired", "outcome": "OK", "dropped_bytes": repaired})

    def _resume(self) -> int:
        """Continue the chain of an existing file; cut back a partial last line (a crash mid-write). -> bytes cut."""
        last, good = _last_line(self.path)
        repaired = self._size - good
        if repaired:
            log.warning("audit log %s ends with %d bytes of a partial line (a crash while writing); cut back to the "
                        "last complete line", self.path, repaired)
            os.ftruncate(self._fd, good)
            self._size = good
        if not last:
            return repaired
        try:
            self._seq = int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"audit log {self.path} does not end with an audit record; "
                             f"check it with `medpipe audit verify {self.path}`") from exc
        keyed = split_mac(last)
        if self.key and not keyed:
            raise ValueError(f"audit log {self.path} was written without --audit-key: a keyed chain starts in a new "
                             "file (move this one aside, keep it, and restart)")
        if keyed and not self.key:
            raise ValueError(f"audit log {self.path} is keyed (its lines carry a mac): pass its --audit-key")
        self._prev = line_hash(last)
        self._mac = keyed[1] if keyed else GENESIS
        first = _first_line(self.path)
        self._chain = line_hash(first) if first else None
        return repaired

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (cheaply, without I/O) after each committed line: the shipper and checkpointer wake on it."""
        self._listeners.append(callback)

    def head(self) -> Head:
        with self._lock:
            return Head(self._seq, self._prev, self._mac if self.key else None, self._size, self._chain)

    def append(self, record: dict) -> dict:
        with self._lock:
            if self._closed:
                raise AuditUnavailable(errno.EBADF, "the audit log is closed")
            full = {"seq": self._seq + 1, "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                    **record, "prev": self._prev}
            full.pop("mac", None)
            line = json.dumps(full, separators=(",", ":"), sort_keys=False, default=str).encode()
            mac = None
            if self.key:
                mac = line_mac(self.key, self._mac, line)
                line = line[:-1] + b',"mac":"' + mac.encode() + b'"}'
            self._write(line + b"\n")
            self._prev, self._seq = line_hash(line), self._seq + 1
            if mac:
                self._mac = full["mac"] = mac
            if self._chain is None:
                self._chain = self._prev
        self._dirty.set()
        for callback in self._listeners:
            callback()
        return full

    def _write(self, data: bytes) -> None:
        """All of `data` or nothing: a short or failed write is cut back to the last good offset."""
        written = 0
        try:
            while written < len(data):
                count = os.write(self._fd, data[written:])
                if count <= 0:
                    raise OSError(errno.EIO, "write returned no progress")
                written += count
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as cut:
                log.error("audit log %s: a partial line could not be cut back (%s); it is cut back on the next "
                          "write or start-up", self.path, cut.strerror)
            if not self._failing:
                log.error("audit log %s: write failed (%s); requests are refused until it can be written",
                          self.path, exc.strerror or type(exc).__name__)
                self._failing = True
            raise AuditUnavailable(exc.errno or errno.EIO, f"cannot write the audit log ({exc.strerror})") from None
        self._size += written
        if self._failing:
            log.warning("audit log %s is writable again; requests are served", self.path)
            self._failing = False

    def sync(self) -> None:
        """fsync now (the checkpointer calls it: a checkpoint never covers lines a host crash could still take)."""
        os.fsync(self._sync_fd)

    def _sync_loop(self, sync_seconds: float) -> None:
        while not self._stop.is_set():
            # wait for a write, then let the window's other writes join it: one fsync for all of them
            if self._dirty.wait(timeout=1.0) and not self._stop.wait(sync_seconds):
                self._dirty.clear()  # a write after this sets it again: the next round syncs it
                try:
                    os.fsync(self._sync_fd)
                except OSError as exc:
                    log.error("audit log %s: fsync failed (%s)", self.path, exc.strerror)

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()  # wakes the syncer now rather than at its next timeout
        self._syncer.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.fsync(self._sync_fd)
            finally:
                os.close(self._fd)
                os.close(self._sync_fd)


# ---- checkpoints (--audit-anchor) ----------------------------------------------------------------------------------
def checkpoint_body(head: Head) -> dict:
    return {"checkpoint": head.chain, "seq": head.seq, "head": head.hash, "mac": head.mac,
            "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}


def sign_checkpoint(key: bytes, body: dict) -> dict:
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return {**body, "sig": hmac.new(key, b"checkpoint:" + canonical, hashlib.sha256).hexdigest()}


def checkpoint_valid(key: bytes, checkpoint: dict) -> bool:
    body = {k: v for k, v in checkpoint.items() if k != "sig"}
    expected = sign_checkpoint(key, body)["sig"]
    return isinstance(checkpoint.get("sig"), str) and hmac.compare_digest(expected, checkpoint["sig"])


class FileAnchor:
    """Checkpoints appended to a file on another mount (0600, fsync'd per checkpoint)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        os.close(open_private(self.path, os.O_WRONLY | os.O_APPEND))

    def send(self, lines: list[bytes]) -> None:
        fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"".join(line + b"\n" for line in lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass


class Checkpointer:
    """Every `interval` seconds (and at close), when the chain moved: fsync the log, sign its head, send it away."""

    def __init__(self, audit_log: AuditLog, key: bytes, sink, interval: float = CHECKPOINT_SECONDS):
        self.log, self.key, self.sink, self.interval = audit_log, key, sink, interval
        self._pending: list[bytes] = []  # signed, not yet delivered (a syslog anchor that is down); bounded
        self._sent_seq = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audit-checkpoints", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.checkpoint()

    def checkpoint(self) -> None:
        head = self.log.head()
        if head.seq and head.seq != self._sent_seq:
            try:
                self.log.sync()
            except OSError as exc:
                log.error("audit checkpoint skipped: fsync failed (%s)", exc.strerror)
                return
            line = json.dumps(sign_checkpoint(self.key, checkpoint_body(head)), separators=(",", ":")).encode()
            self._pending = (self._pending + [line])[-1000:]
            self._sent_seq = head.seq
        if not self._pending:
            return
        try:
            self.sink.send(self._pending)
            self._pending = []
        except OSError as exc:
            log.warning("audit checkpoint not delivered to the anchor yet (%s); retrying", exc.strerror or exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.checkpoint()
        self.sink.close()


# ---- syslog over TLS (RFC 5424 messages, RFC 5425 octet-counted framing) -------------------------------------------
def parse_syslog_url(url: str) -> tuple[str, int]:
    if not url.startswith(SYSLOG_SCHEME):
        raise ValueError(f"{url!r}: expected {SYSLOG_SCHEME}HOST:PORT")
    host, _, port = url[len(SYSLOG_SCHEME):].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{url!r}: expected {SYSLOG_SCHEME}HOST:PORT (e.g. {SYSLOG_SCHEME}audit.example:6514)")
    return host.strip("[]"), int(port)


def syslog_frame(msgid: str, message: bytes, hostname: str | None = None) -> bytes:
    """One RFC 5424 message (no structured data; MSG is the JSON record) in RFC 5425 octet-counting framing."""
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255]
    payload = f"<{SYSLOG_PRI}>1 {timestamp} {host} {APP_NAME} {os.getpid()} {msgid} - ".encode() + message
    return str(len(payload)).encode() + b" " + payload


# ---- DICOM audit messages (PS3.15 A.5.1, the RFC 3881 schema IHE ATNA receivers parse) -----------------------------
# event -> (EventID code (DCM), its meaning, EventActionCode); anything else is Application Activity
DICOM_EVENTS = {
    "predict": ("110103", "DICOM Instances Accessed", "R"),
    "authenticate": ("110114", "User Authentication", "E"),
    "tls_handshake": ("110114", "User Authentication", "E"),
    "refused": ("110113", "Security Alert", "E"),
    "refused.summary": ("110113", "Security Alert", "E"),
    "dimse.association_rejected": ("110113", "Security Alert", "E"),
    "audit.repaired": ("110113", "Security Alert", "E"),
}
# RFC 3881 EventOutcomeIndicator: 0 success, 4 minor failure (the caller's input), 8 serious (refused), 12 major
OUTCOMES = {"OK": "0", "INVALID_ARGUMENT": "4", "NOT_FOUND": "4", "UNAUTHENTICATED": "8", "PERMISSION_DENIED": "8",
            "RESOURCE_EXHAUSTED": "8", "DEADLINE_EXCEEDED": "8", "UNAVAILABLE": "8", "INTERNAL": "12"}


def dicom_audit_message(line: bytes, source_id: str | None = None) -> bytes:
    """One audit line -> a PS3.15 A.5 AuditMessage (XML). The record's seq and mac ride along as a
    ParticipantObjectDetail so a receiver's copy can be matched to the chained file. No PHI: built from the record,
    which holds none."""
    record = json.loads(line)
    code, meaning, action = DICOM_EVENTS.get(str(record.get("event")), ("110100", "Application Activity", "E"))
    outcome = record.get("outcome") or "OK"
    message = ET.Element("AuditMessage")
    event = ET.SubElement(message, "EventIdentification", EventActionCode=action,
                          EventDateTime=str(record.get("ts", "")), EventOutcomeIndicator=OUTCOMES.get(outcome, "4"))
    ET.SubElement(event, "EventID", {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning})
    ET.SubElement(event, "EventTypeCode", {"csd-code": str(record.get("event")), "codeSystemName": "medpipe",
                                           "originalText": str(record.get("limit") or record.get("door") or "")})
    requestor = {"UserID": str(record.get("identity") or "unknown"), "UserIsRequestor": "true"}
    if record.get("client"):
        requestor.update(NetworkAccessPointID=str(record["client"]), NetworkAccessPointTypeCode="2")
    ET.SubElement(message, "ActiveParticipant", requestor)
    ET.SubElement(message, "ActiveParticipant", UserID=APP_NAME, UserIsRequestor="false")
    ET.SubElement(message, "AuditSourceIdentification", AuditSourceID=source_id or socket.gethostname() or APP_NAME)
    if record.get("model"):
        model = ET.SubElement(message, "ParticipantObjectIdentification", ParticipantObjectID=str(record["model"]),
                              ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="4")
        ET.SubElement(model, "ParticipantObjectIDTypeCode", {"csd-code": "model", "codeSystemName": "medpipe",
                                                             "originalText": "served model"})
    chain = ET.SubElement(message, "ParticipantObjectIdentification", ParticipantObjectID=str(record.get("seq")),
                          ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="13")
    ET.SubElement(chain, "ParticipantObjectIDTypeCode", {"csd-code": "seq", "codeSystemName": "medpipe",
                                                         "originalText": "audit record"})
    for key in ("prev", "mac", "request_id"):
        if record.get(key):
            ET.SubElement(chain, "ParticipantObjectDetail", type=key,
                          value=base64.b64encode(str(record[key]).encode()).decode())
    return ET.tostring(message, encoding="utf-8", xml_declaration=False)


class SyslogTLS:
    """A syslog-over-TLS client: verifies the receiver against `ca`, optionally presents a client certificate.

    Not thread-safe: one sender thread owns it. `send` raises OSError when the receiver is unreachable; the caller
    keeps what was not sent and retries."""

    def __init__(self, url: str, ca: str, cert: str | None = None, key: str | None = None, msgid: str = "AUDIT",
                 timeout: float = 5.0):
        self.host, self.port = parse_syslog_url(url)
        self.msgid, self.timeout = msgid, timeout
        self.context = ssl.create_default_context(cafile=ca)
        if cert:
            self.context.load_cert_chain(cert, key)
        self._sock: ssl.SSLSocket | None = None

    def _connected(self) -> ssl.SSLSocket:
        if self._sock is not None:
            # the receiver never talks: a readable socket means it closed (a write would vanish into the void)
            readable, _, _ = select.select([self._sock], [], [], 0)
            if readable:
                self.close()
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            try:
                self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
            except (OSError, ssl.SSLError):
                raw.close()
                raise
        return self._sock

    def send(self, messages: list[bytes]) -> None:
        frames = b"".join(syslog_frame(self.msgid, message) for message in messages)
        try:
            self._connected().sendall(frames)
        except (OSError, ssl.SSLError):
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.settimeout(1.0)
                self._sock.unwrap()  # a TLS close_notify: the receiver sees a clean end, not a truncation
            except (OSError, ValueError):
                pass
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


class SyslogShipper:
    """Ships every committed audit line to syslog, in order, off the request path.

    The backlog is the audit file itself: the shipper reads the lines after `offset` (kept in FILE.syslog-offset,
    0600) from the file, so a receiver that is down for hours costs no memory and nothing is dropped; on reconnect
    the backlog is sent in 1 MB batches. A fresh offset file starts at the log's current end (history written
    before shipping was configured is not sent). Delivery is at least once: lines sent into a connection the
    receiver dropped before reading them can be lost (plain RFC 5425 has no acknowledgement); the checkpoints
    (--audit-anchor) and the local file remain the proof."""

    BATCH = 2**20

    def __init__(self, audit_log: AuditLog, client: SyslogTLS, message_format: str = "json"):
        if message_format not in ("json", "dicom"):
            raise ValueError(f"--audit-syslog-format {message_format!r}: expected json or dicom")
        self.log, self.client, self.format = audit_log, client, message_format
        self.state = Path(str(audit_log.path) + ".syslog-offset")
        self.offset = self._load_offset()
        self._wake, self._stop = threading.Event(), threading.Event()
        audit_log.add_listener(self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="audit-syslog", daemon=True)
        self._thread.start()

    def _load_offset(self) -> int:
        size = self.log.head().size
        try:
            offset = int(self.state.read_text().strip())
            return offset if 0 <= offset <= size else size
        except (OSError, ValueError):
            return size

    def _save_offset(self) -> None:
        try:
            fd = open_private(self.state, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, str(self.offset).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("audit syslog offset not saved (%s): a restart may resend some lines", exc.strerror)

    def pending(self) -> int:
        return self.log.head().size - self.offset

    def _loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                while self.ship_once():
                    pass
                backoff = 0.2
            except OSError as exc:
                log.warning("audit syslog receiver %s:%d unreachable (%s); %d bytes wait in the audit file",
                            self.client.host, self.client.port, exc.strerror or exc, self.pending())
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def ship_once(self) -> bool:
        """Send the next batch of committed lines; True when one was sent. OSError when the receiver is away."""
        end = self.log.head().size
        if self.offset >= end:
            return False
        with open(self.log.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(min(self.BATCH, end - self.offset))
        complete = data[:data.rfind(b"\n") + 1]
        if not complete:  # one line over the batch size
            with open(self.log.path, "rb") as handle:
                handle.seek(self.offset)
                complete = handle.readline()
        lines = complete.splitlines()
        self.client.send(lines if self.format == "json" else [dicom_audit_message(line) for line in lines])
        self.offset += len(complete)
        self._save_offset()
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Give the backlog `timeout` seconds to leave, then stop (what is left goes on the next start)."""
        deadline = time.monotonic() + timeout
        while self.pending() > 0 and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)
        self.client.close()


class AuditTrail:
    """The log with its optional key, anchor and syslog shipping, built from the gateway's options."""

    def __init__(self, path: str | os.PathLike, key_file: str | None = None, anchor: str | None = None,
                 syslog: str | None = None, syslog_ca: str | None = None, syslog_cert: str | None = None,
                 syslog_key: str | None = None, checkpoint_seconds: float = CHECKPOINT_SECONDS,
                 syslog_format: str = "json"):
        key = load_key(key_file) if key_file else None
        if anchor and not key:
            raise ValueError("--audit-anchor needs --audit-key: checkpoints are signed with it")
        if (syslog or (anchor or "").startswith(SYSLOG_SCHEME)) and not syslog_ca:
            raise ValueError("syslog over TLS needs --audit-syslog-ca: the CA that signed the receiver's certificate")
        self.log = AuditLog(path, key=key)
        self.checkpointer = self.shipper = None
        if anchor:
            sink = (SyslogTLS(anchor, syslog_ca, syslog_cert, syslog_key, msgid="CHECKPOINT")
                    if anchor.startswith(SYSLOG_SCHEME) else FileAnchor(anchor))
            self.checkpointer = Checkpointer(self.log, key, sink, checkpoint_seconds)
        if syslog:
            self.shipper = SyslogShipper(self.log, SyslogTLS(syslog, syslog_ca, syslog_cert, syslog_key),
                                         syslog_format)

    def append(self, record: dict) -> dict:
        return self.log.append(record)

    def close(self) -> None:
        if self.checkpointer is not None:  # the last checkpoint covers the last line (the doors are closed by now)
            self.checkpointer.close()
        self.log.close()
        if self.shipper is not None:
            self.shipper.close()


# ---- verification ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str
    bad_line: Optional[int] = None
    records: int = 0


def read_checkpoints(anchor: Path, key: bytes) -> list[dict]:
    """Checkpoints from an anchor file or a syslog receiver's file (the JSON after the syslog header)."""
    decoder = json.JSONDecoder()
    found = []
    with open(anchor, "r", encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            start = text.find('{"checkpoint"')
            if start < 0:
                continue
            try:
                checkpoint, _ = decoder.raw_decode(text[start:])
            except ValueError:
                raise ValueError(f"{anchor} line {number}: a checkpoint that is not valid JSON") from None
            if not checkpoint_valid(key, checkpoint):
                raise ValueError(f"{anchor} line {number}: the checkpoint's signature does not match the key "
                                 "(forged, edited, or signed with another key)")
            found.append(checkpoint)
    return found


def check(path: str | os.PathLike, key: bytes | None = None, anchor: str | os.PathLike | None = None) -> Verdict:
    """The whole verdict on one audit file: hash chain, macs (with `key`), checkpoints (with `anchor`)."""
    if anchor is not None and key is None:
        raise ValueError("checking against an anchor needs the key (its checkpoints are signed)")
    prev, seq, mac, chain = GENESIS, 0, GENESIS, None
    checkpoints: dict[int, list[dict]] = {}
    if anchor is not None:
        for checkpoint in read_checkpoints(Path(anchor), key):
            checkpoints.setdefault(int(checkpoint["seq"]), []).append(checkpoint)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n")
            if not raw.endswith(b"\n"):
                return Verdict(False, f"line {number} is a partial line (a write cut short)", number, seq)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.get("prev") != prev or record.get("seq") != seq + 1:
                return Verdict(False, f"line {number} breaks the hash chain (edited, removed or reordered at or "
                               f"before it); lines 1-{number - 1} are intact", number, seq)
            if key is not None:
                keyed = split_mac(line)
                if keyed is None or not hmac.compare_digest(line_mac(key, mac, keyed[0]), keyed[1]):
                    return Verdict(False, f"line {number}: its mac does not match (edited, or the chain was "
                                   f"recomputed without the key); lines 1-{number - 1} are intact", number, seq)
                mac = keyed[1]
            prev, seq = line_hash(line), seq + 1
            chain = chain or prev
            for checkpoint in checkpoints.get(seq, []):
                if checkpoint["checkpoint"] == chain and (checkpoint["head"] != prev or checkpoint["mac"] != mac):
                    return Verdict(False, f"line {number} differs from the checkpoint of {checkpoint['ts']} "
                                   "(edited after it was anchored)", number, seq)
    if anchor is None:
        return Verdict(True, f"{seq} records, hash chain intact" + (", macs valid" if key else ""), records=seq)
    mine = [c for found in checkpoints.values() for c in found if c["checkpoint"] == chain]
    if seq and not mine:
        return Verdict(False, f"the anchor holds no checkpoint of this log (chain {str(chain)[:12]}...): its first "
                       "line was changed, or this is not the anchor of this log", 1, seq)
    last = max(mine, key=lambda c: c["seq"], default=None)
    if last is not None and last["seq"] > seq:
        return Verdict(False, f"the log ends at record {seq} but the anchor's checkpoint of {last['ts']} saw record "
                       f"{last['seq']}: the tail was cut", seq + 1, seq)
    return Verdict(True, f"{seq} records, hash chain intact, macs valid, matches {len(mine)} checkpoints (the last "
                   f"at record {last['seq'] if last else 0})", records=seq)


def verify(path: str | os.PathLike, key: bytes | None = None) -> int | None:
    """None when every line chains to the one before it (and, with `key`, every mac matches); else the first bad
    line number (1-based)."""
    verdict = check(path, key)
    return None if verdict.ok else verdict.bad_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medpipe audit", description="Check the gateway's chained audit log.")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("verify", help="exit 0 when the log is intact, 1 naming the first bad line")
    check_parser.add_argument("file", help="the gateway's --audit-log file")
    check_parser.add_argument("--key", help="the gateway's --audit-key file: check every line's mac")
    check_parser.add_argument("--anchor", help="the checkpoints: the --audit-anchor file, or the file the syslog "
                              "receiver wrote them to (needs --key); shows a cut tail")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"medpipe audit: {path} does not exist (the gateway's --audit-log file)", file=sys.stderr)
        return 2
    if args.anchor and not args.key:
        print("medpipe audit: --anchor needs --key (the checkpoints are signed with the gateway's --audit-key)",
              file=sys.stderr)
        return 2
    if args.anchor and not Path(args.anchor).is_file():
        print(f"medpipe audit: anchor {args.anchor} does not exist", file=sys.stderr)
        return 2
    try:
        key = load_key(args.key) if args.key else None
    except ValueError as exc:
        print(f"medpipe audit: {exc}", file=sys.stderr)
        return 2
    try:
        verdict = check(path, key, args.anchor)
    except ValueError as exc:  # a forged or unreadable checkpoint
        print(f"medpipe audit: {exc}", file=sys.stderr)
        return 1
    if not verdict.ok:
        print(f"{path}: {verdict.message}", file=sys.stderr)
        return 1
    print(f"{path}: {verdict.message}" + ("" if key else " (macs and checkpoints not checked: no --key)"))
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
