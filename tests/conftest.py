"""Shared fixtures: the real pipeline stages run once per session on the sample shipped in the repo.

`ingested_sample` runs the real Beam ingest on sample_data/brain_mri (100 real MRI slices) at a small image size;
`trained_sample_run` trains a tiny model on it. Tests that need data downstream of a stage use these instead of
re-implementing the stage, so a fixture and the product can never drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medpipe.config import set_flags

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
SHARED_DATA = Path(os.environ.get("MEDPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Small enough to keep the suite fast, large enough for real learning.
SAMPLE_OVERRIDES = ("image.size=64", "ingest.shards={train: 2, val: 1, test: 1}")
TEST_DEID_KEY = "medpipe-test-key-not-a-secret"
CONSOLE = "console.txt"  # beside the ingested_sample output: what `medpipe ingest` printed

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    """Tests marked shared_data skip cleanly when ../shared/data is not beside the repository."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent (the full data sets are optional)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def log_dir(tmp_path_factory) -> Path:
    """Commands are quiet and write framework output to a log file: in the test session's temp folder."""
    folder = tmp_path_factory.mktemp("logs")
    os.environ["MEDPIPE_LOG_DIR"] = str(folder)
    return folder


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600,
               expect: int = 0) -> subprocess.CompletedProcess:
    """Run a stage the way Airflow does (`python -m ...`); fail the test with its output when its exit status is not
    `expect`."""
    full_env = {**os.environ, "MEDPIPE_DEID_KEY": TEST_DEID_KEY, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )
    if result.returncode != expect:
        pytest.fail(f"{module} {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# the Go servers (Prometheus, Pushgateway, Alertmanager: exporter-toolkit) log the address they bound, so they too
# start on port 0 (--web.listen-address=127.0.0.1:0): see serving.listen.wait_listening
GO_LISTENING = re.compile(r'msg="Listening on" address=(?P<address>\S+)')


def overrides(*pairs: str) -> list[str]:
    return set_flags(pairs)


@pytest.fixture(scope="session")
def ingested_sample(tmp_path_factory) -> Path:
    """The real ingest pipeline over sample_data/brain_mri, at 64x64, run as a user runs it (`medpipe ingest`); what
    it printed is kept in CONSOLE beside the output (test_ingest counts its lines)."""
    out = tmp_path_factory.mktemp("ingest") / "brain_mri"
    result = run_module(
        "medpipe.cli", "ingest",
        "--config", str(ROOT / "config" / "brain_mri.yaml"),
        "--input", str(SAMPLE / "brain_mri"),
        "--output", str(out),
        *overrides(*SAMPLE_OVERRIDES),
    )
    (out.parent / CONSOLE).write_text(result.stdout + result.stderr)
    return out


@pytest.fixture(scope="session")
def trained_sample_run(tmp_path_factory, ingested_sample) -> Path:
    """A tiny real training run on the ingested sample (a few epochs; accuracy is not the point here)."""
    run_dir = tmp_path_factory.mktemp("runs") / "brain_mri"
    run_module(
        "models.train",
        "--config", str(ROOT / "config" / "brain_mri.yaml"),
        "--data", str(ingested_sample),
        "--output", str(run_dir),
        *overrides(*SAMPLE_OVERRIDES, "training.epochs=3", "training.width=8"),
    )
    return run_dir
