"""Shared pieces of the medpipe DAGs: task defaults, run-time settings, stage launching.

Parse-time rules (Airflow best practices, checked by tests/test_dags.py): this module imports only the standard
library and `airflow.sdk`, does no I/O, and reads no Variable or connection at import. Everything that depends on
the deployment (paths, the serving address, the training mode) is resolved *inside tasks* by the functions below.

The stages are never imported here: tasks launch them as `sys.executable -m <module> ...` (the interpreter that runs
the task, i.e. the deployment's venv), stream their output into the task log, and turn a non-zero exit into a task
failure whose message carries the tail of the stage's stderr.

Stable public helpers for every medpipe DAG file (keep their signatures):
  task defaults:   default_task_args(**overrides), notify_failure(context), check_conf(context, params),
                   stage_deadline(hours, what)
  alerts:          send_alert(name, summary, severity=..., **labels) -> Alertmanager (MEDPIPE_ALERTMANAGER_URL)
  run partition:   run_partition(context, explicit=None), check_partition(name), PARTITION_PATTERN, safe_name(text),
                   newest_event_extra(events), triggering_events(events), is_backfill(context),
                   order_partitions(ingested_at), partition_ingest_times(root, events)
  paths:           medpipe_home(), data_root(), model_repository(), resolve_path(value, **fields),
                   resolve_config(name_or_path), load_task_config(path), latest_partition(root, marker)
  stages:          run_stage(module, args, env=None, capture_stdout=False) -> stdout lines,
                   StageFailed / StageRefused (exit 2: no retry) / StageVerdict (exit 3), kill_running_stages
                   (every task's on_kill), set_args(overrides), deid_env()
  serving:         serving_address(explicit=None) -> (host:port, origin), address_reachable(address),
                   inference_address(explicit=None), inference_connection_args()
  assets:          DATASETS, dataset_asset_name(dataset), dataset_asset_uri(dataset), INGESTED_ALIAS, TRAINING_POOL,
                   ASSET_EVENTS_POOL
  PACS sources:    is_dicomweb(uri), dicomweb_env() (the `medpipe_pacs` connection), partition_fields(dataset,
                   partition) ({dataset}, {partition}, {ds}, {ds_nodash})

The name is deliberately specific: `dags/` sits on Airflow's sys.path, so a generic name (`common`, `utils`)
could shadow or be shadowed by another package.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger("medpipe.dags")

# Datasets with a task config in config/<name>.yaml. One Airflow Asset per dataset; `medpipe_ingest` emits the one
# it wrote (through the alias below) and `medpipe_train` is scheduled on any of them.
DATASETS: tuple[str, ...] = ("brain_mri", "chest_xray")
INGESTED_ALIAS = "medpipe_ingested_dataset"
TRAINING_POOL = "medpipe_training"  # create it: `airflow pools set medpipe_training 1 "medpipe training"`
# One slot: two ingest runs announcing their partitions at the same moment (a backfill with --max-active-runs 2)
# make Airflow 3.3 on PostgreSQL insert the same alias->asset link twice (UniqueViolation on asset_alias_asset,
# the task is then failed). Serialising the 2-second publish_asset task avoids it.
ASSET_EVENTS_POOL = "medpipe_asset_events"

PARTITION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,99}$"  # a folder name: 2026-11-24, 2026-11-24T06, batch_7
_PARTITION_RE = re.compile(PARTITION_PATTERN)

# Serving address lookup order (first hit wins), all resolved at run time:
#   the DAG run's `serving_grpc` param -> Airflow connection `medpipe_serving` (host:port) ->
#   Airflow Variable `medpipe_serving_grpc` -> env MEDPIPE_SERVING_GRPC -> env MEDPIPE_TF_SERVING_GRPC -> default.
SERVING_CONN_ID = "medpipe_serving"
SERVING_VARIABLE = "medpipe_serving_grpc"
SERVING_ENV = ("MEDPIPE_SERVING_GRPC", "MEDPIPE_TF_SERVING_GRPC")
DEFAULT_SERVING_GRPC = "localhost:8500"
# Batch scoring is an access to the model like any app's: where a gateway fronts the models (docker-compose), it
# goes there (authenticated, audited) rather than to the model server. The param serving_grpc ->
# env MEDPIPE_INFERENCE_GRPC -> the serving lookup above. TLS, client certificate and token are files named by env.
INFERENCE_ENV = "MEDPIPE_INFERENCE_GRPC"
INFERENCE_CONNECTION_ENV = {"--tls-ca": "MEDPIPE_INFERENCE_TLS_CA", "--tls-cert": "MEDPIPE_INFERENCE_TLS_CERT",
                            "--tls-key": "MEDPIPE_INFERENCE_TLS_KEY", "--token-file": "MEDPIPE_INFERENCE_TOKEN_FILE"}

# "secret" in the name: Airflow masks the value in the UI, the REST API and task logs (sensitive_var_conn_names).
DEID_VARIABLE = "medpipe_deid_secret"

STDERR_TAIL_LINES = 40


def schedule_from_env(variable: str, default: str = "@daily") -> str | None:
    """A DAG's schedule from an environment variable ("none" = trigger only). An environment variable, not an Airflow
    Variable: parsing must not touch the metadata database."""
    value = os.environ.get(variable, default).strip()
    return None if value.lower() in ("", "none", "null") else value


def dataset_asset_name(dataset: str) -> str:
    return f"medpipe_ingested_{dataset}"


def dataset_asset_uri(dataset: str) -> str:
    # A logical URI: the physical partition paths travel in each asset event's `extra`.
    return f"medpipe://ingested/{dataset}"


# --------------------------------------------------------------------------------------------------------------
# Failure hook and task defaults
# --------------------------------------------------------------------------------------------------------------


ALERTMANAGER_ENV = "MEDPIPE_ALERTMANAGER_URL"  # e.g. http://alertmanager:9093 (compose sets it)


# A failed task's alert is a state, not an event: it stays firing until the same task next succeeds (which posts
# it again with endsAt = now), not until Alertmanager's resolve_timeout. FIRING_FOR only bounds a task never re-run.
FIRING_FOR = timedelta(days=30)
TASK_FAILED = "MedpipeTaskFailed"
SEVERITIES = ("warning", "critical")


def alertmanager_alert(name: str, summary: str, *, severity: str = "warning", description: str = "",
                       labels: dict[str, Any] | None = None, now: Any = None, ends_at: Any = None,
                       annotations: dict[str, Any] | None = None) -> dict:
    """One alert in Alertmanager's API format (POST /api/v2/alerts takes a list of these).

    Labels identify the alert (Alertmanager groups and de-duplicates on them); annotations carry the text. Without
    `ends_at` Alertmanager resolves the alert after its resolve_timeout unless it is posted again; with it, at that
    time (an `ends_at` of now resolves it at once).
    """
    from datetime import datetime, timezone

    started = now or datetime.now(timezone.utc)
    clean = {key: str(value) for key, value in (labels or {}).items() if value not in (None, "")}
    alert = {
        "labels": {"alertname": name, "severity": severity, "source": "medpipe-airflow", **clean},
        "annotations": {"summary": summary[:1000], "description": description[-4000:],
                        **{key: str(value) for key, value in (annotations or {}).items() if value not in (None, "")}},
        "startsAt": started.isoformat(),
    }
    if ends_at is not None:
        alert["endsAt"] = ends_at.isoformat()
    return alert


def post_alerts(alerts: list[dict]) -> bool:
    """POST to Alertmanager (MEDPIPE_ALERTMANAGER_URL). Never raises: a broken receiver must not mask the failure
    being reported. True when Alertmanager accepted them."""
    base = os.environ.get(ALERTMANAGER_ENV, "").strip().rstrip("/")
    if not base:
        return False
    try:
        request = urllib.request.Request(f"{base}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        return True
    except Exception as exc:  # the alert is best effort; the failure itself is already recorded
        log.warning("Alertmanager at %s did not accept %s: %s", base, [a["labels"]["alertname"] for a in alerts], exc)
        return False


def send_alert(name: str, summary: str, *, severity: str = "warning", description: str = "", ends_at: Any = None,
               annotations: dict[str, Any] | None = None, **labels: Any) -> bool:
    """Log the alert and post it to Alertmanager, which routes it (Slack, e-mail...). Returns True when accepted."""
    alert = alertmanager_alert(name, summary, severity=severity, description=description, labels=labels,
                               ends_at=ends_at, annotations=annotations)
    log.error("medpipe alert %s: %s", name, json.dumps(alert, default=str))
    return post_alerts([alert])


def notify_failure(context: dict) -> None:
    """`on_failure_callback` of every task: one log line and ONE alert `MedpipeTaskFailed` per failed task, firing
    until the task's next success (notify_success). Identified by DAG and task, so a failure of the next run
    renews it rather than adding another; the run goes in the annotations.

    Only tasks carry it (not the DAGs as well), so a failure is reported once. A DAG run that fails without a
    failed task (a dagrun_timeout) is covered by the deadline alerts and Prometheus' `AirflowTaskFailures`.
    """
    from datetime import datetime, timezone

    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    error = str(context.get("exception") or context.get("reason") or "")
    send_alert(
        TASK_FAILED,
        f"{getattr(ti, 'dag_id', None)}.{getattr(ti, 'task_id', None)} failed (try {getattr(ti, 'try_number', None)})",
        severity="critical" if isinstance(context.get("exception"), StageRefused) else "warning",
        description=error[-2000:],
        ends_at=datetime.now(timezone.utc) + FIRING_FOR,
        annotations={"run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None)},
        dag_id=getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        task_id=getattr(ti, "task_id", None),
    )


def notify_success(context: dict) -> None:
    """`on_success_callback` of every task: resolve its MedpipeTaskFailed (either severity), if one is firing."""
    from datetime import datetime, timezone

    if not os.environ.get(ALERTMANAGER_ENV, "").strip():
        return
    ti = context.get("task_instance") or context.get("ti")
    now = datetime.now(timezone.utc)
    labels = {"dag_id": getattr(ti, "dag_id", None), "task_id": getattr(ti, "task_id", None)}
    post_alerts([alertmanager_alert(TASK_FAILED, f"{labels['dag_id']}.{labels['task_id']} succeeded again",
                                    severity=severity, labels=labels, now=now, ends_at=now,
                                    annotations={"run_id": getattr(ti, "run_id", None)})
                 for severity in SEVERITIES])


async def deadline_missed(**kwargs: Any) -> None:
    """Deadline callback (awaited in the triggerer): the run is still not done when its deadline passed."""
    context = kwargs.get("context") or {}
    dag_run = context.get("dag_run") or {}
    get = dag_run.get if isinstance(dag_run, dict) else (lambda key, default=None: getattr(dag_run, key, default))
    send_alert("MedpipeDeadlineMissed", f"{get('dag_id')} run {get('run_id')} missed its deadline "
               f"({kwargs.get('what', 'run')})", severity="warning", dag_id=get("dag_id"), run_id=get("run_id"))


def stage_deadline(hours: float, what: str) -> Any:
    """An Airflow 3 DeadlineAlert: alert when a run is not finished `hours` after it was queued."""
    from airflow.sdk.definitions.callback import AsyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=hours),
                         callback=AsyncCallback(deadline_missed, kwargs={"what": what}))


def check_conf(context: dict, params: Any = None) -> None:
    """Refuse a run whose conf has keys the DAG does not know (a typo such as `partiton` must not be ignored).

    The known keys are the DAG's declared params (`context["dag"].params`): the run's own params already hold
    every conf key, the unknown ones included. `params` is the fallback when there is no DAG object (tests)."""
    from airflow.sdk.exceptions import AirflowFailException

    dag_run = context.get("dag_run")
    conf = dict(getattr(dag_run, "conf", None) or {})
    dag = context.get("dag")
    declared = getattr(dag, "params", None)
    known = set((declared if declared is not None else params if params is not None
                 else context.get("params") or {}).keys())
    unknown = sorted(set(conf) - known)
    if unknown:
        raise AirflowFailException(f"unknown conf key(s) {unknown}: this DAG knows {sorted(known)}; "
                                   "trigger it again with the right names (nothing was done)")


def default_task_args(**overrides: Any) -> dict[str, Any]:
    """Retries with exponential backoff, a timeout and the failure hook, for every task."""
    args: dict[str, Any] = {
        "owner": "medpipe",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,  # 30 s, 60 s, 120 s ... capped below
        "max_retry_delay": timedelta(minutes=15),
        "execution_timeout": timedelta(hours=1),
        "on_failure_callback": notify_failure,
        "on_success_callback": notify_success,
    }
    args.update(overrides)
    return args


# --------------------------------------------------------------------------------------------------------------
# Run-time settings (call these only inside tasks)
# --------------------------------------------------------------------------------------------------------------


def medpipe_home() -> Path:
    """Where config/ and sample_data/ live: env MEDPIPE_HOME, else the repository that holds this dags/ folder."""
    return Path(os.environ.get("MEDPIPE_HOME") or Path(__file__).resolve().parent.parent)


def data_root() -> Path:
    """Root of every pipeline output: env MEDPIPE_DATA_ROOT, else <MEDPIPE_HOME>/runs (git-ignored)."""
    return Path(os.environ.get("MEDPIPE_DATA_ROOT") or medpipe_home() / "runs")


def model_repository() -> Path:
    """The TF Serving model base path: env MEDPIPE_MODEL_REPOSITORY, else <data root>/models."""
    return Path(os.environ.get("MEDPIPE_MODEL_REPOSITORY") or data_root() / "models")


def resolve_path(value: str, **fields: str) -> str:
    """Fill {home}/{data_root}/{dataset}/{partition}/{ds} placeholders; a relative local path is taken from home."""
    filled = value.format(home=medpipe_home(), data_root=data_root(), **fields)
    if "://" in filled:
        return filled  # a Beam FileSystems URI (gs://, s3://, hdfs://): passed through untouched
    path = Path(filled).expanduser()
    return str(path if path.is_absolute() else medpipe_home() / path)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve_config(value: str) -> str:
    """A config given as a bare name (`brain_mri`, medpipe.config's rule) -> <home>/config/brain_mri.yaml (the
    deployment's checkout); a path -> resolve_path(path)."""
    from medpipe.config import is_config_name  # the core's naming rule; cheap, no ML

    return str(medpipe_home() / "config" / f"{value}.yaml") if is_config_name(value) else resolve_path(value)


def load_task_config(config_path: str) -> dict:
    """The task config as a dict plus `model_name`, the served model's name (serving.model_name, else the dataset's
    name): the few keys the DAGs need; stages load it fully themselves."""
    import yaml  # PyYAML ships with Airflow; imported here so parsing a DAG file never touches it

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config {path} does not exist (relative paths are taken from MEDPIPE_HOME)")
    with path.open() as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict) or not loaded.get("name"):
        raise ValueError(f"dataset config {path} has no `name` key: is it a medpipe task config?")
    return {**loaded, "model_name": (loaded.get("serving") or {}).get("model_name") or loaded["name"]}


def check_partition(partition: str) -> str:
    if not _PARTITION_RE.match(partition or ""):
        raise ValueError(f"partition {partition!r} is not a safe folder name (expected e.g. 2026-11-24)")
    return partition


def run_partition(context: dict, explicit: str | None = None) -> str:
    """The partition a run owns: the `partition` param, else its logical date, else the date it was run for.

    Never `now()`: a re-run or a retry of the same DAG run always writes the same folder.
    """
    if explicit:
        return check_partition(explicit)
    logical_date = context.get("logical_date")
    if logical_date is None:
        dag_run = context.get("dag_run")
        logical_date = getattr(dag_run, "run_after", None)
    if logical_date is None:
        raise ValueError("this run has neither a `partition` param nor a logical date; pass conf {'partition': ...}")
    return logical_date.strftime("%Y-%m-%d")


def triggering_events(triggering_asset_events: Any) -> list[dict]:
    """The asset events that triggered a run, oldest first, each once, as their `extra` plus `ingested_at`.

    Airflow lists each event under its asset and under every alias it came through, and merges several events into
    one run when they arrive together (a backfill): all of them are returned, de-duplicated.
    """
    seen: dict[Any, dict] = {}
    for group in (triggering_asset_events or {}).values():
        for event in group:
            extra = dict(getattr(event, "extra", None) or {})
            stamp = getattr(event, "timestamp", None)
            extra.setdefault("ingested_at", stamp.isoformat() if hasattr(stamp, "isoformat") else stamp)
            key = getattr(event, "id", None) or (extra.get("path"), extra.get("ingested_at"))
            seen[key] = extra
    return sorted(seen.values(), key=lambda extra: str(extra.get("ingested_at") or ""))


def newest_event_extra(triggering_asset_events: Any) -> dict:
    """`extra` of the newest asset event that triggered a run ({} for a manual run)."""
    events = triggering_events(triggering_asset_events)
    return events[-1] if events else {}


def is_backfill(context: dict) -> bool:
    """A run created by `airflow backfill create`, a medpipe_train run a backfill triggered (`from_backfill`), or
    one triggered by an asset event that a backfill run emitted (before backfills stopped emitting them)."""
    dag_run = context.get("dag_run")
    run_type = str(getattr(dag_run, "run_type", "") or "")
    if run_type.lower().endswith("backfill"):
        return True
    if (getattr(dag_run, "conf", None) or {}).get("from_backfill") is True:
        return True
    return any(extra.get("backfill") for extra in triggering_events(context.get("triggering_asset_events")))


# task states that are not final ("null": created with its run, not yet scheduled)
UNFINISHED_STATES = (None, "scheduled", "queued", "running", "up_for_retry", "up_for_reschedule", "deferred",
                     "restarting")
BACKFILL_RUN_PREFIX = "backfill__"


def pending_backfill_runs(task_states: dict[str, dict[str, Any]], task_id: str, own_run_id: str) -> list[str]:
    """Backfill runs (other than ours) whose `task_id` has not finished, from get_task_states' {run_id: {task: state}}.
    A backfill creates all its runs at once, so a run not yet started is here too, with a null state."""
    return sorted(run_id for run_id, tasks in task_states.items()
                  if run_id.startswith(BACKFILL_RUN_PREFIX) and run_id != own_run_id
                  and (tasks.get(task_id) if tasks.get(task_id) is None else str(tasks[task_id]).lower())
                  in UNFINISHED_STATES)


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:T\d{2}(?::?\d{2}(?::?\d{2})?)?)?$")


def order_partitions(ingested_at: dict[str, Any]) -> list[str]:
    """Partition names oldest first: by the date in the name when every name is a date (2026-11-24, 2026-11-24T06),
    else by ingest time (so `sample-small` does not outrank `2026-11-30` just by sorting after it)."""
    names = list(ingested_at)
    if names and all(_DATE_RE.match(name) for name in names):
        return sorted(names)
    return sorted(names, key=lambda name: (str(ingested_at[name] or ""), name))


def partition_ingest_times(root: Path, events: Iterable[dict] = (), marker: str = "schema.json") -> dict[str, str]:
    """{partition name: ingest time} of the complete partitions under root. The time comes from the asset event's
    extra (`ingested_at`) when the run has it, else from the partition's marker file (written by the ingest)."""
    from datetime import datetime, timezone

    known = {Path(str(extra.get("path"))).name: extra.get("ingested_at") for extra in events if extra.get("path")}
    found: dict[str, str] = {}
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and (child / marker).is_file():
                stamp = known.get(child.name) or datetime.fromtimestamp((child / marker).stat().st_mtime,
                                                                        timezone.utc).isoformat()
                found[child.name] = str(stamp)
    return found


def safe_name(text: str) -> str:
    """A run id such as `manual__2026-11-24T06:00:00+00:00` as a portable folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


def serving_address(explicit: str | None = None) -> tuple[str, str]:
    """(host:port, where it came from), looked up at run time in the documented order."""
    if explicit:
        return explicit, "param serving_grpc"
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(SERVING_CONN_ID)
        if conn.host:
            return f"{conn.host}:{conn.port or 8500}", f"connection {SERVING_CONN_ID}"
    except Exception as exc:  # not defined: the usual case in the local setup
        log.debug("no Airflow connection %s (%s)", SERVING_CONN_ID, exc)
    try:
        from airflow.sdk import Variable

        value = Variable.get(SERVING_VARIABLE, default=None)
        if value:
            return str(value), f"variable {SERVING_VARIABLE}"
    except Exception as exc:
        log.debug("no Airflow variable %s (%s)", SERVING_VARIABLE, exc)
    for name in SERVING_ENV:
        if os.environ.get(name):
            return os.environ[name], f"env {name}"
    return DEFAULT_SERVING_GRPC, "default"


def inference_address(explicit: str | None = None) -> tuple[str, str]:
    """(host:port, where it came from) of the endpoint batch scoring calls: the gateway when one is configured."""
    if explicit:
        return explicit, "param serving_grpc"
    if os.environ.get(INFERENCE_ENV):
        return os.environ[INFERENCE_ENV], f"env {INFERENCE_ENV}"
    return serving_address()


def inference_connection_args() -> list[str]:
    """serving.batch's --tls-ca/--tls-cert/--tls-key/--token-file from the environment (paths, e.g. Docker secrets),
    read at run time; none set: a plain connection (the local `medpipe serve`)."""
    return [item for flag, name in INFERENCE_CONNECTION_ENV.items() if os.environ.get(name)
            for item in (flag, os.environ[name])]


def deid_env() -> dict[str, str]:
    """MEDPIPE_DEID_KEY for the ingest subprocess, read at run time: env, else the Airflow Variable `medpipe_deid_secret`.

    The key is never a DAG param or a file in the repo (params are stored in the metadata DB in clear text).
    """
    key = os.environ.get("MEDPIPE_DEID_KEY", "")
    if not key:
        try:
            from airflow.sdk import Variable

            key = Variable.get(DEID_VARIABLE, default=None) or ""
        except Exception as exc:
            log.debug("no Airflow variable %s (%s)", DEID_VARIABLE, exc)
    if not key:
        raise ValueError(
            "the de-identification key is not set: export MEDPIPE_DEID_KEY in the worker's environment or create "
            f"the Airflow Variable {DEID_VARIABLE} (`airflow variables set {DEID_VARIABLE} ...`)"
        )
    return {"MEDPIPE_DEID_KEY": key}


def latest_partition(root: Path, marker: str = "schema.json") -> Path | None:
    """The newest complete partition folder under root (see order_partitions), or None."""
    ordered = order_partitions(partition_ingest_times(root, marker=marker))
    return root / ordered[-1] if ordered else None


def address_reachable(address: str, timeout: float = 2.0) -> bool:
    """True when a TCP connection to host:port opens (the serving endpoint is up)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Launching a stage
# --------------------------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    """A stage subprocess exited non-zero; the message carries the command, the exit code and the stderr tail.

    Airflow retries it (a crash, a lost server, an out-of-memory kill may pass on the next try)."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


try:  # airflow.sdk is importable wherever DAGs are parsed; the fallback keeps this module usable without it
    from airflow.sdk.exceptions import AirflowFailException as _NoRetry
except ImportError:  # pragma: no cover
    _NoRetry = RuntimeError  # type: ignore[misc,assignment]


class StageRefused(StageFailed, _NoRetry):
    """Exit status 2: the stage refused its input or config (medpipe's MedpipeError). Retrying cannot help, so the
    task fails at once (an AirflowFailException skips the remaining retries)."""


class StageVerdict(StageFailed, _NoRetry):
    """Exit status 3: the stage ran and its verdict is negative (not blessed, nothing written). Not a crash: the
    caller decides what it means; left uncaught it fails the task without retries."""


EXIT_REFUSED = 2
EXIT_VERDICT = 3

# Stage processes started by this task process: {pid: Popen}. kill_running_stages() ends their process groups.
_RUNNING: dict[int, subprocess.Popen] = {}
_RUNNING_LOCK = threading.Lock()


def kill_running_stages(*_args: Any, **_kwargs: Any) -> None:
    """Kill the process group of every stage this task process started (SIGTERM, then SIGKILL after a grace).

    Installed as the running task's `on_kill`: Airflow calls it when the task is marked failed or success, cleared,
    timed out, or its worker shuts down (the task runner's SIGTERM handler). A stage runs in its own session, so
    without this its whole tree would survive the task, re-parented to PID 1.
    """
    with _RUNNING_LOCK:
        running = list(_RUNNING.values())
    for process in running:
        log.error("task is being stopped: killing stage process group %s", process.pid)
        _kill_group(process)
    _alert_if_marked_failed()


def _alert_if_marked_failed() -> None:
    """A running task marked *failed* by hand ends through on_kill, and the task runner then reports a retry (or
    nothing): on_failure_callback never runs. Ask Airflow what the task's state is now and alert when it is failed
    (marked success or cleared: no alert)."""
    try:
        from airflow.sdk import get_current_context

        context = get_current_context()
        ti = context["ti"]
        states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id])
    except Exception as exc:  # noqa: BLE001 - not inside a task, or the API is unreachable: nothing to decide on
        log.info("on_kill: the task's state could not be read (%s); no alert", type(exc).__name__)
        return
    state = str((states.get(ti.run_id) or {}).get(ti.task_id, "")).lower()
    if state.endswith("failed"):
        notify_failure({**context, "reason": "marked failed by hand while running: its stage was stopped"})


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    """Ask the kernel to SIGKILL the stage if the task process dies without running on_kill (e.g. SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1 (Linux only; elsewhere a no-op)
    except Exception:  # noqa: BLE001 - never let the child fail to start over this
        pass


def _kill_with_current_task() -> None:
    """Make the running Airflow task's on_kill kill our stages (the task runner calls ti.task.on_kill on SIGTERM)."""
    try:
        from airflow.sdk import get_current_context

        task = get_current_context().get("task")
    except Exception:  # not inside an Airflow task (unit tests, scripts)
        return
    if task is not None and getattr(task, "on_kill", None) is not kill_running_stages:
        task.on_kill = kill_running_stages


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_stage(
    module: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    capture_stdout: bool = False,
    logger: logging.Logger | None = None,
) -> list[str]:
    """Run `sys.executable -m module args...`, streaming stdout and stderr into the task log line by line.

    Returns the stdout lines when capture_stdout is set. Exit 2 raises StageRefused and exit 3 StageVerdict (no
    retries); any other non-zero exit raises StageFailed (retried). The child runs in its own process group, which
    dies with the task: on_kill (mark failed, clear, worker shutdown), an exception in the waiting task
    (execution_timeout), if the task process itself is SIGKILLed the kernel's parent-death signal, and if a process
    above the task dies (a SIGKILLed scheduler, whose LocalExecutor workers live on) SupervisorDied within
    SUPERVISION_POLL_SECONDS.
    """
    logger = logger or log
    command = [sys.executable, "-m", module, *map(str, args)]
    logger.info("running: %s", " ".join(command))
    _kill_with_current_task()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=str(medpipe_home()),
        env=stage_env(env),
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    with _RUNNING_LOCK:
        _RUNNING[process.pid] = process
    stdout_lines: list[str] = []
    stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def pump(stream: Iterable[str], label: str, keep: Any) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            logger.info("[%s %s] %s", module, label, line)
            keep(line)

    threads = [
        threading.Thread(target=pump, args=(process.stdout, "out", stdout_lines.append if capture_stdout else
                                            (lambda _line: None)), daemon=True),
        threading.Thread(target=pump, args=(process.stderr, "err", stderr_tail.append), daemon=True),
    ]
    for thread in threads:
        thread.start()
    supervisors = _supervisors()
    try:
        returncode = _wait_supervised(process, supervisors)
    except BaseException:
        logger.error("interrupted: stopping %s (process group %s)", module, process.pid)
        _kill_group(process)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=10)
        with _RUNNING_LOCK:
            _RUNNING.pop(process.pid, None)
    if returncode != 0:
        tail = "\n".join(stderr_tail) or "(no stderr)"
        message = (f"{module} exited with status {returncode}.\ncommand: {' '.join(command)}\n"
                   f"last {len(stderr_tail)} lines of stderr:\n{tail}")
        if returncode == EXIT_REFUSED:
            raise StageRefused(message + "\n(exit 2: the input or the config was refused; not retried: fix and "
                               "trigger again)", returncode)
        if returncode == EXIT_VERDICT:
            raise StageVerdict(message, returncode)
        raise StageFailed(message, returncode)
    logger.info("%s finished (exit 0)", module)
    return stdout_lines


SUPERVISION_POLL_SECONDS = 2.0


class SupervisorDied(RuntimeError):
    """A process above the task (the Airflow worker, the scheduler that forked it) died: nobody supervises us."""


def _supervisors() -> list[Any]:
    """The processes above this task process, up to (not including) PID 1: the task supervisor, the executor's
    worker, the scheduler, `airflow standalone`... as psutil handles (pid + start time, so a reused pid is not
    mistaken for the original)."""
    import psutil

    chain = []
    current = psutil.Process().parent()
    while current is not None and current.pid > 1 and len(chain) < 16:
        chain.append(current)
        current = current.parent()
    return chain


def _wait_supervised(process: subprocess.Popen, supervisors: list[Any]) -> int:
    """process.wait(), raising SupervisorDied when one of `supervisors` is gone. A SIGKILLed scheduler leaves its
    LocalExecutor workers (and so this task process) running, re-parented to PID 1: the parent-death signal never
    fires and a training would run to its end unsupervised, invisible to the restarted scheduler."""
    while True:
        try:
            return process.wait(timeout=SUPERVISION_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            gone = next((each for each in supervisors if not _alive(each)), None)
            if gone is not None:
                raise SupervisorDied(f"the Airflow process {gone.pid} above this task died (scheduler or worker "
                                     "crash): the stage was stopped rather than left running unsupervised; "
                                     "the restarted scheduler re-runs the task") from None


def _alive(handle: Any) -> bool:
    """Running and not a zombie (a SIGKILLed scheduler stays a zombie until `airflow standalone` reaps it)."""
    import psutil

    try:
        return handle.is_running() and handle.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=10)
    try:  # the leader is gone; members that ignored SIGTERM (Beam workers, TF threads' children) are not
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def set_args(overrides: Iterable[str]) -> list[str]:
    """["a.b=1", ...] -> ["--set", "a.b=1", ...], checked by medpipe.config.set_flags (the one expansion)."""
    from medpipe.config import set_flags

    return set_flags(list(overrides or ()))


# --------------------------------------------------------------------------------------------------------------
# PACS (DICOMweb) sources
# --------------------------------------------------------------------------------------------------------------
PACS_CONN_ID = "medpipe_pacs"  # login/password (basic) or password alone as a bearer token, for DICOMweb sources
DICOMWEB_ENV = ("MEDPIPE_DICOMWEB_USER", "MEDPIPE_DICOMWEB_PASSWORD", "MEDPIPE_DICOMWEB_TOKEN")


def is_dicomweb(uri: str) -> bool:
    return uri.startswith(("dicomweb+http://", "dicomweb+https://"))


def dicomweb_env() -> dict[str, str]:
    """DICOMweb credentials for a stage subprocess, at run time: the worker's environment, else the Airflow connection
    `medpipe_pacs` (login + password = basic auth; password alone = bearer token); none = no authentication."""
    env = {name: os.environ[name] for name in DICOMWEB_ENV if os.environ.get(name)}
    if env:
        return env
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(PACS_CONN_ID)
    except Exception as exc:  # not defined: a PACS without authentication (loopback test setups)
        log.debug("no Airflow connection %s (%s)", PACS_CONN_ID, exc)
        return {}
    if conn.login:
        return {"MEDPIPE_DICOMWEB_USER": conn.login, "MEDPIPE_DICOMWEB_PASSWORD": conn.password or ""}
    return {"MEDPIPE_DICOMWEB_TOKEN": conn.password} if conn.password else {}


def partition_fields(dataset: str, partition: str) -> dict[str, str]:
    """Placeholders of the DAGs' URI params: {dataset}, {partition}, {ds} and {ds_nodash} (for a PACS query's
    StudyDate, e.g. `dicomweb+http://pacs/dicom-web?StudyDate={ds_nodash}&ModalitiesInStudy=MR`)."""
    return {"dataset": dataset, "partition": partition, "ds": partition, "ds_nodash": partition.replace("-", "")}
