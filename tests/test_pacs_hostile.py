"""The PACS road against hostile and failing conditions (issue 34): a full spool disk (a real tmpfs), a study that
crashes the gateway while it is processed (a real SIGKILL, N times), a 300 MB C-STORE (streamed, measured), and
DICOM TLS on the way in and out (pynetdicom peers with and without a trusted client certificate).

The full-disk test mounts a 64 MB tmpfs (root in this sandbox); it is skipped, saying why, where mounting is not
permitted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

import fixtures_adversarial as fa
from conftest import TEST_DEID_KEY
from pacs_support import SENDER
from serving.gateway import results
from serving.gateway.pacs_config import PacsConfig, Route

MR = "1.2.840.10008.5.1.4.1.1.4"
DEID_KEY = b"a-test-key-of-enough-length"
BOUNDARY = "medpipe-test-boundary"


# ---- helpers --------------------------------------------------------------------------------------------------
def big_mr(target: Path, megabytes: float, study_uid: str = "", sop_uid: str = "") -> Path:
    """An MR instance of about `megabytes` (16-bit zeros), its Pixel Data written in 1 MiB pieces (never whole in
    this process's memory)."""
    import struct

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    columns = 1024 if megabytes < 64 else 8192  # Rows is a US (at most 65535)
    rows = max(1, int(megabytes * 2**20 / (columns * 2)))
    study_uid = study_uid or f"2.25.{uuid.uuid4().int}"
    sop_uid = sop_uid or f"{study_uid}.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.1"
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "Hostile^Test", "HOSTILE-1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.save_as(target, enforce_file_format=True)
    size = rows * columns * 2
    with open(target, "ab") as handle:
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
        piece = bytes(2**20)
        for start in range(0, size, len(piece)):
            handle.write(piece[:min(len(piece), size - start)])
    return target


def multipart(paths: list[Path]) -> bytes:
    body = b""
    for path in paths:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def gateway_options(tmp_path: Path, audit: Path, jwt_public: Path) -> Namespace:
    return Namespace(upstream="127.0.0.1:9", audit_log=str(audit), jwt_key=str(jwt_public), allow_anonymous=False,
                     config=None, request_log=None, drift_baseline=None, model_repository=None, upstream_ca=None,
                     upstream_cert=None, upstream_key=None)


def c_store_statuses(port: int, files: list[Path], tls_args=None, calling: str = "MEDPIPETEST") -> list[int]:
    """pynetdicom SCU: every file in one association; [] when the association is refused."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(MR, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDPIPE", tls_args=tls_args)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leftovers(spool: Path) -> list[Path]:
    """Half-written files (temporaries, sidecars without their instance) anywhere in the spool."""
    found = [p for p in spool.rglob("*.tmp")]
    found += [p for p in spool.rglob("*.json") if "incoming" in p.parts and not p.with_suffix(".dcm").exists()]
    return found


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MB file system (tmpfs), unmounted afterwards."""
    from gateway_support import tiny_tmpfs

    with tiny_tmpfs(tmp_path / "disk", 64 * 1024) as folder:
        yield folder


# ---- full disk ------------------------------------------------------------------------------------------------
def test_full_spool_disk_answers_a700_and_507_and_accepts_again_once_space_returns(tmp_path, small_disk):
    from fastapi.testclient import TestClient

    from gateway_support import make_pki, token
    from serving.gateway.core import Gateway
    from serving.gateway.dimse import start_scp
    from serving.gateway.pacs import PacsService
    from serving.gateway.rest import build_app

    pki = make_pki(tmp_path / "pki")
    audit = tmp_path / "audit.jsonl"
    gateway = Gateway(gateway_options(tmp_path, audit, pki["jwt_public"]))
    spool = small_disk / "spool"
    config = PacsConfig(spool=str(spool), stable_seconds=3600, max_instance_mb=8, reserve_mb=16,
                        calling_aets=("MEDPIPETEST",), routes=(Route("brain_mri", ("MR",)),))
    service = gateway.pacs = PacsService(gateway, config, results.parse_destination("dicomweb+http://127.0.0.1:9/x"),
                                         DEID_KEY)
    scp = start_scp(service, 0, "MEDPIPE", "127.0.0.1")
    client = TestClient(build_app(gateway))
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
               "Authorization": f"Bearer {token(pki['jwt_private'], scope='predict:brain_mri')}"}
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    try:
        too_large = client.post("/dicom-web/studies", content=multipart([big_mr(inputs / "9mb.dcm", 9)]),
                                headers=headers)
        assert too_large.status_code == 413 and list(service.spool.receiving.iterdir()) == []
        # fill the disk with 4 MB instances over DIMSE until the reserve refuses one: A700, not C000
        statuses = []
        for index in range(20):
            statuses += c_store_statuses(scp.server_address[1], [big_mr(inputs / f"{index}.dcm", 4)])
            if statuses[-1] != 0:
                break
        accepted = statuses.count(0)
        assert statuses[-1] == 0xA700 and 8 <= accepted <= 12, statuses  # 64 MB - 16 MB reserve = about 12 x 4 MB
        assert service.spool.pending_instances() == accepted
        refused = client.post("/dicom-web/studies", content=multipart([big_mr(inputs / "stow.dcm", 4)]),
                              headers=headers)
        assert refused.status_code == 507 and "reserve" in refused.json()["error"]
        assert client.post("/dicom-web/studies", content=b"x", headers={**headers, "Authorization": ""}
                           ).status_code == 401  # unauthenticated: never a 500 because the disk is full

        # a write that fails half-way (no reserve, an instance larger than the space left): A700/507, no partial file
        service.config = replace(config, reserve_mb=0)
        free = service.spool.free_bytes()
        ballast = small_disk / "ballast"
        ballast.write_bytes(bytes(max(0, free - 2 * 2**20)))  # leave 2 MB
        assert c_store_statuses(scp.server_address[1], [big_mr(inputs / "half.dcm", 4)]) == [0xA700]
        half = client.post("/dicom-web/studies", content=multipart([big_mr(inputs / "half2.dcm", 4)]),
                           headers=headers)
        assert half.status_code == 507
        assert leftovers(spool) == [] and service.spool.pending_instances() == accepted
        assert list(service.spool.receiving.iterdir()) == []

        # space returns: new instances are accepted by both doors again
        ballast.unlink()
        for path in sorted(spool.rglob("*.dcm"))[:4]:  # the operator frees space
            path.unlink()
        service.config = config
        assert c_store_statuses(scp.server_address[1], [big_mr(inputs / "after.dcm", 4)]) == [0]
        after = client.post("/dicom-web/studies", content=multipart([big_mr(inputs / "after2.dcm", 1)]),
                            headers=headers)
        assert after.status_code == 200
        assert service.spool.pending_instances() == accepted - 4 + 2
    finally:
        scp.shutdown()
        gateway.close()
    records = audit_records(audit)
    refusals = [r for r in records if r.get("event", "").startswith("pacs.") and
                "disk_full" in (r.get("outcome"), r.get("reason"))]
    assert len(refusals) >= 4  # the reserve (DIMSE, STOW-RS) and the half-way writes (DIMSE, STOW-RS) are audited
    assert [r["door"] for r in records if r.get("reason") == "too_large"] == ["dicomweb"]
    assert "HOSTILE-1" not in audit.read_text() and "Hostile" not in audit.read_text()


def test_a_full_audit_disk_refuses_rest_requests_with_507_not_500(tmp_path, small_disk):
    """Spool and audit log on one full file system (the issue's finding): REST requests, authenticated or not,
    get 507 (retryable) and the DIMSE door A700; nothing answers 500 or C000."""
    from fastapi.testclient import TestClient

    from gateway_support import make_pki, token
    from serving.gateway.core import Gateway
    from serving.gateway.dimse import start_scp
    from serving.gateway.pacs import PacsService
    from serving.gateway.rest import build_app

    pki = make_pki(tmp_path / "pki")
    gateway = Gateway(gateway_options(tmp_path, small_disk / "audit.jsonl", pki["jwt_public"]))
    config = PacsConfig(spool=str(small_disk / "spool"), stable_seconds=3600, max_instance_mb=8, reserve_mb=0,
                        calling_aets=("MEDPIPETEST",), routes=(Route("brain_mri", ("MR",)),))
    service = gateway.pacs = PacsService(gateway, config, results.parse_destination("dicomweb+http://127.0.0.1:9/x"),
                                         DEID_KEY)
    scp = start_scp(service, 0, "MEDPIPE", "127.0.0.1")
    client = TestClient(build_app(gateway), raise_server_exceptions=False)
    small = big_mr(tmp_path / "small.dcm", 0.5)
    try:
        with open(small_disk / "ballast", "wb", buffering=0) as handle:  # fill the disk to the last byte
            for piece in (2**20, 4096, 1):
                try:
                    while True:
                        handle.write(bytes(piece))
                except OSError:
                    pass
        answers = [client.post("/v1/models/brain_mri:predict", json={"instances": []}).status_code,
                   client.get("/v1/models/brain_mri").status_code,
                   client.post("/dicom-web/studies", content=b"x", headers={
                       "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                       "Authorization": f"Bearer {token(pki['jwt_private'])}"}).status_code]
        assert answers == [507, 507, 507], answers
        assert c_store_statuses(scp.server_address[1], [small]) == [0xA700]
    finally:
        scp.shutdown()
        (small_disk / "ballast").unlink(missing_ok=True)
        gateway.close()


# ---- C-STORE streaming ----------------------------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_a_300_mb_c_store_streams_to_disk_and_is_refused_without_buffering(tmp_path):
    """The SCP runs in this process; the sender is another process. RSS is sampled every 20 ms while it sends."""
    from serving.gateway.core import Gateway
    from serving.gateway.dimse import start_scp
    from serving.gateway.pacs import PacsService
    from gateway_support import make_pki

    pki = make_pki(tmp_path / "pki")
    gateway = Gateway(gateway_options(tmp_path, tmp_path / "audit.jsonl", pki["jwt_public"]))
    config = PacsConfig(spool=str(tmp_path / "spool"), stable_seconds=3600, max_instance_mb=256, reserve_mb=64,
                        calling_aets=("MEDPIPETEST",), routes=(Route("brain_mri", ("MR",)),))
    service = PacsService(gateway, config, results.parse_destination("dicomweb+http://127.0.0.1:9/x"), DEID_KEY)
    scp = start_scp(service, 0, "MEDPIPE", "127.0.0.1")
    growth = {}
    try:
        for name, megabytes in (("refused", 300), ("accepted", 200)):
            path = big_mr(tmp_path / f"{name}.dcm", megabytes)
            baseline, peak, stop = rss_mb(), [0.0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mb())
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            sent = subprocess.run([sys.executable, "-c", SENDER, str(scp.server_address[1]), str(path)],
                                  capture_output=True, text=True, timeout=300)
            stop.set()
            sampler.join()
            assert sent.returncode == 0, sent.stderr[-2000:]
            growth[name] = (int(sent.stdout.strip()), peak[0] - baseline)
            path.unlink()
    finally:
        scp.shutdown()
        gateway.close()
    print(f"RSS growth of the receiving process: {growth}")
    assert growth["refused"][0] == 0xA700 and growth["accepted"][0] == 0
    assert service.spool.pending_instances() == 1
    assert growth["refused"][1] < 100 and growth["accepted"][1] < 100, growth  # MB; it was +600 MB buffered whole


# ---- poison quarantine ----------------------------------------------------------------------------------------
def empty_repository(tmp_path: Path) -> Path:
    """A model repository with no model: the PACS doors need one (they never guess labels); these tests never get as
    far as a model's assets."""
    folder = tmp_path / "repo"
    folder.mkdir(exist_ok=True)
    return folder


def hung_model_server() -> socket.socket:
    """A 'model server' that accepts TCP connections and never answers: the gateway's predict call hangs in it,
    so the gateway is surely inside processing when it is killed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


def hung_pacs_gateway(tmp_path: Path, spool: Path, upstream: socket.socket, *config_lines: str):
    """A gateway (not started) whose PACS road quarantines after 3 attempts, in front of `upstream`."""
    from pacs_support import GatewayProcess

    config = tmp_path / "pacs.yaml"
    config.write_text("\n".join([f"spool: {spool}", "calling_aets: [MEDPIPETEST]",
                                  "aggregation: max  # no model behind it: the study rule is chosen explicitly",
                                  "stable_seconds: 0.2", "scan_seconds: 0.2", "quarantine_after: 3", *config_lines,
                                  "routes: [{model: brain_mri, modalities: [MR]}]"]) + "\n")
    return GatewayProcess(tmp_path, ["--upstream", f"127.0.0.1:{upstream.getsockname()[1]}", "--allow-anonymous",
                                     "--audit-log", str(tmp_path / "audit.jsonl"),
                                     "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web",
                                     "--model-repository", str(empty_repository(tmp_path)),
                                     "--pacs-config", str(config)], env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})


def attempts(spool: Path) -> list[int]:
    return [json.loads(p.read_text())["attempts"] for p in (spool / "incoming").rglob("*.attempts")]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


@pytest.mark.slow
def test_a_study_that_kills_the_gateway_is_quarantined_after_n_crashes_and_never_replayed(tmp_path):
    from pacs_support import c_store

    upstream = hung_model_server()
    spool = tmp_path / "spool"
    gateway = hung_pacs_gateway(tmp_path, spool, upstream, "deadline_seconds: 600")
    mr = tmp_path / "mr.dcm"
    planted = fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], mr, study_uid="2.25.3401",
                                    series_uid="2.25.34011", sop_uid="2.25.340111")
    try:
        gateway.start()
        assert c_store(gateway.dicom_port, [mr]) == [0]
        for crash in (1, 2, 3):  # the attempt is on disk before processing: each SIGKILL during it counts
            wait_until(lambda: attempts(spool) == [crash], 60, f"attempt {crash} was not recorded")
            time.sleep(0.3)  # inside predict (hung upstream)
            gateway.kill()
            gateway.start()
        folder = wait_until(lambda: list((spool / "quarantine").rglob("reason.json")), 60,
                            "the study was not quarantined")[0].parent
        reason = json.loads((folder / "reason.json").read_text())
        assert reason["attempts"] == 3 and reason["model"] == "brain_mri" and "stopped" in reason["last_error"]
        assert len(list(folder.glob("*.dcm"))) == 1 and not list((spool / "incoming").rglob("*.dcm"))
        assert gateway.metric("medpipe_pacs_quarantined_total", model="brain_mri") == 1
        assert gateway.metric("medpipe_pacs_queue_length", stage="quarantine") == 1
        gateway.kill()  # a restart over the quarantined study stays up and never replays it
        gateway.start()
        time.sleep(2)
        assert gateway.process.poll() is None and attempts(spool) == []
        assert len(list((spool / "quarantine").rglob("*.dcm"))) == 1
    finally:
        gateway.kill()
        upstream.close()
    records = audit_records(tmp_path / "audit.jsonl")
    quarantined = [r for r in records if r["event"] == "pacs.quarantined"]
    assert len(quarantined) == 1 and quarantined[0]["attempts"] == 3
    text = "\n".join(path.read_text() for path in [tmp_path / "audit.jsonl", folder / "reason.json", *gateway.logs])
    leaked = [value for value in planted + ["2.25.3401", "2.25.340111"] if value and value in text]
    assert not leaked, leaked


@pytest.mark.slow
def test_a_restart_over_a_spool_holding_a_deflated_bomb_stays_up(tmp_path):
    """Issue 34: a 1 GiB deflated bomb spooled before the doors checked whole deflated streams (planted here as an
    older gateway would have spooled it) killed every restart 33 s later. Now its header is read bounded, it is
    refused without being inflated, and it ends in quarantine; the gateway stays up, grows < 1 GB, answers."""
    from gateway_support import tree_rss_mb
    from serving.gateway.spool import Spool

    upstream = hung_model_server()  # never reached: the bomb fails before any model call
    spool = tmp_path / "spool"
    bomb = fa.deflated_dicom(256, 256, pixel_bytes=2**30, zeros=True, level=9)
    assert len(bomb) < 2 * 2**20  # a small file ...
    Spool(spool).put("brain_mri", "2.25.3402", "2.25.34021", "2.25.340211", bomb, "dimse", "ORTHANC")
    gateway = hung_pacs_gateway(tmp_path, spool, upstream)
    try:
        gateway.start()
        before = tree_rss_mb(gateway.process.pid)
        peak = before
        def settled():
            nonlocal peak
            peak = max(peak, tree_rss_mb(gateway.process.pid))
            return list((spool / "quarantine").rglob("*.dcm")) + list((spool / "rejected").rglob("*.dcm"))
        wait_until(settled, 60, "the spooled bomb was neither quarantined nor rejected")
        time.sleep(2)
        assert gateway.process.poll() is None, "the gateway died over its own spool"
        assert not list((spool / "incoming").rglob("*.dcm"))
        assert peak - before < 1024, f"the process tree grew by {peak - before:.0f} MB"
        assert gateway.metric("medpipe_pacs_queue_length", stage="incoming") == 0  # the probe: it answers
    finally:
        gateway.kill()
        upstream.close()


def test_failures_that_are_not_the_studys_do_not_bring_quarantine_closer(tmp_path):
    """The model server is down (UNAVAILABLE): the attempt is given back, so an outage never quarantines."""
    from gateway_support import make_pki
    from serving.gateway.core import Gateway
    from serving.gateway.pacs import PacsService
    from serving.gateway.spool import Spool

    pki = make_pki(tmp_path / "pki")
    gateway = Gateway(gateway_options(tmp_path, tmp_path / "audit.jsonl", pki["jwt_public"]))
    config = PacsConfig(spool=str(tmp_path / "spool"), stable_seconds=0, quarantine_after=2,
                        routes=(Route("brain_mri", ("MR",)),))
    clock = [time.time()]
    service = PacsService(gateway, config, results.parse_destination("dicomweb+http://127.0.0.1:9/x"), DEID_KEY,
                          clock=lambda: clock[0])
    mr = tmp_path / "mr.dcm"
    fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], mr, study_uid="2.25.3402", series_uid="2.25.34021",
                          sop_uid="2.25.340211")
    try:
        assert service.receive(mr.read_bytes(), "dimse", "MEDPIPETEST").status == 0
        for _ in range(4):  # the upstream 127.0.0.1:9 refuses connections: UNAVAILABLE
            clock[0] += 3600
            assert service.process_ready() == 0
        assert attempts(tmp_path / "spool") == [0] and service.spool.quarantined_instances() == 0
        spool = Spool(tmp_path / "spool")
        instance = spool.studies()[0].instances[0]
        assert "UNAVAILABLE" in spool.last_error(instance)
    finally:
        gateway.close()


# ---- DICOM TLS ------------------------------------------------------------------------------------------------
class TlsPacs:
    """A pynetdicom Storage SCP over TLS that requires client certificates from `ca` (the hospital PACS)."""

    def __init__(self, pki: dict):
        import ssl

        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki["server_cert"], pki["server_key"])
        context.load_verify_locations(pki["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
        self.received: list[str] = []
        ae = AE(ae_title="TLSPACS")
        ae.supported_contexts = StoragePresentationContexts

        def store(event):
            self.received.append(str(event.dataset.SOPInstanceUID))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context,
                                      evt_handlers=[(evt.EVT_C_STORE, store)])
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()


def client_tls(pki: dict, cert: str = "client_cert", key: str = "client_key"):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(pki[cert], pki[key])
    return (context, "localhost")


def test_dicom_tls_in_with_a_trusted_client_certificate_and_results_out_over_tls(tmp_path):
    from gateway_support import make_pki
    from serving.gateway.core import Gateway
    from serving.gateway.dimse import server_tls_context, start_scp
    from serving.gateway.pacs import PacsService

    pki = make_pki(tmp_path / "pki")
    gateway = Gateway(gateway_options(tmp_path, tmp_path / "audit.jsonl", pki["jwt_public"]))
    pacs = TlsPacs(pki)
    destination = results.parse_destination(f"dimse+tls://TLSPACS@127.0.0.1:{pacs.port}", ca=str(pki["ca"]),
                                            cert=str(pki["client_cert"]), key=str(pki["client_key"]))
    config = PacsConfig(spool=str(tmp_path / "spool"), stable_seconds=3600, calling_aets=("MEDPIPETEST",),
                        routes=(Route("brain_mri", ("MR",)),))
    service = PacsService(gateway, config, destination, DEID_KEY)
    scp = start_scp(service, 0, "MEDPIPE", "127.0.0.1",
                    server_tls_context(str(pki["server_cert"]), str(pki["server_key"]), str(pki["ca"])))
    mr = tmp_path / "mr.dcm"
    fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], mr, study_uid="2.25.3403", series_uid="2.25.34031",
                          sop_uid="2.25.340311")
    port = scp.server_address[1]
    try:
        # in: a trusted client certificate stores; no certificate, a rogue one, or plain DIMSE are refused
        assert c_store_statuses(port, [mr], tls_args=client_tls(pki)) == [0]
        assert service.spool.pending_instances() == 1
        for refused in (client_tls(pki, cert=""), client_tls(pki, "rogue_client_cert", "rogue_client_key")):
            started = time.monotonic()
            assert c_store_statuses(port, [mr], tls_args=refused) == []
            assert time.monotonic() - started < 30
        assert c_store_statuses(port, [mr]) == []  # plain DIMSE on a TLS port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # never start their handshake
        started = time.monotonic()
        assert c_store_statuses(port, [mr], tls_args=client_tls(pki)) == [0]  # the door still serves, at once
        assert time.monotonic() - started < 5
        for connection in silent:
            connection.close()

        # out: the result reaches the PACS over TLS (the delivery loop's own path); without a client
        # certificate the PACS refuses it and the job stays in the outbox for a retry
        import pydicom

        finding = results.Finding("glioma", 0.9, "brain_mri", 1, {"glioma": 0.9}, None, 1)
        sr = results.build_sr([pydicom.dcmread(mr)], finding, sr_uid="2.25.3403999", series_uid="2.25.34039",
                              codes={})
        service.destination = replace(destination, cert=None, key=None)
        service.spool.add_job("tls-job", {"sr.dcm": results.to_bytes(sr)},
                              {"model": "brain_mri", "version": 1, "study": "x", "created": time.time()})
        assert service.deliver_ready() == 0 and pacs.received == [] and service.spool.outbox_length() == 1
        service.destination = destination
        service._backoff.clear()  # the retry is due now
        assert service.deliver_ready() == 1
        assert pacs.received == ["2.25.3403999"] and service.spool.outbox_length() == 0
    finally:
        scp.shutdown()
        pacs.close()
        gateway.close()


def test_dimse_tls_destination_needs_its_ca():
    from medpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="--results-ca"):
        results.parse_destination("dimse+tls://PACS@pacs.example:2762")
    parsed = results.parse_destination("dimse+tls://PACS@pacs.example:2762", ca="/etc/ca.pem")
    assert parsed.tls and parsed.describe() == "dimse+tls://PACS@pacs.example:2762"


def test_the_gateway_command_serves_dicom_tls_and_refuses_the_flag_without_certificates(tmp_path):
    """`medpipe gateway --dicom-tls` end to end (the options as an operator passes them)."""
    from gateway_support import make_pki
    from pacs_support import GatewayProcess
    from serving.gateway.server import build_parser, check_options
    from medpipe.errors import ConfigError

    pki = make_pki(tmp_path / "pki")
    with pytest.raises(ConfigError, match="--dicom-tls"):
        check_options(build_parser().parse_args(["--upstream", "x:1", "--audit-log", "a", "--allow-anonymous",
                                                 "--dicom-port", "0", "--dicom-tls"]))
    config = tmp_path / "pacs.yaml"
    config.write_text(f"spool: {tmp_path / 'spool'}\ncalling_aets: [MEDPIPETEST]\naggregation: max\nstable_seconds: 3600\n"
                      "routes: [{model: brain_mri, modalities: [MR]}]\n")
    gateway = GatewayProcess(tmp_path, [
        "--upstream", "127.0.0.1:9", "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
        "--client-ca", str(pki["ca"]), "--audit-log", str(tmp_path / "audit.jsonl"), "--dicom-tls",
        "--results-to", "dimse+tls://PACS@127.0.0.1:9", "--results-ca", str(pki["ca"]),
        "--model-repository", str(empty_repository(tmp_path)), "--pacs-config", str(config)],
        env={"MEDPIPE_DEID_KEY": TEST_DEID_KEY})
    mr = tmp_path / "mr.dcm"
    fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], mr, study_uid="2.25.3404", series_uid="2.25.34041",
                          sop_uid="2.25.340411")
    try:
        gateway.start()
        assert c_store_statuses(gateway.dicom_port, [mr], tls_args=client_tls(pki)) == [0]
        assert c_store_statuses(gateway.dicom_port, [mr], tls_args=client_tls(pki, cert="")) == []
        assert c_store_statuses(gateway.dicom_port, [mr]) == []
        assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == 1
    finally:
        gateway.kill()
