"""Serving benchmark: gRPC overhead, server-side batching, and publishing under load.

    .venv/bin/python benchmarks/bench_serving.py [--models compact_cnn,efficientnet_b0] [--seconds 6] [--rounds 3]

1. gRPC Predict at batch 1 (medpipe serve, batching off) vs the in-process call of the same SavedModel signature on
   the same PNG, same run: p50 overhead (target <= 2 ms).
2. For each model in --models: 16 concurrent closed-loop clients, batch 1 each, throughput with server-side batching
   vs without (target >= 1.5x). Both servers run side by side and are measured A/B/B/A... (this machine is shared:
   load hits both arms alike); each phase records the server's and the clients' CPU and the load average. Both
   arms are also measured with TensorFlow threads tuned for concurrent requests (--intra-op-threads 1
   --inter-op-threads CORES), which is the best setting without batching on this machine.
   The same run also measures the model's own batch gain in-process (16 threads calling it at batch 1 vs
   num_batch_threads threads at batch 8): no server can batch a model to more than that, so it is reported as the
   ceiling beside the server's figure.
3. 3 versions published while the batching load runs (first model): failed requests (target 0), and how long after
   each publish the clients first got an answer from the new version (target <= 2 s).
Without --run, the models are brain_mri networks from config/brain_mri.yaml with untrained weights (speed does not
depend on them), saved in the run layout in a temporary folder. --server-arg passes options to both servers, e.g.
--server-arg=--intra-op-threads=1 --server-arg=--inter-op-threads=2.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

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


BATCHING_CONFIG = ROOT / "config" / "serving" / "batching.config"


def start_server(repo: Path, batching: bool, extra: Sequence[str] = (),
                 batching_config: Path = BATCHING_CONFIG) -> tuple[subprocess.Popen, str]:
    import urllib.request

    from serving.listen import wait_listening

    command = [sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
               "--grpc-port", "0", "--rest-port", "auto", "--poll-seconds", "0.5", *extra]
    command += ["--batching-config", str(batching_config)] if batching else ["--no-batching"]
    log = Path(tempfile.mkstemp(prefix="bench_serving_", suffix=".log")[1])
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    listening = wait_listening(log, process)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{listening['rest']}/v1/models/{MODEL}", timeout=1) as r:
                if b"AVAILABLE" in r.read():
                    return process, listening["grpc"]
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


def in_process_batch_gain(version_dir: Path, png: bytes, seconds: float, batch: int, threads: int) -> dict:
    """Throughput of the served signature called in-process by CLIENTS threads at batch 1 vs `threads` threads at
    `batch`: what batching can gain for this model on this machine before any server overhead."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]

    def throughput(size: int, workers: int) -> float:
        inputs = tf.constant([png] * size)
        for _ in range(3):
            signature(image_bytes=inputs)
        count, stop_at = [0] * workers, time.monotonic() + seconds

        def work(i):
            while time.monotonic() < stop_at:
                signature(image_bytes=inputs)["probabilities"].numpy()
                count[i] += size

        pool = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        start = time.monotonic()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return sum(count) / (time.monotonic() - start)

    single, batched = throughput(1, CLIENTS), throughput(batch, threads)
    return {"in_process_images_per_s_batch_1": round(single, 1), f"in_process_images_per_s_batch_{batch}":
            round(batched, 1), "in_process_batch_gain": round(batched / single, 2)}


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
    done, failures, versions, first_seen = [0] * CLIENTS, [], set(), {}
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
                if version not in versions:
                    first_seen[version] = time.monotonic()
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
            "failures": failures[:5], "versions_seen": sorted(versions), "first_seen": first_seen,
            "client_cpu_cores": client_cpu / elapsed}


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
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
            print(f"benchmark: {name} round {r + 1}: {phase['rps']:.1f} req/s, server {server_cpu:.2f} cores, "
                  f"client {phase['client_cpu_cores']:.2f} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    for total in results.values():
        total["rps"] = total["requests"] / total["seconds"]
        total["per_core_second"] = total["requests"] / max(total["server_cpu_seconds"], 1e-9)
    return results


TUNED_THREADS = ["--intra-op-threads=1", f"--inter-op-threads={os.cpu_count() or 2}"]


def compare_batching(run: Path, repo: Path, png: bytes, args) -> tuple[dict, tuple]:
    """The batching comparison for one model, four servers measured interleaved: batching on/off with the server's
    default TensorFlow threads (TF Serving's defaults: the A/B the target is about) and with threads tuned for
    many concurrent requests (one thread per op, as many ops at once as cores), so the best configuration without
    batching is known too. Also the model's in-process batch gain. Returns the figures and the still running
    default batching server (process, address) for the publish-under-load phase."""
    from serving.batching import read_batching_config

    params = read_batching_config(BATCHING_CONFIG)
    version = publish(run, repo)
    ceiling = in_process_batch_gain(repo / MODEL / str(version), png, args.seconds / 2, min(8, params.max_batch_size),
                                    params.num_batch_threads)
    servers = {
        "without_batching": start_server(repo, batching=False, extra=args.server_args),
        "with_batching": start_server(repo, batching=True, extra=args.server_args),
        "without_batching_tuned_threads": start_server(repo, False, extra=[*args.server_args, *TUNED_THREADS]),
        "with_batching_tuned_threads": start_server(repo, True, extra=[*args.server_args, *TUNED_THREADS]),
    }
    try:
        arms = interleaved(servers, png, args.seconds, args.rounds)
    except BaseException:
        stop(servers["with_batching"][0])
        raise
    finally:
        for name, (process, _) in servers.items():
            if name != "with_batching":
                stop(process)
    rps = {name: arm["rps"] for name, arm in arms.items()}
    speedup = rps["with_batching"] / rps["without_batching"]
    best_with = max(rps["with_batching"], rps["with_batching_tuned_threads"])
    best_without = max(rps["without_batching"], rps["without_batching_tuned_threads"])
    figures = {
        **{f"rps_{name}": round(value, 1) for name, value in rps.items()},
        "batching_speedup": round(speedup, 2),
        "batching_speedup_tuned_threads": round(rps["with_batching_tuned_threads"] /
                                                rps["without_batching_tuned_threads"], 2),
        "best_with_batching_vs_best_without": round(best_with / best_without, 2),
        **ceiling,
        "share_of_in_process_gain": round(speedup / ceiling["in_process_batch_gain"], 2),
        **{f"failed_{name}": arm["failed"] for name, arm in arms.items()},
        **{f"requests_per_server_core_second_{name}": round(arm["per_core_second"], 1) for name, arm in arms.items()},
        "loadavg_1m_during_comparison": [phase["loadavg_1m"] for arm in arms.values() for phase in arm["phases"]],
        **{f"phases_{name}": arm["phases"] for name, arm in arms.items()},
    }
    return figures, servers["with_batching"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="training run directory for the first model (default: an untrained network "
                                      "built from config/brain_mri.yaml)")
    parser.add_argument("--models", default="compact_cnn,efficientnet_b0",
                        help="comma-separated training.model values to compare batching on; the first one is also "
                             "used for the p50 overhead and the publishing phase")
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of each load phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds of the batching comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the generated models, e.g. image.size=128 (repeatable)")
    parser.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="OPTION",
                        help="extra `medpipe serve` option for both servers, e.g. --server-arg=--intra-op-threads=1")
    parser.add_argument("--samples", type=int, default=300, help="sequential requests for the p50 figures")
    args = parser.parse_args(argv)

    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    figures: dict = {"clients": CLIENTS, "server_args": args.server_args, "models": {}}
    published: list[tuple[int, float]] = []
    for index, name in enumerate(names):
        run = Path(args.run) if args.run and index == 0 else \
            make_run(work / name, [*args.overrides, f"training.model={name}", "training.weights=none"])
        repo = work / name / "models"
        config = load_config(run / "config.yaml")
        image = sorted((ROOT / "sample_data" / "brain_mri" / "glioma").iterdir())[0]
        png = preprocess_bytes(image.read_bytes(), config).png
        print(f"benchmark: {name} ({config.image.size} px)", flush=True)
        if index == 0:  # first, on an otherwise idle machine: the sequential p50 figures
            version = publish(run, repo)
            in_process = p50_in_process(repo / MODEL / str(version), png, args.samples)
            figures["p50_in_process_ms"] = round(in_process * 1e3, 3)
            plain, plain_address = start_server(repo, batching=False, extra=args.server_args)
            try:
                figures["p50_grpc_ms"] = round(p50_grpc(plain_address, png, args.samples) * 1e3, 3)
            finally:
                stop(plain)
            figures["p50_overhead_ms"] = round(figures["p50_grpc_ms"] - figures["p50_in_process_ms"], 3)
        model_figures, (server, address) = compare_batching(run, repo, png, args)
        shape = {"image_size": config.image.size}
        if name == "compact_cnn":  # the only network training.width shapes
            shape["width"] = config.training.width
        figures["models"][name] = {**shape, **model_figures}
        try:
            if index == 0:
                def publish_three():
                    for _ in range(3):
                        time.sleep(args.seconds / 2)
                        published.append((publish(run, repo), time.monotonic()))

                under = load(address, png, args.seconds, during=publish_three)
                visible = [under["first_seen"][v] - at if v in under["first_seen"] else None for v, at in published]
                figures.update({
                    "published_under_load": [v for v, _ in published],
                    "versions_seen_under_load": under["versions_seen"],
                    "requests_under_publish": under["requests"], "failed_under_publish": under["failed"],
                    "failure_examples": under["failures"],
                    "seconds_until_new_version_answers": [None if s is None else round(s, 2) for s in visible],
                })
        finally:
            stop(server)

    visible = figures.get("seconds_until_new_version_answers") or [None]
    targets = {"p50_overhead": "<= 2 ms", "publish_under_load": "0 failed requests",
               "new_version_served": "<= 2 s after publish"}
    passed = {"p50_overhead": figures["p50_overhead_ms"] <= 2.0,
              "publish_under_load": figures["failed_under_publish"] == 0 and len(published) == 3,
              "new_version_served": all(s is not None and s <= 2.0 for s in visible)}
    for name in names:
        targets[f"batching_speedup {name}"] = ">= 1.5x"
        passed[f"batching_speedup {name}"] = figures["models"][name]["batching_speedup"] >= 1.5
    write_result("serving", "benchmarks/bench_serving.py", figures, targets, passed)
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
