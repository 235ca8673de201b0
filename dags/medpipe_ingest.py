"""medpipe_ingest: the Beam ingest pipeline, one partition per run, announcing the dataset Asset when it lands."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetAlias, Param, dag, task

from medpipe_dag_common import (
    ASSET_EVENTS_POOL,
    DATASETS,
    INGESTED_ALIAS,
    PARTITION_PATTERN,
    dataset_asset_name,
    dataset_asset_uri,
    default_task_args,
    schedule_from_env,
)

SOURCE_ENV = "MEDPIPE_INGEST_SOURCE_URI"  # the source of scheduled runs (placeholders as in source_uri)
RUNNERS = ["DirectRunner", "DaskRunner", "FlinkRunner", "PortableRunner", "SparkRunner", "DataflowRunner"]

DOC_MD = """
### medpipe_ingest

Runs `python -m beam_pipelines.ingest` (Apache Beam) over one **source** folder/URI and writes one **partition** of
validated, de-identified, split TFRecords (`train/val/test-*.tfrecord.gz`, `schema.json`, `stats.json`,
`rejected.jsonl`).

* **Partition**: the `partition` param, else the run's logical date (`YYYY-MM-DD`). A re-run of the same run or
  date *replaces* the partition (the stage writes a temp folder beside it and moves it in), so retries and
  backfills are idempotent.
* **Source**: the `source_uri` param, else env `MEDPIPE_INGEST_SOURCE_URI` (scheduled runs); with neither the run
  is skipped (`plan` says so) and writes nothing: unpausing the DAG never ingests a source nobody named.
* **Output** (default): `$MEDPIPE_DATA_ROOT/ingested/<dataset>/<partition>/` (`MEDPIPE_DATA_ROOT` defaults to
  `<repo>/runs`). Placeholders `{home}`, `{data_root}`, `{dataset}`, `{partition}` work in `source_uri` and
  `output_uri`.
* **PACS source**: `source_uri` = `dicomweb+http://HOST:PORT/ROOT?StudyDate={ds_nodash}&ModalitiesInStudy=MR` pulls
  the run's day from the PACS (QIDO-RS + WADO-RS inside the pipeline) with labels from `labels_uri` (CSV keyed by
  StudyInstanceUID or AccessionNumber); `airflow backfill create` over a date range fills one partition per day.
  Credentials: the connection `medpipe_pacs` (or MEDPIPE_DICOMWEB_* in the worker's environment).
* **Runner**: `runner` + `pipeline_options` (e.g. `["--direct_num_workers=2", "--direct_running_mode=multi_processing"]`).
  On the compose `flink` profile use `runner=PortableRunner` with `["--job_endpoint=beam-job-server:8099",
  "--artifact_endpoint=beam-job-server:8098", "--environment_type=EXTERNAL",
  "--environment_config=localhost:50000"]` (the worker pool is a sidecar of the task manager): the compose job
  server matches the compose Flink (1.19).
  Not `FlinkRunner --flink_master=...`: it downloads a job-server jar for Beam's default Flink version.
* **De-identification key**: `MEDPIPE_DEID_KEY` in the worker environment, else the Variable `medpipe_deid_secret`
  (masked by Airflow); never a param.
* **0 records written** (every input rejected, or an empty source) fails `run_ingest` without retries and emits no
  asset event: `medpipe_train` never sees an empty partition.
* **On success** an asset event for `medpipe://ingested/<dataset>` is emitted (through the alias
  `medpipe_ingested_dataset`) with the partition path, its ingest time (`ingested_at`, which orders partitions
  whose names are not dates), the counts and the config in its `extra`: `medpipe_train` is scheduled on it.
* **Backfills train once**: backfill runs emit no event; the last run of a backfill to finish
  (`backfill_complete`) triggers one `medpipe_train` run (`from_backfill: true`, so it does not publish) over the
  whole window. Triggered, not scheduled: while `medpipe_train` is paused the run waits, queued, and starts when it
  is unpaused. Two overlapping backfills train once, after both.

Schedule: env `MEDPIPE_INGEST_SCHEDULE` (read when the file is parsed; default `@daily`, `none` disables it).
"""


@dag(
    dag_id="medpipe_ingest",
    schedule=schedule_from_env("MEDPIPE_INGEST_SCHEDULE"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,  # history is loaded on purpose with `airflow backfill create`, not by accident on unpause
    max_active_runs=2,
    default_args=default_task_args(execution_timeout=timedelta(hours=2)),
    doc_md=DOC_MD,
    tags=["medpipe", "ingest", "beam"],
    params={
        "config": Param("brain_mri", type="string", minLength=1,
                        description="task config: a name from config/ (brain_mri, chest_xray) or a YAML path"),
        # no default: unpausing the DAG must not ingest anything an operator did not name (scheduled runs take
        # SOURCE_ENV, read at run time; the sample is the demo's business, passed explicitly)
        "source_uri": Param(None, type=["null", "string"], minLength=1,
                            description="folder/URI of class folders or DICOM files to ingest, or a PACS: "
                                        "dicomweb+http://HOST:PORT/ROOT?StudyDate={ds_nodash}&ModalitiesInStudy=MR; "
                                        f"empty = env {SOURCE_ENV}, else the run skips"),
        "labels_uri": Param(None, type=["null", "string"],
                            description="PACS source: labels CSV keyed by StudyInstanceUID or AccessionNumber"),
        "output_uri": Param("{data_root}/ingested/{dataset}/{partition}", type="string", minLength=1,
                            description="where the partition is written (replaced when it exists)"),
        "partition": Param(None, type=["null", "string"], pattern=PARTITION_PATTERN,
                           description="partition name; empty = the run's logical date (YYYY-MM-DD)"),
        "runner": Param("DirectRunner", type="string", enum=RUNNERS, description="Beam runner"),
        "pipeline_options": Param([], type="array", items={"type": "string", "pattern": "^--"},
                                  description="extra Beam pipeline options, e.g. --direct_num_workers=2"),
        "overrides": Param([], type="array", items={"type": "string", "pattern": "^[A-Za-z_.]+=.*"},
                           description="config overrides section.key=value (as --set)"),
    },
)
def medpipe_ingest():
    @task
    def plan(params=None, **context) -> dict:
        """Resolve every path of this run once; later tasks (and their retries) use exactly these."""
        import os
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowSkipException

        from medpipe_dag_common import (check_conf, load_task_config, partition_fields, resolve_config, resolve_path,
                                        run_partition)

        check_conf(context, params)
        source_uri = params.get("source_uri") or os.environ.get(SOURCE_ENV, "").strip()
        if not source_uri:
            raise AirflowSkipException(f"no source configured: pass `source_uri` in the run's conf or set {SOURCE_ENV} "
                                       "in the workers' environment; nothing ingested, no partition written")
        config_path = resolve_config(params["config"])
        dataset = load_task_config(config_path)["name"]
        partition = run_partition(context, params.get("partition"))
        fields = partition_fields(dataset, partition)
        output = resolve_path(params["output_uri"], **fields)
        source = resolve_path(source_uri, **fields)
        if "://" not in source and not Path(source).exists():
            raise FileNotFoundError(f"source {source} does not exist: set the `source_uri` param")
        labels = resolve_path(params["labels_uri"], **fields) if params.get("labels_uri") else None
        return {"config": config_path, "dataset": dataset, "partition": partition, "source": source,
                "output": output, "labels": labels}

    @task
    def run_ingest(job: dict, params=None) -> dict:
        """Launch the Beam pipeline on the configured runner. The stage writes a temp folder beside the partition and
        moves it into place when complete (a retry or re-run replaces the partition; a failed run leaves it as it was)."""
        from airflow.sdk.exceptions import AirflowFailException

        from medpipe_dag_common import StageVerdict, deid_env, dicomweb_env, is_dicomweb, run_stage, set_args

        args = ["--config", job["config"], "--input", job["source"], "--output", job["output"],
                "--input-report", f"{job['output']}.input-report.jsonl",  # PHI, beside the partition
                *set_args(params["overrides"]), "--runner", params["runner"], *params["pipeline_options"]]
        if job.get("labels"):
            args += ["--labels", job["labels"]]
        env = {**deid_env(), **(dicomweb_env() if is_dicomweb(job["source"]) else {})}
        try:
            run_stage("beam_pipelines.ingest", args, env=env)
        except StageVerdict as exc:  # exit 3: the pipeline ran and wrote 0 records; retrying cannot change that
            raise AirflowFailException(f"ingest of {job['source']} wrote 0 records: partition {job['partition']} "
                                       f"not written, no asset event (see the reasons above)\n{exc}") from exc
        return job

    @task(outlets=[AssetAlias(INGESTED_ALIAS)], pool=ASSET_EVENTS_POOL)
    def publish_asset(job: dict, *, outlet_events=None, **context) -> dict:
        """Check the partition is complete and not empty, log its counts, and announce it to medpipe_train."""
        import json
        import logging
        from datetime import datetime, timezone
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowFailException

        from medpipe_dag_common import is_backfill

        summary: dict = {}
        if "://" not in job["output"]:
            out = Path(job["output"])
            missing = [name for name in ("schema.json", "stats.json") if not (out / name).is_file()]
            if missing or not list(out.glob("*.tfrecord*")):
                raise FileNotFoundError(f"ingest output {out} is incomplete (missing {missing or 'TFRecords'})")
            stats = json.loads((out / "stats.json").read_text())
            summary = {key: stats.get(key) for key in ("input_files", "written", "rejected") if key in stats}
            if not stats.get("written"):
                raise AirflowFailException(f"partition {out} holds 0 records: no asset event")
            logging.getLogger("medpipe.dags").info("partition %s: %s", out, json.dumps(summary))
        if job["dataset"] not in DATASETS:
            logging.getLogger("medpipe.dags").warning(
                "dataset %s has no Asset medpipe_train is scheduled on; trigger medpipe_train by hand", job["dataset"])
        if is_backfill(context):
            # one training per backfill, after its last partition (backfill_complete), whether medpipe_train is
            # paused or not: an event per day would start a training per event that finds medpipe_train unpaused
            # and be dropped while it is paused
            logging.getLogger("medpipe.dags").info("backfill partition %s: no asset event; the backfill's last run "
                                                   "triggers medpipe_train once", job["partition"])
            return {**job, "summary": summary}
        asset = Asset(name=dataset_asset_name(job["dataset"]), uri=dataset_asset_uri(job["dataset"]))
        outlet_events[AssetAlias(INGESTED_ALIAS)].add(
            asset, extra={"path": job["output"], "partition": job["partition"], "config": job["config"],
                          "ingested_at": datetime.now(timezone.utc).isoformat(), "backfill": False, **summary})
        return {**job, "summary": summary}

    @task.short_circuit(pool=ASSET_EVENTS_POOL)
    def backfill_complete(job: dict, **context) -> bool:
        """True for the last run of a backfill to get here: no other backfill run of this DAG still has this task
        ahead of it (queued, running, retrying, or not yet scheduled). The one-slot pool serialises these checks, so
        of two runs finishing together exactly one sees the other done. Skips train_after_backfill otherwise."""
        import logging

        from medpipe_dag_common import is_backfill, pending_backfill_runs

        if not is_backfill(context):
            return False
        ti = context["ti"]
        pending = pending_backfill_runs(ti.get_task_states(dag_id=ti.dag_id, task_ids=[ti.task_id]), ti.task_id,
                                        ti.run_id)
        logging.getLogger("medpipe.dags").info(
            "backfill: %d other run(s) still to finish%s", len(pending),
            "" if pending else f": triggering medpipe_train once for the whole backfill ({job['dataset']})")
        return not pending

    # a triggered run (not an asset event): queued while medpipe_train is paused, started when it is unpaused
    train_after_backfill = TriggerDagRunOperator(
        task_id="train_after_backfill", trigger_dag_id="medpipe_train",
        conf={"config": "{{ ti.xcom_pull(task_ids='plan')['config'] }}", "from_backfill": True})

    backfill_complete(publish_asset(run_ingest(plan()))) >> train_after_backfill


medpipe_ingest()
