"""The TF Serving-compatible server, driven only through the official tensorflow_serving stubs and REST.

One server process per module, over a repository filled by the real `medpipe publish` from the session's trained
sample run. Covers Predict/Classify/metadata/status/health, labels, reload, bad requests with TF Serving's codes,
Prometheus names, and a corrupt version folder refused while the previous version serves; then the trial's findings
(issues 12 and 17): the shape bomb, unparsable REST bodies and Content-Lengths, error messages without internals,
hostile request ids, a broken label move under load, and versions that follow their folders (a non-atomic copy, a
deleted version, health and metrics of the loaded set). HTTP-level hostility is in test_serving_rest.py. The request
log and drift gauges are the gateway's (test_gateway.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ROOT, SAMPLE, run_module

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

MODEL = "brain_mri"
IMAGES = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[:6]


# ---- helpers shared with test_client.py --------------------------------------------------------------------------
def publish(run_dir: Path, repo: Path, *extra: str, subprocess_run: bool = False) -> int:
    """The real publish command; in-process by default (saves a TensorFlow start-up per call)."""
    argv = ["--run", str(run_dir), "--repository", str(repo), "--model-name", MODEL, "--force", *extra]
    if subprocess_run:
        result = run_module("serving.publish", *argv)
        return int(result.stdout.split(" version ")[1].split()[0])
    from serving.publish import main as publish_main

    assert publish_main(argv) == 0
    return max(int(p.name) for p in (repo / MODEL).iterdir() if p.name.isdigit())


def wait_available(rest: str, name: str, process: subprocess.Popen, version: int | None = None,
                   timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server died: {process.stdout.read() if process.stdout else ''}"
        try:
            status = get_json(f"{rest}/v1/models/{name}")
            if any(s["state"] == "AVAILABLE" and (version is None or int(s["version"]) == version)
                   for s in status["model_version_status"]):
                return status
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} version {version} not AVAILABLE within {timeout} s")


def launch_server(repo: Path, log_dir: Path, *extra: str):
    """`medpipe serve` on ports the OS picks; -> (process, gRPC HOST:PORT, REST URL) once it listens."""
    from serving.listen import wait_listening

    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
         "--grpc-port", "0", "--rest-port", "auto", "--poll-seconds", "0.5", *extra],
        cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=open(log_dir / "server.log", "w"),
        stderr=subprocess.STDOUT)
    match = wait_listening(log_dir / "server.log", process)
    return process, match["grpc"], match["rest"]


def start_server(repo: Path, log_dir: Path, *extra: str):
    process, grpc_address, rest = launch_server(repo, log_dir, *extra)
    wait_available(rest, MODEL, process)
    return process, grpc_address, rest


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def post_json(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def prepared_pngs(config_path: Path, files=IMAGES) -> list[bytes]:
    """What the client sends: medpipe.imaging's ingest pipeline output."""
    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    config = load_config(config_path)
    return [preprocess_bytes(Path(f).read_bytes(), config).png for f in files]


def predict_request(images, name=MODEL, label=None, version=None, input_name="image_bytes", dtype=tf.string,
                    signature="serving_default", shape_override=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if label:
        request.model_spec.version_label = label
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, dtype=dtype))
    if shape_override is not None:  # a declared shape the content does not fill
        del request.inputs[input_name].tensor_shape.dim[:]
        for size in shape_override:
            request.inputs[input_name].tensor_shape.dim.add(size=size)
    return request


def shape_bomb():
    """The trial's ~108-byte TensorProto: one short string declared as 3,000 x 150,000 (tf.make_ndarray would repeat
    it into 450 million strings, 3.6 GB of pointers)."""
    request = predict_request([b"x" * 40], shape_override=[3000, 150_000])
    assert request.inputs["image_bytes"].ByteSize() < 120
    return request


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(trained_sample_run, ingested_sample, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    repo = base / "models"
    version = publish(trained_sample_run, repo, "--label", "stable")
    process, grpc_address, rest = start_server(repo, base, "--max-request-mb", "1", "--rest-read-timeout", "2",
                                                 "--allow-reload")  # publish --server reloads it
    channel = grpc.insecure_channel(grpc_address)
    yield {"process": process, "grpc": grpc_address, "rest": rest, "repo": repo, "base": base, "v1": version,
           "run": trained_sample_run, "channel": channel,
           "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
           "models": model_service_pb2_grpc.ModelServiceStub(channel),
           "pngs": prepared_pngs(trained_sample_run / "config.yaml")}
    channel.close()
    assert stop_server(process) == 0, "graceful shutdown must exit 0"


def keras_answer(run_dir: Path, pngs: list[bytes]) -> np.ndarray:
    """The in-process model on the same decoded pixels (models.preprocessing, as in training): the Keras model's
    probabilities with the run's temperature applied, as the SavedModel serves them."""
    from models.preprocessing import decode_image_tensor
    from models.safety import calibrated_probabilities, load_params
    from models.train import load_run

    model, config, _ = load_run(run_dir)
    pixels = tf.stack([decode_image_tensor(tf.constant(p), config.image.size, config.image.channels) for p in pngs])
    raw = model(pixels, training=False).numpy().astype(np.float64)
    return calibrated_probabilities(np.log(np.clip(raw, 1e-30, 1)), load_params(run_dir).temperature, "softmax")


# ---- tests -----------------------------------------------------------------------------------------------------
def test_unblessed_run_is_refused_without_force(trained_sample_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "serving.publish", "--run", str(trained_sample_run),
                             "--repository", str(tmp_path), "--model-name", MODEL], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2
    assert "refusing to publish" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / MODEL).exists() or not any((tmp_path / MODEL).iterdir())


def test_grpc_predict_equals_keras_and_rest(served):
    request = predict_request(served["pngs"], label="stable")
    response = served["predict"].Predict(request, timeout=30, metadata=[("x-request-id", "test-req")])
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    class_ids = tf.make_ndarray(response.outputs["class_ids"])
    names = [n.decode() for n in tf.make_ndarray(response.outputs["class_names"])]
    assert response.model_spec.version.value == served["v1"]
    assert probabilities.shape == (len(IMAGES), 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, keras_answer(served["run"], served["pngs"]), atol=1e-5)
    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    assert names == [labels[i] for i in class_ids]

    # REST row format and column format give the same answer
    b64 = [{"b64": base64.b64encode(p).decode()} for p in served["pngs"]]
    code, rows = post_json(f"{served['rest']}/v1/models/{MODEL}/labels/stable:predict", {"instances": b64})
    assert code == 200
    np.testing.assert_allclose([r["probabilities"] for r in rows["predictions"]], probabilities, atol=1e-6)
    assert [r["class_names"] for r in rows["predictions"]] == names
    code, columns = post_json(f"{served['rest']}/v1/models/{MODEL}/versions/{served['v1']}:predict",
                              {"inputs": {"image_bytes": b64}})
    assert code == 200
    np.testing.assert_allclose(columns["outputs"]["probabilities"], probabilities, atol=1e-6)
    # the request log and class/drift metrics moved to the gateway (tests/test_gateway.py)


def test_metadata_status_classify_health_and_metrics(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = served["predict"].GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert default.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert set(default.outputs) == {"probabilities", "class_ids", "class_names", "ood_score", "in_distribution"}
    assert "predict_preprocessed" in signatures.signature_def and "explain" in signatures.signature_def

    status = served["models"].GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [(served["v1"], 30)]  # AVAILABLE
    rest_meta = get_json(f"{served['rest']}/v1/models/{MODEL}/metadata")
    assert "serving_default" in rest_meta["metadata"]["signature_def"]["signatureDef"]

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = MODEL
    example = classify.input.example_list.examples.add()
    example.features.feature["image_bytes"].bytes_list.value.append(served["pngs"][0])
    result = served["predict"].Classify(classify, timeout=10).result.classifications[0]
    assert [c.label for c in result.classes] == ["glioma", "meningioma", "notumor", "pituitary"]

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(served["channel"]).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    with urllib.request.urlopen(f"{served['rest']}/monitoring/prometheus/metrics", timeout=10) as response:
        text = response.read().decode()
    assert f':tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text and 'entrypoint="GRPC"' in text
    assert "medpipe_batch_size_bucket" in text and "medpipe_predictions_total{" not in text  # the gateway's
    assert f'medpipe_loaded_versions{{model="{MODEL}",version="{served["v1"]}"}} 1.0' in text
    # labelled like TF Serving's own series: the version folder's path (the load-failure alert reads it)
    folder = Path(served["repo"]) / MODEL / str(served["v1"])
    assert f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{folder}",status="success"}} 1.0' in text


@pytest.mark.parametrize("case, code", [
    ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong_input_name", grpc.StatusCode.INVALID_ARGUMENT),
    ("empty_batch", grpc.StatusCode.INVALID_ARGUMENT),
    ("undecodable", grpc.StatusCode.INVALID_ARGUMENT),
    ("oversized", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("unknown_model", grpc.StatusCode.NOT_FOUND),
    ("unknown_version", grpc.StatusCode.NOT_FOUND),
    ("unknown_label", grpc.StatusCode.NOT_FOUND),
    ("unknown_signature", grpc.StatusCode.INVALID_ARGUMENT),
    ("shape_bomb", grpc.StatusCode.INVALID_ARGUMENT),
    ("short_tensor_content", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_tf_serving_codes_and_server_keeps_serving(served, case, code):
    png = served["pngs"][0]
    request = {
        "wrong_dtype": lambda: predict_request([[1.0]], dtype=tf.float32),
        "wrong_input_name": lambda: predict_request([png], input_name="image"),
        "empty_batch": lambda: predict_request(np.array([], dtype=object)),
        "undecodable": lambda: predict_request([b"not an image"]),
        "oversized": lambda: predict_request([b"\0" * (2 * 2**20)]),
        "unknown_model": lambda: predict_request([png], name="no_such_model"),
        "unknown_version": lambda: predict_request([png], version=12345),
        "unknown_label": lambda: predict_request([png], label="nope"),
        "unknown_signature": lambda: predict_request([png], signature="nope"),
        "shape_bomb": lambda: shape_bomb(),
        "short_tensor_content": lambda: predict_request(np.zeros((2, 8, 8, 1), np.float32), input_name="images",
                                                        dtype=tf.float32, signature="predict_preprocessed",
                                                        shape_override=[4, 8, 8, 1]),
    }[case]()
    with pytest.raises(grpc.RpcError) as caught:
        served["predict"].Predict(request, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    ok = served["predict"].Predict(predict_request([png]), timeout=30)
    assert tf.make_ndarray(ok.outputs["probabilities"]).shape == (1, 4)


def test_rest_errors(served):
    rest = served["rest"]
    assert post_json(f"{rest}/v1/models/nope:predict", {"instances": []})[0] == 404
    code, body = post_json(f"{rest}/v1/models/{MODEL}:predict", {"instances": [1.5]})
    assert code == 400 and "error" in body
    code, body = post_json(f"{rest}/v1/models/{MODEL}:predict", {"instances": [], "inputs": []})
    assert code == 400 and "exactly one" in body["error"]
    code, body = post_json(f"{rest}/v1/models/{MODEL}:predict", b"x" * (2 * 2**20))
    assert code == 413
    try:
        get_json(f"{rest}/v1/models/{MODEL}/labels/nope")
        raise AssertionError("unknown label must be 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


def test_publish_labels_reload_and_corrupt_version(served):
    rest, repo, v1 = served["rest"], served["repo"], served["v1"]
    # a canary published with --server: loaded by the reload itself, stable untouched
    v2 = publish(served["run"], repo, "--label", "canary", "--server", served["grpc"], subprocess_run=True)
    assert v2 > v1 and sorted(int(p.name) for p in (repo / MODEL).iterdir()) == [v1, v2]
    assert not any(p.name.startswith(".tmp") for p in (repo / MODEL).iterdir())
    png = served["pngs"][0]
    assert served["predict"].Predict(predict_request([png], label="canary"), timeout=30).model_spec.version.value == v2
    assert served["predict"].Predict(predict_request([png], label="stable"), timeout=30).model_spec.version.value == v1
    # promote: one command moves the label
    run_module("serving.publish", "--repository", str(repo), "--model-name", MODEL, "--label", "stable",
               "--version", str(v2), "--server", served["grpc"])
    assert served["predict"].Predict(predict_request([png], label="stable"), timeout=30).model_spec.version.value == v2
    assert '"stable"' in (repo / "models.config").read_text()

    # a second model with policy latest: a corrupt newer folder is refused, the working version keeps serving,
    # and a good newer version is then served within 2 s
    other = repo / "other"
    shutil.copytree(repo / MODEL / str(v1), other / "1")
    from serving.repository import read_config, upsert_model

    config = read_config(repo / "models.config")
    upsert_model(config, "other", str(other), "latest", 1)
    reload = served["models"].HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
    assert reload.status.error_code == 0, reload.status.error_message
    wait_available(rest, "other", served["process"], version=1, timeout=10)
    (other / "2").mkdir()
    (other / "2" / "saved_model.pb").write_bytes(b"half-copied garbage")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = {s["version"]: s for s in get_json(f"{rest}/v1/models/other")["model_version_status"]}
        if "2" in states and states["2"]["state"] == "END":
            break
        time.sleep(0.2)
    assert states["2"]["status"]["error_code"] != "OK" and states["2"]["status"]["error_message"]
    assert states["1"]["state"] == "AVAILABLE"
    answer = served["predict"].Predict(predict_request([png], name="other"), timeout=30)
    assert answer.model_spec.version.value == 1
    shutil.copytree(repo / MODEL / str(v1), other / ".tmp-3")
    os.rename(other / ".tmp-3", other / "3")
    # poll 0.5 s + load ~0.5 s on an idle machine (2 s target); the bound leaves room for a busy shared CI host
    wait_available(rest, "other", served["process"], version=3, timeout=10)
    assert served["predict"].Predict(predict_request([png], name="other"), timeout=30).model_spec.version.value == 3


# ---- issue 12: a faithful test double under hostile input; issue 17: labels, folders, health, request ids --------
def test_the_shape_bomb_is_refused_before_any_allocation(served):
    before = rss_mb(served["process"].pid)
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            served["predict"].Predict(shape_bomb(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "declares 450000000 values but the tensor holds 1" in caught.value.details()
    assert rss_mb(served["process"].pid) - before < 100


def test_rest_bodies_that_cannot_be_parsed_get_400(served):
    url = f"{served['rest']}/v1/models/{MODEL}:predict"
    b64 = {"b64": base64.b64encode(served["pngs"][0]).decode()}
    for body in ({"signature_name": 5, "instances": [b64]}, {"signature_name": ["serving_default"], "instances": [b64]},
                 {"signature_name": None, "instances": [b64]}, {"instances": [{"image_bytes": b64}, 3]},
                 {"instances": [[1, [2]], 3]}, {"inputs": {"image_bytes": {"b64": "%%%"}}}):
        code, answer = post_json(url, body)
        assert code == 400 and answer["error"], body
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"instances": ' + b"[" * 900 + b"]" * 900 + b"}",
                b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"\xff\xfe{", b'{"instances": [}'):
        code, answer = post_json(url, raw)
        assert code == 400 and answer["error"], raw[:30]
    code, answer = post_json(url, {"instances": [b64]})
    assert code == 200 and len(answer["predictions"]) == 1


def test_rest_a_bad_or_lying_content_length_gets_an_answer(served):
    port = int(served["rest"].rsplit(":", 1)[1])
    head = f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n".encode()
    for header, status in ((b"Content-Length: abc", b"400"), (b"Content-Length: -1", b"400"),
                           (b"Content-Length: 5000", b"408")):  # the body never comes: 408 after --rest-read-timeout
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(head + header + b"\r\n\r\n{}")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    code, _ = post_json(f"{served['rest']}/v1/models/{MODEL}:predict",
                        {"instances": [{"b64": base64.b64encode(served["pngs"][0]).decode()}]})
    assert code == 200


def test_errors_sent_to_clients_carry_no_paths_or_function_names(served):
    with pytest.raises(grpc.RpcError) as caught:
        served["predict"].Predict(predict_request([b"not an image"]), timeout=30)
    details = caught.value.details()
    assert "image" in details.lower()
    for internal in ("__inference", "{{", "[[", "File \"", "/", ".py"):
        assert internal not in details, details
    code, answer = post_json(f"{served['rest']}/v1/models/{MODEL}:predict",
                             {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]})
    assert code == 400 and "__inference" not in answer["error"] and "/" not in answer["error"]


def test_a_hostile_request_id_never_reaches_the_log(served):
    """Issue 17 item 7 for the TF Serving stand-in: a caller's id is used only when it is a plain token; the
    gateway's request log is checked in test_gateway.py (test_a_hostile_request_id_is_replaced_in_the_request_log)."""
    hostile = "ZZSECRET JANE DOE MRN99887766"
    png = served["pngs"][0]
    served["predict"].Predict(predict_request([png]), timeout=30, metadata=[("x-request-id", hostile)])
    code, _ = post_json(f"{served['rest']}/v1/models/{MODEL}:predict",
                        {"instances": [{"b64": base64.b64encode(png).decode()}]},
                        headers={"X-Request-Id": "JANE\u00e9DOE.MRN99887766"})
    assert code == 200
    text = (served["base"] / "server.log").read_text(errors="replace")
    assert "JANE" not in text and "MRN99887766" not in text


def grpc_version_of_label(served, label: str) -> int:
    return served["predict"].Predict(predict_request([served["pngs"][0]], label=label),
                                     timeout=30).model_spec.version.value


def test_a_broken_label_move_is_refused_under_load_and_changes_nothing(served):
    """Issue 17 item 5: `publish --label stable --version <broken> --server` is refused, models.config stays as it
    was on disk and on the server, and no request fails, during the attempt or after it."""
    import threading

    repo = served["repo"]
    stable = grpc_version_of_label(served, "stable")
    broken = max(int(p.name) for p in (repo / MODEL).iterdir() if p.name.isdigit()) + 1
    shutil.copytree(repo / MODEL / str(stable), repo / MODEL / str(broken))
    (repo / MODEL / str(broken) / "saved_model.pb").write_bytes(b"\x08\x01garbage, not a SavedModel")
    config_before = (repo / "models.config").read_bytes()

    outcomes, stop = [], threading.Event()

    def load():
        stub = prediction_service_pb2_grpc.PredictionServiceStub(served["channel"])
        while not stop.is_set():
            try:
                version = stub.Predict(predict_request([served["pngs"][0]], label="stable"), timeout=30)
                outcomes.append(version.model_spec.version.value)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        result = subprocess.run([sys.executable, "-m", "serving.publish", "--repository", str(repo), "--model-name",
                                 MODEL, "--label", "stable", "--version", str(broken), "--server", served["grpc"],
                                 "--timeout", "30"], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
        assert result.returncode == 2, result.stderr
        assert "refused" in result.stderr and f"version {broken}" in result.stderr
        assert str(repo / MODEL) not in result.stderr  # the server's reason names no path
        # what TF Serving itself enforces: a raw reload pointing the label at the broken version is refused too
        from serving.repository import parse_config_text

        config = parse_config_text(config_before.decode())
        entry = next(e for e in config.model_config_list.config if e.name == MODEL)
        entry.version_labels["stable"] = broken
        entry.model_version_policy.specific.versions.append(broken)
        reload = served["models"].HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
        assert reload.status.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "previous configuration stays in effect" in reload.status.error_message
        after = len(outcomes)
        time.sleep(2)
        assert len(outcomes) > after  # requests kept coming after the refusals
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert outcomes and set(outcomes) == {stable}, [o for o in outcomes if o != stable][:5]
    assert (repo / "models.config").read_bytes() == config_before  # a restart serves what served before
    assert get_json(f"{served['rest']}/v1/models/{MODEL}/labels/stable")["model_version_status"][0]["version"] \
        == str(stable)
    shutil.rmtree(repo / MODEL / str(broken))


def health(channel, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_state(rest: str, version: int, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = {int(s["version"]): s for s in get_json(f"{rest}/v1/models/{MODEL}")["model_version_status"]}
        except (urllib.error.URLError, ConnectionError):
            states = {}
        if version in states and states[version]["state"] == state:
            return states[version]
        time.sleep(0.2)
    raise AssertionError(f"version {version} not {state} within {timeout} s: {states}")


def loaded_series(rest: str) -> set[int]:
    with urllib.request.urlopen(f"{rest}/monitoring/prometheus/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    prefix = f'medpipe_loaded_versions{{model="{MODEL}",version="'
    return {int(line[len(prefix):].split('"')[0]) for line in lines if line.startswith(prefix)}


@pytest.mark.slow
def test_versions_follow_their_folders_and_health_follows_the_loaded_set(served, tmp_path):
    """Issue 17 item 6, on a server (re)started over a repository whose only version cannot load."""
    from grpc_health.v1 import health_pb2

    good = served["repo"] / MODEL / str(served["v1"])
    repo = tmp_path / "models"
    shutil.copytree(good, repo / MODEL / "1")
    (repo / MODEL / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    from serving.repository import parse_config_text, upsert_model, write_config

    config = parse_config_text("")
    upsert_model(config, MODEL, str(repo / MODEL), "latest", 1)
    write_config(repo / "models.config", config)
    process, grpc_address, rest = launch_server(repo, tmp_path, "--poll-seconds", "0.3")
    channel = grpc.insecure_channel(grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        refused = wait_state(rest, 1, "END", timeout=90)
        assert refused["status"]["error_message"] and str(repo) not in refused["status"]["error_message"]
        assert health(channel) == health(channel, MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(channel, "tensorflow.serving.ModelService") == health_pb2.HealthCheckResponse.SERVING
        assert loaded_series(rest) == set()

        # a non-atomic copy: everything but the variables, then the variables 2 s later
        shutil.copytree(good, repo / MODEL / "2", ignore=shutil.ignore_patterns("variables"))
        assert wait_state(rest, 2, "END")["status"]["error_message"]  # refused while incomplete
        time.sleep(2)
        shutil.copytree(good / "variables", repo / MODEL / "2" / "variables")
        wait_state(rest, 2, "AVAILABLE")
        assert health(channel) == health(channel, MODEL) == health_pb2.HealthCheckResponse.SERVING
        assert stub.Predict(predict_request([served["pngs"][0]]), timeout=30).model_spec.version.value == 2
        assert loaded_series(rest) == {2}

        # a newer version (renamed into place), then its folder deleted: back to version 2
        shutil.copytree(good, repo / MODEL / ".tmp-3")
        os.rename(repo / MODEL / ".tmp-3", repo / MODEL / "3")
        wait_state(rest, 3, "AVAILABLE")
        wait_state(rest, 2, "END")
        shutil.rmtree(repo / MODEL / "3")
        wait_state(rest, 3, "END")
        wait_state(rest, 2, "AVAILABLE")
        assert stub.Predict(predict_request([served["pngs"][0]]), timeout=30).model_spec.version.value == 2
        assert loaded_series(rest) == {2}

        # the last loadable folder deleted: nothing serves, and every signal says so
        shutil.rmtree(repo / MODEL / "2")
        wait_state(rest, 2, "END")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(predict_request([served["pngs"][0]]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert health(channel) == health(channel, MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert loaded_series(rest) == set()
    finally:
        channel.close()
        assert stop_server(process) == 0


def test_a_label_move_first_loads_its_target_under_the_old_labels(tmp_path):
    from serving.publish import loading_config, plan_config
    from serving.repository import find_model, parse_config_text, upsert_model

    for version in (1, 2, 3):
        (tmp_path / MODEL / str(version)).mkdir(parents=True)
    previous = parse_config_text("")
    upsert_model(previous, MODEL, str(tmp_path / MODEL), "latest", 1, versions_for_specific=[3],
                 labels={"stable": 1})
    before = previous.SerializeToString()
    final = plan_config(previous, tmp_path, MODEL, {"stable": 2}, None)
    loading = loading_config(previous, final, MODEL)
    assert previous.SerializeToString() == before  # planning never edits the live config
    entry = find_model(final, MODEL)
    assert dict(entry.version_labels) == {"stable": 2}
    assert list(entry.model_version_policy.specific.versions) == [2, 3]
    entry = find_model(loading, MODEL)
    assert dict(entry.version_labels) == {"stable": 1}  # nothing points at the target yet
    assert list(entry.model_version_policy.specific.versions) == [1, 2, 3]  # old label's version stays loaded
