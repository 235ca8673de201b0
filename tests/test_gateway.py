"""The clinical gateway in front of `medpipe serve`, driven only through the official TF Serving stubs,
`medpipe predict` and an HTTP client (httpx), with generated CA, server and client certificates and JWTs.

One gateway + one upstream per module, over a repository filled by the real `medpipe publish` from the session's
trained sample run.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ROOT, SAMPLE
from gateway_support import CLIENT_SUBJECT, make_pki, rss_mb, start_gateway, stop, token

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from test_serving import MODEL, publish, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")

CT = SAMPLE / "dicom" / "CT-MONO2-16-brain.dcm"
MR = SAMPLE / "dicom" / "MR-MONO2-8-16x-heart.dcm"
JPEGS = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[:4]


@pytest.fixture(scope="module")
def gw(trained_sample_run, ingested_sample, tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway")
    repo = base / "models"
    version = publish(trained_sample_run, repo, "--label", "stable")
    upstream, upstream_grpc, upstream_rest = start_server(repo, base)
    pki = make_pki(base / "pki")
    config = base / "gateway.yaml"
    config.write_text(json.dumps({
        "limits": {"max_body_mb": 4, "rate_per_minute": 100000, "max_concurrent": 4, "queue_timeout_s": 10,
                   "header_timeout_s": 3, "idle_timeout_s": 3, "default_deadline_s": 20,
                   "accept_rate_per_s": 0},  # every client here is 127.0.0.1 (the 500 slow connections too)
        "identities": {CLIENT_SUBJECT: ["predict:brain_mri", "metrics:read"]}}))
    args = ["--upstream", upstream_grpc, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
            "--client-ca", str(pki["ca"]), "--jwt-key", str(pki["jwt_public"]), "--audit-log",
            str(base / "audit" / "audit.jsonl"), "--request-log", str(base / "requests"), "--config", str(config),
            "--model-repository", str(repo)]
    stats = ingested_sample / "stats.json"
    if stats.is_file() and "pixel_histogram" in json.loads(stats.read_text()):
        args += ["--drift-baseline", str(ingested_sample)]
    process, grpc_address, rest = start_gateway(args, base / "gateway.log")
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["client_key"].read_bytes(),
                                               pki["client_cert"].read_bytes())
    channel = grpc.secure_channel(grpc_address, credentials)
    http = httpx.Client(base_url=rest, verify=verify(pki), timeout=60)
    yield {"process": process, "grpc": grpc_address, "rest": rest, "pki": pki, "base": base, "version": version,
           "channel": channel, "http": http, "audit": base / "audit" / "audit.jsonl", "run": trained_sample_run,
           "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
           "models": model_service_pb2_grpc.ModelServiceStub(channel), "upstream_grpc": upstream_grpc,
           "log": base / "gateway.log", "requests": base / "requests", "ingested": ingested_sample}
    http.close()
    channel.close()
    assert stop(process) == 0, "graceful shutdown must exit 0"
    stop_server(upstream)


def verify(pki, cert: str | None = "client") -> ssl.SSLContext:
    """httpx's TLS settings: trust the test CA; present the named client certificate (None: none)."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(str(pki[f"{cert}_cert"]), str(pki[f"{cert}_key"]))
    return context


def audit_lines(gw) -> list[dict]:
    return [json.loads(line) for line in gw["audit"].read_text().splitlines()]


def request(images: list[bytes], model=MODEL, label=None, version=None, signature="serving_default"):
    message = predict_pb2.PredictRequest()
    message.model_spec.name = model
    message.model_spec.signature_name = signature
    if label:
        message.model_spec.version_label = label
    if version is not None:
        message.model_spec.version.value = version
    message.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return message


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


# ---- the road -------------------------------------------------------------------------------------------------
def test_dicom_in_class_out_with_the_official_stubs(gw):
    import pydicom

    images = [CT.read_bytes(), MR.read_bytes(), JPEGS[0].read_bytes()]
    response = gw["predict"].Predict(request(images, label="stable"), timeout=60,
                                     metadata=[("x-request-id", "stubs-1")])
    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    assert response.model_spec.version.value == gw["version"]
    assert outputs["probabilities"].shape == (3, 4)
    assert np.allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-4)
    labels = {"glioma", "meningioma", "notumor", "pituitary"}
    assert {n.decode() for n in outputs["class_names"]} <= labels
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    assert outputs["sop_instance_uid"][0].decode() == ct.SOPInstanceUID
    assert outputs["study_instance_uid"][0].decode() == ct.StudyInstanceUID and outputs["sop_instance_uid"][2] == b""

    # the same pixels sent straight to the upstream, preprocessed like ingest: the same answer
    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    config = load_config(gw["run"] / "config.yaml")
    with grpc.insecure_channel(gw["upstream_grpc"]) as direct:
        upstream = prediction_service_pb2_grpc.PredictionServiceStub(direct).Predict(
            request([preprocess_bytes(i, config).png for i in images], version=gw["version"]), timeout=60)
    assert np.allclose(tf.make_ndarray(upstream.outputs["probabilities"]), outputs["probabilities"], atol=1e-6)

    # metadata and status through the gateway; no reload RPC
    status = gw["models"].GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": MODEL}), timeout=30)
    assert [s.version for s in status.model_version_status] == [gw["version"]]
    metadata = gw["predict"].GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": MODEL}, metadata_field=["signature_def"]), timeout=30)
    assert metadata.model_spec.version.value == gw["version"]
    with pytest.raises(grpc.RpcError) as refused:
        gw["models"].HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

    record = [r for r in audit_lines(gw) if r.get("request_id") == "stubs-1"][0]
    assert record["identity"] == CLIENT_SUBJECT and record["via"] == "mtls" and record["outcome"] == "OK"
    assert record["version"] == gw["version"] and len(record["classes"]) == 3 and record["door"] == "grpc"
    assert ct.SOPInstanceUID not in gw["audit"].read_text()  # UIDs in the response only


def test_rest_with_a_bearer_token_and_medpipe_predict(gw, tmp_path):
    pki = gw["pki"]
    plain = httpx.Client(base_url=gw["rest"], verify=verify(pki, None), timeout=60)  # TLS, no client certificate
    bearer = {"Authorization": "Bearer " + token(pki["jwt_private"], sub="dr-rest", scope="predict:brain_mri")}
    answer = plain.post(f"/v1/models/{MODEL}/labels/stable:predict", headers={**bearer, "X-Request-Id": "rest-1"},
                        json={"instances": [b64(MR.read_bytes()), b64(JPEGS[1].read_bytes())]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == str(gw["version"]) and len(body["predictions"]) == 2
    assert body["predictions"][0]["class_names"] in ("glioma", "meningioma", "notumor", "pituitary")
    assert body["predictions"][0]["sop_instance_uid"] and body["predictions"][1]["sop_instance_uid"] == ""
    status = plain.get(f"/v1/models/{MODEL}", headers=bearer).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = plain.get(f"/v1/models/{MODEL}/metadata", headers=bearer).json()
    assert "serving_default" in metadata["metadata"]["signature_def"]["signatureDef"]
    plain.close()

    # medpipe predict: mTLS over gRPC, and a token over REST
    token_file = tmp_path / "token"
    token_file.write_text(token(pki["jwt_private"], sub="dr-cli", scope="predict:*"))
    tls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    over_grpc = subprocess.run([sys.executable, "-m", "serving.client", "--server", gw["grpc"], "--model", MODEL,
                                *tls, str(CT), str(JPEGS[2])], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert over_grpc.returncode == 0, over_grpc.stderr[-2000:]
    lines = [json.loads(line) for line in over_grpc.stdout.splitlines()]
    assert [line["model_version"] for line in lines] == [gw["version"]] * 2
    over_rest = subprocess.run([sys.executable, "-m", "serving.client", "--rest", gw["rest"], "--model", MODEL,
                                "--config", str(gw["run"] / "config.yaml"), "--tls-ca", str(pki["ca"]),
                                "--token-file", str(token_file), str(JPEGS[2])],
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert over_rest.returncode == 0, over_rest.stderr[-2000:]
    assert json.loads(over_rest.stdout)["class"] == lines[1]["class"]
    identities = {r["identity"] for r in audit_lines(gw) if r["event"] == "predict" and r["outcome"] == "OK"}
    assert {"dr-rest", "dr-cli", CLIENT_SUBJECT} <= identities


def test_batch_scoring_through_the_gateway_is_authenticated_and_audited(gw, tmp_path):
    """The batch-inference DAG's stage as docker-compose runs it: serving.batch over mTLS to the gateway."""
    pki = gw["pki"]
    drop = tmp_path / "drop"
    drop.mkdir()
    for path in JPEGS[:2]:
        shutil.copy(path, drop / path.name)
    (drop / "notes.txt").write_text("not an image")

    def batch(output: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving.batch", "--drop", str(drop), "--output", str(output),
                               "--server", gw["grpc"], "--model", MODEL, "--request-id", "batch-gw",
                               "--max-rejected-fraction", "0.5", "--deadline", "20", *extra],
                              capture_output=True, text=True, timeout=180, cwd=ROOT)

    tls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    result = batch(tmp_path / "out", *tls)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(row["outcome"] for row in rows) == ["predicted", "predicted", "rejected"]
    assert {row["model_version"] for row in rows if row["outcome"] == "predicted"} == {gw["version"]}
    audited = [r for r in audit_lines(gw) if r["event"] == "predict" and str(r.get("request_id")).startswith("batch-gw")]
    assert sum(r["images"] for r in audited) == 2  # the two images, in however many requests
    assert {(r["identity"], r["outcome"]) for r in audited} == {(CLIENT_SUBJECT, "OK")}
    # without its certificate the stage is refused, clearly, and writes no partition
    refused = batch(tmp_path / "refused", "--tls-ca", str(pki["ca"]))
    assert refused.returncode != 0 and not (tmp_path / "refused").exists()
    assert "Traceback" not in refused.stderr


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_refusals_are_answered_and_audited(gw):
    pki = gw["pki"]
    url = f"/v1/models/{MODEL}:predict"
    body = {"instances": [b64(JPEGS[0].read_bytes())]}
    before = len(audit_lines(gw))
    plain = httpx.Client(base_url=gw["rest"], verify=verify(pki, None), timeout=30)
    cases = {
        "no credentials": (plain, {}, 401, "UNAUTHENTICATED"),
        "expired token": (plain, {"Authorization": "Bearer " + token(pki["jwt_private"], expires_in=-300)}, 401,
                          "UNAUTHENTICATED"),
        "token of another key": (plain, {"Authorization": "Bearer " + token(pki["rogue_jwt_private"])}, 401,
                                 "UNAUTHENTICATED"),
        "missing scope": (plain, {"Authorization": "Bearer " + token(pki["jwt_private"], sub="dr-chest",
                                                                     scope="predict:chest_xray")}, 403,
                          "PERMISSION_DENIED"),
    }
    for name, (client, headers, status, code) in cases.items():
        answer = client.post(url, json=body, headers={**headers, "X-Request-Id": name.replace(" ", "-")})
        assert answer.status_code == status, (name, answer.text)
        assert "error" in answer.json()
        record = [r for r in audit_lines(gw) if r.get("request_id") == name.replace(" ", "-")
                  or (r["event"] == "authenticate" and r["outcome"] == code)]
        assert record, f"{name} was not audited"
    unlisted = httpx.Client(base_url=gw["rest"], verify=verify(pki, "unlisted"), timeout=30)
    assert unlisted.post(url, json=body).status_code == 403
    plain.close(), unlisted.close()
    new = audit_lines(gw)[before:]
    outcomes = [(r["event"], r["outcome"], r.get("identity")) for r in new]
    assert outcomes.count(("authenticate", "UNAUTHENTICATED", None)) == 3
    assert ("predict", "PERMISSION_DENIED", "dr-chest") in outcomes
    assert ("predict", "PERMISSION_DENIED", "CN=unlisted,O=medpipe tests") in outcomes
    assert all(r["client"] == "127.0.0.1" for r in new)

    # a certificate from another CA, over REST and gRPC: refused at the TLS handshake
    with pytest.raises(httpx.HTTPError):
        httpx.post(gw["rest"] + url, json=body, verify=verify(pki, "rogue_client"), timeout=10)
    time.sleep(0.5)
    handshakes = [r for r in audit_lines(gw) if r["event"] == "tls_handshake"]
    assert handshakes and handshakes[-1]["outcome"] == "UNAUTHENTICATED" and "unknown_ca" in handshakes[-1]["error"]
    for cert, key in ((pki["rogue_client_cert"], pki["rogue_client_key"]), (None, None)):
        creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), key and key.read_bytes(),
                                             cert and cert.read_bytes())
        with grpc.secure_channel(gw["grpc"], creds) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    request([JPEGS[0].read_bytes()]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # a bearer token without the scope over gRPC (mTLS channel, token decides)
    with pytest.raises(grpc.RpcError) as refused:
        gw["predict"].Predict(request([JPEGS[0].read_bytes()]), timeout=30, metadata=[(
            "authorization", "Bearer " + token(pki["jwt_private"], sub="grpc-chest", scope="predict:chest_xray"))])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ("predict", "PERMISSION_DENIED", "grpc-chest") in [
        (r["event"], r["outcome"], r.get("identity")) for r in audit_lines(gw)]


# ---- the trial's inputs -----------------------------------------------------------------------------------------
def tls_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def rest_address(gw) -> tuple[str, int]:
    host, port = gw["rest"].split("://")[1].rsplit(":", 1)
    return host, int(port)


def raw_exchange(gw, data: bytes, wait: float = 20) -> tuple[int | None, bytes, float]:
    """Send raw bytes over mTLS; -> (HTTP status or None, response, seconds until the answer or close)."""
    start = time.monotonic()
    with socket.create_connection(rest_address(gw), timeout=wait) as raw:
        with tls_context(gw["pki"]).wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(data)
            received = b""
            try:
                while True:
                    part = conn.recv(65536)
                    if not part:
                        break
                    received += part
                    if b"\r\n\r\n" in received and b"connection: close" not in received.lower():
                        head, _, rest = received.partition(b"\r\n\r\n")
                        length = [int(h.split(b":")[1]) for h in head.lower().split(b"\r\n")
                                  if h.startswith(b"content-length:")]
                        if length and len(rest) >= length[0]:
                            break
            except (ConnectionResetError, ssl.SSLError):
                pass
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
    return status, received, time.monotonic() - start


class GoodTraffic:
    """A good request every 0.3 s in the background, recording each answer's status."""

    def __init__(self, gw):
        self.gw, self.statuses, self._stop = gw, [], threading.Event()
        self.body = {"instances": [b64(JPEGS[3].read_bytes())]}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        pki = self.gw["pki"]
        with httpx.Client(base_url=self.gw["rest"], verify=verify(pki), timeout=30) as client:
            while not self._stop.is_set():
                try:
                    self.statuses.append(client.post(f"/v1/models/{MODEL}:predict", json=self.body).status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                self._stop.wait(0.3)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=60)


def test_trial_inputs_get_clear_errors_in_bounded_time(gw, tmp_path):
    from gateway_support import huge_png, peak_rss_mb

    from fixtures_adversarial import tiny_png

    pid = gw["process"].pid
    http, predict = gw["http"], gw["predict"]
    assert http.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(JPEGS[0].read_bytes())]}).status_code == 200
    baseline = peak_rss_mb(pid)
    tiny = tiny_png(tmp_path / "tiny.png").read_bytes()
    with GoodTraffic(gw) as good:
        # 10,000 images in one request (about 1 MB): refused before any decode, over REST and gRPC
        answer = http.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(tiny)] * 10_000})
        assert answer.status_code == 400 and "10000 images in one request" in answer.json()["error"]
        with pytest.raises(grpc.RpcError) as refused:
            predict.Predict(request([tiny] * 10_000), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in refused.value.details()

        # a real 20000 x 20000 PNG: the pixel budget is checked from the header, before decoding
        huge = huge_png(20_000, 20_000)
        answer = http.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(huge)]})
        assert answer.status_code == 400 and "pixel_budget" in answer.json()["error"]

        # the shape bomb: 3,000 strings declared, 2 sent
        bomb = predict_pb2.PredictRequest()
        bomb.model_spec.name = MODEL
        bomb.inputs["image_bytes"].dtype = tf.string.as_datatype_enum
        bomb.inputs["image_bytes"].tensor_shape.dim.add(size=3000)
        bomb.inputs["image_bytes"].string_val.extend([b"a", b"b"])
        with pytest.raises(grpc.RpcError) as refused:
            predict.Predict(bomb, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[3000]" in refused.value.details()

        # malformed JSON, 100k-deep JSON, a bad Content-Length, a lying one, one over the limit
        for body, words in ((b'{"instances": [', "not valid JSON"), (b"[" * 100_000 + b"]" * 100_000, "nests")):
            answer = http.post(f"/v1/models/{MODEL}:predict", content=body)
            assert answer.status_code == 400 and words in answer.json()["error"]
        head = f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: localhost\r\n".encode()
        status, _, seconds = raw_exchange(gw, head + b"Content-Length: abc\r\n\r\n{}")
        assert status == 400 and seconds < 5
        status, text, seconds = raw_exchange(gw, head + b"Content-Length: 1000\r\n\r\n{}")
        assert status == 408 and 2 < seconds < 10 and b"did not arrive" in text
        status, text, seconds = raw_exchange(gw, head + b"Content-Length: 999999999\r\n\r\n{}")
        assert status == 413 and seconds < 5 and b"limit" in text
        answer = http.post(f"/v1/models/{MODEL}:predict", content=(b"x" * 65536 for _ in range(100)))  # chunked
        assert answer.status_code == 413

        # 500 slow connections: each is answered 408 and closed after the header timeout (3 s here)
        context = tls_context(gw["pki"])
        slow = []
        for _ in range(500):
            conn = context.wrap_socket(socket.create_connection(rest_address(gw), timeout=30),
                                       server_hostname="localhost")
            conn.sendall(head)  # the headers never finish
            slow.append(conn)
        opened = time.monotonic()
        time.sleep(1)
        assert http.post(f"/v1/models/{MODEL}:predict",
                         json={"instances": [b64(JPEGS[1].read_bytes())]}).status_code == 200  # still serving
        closed = 0
        for conn in slow:
            conn.settimeout(max(1.0, opened + 15 - time.monotonic()))
            try:
                data = conn.recv(4096)
                closed += data.startswith(b"HTTP/1.1 408") or data == b""
            except (ConnectionResetError, ssl.SSLError):
                closed += 1
            except socket.timeout:
                pass
            conn.close()
        assert closed == 500 and time.monotonic() - opened < 20
        time.sleep(1)
    assert len(good.statuses) >= 10 and set(good.statuses) == {200}, good.statuses
    growth = peak_rss_mb(pid) - baseline
    assert growth <= 300, f"the gateway's peak RSS grew by {growth:.0f} MB"
    metrics = gw["http"].get("/monitoring/prometheus/metrics").text
    for limit in ("max_images", "pixel_budget", "body_size", "read_timeout"):
        value = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith(f'medpipe_gateway_limit_rejections_total{{limit="{limit}"}}')))
        assert value >= 1, limit


def test_deadlines_are_propagated(gw):
    """A client deadline shorter than the work: the gateway gives up too (DEADLINE_EXCEEDED, audited) instead of
    finishing for nobody. Too short a deadline never reaches the handler and a long one lets the work finish, so
    deadlines grow geometrically until one lands inside the work (independent of the machine's speed)."""
    images = [CT.read_bytes()] * 6  # about 3 MB: inside the test's 4 MB message limit
    outcomes = {}
    timeouts = [0.02 * 1.3 ** step for step in range(20)]  # 20 ms .. 2.9 s
    for attempt, timeout in enumerate(timeouts):
        rid = f"hurry-{attempt}"
        try:
            gw["predict"].Predict(request(images), timeout=timeout, metadata=[("x-request-id", rid)])
            break  # the work fitted in this deadline: a later, longer one cannot land inside it either
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and rid not in outcomes:
            outcomes.update({r["request_id"]: r["outcome"] for r in audit_lines(gw) if r.get("request_id") == rid})
            time.sleep(0.1)
        if outcomes.get(rid) == "DEADLINE_EXCEEDED":
            break
    assert "DEADLINE_EXCEEDED" in outcomes.values(), outcomes


# ---- audit, monitoring, PHI -------------------------------------------------------------------------------------
def test_audit_verify_on_the_gateways_log(gw, tmp_path):
    verify = [sys.executable, "-m", "medpipe.cli", "audit", "verify"]
    while len(audit_lines(gw)) < 10:  # status reads are audited too
        gw["models"].GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), timeout=30)
    intact = subprocess.run([*verify, str(gw["audit"])], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert intact.returncode == 0, intact.stderr
    lines = gw["audit"].read_text().splitlines(keepends=True)
    assert len(lines) >= 10
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(lines[:4] + [lines[4].replace('"outcome":"', '"outcome":"X')] + lines[5:]))
    removed = tmp_path / "removed.jsonl"
    removed.write_text("".join(lines[:6] + lines[7:]))
    for path, line in ((edited, 6), (removed, 7)):
        result = subprocess.run([*verify, str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 1 and f"line {line} breaks the hash chain" in result.stderr


def test_request_log_and_metrics_feed_monitoring(gw, tmp_path):
    logs = sorted(gw["requests"].glob("requests-*.jsonl"))
    records = [json.loads(line) for path in logs for line in path.read_text().splitlines()]
    assert records, "no request summaries"
    first = [r for r in records if r["request_id"].startswith("stubs-1")]
    assert [r["request_id"] for r in first] == ["stubs-1-0", "stubs-1-1", "stubs-1-2"]
    assert set(first[0]) >= {"ts", "request_id", "model", "version", "class", "confidence", "probabilities",
                             "pixel_histogram", "pixel_mean"}
    assert sum(first[0]["pixel_histogram"]) == 64 * 64
    metrics = gw["http"].get("/monitoring/prometheus/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    version = gw["version"]
    assert f'medpipe_gateway_requests_total{{door="grpc",model="brain_mri",outcome="OK",version="{version}"}}' \
        in text or f'medpipe_gateway_requests_total{{door="grpc",model="brain_mri",version="{version}",outcome="OK"}}' in text
    assert "medpipe_predictions_total{" in text and "medpipe_prediction_confidence_bucket{" in text
    assert 'medpipe_gateway_auth_refusals_total{code="UNAUTHENTICATED",door="rest"}' in text or \
        'medpipe_gateway_auth_refusals_total{door="rest",code="UNAUTHENTICATED"}' in text
    # medpipe feedback joins confirmed labels to the gateway's summaries by request id; medpipe monitor reads them
    served = {r["request_id"]: r["class"] for r in first}
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\n" + "".join(f"{rid},{cls}\n" for rid, cls in served.items()))
    joined = subprocess.run([sys.executable, "-m", "serving.feedback", "--labels", str(labels), "--requests",
                             str(gw["requests"]), "--output", str(tmp_path / "feedback")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert json.loads(joined.stdout)["accepted"] == 3 and json.loads(joined.stdout)["live_accuracy"] == 1.0
    day = logs[-1].name[len("requests-"):-len(".jsonl")]
    monitor = subprocess.run([sys.executable, "-m", "serving.monitoring", "--requests", str(gw["requests"]),
                              "--baseline", str(gw["ingested"]), "--date", day, "--output", str(tmp_path / "drift"),
                              "--min-requests", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads((tmp_path / "drift" / "drift_report.json").read_text())
    assert monitor.returncode in (0, 1) and report["n"] == len(records) and report["status"] != "no_traffic"
    # metrics need the metrics:read scope
    pki = gw["pki"]
    denied = httpx.get(gw["rest"] + "/monitoring/prometheus/metrics", verify=verify(pki, None), timeout=10,
                       headers={"Authorization": "Bearer " + token(pki["jwt_private"])})
    assert denied.status_code == 403


def test_phi_planted_in_a_dicom_leaves_no_trace(gw, tmp_path):
    from fixtures_adversarial import phi_dicom

    planted = phi_dicom(tmp_path / "phi.dcm")
    data = (tmp_path / "phi.dcm").read_bytes()
    answer = gw["http"].post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(data)]},
                             headers={"X-Request-Id": "PHIZQX^Name^Alice"})  # a request id a careless app sent
    assert answer.status_code == 200, answer.text
    response = gw["predict"].Predict(request([data]), timeout=60)
    assert response.outputs["class_names"].string_val
    broken = data[:2000]  # a truncated copy: the error message must not quote the header either
    refused = gw["http"].post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(broken)]})
    assert refused.status_code == 400
    time.sleep(0.5)
    texts = {"audit log": gw["audit"].read_text(), "gateway output": gw["log"].read_text(),
             "metrics": gw["http"].get("/monitoring/prometheus/metrics").text,
             "request log": "".join(p.read_text() for p in gw["requests"].glob("*.jsonl")),
             "responses": answer.text + refused.text + str(response)}
    assert len(planted) >= 20
    # the audit line names the patient only by keyed pseudonym (MEDPIPE_DEID_KEY)
    from conftest import TEST_DEID_KEY
    from fixtures_adversarial import PHI_PATIENT_ID

    from medpipe.deid import pseudonym

    mine = [r for r in audit_lines(gw) if r["event"] == "predict" and r["outcome"] == "OK" and r.get("patients")]
    assert mine and mine[-1]["patients"] == [pseudonym(PHI_PATIENT_ID, TEST_DEID_KEY)]
    for where, text in texts.items():
        leaked = [value for value in planted if value in text]
        assert not leaked, f"{where} holds {leaked}"


def test_a_hostile_request_id_is_replaced_in_the_request_log(gw):
    """Issue 17 item 7: an X-Request-Id that is not a plain token never reaches the request log or the audit log."""
    png = (SAMPLE / "brain_mri" / "glioma").glob("*.jpg").__next__().read_bytes()
    hostile = "ZZSECRET JANE DOE MRN99887766"
    response = gw["predict"].Predict(request([png]), timeout=60, metadata=[("x-request-id", hostile)])
    assert response.outputs["probabilities"].tensor_shape.dim[0].size == 1
    answer = gw["http"].post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(png)]},
                             headers={"X-Request-Id": "visit.42_b-7"})
    assert answer.status_code == 200
    logged = "".join(p.read_text() for p in gw["requests"].glob("requests-*.jsonl")) + gw["audit"].read_text()
    assert "JANE" not in logged and "MRN99887766" not in logged
    assert '"visit.42_b-7"' in logged
