"""The DAGs under real Airflow 3 on PostgreSQL with the LocalExecutor (as in docker-compose), one shared instance.

The test starts Debian's PostgreSQL 15 (initdb in a temporary folder, a free loopback port), the Debian
Alertmanager, and `airflow standalone`, then drives the DAGs through the REST API and the CLI on the repository's
sample: real Beam ingest, Keras training, evaluation against the `stable` model, publishing, and batch scoring over
gRPC against `python -m serving.server`. Models are tiny (64 px, width 8) so the module fits in a few minutes on
two cores. Every process a test starts is stopped by the test (its whole process tree).

The scenarios run in file order on the one instance; each states what it shows (issue 16, items 1-8).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import GO_LISTENING, TEST_DEID_KEY
from models.distributed import free_ports
from serving.listen import wait_listening

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
PG_BIN = Path(os.environ.get("MEDPIPE_PG_BIN", "/usr/lib/postgresql/15/bin"))
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
SAMPLE = ROOT / "sample_data" / "brain_mri"


def free_port() -> int:
    """PostgreSQL and Airflow's api-server take their port from configuration written before they start (Airflow's
    own processes must know it): the one place ports are chosen ahead (models.distributed.free_ports says why)."""
    return free_ports(1)[0]


# ------------------------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every live, non-zombie process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(entry.name)] = (int(fields[1]), cmdline)
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return pids & set(process_table())


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def stop_tree(process: subprocess.Popen, grace: float = 15, first: int = signal.SIGTERM) -> set[int]:
    """Signal the process group and every descendant, SIGKILL what is left after `grace`; returns survivors."""
    tree = descendants(process.pid) | {process.pid}
    for target in ([process.pid] if process.poll() is None else []):
        try:
            os.killpg(target, first)
        except ProcessLookupError:
            pass
    for pid in tree:
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    remaining = wait_gone(tree | descendants(process.pid), timeout=grace)
    for pid in remaining:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    return wait_gone(tree, timeout=10)


@contextmanager
def started(command: list[str], log: Path, env: dict | None = None, cwd: str | None = None, preexec_fn=None,
            first_signal: int = signal.SIGTERM):
    """Run a long-lived process in its own session; always stop its whole tree on exit."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True, preexec_fn=preexec_fn)
    tree: set[int] = set()
    try:
        yield process
    finally:
        tree = descendants(process.pid)
        leftover = stop_tree(process, first=first_signal) | wait_gone(tree, timeout=10)
    assert not leftover, f"processes left running after stopping {command[:3]}: {sorted(leftover)}"


def wait_until(predicate, what: str, timeout: float, interval: float = 1.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached in {timeout} s" + (f"\n{log.read_text()[-5000:]}" if log else ""))
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------------------------
# PostgreSQL and Alertmanager, started by the test as test_prometheus.py starts Prometheus
# ------------------------------------------------------------------------------------------------------------------


def _as_postgres_user():
    """initdb and postgres refuse to run as root (CI runs as root): drop to the `postgres` account."""
    if os.geteuid() != 0:
        return None, None
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` account to run PostgreSQL as")

    def demote():
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)

    return demote, account


@pytest.fixture(scope="module")
def postgres():
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql)")
    demote, account = _as_postgres_user()
    base = Path(tempfile.mkdtemp(prefix="medpipe-pg-"))
    data = base / "data"
    if account is not None:
        os.chown(base, account.pw_uid, account.pw_gid)
    subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, preexec_fn=demote, cwd=str(base))
    port = free_port()
    log = base / "postgres.log"
    command = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
    try:
        # SIGINT = PostgreSQL's "fast shutdown"
        with started(command, log, preexec_fn=demote, cwd=str(base), first_signal=signal.SIGINT) as process:
            wait_until(lambda: process.poll() is not None or subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0,
                "PostgreSQL accepting connections", 60, 0.5, log)
            assert process.poll() is None, log.read_text()
            subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow"],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    if ALERTMANAGER is None:
        pytest.skip("no alertmanager binary (apt-get install prometheus-alertmanager)")
    base = tmp_path_factory.mktemp("alertmanager")
    config = base / "alertmanager.yml"
    # the repo's routing tree with a receiver that sends nothing (the Slack URL is a production secret)
    repo = yaml.safe_load((ROOT / "config" / "alertmanager" / "alertmanager.yml").read_text())
    repo["receivers"] = [{"name": receiver["name"]} for receiver in repo["receivers"]]
    config.write_text(yaml.safe_dump(repo))
    command = [ALERTMANAGER, f"--config.file={config}", f"--storage.path={base / 'data'}",
               "--web.listen-address=127.0.0.1:0", "--cluster.listen-address="]
    with started(command, base / "alertmanager.log", cwd=str(base)) as process:
        url = f"http://{wait_listening(base / 'alertmanager.log', process, GO_LISTENING, 30)['address']}"
        wait_until(lambda: _get(f"{url}/-/ready") is not None, "alertmanager ready", 30, 0.5,
                   base / "alertmanager.log")
        assert process.poll() is None
        yield url


def firing_for(alert: dict) -> timedelta:
    """How long Alertmanager will keep the alert active unless it is resolved (its endsAt from now)."""
    return datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")) - datetime.now(timezone.utc)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except (OSError, ValueError):
        return None


def alerts(alertmanager_url: str, name: str) -> list[dict]:
    body = _get(f"{alertmanager_url}/api/v2/alerts?filter=alertname%3D%22{name}%22")
    return json.loads(body) if body else []


# ------------------------------------------------------------------------------------------------------------------
# Airflow
# ------------------------------------------------------------------------------------------------------------------


class Airflow:
    def __init__(self, base: str, token: str, env: dict, data: Path, log: Path):
        self.base, self.token, self.env, self.data, self.log = base, token, env, data, log

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw[:1] in (b"{", b"[") else {"text": raw.decode()}
        except urllib.error.HTTPError as exc:
            return exc.code, {"error": exc.read()[:3000].decode(errors="replace")}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        status, answer = self.request(method, path, body)
        if status >= 400:
            pytest.fail(f"{method} {path} -> HTTP {status}: {answer}")
        return answer

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([AIRFLOW, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                                cwd=self.env["AIRFLOW_HOME"])
        if check and result.returncode != 0:
            pytest.fail(f"airflow {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
                        f"{result.stderr[-4000:]}")
        return result

    def trigger(self, dag_id: str, conf: dict, logical_date: str | None = None) -> str:
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                         {"logical_date": logical_date, "conf": conf})["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=-run_after")["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id)}")

    def task(self, dag_id: str, run_id: str, task_id: str) -> dict:
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id)}/taskInstances/"
                                f"{task_id}")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task attempt's log file as the task runner wrote it (JSON lines)."""
        path = (Path(self.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" /
                f"task_id={task_id}" / f"attempt={try_number}.log")
        return path.read_text() if path.is_file() else ""

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 420) -> dict:
        done = wait_until(lambda: (lambda run: run if run["state"] in ("success", "failed") else None)(
            self.run(dag_id, run_id)), f"{dag_id} run {run_id} finished", timeout, 2, self.log)
        return done


def airflow_env(home: Path, data: Path, database: str, port: int, alertmanager_url: str) -> dict[str, str]:
    return {
        **os.environ,
        # standalone launches its components as `airflow ...` from PATH: make that this venv's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        # not 8080: tasks reach the execution API through the base URL (issue item 10)
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "MEDPIPE_DATA_ROOT": str(data),
        "MEDPIPE_BATCH_SCHEDULE": "none",  # trigger only; ingest keeps @daily (backfills need a time schedule)
        "MEDPIPE_DEID_KEY": TEST_DEID_KEY,
        "MEDPIPE_ALERTMANAGER_URL": alertmanager_url,
        "MEDPIPE_SERVING_GRPC": "127.0.0.1:9",  # nothing listens there: publish must not need a server
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def get_token(base: str, home: Path, timeout: float = 60) -> str:
    passwords = home / "simple_auth_manager_passwords.json.generated"
    wait_until(passwords.is_file, "simple auth manager password file", timeout, 0.5)
    password = json.loads(passwords.read_text())["admin"]
    request = urllib.request.Request(f"{base}/auth/token", method="POST",
                                     data=json.dumps({"username": "admin", "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["access_token"]


def tiny_config(path: Path) -> Path:
    """brain_mri with a tiny, fast model and an open absolute gate (the comparison with `stable` still applies).

    image.size stays 48 here while the ingests run with image.size=64: the trained model must take 64 from the data.
    """
    config = yaml.safe_load((ROOT / "config" / "brain_mri.yaml").read_text())
    config["image"]["size"] = 48
    config["ingest"]["shards"] = {"train": 1, "val": 1, "test": 1}
    config["training"].update(epochs=4, width=8, batch_size=16, learning_rate=0.003, early_stopping_patience=10)
    config["evaluation"].update(thresholds={"accuracy": 0.0, "macro_f1": 0.0, "macro_auc": 0.0},
                                max_regression=0.01, bootstrap_samples=20, gradcam_per_class=0)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, postgres, alertmanager):
    base = tmp_path_factory.mktemp("airflow_e2e")
    home, data = base / "airflow_home", base / "data"
    home.mkdir()
    port = free_port()
    env = airflow_env(home, data, postgres, port, alertmanager)
    log = base / "standalone.log"
    instance = Airflow(f"http://127.0.0.1:{port}", "", env, data, log)
    instance.cli("db", "migrate", timeout=300)
    instance.cli("pools", "import", str(ROOT / "config" / "airflow" / "pools.json"))
    # the golden set: a fixed folder of label folders (here 15 sample images per class: 60, enough for the gate's
    # paired comparison, evaluation.min_paired_examples = 50)
    for label in LABELS:
        (data / "golden" / "brain_mri" / label).mkdir(parents=True)
        for source in sorted((SAMPLE / label).iterdir())[-15:]:
            shutil.copy(source, data / "golden" / "brain_mri" / label / source.name)
    instance.config = str(tiny_config(base / "brain_tiny.yaml"))
    with started([AIRFLOW, "standalone"], log, env=env, cwd=str(home)) as process:
        def healthy():
            assert process.poll() is None, log.read_text()[-5000:]
            body = _get(f"{instance.base}/api/v2/monitor/health")
            return body and json.loads(body).get("scheduler", {}).get("status") == "healthy"

        wait_until(healthy, "airflow standalone healthy", 180, 1, log)
        instance.token = get_token(instance.base, home)
        wait_until(lambda: {"medpipe_ingest", "medpipe_train", "medpipe_batch_inference"} <= {
            dag["dag_id"] for dag in instance.call("GET", "/api/v2/dags?dag_id_pattern=medpipe_")["dags"]},
            "DAGs parsed", 120, 2, log)
        for dag_id in ("medpipe_ingest", "medpipe_batch_inference"):
            instance.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        # unpausing @daily medpipe_ingest starts today's scheduled run; with no source configured it skips and
        # writes nothing (issue 32: it used to ingest the sample at the default size)
        today = wait_until(lambda: next((run for run in instance.runs("medpipe_ingest")
                                         if run["run_type"] == "scheduled"), None), "today's scheduled ingest", 90, 1,
                           log)
        scheduled = instance.wait_run("medpipe_ingest", today["dag_run_id"], timeout=180)
        plan = instance.task("medpipe_ingest", today["dag_run_id"], "plan")
        assert plan["state"] == "skipped", (scheduled, plan)
        assert "no source configured" in instance.task_log("medpipe_ingest", today["dag_run_id"], "plan", 1)
        assert not (data / "ingested").exists() or not any((data / "ingested").rglob("schema.json"))
        yield instance


def ingest_conf(airflow: Airflow, **extra) -> dict:
    return {"config": airflow.config, "source_uri": str(SAMPLE), "overrides": ["image.size=64"],
            **extra}


def versions(airflow: Airflow) -> list[int]:
    folder = airflow.data / "models" / "brain_mri"
    return sorted(int(path.name) for path in folder.iterdir() if path.name.isdigit()) if folder.is_dir() else []


def run_folder(airflow: Airflow, run_id: str) -> Path:
    """The training run directory of a DAG run (the DAG names it after the run id, made a safe folder name)."""
    import re

    folder = airflow.data / "training" / "brain_mri" / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_")[:120]
    assert folder.is_dir(), sorted(path.name for path in folder.parent.iterdir())
    return folder


def stable_version(airflow: Airflow) -> int | None:
    from models.gate import find_baseline

    found = find_baseline(airflow.data / "models", "brain_mri")
    return found.version if found else None


# ------------------------------------------------------------------------------------------------------------------
# the scenarios, in order, on the one instance
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_conf_key_is_refused_with_the_known_keys(airflow):
    """Item 6: a typo in the conf (`partiton`) fails the run at once, naming the keys the DAG knows."""
    run_id = airflow.trigger("medpipe_ingest", {**ingest_conf(airflow), "partiton": "typo"})
    run = airflow.wait_run("medpipe_ingest", run_id, timeout=180)
    assert run["state"] == "failed"
    plan = airflow.task("medpipe_ingest", run_id, "plan")
    assert plan["state"] == "failed" and plan["try_number"] == 1  # refused, not retried
    log = airflow.task_log("medpipe_ingest", run_id, "plan", 1)
    assert "unknown conf key(s)" in log and "partiton" in log and "this DAG knows" in log, log[-3000:]
    assert "source_uri" in log.split("this DAG knows", 1)[1]
    assert not (airflow.data / "ingested" / "brain_mri" / "typo").exists()


def backfill(airflow: Airflow, first: str, last: str) -> None:
    """`airflow backfill create` over first..last (YYYY-MM-DD), waited for: every day ingested."""
    days = {f"2026-11-{day:02d}" for day in range(int(first[-2:]), int(last[-2:]) + 1)}
    airflow.cli("backfill", "create", "--dag-id", "medpipe_ingest", "--from-date", first, "--to-date", last,
                "--dag-run-conf", json.dumps(ingest_conf(airflow)), "--max-active-runs", "2")

    def done():
        runs = [run for run in airflow.runs("medpipe_ingest") if run["logical_date"] and
                run["logical_date"][:10] in days]
        assert not [run for run in runs if run["state"] == "failed"], runs
        return len([run for run in runs if run["state"] == "success"]) == len(days)

    wait_until(done, f"backfill {first}..{last} ingested", 420, 5, airflow.log)


def train_runs_done(airflow: Airflow, count: int, timeout: float = 900) -> list[dict]:
    def done():
        runs = airflow.runs("medpipe_train")
        return runs if len(runs) >= count and all(run["state"] in ("success", "failed") for run in runs) else None

    return wait_until(done, f"{count} medpipe_train run(s) done", timeout, 3, airflow.log)


def test_backfill_trains_once_on_the_window_from_the_data_and_does_not_publish(airflow):
    """Items 2 and 8, issue 32: a 3-day ingest backfill with medpipe_train unpaused gives exactly ONE training run
    (triggered by the backfill's last run, not one per asset event), over the window (all three days), at the image
    size the data was ingested with (64, not the config's 48); evaluated and blessed; not published (a backfill)."""
    airflow.call("PATCH", "/api/v2/dags/medpipe_train", {"is_paused": False})
    backfill(airflow, "2026-11-01", "2026-11-03")
    train_runs = train_runs_done(airflow, 1)
    time.sleep(20)  # a second run, if the backfill made one, would be queued by now
    train_runs = airflow.runs("medpipe_train")
    assert len(train_runs) == 1, train_runs
    run = train_runs[0]
    assert run["conf"].get("from_backfill") is True
    assert run["state"] == "success", airflow.task_log("medpipe_train", run["dag_run_id"], "train", 1)[-3000:]
    assert airflow.task("medpipe_train", run["dag_run_id"], "publish")["state"] == "skipped"
    assert versions(airflow) == []  # a backfill does not publish
    folder = run_folder(airflow, run["dag_run_id"])
    window = json.loads((folder / "window" / "window.json").read_text())
    assert [part["name"] for part in window["partitions"]] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert all(len(part["sha256"]) == 64 and part["written"] == 100 for part in window["partitions"])
    assert yaml.safe_load((folder / "config.yaml").read_text())["image"]["size"] == 64
    blessing = json.loads((folder / "blessing.json").read_text())
    assert blessing["blessed"] is True and set(blessing["evaluations"]) == {"partition_test", "golden"}
    # publishing a backfill's model is a deliberate act: by hand, from the run directory
    subprocess.run([sys.executable, "-m", "serving.publish", "--run", str(folder), "--repository",
                    str(airflow.data / "models"), "--model-name", "brain_mri", "--label", "stable"],
                   check=True, capture_output=True, cwd=str(ROOT), env=airflow.env, timeout=300)
    assert len(versions(airflow)) == 1 and stable_version(airflow) == versions(airflow)[0]


def test_a_backfill_with_training_paused_trains_once_when_unpaused(airflow):
    """Issue 32: the documented advice (pause medpipe_train during a backfill) used to lose the training: Airflow
    queues asset events only for unpaused DAGs. The backfill's one run is a triggered run: queued while paused,
    started on unpause; exactly one."""
    before = {run["dag_run_id"] for run in airflow.runs("medpipe_train")}
    airflow.call("PATCH", "/api/v2/dags/medpipe_train", {"is_paused": True})
    backfill(airflow, "2026-11-04", "2026-11-06")
    time.sleep(10)
    waiting = [run for run in airflow.runs("medpipe_train") if run["dag_run_id"] not in before]
    assert len(waiting) == 1 and waiting[0]["state"] == "queued", waiting
    airflow.call("PATCH", "/api/v2/dags/medpipe_train", {"is_paused": False})
    run = airflow.wait_run("medpipe_train", waiting[0]["dag_run_id"], timeout=900)
    assert run["state"] == "success"
    time.sleep(15)
    assert [run["dag_run_id"] for run in airflow.runs("medpipe_train") if run["dag_run_id"] not in before] == \
        [waiting[0]["dag_run_id"]]
    window = json.loads((run_folder(airflow, run["dag_run_id"]) / "window" / "window.json").read_text())
    assert {"2026-11-04", "2026-11-05", "2026-11-06"} <= {part["name"] for part in window["partitions"]}


def test_triggering_an_existing_logical_date_says_what_to_do(airflow):
    """Item 13: scripts/airflow_trigger.py turns Airflow's raw IntegrityError into a message with the fix."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "airflow_trigger.py"), "medpipe_ingest",
                             "--logical-date", "2026-11-01T00:00:00+00:00", "--conf", "{}"],
                            capture_output=True, text=True, env=airflow.env, timeout=300, cwd=airflow.env["AIRFLOW_HOME"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "already has a run for the logical date 2026-11-01" in result.stderr
    assert "airflow tasks clear medpipe_ingest" in result.stderr and "IntegrityError" not in result.stderr


def test_a_worse_candidate_is_not_published_stable_stays_and_an_alert_fires(airflow, alertmanager):
    """Items 1 and 7: the candidate (learning rate 0: an untrained network) and `stable` are evaluated on the same
    data; the candidate is worse, so it is not published, `stable` does not move, and Alertmanager gets the alert."""
    stable_before = stable_version(airflow)
    assert stable_before is not None
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config,
                                               "overrides": ["training.learning_rate=0.0", "training.epochs=1"]})
    run = airflow.wait_run("medpipe_train", run_id, timeout=600)
    assert run["state"] == "success"
    assert airflow.task("medpipe_train", run_id, "publish")["state"] == "skipped"
    assert versions(airflow) == [stable_before] and stable_version(airflow) == stable_before
    run_dir = run_folder(airflow, run_id)
    blessing = json.loads((run_dir / "blessing.json").read_text())
    assert blessing["blessed"] is False
    assert blessing["baseline"]["version"] == stable_before
    for name in ("partition_test", "golden"):
        figures = blessing["evaluations"][name]["metrics"]
        assert set(figures) == {"candidate", "stable"} and figures["stable"]["macro_auc"] is not None
    golden = blessing["evaluations"]["golden"]
    assert golden["verdict"] == "not_blessed" and golden["comparison"]["n"] == 60, golden.get("comparison")
    assert any("does not rule out a regression" in reason for reason in blessing["reasons"]), blessing["reasons"]
    fired = wait_until(lambda: alerts(alertmanager, "MedpipeModelNotBlessed"), "not-blessed alert", 30, 1)
    assert fired[0]["labels"]["model"] == "brain_mri" and fired[0]["labels"]["severity"] == "warning"


def test_a_better_candidate_is_published_and_twenty_images_are_insufficient_evidence(airflow, alertmanager,
                                                                                      tmp_path):
    """Issue 32: the gate decides with paired statistics. With an untrained model forced into production (an
    operator's mistake), a trained candidate is clearly better on the 60-image golden set: blessed and published
    although the 9-image test split cannot tell (it abstains). On a 20-image golden set nothing can be told:
    "insufficient evidence", nothing published."""
    worse_runs = [run for run in airflow.runs("medpipe_train") if run["run_type"] == "manual"
                  and (run_folder(airflow, run["dag_run_id"]) / "blessing.json").is_file()
                  and not json.loads((run_folder(airflow, run["dag_run_id"]) / "blessing.json").read_text())["blessed"]]
    assert worse_runs
    untrained = run_folder(airflow, worse_runs[0]["dag_run_id"])
    subprocess.run([sys.executable, "-m", "serving.publish", "--run", str(untrained), "--repository",
                    str(airflow.data / "models"), "--model-name", "brain_mri", "--label", "stable", "--force"],
                   check=True, capture_output=True, cwd=str(ROOT), env=airflow.env, timeout=300)
    bad_stable = stable_version(airflow)

    # the window as docs/operations.md writes it: dates unquoted (YAML would read them as dates)
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config, "overrides": [
        "training.partitions=[2026-11-01, 2026-11-02, 2026-11-03]"]})
    assert airflow.wait_run("medpipe_train", run_id, timeout=600)["state"] == "success"
    window = json.loads((run_folder(airflow, run_id) / "window" / "window.json").read_text())
    assert [part["name"] for part in window["partitions"]] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    blessing = json.loads((run_folder(airflow, run_id) / "blessing.json").read_text())
    assert blessing["blessed"] is True, blessing["reasons"]
    assert blessing["evaluations"]["golden"]["verdict"] == "blessed"
    assert blessing["evaluations"]["partition_test"]["verdict"] == "insufficient_evidence"
    assert airflow.task("medpipe_train", run_id, "publish")["state"] == "success"
    assert stable_version(airflow) != bad_stable

    small = tmp_path / "golden20"
    for label in LABELS:
        (small / label).mkdir(parents=True)
        for source in sorted((SAMPLE / label).iterdir())[:5]:
            shutil.copy(source, small / label / source.name)
    published = stable_version(airflow)
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config, "golden_uri": str(small)})
    assert airflow.wait_run("medpipe_train", run_id, timeout=600)["state"] == "success"
    blessing = json.loads((run_folder(airflow, run_id) / "blessing.json").read_text())
    assert blessing["blessed"] is False and blessing["verdict"] == "insufficient_evidence", blessing["reasons"]
    assert blessing["evaluations"]["golden"]["comparison"]["n"] == 20
    assert airflow.task("medpipe_train", run_id, "publish")["state"] == "skipped"
    assert stable_version(airflow) == published
    fired = wait_until(lambda: [alert for alert in alerts(alertmanager, "MedpipeModelNotBlessed")
                                if "insufficient evidence" in alert["annotations"]["description"]],
                       "insufficient-evidence alert", 30, 1)
    assert fired


def test_an_exit_2_failure_is_not_retried_and_alerts_once(airflow, alertmanager):
    """Item 4: an override that contradicts the data (3 channels for grey partitions) makes models.train exit 2:
    the task fails on its first try although it has retries, and one MedpipeTaskFailed alert is posted."""
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config, "overrides": ["image.channels=3"]})
    run = airflow.wait_run("medpipe_train", run_id, timeout=300)
    assert run["state"] == "failed"
    train = airflow.task("medpipe_train", run_id, "train")
    assert train["state"] == "failed" and train["try_number"] == 1 and train["max_tries"] >= 2
    assert "exited with status 2" in airflow.task_log("medpipe_train", run_id, "train", 1)
    fired = wait_until(lambda: [alert for alert in alerts(alertmanager, "MedpipeTaskFailed")
                                if alert["annotations"].get("run_id") == run_id], "task-failed alert", 30, 1)
    assert len(fired) == 1 and fired[0]["labels"]["task_id"] == "train"
    # a state, not an event: firing until train next succeeds, not until Alertmanager's 5-minute resolve_timeout
    assert firing_for(fired[0]) > timedelta(days=7)


def test_a_failed_tasks_alert_fires_until_the_task_succeeds_again(alertmanager, monkeypatch):
    """Issue 32: the failure callback's alert stays active in a real Alertmanager (it used to show [RESOLVED] after
    5 minutes though nothing was fixed); the task's next success (on_success_callback) resolves it."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "dags"))
    import medpipe_dag_common as common

    monkeypatch.setenv("MEDPIPE_ALERTMANAGER_URL", alertmanager)
    ti = SimpleNamespace(dag_id="medpipe_e2e_alerts", task_id="score", run_id="manual__1", try_number=1)
    common.notify_failure({"ti": ti, "exception": RuntimeError("boom")})
    ours = lambda: [alert for alert in alerts(alertmanager, "MedpipeTaskFailed")  # noqa: E731
                    if alert["labels"].get("dag_id") == "medpipe_e2e_alerts" and alert["status"]["state"] == "active"]
    firing = wait_until(ours, "the failure alert", 30, 0.5)
    assert len(firing) == 1 and firing[0]["annotations"]["run_id"] == "manual__1"
    assert firing_for(firing[0]) > timedelta(days=7)  # common.FIRING_FOR ahead
    assert "task_id" in firing[0]["labels"] and "run_id" not in firing[0]["labels"]
    assert common.default_task_args()["on_success_callback"] is common.notify_success
    common.notify_success({"ti": SimpleNamespace(dag_id="medpipe_e2e_alerts", task_id="score", run_id="manual__2")})
    wait_until(lambda: not ours(), "the failure alert resolved by the next success", 30, 0.5)


def test_a_task_marked_failed_leaves_no_stage_process(airflow, alertmanager):
    """Item 3: marking a running `train` task failed kills models.train and everything it started, and (issue 32)
    alerts like any failure although Airflow runs no failure callback for it."""
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config, "overrides": ["training.epochs=500"]})

    def training_processes() -> set[int]:
        return {pid for pid, (_, cmdline) in process_table().items()
                if "-m models.train" in cmdline and str(airflow.data) in cmdline}

    pids = wait_until(training_processes, "models.train started", 300, 1, airflow.log)
    time.sleep(3)  # let it get into TensorFlow
    pids |= {child for pid in pids for child in descendants(pid)}
    answer = airflow.call("PATCH", f"/api/v2/dags/medpipe_train/dagRuns/{urllib.request.quote(run_id)}/"
                                   "taskInstances/train", {"new_state": "failed"})
    assert answer
    assert wait_gone(pids | training_processes(), timeout=45) == set(), "a stage process outlived its task"
    time.sleep(5)
    assert training_processes() == set()
    airflow.wait_run("medpipe_train", run_id, timeout=120)
    fired = wait_until(lambda: [alert for alert in alerts(alertmanager, "MedpipeTaskFailed")
                                if alert["annotations"].get("run_id") == run_id], "marked-failed alert", 60, 1)
    assert "marked failed by hand" in fired[0]["annotations"]["description"]


def test_batch_inference_scores_the_images_and_rejects_the_text_file(airflow, tmp_path):
    """Item 5: a drop folder with a stray text file: predictions for the images, the text file rejected with a
    reason, the task green (1 of 5 is under the allowed fraction); clearing `score` alone rescoring the folder
    as it is now (plan and score agree), the partition replaced."""
    repository = airflow.data / "models"
    drop = airflow.data / "dropbox" / "brain_mri" / "2026-11-21"
    for label in LABELS:
        (drop / label).mkdir(parents=True)
        source = sorted((SAMPLE / label).iterdir())[0]
        shutil.copy(source, drop / label / source.name)
    (drop / "notes.txt").write_text("the radiologist's notes, not an image\n")
    server = [sys.executable, "-m", "serving.server", "--repository", str(repository), "--host", "127.0.0.1",
              "--grpc-port", "0", "--rest-port", "auto"]
    log = tmp_path / "server.log"
    with started(server, log, env=airflow.env, cwd=str(ROOT)) as process:
        listening = wait_listening(log, process)
        wait_until(lambda: process.poll() is None and _get(f"{listening['rest']}/v1/models/brain_mri"),
                   "model server", 120, 1, log)
        conf = {"config": airflow.config, "partition": "2026-11-21", "serving_grpc": listening["grpc"],
                "max_rejected_fraction": 0.25}
        run_id = airflow.trigger("medpipe_batch_inference", conf)
        assert airflow.wait_run("medpipe_batch_inference", run_id, timeout=300)["state"] == "success"
        out = airflow.data / "predictions" / "brain_mri" / "2026-11-21"
        rows = {row["file"]: row for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
        assert set(rows) == {f"{label}/{sorted((SAMPLE / label).iterdir())[0].name}" for label in LABELS} | {
            "notes.txt"}
        assert rows["notes.txt"]["outcome"] == "rejected" and rows["notes.txt"]["reason"] == "not_image"
        predicted = [row for row in rows.values() if row["outcome"] == "predicted"]
        assert len(predicted) == 4 and all(row["class"] in LABELS for row in predicted)
        assert {int(row["model_version"]) for row in predicted} == {stable_version(airflow)}
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["files"], summary["predicted"], summary["rejected"]) == (5, 4, 1)

        # one more study arrives; clearing `score` alone scores the folder as it is now
        extra = sorted((SAMPLE / "glioma").iterdir())[1]
        shutil.copy(extra, drop / "glioma" / extra.name)
        airflow.call("POST", "/api/v2/dags/medpipe_batch_inference/clearTaskInstances",
                     {"dag_run_id": run_id, "task_ids": ["score"], "dry_run": False, "only_failed": False,
                      "reset_dag_runs": True})
        wait_until(lambda: json.loads((out / "summary.json").read_text())["files"] == 6, "rescored after clear",
                   240, 2, airflow.log)
        assert airflow.wait_run("medpipe_batch_inference", run_id, timeout=240)["state"] == "success"
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 6
        assert not list(out.parent.glob(".*")), "a staging folder was left behind"


def test_an_ingest_that_writes_nothing_fails_without_an_asset_event(airflow, tmp_path):
    """Item 7: an ingest whose every input is rejected writes 0 records: the run fails (not retried) and
    medpipe_train is not told about an empty partition."""
    source = tmp_path / "nothing_usable"
    (source / "glioma").mkdir(parents=True)
    (source / "glioma" / "readme.txt").write_text("not an image\n")
    run_id = airflow.trigger("medpipe_ingest", ingest_conf(airflow, source_uri=str(source), partition="empty_day"))
    assert airflow.wait_run("medpipe_ingest", run_id, timeout=240)["state"] == "failed"
    run_ingest = airflow.task("medpipe_ingest", run_id, "run_ingest")
    assert run_ingest["state"] == "failed" and run_ingest["try_number"] == 1
    assert "wrote 0 records" in airflow.task_log("medpipe_ingest", run_id, "run_ingest", 1)
    assert airflow.task("medpipe_ingest", run_id, "publish_asset")["state"] in ("upstream_failed", None)
    events = airflow.call("GET", "/api/v2/assets/events?source_dag_id=medpipe_ingest&limit=100")["asset_events"]
    assert "empty_day" not in {event["extra"].get("partition") for event in events}
    assert not (airflow.data / "ingested" / "brain_mri" / "empty_day").exists()


def test_the_deid_key_variable_is_masked(airflow):
    """Item 9: the de-identification key Variable is never returned in clear by the REST API."""
    airflow.cli("variables", "set", "medpipe_deid_secret", "not-the-real-key-but-secret")
    answer = airflow.call("GET", "/api/v2/variables/medpipe_deid_secret")
    assert answer["value"] != "not-the-real-key-but-secret" and "***" in answer["value"]


def test_a_killed_scheduler_leaves_no_training_running(airflow):
    """Issue 32: SIGKILL of the scheduler during a training. Its LocalExecutor workers live on, re-parented; the
    task notices that a process above it died and stops its stage: no medpipe stage process after 30 s. (Last in
    this module: the instance has no scheduler afterwards.)"""
    run_id = airflow.trigger("medpipe_train", {"config": airflow.config, "overrides": ["training.epochs=500"]})

    def stage_processes() -> set[int]:
        return {pid for pid, (_, cmdline) in process_table().items()
                if " -m models." in cmdline and str(airflow.data) in cmdline}

    pids = wait_until(stage_processes, "models.train started", 300, 1, airflow.log)
    table = process_table()
    ancestors, pid = [], next(iter(pids))
    while pid in table and pid > 1:
        pid = table[pid][0]
        ancestors.append(pid)
    scheduler = next(pid for pid in ancestors if "scheduler" in table.get(pid, (0, ""))[1])
    pids |= {child for pid in pids for child in descendants(pid)}
    os.kill(scheduler, signal.SIGKILL)
    assert wait_gone(pids | stage_processes(), timeout=30) == set(), "a stage outlived the killed scheduler"
    time.sleep(5)
    assert stage_processes() == set()
    log_text = airflow.task_log("medpipe_train", run_id, "train", 1)
    assert "above this task died" in log_text, log_text[-3000:]
