"""The audit trail an auditor accepts (issue 34): keyed chain, anchored checkpoints, fail-closed writes on a real full
tmpfs, 0600 files, aggregated refusals, and shipping to Debian's rsyslog over TLS (RFC 5425) with its backlog.

No gateway here (see test_gateway_refusals.py for the doors): the real AuditTrail, the real `medpipe audit verify`
CLI, a real tmpfs mounted for the test, a real rsyslogd with rsyslog-gnutls on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from gateway_support import tiny_tmpfs
from serving.gateway import audit


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "audit.key"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return path


def write(path: Path, key_file: Path | None, count: int, anchor: Path | str | None = None, **kwargs) -> list[bytes]:
    trail = audit.AuditTrail(path, key_file=str(key_file) if key_file else None,
                             anchor=str(anchor) if anchor else None, checkpoint_seconds=0.2, **kwargs)
    for i in range(count):
        trail.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK"})
    trail.close()
    return path.read_bytes().splitlines(keepends=True)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", "audit", "verify", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def recompute(lines: list[bytes]) -> bytes:
    """What a forger without the key can do: fix every `prev` after an edit (macs kept or dropped)."""
    prev, out = audit.GENESIS, []
    for raw in lines:
        record = json.loads(raw)
        record["prev"] = prev
        line = json.dumps(record, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = audit.line_hash(line)
    return b"".join(out)


# ---- key and anchor --------------------------------------------------------------------------------------------
def test_a_keyed_anchored_log_verifies_and_every_tampering_fails(tmp_path, key_file):
    log, anchor = tmp_path / "audit.jsonl", tmp_path / "anchor" / "checkpoints.jsonl"
    lines = write(log, key_file, 8, anchor)
    assert all(b'"mac":"' in line for line in lines)
    intact = cli(log, "--key", key_file, "--anchor", anchor)
    assert intact.returncode == 0, intact.stderr
    assert "8 records, hash chain intact, macs valid" in intact.stdout
    checkpoints = [json.loads(line) for line in anchor.read_text().splitlines()]
    assert checkpoints[-1]["seq"] == 8 and checkpoints[-1]["head"] == audit.line_hash(lines[-1])

    cases = {
        "cut the last two lines": b"".join(lines[:-2]),
        "edit the last line": b"".join(lines[:-1] + [lines[-1].replace(b'"user-7"', b'"user-X"')]),
        "edit and recompute the chain without the key": recompute(
            lines[:-1] + [lines[-1].replace(b'"user-7"', b'"user-X"')]),
        "edit a middle line and recompute": recompute(lines[:3] + [lines[3].replace(b'"OK"', b'"NO"')] + lines[4:]),
    }
    for name, data in cases.items():
        tampered = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        tampered.write_bytes(data)
        result = cli(tampered, "--key", key_file, "--anchor", anchor)
        assert result.returncode == 1, (name, result.stdout)
        plain = cli(tampered)  # the hash chain alone cannot see these: that is why the key and anchor exist
        assert plain.returncode == 0, (name, plain.stderr)
    cut = cli(tmp_path / "cut_the_last_two_lines.jsonl", "--key", key_file, "--anchor", anchor)
    assert "ends at record 6" in cut.stderr and "the tail was cut" in cut.stderr
    recomputed = cli(tmp_path / "edit_and_recompute_the_chain_without_the_key.jsonl", "--key", key_file)
    assert recomputed.returncode == 1 and "line 8: its mac does not match" in recomputed.stderr

    # a forged checkpoint (signed without the key) is refused, and another key proves nothing
    forged = json.loads(anchor.read_text().splitlines()[-1])
    forged.update(seq=6, head=audit.line_hash(lines[5]))
    forged_anchor = tmp_path / "forged.jsonl"
    forged_anchor.write_text(json.dumps(forged) + "\n")
    assert cli(log, "--key", key_file, "--anchor", forged_anchor).returncode == 1
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32).hex().encode())
    other.chmod(0o600)
    wrong = cli(log, "--key", other)
    assert wrong.returncode == 1 and "line 1: its mac does not match" in wrong.stderr


def test_a_keyed_chain_continues_after_restart_and_modes_never_mix(tmp_path, key_file):
    log = tmp_path / "audit.jsonl"
    write(log, key_file, 3)
    write(log, key_file, 2)  # a restarted gateway continues the same keyed chain
    assert audit.check(log, audit.load_key(key_file)).records == 5
    with pytest.raises(ValueError, match="is keyed"):
        audit.AuditLog(log)
    plain = tmp_path / "plain.jsonl"
    write(plain, None, 2)
    with pytest.raises(ValueError, match="written without --audit-key"):
        audit.AuditLog(plain, key=audit.load_key(key_file))
    assert audit.verify(plain) is None  # an old, unkeyed file still verifies


def test_keys_must_be_secret_and_long(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("tooshort")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="at least 32"):
        audit.load_key(short)
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32).hex().encode())
    loose.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        audit.load_key(loose)
    with pytest.raises(ValueError, match="needs --audit-key"):
        audit.AuditTrail(tmp_path / "a.jsonl", anchor=str(tmp_path / "anchor.jsonl"))


def test_audit_files_are_0600_and_a_loose_file_is_tightened(tmp_path, key_file):
    log, anchor = tmp_path / "new" / "audit.jsonl", tmp_path / "anchor.jsonl"
    write(log, key_file, 1, anchor)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(anchor.stat().st_mode) == 0o600
    old = tmp_path / "old.jsonl"
    write(old, None, 1)
    old.chmod(0o644)
    write(old, None, 1)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and audit.verify(old) is None


def test_a_partial_line_left_by_a_crash_is_cut_back_and_the_repair_audited(tmp_path, key_file):
    log = tmp_path / "audit.jsonl"
    lines = write(log, key_file, 3)
    with open(log, "ab") as handle:
        handle.write(lines[0][:40])  # a crash in the middle of a write
    assert audit.check(log).message.startswith("line 4 is a partial line")
    lines = write(log, key_file, 1)
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records[3:]] == ["audit.repaired", "predict"] and records[3]["dropped_bytes"] == 40
    assert audit.check(log, audit.load_key(key_file)).ok


# ---- full disk: a real tmpfs -----------------------------------------------------------------------------------
def fill(folder: Path) -> Path:
    """Fill the filesystem to its last byte with a ballast file; -> the ballast (delete it to free the space)."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)
    return ballast


def test_a_full_disk_refuses_writes_and_leaves_no_partial_line(tmp_path, key_file):
    with tiny_tmpfs(tmp_path / "small", 64) as disk:
        log = disk / "audit.jsonl"
        trail = audit.AuditTrail(log, key_file=str(key_file))
        for i in range(5):
            trail.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK", "pad": "x" * 300})
        ballast = fill(disk)
        written, refused = 5, 0
        for i in range(40):  # the file's last page still has room for a line or so; then every write fails
            try:
                trail.append({"event": "predict", "identity": f"late-{i}", "outcome": "OK", "pad": "y" * 700})
                written += 1
            except audit.AuditUnavailable:
                refused += 1
            data = log.read_bytes()
            assert data.endswith(b"\n") and data.count(b"\n") == written, "a partial line was left behind"
        assert refused >= 30
        ballast.unlink()  # space returns: the same writer continues the same chain
        trail.append({"event": "predict", "identity": "after", "outcome": "OK"})
        trail.close()
        verdict = audit.check(log, audit.load_key(key_file))
        assert verdict.ok and verdict.records == written + 1, verdict.message


# ---- refusals below the core: one line each up to a rate, then a summary ------------------------------------------
def test_refusal_floods_are_audited_individually_up_to_a_rate_then_summarised(tmp_path):
    from types import SimpleNamespace

    from serving.gateway.core import RefusalAudit

    log = tmp_path / "audit.jsonl"
    gateway = SimpleNamespace(audit=audit.AuditLog(log))
    refusals = RefusalAudit(gateway, per_second=5)
    started = time.monotonic()
    for _ in range(500):
        refusals.refused("rest", "read_timeout", "127.0.0.1", "the request did not arrive within 1 s",
                         code="DEADLINE_EXCEEDED")
    elapsed = time.monotonic() - started
    refusals.close()
    gateway.audit.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    single = [r for r in records if r["event"] == "refused"]
    summaries = [r for r in records if r["event"] == "refused.summary"]
    windows = int(elapsed) + 2  # the flood may span a second boundary
    assert 5 <= len(single) <= 5 * windows
    assert len(single) + sum(s["count"] - s["audited_individually"] for s in summaries) == 500
    assert all(s["limit"] == "read_timeout" and s["outcome"] == "DEADLINE_EXCEEDED" for s in summaries)
    assert audit.verify(log) is None


# ---- syslog over TLS: Debian's rsyslog with rsyslog-gnutls ------------------------------------------------------
RSYSLOG_CONF = """
global(workDirectory="{work}" DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}" listenPortFileName="{port_file}")
action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
"""


class Rsyslog:
    """rsyslogd -n with its own config, work folder and pid file, TLS with the test CA, mutual TLS required."""

    def __init__(self, folder: Path, pki: dict):
        self.folder, self.pki = folder, pki
        self.out, self.port_file, self.pid_file = folder / "received.log", folder / "port", folder / "rsyslogd.pid"
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> "Rsyslog":
        work = self.folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        conf = self.folder / "rsyslog.conf"
        conf.write_text(RSYSLOG_CONF.format(work=work, ca=self.pki["ca"], cert=self.pki["server_cert"],
                                            key=self.pki["server_key"], port=self.port, port_file=self.port_file,
                                            out=self.out))
        self.process = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(self.pid_file)],
                                        stdout=open(self.folder / "rsyslogd.log", "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self._listening():
            assert self.process.poll() is None, (self.folder / "rsyslogd.log").read_text()
            time.sleep(0.05)
        assert self._listening(), "rsyslogd did not start listening within 20 s"
        return self

    def _listening(self) -> bool:
        """First start: port 0, rsyslog writes the port it bound; a restart reuses it and is up once it accepts."""
        import socket

        if not self.port:
            if self.port_file.is_file() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
            return bool(self.port)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def records(self) -> list[dict]:
        found = []
        for line in (self.out.read_text() if self.out.is_file() else "").splitlines():
            if '{"seq"' in line:
                found.append((line, json.loads(line[line.index('{"seq"'):])))
        return found


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog (+ rsyslog-gnutls) not installed: "
                    "scripts/install_system_deps.sh")
def test_rsyslog_over_tls_receives_the_events_and_the_backlog(tmp_path, key_file):
    from gateway_support import make_pki

    pki = make_pki(tmp_path / "pki")
    receiver = Rsyslog(tmp_path / "rsyslog", pki).start()
    url = f"syslog+tls://127.0.0.1:{receiver.port}"
    log = tmp_path / "audit" / "audit.jsonl"

    def open_trail():
        return audit.AuditTrail(log, key_file=str(key_file), anchor=url, syslog=url, syslog_ca=str(pki["ca"]),
                                syslog_cert=str(pki["client_cert"]), syslog_key=str(pki["client_key"]),
                                checkpoint_seconds=0.3)

    trail = open_trail()
    try:
        for i in range(5):
            trail.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK"})
        assert wait_for(lambda: len(receiver.records()) == 5), receiver.records()
        line, first = receiver.records()[0]
        # RFC 5424 as rsyslog parsed it: facility authpriv/security notice, APP-NAME and MSGID, the JSON record
        assert line.startswith("<85>1 ") and " medpipe-gateway " in line and " AUDIT - " in line, line
        assert first["seq"] == 1 and first["mac"] == json.loads(log.read_bytes().splitlines()[0])["mac"]

        receiver.stop()  # the receiver goes away: events keep being written, and wait in the audit file
        started = time.monotonic()
        for i in range(5, 9):
            trail.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK"})
        assert time.monotonic() - started < 1.0, "appending must never wait for the receiver"
        time.sleep(1.0)
        assert trail.shipper.pending() > 0
        trail.close()  # ... and the gateway restarts meanwhile: the backlog is still sent, from the saved offset
        trail = open_trail()
        for i in range(9, 12):
            trail.append({"event": "predict", "identity": f"user-{i}", "outcome": "OK"})
        receiver.start()
        assert wait_for(lambda: len(receiver.records()) >= 12, timeout=30), len(receiver.records())
    finally:
        trail.close()
        receiver.stop()
    received = [record["seq"] for _, record in receiver.records()]
    assert sorted(set(received)) == list(range(1, 13)), received
    # the receiver's file is also the anchor: verify against it, then against a cut copy of the log
    anchor = receiver.out
    assert "CHECKPOINT" in anchor.read_text()
    good = cli(log, "--key", key_file, "--anchor", anchor)
    assert good.returncode == 0, good.stderr
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-3]))
    result = cli(cut, "--key", key_file, "--anchor", anchor)
    assert result.returncode == 1 and "the tail was cut" in result.stderr


@pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog (+ rsyslog-gnutls) not installed: "
                    "scripts/install_system_deps.sh")
def test_rsyslog_receives_dicom_audit_messages(tmp_path, key_file):
    """--audit-syslog-format dicom: each line as a PS3.15 A.5 AuditMessage an ATNA repository can parse."""
    from xml.etree import ElementTree as ET

    from gateway_support import make_pki

    pki = make_pki(tmp_path / "pki")
    receiver = Rsyslog(tmp_path / "rsyslog", pki).start()
    log = tmp_path / "audit.jsonl"
    trail = audit.AuditTrail(log, key_file=str(key_file), syslog=f"syslog+tls://127.0.0.1:{receiver.port}",
                             syslog_ca=str(pki["ca"]), syslog_cert=str(pki["client_cert"]),
                             syslog_key=str(pki["client_key"]), syslog_format="dicom")
    try:
        trail.append({"event": "predict", "door": "rest", "identity": "dr-test", "client": "127.0.0.1",
                      "model": "brain_mri", "outcome": "OK"})
        trail.append({"event": "refused", "door": "rest", "limit": "body_size", "client": "127.0.0.1",
                      "outcome": "RESOURCE_EXHAUSTED"})

        def messages():
            text = receiver.out.read_text() if receiver.out.is_file() else ""
            return [ET.fromstring(line[line.index("<AuditMessage>"):]) for line in text.splitlines()
                    if "<AuditMessage>" in line]

        assert wait_for(lambda: len(messages()) == 2), receiver.out.read_text() if receiver.out.is_file() else ""
    finally:
        trail.close()
        receiver.stop()
    predict, refusal = messages()
    assert predict.find("EventIdentification/EventID").get("csd-code") == "110103"
    assert predict.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert predict.find("ActiveParticipant").get("UserID") == "dr-test"
    assert predict.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "brain_mri"
    assert refusal.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert refusal.find("EventIdentification").get("EventOutcomeIndicator") == "8"
    seqs = [obj.get("ParticipantObjectID") for message in (predict, refusal)
            for obj in message.findall("ParticipantObjectIdentification")
            if obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "seq"]
    assert seqs == ["1", "2"]
