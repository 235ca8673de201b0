"""medpipe_monitoring: the daily drift report of the served model; the run fails (and alerts) above thresholds."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from medpipe_dag_common import PARTITION_PATTERN, default_task_args

DOC_MD = """
### medpipe_monitoring

Each run compares one day of **served traffic** with the **training data** and writes a drift report:
`python -m serving.monitoring` reads the gateway's request log (`medpipe gateway --request-log DIR` writes
`DIR/requests-YYYY-MM-DD.jsonl`: pixel-histogram summaries and predictions, never images or identities) and the
ingest's `stats.json`, and writes `drift_report.{json,md,html,png}` to
`$MEDPIPE_DATA_ROOT/monitoring/<dataset>/<date>/`.

* **Figures**: pixel-intensity PSI, predicted class shift (total variation distance to the training class mix),
  low-confidence rate; live accuracy when a `medpipe feedback` folder is given.
* **Alert**: any figure over its threshold (params; empty = `serving.monitoring`'s defaults, as the alert rules)
  **fails** `drift_report` without retrying, which runs `on_failure_callback` (the alert `MedpipeTaskFailed` to
  Alertmanager). A crash of the stage itself is retried.
* **No traffic**: no request at all in the day (status `no_traffic`) is an alert like the drift figures (the task
  fails, `MedpipeTaskFailed`). Fewer than `min_requests` requests (status `insufficient_data`) raises the alert
  `MedpipeNoTraffic` (the server, the gateway or its request log may be down); the run itself succeeds.
* **Date**: the `date` param, else the day before the run's logical date (a daily run at midnight reports the day
  that just ended). Re-running a day rewrites that day's report.
* **Baseline**: the `baseline_uri` param (an ingest folder or its `stats.json`), else the newest complete ingest
  partition of the dataset under `$MEDPIPE_DATA_ROOT/ingested/<dataset>/`.
* Gauges go to a Pushgateway when env `MEDPIPE_PUSHGATEWAY` is set (docker-compose sets it).
"""


@dag(
    dag_id="medpipe_monitoring",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_task_args(execution_timeout=timedelta(minutes=30)),
    doc_md=DOC_MD,
    tags=["medpipe", "monitoring", "drift"],
    params={
        "config": Param("brain_mri", type="string", minLength=1, description="task config name or YAML path"),
        "request_log_uri": Param("{data_root}/request_logs", type="string", minLength=1,
                                 description="the gateway's --request-log folder"),
        "baseline_uri": Param(None, type=["null", "string"],
                              description="ingest folder or stats.json; empty = newest ingest of the dataset"),
        "output_uri": Param("{data_root}/monitoring/{dataset}/{partition}", type="string", minLength=1,
                            description="where the day's report is written"),
        "feedback_uri": Param(None, type=["null", "string"], description="a `medpipe feedback` output folder"),
        "date": Param(None, type=["null", "string"], pattern=PARTITION_PATTERN,
                      description="day to report (YYYY-MM-DD); empty = the day before the logical date"),
        "model": Param(None, type=["null", "string"], description="model name in the log; empty = serving.model_name"),
        # empty = the stage's defaults (serving.monitoring: the one source, which the alert rules follow)
        "psi_threshold": Param(None, type=["null", "number"], minimum=0),
        "class_shift_threshold": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "low_confidence_rate_threshold": Param(None, type=["null", "number"], minimum=0, maximum=1),
        "min_requests": Param(None, type=["null", "integer"], minimum=0),
    },
)
def medpipe_monitoring():
    @task
    def drift_report(params=None, **context) -> dict:
        """Run the monitoring stage for the day; an alert (exit 1) fails the task without retries."""
        import json
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowFailException

        from medpipe_dag_common import (StageFailed, check_conf, check_partition, data_root, latest_partition,
                                        load_task_config, resolve_config, resolve_path, run_stage, send_alert)

        check_conf(context, params)

        config = load_task_config(resolve_config(params["config"]))
        dataset = config["name"]
        model = params.get("model") or config["model_name"]
        if params.get("date"):
            day = check_partition(params["date"])
        else:
            logical_date = context.get("logical_date") or getattr(context.get("dag_run"), "run_after", None)
            if logical_date is None:
                raise ValueError("this run has neither a `date` param nor a logical date; pass conf {'date': ...}")
            day = (logical_date - timedelta(days=1)).strftime("%Y-%m-%d")
        fields = {"dataset": dataset, "partition": day, "ds": day}
        if params.get("baseline_uri"):
            baseline = resolve_path(params["baseline_uri"], **fields)
        else:
            newest = latest_partition(data_root() / "ingested" / dataset)
            if newest is None:
                raise FileNotFoundError(f"no ingest of {dataset} under {data_root() / 'ingested'}: run medpipe_ingest "
                                        "or pass the baseline_uri param")
            baseline = str(newest)
        output = Path(resolve_path(params["output_uri"], **fields))
        report_path = output / "drift_report.json"
        report_path.unlink(missing_ok=True)  # a stale report must not be mistaken for this run's verdict
        args = ["--requests", resolve_path(params["request_log_uri"], **fields), "--baseline", baseline,
                "--date", day, "--output", str(output), "--model", model]
        for name in ("psi_threshold", "class_shift_threshold", "low_confidence_rate_threshold", "min_requests"):
            if params.get(name) is not None:
                args += [f"--{name.replace('_', '-')}", params[name]]
        if params.get("feedback_uri"):
            args += ["--feedback", resolve_path(params["feedback_uri"], **fields)]
        try:
            run_stage("serving.monitoring", args)
        except StageFailed as exc:
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            if report.get("status") in ("alert", "no_traffic"):  # a verdict, not a crash: retrying cannot change it
                messages = "; ".join(alert["message"] for alert in report["alerts"])
                raise AirflowFailException(f"drift alert for {model} on {day}: {messages} "
                                           f"(report {output / 'drift_report.html'})") from exc
            raise
        report = json.loads(report_path.read_text())
        if report.get("status") == "insufficient_data":
            send_alert("MedpipeNoTraffic", f"{model}: {report.get('n')} requests on {day} (fewer than "
                       f"{report['thresholds']['min_requests']}): no drift verdict", model=model, date=day,
                       description=f"report {output / 'drift_report.html'}; check the server and its request log")
        return {key: report[key] for key in ("date", "model", "status", "n", "psi", "class_shift",
                                             "low_confidence_rate")} | {"report": str(report_path)}

    drift_report()


medpipe_monitoring()
