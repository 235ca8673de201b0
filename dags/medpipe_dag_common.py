"""Shared pieces of the medpipe DAGs: task defaults, run-time settings, stage launching.

Parse-time rules (Airflow best practices, checked by tests/test_dags.py): this module imports only the standard
library and `airflow.sdk`, does no I/O, and reads no Variable or connection at import. Everything that depends on
the deployment (paths, the serving address, the training mode) is resolved *inside tasks* by the functions below.

The stages are never imported here: tasks launch them as `sys.executable -m <module> ...` (the interpreter that runs
the task, i.e. the deployment's venv), stream their output into the task log, and turn a non-zero exit into a task
failure whose message carries the tail of the stage's stderr.

Stable public helpers for every medpipe DAG file (keep their signatures):
  task defaults:   default_task_args(**overrides), notify_failure(context)
  run partition:   run_partition(context, explicit=None), check_partition(name), PARTITION_PATTERN, safe_name(text),
                   newest_event_extra(context["triggering_asset_events"])
  paths:           medpipe_home(), data_root(), model_repository(), resolve_path(value, **fields),
                   resolve_config(name_or_path), load_task_config(path), latest_partition(root, marker)
  stages:          run_stage(module, args, env=None, capture_stdout=False) -> stdout lines, StageFailed,
                   set_args(overrides), deid_env()
  outputs:         replace_dir(staging, final), write_json_atomic(path, payload)
  serving:         serving_address(explicit=None) -> (host:port, origin), address_reachable(address)
  assets:          DATASETS, dataset_asset_name(dataset), dataset_asset_uri(dataset), INGESTED_ALIAS, TRAINING_POOL

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

PARTITION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,99}$"  # a folder name: 2026-11-24, 2026-11-24T06, batch_7
_PARTITION_RE = re.compile(PARTITION_PATTERN)

# Serving address lookup order (first hit wins), all resolved at run time:
#   the DAG run's `serving_grpc` param -> Airflow connection `medpipe_serving` (host:port) ->
#   Airflow Variable `medpipe_serving_grpc` -> env MEDPIPE_SERVING_GRPC -> env MEDPIPE_TF_SERVING_GRPC -> default.
SERVING_CONN_ID = "medpipe_serving"
SERVING_VARIABLE = "medpipe_serving_grpc"
SERVING_ENV = ("MEDPIPE_SERVING_GRPC", "MEDPIPE_TF_SERVING_GRPC")
DEFAULT_SERVING_GRPC = "localhost:8500"

DEID_VARIABLE = "medpipe_deid_key"

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


def notify_failure(context: dict) -> None:
    """`on_failure_callback` of every task and DAG: one clear log line, plus an optional webhook.

    Set MEDPIPE_ALERT_WEBHOOK to a URL to receive a JSON POST (Slack/Teams/Alertmanager-style receivers); the hook
    never raises, so a broken receiver cannot mask the original failure.
    """
    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    payload = {
        "source": "medpipe-airflow",
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "error": str(context.get("exception") or context.get("reason") or "")[-2000:],
    }
    log.error("medpipe failure: %s", json.dumps(payload, default=str))
    url = os.environ.get("MEDPIPE_ALERT_WEBHOOK", "").strip()
    if not url:
        return
    try:
        request = urllib.request.Request(
            url, data=json.dumps(payload, default=str).encode(), headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=10).close()
    except Exception as exc:  # the alert is best effort; the task failure itself is already recorded
        log.warning("medpipe failure webhook %s did not accept the alert: %s", url, exc)


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
    """A config given as a bare name (`brain_mri`) -> <home>/config/brain_mri.yaml; a path -> resolve_path(path)."""
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        return str(medpipe_home() / "config" / f"{value}.yaml")
    return resolve_path(value)


def load_task_config(config_path: str) -> dict:
    """The few keys the DAGs need from a task config (name, serving.model_name); stages load it fully themselves."""
    import yaml  # PyYAML ships with Airflow; imported here so parsing a DAG file never touches it

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config {path} does not exist (relative paths are taken from MEDPIPE_HOME)")
    with path.open() as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict) or not loaded.get("name"):
        raise ValueError(f"dataset config {path} has no `name` key: is it a medpipe task config?")
    return loaded


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


def newest_event_extra(triggering_asset_events: Any) -> dict:
    """`extra` of the newest asset event that triggered a run ({} for a manual run).

    Airflow maps each event under its asset and under every alias it came through, so an event may appear twice;
    taking the newest by timestamp makes an asset-triggered medpipe_train use the partition ingested last.
    """
    events = [event for group in (triggering_asset_events or {}).values() for event in group]
    if not events:
        return {}
    return dict(max(events, key=lambda event: event.timestamp).extra or {})


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


def deid_env() -> dict[str, str]:
    """MEDPIPE_DEID_KEY for the ingest subprocess, read at run time: env, else the Airflow Variable `medpipe_deid_key`.

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
    """The newest complete partition folder under root (names sort by date), or None."""
    if not root.is_dir():
        return None
    done = [child for child in root.iterdir() if child.is_dir() and (child / marker).is_file()
            and not child.name.startswith(".")]
    return max(done, key=lambda child: child.name) if done else None


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a freshly written folder into place, so a re-run replaces its partition and readers never see half of it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        import shutil

        shutil.rmtree(old, ignore_errors=True)


def address_reachable(address: str, timeout: float = 2.0) -> bool:
    """True when a TCP connection to host:port opens (the serving endpoint is up)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Launching a stage
# --------------------------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    """A stage subprocess exited non-zero; the message carries the command, the exit code and the stderr tail."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


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

    Returns the stdout lines when capture_stdout is set. The child runs in its own process group, which is killed
    if the task is interrupted (execution_timeout, a manual "mark failed", a SIGTERM from the worker).
    """
    logger = logger or log
    command = [sys.executable, "-m", module, *map(str, args)]
    logger.info("running: %s", " ".join(command))
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=str(medpipe_home()),
        env=stage_env(env),
        start_new_session=True,
    )
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
    try:
        returncode = process.wait()
    except BaseException:
        logger.error("interrupted: stopping %s (process group %s)", module, process.pid)
        _kill_group(process)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=10)
    if returncode != 0:
        tail = "\n".join(stderr_tail) or "(no stderr)"
        raise StageFailed(f"{module} exited with status {returncode}.\ncommand: {' '.join(command)}\n"
                          f"last {len(stderr_tail)} lines of stderr:\n{tail}", returncode)
    logger.info("%s finished (exit 0)", module)
    return stdout_lines


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def set_args(overrides: Iterable[str]) -> list[str]:
    """["a.b=1", ...] -> ["--set", "a.b=1", ...] (validated: each must contain '=')."""
    out: list[str] = []
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not section.key=value")
        out += ["--set", item]
    return out


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
