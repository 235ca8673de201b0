"""The gateway's audit trail under attack and failure (issue 34), on a real gateway in front of `medpipe serve`:

- every refusal is audited: 413, 408, connections shed at the limit, 429, over-size gRPC messages, DIMSE association rejects;
- a header value planted in real DICOMs reaches no error, audit line, log or viewer page;
- a full disk (the audit log on a real 1 MB tmpfs) answers 507 / RESOURCE_EXHAUSTED, never serves unaudited, and
  the keyed chain verifies against its anchor once space returns.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, SAMPLE
from gateway_support import make_pki, start_gateway, stop, token
from gateway_support import tiny_tmpfs
from test_audit_trail import fill

tf = pytest.importorskip("tensorflow")
httpx = pytest.importorskip("httpx")
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from test_serving import MODEL, publish, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow

CT = SAMPLE / "dicom" / "CT-MONO2-16-brain.dcm"
JPEG = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[0]
DICOM_LINE = re.compile(r"medpipe gateway: DICOM (?P<aet>[^@\s]+)@(?P<host>[^:\s]+):(?P<port>\d+)")


@pytest.fixture(scope="module")
def gwa(trained_sample_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway_audit")
    repo = base / "models"
    publish(trained_sample_run, repo, "--label", "stable")
    upstream, upstream_grpc, _ = start_server(repo, base)
    pki = make_pki(base / "pki")
    key = base / "audit.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    config = base / "gateway.yaml"
    config.write_text(json.dumps({"limits": {
        "max_body_mb": 1, "rate_per_minute": 120, "max_concurrent": 4, "queue_timeout_s": 5, "header_timeout_s": 1,
        "idle_timeout_s": 5, "max_connections": 4, "default_deadline_s": 20}}))
    pacs = base / "pacs.yaml"
    pacs.write_text(json.dumps({"spool": str(base / "spool"), "calling_aets": ["ORTHANC"]}))
    with tiny_tmpfs(base / "disk", 1024) as disk:
        audit_log, anchor = disk / "audit.jsonl", base / "anchor" / "checkpoints.jsonl"
        args = ["--upstream", upstream_grpc, "--allow-anonymous", "--jwt-key", str(pki["jwt_public"]),
                "--audit-log", str(audit_log), "--audit-key", str(key), "--audit-anchor", str(anchor),
                "--audit-checkpoint-seconds", "0.5", "--config", str(config), "--model-repository", str(repo),
                "--dicom-port", "0", "--results-to", "dimse://PACS@127.0.0.1:9", "--pacs-config", str(pacs)]
        process, grpc_address, rest = start_gateway(args, base / "gateway.log")
        dicom_port = int(DICOM_LINE.search((base / "gateway.log").read_text())["port"])
        channel = grpc.insecure_channel(grpc_address, options=[("grpc.max_send_message_length", 64 * 2**20)])
        try:
            yield {"rest": rest, "grpc": grpc_address, "pki": pki, "key": key, "audit": audit_log, "anchor": anchor,
                   "disk": disk, "log": base / "gateway.log", "dicom_port": dicom_port, "base": base,
                   "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
        finally:
            channel.close()
            assert stop(process) == 0
            stop_server(upstream)


def records(gwa) -> list[dict]:
    return [json.loads(line) for line in gwa["audit"].read_text().splitlines()]


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def grpc_request(images: list[bytes]):
    message = predict_pb2.PredictRequest()
    message.model_spec.name = MODEL
    message.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return message


def raw_http(gwa, data: bytes, wait: float = 10) -> bytes:
    host, port = gwa["rest"].split("://")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        while True:
            try:
                part = conn.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not part:
                break
            received += part
    return received


def verify_cli(gwa) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe.cli", "audit", "verify", str(gwa["audit"]), "--key",
                           str(gwa["key"]), "--anchor", str(gwa["anchor"])], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def refused(gwa, door: str, limit: str) -> list[dict]:
    return [r for r in records(gwa) if r.get("door") == door and r.get("limit") == limit]


def test_every_refusal_is_audited(gwa):
    url = f"{gwa['rest']}/v1/models/{MODEL}:predict"
    # 413: a body over max_body_mb (1 MB)
    answer = httpx.post(url, content=b"{" + b" " * (2 * 2**20) + b"}", timeout=30,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert refused(gwa, "rest", "body_size")[-1]["outcome"] == "RESOURCE_EXHAUSTED"
    # 408: headers that never finish (header_timeout_s 1)
    started = time.monotonic()
    reply = raw_http(gwa, b"POST /v1/models/x:predict HTTP/1.1\r\nHost: gateway\r\n")
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    assert refused(gwa, "rest", "read_timeout")[-1]["outcome"] == "DEADLINE_EXCEEDED"
    # max_connections held by idle sockets (the config's 4, raised to the guard's floor of 16): the connection guard
    # closes the oldest idle one so that the new request is served (a flood of idle sockets cannot lock callers
    # out), and that refusal is audited
    host, port = gwa["rest"].split("://")[1].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.2)
        reply = raw_http(gwa, b"GET /v1/models/brain_mri HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        readable, _, _ = select.select(idle, [], [], 2)
        shed = [sock for sock in readable if sock.recv(1) == b""]  # closed by the gateway: EOF
    finally:
        for sock in idle:
            sock.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert len(shed) >= 1
    time.sleep(0.2)
    assert refused(gwa, "rest", "connections")[-1]["outcome"] == "UNAVAILABLE"
    # 429: one identity over rate_per_minute (120: a burst of 20)
    flood = {"Authorization": "Bearer " + token(gwa["pki"]["jwt_private"], sub="flood-client")}
    statuses = [httpx.post(url, json={"instances": [b64(b"not an image")]}, headers=flood, timeout=30).status_code
                for _ in range(30)]
    assert 429 in statuses
    limited = [r for r in records(gwa) if r.get("identity") == "flood-client" and r.get("limit") == "rate"]
    assert len(limited) == statuses.count(429) and limited[0]["outcome"] == "RESOURCE_EXHAUSTED"
    # over-size gRPC messages: over the limit (refused by the gateway, audited) and far over (by gRPC's transport)
    with pytest.raises(grpc.RpcError) as over:
        gwa["predict"].Predict(grpc_request([b"\0" * (1536 * 1024)]), timeout=30)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in over.value.details()
    assert refused(gwa, "grpc", "body_size")[-1]["outcome"] == "RESOURCE_EXHAUSTED"
    # DIMSE: an association from a calling AE title that is not on the allow-list
    from pynetdicom import AE

    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context("1.2.840.10008.1.1")
    association = intruder.associate("127.0.0.1", gwa["dicom_port"], ae_title="MEDPIPE")
    assert association.is_rejected
    time.sleep(0.3)
    rejected = [r for r in records(gwa) if r["event"] == "dimse.association_rejected"]
    assert rejected and rejected[-1]["limit"] == "calling_aet" and rejected[-1]["client"] == "127.0.0.1"
    assert "INTRUDER" not in gwa["audit"].read_text()
    # the trail stays whole: keyed chain and checkpoints
    time.sleep(1.0)
    result = verify_cli(gwa)
    assert result.returncode == 0, result.stderr


PLANTED = {"PhotometricInterpretation": "ZZPHOTOQX", "Modality": "ZZMODQX", "BodyPartExamined": "ZZBODYQX",
           "SeriesDescription": "ZZSERIESQX", "ImageType": "ZZTYPEQX"}


def planted_dicoms(folder: Path) -> list[Path]:
    """Real DICOMs with unusual values in their headers: one the decoder refuses for it, one it accepts."""
    import pydicom

    made = []
    for name, photometric in (("odd_photometric.dcm", PLANTED["PhotometricInterpretation"]),
                              ("odd_headers.dcm", "MONOCHROME2")):
        ds = pydicom.dcmread(CT)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.PhotometricInterpretation = photometric
        ds.save_as(folder / name)
        made.append(folder / name)
    return made


def test_no_dicom_header_value_in_errors_audit_log_or_viewer(gwa, tmp_path):
    odd, accepted = planted_dicoms(tmp_path)
    url = f"{gwa['rest']}/v1/models/{MODEL}:predict"
    texts = []
    refused_rest = httpx.post(url, json={"instances": [b64(odd.read_bytes())]}, timeout=60)
    assert refused_rest.status_code == 400 and "unsupported photometric interpretation" in refused_rest.text
    texts.append(refused_rest.text)
    served = httpx.post(url, json={"instances": [b64(accepted.read_bytes())]}, timeout=60)
    assert served.status_code == 200, served.text
    texts.append(served.text)
    with pytest.raises(grpc.RpcError) as refused_grpc:
        gwa["predict"].Predict(grpc_request([odd.read_bytes()]), timeout=60)
    assert refused_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    texts.append(refused_grpc.value.details())
    # the viewer (anonymous on loopback): its upload page shows the refusal
    with httpx.Client(base_url=gwa["rest"], timeout=60, follow_redirects=True) as client:
        home = client.get("/viewer/")
        assert home.status_code == 200, home.text[:500]
        csrf = re.search(r'name="csrf" value="([^"]+)"', home.text)[1]
        page = client.post("/viewer/predict", data={"csrf": csrf, "model": MODEL},
                           files=[("images", ("scan.dcm", odd.read_bytes(), "application/dicom"))])
        assert "unsupported photometric interpretation" in page.text, page.text[-2000:]
        texts.append(page.text)
    time.sleep(0.5)
    texts += [gwa["audit"].read_text(), gwa["log"].read_text()]
    photometric_refusals = [r for r in records(gwa) if "photometric" in str(r.get("error", ""))]
    assert len(photometric_refusals) >= 3  # REST, gRPC, viewer
    for text in texts:
        leaked = [value for value in PLANTED.values() if value in text]
        assert not leaked, f"{leaked} in {text[:300]}"


def until_refused(call, refused, limit: int = 30) -> list:
    """Answers of `call` until three in a row are `refused` (the audit file's last page takes a few more lines)."""
    answers = []
    while len(answers) < limit and answers[-3:] != [refused] * 3:
        answers.append(call())
    return answers


def grpc_code(gwa):
    try:
        gwa["predict"].Predict(grpc_request([JPEG.read_bytes()]), timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_a_full_disk_refuses_every_request_and_the_chain_verifies_after(gwa):
    url = f"{gwa['rest']}/v1/models/{MODEL}:predict"
    body = {"instances": [b64(JPEG.read_bytes())]}
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    ballast = fill(gwa["disk"])
    try:
        lines_before = gwa["audit"].read_bytes().count(b"\n")
        predictions = until_refused(lambda: httpx.post(url, json=body, timeout=60).status_code, 507)
        bad_token = until_refused(lambda: httpx.post(url, json=body, timeout=60, headers={
            "Authorization": "Bearer not-a-token"}).status_code, 507)
        grpc_codes = until_refused(lambda: grpc_code(gwa), grpc.StatusCode.RESOURCE_EXHAUSTED)
        status = httpx.get(f"{gwa['rest']}/v1/models/{MODEL}", timeout=60)
        # everything is refused, retryably (507, never 500, never served unaudited)
        assert predictions[-3:] == [507] * 3 and set(predictions) <= {200, 507}, predictions
        refusal = httpx.post(url, json=body, timeout=60)
        assert refusal.status_code == 507 and "cannot write its audit trail" in refusal.json()["error"]
        assert set(bad_token) <= {401, 507} and bad_token[-1] == 507
        assert grpc_codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED and set(grpc_codes) <= {
            grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert status.status_code == 507
        data = gwa["audit"].read_bytes()
        served = predictions.count(200) + bad_token.count(401) + grpc_codes.count(grpc.StatusCode.OK)
        assert data.endswith(b"\n") and data.count(b"\n") - lines_before == served, "every answer has its line"
    finally:
        ballast.unlink()
    assert httpx.post(url, json=body, timeout=60).status_code == 200  # space is back: served (and audited) again
    time.sleep(1.0)  # a checkpoint after the last line
    result = verify_cli(gwa)
    assert result.returncode == 0, result.stderr
