"""The TF Serving-compatible server, driven only through the official tensorflow_serving stubs and REST.

One server process per module, over a repository filled by the real `medpipe publish` from the session's trained
sample run. Covers Predict/Classify/metadata/status/health, labels, reload, bad requests with TF Serving's codes,
the request log, Prometheus names, and a corrupt version folder refused while the previous version serves.
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
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def start_server(repo: Path, log_dir: Path, *extra: str):
    grpc_port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
         "--grpc-port", str(grpc_port), "--rest-port", str(rest_port), "--poll-seconds", "0.5", *extra],
        cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=open(log_dir / "server.log", "w"),
        stderr=subprocess.STDOUT)
    rest = f"http://127.0.0.1:{rest_port}"
    wait_available(rest, MODEL, process)
    return process, f"127.0.0.1:{grpc_port}", rest


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
                    signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if label:
        request.model_spec.version_label = label
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, dtype=dtype))
    return request


# ---- fixtures --------------------------------------------------------------------------------------------------
def drift_flags(ingested: Path) -> list[str]:
    """--drift-baseline when this ingest output carries the pixel histogram medpipe.drift needs."""
    stats = ingested / "stats.json"
    has_histogram = stats.is_file() and "pixel_histogram" in json.loads(stats.read_text())
    return ["--drift-baseline", str(ingested)] if has_histogram else []


@pytest.fixture(scope="module")
def served(trained_sample_run, ingested_sample, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    repo = base / "models"
    version = publish(trained_sample_run, repo, "--label", "stable")
    drift = drift_flags(ingested_sample)
    process, grpc_address, rest = start_server(repo, base, "--request-log", str(base / "requests"),
                                               "--max-request-mb", "1", *drift)
    channel = grpc.insecure_channel(grpc_address)
    yield {"process": process, "grpc": grpc_address, "rest": rest, "repo": repo, "base": base, "v1": version,
           "run": trained_sample_run, "channel": channel, "drift": bool(drift),
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

    # the request log: one line per image, caller's id suffixed, 32-bin histogram, no image
    lines = [json.loads(line) for f in (served["base"] / "requests").glob("requests-*.jsonl")
             for line in f.read_text().splitlines()]
    mine = [line for line in lines if line["request_id"].startswith("test-req-")]
    assert [m["request_id"] for m in mine] == [f"test-req-{i}" for i in range(len(IMAGES))]
    assert set(mine[0]) == {"ts", "request_id", "model", "version", "class", "confidence", "probabilities",
                            "pixel_histogram", "pixel_mean"}
    assert len(mine[0]["pixel_histogram"]) == 32 and sum(mine[0]["pixel_histogram"]) == 64 * 64
    assert mine[0]["class"] == names[0] and mine[0]["version"] == served["v1"]


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
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert "medpipe_predictions_total{" in text and "medpipe_batch_size_bucket" in text
    assert f'medpipe_loaded_versions{{model="{MODEL}",version="{served["v1"]}"}} 1.0' in text
    if served["drift"]:
        psi = [line for line in text.splitlines() if line.startswith(f'medpipe_drift_psi{{model="{MODEL}"}}')]
        assert psi and float(psi[0].split()[-1]) >= 0.0


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
