"""medpipe_train: train -> evaluate -> gate -> publish, whenever a dataset Asset is updated (or on trigger)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAny, Param, dag, task

from medpipe_dag_common import (
    DATASETS,
    TRAINING_POOL,
    dataset_asset_name,
    dataset_asset_uri,
    default_task_args,
    stage_deadline,
)

DOC_MD = """
### medpipe_train

`plan` (`python -m medpipe.window`) -> `train` (`python -m models.train`) -> `evaluate` (`python -m models.evaluate`
twice, then `python -m models.gate`: `blessing.json`) -> `gate` -> `publish` (`python -m serving.publish --label
stable`, then asks the serving endpoint to reload when it answers).

* **When**: on every update of a dataset Asset `medpipe://ingested/<dataset>` (emitted by `medpipe_ingest`), or on
  trigger. Several events that arrive together (a backfill) make one run.
* **Training window**: `training.partitions` of the task config (`all`, `{last: N}` or a list of names; override with
  `overrides: ["training.partitions={last: 3}"]`) over the dataset's partitions under
  `$MEDPIPE_DATA_ROOT/ingested/<dataset>/`, ordered by date when their names are dates, else by ingest time; plus
  every `feedback*` partition. They must share one schema. The `data_uri` param trains on that one partition.
  The run records the exact partitions and a fingerprint of each in `<run>/window/window.json`.
* **Data-shaping settings** (image size, channels) come from the partitions' `schema.json`, so an ingest run with
  `image.size=64` is trained at 64 px; an explicit override that contradicts the data fails at once (exit 2).
* **Gate against production**: the candidate and the current `stable` version are evaluated on the same data: the
  newest partition's test split and the dataset's fixed **golden set** (`golden_uri`, default
  `$MEDPIPE_DATA_ROOT/golden/<dataset>/`, one sub-folder of images per label; never rewritten by the pipeline).
  It is blessed only when it passes `evaluation.thresholds` and is shown non-inferior to `stable` (paired bootstrap
  on the same images, margin `evaluation.max_regression`); a set under `evaluation.min_paired_examples` images
  abstains, and with no set large enough the verdict is "insufficient evidence". `<run>/blessing.json` records both
  models' figures and the evidence (n, differences, bounds, McNemar) on both sets.
* **Not blessed**: `gate` skips `publish` and raises the alert `MedpipeModelNotBlessed` (or fails the run when
  `fail_if_not_blessed` is set). **Backfill** runs (and runs triggered by a backfill's ingests) train and evaluate
  but do not publish unless `publish_backfill` is set.
* **Outputs**: run directory `$MEDPIPE_DATA_ROOT/training/<dataset>/<run id>/` (model, history, TensorBoard,
  `evaluation/`, `evaluation-golden/`, `blessing.json`); published versions in
  `$MEDPIPE_MODEL_REPOSITORY/<model name>/<version>/`. A retry of `train` resumes from the run's `backup/`.
* **Failures**: exit 2 of a stage (bad config or data) fails the task at once, without retries; other failures are
  retried. The stage processes die with their task (mark failed, clear, timeout, worker shutdown).
* **Where training runs**: `training_mode` param, else env `MEDPIPE_TRAINING_MODE`, else `local` (a subprocess with
  `--cpu-replicas`; the `workers` param starts that many local worker processes, `--workers`). `kubernetes` (needs
  `apache-airflow-providers-cncf-kubernetes`) starts a pod from `$MEDPIPE_IMAGE` (default `medpipe:gpu`) requesting
  `$MEDPIPE_TRAIN_GPUS` (default 1) `nvidia.com/gpu`; `docker` (needs `apache-airflow-providers-docker`) runs the
  same image with GPU device requests.
* **Concurrency**: `max_active_runs=1`, and `train` runs in the pool `medpipe_training`. **Deadline**: the alert
  `MedpipeDeadlineMissed` when a run is not done 10 h after it was queued.
"""

DATASET_ASSETS = [Asset(name=dataset_asset_name(name), uri=dataset_asset_uri(name)) for name in DATASETS]


@dag(
    dag_id="medpipe_train",
    schedule=AssetAny(*DATASET_ASSETS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    deadline=stage_deadline(hours=10, what="training"),
    doc_md=DOC_MD,
    tags=["medpipe", "training", "serving"],
    params={
        "config": Param(None, type=["null", "string"],
                        description="task config name/path; empty = the one the triggering ingest used, else brain_mri"),
        "data_uri": Param(None, type=["null", "string"],
                          description="train on this one partition; empty = the training.partitions window"),
        "golden_uri": Param("{data_root}/golden/{dataset}", type="string", minLength=1,
                            description="the dataset's fixed golden evaluation set (a folder of label folders)"),
        "overrides": Param([], type="array", items={"type": "string", "pattern": "^[A-Za-z_.]+=.*"},
                           description="training config overrides section.key=value (saved in the run's config)"),
        "cpu_replicas": Param(None, type=["null", "integer"], minimum=1, maximum=64,
                              description="MirroredStrategy CPU replicas for local training (empty = stage default)"),
        "workers": Param(None, type=["null", "integer"], minimum=1, maximum=16,
                         description="local training: N worker processes (MultiWorkerMirroredStrategy); empty = 1"),
        "training_mode": Param(None, type=["null", "string"], enum=[None, "local", "kubernetes", "docker"],
                               description="local subprocess | kubernetes pod | docker container"),
        "serving_grpc": Param(None, type=["null", "string"], description="host:port of the serving endpoint"),
        "label": Param("stable", type="string", pattern="^[a-z][a-z0-9_-]*$", description="version label"),
        "fail_if_not_blessed": Param(False, type="boolean", description="fail instead of skipping publish"),
        "publish_backfill": Param(False, type="boolean",
                                  description="publish a blessed model even when the run comes from a backfill"),
        "from_backfill": Param(False, type="boolean",
                               description="set by medpipe_ingest's train_after_backfill: a backfill's one training"),
    },
)
def medpipe_train():
    @task
    def plan(params=None, **context) -> dict:
        """Check the conf, choose the training window (`python -m medpipe.window`) and the run directory."""
        import json
        from pathlib import Path

        from medpipe_dag_common import (check_conf, data_root, is_backfill, load_task_config, order_partitions,
                                        partition_ingest_times, resolve_config, resolve_path, run_stage, safe_name,
                                        set_args, triggering_events)

        check_conf(context, params)
        events = triggering_events(context.get("triggering_asset_events"))
        newest_event = events[-1] if events else {}
        config_path = resolve_config(params.get("config") or newest_event.get("config") or "brain_mri")
        config = load_task_config(config_path)
        dataset = config["name"]
        root = data_root() / "ingested" / dataset
        if params.get("data_uri"):
            partitions = [resolve_path(params["data_uri"], dataset=dataset)]
            ingested_at: dict = {}
        else:
            ingested_at = partition_ingest_times(root, events)
            partitions = [str(root / name) for name in order_partitions(ingested_at)]
        if not partitions:
            raise FileNotFoundError(f"no ingested partition under {root}: run medpipe_ingest first or pass the "
                                    "`data_uri` param")
        run_dir = data_root() / "training" / dataset / safe_name(context["run_id"])
        lines = run_stage("medpipe.window", ["--config", config_path, *set_args(params["overrides"]),
                                             "--output", str(run_dir / "window"),
                                             "--ingested-at", json.dumps(ingested_at), *partitions],
                          capture_stdout=True)
        window = json.loads(lines[-1])
        golden = Path(resolve_path(params["golden_uri"], dataset=dataset))
        return {"config": config_path, "dataset": dataset, "data": window["window"], "newest": window["newest"],
                "partitions": window["partitions"], "run_dir": str(run_dir),
                # the data decides its own shape: these go before the user's overrides
                "data_overrides": [f"image.size={window['image_size']}", f"image.channels={window['channels']}"],
                "golden": str(golden) if golden.is_dir() else None,
                "backfill": is_backfill(context),
                "model_name": config["model_name"]}

    @task(pool=TRAINING_POOL, execution_timeout=timedelta(hours=8))
    def train(job: dict, params=None, **context) -> dict:
        """Train in a subprocess (default), a Kubernetes pod or a Docker container."""
        import os

        from medpipe_dag_common import run_stage, set_args

        args = ["--config", job["config"], "--data", job["data"], "--output", job["run_dir"],
                *set_args(job["data_overrides"] + list(params["overrides"]))]
        mode = params.get("training_mode") or os.environ.get("MEDPIPE_TRAINING_MODE", "local")
        if mode == "local":
            if params.get("cpu_replicas"):
                args += ["--cpu-replicas", str(params["cpu_replicas"])]
            if (params.get("workers") or 1) > 1:
                args += ["--workers", str(params["workers"])]
            run_stage("models.train", args)
        elif mode in ("kubernetes", "docker"):
            _train_in_container(mode, args, context)
        else:
            raise ValueError(f"training_mode {mode!r} is not local, kubernetes or docker")
        return job

    @task(execution_timeout=timedelta(hours=2))
    def evaluate(job: dict) -> dict:
        """Candidate and `stable` on the newest partition's gate split (the config's evaluation.gate_split: test, or
        the shift-aware test_shift) and on the golden set; one blessing."""
        import json
        import logging
        from pathlib import Path

        from medpipe_dag_common import StageVerdict, model_repository, run_stage

        run = Path(job["run_dir"])
        baseline = ["--baseline-repository", str(model_repository()), "--model-name", job["model_name"]]
        sets = {"partition_test": ["--data", job["newest"]]}
        if job["golden"]:
            sets["golden"] = ["--images", job["golden"]]
        else:
            logging.getLogger("medpipe.dags").warning(
                "no golden set for %s (param golden_uri): gating on the newest partition's test split only",
                job["dataset"])
        outputs = {}
        for name, source in sets.items():
            outputs[name] = run / ("evaluation" if name == "partition_test" else f"evaluation-{name}")
            try:
                run_stage("models.evaluate", ["--model", str(run), *source, "--output", str(outputs[name]),
                                              *baseline])
            except StageVerdict:  # exit 3 = not blessed: a verdict, read from blessing.json below
                pass
        try:
            run_stage("models.gate", ["--run", str(run),
                                      *[arg for name, out in outputs.items() for arg in ("--evaluation", f"{name}={out}")]])
        except StageVerdict:
            pass
        blessing = json.loads((run / "blessing.json").read_text())
        return {**job, "blessing": blessing, "evaluation": str(outputs["partition_test"])}

    @task.short_circuit
    def gate(job: dict, params=None) -> bool:
        """Publish only a blessed model, and from a backfill only when asked; alert when it is not blessed."""
        import logging

        from airflow.sdk.exceptions import AirflowFailException

        from medpipe_dag_common import send_alert

        blessing = job["blessing"]
        logger = logging.getLogger("medpipe.dags")
        if blessing.get("blessed") is not True:
            reasons = "; ".join(map(str, blessing.get("reasons") or ["(no reason given)"]))
            message = (f"model in {job['run_dir']} is NOT blessed, it will not be published: {reasons} "
                       f"(report: {job['evaluation']}/report.html)")
            insufficient = blessing.get("verdict") == "insufficient_evidence"
            send_alert("MedpipeModelNotBlessed", f"{job['model_name']}: " + (
                "insufficient evidence to compare the candidate with stable" if insufficient else
                "candidate not blessed") + ", stable unchanged",
                       description=message, model=job["model_name"], run_dir=job["run_dir"])
            if params.get("fail_if_not_blessed"):
                raise AirflowFailException(message)
            logger.warning(message)
            return False
        if job["backfill"] and not params.get("publish_backfill"):
            logger.warning("model in %s is blessed but this is a backfill run: not published (trigger with "
                           "publish_backfill=true, or `medpipe publish --run %s`)", job["run_dir"], job["run_dir"])
            return False
        logger.info("model in %s is blessed: publishing", job["run_dir"])
        return True

    @task
    def publish(job: dict, params=None) -> dict:
        """Write a new version into the model repository and ask a reachable server to reload."""
        import logging
        import os

        from medpipe_dag_common import address_reachable, model_repository, run_stage, serving_address

        logger = logging.getLogger("medpipe.dags")
        repository = model_repository()
        args = ["--run", job["run_dir"], "--repository", str(repository), "--model-name", job["model_name"],
                "--label", params["label"]]
        base = os.environ.get("MEDPIPE_SERVING_MODEL_BASE")  # e.g. /models in the compose tensorflow/serving
        if base:
            args += ["--base-path", f"{base.rstrip('/')}/{job['model_name']}"]
        address, origin = serving_address(params.get("serving_grpc"))
        if address_reachable(address):
            args += ["--server", address]
        else:
            logger.info("serving endpoint %s (%s) is not reachable: publishing without a reload request "
                        "(TF Serving picks the new version up when it polls models.config)", address, origin)
        run_stage("serving.publish", args)
        versions = sorted((path for path in (repository / job["model_name"]).iterdir() if path.name.isdigit()),
                          key=lambda path: int(path.name))
        if not versions:
            raise FileNotFoundError(f"serving.publish exited 0 but {repository / job['model_name']} has no version")
        logger.info("published %s version %s", job["model_name"], versions[-1].name)
        return {**job, "version": int(versions[-1].name), "version_path": str(versions[-1])}

    evaluated = evaluate(train(plan()))
    gate(evaluated) >> publish(evaluated)


def _train_in_container(mode: str, args: list[str], context: dict) -> None:
    """Run models.train in the medpipe image, requesting GPUs; needs the matching Airflow provider."""
    import os

    from airflow.sdk.exceptions import AirflowFailException

    image = os.environ.get("MEDPIPE_IMAGE", "medpipe:gpu")  # the Dockerfile's `gpu` target
    gpus = int(os.environ.get("MEDPIPE_TRAIN_GPUS", "1"))
    command = ["python", "-m", "models.train", *args]
    try:
        if mode == "kubernetes":
            from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
            from kubernetes.client import models as k8s

            operator = KubernetesPodOperator(
                task_id="train_pod", image=image, cmds=command[:3], arguments=command[3:],
                namespace=os.environ.get("MEDPIPE_K8S_NAMESPACE", "default"),
                container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
                env_vars={"TF_CPP_MIN_LOG_LEVEL": "2"}, get_logs=True, on_finish_action="delete_pod",
            )
        else:
            from airflow.providers.docker.operators.docker import DockerOperator
            from docker.types import DeviceRequest, Mount

            from medpipe_dag_common import data_root

            shared = str(data_root())  # mounted at the same path, so every path in args stays valid
            operator = DockerOperator(
                task_id="train_container", image=image, command=command, auto_remove="success",
                device_requests=[DeviceRequest(count=gpus, capabilities=[["gpu"]])] if gpus else None,
                mounts=[Mount(target=shared, source=shared, type="bind")], mount_tmp_dir=False,
            )
    except ImportError as exc:
        raise AirflowFailException(
            f"training_mode={mode} needs the Airflow provider for it ({exc}); install "
            f"apache-airflow-providers-{'cncf-kubernetes' if mode == 'kubernetes' else 'docker'} or use local"
        ) from exc
    operator.execute(context)


medpipe_train()
