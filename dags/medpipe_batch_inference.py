"""medpipe_batch_inference: score one day's drop-folder partition against the served model over gRPC."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from medpipe_dag_common import PARTITION_PATTERN, default_task_args, notify_failure, schedule_from_env

DOC_MD = """
### medpipe_batch_inference

Each run scores the studies in one **drop-folder partition** (default `$MEDPIPE_DATA_ROOT/dropbox/<dataset>/<partition>/`,
any DICOM/PNG/JPEG files, recursively) with `python -m serving.client` against the **served** model over gRPC, and
writes `predictions.jsonl` (one line per file: file, finding, class, confidence, probabilities, ood_score,
in_distribution, model_version, request_id; the finding is "outside intended use" when the model's OOD guard flags
the image),
`predictions.csv` and `summary.json` to `$MEDPIPE_DATA_ROOT/predictions/<dataset>/<partition>/`.

* **Partition**: the `partition` param, else the run's logical date (`YYYY-MM-DD`). The output partition is written
  to a staging folder and swapped in: re-running a day replaces that day's predictions.
* **PACS source**: a `drop_uri` such as `dicomweb+http://pacs:8042/dicom-web?StudyDate={ds_nodash}&ModalitiesInStudy=MR`
  pulls the day's instances by QIDO-RS/WADO-RS into the partition's `instances/` (with `instances.csv` naming each
  file's study/series/instance UIDs) and scores them; credentials from the connection `medpipe_pacs`.
* A day with no drop folder is **skipped** (nothing arrived); the server not answering fails `check_server`, which
  retries with backoff before anything is written.
* **Serving address**: param `serving_grpc`, connection `medpipe_serving` (host + port), Variable
  `medpipe_serving_grpc`, env `MEDPIPE_SERVING_GRPC` / `MEDPIPE_TF_SERVING_GRPC`, default `localhost:8500`.

Schedule: env `MEDPIPE_BATCH_SCHEDULE` (default `@daily`, `none` disables it).
"""

CHUNK = 32  # files per client invocation: bounds the command line and the blast radius of a failed call


@dag(
    dag_id="medpipe_batch_inference",
    schedule=schedule_from_env("MEDPIPE_BATCH_SCHEDULE"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    on_failure_callback=notify_failure,
    doc_md=DOC_MD,
    tags=["medpipe", "inference", "serving"],
    params={
        "config": Param("brain_mri", type="string", minLength=1, description="task config name or YAML path"),
        "drop_uri": Param("{data_root}/dropbox/{dataset}/{partition}", type="string", minLength=1,
                          description="folder of new studies for this partition"),
        "output_uri": Param("{data_root}/predictions/{dataset}/{partition}", type="string", minLength=1,
                            description="where predictions of this partition are written (replaced)"),
        "partition": Param(None, type=["null", "string"], pattern=PARTITION_PATTERN,
                           description="partition name; empty = the run's logical date (YYYY-MM-DD)"),
        "serving_grpc": Param(None, type=["null", "string"], description="host:port of the gRPC endpoint"),
        "label": Param("stable", type="string", pattern="^[a-z][a-z0-9_-]*$", description="model version label"),
    },
)
def medpipe_batch_inference():
    @task
    def plan(params=None, **context) -> dict:
        """List the partition's files (sorted: stable output order) and resolve the output folder."""
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowSkipException

        from medpipe_dag_common import (is_dicomweb, load_task_config, partition_fields, resolve_config,
                                        resolve_path, run_partition, safe_name)

        config_path = resolve_config(params["config"])
        config = load_task_config(config_path)
        dataset = config["name"]
        partition = run_partition(context, params.get("partition"))
        fields = partition_fields(dataset, partition)
        drop_uri = resolve_path(params["drop_uri"], **fields)
        output = Path(resolve_path(params["output_uri"], **fields))
        pacs = drop_uri if is_dicomweb(drop_uri) else None  # listed and fetched by `score`
        drop = Path(drop_uri)
        if pacs is None and not drop.is_dir():
            raise AirflowSkipException(f"no drop folder {drop}: nothing arrived for partition {partition}")
        files = [] if pacs else sorted(str(path) for path in drop.rglob("*")
                                       if path.is_file() and not path.name.startswith("."))
        staging = output.with_name(f".{output.name}.staging-{safe_name(context['run_id'])}")
        return {"config": config_path, "dataset": dataset, "partition": partition, "files": files, "pacs": pacs,
                "output": str(output), "staging": str(staging),
                "model_name": (config.get("serving") or {}).get("model_name") or dataset}

    @task(retries=4)
    def check_server(job: dict, params=None) -> dict:
        """Fail (and retry with backoff) while the serving endpoint does not accept connections."""
        from medpipe_dag_common import address_reachable, serving_address

        address, origin = serving_address(params.get("serving_grpc"))
        if not address_reachable(address, timeout=5):
            raise ConnectionError(f"the serving endpoint {address} ({origin}) does not accept connections; start "
                                  "it (docker compose up tf-serving, or medpipe serve) or set the connection "
                                  "medpipe_serving / the serving_grpc param")
        return {**job, "server": address}

    @task(execution_timeout=timedelta(hours=2))
    def score(job: dict, params=None) -> dict:
        """Score in chunks through the client, then swap the finished partition into place."""
        import csv
        import json
        import shutil
        from pathlib import Path

        from medpipe_dag_common import dicomweb_env, replace_dir, run_stage, write_json_atomic

        staging = Path(job["staging"])
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if job.get("pacs"):  # QIDO-RS + WADO-RS into the partition: the scored files stay beside their predictions
            run_stage("beam_pipelines.dicomweb_source", ["--input", job["pacs"], "--output",
                                                         str(staging / "instances")], env=dicomweb_env())
            job = {**job, "files": sorted(str(p) for p in (staging / "instances").glob("*.dcm"))}
        rows: list[dict] = []
        for start in range(0, len(job["files"]), CHUNK):
            # no --config: the client preprocesses at the served model's own size (a task config at another
            # size is refused by the client)
            lines = run_stage("serving.client", ["--server", job["server"], "--model", job["model_name"],
                                                 "--label", params["label"], *job["files"][start:start + CHUNK]],
                              capture_stdout=True)
            rows += [json.loads(line) for line in lines if line.lstrip().startswith("{")]
        with (staging / "predictions.jsonl").open("w") as handle:
            handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        columns = ["file", "finding", "class", "confidence", "in_distribution", "ood_score", "model_version",
                   "request_id", "error"]
        with (staging / "predictions.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        classes: dict[str, int] = {}
        for row in rows:
            finding = str(row.get("finding", row.get("class")))  # "outside intended use" is counted as such
            classes[finding] = classes.get(finding, 0) + 1
        summary = {"partition": job["partition"], "files": len(job["files"]), "predictions": len(rows),
                   "classes": classes, "model_name": job["model_name"], "label": params["label"],
                   "model_versions": sorted({str(row.get("model_version")) for row in rows})}
        write_json_atomic(staging / "summary.json", summary)
        if len(rows) != len(job["files"]):
            raise RuntimeError(f"{len(job['files'])} files but {len(rows)} predictions came back; see the log")
        replace_dir(staging, Path(job["output"]))
        return {**summary, "output": job["output"]}

    score(check_server(plan()))


medpipe_batch_inference()
