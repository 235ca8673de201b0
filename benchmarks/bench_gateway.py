"""Gateway benchmark: what the clinical gateway costs in front of TF Serving, and its memory under the trial inputs.

    .venv/bin/python benchmarks/bench_gateway.py [--samples 400] [--rounds 4]

Same run, same upstream (`medpipe serve`, batching off) and SavedModel (an untrained brain_mri network from
config/brain_mri.yaml unless --run; speed does not depend on the weights):
1. p50 / p99 of a batch-1 PNG Predict through the gateway (gRPC, mTLS on, official stubs) against the same request
   sent directly upstream; the two arms alternate in --rounds blocks so the shared machine's load hits both alike.
   Target: p50 overhead <= 3 ms.
2. DICOM (the CT and MR samples): through the gateway (raw DICOM in; the gateway decodes) against `medpipe predict`'s
   way (preprocess_bytes on the client, then the PNG directly upstream): p50 per image.
3. The gateway's peak RSS (VmHWM) before and after the trial's inputs: 10,000 images in one REST request, a real
   20000 x 20000 PNG, the shape-bomb TensorProto, 500 slow connections, malformed JSON. Target: growth <= 300 MB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MODEL = "brain_mri"
DICOMS = {"ct": ROOT / "sample_data" / "dicom" / "CT-MONO2-16-brain.dcm",
          "mr": ROOT / "sample_data" / "dicom" / "MR-MONO2-8-16x-heart.dcm"}


def request(images: list[bytes]):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return req


def timed(stub, req, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        stub.Predict(req, timeout=30)
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def interleaved(arms: dict, samples: int, rounds: int) -> dict:
    """{name: callable(n) -> times}: A/B/A/B blocks; -> {name: all times}."""
    times = {name: [] for name in arms}
    for name, run in arms.items():
        run(20)  # warm-up
    for _ in range(rounds):
        for name, run in arms.items():
            times[name] += run(samples // rounds)
    return times


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trial(rest: str, grpc_stub, pki: dict) -> dict:
    """The trial's inputs, each checked for its clear refusal; -> seconds per input."""
    import grpc
    import httpx
    from gateway_support import huge_png
    from tensorflow_serving.apis import predict_pb2

    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    seconds = {}
    tiny = base64.b64encode(huge_png(32, 32)).decode()
    with httpx.Client(base_url=rest, verify=context, timeout=120) as http:
        url = f"/v1/models/{MODEL}:predict"
        start = time.monotonic()
        assert http.post(url, json={"instances": [{"b64": tiny}] * 10_000}).status_code == 400
        seconds["10000_images"] = time.monotonic() - start
        start = time.monotonic()
        big = base64.b64encode(huge_png(20_000, 20_000)).decode()
        assert http.post(url, json={"instances": [{"b64": big}]}).status_code == 400
        seconds["20000x20000_png"] = time.monotonic() - start
        start = time.monotonic()
        assert http.post(url, content=b'{"instances": [').status_code == 400
        assert http.post(url, content=b"[" * 100_000 + b"]" * 100_000).status_code == 400
        seconds["malformed_json"] = time.monotonic() - start
    bomb = predict_pb2.PredictRequest()
    bomb.model_spec.name = MODEL
    bomb.inputs["image_bytes"].dtype = 7  # DT_STRING
    bomb.inputs["image_bytes"].tensor_shape.dim.add(size=3000)
    bomb.inputs["image_bytes"].string_val.extend([b"a", b"b"])
    start = time.monotonic()
    try:
        grpc_stub.Predict(bomb, timeout=30)
        raise AssertionError("the shape bomb was accepted")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    seconds["shape_bomb"] = time.monotonic() - start
    host, port = rest.split("://")[1].rsplit(":", 1)
    start = time.monotonic()
    slow = []
    for _ in range(500):
        conn = context.wrap_socket(socket.create_connection((host, int(port)), timeout=60), server_hostname="localhost")
        conn.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n".encode())
        slow.append(conn)
    for conn in slow:
        try:
            conn.recv(4096)
        except OSError:
            pass
        conn.close()
    seconds["500_slow_connections_all_closed"] = time.monotonic() - start
    return {k: round(v, 2) for k, v in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="training run directory (default: an untrained brain_mri network)")
    parser.add_argument("--samples", type=int, default=400, help="requests per arm for the p50/p99 figures")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per arm")
    args = parser.parse_args(argv)

    import grpc
    from bench_serving import make_run, publish, start_server, stop
    from gateway_support import CLIENT_SUBJECT, make_pki, start_gateway
    from gateway_support import stop as stop_gateway
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    work = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    run = Path(args.run) if args.run else make_run(work, ["training.weights=none"])
    repo = work / "models"
    publish(run, repo)
    config = load_config(run / "config.yaml")
    image = sorted((ROOT / "sample_data" / "brain_mri" / "glioma").iterdir())[0]
    png = preprocess_bytes(image.read_bytes(), config).png
    pki = make_pki(work / "pki")
    (work / "gateway.yaml").write_text(json.dumps({
        "limits": {"rate_per_minute": 1_000_000, "header_timeout_s": 5,
                   "accept_rate_per_s": 0},  # one client address opens the 500 slow connections
        "identities": {CLIENT_SUBJECT: ["predict:*", "metrics:read"]}}))
    upstream, upstream_address = start_server(repo, batching=False)
    gateway = None
    try:
        gateway, gateway_address, rest = start_gateway(
            ["--upstream", upstream_address, "--tls-cert", str(pki["server_cert"]), "--tls-key",
             str(pki["server_key"]), "--client-ca", str(pki["ca"]), "--audit-log", str(work / "audit.jsonl"),
             "--request-log", str(work / "requests"), "--config", str(work / "gateway.yaml"),
             "--model-repository", str(repo)], work / "gateway.log")
        credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["client_key"].read_bytes(),
                                                   pki["client_cert"].read_bytes())
        with grpc.insecure_channel(upstream_address) as direct_channel, \
                grpc.secure_channel(gateway_address, credentials) as gateway_channel:
            direct = prediction_service_pb2_grpc.PredictionServiceStub(direct_channel)
            through = prediction_service_pb2_grpc.PredictionServiceStub(gateway_channel)
            png_request = request([png])
            times = interleaved({"direct": lambda n: timed(direct, png_request, n),
                                 "gateway_mtls": lambda n: timed(through, png_request, n)},
                                args.samples, args.rounds)
            figures = {"image_size": config.image.size, "samples_per_arm": len(times["direct"])}
            for name, values in times.items():
                figures[f"png_{name}_p50_ms"] = round(statistics.median(values) * 1e3, 3)
                figures[f"png_{name}_p99_ms"] = round(percentile(values, 0.99) * 1e3, 3)
            figures["png_p50_overhead_ms"] = round(figures["png_gateway_mtls_p50_ms"] - figures["png_direct_p50_ms"], 3)

            dicom_samples = max(20, args.samples // 8)
            for name, path in DICOMS.items():
                data = path.read_bytes()
                raw_request = request([data])

                def client_side(n, data=data):
                    out = []
                    for _ in range(n):
                        start = time.perf_counter()
                        direct.Predict(request([preprocess_bytes(data, config).png]), timeout=30)
                        out.append(time.perf_counter() - start)
                    return out

                dicom_times = interleaved({"client_preprocessing": client_side,
                                           "gateway": lambda n, req=raw_request: timed(through, req, n)},
                                          dicom_samples, args.rounds)
                for arm, values in dicom_times.items():
                    figures[f"dicom_{name}_{arm}_p50_ms"] = round(statistics.median(values) * 1e3, 3)

            pid = gateway.pid
            figures["gateway_rss_before_trial_mb"] = round(vm(pid, "VmRSS"), 1)
            figures["gateway_peak_rss_before_trial_mb"] = round(vm(pid, "VmHWM"), 1)
            figures["trial_seconds"] = trial(rest, through, pki)
            figures["gateway_peak_rss_after_trial_mb"] = round(vm(pid, "VmHWM"), 1)
            figures["gateway_peak_rss_growth_mb"] = round(figures["gateway_peak_rss_after_trial_mb"]
                                                          - figures["gateway_peak_rss_before_trial_mb"], 1)
            timed(through, png_request, 5)  # still serving after the trial
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        stop(upstream)
    figures["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    targets = {"png_p50_overhead_ms": "<= 3 ms (gateway with mTLS vs direct, batch-1 PNG)",
               "gateway_peak_rss_growth_mb": "<= 300 MB under the trial's inputs"}
    passed = {"png_p50_overhead_ms": figures["png_p50_overhead_ms"] <= 3.0,
              "gateway_peak_rss_growth_mb": figures["gateway_peak_rss_growth_mb"] <= 300}
    write_result("gateway", "benchmarks/bench_gateway.py " + " ".join(argv or sys.argv[1:]), figures, targets, passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
