"""DAG integrity: the dags/ folder parses cleanly, cheaply and without side effects.

The folder is parsed in a fresh interpreter (the way the DAG processor does, with dags/ on sys.path) that records
every database connection, Variable/connection lookup and socket connect made while parsing, so a DAG file that
does I/O or imports the ML stack at top level fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"
STUBS = Path(__file__).resolve().parent / "stubs"
HEAVY = ("tensorflow", "keras", "apache_beam", "pydicom", "tensorflow_serving", "grpc", "medpipe", "models",
         "serving", "beam_pipelines", "PIL", "numpy")
EXPECTED = {"medpipe_ingest", "medpipe_train", "medpipe_batch_inference"}

PARSE_SCRIPT = r"""
import json, socket, sys, time
from pathlib import Path

events = []
real_connect = socket.socket.connect
def record_connect(self, address):
    events.append(f"socket connect {address}")
    return real_connect(self, address)
socket.socket.connect = record_connect

import sqlalchemy.event, sqlalchemy.pool
sqlalchemy.event.listen(sqlalchemy.pool.Pool, "connect", lambda *a: events.append("database connection"))

from airflow.sdk import BaseHook, Variable
def forbidden(what):
    def call(*args, **kwargs):
        events.append(f"{what}{args}")
        raise RuntimeError(f"{what} during parse")
    return call
Variable.get = staticmethod(forbidden("Variable.get"))
BaseHook.get_connection = classmethod(forbidden("BaseHook.get_connection"))

from airflow.dag_processing.dagbag import BundleDagBag
dags_folder = Path(sys.argv[1])
started = time.perf_counter()
bag = BundleDagBag(str(dags_folder), bundle_path=dags_folder)
seconds = time.perf_counter() - started
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2].split(",")))
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {
        "tags": sorted(dag.tags), "doc_md": bool(dag.doc_md and dag.doc_md.strip()),
        "max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
        "params": sorted(dag.params.keys()),
        "param_defaults": {key: dag.params[key] for key in dag.params.keys()},
        "deadline": bool(getattr(dag, "deadline", None)),
        "fileloc": dag.fileloc,
        "tasks": {task.task_id: {
            "retries": task.retries, "backoff": bool(task.retry_exponential_backoff),
            "timeout": task.execution_timeout.total_seconds() if task.execution_timeout else None,
            "callback": bool(task.on_failure_callback), "pool": task.pool,
        } for task in dag.tasks},
    }
print(json.dumps({"import_errors": bag.import_errors, "dags": dags, "heavy": heavy, "events": events,
                  "seconds": seconds}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # a database that does not exist yet: parsing must not need it (and must not create it)
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/must_not_exist.db",
    }
    result = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, str(DAGS), ",".join(HEAVY)],
                            capture_output=True, text=True, env=env, timeout=120, cwd=str(home))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["db_file_created"] = (home / "must_not_exist.db").exists()
    return report


def test_no_import_errors(parsed):
    assert parsed["import_errors"] == {}
    assert EXPECTED <= set(parsed["dags"])


def test_every_dag_has_doc_and_tags(parsed):
    for dag_id, dag in parsed["dags"].items():
        assert dag["doc_md"], f"{dag_id} has no doc_md"
        assert "medpipe" in dag["tags"] and len(dag["tags"]) >= 2, f"{dag_id} tags: {dag['tags']}"


def test_every_task_retries_with_backoff_timeout_and_callback(parsed):
    for dag_id, dag in parsed["dags"].items():
        for task_id, task in dag["tasks"].items():
            where = f"{dag_id}.{task_id}"
            assert task["retries"] >= 1, f"{where} has no retries"
            assert task["backoff"], f"{where} has no exponential backoff"
            assert task["timeout"] and task["timeout"] <= timedelta(hours=12).total_seconds(), where
            assert task["callback"], f"{where} has no on_failure_callback"


def test_parsing_imports_no_ml_stack(parsed):
    assert parsed["heavy"] == [], f"parsing dags/ imported {parsed['heavy']}: import them inside tasks"


def test_parsing_touches_no_database_variable_connection_or_network(parsed):
    assert parsed["events"] == []
    assert not parsed["db_file_created"]


def test_parse_is_fast(parsed):
    # the DAG files themselves (Airflow's own import excluded): milliseconds, well under the 30 s dagbag timeout
    assert parsed["seconds"] < 2.0, parsed["seconds"]


def test_train_dag_concurrency_and_gate(parsed):
    train = parsed["dags"]["medpipe_train"]
    assert train["max_active_runs"] == 1
    assert train["tasks"]["train"]["pool"] == "medpipe_training"
    assert list(train["tasks"]) == ["plan", "train", "evaluate", "gate", "publish"]


def test_ingest_params_and_no_accidental_catchup(parsed):
    ingest = parsed["dags"]["medpipe_ingest"]
    assert {"config", "source_uri", "output_uri", "runner", "pipeline_options", "partition"} <= set(ingest["params"])
    assert ingest["catchup"] is False
    # unpausing must not ingest a source nobody named (issue 32): scheduled runs skip without one
    assert ingest["param_defaults"]["source_uri"] is None


def test_pool_file_declares_training_pool():
    pools = json.loads((ROOT / "config" / "airflow" / "pools.json").read_text())
    assert pools["medpipe_training"]["slots"] >= 1
    assert pools["medpipe_asset_events"]["slots"] == 1


@pytest.fixture()
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(DAGS))
    import medpipe_dag_common

    return medpipe_dag_common


def test_run_partition_prefers_param_then_logical_date(common):
    import pendulum

    context = {"logical_date": pendulum.datetime(2026, 11, 24, 6, tz="UTC")}
    assert common.run_partition(context) == "2026-11-24"
    assert common.run_partition(context, "batch_7") == "batch_7"
    with pytest.raises(ValueError, match="safe folder name"):
        common.run_partition(context, "../etc")
    with pytest.raises(ValueError, match="partition"):
        common.run_partition({"dag_run": None})


def test_paths_resolve_from_env(common, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDPIPE_DATA_ROOT", str(tmp_path))
    monkeypatch.delenv("MEDPIPE_MODEL_REPOSITORY", raising=False)
    assert common.model_repository() == tmp_path / "models"
    assert common.resolve_path("{data_root}/ingested/{dataset}/{partition}", dataset="x", partition="p") == \
        str(tmp_path / "ingested" / "x" / "p")
    assert common.resolve_path("gs://bucket/{dataset}", dataset="x") == "gs://bucket/x"
    assert common.resolve_config("brain_mri") == str(ROOT / "config" / "brain_mri.yaml")
    assert common.load_task_config(common.resolve_config("chest_xray"))["name"] == "chest_xray"


def test_serving_address_order(common, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_MEDPIPE_SERVING", raising=False)
    monkeypatch.setenv("MEDPIPE_TF_SERVING_GRPC", "tf-serving:8500")
    monkeypatch.delenv("MEDPIPE_SERVING_GRPC", raising=False)
    assert common.serving_address("h:1") == ("h:1", "param serving_grpc")
    assert common.serving_address()[0] == "tf-serving:8500"
    monkeypatch.setenv("MEDPIPE_SERVING_GRPC", "other:9")
    assert common.serving_address()[0] == "other:9"
    # an Airflow connection (here from the environment, as docker-compose defines it) wins over the env variables
    monkeypatch.setenv("AIRFLOW_CONN_MEDPIPE_SERVING", "generic://tf-serving:8600")
    assert common.serving_address() == ("tf-serving:8600", "connection medpipe_serving")


def test_batch_scoring_goes_to_the_inference_endpoint_with_its_credentials(common, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_MEDPIPE_SERVING", "generic://tf-serving:8500")
    for name in (common.INFERENCE_ENV, *common.INFERENCE_CONNECTION_ENV.values()):
        monkeypatch.delenv(name, raising=False)
    # no gateway configured: the serving lookup, plain (the local `medpipe serve`)
    assert common.inference_address() == ("tf-serving:8500", "connection medpipe_serving")
    assert common.inference_connection_args() == []
    # docker-compose: the gateway, with mTLS files from Docker secrets (the model server stays publish's target)
    monkeypatch.setenv("MEDPIPE_INFERENCE_GRPC", "gateway:8500")
    monkeypatch.setenv("MEDPIPE_INFERENCE_TLS_CA", "/run/secrets/ca")
    monkeypatch.setenv("MEDPIPE_INFERENCE_TLS_CERT", "/run/secrets/cert")
    monkeypatch.setenv("MEDPIPE_INFERENCE_TLS_KEY", "/run/secrets/key")
    assert common.inference_address() == ("gateway:8500", "env MEDPIPE_INFERENCE_GRPC")
    assert common.inference_address("h:1") == ("h:1", "param serving_grpc")
    assert common.serving_address()[0] == "tf-serving:8500"
    assert common.inference_connection_args() == ["--tls-ca", "/run/secrets/ca", "--tls-cert", "/run/secrets/cert",
                                                  "--tls-key", "/run/secrets/key"]
    # and serving.batch takes exactly those flags
    from serving.batch import build_parser

    args = build_parser().parse_args(["--drop", "d", "--output", "o", "--server", "gateway:8500", "--model", "m",
                                      *common.inference_connection_args()])
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.token_file) == ("/run/secrets/ca", "/run/secrets/cert",
                                                                         "/run/secrets/key", None)


def test_run_stage_reports_the_failure(common):
    with pytest.raises(common.StageFailed, match=r"exited with status 1[\s\S]*No module named medpipe_no_such"):
        common.run_stage("medpipe_no_such_module_anywhere", [])
    lines = common.run_stage("json.tool", ["--help"], capture_stdout=True)
    assert any("usage" in line for line in lines)


def test_asset_events_of_a_run_are_all_kept_once_oldest_first(common):
    from types import SimpleNamespace

    import pendulum

    older = SimpleNamespace(id=1, timestamp=pendulum.datetime(2026, 11, 1, tz="UTC"),
                            extra={"path": "/d/2026-11-01", "backfill": True})
    newer = SimpleNamespace(id=2, timestamp=pendulum.datetime(2026, 11, 2, tz="UTC"), extra={"path": "/d/2026-11-02"})
    # the same event is listed under the asset and under the alias it came through; a backfill merges two events
    events = {"asset": [newer, older], "alias": [newer]}
    assert [extra["path"] for extra in common.triggering_events(events)] == ["/d/2026-11-01", "/d/2026-11-02"]
    assert common.newest_event_extra(events)["path"] == "/d/2026-11-02"
    assert common.newest_event_extra(events)["ingested_at"] == "2026-11-02T00:00:00+00:00"
    assert common.newest_event_extra({}) == {} and common.newest_event_extra(None) == {}
    assert common.is_backfill({"triggering_asset_events": events}) is True
    assert common.is_backfill({"dag_run": SimpleNamespace(run_type="backfill")}) is True
    assert common.is_backfill({"dag_run": SimpleNamespace(run_type="manual")}) is False


def test_partitions_order_by_date_when_dates_else_by_ingest_time(common, tmp_path):
    assert common.order_partitions({"2026-11-30": "b", "2026-11-02": "c", "2026-11-24T06": "a"}) == \
        ["2026-11-02", "2026-11-24T06", "2026-11-30"]
    # `sample-small` sorts after `2026-11-30` by name, but it was ingested first
    times = {"2026-11-30": "2026-11-30T08:00:00+00:00", "sample-small": "2026-11-29T08:00:00+00:00"}
    assert common.order_partitions(times) == ["sample-small", "2026-11-30"]
    for name in ("sample-small", "2026-11-30", "half_written"):
        (tmp_path / name).mkdir()
    for name in ("sample-small", "2026-11-30"):
        (tmp_path / name / "schema.json").write_text("{}")
    os.utime(tmp_path / "sample-small" / "schema.json", (1_700_000_000, 1_700_000_000))
    assert common.latest_partition(tmp_path) == tmp_path / "2026-11-30"
    # the asset event's ingest time wins over the file time
    events = [{"path": str(tmp_path / "sample-small"), "ingested_at": "2099-01-01T00:00:00+00:00"}]
    found = common.partition_ingest_times(tmp_path, events)
    assert set(found) == {"sample-small", "2026-11-30"} and common.order_partitions(found)[-1] == "sample-small"


def test_unknown_conf_keys_are_refused_with_the_known_ones(common):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    dag = SimpleNamespace(params={"partition": None, "config": "brain_mri"})
    common.check_conf({"dag": dag, "dag_run": SimpleNamespace(conf={"partition": "x"})})
    # the run's params hold the conf's keys too (Airflow merges them): only the DAG's declared params count
    merged = {"partition": None, "config": "brain_mri", "partiton": "x"}
    with pytest.raises(AirflowFailException, match=r"unknown conf key\(s\) \['partiton'\]: this DAG knows "
                                                   r"\['config', 'partition'\]"):
        common.check_conf({"dag": dag, "dag_run": SimpleNamespace(conf={"partiton": "x"})}, merged)


def test_exit_2_is_not_retried_and_exit_3_is_a_verdict(common):
    from airflow.sdk.exceptions import AirflowFailException

    for code, kind in ((2, common.StageRefused), (3, common.StageVerdict)):
        with pytest.raises(kind) as raised:
            common.run_stage("medpipe_exit_stub", [str(code)], env={"PYTHONPATH": str(STUBS)})
        assert isinstance(raised.value, AirflowFailException) and raised.value.returncode == code
    with pytest.raises(common.StageFailed) as crashed:
        common.run_stage("medpipe_exit_stub", ["1"], env={"PYTHONPATH": str(STUBS)})
    assert not isinstance(crashed.value, AirflowFailException)  # retried


def test_on_kill_kills_the_whole_stage_process_group(common, tmp_path):
    """What Airflow does on "mark failed": call the task's on_kill from its SIGTERM handler in the task process."""
    import signal
    import threading
    import time

    pid_file = tmp_path / "pids"
    errors = []

    def run():
        try:
            common.run_stage("medpipe_exit_stub", ["sleep", str(pid_file)], env={"PYTHONPATH": str(STUBS)})
        except common.StageFailed as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and len(pid_file.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(pid) for pid in pid_file.read_text().split()]  # the stage and a grandchild it started
    common.kill_running_stages()
    thread.join(timeout=30)
    assert errors and errors[0].returncode == -signal.SIGTERM

    def state(pid: int) -> str:  # "" once the process is gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return ""

    # The grandchild gets the group's SIGTERM at the same moment, but on a busy machine it may not have run yet to
    # die of it when the stage has already been reaped: give it a bounded moment.
    deadline = time.monotonic() + 10
    while any(state(pid) not in ("", "Z") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        assert state(pid) in ("", "Z"), f"process {pid} survived on_kill"


def _process_state(pid: int) -> str:
    """The /proc state letter, "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_a_killed_scheduler_takes_the_stage_with_it(tmp_path):
    """Issue 32: a SIGKILLed scheduler leaves its LocalExecutor worker (the task process) alive, re-parented to PID 1,
    so the parent-death signal never reaches the stage. Here a real process stands for the scheduler, its child runs
    run_stage as a task does; after the SIGKILL (the scheduler left a zombie, as under `airflow standalone`) the
    stage and its grandchild are gone within 30 s and the task says why."""
    import signal
    import textwrap
    import time

    pid_file, outcome = tmp_path / "pids", tmp_path / "outcome"
    task = textwrap.dedent(f"""
        import medpipe_dag_common as common
        try:
            common.run_stage("medpipe_exit_stub", ["sleep", {str(pid_file)!r}], env={{"PYTHONPATH": {str(STUBS)!r}}})
        except common.SupervisorDied as exc:
            open({str(outcome)!r}, "w").write(str(exc))
    """)
    scheduler = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
         "time.sleep(300)", task], env={**os.environ, "PYTHONPATH": str(DAGS)})
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and len(pid_file.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        stage_pids = [int(pid) for pid in pid_file.read_text().split()]
        scheduler.send_signal(signal.SIGKILL)  # not reaped yet: a zombie, like the scheduler under standalone
        deadline = time.monotonic() + 30
        while any(_process_state(pid) not in ("", "Z") for pid in stage_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_process_state(pid) in ("", "Z") for pid in stage_pids), "the stage outlived its scheduler"
        deadline = time.monotonic() + 30
        while not outcome.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "scheduler or worker crash" in outcome.read_text()
    finally:
        scheduler.kill()
        scheduler.wait()


def test_pending_backfill_runs_counts_only_unfinished_backfill_runs(common):
    """The backfill's last run is the one that sees no other backfill run with the task still ahead of it."""
    states = {"backfill__2026-11-01T00:00:00+00:00": {"backfill_complete": "success"},
              "backfill__2026-11-02T00:00:00+00:00": {"backfill_complete": None},  # created, not yet scheduled
              "backfill__2026-11-03T00:00:00+00:00": {"backfill_complete": "running"},  # ourselves
              "backfill__2026-11-04T00:00:00+00:00": {"backfill_complete": "upstream_failed"},
              "scheduled__2026-11-05T00:00:00+00:00": {"backfill_complete": "queued"}}  # not a backfill
    assert common.pending_backfill_runs(states, "backfill_complete", "backfill__2026-11-03T00:00:00+00:00") == \
        ["backfill__2026-11-02T00:00:00+00:00"]
    states["backfill__2026-11-02T00:00:00+00:00"]["backfill_complete"] = "skipped"
    assert common.pending_backfill_runs(states, "backfill_complete", "backfill__2026-11-03T00:00:00+00:00") == []


def test_alerts_use_alertmanagers_format_and_reach_it(common, monkeypatch):
    import http.server
    import threading

    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MEDPIPE_ALERTMANAGER_URL", f"http://127.0.0.1:{server.server_port}/")
        assert common.send_alert("MedpipeModelNotBlessed", "not blessed", model="brain_mri", run_id=None) is True
    finally:
        server.shutdown()
    (path, body), = received
    assert path == "/api/v2/alerts" and isinstance(body, list) and len(body) == 1
    alert = body[0]
    assert alert["labels"] == {"alertname": "MedpipeModelNotBlessed", "severity": "warning",
                               "source": "medpipe-airflow", "model": "brain_mri"}
    assert alert["annotations"]["summary"] == "not blessed" and alert["startsAt"].endswith("+00:00")
    monkeypatch.setenv("MEDPIPE_ALERTMANAGER_URL", "http://127.0.0.1:9/")  # nothing listens: never raises
    assert common.send_alert("X", "y") is False


def test_train_and_batch_dags_have_deadline_alerts(parsed):
    assert parsed["dags"]["medpipe_train"]["deadline"] and parsed["dags"]["medpipe_batch_inference"]["deadline"]
