"""medpipe_batch_inference: score one day's drop-folder partition against the served model over gRPC."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from medpipe_dag_common import PARTITION_PATTERN, default_task_args, schedule_from_env, stage_deadline

DOC_MD = """
### medpipe_batch_inference

Each run scores the files in one **drop-folder partition** (default `$MEDPIPE_DATA_ROOT/dropbox/<dataset>/<partition>/`,
any DICOM/PNG/JPEG files, recursively) with `python -m serving.batch` against the **served** model over gRPC, and
writes `predictions.jsonl` (one line per file: `outcome` = `predicted` with finding, class, confidence,
probabilities, ood_score, in_distribution, model_version, request_id (the finding is "outside intended use" when the
model's OOD guard flags the image), or `rejected` with a `reason`), `predictions.csv` and `summary.json` to
`$MEDPIPE_DATA_ROOT/predictions/<dataset>/<partition>/`.

* **Per-file outcome**: a file that is not an image (a stray `notes.txt`) or is corrupt is *rejected* with a reason;
  the others are scored. `score` fails only when more than `max_rejected_fraction` (param, default 0.2) of the files
  were rejected (not retried: the outputs are written so the reasons can be read).
* **Partition**: the `partition` param, else the run's logical date (`YYYY-MM-DD`). The files are listed by `score`
  itself when it starts, so clearing `score` alone scores the folder as it is now; the output partition is
  swapped in as a whole: re-running a day replaces that day's predictions.
* **PACS source**: a `drop_uri` such as `dicomweb+http://pacs:8042/dicom-web?StudyDate={ds_nodash}&ModalitiesInStudy=MR`
  makes `score` pull the day's instances by QIDO-RS/WADO-RS (`serving.batch --pacs`) into the partition's
  `instances/` (with `instances.csv` naming each file's study/series/instance UIDs) and score them; credentials from
  the connection `medpipe_pacs`.
* A day with no drop folder is **skipped** (nothing arrived); the server not answering fails `check_server`, which
  retries with backoff before anything is written.
* **Serving address**: param `serving_grpc`, env `MEDPIPE_INFERENCE_GRPC` (docker-compose: the gateway, so batch
  scoring is authenticated and audited like any app's requests), connection `medpipe_serving` (host + port),
  Variable `medpipe_serving_grpc`, env `MEDPIPE_SERVING_GRPC` / `MEDPIPE_TF_SERVING_GRPC`, default `localhost:8500`.
  TLS, client certificate and bearer token: files named by env `MEDPIPE_INFERENCE_TLS_CA`, `MEDPIPE_INFERENCE_TLS_CERT`,
  `MEDPIPE_INFERENCE_TLS_KEY`, `MEDPIPE_INFERENCE_TOKEN_FILE`.
* **Deadline**: an alert `MedpipeDeadlineMissed` when a run is not done 3 h after it was queued.

Schedule: env `MEDPIPE_BATCH_SCHEDULE` (default `@daily`, `none` disables it).
"""


@dag(
    dag_id="medpipe_batch_inference",
    schedule=schedule_from_env("MEDPIPE_BATCH_SCHEDULE"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    deadline=stage_deadline(hours=3, what="batch inference"),
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
        "max_rejected_fraction": Param(0.2, type="number", minimum=0, maximum=1,
                                       description="score fails when more files than this fraction are rejected"),
    },
)
def medpipe_batch_inference():
    @task
    def plan(params=None, **context) -> dict:
        """Check the conf, resolve the drop and output folders (the files are listed by `score`)."""
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowSkipException

        from medpipe_dag_common import (check_conf, is_dicomweb, load_task_config, partition_fields, resolve_config,
                                        resolve_path, run_partition)

        check_conf(context, params)
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
        return {"config": config_path, "dataset": dataset, "partition": partition, "pacs": pacs,
                "drop": None if pacs else str(drop), "output": str(output),
                "model_name": config["model_name"]}

    @task(retries=4)
    def check_server(job: dict, params=None) -> dict:
        """Fail (and retry with backoff) while the serving endpoint does not accept connections."""
        from medpipe_dag_common import address_reachable, inference_address

        address, origin = inference_address(params.get("serving_grpc"))
        if not address_reachable(address, timeout=5):
            raise ConnectionError(f"the serving endpoint {address} ({origin}) does not accept connections; start "
                                  "it (docker compose up gateway, or medpipe serve) or set MEDPIPE_INFERENCE_GRPC, "
                                  "the connection medpipe_serving or the serving_grpc param")
        return {**job, "server": address}

    @task(execution_timeout=timedelta(hours=2))
    def score(job: dict, params=None, **context) -> dict:
        """`python -m serving.batch`: list, score, write the partition (one outcome per file)."""
        import json
        from pathlib import Path

        from medpipe_dag_common import dicomweb_env, inference_connection_args, run_stage, safe_name

        # the PACS is queried here, not in plan, for the same reason the folder is listed here: after a clear of
        # `score` alone, what is scored is what is there now
        source, env = (["--pacs", job["pacs"]], dicomweb_env()) if job.get("pacs") else (["--drop", job["drop"]], None)
        run_stage("serving.batch", [*source, "--output", job["output"], "--server", job["server"],
                                    "--model", job["model_name"], "--label", params["label"],
                                    "--max-rejected-fraction", params["max_rejected_fraction"],
                                    "--request-id", f"batch-{safe_name(context['run_id'])}",
                                    *inference_connection_args()], env=env)
        summary = json.loads((Path(job["output"]) / "summary.json").read_text())
        return {**summary, "output": job["output"], "partition": job["partition"]}

    score(check_server(plan()))


medpipe_batch_inference()
