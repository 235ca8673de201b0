"""Scaling efficiency of distributed training: 1 vs 2 replicas (logical CPU devices) and 1 vs 2 workers on localhost.

    .venv/bin/python benchmarks/bench_scaling.py [--per-class 250] [--epochs 4] [--batch 64]

A subset of the brain MRI training set (`--per-class` images of each class) is ingested at 64 px, then
`medpipe train` (compact CNN, width 16, --cache) runs three times at the same global batch:
1 replica (the baseline), `--cpu-replicas 2` (MirroredStrategy over two logical CPU devices) and `--workers 2`
(MultiWorkerMirroredStrategy, two processes on localhost, ring all-reduce over gRPC). Throughput is training
images per second over the epochs after the first (the first one traces the graph), taken from the stage's own
per-epoch log lines (which include the short validation pass).

Scaling efficiency = images/s with 2 / images/s with 1. Both variants run on the same 2 cores here, so the ideal is
1.0 (distribution costs nothing) rather than 2.0: the figure is the overhead of splitting the work. On a cluster
where each replica brings its own device, the same overhead bounds the speed-up.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, require_shared, write_result

EPOCH_LINE = re.compile(r"medpipe\.train: epoch (\d+): .* \((\d+(?:\.\d+)?)s\)")
STEPS_LINE = re.compile(r"global batch (\d+); (\d+) steps/epoch")


def make_subset(source: Path, target: Path, per_class: int) -> None:
    """Symlinks to the first `per_class` files (sorted) of each class folder."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            (target / class_dir.name / path.name).symlink_to(path)


def images_per_second(log: str) -> tuple[float, list[float]]:
    """(median images/s over epochs 2.., per-epoch seconds) from one training process's log."""
    batch, steps = map(int, STEPS_LINE.search(log).groups())
    seconds = [float(s) for epoch, s in EPOCH_LINE.findall(log) if int(epoch) > 1]
    if not seconds:
        raise RuntimeError(f"no epoch lines after the first in the log:\n{log[-2000:]}")
    return round(batch * steps / statistics.median(seconds), 1), seconds


def train(data: Path, run_dir: Path, epochs: int, per_replica_batch: int, *extra: str) -> str:
    command = [sys.executable, "-m", "models.train", "--config", "brain_mri", "--data", str(data),
               "--output", str(run_dir), "--cache", "--set", "image.size=64", "--set", "training.width=16",
               "--set", f"training.epochs={epochs}", "--set", f"training.batch_size={per_replica_batch}",
               "--set", "training.early_stopping_patience=100", *extra]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    print(f"  {' '.join(extra) or '1 replica'}: {time.monotonic() - started:.0f}s wall", flush=True)
    return result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=250, help="images per class from the brain MRI set")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="global batch size, the same in every variant")
    args = parser.parse_args()
    source = require_shared("brain-tumor-mri/Training")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as work:
        work_dir = Path(work)
        make_subset(source, work_dir / "images", args.per_class)
        data = work_dir / "ingest"
        ingest = subprocess.run([sys.executable, "-m", "beam_pipelines.ingest", "--config", "brain_mri", "--input",
                                 str(work_dir / "images"), "--output", str(data), "--set", "image.size=64"],
                                cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "MEDPIPE_DEID_KEY": "bench-scaling-key-not-a-secret"})
        if ingest.returncode != 0:
            raise RuntimeError(f"ingest failed:\n{ingest.stderr[-3000:]}")
        logs = {
            "one_replica": train(data, work_dir / "r1", args.epochs, args.batch),
            "two_replicas": train(data, work_dir / "r2", args.epochs, args.batch // 2, "--cpu-replicas", "2"),
            "two_workers": train(data, work_dir / "w2", args.epochs, args.batch // 2, "--workers", "2"),
        }
    rates = {name: images_per_second(log) for name, log in logs.items()}
    # --workers: both workers log into the launcher's stderr; their epochs are synchronous, so the median of both
    baseline = rates["one_replica"][0]
    figures = {
        "global_batch": args.batch,
        "train_images": int(STEPS_LINE.search(logs["one_replica"]).group(2)) * args.batch,
        "images_per_s.one_replica": baseline,
        "images_per_s.two_replicas": rates["two_replicas"][0],
        "images_per_s.two_workers": rates["two_workers"][0],
        "efficiency.two_replicas": round(rates["two_replicas"][0] / baseline, 2),
        "efficiency.two_workers": round(rates["two_workers"][0] / baseline, 2),
        "epoch_seconds": {name: rate[1] for name, rate in rates.items()},
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }
    targets = {"two_replicas": ">= 0.7 of one replica's images/s", "two_workers": ">= 0.5 of one replica's images/s"}
    passed = {"two_replicas": figures["efficiency.two_replicas"] >= 0.7,
              "two_workers": figures["efficiency.two_workers"] >= 0.5}
    write_result("scaling", f"benchmarks/bench_scaling.py --per-class {args.per_class} --epochs {args.epochs} "
                 f"--batch {args.batch}", figures, targets, passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
