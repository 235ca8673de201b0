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
    notify_failure,
)

DOC_MD = """
### medpipe_train

`train` (`python -m models.train`) -> `evaluate` (`python -m models.evaluate`, writes `blessing.json`) -> `gate` ->
`publish` (`python -m serving.publish --label stable`, then asks the serving endpoint to reload when it answers).

* **When**: on every update of a dataset Asset `medpipe://ingested/<dataset>` (emitted by `medpipe_ingest`), or on
  trigger. An asset-triggered run trains on the partition named in the newest asset event; a triggered run uses
  the `data_uri` param, else the newest complete partition under `$MEDPIPE_DATA_ROOT/ingested/<dataset>/`.
* **Outputs**: run directory `$MEDPIPE_DATA_ROOT/training/<dataset>/<run id>/` (model, history, TensorBoard,
  `evaluation/` report, `blessing.json`); published versions in `$MEDPIPE_MODEL_REPOSITORY/<model name>/<version>/`
  (default `$MEDPIPE_DATA_ROOT/models`). A retry of `train` resumes from the run's `backup/` checkpoint.
* **Gate**: a model that is not blessed is **not published**: `gate` logs the reasons and skips `publish`
  (or fails the run when `fail_if_not_blessed` is set).
* **Where training runs**: `training_mode` param, else env `MEDPIPE_TRAINING_MODE`, else `local` (a subprocess with
  `--cpu-replicas`; the `workers` param starts that many local worker processes, `--workers`). `kubernetes` (needs
  `apache-airflow-providers-cncf-kubernetes`) starts a pod from `$MEDPIPE_IMAGE` (default `medpipe:gpu`) requesting
  `$MEDPIPE_TRAIN_GPUS` (default 1) `nvidia.com/gpu`; `docker` (needs `apache-airflow-providers-docker`) runs the
  same image with GPU device requests. Paths must then be on storage the
  pod/container mounts at the same place.
* **Concurrency**: `max_active_runs=1`, and `train` runs in the pool `medpipe_training`
  (`airflow pools set medpipe_training 1 "medpipe training"`; `airflow pools import config/airflow/pools.json`).
* **Serving address** for the reload: param `serving_grpc`, connection `medpipe_serving`, Variable
  `medpipe_serving_grpc`, env `MEDPIPE_SERVING_GRPC` / `MEDPIPE_TF_SERVING_GRPC`, default `localhost:8500`.
"""

DATASET_ASSETS = [Asset(name=dataset_asset_name(name), uri=dataset_asset_uri(name)) for name in DATASETS]


@dag(
    dag_id="medpipe_train",
    schedule=AssetAny(*DATASET_ASSETS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(),
    on_failure_callback=notify_failure,
    doc_md=DOC_MD,
    tags=["medpipe", "training", "serving"],
    params={
        "config": Param(None, type=["null", "string"],
                        description="task config name/path; empty = the one the triggering ingest used, else brain_mri"),
        "data_uri": Param(None, type=["null", "string"],
                          description="ingested partition; empty = from the asset event, else the newest partition"),
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
    },
)
def medpipe_train():
    @task
    def plan(params=None, **context) -> dict:
        """Pick the dataset partition and the run directory of this run."""
        from pathlib import Path

        from medpipe_dag_common import (data_root, latest_partition, load_task_config, newest_event_extra,
                                        resolve_config, resolve_path, safe_name)

        event_extra = newest_event_extra(context.get("triggering_asset_events"))
        config_path = resolve_config(params.get("config") or event_extra.get("config") or "brain_mri")
        config = load_task_config(config_path)
        dataset = config["name"]
        if params.get("data_uri"):
            data = resolve_path(params["data_uri"], dataset=dataset)
        elif event_extra.get("path"):
            data = event_extra["path"]
        else:
            found = latest_partition(data_root() / "ingested" / dataset)
            if found is None:
                raise FileNotFoundError(f"no ingested partition under {data_root() / 'ingested' / dataset}: "
                                        "run medpipe_ingest first or pass the `data_uri` param")
            data = str(found)
        if "://" not in data and not (Path(data) / "schema.json").is_file():
            raise FileNotFoundError(f"{data} is not an ingested partition (no schema.json)")
        run_dir = data_root() / "training" / dataset / safe_name(context["run_id"])
        model_name = (config.get("serving") or {}).get("model_name") or dataset
        return {"config": config_path, "dataset": dataset, "data": data, "run_dir": str(run_dir),
                "model_name": model_name}

    @task(pool=TRAINING_POOL, execution_timeout=timedelta(hours=8))
    def train(job: dict, params=None, **context) -> dict:
        """Train in a subprocess (default), a Kubernetes pod or a Docker container."""
        import os

        from medpipe_dag_common import run_stage, set_args

        args = ["--config", job["config"], "--data", job["data"], "--output", job["run_dir"],
                *set_args(params["overrides"])]
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
        """Evaluate on the test split; the stage writes RUN_DIR/blessing.json."""
        import json
        from pathlib import Path

        from medpipe_dag_common import StageFailed, run_stage

        out = Path(job["run_dir"]) / "evaluation"
        try:
            run_stage("models.evaluate", ["--model", job["run_dir"], "--data", job["data"], "--split", "test",
                                          "--output", str(out)])
        except StageFailed as exc:
            if exc.returncode != 3:  # 3 = evaluated, not blessed: the gate task says so; anything else failed
                raise
        blessing_file = Path(job["run_dir"]) / "blessing.json"
        return {**job, "blessing": json.loads(blessing_file.read_text()), "evaluation": str(out)}

    @task.short_circuit
    def gate(job: dict, params=None) -> bool:
        """Publish only a blessed model; say why when it is not."""
        import logging

        from airflow.sdk.exceptions import AirflowFailException

        blessing = job["blessing"]
        logger = logging.getLogger("medpipe.dags")
        if blessing.get("blessed") is True:
            logger.info("model in %s is blessed: publishing", job["run_dir"])
            return True
        reasons = "; ".join(map(str, blessing.get("reasons") or ["(no reason given)"]))
        message = f"model in {job['run_dir']} is NOT blessed, it will not be published: {reasons} " \
                  f"(report: {job['evaluation']})"
        if params.get("fail_if_not_blessed"):
            raise AirflowFailException(message)
        logger.warning(message)
        return False

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
