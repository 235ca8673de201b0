"""The DAGs under real Airflow 3: `airflow dags test`, then `airflow standalone` driven through its REST API and CLI.

Everything runs for real on the repository's sample: SQLite metadata DB in a temporary AIRFLOW_HOME, the Beam
ingest, Keras training, evaluation, publishing into a model repository, and batch scoring over gRPC against
`python -m serving.server`. Settings are tiny (32x32 images, one epoch, width 4) so the whole module fits in a few
minutes on two cores. Every process a test starts is stopped by the test (its whole process tree).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import TEST_DEID_KEY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
INGEST_OVERRIDES = ["image.size=32", "ingest.shards={train: 1, val: 1, test: 1}"]
TRAIN_OVERRIDES = INGEST_OVERRIDES[:1] + [
    "training.epochs=1", "training.width=4", "training.batch_size=16",
    # a one-epoch model on 100 images is not clinically useful: open the gate so the publish path runs for real
    "evaluation.thresholds={accuracy: 0.0, macro_f1: 0.0, macro_auc: 0.0}",
    "evaluation.bootstrap_samples=20", "evaluation.gradcam_per_class=0",
]
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def airflow_env(home: Path, data_root: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        # standalone launches its components as `airflow ...` from PATH: make that this venv's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        # SQLite has one writer: standalone's scheduler and a CLI call collide; wait for the lock (default 5 s)
        # instead of failing with "database is locked". Production runs PostgreSQL (docker-compose.yml).
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "MEDPIPE_DATA_ROOT": str(data_root),
        "MEDPIPE_DEID_KEY": TEST_DEID_KEY,
        "MEDPIPE_SERVING_GRPC": "127.0.0.1:9",  # nothing listens there: publish must not need a server
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }


def airflow(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    for attempt in range(5):
        result = subprocess.run([AIRFLOW, *args], capture_output=True, text=True, env=env, timeout=timeout,
                                cwd=env["AIRFLOW_HOME"])
        # SQLite cannot upgrade a reader to a writer while standalone's scheduler writes (no busy timeout helps
        # there); the CLI's transaction is rolled back, so running it again is safe. PostgreSQL never needs this.
        if result.returncode == 0 or "database is locked" not in result.stdout + result.stderr:
            break
        time.sleep(2 + attempt)
    if result.returncode != 0:
        pytest.fail(f"airflow {' '.join(args)} exited {result.returncode}\n{result.stdout[-6000:]}\n"
                    f"{result.stderr[-4000:]}")
    return result


def prepare_home(home: Path, env: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    airflow(env, "db", "migrate", timeout=180)
    airflow(env, "pools", "import", str(ROOT / "config" / "airflow" / "pools.json"))


def descendants(pid: int) -> set[int]:
    """Every live process below pid, read from /proc (children may have started their own sessions)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def stop_tree(process: subprocess.Popen, grace: float = 10) -> set[int]:
    """SIGTERM the process group and every descendant, SIGKILL what is left after `grace`; returns survivors."""
    tree = descendants(process.pid) | {process.pid}
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    signal_all(tree, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    remaining = wait_gone(tree | descendants(process.pid), timeout=grace)
    if remaining:
        signal_all(remaining, signal.SIGKILL)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout=10)
    return wait_gone(tree, timeout=10)


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if status != "Z":
            living.add(pid)
    return living


@contextmanager
def started(command: list[str], env: dict, log: Path):
    """Run a long-lived process in its own session; always stop its whole tree on exit."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   cwd=env.get("AIRFLOW_HOME", str(ROOT)), start_new_session=True)
    tree: set[int] = set()
    try:
        yield process
        tree = descendants(process.pid)
    finally:
        tree |= descendants(process.pid)
        leftover = stop_tree(process) | wait_gone(tree, timeout=10)
    assert not leftover, f"processes left running after stopping {command[:3]}: {sorted(leftover)}"


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"nothing listened on port {port} after {timeout} s:\n{log.read_text()[-4000:]}")


# ------------------------------------------------------------------------------------------------------------------
# airflow dags test: ingest -> train -> publish, then batch inference against the published model
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dags_test_env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("airflow_dags_test")
    env = airflow_env(base / "airflow_home", base / "data")
    prepare_home(base / "airflow_home", env)
    return env


def test_ingest_dag_writes_the_partition_and_the_asset_event(dags_test_env):
    env = dags_test_env
    airflow(env, "dags", "test", "medpipe_ingest", "2026-11-20", "--conf", json.dumps({"overrides": INGEST_OVERRIDES}))
    partition = Path(env["MEDPIPE_DATA_ROOT"]) / "ingested" / "brain_mri" / "2026-11-20"
    stats = json.loads((partition / "stats.json").read_text())
    assert stats["input_files"] == 100 and stats["rejected"] == 0
    assert json.loads((partition / "schema.json").read_text())["labels"] == LABELS
    assert sorted(path.name for path in partition.glob("*.tfrecord.gz")) == [
        "test-00000-of-00001.tfrecord.gz", "train-00000-of-00001.tfrecord.gz", "val-00000-of-00001.tfrecord.gz"]
    assert not list(partition.parent.glob(".*")), "a staging folder was left behind"
    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
        events = db.execute("SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
    assert [(uri, json.loads(extra)["path"]) for uri, extra in events] == [("medpipe://ingested/brain_mri",
                                                                          str(partition))]


def test_train_dag_publishes_a_model_version(dags_test_env):
    env = dags_test_env
    if not (Path(env["MEDPIPE_DATA_ROOT"]) / "ingested" / "brain_mri" / "2026-11-20" / "schema.json").is_file():
        pytest.skip("needs the partition written by the ingest DAG test")
    airflow(env, "dags", "test", "medpipe_train",
            "--conf", json.dumps({"overrides": TRAIN_OVERRIDES, "cpu_replicas": 1}), timeout=600)
    data = Path(env["MEDPIPE_DATA_ROOT"])
    runs = list((data / "training" / "brain_mri").iterdir())
    assert len(runs) == 1
    blessing = json.loads((runs[0] / "blessing.json").read_text())
    assert blessing["blessed"] is True, blessing
    versions = [path for path in (data / "models" / "brain_mri").iterdir() if path.name.isdigit()]
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").is_file()
    models_config = (data / "models" / "models.config").read_text()
    assert 'name: "brain_mri"' in models_config and 'key: "stable"' in models_config
    assert f"value: {versions[0].name}" in models_config


def test_batch_inference_dag_scores_the_drop_folder_over_grpc(dags_test_env, tmp_path):
    env = dags_test_env
    data = Path(env["MEDPIPE_DATA_ROOT"])
    repository = data / "models"
    if not (repository / "models.config").is_file():
        pytest.skip("needs the model published by the train DAG test")
    version = max(int(path.name) for path in (repository / "brain_mri").iterdir() if path.name.isdigit())
    drop = data / "dropbox" / "brain_mri" / "2026-11-21"
    drop.mkdir(parents=True)
    for label in LABELS:  # one study per class, under a nested folder like a PACS export
        source = sorted((ROOT / "sample_data" / "brain_mri" / label).iterdir())[0]
        (drop / label).mkdir()
        shutil.copy(source, drop / label / source.name)
    grpc_port, rest_port = free_port(), free_port()
    log = tmp_path / "server.log"
    server = [sys.executable, "-m", "serving.server", "--repository", str(repository), "--host", "127.0.0.1",
              "--grpc-port", str(grpc_port), "--rest-port", str(rest_port)]
    with started(server, {**env, "AIRFLOW_HOME": str(tmp_path)}, log) as process:
        wait_for_port(grpc_port, process, log, timeout=120)
        conf = {"serving_grpc": f"127.0.0.1:{grpc_port}"}
        airflow(env, "dags", "test", "medpipe_batch_inference", "2026-11-21", "--conf", json.dumps(conf))
        out = data / "predictions" / "brain_mri" / "2026-11-21"
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert sorted(Path(row["file"]).name for row in rows) == sorted(path.name for path in drop.rglob("*.jpg"))
        for row in rows:
            assert row["class"] in LABELS
            assert abs(sum(row["probabilities"].values()) - 1) < 1e-3 if isinstance(row["probabilities"], dict) \
                else abs(sum(row["probabilities"]) - 1) < 1e-3
            assert int(row["model_version"]) == version
        csv_lines = (out / "predictions.csv").read_text().splitlines()
        assert csv_lines[0].startswith("file,class,confidence") and len(csv_lines) == 1 + len(rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["files"] == summary["predictions"] == 4
        assert not list(out.parent.glob(".*")), "a staging folder was left behind"


# ------------------------------------------------------------------------------------------------------------------
# airflow standalone: REST API trigger, CLI trigger with --conf, a 2-day backfill
# ------------------------------------------------------------------------------------------------------------------


class Api:
    def __init__(self, base: str, token: str):
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{method} {path} -> HTTP {exc.code}: {exc.read()[:2000]!r}")


def get_token(base: str, home: Path, timeout: float = 60) -> str:
    passwords = home / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + timeout
    while not passwords.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    username, password = next(iter(json.loads(passwords.read_text()).items()))
    request = urllib.request.Request(f"{base}/auth/token", method="POST",
                                     data=json.dumps({"username": username, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["access_token"]


def wait_healthy(base: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"airflow standalone exited {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5) as response:
                health = json.loads(response.read())
            if health.get("scheduler", {}).get("status") == "healthy":
                return
        except (OSError, ValueError):
            pass
        time.sleep(1)
    pytest.fail(f"airflow standalone not healthy after {timeout} s:\n{log.read_text()[-5000:]}")


def test_standalone_rest_cli_trigger_and_backfill(tmp_path):
    home, data = tmp_path / "airflow_home", tmp_path / "data"
    port = free_port()
    env = airflow_env(
        home, data,
        AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(port),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__CORE__PARALLELISM="2", AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="2",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2", AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
    )
    prepare_home(home, env)
    base = f"http://127.0.0.1:{port}"
    conf = {"overrides": INGEST_OVERRIDES}
    log = tmp_path / "standalone.log"
    with started([AIRFLOW, "standalone"], env, log) as process:
        wait_healthy(base, process, log, timeout=150)
        api = Api(base, get_token(base, home))
        deadline = time.monotonic() + 90
        while True:  # the DAG processor parses the folder shortly after start
            dags = api.call("GET", "/api/v2/dags?dag_id_pattern=medpipe_")["dags"]
            if {"medpipe_ingest", "medpipe_train"} <= {dag["dag_id"] for dag in dags}:
                break
            assert time.monotonic() < deadline, f"DAGs never appeared: {dags}\n{log.read_text()[-3000:]}"
            time.sleep(2)
        assert {dag["dag_id"]: dag["is_paused"] for dag in dags}["medpipe_train"] is True

        # 1. REST API: unpause, then trigger with a validated conf
        api.call("PATCH", "/api/v2/dags/medpipe_ingest", {"is_paused": False})
        api_run = api.call("POST", "/api/v2/dags/medpipe_ingest/dagRuns",
                           {"logical_date": None, "conf": {**conf, "partition": "from_api"}})
        # a conf that breaks the params' schema is refused before any run exists
        bad = urllib.request.Request(
            f"{base}/api/v2/dags/medpipe_ingest/dagRuns", method="POST",
            data=json.dumps({"logical_date": None, "conf": {"partition": "../escape"}}).encode(),
            headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code in (400, 422)

        # 2. CLI trigger with --conf
        airflow(env, "dags", "trigger", "medpipe_ingest", "--conf", json.dumps({**conf, "partition": "from_cli"}))

        # 3. a 2-day backfill, partitions named by logical date
        airflow(env, "backfill", "create", "--dag-id", "medpipe_ingest", "--from-date", "2026-11-01",
                "--to-date", "2026-11-02", "--dag-run-conf", json.dumps(conf), "--max-active-runs", "1")

        expected = {"from_api", "from_cli", "2026-11-01", "2026-11-02"}
        deadline = time.monotonic() + 300
        while True:
            runs = api.call("GET", "/api/v2/dags/medpipe_ingest/dagRuns?limit=50")["dag_runs"]
            failed = [run["dag_run_id"] for run in runs if run["state"] == "failed"]
            assert not failed, f"runs failed: {failed}\n{log.read_text()[-5000:]}"
            backfill_days = {run["logical_date"][:10] for run in runs
                             if run["run_type"] == "backfill" and run["state"] == "success"}
            manual_done = {run["dag_run_id"] for run in runs if run["run_type"] == "manual" and run["state"] == "success"}
            if {"2026-11-01", "2026-11-02"} <= backfill_days and api_run["dag_run_id"] in manual_done \
                    and len(manual_done) >= 2:
                break
            assert time.monotonic() < deadline, f"runs not done in time: {runs}\n{log.read_text()[-3000:]}"
            time.sleep(2)

        # every successful run announced its partition on the dataset Asset medpipe_train is scheduled on
        events = api.call("GET", "/api/v2/assets/events?source_dag_id=medpipe_ingest&limit=50")["asset_events"]
        announced = {Path(event["extra"]["path"]).name for event in events if event["uri"] == "medpipe://ingested/brain_mri"}
        assert expected <= announced, events

    partitions = data / "ingested" / "brain_mri"
    assert expected <= {path.name for path in partitions.iterdir()}
    for name in expected:
        stats = json.loads((partitions / name / "stats.json").read_text())
        assert stats["input_files"] == 100 and stats["rejected"] == 0, (name, stats)
    assert not list(partitions.glob(".*")), "a staging folder was left behind"
