"""Test and benchmark support for the PACS road: the gateway as a process with its DICOM port, the three standard
senders (dcmtk storescu, pynetdicom C-STORE, STOW-RS), and waiting for SRs in Orthanc by QIDO-RS."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional, Sequence

from serving.listen import LISTENING

ROOT = Path(__file__).resolve().parent.parent
DICOM_LINE = re.compile(r"medpipe gateway: DICOM (?P<aet>[^@\s]+)@(?P<host>[^:\s]+):(?P<port>\d+)")
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33")


def write_pacs_config(path: Path, spool: Path, stable_seconds: float = 1.5, calling=("STORESCU", "MEDPIPETEST"),
                      retry_max: float = 2.0, webhook: Optional[str] = None) -> Path:
    path.write_text(f"""spool: {spool}
webhook: {webhook or "null"}
calling_aets: [{", ".join(calling)}]
stable_seconds: {stable_seconds}
scan_seconds: 0.2
retry: {{initial_seconds: 0.5, max_seconds: {retry_max}}}
routes:
  - model: brain_mri
    modalities: [MR]
    sop_classes: [1.2.840.10008.5.1.4.1.1.4, 1.2.840.10008.5.1.4.1.1.4.1]
""")
    return path


class WebhookReceiver:
    """A tiny HTTP endpoint that records the JSON bodies POSTed to it (an app listening for results)."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/results"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class GatewayProcess:
    """`python -m serving.gateway` with the PACS road; every start writes a new log file (all are kept for the
    PHI scan). kill() is SIGKILL: no shutdown code runs."""

    def __init__(self, folder: Path, args: Sequence[str], env: Optional[dict] = None):
        self.folder, self.args, self.env = Path(folder), list(args), env or {}
        self.process: Optional[subprocess.Popen] = None
        self.logs: list[Path] = []
        self.rest = self.grpc = ""
        self.dicom_port = 0

    def start(self, timeout: float = 120) -> "GatewayProcess":
        log = self.folder / f"gateway-{len(self.logs) + 1}.log"
        self.logs.append(log)
        handle = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.gateway", "--grpc-port", "0", "--rest-port", "0", "--dicom-port", "0",
             *self.args], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **self.env})
        handle.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text()
            rest, dicom = LISTENING.search(text), DICOM_LINE.search(text)
            if rest and dicom:
                self.rest, self.grpc, self.dicom_port = rest["rest"], rest["grpc"], int(dicom["port"])
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited {self.process.returncode}: {text[-3000:]}")
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the gateway did not start within {timeout} s: {log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def metric(self, name: str, **labels: str) -> Optional[float]:
        with urllib.request.urlopen(f"{self.rest}/monitoring/prometheus/metrics", timeout=10) as response:
            text = response.read().decode()
        wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return None


# ---- senders ---------------------------------------------------------------------------------------------------
def storescu(port: int, files: Sequence[Path], calling: str = "STORESCU", called: str = "MEDPIPE") -> str:
    """dcmtk's storescu (Debian): the standard C-STORE client a PACS admin would use."""
    binary = shutil.which("storescu")
    if binary is None:
        import pytest

        pytest.skip("dcmtk's storescu is absent (scripts/install_system_deps.sh installs it)")
    result = subprocess.run([binary, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"storescu failed: {result.stdout[-2000:]} {result.stderr[-2000:]}"
    return result.stdout + result.stderr


def c_store(port: int, files: Sequence[Path], calling: str = "MEDPIPETEST", called: str = "MEDPIPE") -> list[int]:
    """pynetdicom C-STORE of each file in one association; returns the status codes."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title=calling)
    for uid, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(uid, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "the gateway's SCP refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def stow(rest: str, files: Sequence[Path], headers: Optional[dict] = None) -> tuple[int, dict]:
    """STOW-RS to the gateway's /dicom-web/studies: one multipart/related request."""
    import json

    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for path in files:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(Path(path).read_bytes())
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        f"{rest}/dicom-web/studies", data=body.getvalue(), method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# ---- results in Orthanc ----------------------------------------------------------------------------------------
def srs_in(pacs, study_uid: str) -> list[dict]:
    """QIDO-RS: the SR instances Orthanc holds under this StudyInstanceUID."""
    try:
        found = pacs.qido(f"/studies/{study_uid}/instances")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    return [item for item in found if (item.get("00080016") or {}).get("Value", [""])[0] in SR_CLASSES]


def wait_for_srs(pacs, study_uids: Sequence[str], timeout: float = 120.0) -> dict[str, float]:
    """Block until every study has at least one SR; -> {study: seconds waited}."""
    start = time.monotonic()
    arrived: dict[str, float] = {}
    while time.monotonic() - start < timeout:
        for uid in study_uids:
            if uid not in arrived and srs_in(pacs, uid):
                arrived[uid] = time.monotonic() - start
        if len(arrived) == len(study_uids):
            return arrived
        time.sleep(0.1)
    missing = [uid for uid in study_uids if uid not in arrived]
    raise AssertionError(f"{len(missing)} of {len(study_uids)} studies got no SR within {timeout:.0f} s")


def sr_finding(pacs, sr: dict) -> dict:
    """WADO-RS the SR (dicomweb-client) and read its finding (serving.gateway.results.read_finding)."""
    from dicomweb_client.api import DICOMwebClient

    from serving.gateway.results import read_finding

    uid = {key: sr[tag]["Value"][0] for key, tag in (("study", "0020000D"), ("series", "0020000E"),
                                                    ("sop", "00080018"))}
    dataset = DICOMwebClient(url=pacs.dicomweb).retrieve_instance(uid["study"], uid["series"], uid["sop"])
    return read_finding(dataset)


# One C-STORE in a process of its own (`python -c SENDER PORT FILE` prints the status): the gateway's memory is then
# measured without the sender's copy of the instance in the same process.
SENDER = """
import sys
from pynetdicom import AE
ae = AE(ae_title="MEDPIPETEST")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="MEDPIPE")
assert assoc.is_established
print(int(assoc.send_c_store(sys.argv[2]).Status))
assoc.release()
"""
