"""Shared by the benchmark scripts: where the full data sets are, the machine description, the result file.

Each benchmark measures a baseline in the same run and reports a ratio against it, because absolute numbers on a
shared 2-core machine are noisy. Results land in benchmarks/results/<name>.json; `run_all.py` renders BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("MEDPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """The full data set a benchmark needs, or a clear exit when ../shared/data is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        sys.exit(f"benchmark: {path} not found; benchmarks need the full data sets (set MEDPIPE_SHARED_DATA)")
    return path


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}"}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, command: str, figures: dict, targets: dict[str, str], passed: dict[str, bool]) -> Path:
    """figures: measured numbers; targets: human-readable target per check; passed: check -> met or not."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = {
        "name": name,
        "command": command,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": git_revision(),
        "machine": machine(),
        "figures": figures,
        "targets": targets,
        "passed": passed,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(body, indent=2))
    return path


def run_stage(module: str, args: list[str], log_path: Path, ok: tuple[int, ...] = (0,)) -> float:
    """Run a medpipe stage as Airflow would (`python -m MODULE ARGS`), output to LOG_PATH; -> wall seconds. An exit
    status outside OK (e.g. (0, 3) for evaluate, whose 3 is a verdict) raises CalledProcessError."""
    env = {**os.environ, "MEDPIPE_DEID_KEY": os.environ.get("MEDPIPE_DEID_KEY", "benchmark-key-not-a-secret-0000")}
    start = time.monotonic()
    with log_path.open("w") as log:
        command = [sys.executable, "-m", module, *args]
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code not in ok:
        raise subprocess.CalledProcessError(code, command)
    return time.monotonic() - start


def ingest_and_train(config: str, source: Path, data_dir: Path, run_dir: Path, sets: list[str],
                     work: Path) -> tuple[float, float]:
    """The training benchmarks' two timed stages, as Airflow runs them; -> (ingest seconds, train seconds)."""
    ingest_seconds = run_stage("beam_pipelines.ingest", ["--config", config, "--input", str(source),
                                                         "--output", str(data_dir), *sets], work / "ingest.log")
    print(f"ingest: {ingest_seconds:.0f}s", flush=True)
    train_seconds = run_stage("models.train", ["--config", config, "--data", str(data_dir),
                                               "--output", str(run_dir), *sets], work / "train.log")
    print(f"train: {train_seconds:.0f}s", flush=True)
    return ingest_seconds, train_seconds
