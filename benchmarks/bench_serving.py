"""Serving benchmark: gRPC overhead, server-side batching, and publishing under load.

    .venv/bin/python benchmarks/bench_serving.py [--run RUN_DIR] [--seconds 8] [--rounds 3]

1. gRPC Predict at batch 1 (medpipe serve, batching off) vs the in-process call of the same SavedModel signature on
   the same PNG, same run: p50 overhead (target <= 2 ms).
2. 16 concurrent closed-loop clients, batch 1 each: throughput with server-side batching vs without (target >= 1.5x).
   Both servers run side by side and are measured A/B/B/A... (this machine is shared: load hits both arms alike);
   each phase records the server's and the clients' CPU and the load average.
3. 3 versions published while the batching load runs: failed requests (target 0).
Without --run, a brain_mri compact_cnn (config/brain_mri.yaml, untrained weights: speed does not depend on them)
is saved in the run layout in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MODEL = "brain_mri"
CLIENTS = 16


def make_run(folder: Path, overrides=()) -> Path:
    from medpipe.config import dump_config, load_config
    from medpipe.schema import DatasetSchema, write_schema
    from models.architectures import build_model

    config = load_config(ROOT / "config" / "brain_mri.yaml", overrides)
    run = folder / "run"
    run.mkdir(parents=True)
    dump_config(config, run / "config.yaml")
    write_schema(run, DatasetSchema.from_config(config))
    build_model(config, len(config.labels)).save(run / "model.keras")
    return run


def publish(run: Path, repo: Path) -> int:
    from serving.publish import publish_run, update_config

    version = publish_run(run, repo, MODEL)
    update_config(repo, MODEL, {}, None)
    return version


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repo: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    import urllib.request

    grpc_port, rest_port = free_port(), free_port()
    command = [sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--rest-port", str(rest_port), "--poll-seconds", "0.5"]
    command += ["--batching-config", str(ROOT / "config" / "serving" / "batching.config")] if batching else \
        ["--no-batching"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/{MODEL}", timeout=1) as r:
                if b"AVAILABLE" in r.read():
                    return process, f"127.0.0.1:{grpc_port}"
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("benchmark: the server did not become AVAILABLE")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def request(png: bytes):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    req.model_spec.signature_name = "serving_default"
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([png], dtype=tf.string))
    return req


def p50_in_process(version_dir: Path, png: bytes, n: int) -> float:
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    for _ in range(20):
        signature(image_bytes=tf.constant([png]))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        signature(image_bytes=tf.constant([png]))["probabilities"].numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def p50_grpc(address: str, png: bytes, n: int) -> float:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    req = request(png)
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(20):
            stub.Predict(req, timeout=10)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            stub.Predict(req, timeout=10)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(address: str, png: bytes, seconds: float, during=None) -> dict:
    """CLIENTS closed-loop clients, each with one batch-1 Predict in flight for `seconds`; `during()` runs
    meanwhile (e.g. publishing). The clients are gRPC futures whose callbacks send the next request, so 16 clients
    cost a fraction of a core instead of 16 Python threads competing with the server for the 2 cores."""
    import resource

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    req = request(png)
    done, failures, versions = [0] * CLIENTS, [], set()
    stop_at = [float("inf") if during is not None else time.monotonic() + seconds]
    channels = [grpc.insecure_channel(address) for _ in range(4)]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(channels[i % len(channels)]) for i in range(CLIENTS)]
    lock, finished = threading.Lock(), threading.Semaphore(0)

    def send(i):
        if time.monotonic() >= stop_at[0]:
            finished.release()
            return
        stubs[i].Predict.future(req, timeout=30).add_done_callback(lambda f: answered(i, f))

    def answered(i, future):
        try:
            version = future.result().model_spec.version.value
            with lock:
                versions.add(version)
                done[i] += 1
        except grpc.RpcError as exc:
            with lock:
                failures.append(f"{exc.code().name}: {exc.details()}")
        send(i)

    cpu_start, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for i in range(CLIENTS):
        send(i)
    if during is not None:
        during()
        stop_at[0] = time.monotonic() + 5.0  # keep the load on while the last version loads
    for _ in range(CLIENTS):
        finished.acquire()
    elapsed = time.monotonic() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        channel.close()
    client_cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    return {"requests": sum(done), "rps": sum(done) / elapsed, "failed": len(failures),
            "failures": failures[:5], "versions_seen": sorted(versions), "client_cpu_cores": client_cpu / elapsed}


def process_cpu_seconds(process: subprocess.Popen) -> float:
    """utime + stime of a server process (Linux /proc), to report the CPU each arm used."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(arms: dict, png: bytes, seconds: float, rounds: int) -> dict:
    """A/B/A/B...: `rounds` phases of `seconds` per arm, alternating (order flipped every round), so machine load
    from other jobs hits both arms alike. Returns per-arm totals and each phase's rps and the load average."""
    results = {name: {"requests": 0, "seconds": 0.0, "failed": 0, "server_cpu_seconds": 0.0, "phases": []}
               for name in arms}
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            process, address = arms[name]
            cpu = process_cpu_seconds(process)
            phase = load(address, png, seconds)
            total = results[name]
            total["server_cpu_seconds"] += process_cpu_seconds(process) - cpu
            server_cpu = (process_cpu_seconds(process) - cpu) / seconds
            total["requests"] += phase["requests"]
            total["seconds"] += phase["requests"] / phase["rps"]
            total["failed"] += phase["failed"]
            total["phases"].append({"rps": round(phase["rps"], 1), "server_cpu_cores": round(server_cpu, 2),
                                    "client_cpu_cores": round(phase["client_cpu_cores"], 2),
                                    "loadavg_1m": os.getloadavg()[0]})
            print(f"benchmark: {name} round {r + 1}: {phase['rps']:.1f} req/s, server {server_cpu:.2f} cores, "
                  f"client {phase['client_cpu_cores']:.2f} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    for total in results.values():
        total["rps"] = total["requests"] / total["seconds"]
        total["per_core_second"] = total["requests"] / max(total["server_cpu_seconds"], 1e-9)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="training run directory (default: an untrained compact_cnn at 128x128)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds of the batching comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the generated model, e.g. image.size=64 (repeatable)")
    parser.add_argument("--samples", type=int, default=300, help="sequential requests for the p50 figures")
    args = parser.parse_args(argv)

    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    run = Path(args.run) if args.run else make_run(work, args.overrides)
    repo = work / "models"
    first = publish(run, repo)
    config = load_config(run / "config.yaml")
    image = sorted((ROOT / "sample_data" / "brain_mri" / "glioma").iterdir())[0]
    png = preprocess_bytes(image.read_bytes(), config).png

    in_process = p50_in_process(repo / MODEL / str(first), png, args.samples)
    # both servers run side by side (the idle one costs nothing) so the two arms can be measured interleaved
    plain, plain_address = start_server(repo, batching=False)
    batching, batching_address = start_server(repo, batching=True)
    try:
        over_grpc = p50_grpc(plain_address, png, args.samples)
        arms = interleaved({"without_batching": (plain, plain_address), "with_batching": (batching, batching_address)},
                           png, args.seconds, args.rounds)
        unbatched, batched = arms["without_batching"], arms["with_batching"]
        stop(plain)
        published: list[int] = []

        def publish_three():
            for _ in range(3):
                time.sleep(args.seconds / 2)
                published.append(publish(run, repo))

        under_publish = load(batching_address, png, args.seconds, during=publish_three)
    finally:
        for process in (plain, batching):
            if process.poll() is None:
                stop(process)

    figures = {
        "image_size": config.image.size, "model": config.training.model, "width": config.training.width,
        "p50_in_process_ms": round(in_process * 1e3, 3), "p50_grpc_ms": round(over_grpc * 1e3, 3),
        "p50_overhead_ms": round((over_grpc - in_process) * 1e3, 3),
        "clients": CLIENTS, "rps_without_batching": round(unbatched["rps"], 1),
        "rps_with_batching": round(batched["rps"], 1),
        "batching_speedup": round(batched["rps"] / unbatched["rps"], 2),
        "failed_without_batching": unbatched["failed"], "failed_with_batching": batched["failed"],
        "requests_per_server_core_second_without_batching": round(unbatched["per_core_second"], 1),
        "requests_per_server_core_second_with_batching": round(batched["per_core_second"], 1),
        "loadavg_1m_during_comparison": [phase["loadavg_1m"] for phase in unbatched["phases"] + batched["phases"]],
        "phases_without_batching": unbatched["phases"], "phases_with_batching": batched["phases"],
        "published_under_load": published, "versions_seen_under_load": under_publish["versions_seen"],
        "requests_under_publish": under_publish["requests"], "failed_under_publish": under_publish["failed"],
        "failure_examples": under_publish["failures"],
    }
    targets = {"p50_overhead": "<= 2 ms", "batching_speedup": ">= 1.5x", "publish_under_load": "0 failed requests"}
    passed = {"p50_overhead": figures["p50_overhead_ms"] <= 2.0, "batching_speedup": figures["batching_speedup"] >= 1.5,
              "publish_under_load": under_publish["failed"] == 0 and len(published) == 3}
    write_result("serving", "benchmarks/bench_serving.py", figures, targets, passed)
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
