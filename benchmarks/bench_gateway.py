"""Gateway benchmark: what the clinical gateway costs in front of TF Serving, and its memory under the trial inputs.

    .venv/bin/python benchmarks/bench_gateway.py [--samples 400] [--rounds 4] [--run RUN]
    .venv/bin/python benchmarks/bench_gateway.py --smoke      # tiny sizes, a minute; prints, writes no result

Same run, same upstream (`medpipe serve`, batching off) and SavedModel (the shipped brain_mri model of
models/shipped unless --run: it carries the safety outputs publish requires; speed does not depend on the weights):
1. p50 / p99 of a batch-1 PNG Predict through the gateway (gRPC, mTLS on, official stubs) against the same request
   sent directly upstream; the two arms alternate in --rounds blocks so the shared machine's load hits both alike.
   The exact-size PNG is decoded in the gateway's own process (bounded); a 512 px PNG goes through the decode pool
   (serving/gateway/decode_pool.py) and is compared with client-side preprocessing + the direct call.
   Target: p50 overhead <= 3 ms.
2. DICOM (the CT and MR samples): through the gateway (raw DICOM in; the gateway decodes) against `medpipe predict`'s
   way (preprocess_bytes on the client, then the PNG directly upstream): p50 per image.
3. Memory per image in a decode worker (peak resident growth of one worker) by size and kind: 512, 2048, 7000 px;
   8/16-bit PNG and 16-bit deflated DICOM. Budget: <= 4x the image's pixel bytes plus a constant.
4. The gateway's peak RSS (VmHWM, main process) and its process tree (main + decode workers) under the trial's
   inputs: 10,000 images in one REST request, a real 20000 x 20000 PNG, the shape-bomb TensorProto, deflated-DICOM
   bombs (1 GiB and 128 MiB inflated), four 7000 x 7000 16-bit images in parallel, 500 slow connections, malformed
   JSON. Targets: main-process growth <= 300 MB, tree growth <= 1 GB.
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
from gateway_support import tree_rss_mb  # noqa: E402  (the gateway, its forkserver and decode workers)
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


def peak_tree_while(pid: int, work) -> tuple[float, object]:
    """(peak tree RSS growth in MB while work() runs, its result), sampled every 50 ms."""
    import threading

    start, peak, done = tree_rss_mb(pid), [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return round(max(peak[0], start) - start, 1), result


def trial(rest: str, grpc_stub, pki: dict, pid: int, smoke: bool) -> dict:
    """The trial's inputs, each checked for its clear refusal; -> seconds per input and tree growth."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import httpx
    from fixtures_adversarial import deflated_dicom, png16
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
        side = 4000 if smoke else 20_000
        start = time.monotonic()
        big = base64.b64encode(huge_png(side, side)).decode()
        assert http.post(url, json={"instances": [{"b64": big}]}).status_code in (200, 400)
        seconds[f"{side}x{side}_png"] = time.monotonic() - start
        bombs = {"128m": 128 * 2**20} if smoke else {"1g": 2**30, "128m": 128 * 2**20}
        for name, inflated in bombs.items():
            bomb = base64.b64encode(deflated_dicom(256, 256, bits=8, pixel_bytes=inflated, zeros=True,
                                                   level=9)).decode()
            start = time.monotonic()
            growth, status = peak_tree_while(pid, lambda: http.post(url, json={"instances": [{"b64": bomb}]})
                                             .status_code)
            assert status == 400, status
            seconds[f"deflated_bomb_{name}"] = time.monotonic() - start
            seconds[f"deflated_bomb_{name}_tree_growth_mb"] = growth
        side = 2048 if smoke else 7000
        large = [base64.b64encode(deflated_dicom(side, side, bits=16)).decode(),
                 base64.b64encode(png16(side, side)).decode()] * 2

        def four():
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda b64: http.post(url, json={"instances": [{"b64": b64}]},
                                                           headers={"X-Request-Timeout": "30"}).status_code, large))

        start = time.monotonic()
        growth, statuses = peak_tree_while(pid, four)
        seconds[f"parallel_4x{side}_16bit"] = time.monotonic() - start
        seconds[f"parallel_4x{side}_16bit_statuses"] = statuses
        seconds[f"parallel_4x{side}_16bit_tree_growth_mb"] = growth
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
    for _ in range(20 if smoke else 500):
        conn = context.wrap_socket(socket.create_connection((host, int(port)), timeout=60), server_hostname="localhost")
        conn.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n".encode())
        slow.append(conn)
    for conn in slow:
        try:
            conn.recv(4096)
        except OSError:
            pass
        conn.close()
    seconds[f"{len(slow)}_slow_connections_all_closed"] = time.monotonic() - start
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in seconds.items()}


def memory_per_image(config, smoke: bool) -> dict:
    """Peak resident growth of one decode worker (VmHWM after - VmRSS before) per image kind and size, each in a
    fresh worker; -> {kind_size: {"mb": growth, "pixel_mb": pixel bytes, "ratio": growth / pixel bytes}}."""
    import io

    import numpy as np
    from fixtures_adversarial import deflated_dicom, png16
    from PIL import Image

    from serving.gateway.decode_pool import DecodePool

    def png8(side: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray((np.arange(side * side) % 251).astype(np.uint8).reshape(side, side)).save(buffer, "PNG")
        return buffer.getvalue()

    sizes = (512, 2048) if smoke else (512, 2048, 7000)
    kinds = {"png8": (png8, 1), "png16": (lambda side: png16(side, side), 2),
             "dicom16_deflated": (lambda side: deflated_dicom(side, side, bits=16), 2)}
    out = {}
    for kind, (build, depth) in kinds.items():
        for side in sizes:
            data = build(side)
            pool = DecodePool(workers=1, memory_mb=0, task_timeout_s=120, recycle_mb=10**6)
            try:
                pool.decode(png8(64), config, 60)  # warm: the libraries' first-use allocations are the constant
                pid = pool.pids()[0]
                before = vm(pid, "VmRSS")
                pool.decode(data, config, 120)
                growth = vm(pid, "VmHWM") - before
            finally:
                pool.close()
            pixel_mb = side * side * depth / 2**20
            out[f"{kind}_{side}"] = {"mb": round(growth, 1), "pixel_mb": round(pixel_mb, 1),
                                     "ratio": round(growth / pixel_mb, 2)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="training run directory (default: an untrained brain_mri network)")
    parser.add_argument("--samples", type=int, default=400, help="requests per arm for the p50/p99 figures")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per arm")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and counts (a minute): checks that the "
                        "benchmark runs; prints its figures and writes no result file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.rounds = 20, 1

    import grpc
    from bench_serving import publish, start_server, stop
    from gateway_support import CLIENT_SUBJECT, make_pki, start_gateway
    from gateway_support import stop as stop_gateway
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    work = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    repo = work / "models"
    if args.run:  # a trained run: published as `medpipe publish` does (it holds the safety outputs)
        publish(Path(args.run), repo)
        config = load_config(Path(args.run) / "config.yaml")
    else:
        config = shipped_repository(repo)
    image = sorted((ROOT / "sample_data" / "brain_mri" / "glioma").iterdir())[0]
    png = preprocess_bytes(image.read_bytes(), config).png
    png512 = png_of_side(image, 512)
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

            # a 512 px PNG: decoded in the gateway's decode pool, against the client preprocessing it itself
            pool_request = request([png512])

            def client_512(n):
                out = []
                for _ in range(n):
                    start = time.perf_counter()
                    direct.Predict(request([preprocess_bytes(png512, config).png]), timeout=30)
                    out.append(time.perf_counter() - start)
                return out

            pool_times = interleaved({"client_preprocessing": client_512,
                                      "gateway_decode_pool": lambda n: timed(through, pool_request, n)},
                                     args.samples, args.rounds)
            for arm, values in pool_times.items():
                figures[f"png512_{arm}_p50_ms"] = round(statistics.median(values) * 1e3, 3)
            figures["png512_p50_overhead_ms"] = round(figures["png512_gateway_decode_pool_p50_ms"]
                                                      - figures["png512_client_preprocessing_p50_ms"], 3)

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
            figures["gateway_tree_rss_before_trial_mb"] = round(tree_rss_mb(pid), 1)
            figures["trial"] = trial(rest, through, pki, pid, args.smoke)
            figures["gateway_peak_rss_after_trial_mb"] = round(vm(pid, "VmHWM"), 1)
            figures["gateway_peak_rss_growth_mb"] = round(figures["gateway_peak_rss_after_trial_mb"]
                                                          - figures["gateway_peak_rss_before_trial_mb"], 1)
            timed(through, png_request, 5)  # still serving after the trial
            time.sleep(2)
            figures["gateway_tree_rss_after_trial_mb"] = round(tree_rss_mb(pid), 1)
        figures["decode_worker_memory_per_image"] = memory_per_image(config, args.smoke)
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        stop(upstream)
    figures["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    tree_growths = [v for k, v in figures["trial"].items() if k.endswith("_tree_growth_mb")]
    figures["trial_tree_growth_max_mb"] = max(tree_growths)
    per_image = figures["decode_worker_memory_per_image"]
    figures["memory_per_image_max_ratio"] = max(entry["ratio"] for key, entry in per_image.items()
                                                if entry["pixel_mb"] >= 4)  # small images: the constant dominates
    targets = {"png_p50_overhead_ms": "<= 3 ms (gateway with mTLS vs direct, batch-1 PNG)",
               "gateway_peak_rss_growth_mb": "<= 300 MB under the trial's inputs (main process)",
               "trial_tree_growth_max_mb": "<= 1 GB (main process + decode workers) under bombs and 4 large images",
               "memory_per_image_max_ratio": "<= 4x the pixel bytes (images of >= 4 MB of pixels)"}
    passed = {"png_p50_overhead_ms": figures["png_p50_overhead_ms"] <= 3.0,
              "gateway_peak_rss_growth_mb": figures["gateway_peak_rss_growth_mb"] <= 300,
              "trial_tree_growth_max_mb": figures["trial_tree_growth_max_mb"] <= 1024,
              "memory_per_image_max_ratio": figures["memory_per_image_max_ratio"] <= 4}
    if args.smoke:
        print(json.dumps({"figures": figures, "passed": passed}, indent=2))
        return 0
    write_result("gateway", "benchmarks/bench_gateway.py " + " ".join(argv or sys.argv[1:]), figures, targets, passed)
    return 0


def png_of_side(image: Path, side: int) -> bytes:
    """A grey PNG of side x side from a sample JPEG: not the model's size, so the gateway must decode and resize."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(image).convert("L").resize((side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def shipped_repository(repo: Path):
    """The shipped brain_mri model (models/shipped) as a one-model repository; -> its preprocessing TaskConfig.
    The benchmark's default model: a real published version with its safety outputs, nothing to train."""
    import shutil

    from medpipe.config import load_config
    from medpipe.models_config import parse_config_text, write_config
    from serving.repository import upsert_model

    shutil.copytree(ROOT / "models" / "shipped" / MODEL, repo / MODEL)
    models = parse_config_text("")
    upsert_model(models, MODEL, str(repo / MODEL), "latest", 1)
    write_config(repo / "models.config", models)
    return load_config(ROOT / "config" / "brain_mri.yaml")


if __name__ == "__main__":
    sys.exit(main())
