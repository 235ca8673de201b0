"""Decoding cannot hurt the gateway (issue 34): decompression bombs, large 16-bit images four at a time and a decode
worker killed mid-image, over REST, gRPC and DIMSE; and `medpipe serve`'s own limits.

The end-to-end tests run one `medpipe serve` over the shipped model (models/shipped) and one gateway in front of it
(PACS road on, DICOM port open), started as an operator does. The hostile files are built here, about 1 MB each.
Memory is the resident size of the gateway's whole process tree (the main process, the forkserver and the decode
workers), sampled while the attack runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import ROOT, SAMPLE
from fixtures_adversarial import PHI_PATIENT_ID, deflated_dicom, png16
from gateway_support import start_gateway, stop, tree_rss_mb
from pacs_support import DICOM_LINE, write_pacs_config

MODEL = "brain_mri"
SHIPPED = ROOT / "models" / "shipped" / MODEL
JPEG = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[0]
MIB = 2**20


def config_for(size: int = 160):
    from medpipe.config import config_from_dict

    return config_from_dict({"name": MODEL, "task": "multiclass", "labels": ["a", "b"],
                             "image": {"size": size, "channels": 1}}, origin="test")


def small_png(side: int = 300) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(side * side) % 251).astype(np.uint8).reshape(side, side)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """The hostile inputs: ~1 MB each on the wire."""
    return {
        "bomb_1g": deflated_dicom(256, 256, bits=8, pixel_bytes=2**30, zeros=True, level=9),
        "bomb_128m": deflated_dicom(256, 256, bits=8, pixel_bytes=128 * MIB, zeros=True, level=9),
        "trailing_bomb": deflated_dicom(256, 256, bits=8, trailing_bytes=256 * MIB, level=9),
        "dicom_7000": deflated_dicom(7000, 7000, bits=16),
        "png16_7000": png16(7000, 7000),
    }


# ---- medpipe.imaging: bounded header reads and inflation (fast, no servers) -------------------------------------
def test_bombs_are_refused_from_the_header_without_inflating(files):
    from medpipe.errors import RejectedInput
    from medpipe.imaging import inflated_dicom, preprocess_bytes, read_dicom_header

    for name in ("bomb_1g", "bomb_128m"):
        data = files[name]
        assert len(data) < 2 * MIB
        started = time.monotonic()
        for read in (read_dicom_header, lambda d: preprocess_bytes(d, config_for())):
            with pytest.raises(RejectedInput) as refused:
                read(data)
            assert refused.value.reason == "corrupt" and "declares 65536" in refused.value.detail
            assert PHI_PATIENT_ID not in refused.value.detail
        assert time.monotonic() - started < 2, "a refusal from the header must not inflate the pixel data"
        # a header read inflates at most its cap; a full read past its cap is refused while inflating
        assert len(inflated_dicom(data, 4 * MIB, partial=True)) < 5 * MIB
        with pytest.raises(RejectedInput) as capped:
            inflated_dicom(data, 4 * MIB)
        assert capped.value.reason == "pixel_budget"


def test_a_bomb_after_honest_pixel_data_is_refused_while_inflating(files):
    from medpipe.errors import RejectedInput
    from medpipe.imaging import preprocess_bytes, read_dicom_header

    data = files["trailing_bomb"]
    assert read_dicom_header(data, whole=False).Rows == 256  # the header and Pixel Data length are honest ...
    for read in (read_dicom_header, lambda d: preprocess_bytes(d, config_for())):
        with pytest.raises(RejectedInput) as refused:  # ... the stream is not: refused at the cap, kept nowhere
            read(data)
        assert refused.value.reason == "pixel_budget"


def test_deflated_dicom_decodes_like_pydicom():
    import pydicom

    from medpipe.imaging import preprocess_bytes, read_dicom_header, robust_window, to_uint8

    data = deflated_dicom(300, 200, bits=16)
    header = read_dicom_header(data)
    assert (header.Rows, header.Columns) == (300, 200)
    prepared = preprocess_bytes(data, config_for(300))
    reference = pydicom.dcmread(io.BytesIO(data)).pixel_array  # pydicom's own inflate and decode
    expected = robust_window(reference.astype(np.float64), *config_for(300).dicom.voi_percentiles)
    assert prepared.decoded.width == 200 and prepared.decoded.height == 300
    np.testing.assert_array_equal(prepared.pixels[:, 50:250, 0], to_uint8(expected))  # padded to a centred square


def test_photometric_interpretation_is_never_echoed():
    import pydicom

    from medpipe.errors import RejectedInput
    from medpipe.imaging import preprocess_bytes

    ds = pydicom.dcmread(io.BytesIO(deflated_dicom(64, 64, bits=8)))
    ds.PhotometricInterpretation = "HOSTILE_VALUE_42"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(RejectedInput) as refused:
        preprocess_bytes(buffer.getvalue(), config_for())
    assert refused.value.reason == "unsupported_photometric" and "HOSTILE_VALUE_42" not in refused.value.detail


# ---- the decode pool (real worker processes, no servers) ---------------------------------------------------------
def test_pool_overrun_memory_and_kill_refuse_the_input_and_replace_the_worker(files):
    from serving.gateway.decode_pool import DecodeFailure, DecodePool

    config = config_for()
    # an overrun: room enough in memory (the large image's ~300 MB fits in 2 GB), 0.3 s of time
    pool = DecodePool(workers=1, memory_mb=2048, task_timeout_s=0.3)
    try:
        assert pool.decode(small_png(), config, 10).pixels.shape == (160, 160, 1)
        started = time.monotonic()
        with pytest.raises(DecodeFailure) as overrun:
            pool.decode(files["dicom_7000"], config, 10)  # ~4 s of work: killed at 0.3 s
        assert overrun.value.kind == "overrun" and time.monotonic() - started < 2
        assert pool.decode(small_png(), config, 10).pixels.shape == (160, 160, 1)  # a fresh worker serves

        # killed from outside in the middle of an image
        pool.task_timeout_s = 30
        busy = threading.Thread(target=lambda: time.sleep(0.3) or [os.kill(pid, signal.SIGKILL) for pid in pool.pids()])
        busy.start()
        with pytest.raises(DecodeFailure) as died:
            pool.decode(files["dicom_7000"], config, 30)
        busy.join()
        assert died.value.kind == "died"
        assert pool.decode(small_png(), config, 10).pixels.shape == (160, 160, 1)
        assert pool.replaced == 2
    finally:
        pool.close()
    # out of memory: time enough, 384 MB of address space
    pool = DecodePool(workers=1, memory_mb=384, task_timeout_s=30)
    try:
        with pytest.raises(DecodeFailure) as memory:
            pool.decode(files["png16_7000"], config, 30)  # 98 MB of 16-bit pixels: over 384 MB of address space
        assert memory.value.kind in ("memory", "died")
        assert pool.decode(small_png(), config, 10).pixels.shape == (160, 160, 1)
        assert pool.replaced == 1
    finally:
        pool.close()


# ---- end to end: medpipe serve + the gateway ---------------------------------------------------------------------

class PeakTree:
    """The highest resident size of a process tree while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self.start = tree_rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, tree_rss_mb(self.pid))
            except psutil.NoSuchProcess:
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.start


@pytest.fixture(scope="module")
def road(tmp_path_factory):
    from medpipe.models_config import parse_config_text, write_config
    from serving.listen import wait_listening
    from serving.repository import upsert_model

    base = tmp_path_factory.mktemp("hostile")
    repo = base / "models"
    shutil.copytree(SHIPPED, repo / MODEL)
    config = parse_config_text("")
    upsert_model(config, MODEL, str(repo / MODEL), "latest", 1)
    write_config(repo / "models.config", config)
    serve_log = base / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
                              "--grpc-port", "0", "--rest-port", "auto", "--max-request-images", "8"], cwd=ROOT,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=open(serve_log, "w"),
                             stderr=subprocess.STDOUT)
    try:
        upstream = wait_listening(serve_log, serve)
        httpx = pytest.importorskip("httpx")
        deadline = time.monotonic() + 120
        while "AVAILABLE" not in _get(httpx, f"{upstream['rest']}/v1/models/{MODEL}"):
            assert serve.poll() is None and time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(0.3)
        gateway_config = base / "gateway.yaml"
        gateway_config.write_text(json.dumps({"limits": {
            "max_body_mb": 16, "rate_per_minute": 100000, "max_concurrent": 8, "queue_timeout_s": 30,
            "default_deadline_s": 30, "decode_workers": 2, "decode_memory_mb": 1024, "decode_timeout_s": 25}}))
        pacs = write_pacs_config(base / "pacs.yaml", base / "spool")
        audit = base / "audit.jsonl"
        process, grpc_address, rest = start_gateway(
            ["--upstream", upstream["grpc"], "--allow-anonymous", "--audit-log", str(audit), "--config",
             str(gateway_config), "--model-repository", str(repo), "--dicom-port", "0", "--pacs-config", str(pacs),
             "--results-to", "dimse://SINK@127.0.0.1:9"], base / "gateway.log")
        dicom_port = int(DICOM_LINE.search((base / "gateway.log").read_text())["port"])
        client = httpx.Client(base_url=rest, timeout=60)
        channel = grpc.insecure_channel(grpc_address)
        yield {"process": process, "rest": rest, "grpc": grpc_address, "http": client, "channel": channel,
               "audit": audit, "dicom_port": dicom_port, "upstream": upstream, "base": base}
        channel.close()
        client.close()
        assert stop(process) == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def _get(httpx, url: str) -> str:
    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def rest_predict(road, images: list[bytes], request_id: str, timeout_s: float = 30) -> tuple[int, dict, float]:
    started = time.monotonic()
    response = road["http"].post(f"/v1/models/{MODEL}:predict", headers={
        "X-Request-Id": request_id, "X-Request-Timeout": str(timeout_s)},
        json={"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}, timeout=timeout_s + 10)
    return response.status_code, response.json(), time.monotonic() - started


def grpc_predict(road, images: list[bytes], request_id: str, timeout_s: float = 30) -> grpc.StatusCode:
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.gateway.tensors import string_tensor

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["image_bytes"].CopyFrom(string_tensor(images))
    try:
        prediction_service_pb2_grpc.PredictionServiceStub(road["channel"]).Predict(
            request, timeout=timeout_s, metadata=[("x-request-id", request_id)])
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def probe(road, request_id: str) -> None:
    status, body, _ = rest_predict(road, [JPEG.read_bytes()], request_id)
    assert status == 200 and len(body["predictions"]) == 1, body


def audited(road, request_id: str) -> dict:
    for line in road["audit"].read_text().splitlines():
        record = json.loads(line)
        if record.get("request_id") == request_id:
            return record
    raise AssertionError(f"no audit line for request {request_id}")


@pytest.mark.slow
def test_bombs_over_rest_and_grpc_are_refused_audited_and_bounded(road, files):
    with PeakTree(road["process"].pid) as tree:
        for name in ("bomb_1g", "bomb_128m"):
            status, body, seconds = rest_predict(road, [files[name]], f"rest-{name}")
            assert status == 400 and seconds < 10, (status, body)
            assert "declares" in body["error"] and PHI_PATIENT_ID not in body["error"]
            assert audited(road, f"rest-{name}")["outcome"] == "INVALID_ARGUMENT"
            assert grpc_predict(road, [files[name]], f"grpc-{name}") == grpc.StatusCode.INVALID_ARGUMENT
            assert audited(road, f"grpc-{name}")["outcome"] == "INVALID_ARGUMENT"
    assert tree.growth <= 1024, f"the gateway's process tree grew by {tree.growth:.0f} MB"
    probe(road, "probe-after-bombs")
    assert PHI_PATIENT_ID not in road["audit"].read_text()


@pytest.mark.slow
def test_bomb_through_the_dimse_door_is_refused_and_the_gateway_stays_up(road, files, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import AE, _config

    from fixtures_adversarial import MR_IMAGE_STORAGE

    paths = []
    for name in ("bomb_1g", "trailing_bomb"):
        paths.append(tmp_path / f"{name}.dcm")
        paths[-1].write_bytes(files[name])
    sent_whole = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are: the test never inflates them
    try:
        with PeakTree(road["process"].pid) as tree:
            ae = AE(ae_title="MEDPIPETEST")
            ae.add_requested_context(MR_IMAGE_STORAGE, [str(DeflatedExplicitVRLittleEndian)])
            assoc = ae.associate("127.0.0.1", road["dicom_port"], ae_title="MEDPIPE")
            assert assoc.is_established
            try:
                statuses = [int(assoc.send_c_store(path).Status) for path in paths]
            finally:
                assoc.release()
            time.sleep(1.0)  # the PACS loop scans every 0.2 s: it must find nothing to replay
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = sent_whole
    assert statuses == [0xC000, 0xC000], f"C-STORE statuses {statuses}: a bomb must be refused, not spooled"
    assert road["process"].poll() is None
    assert tree.growth <= 1024, f"the gateway's process tree grew by {tree.growth:.0f} MB"
    refusals = [json.loads(line) for line in road["audit"].read_text().splitlines() if '"pacs.refused"' in line]
    assert refusals and refusals[-1]["door"] == "dimse"
    assert not list((road["base"] / "spool").rglob("*.dcm"))
    probe(road, "probe-after-dimse-bomb")


@pytest.mark.slow
def test_four_large_16_bit_images_in_parallel_within_the_deadline(road, files):
    inputs = [files["dicom_7000"], files["png16_7000"], files["dicom_7000"], files["png16_7000"]]
    with PeakTree(road["process"].pid) as tree, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda item: rest_predict(road, [item[1]], f"large-{item[0]}", timeout_s=30),
                                enumerate(inputs)))
    for status, body, seconds in answers:
        assert status in (200, 422, 504), body
        assert seconds <= 30 + 3, f"answered after {seconds:.1f} s against a 30 s deadline"
    assert any(status == 200 for status, _, _ in answers), answers
    assert tree.growth <= 1024, f"the gateway's process tree grew by {tree.growth:.0f} MB"
    probe(road, "probe-after-large")
    time.sleep(1.0)  # the workers that decoded 98 MB images were recycled or gave their memory back
    assert tree_rss_mb(road["process"].pid) - tree.start < 300


@pytest.mark.slow
def test_a_worker_killed_mid_image_refuses_that_image_with_422_and_the_next_is_served(road, files):
    gateway = psutil.Process(road["process"].pid)

    def kill_the_busy_worker():
        """The decode worker holding the image (workers are the forkserver's children): killed by its pid."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for process in gateway.children(recursive=True):
                try:
                    if process.ppid() != gateway.pid and process.memory_info().rss > 150 * MIB:
                        os.kill(process.pid, signal.SIGKILL)  # a worker of the gateway this test started
                        return process.pid
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.02)
        return None

    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_the_busy_worker)
        status, body, _ = rest_predict(road, [files["dicom_7000"]], "killed-worker")
    assert killed.result() is not None, "no decode worker was seen busy"
    assert status == 422 and "decode_limit" in body["error"], body
    record = audited(road, "killed-worker")
    assert record["outcome"] == "INVALID_ARGUMENT" and record["limit"] == "decode_limit"
    probe(road, "probe-after-kill")


# ---- medpipe serve's own limits ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_refuses_too_many_images_and_reload_without_allow_reload(road):
    from tensorflow_serving.apis import (model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    from serving.gateway.tensors import string_tensor

    png = small_png(160)
    with grpc.insecure_channel(road["upstream"]["grpc"]) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.inputs["image_bytes"].CopyFrom(string_tensor([png] * 9))
        with pytest.raises(grpc.RpcError) as refused:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "9 images" in refused.value.details() and "--max-request-images" in refused.value.details()
        request.inputs["image_bytes"].CopyFrom(string_tensor([png] * 8))
        assert prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30).outputs
        with pytest.raises(grpc.RpcError) as reload:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(), timeout=30)
        assert reload.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--allow-reload" in reload.value.details()
    import httpx

    body = {"instances": [{"b64": base64.b64encode(png).decode()}] * 9}
    response = httpx.post(f"{road['upstream']['rest']}/v1/models/{MODEL}:predict", json=body, timeout=30)
    assert response.status_code == 400 and "--max-request-images" in response.json()["error"]
