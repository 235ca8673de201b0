"""Prometheus end to end: the repo's prometheus.yml and alert rules, a real Prometheus (Debian package) and
Pushgateway on loopback scraping a running `medpipe serve`, and the drift acceptance test (chest X-rays sent to the
brain MRI model raise the drift gauges and fail the monitoring run / DAG with an alert; brain MRIs do not).

Binaries come from scripts/install_system_deps.sh; each test that needs one skips with that hint when it is absent.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import GO_LISTENING, ROOT, run_module
from serving.listen import wait_listening

PROMETHEUS_DIR = ROOT / "config" / "prometheus"
SAMPLE = ROOT / "sample_data"
BRAIN_LABELS = ("glioma", "meningioma", "notumor", "pituitary")
MODEL = "brain_mri"
INSTALL_HINT = "is not installed: run scripts/install_system_deps.sh (as root) to install the Debian packages"


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} {INSTALL_HINT}")
    return path


# --------------------------------------------------------------------------------------------------------------
# Static checks of the repo's configuration
# --------------------------------------------------------------------------------------------------------------


def test_promtool_check_config_and_rules():
    promtool = _need("promtool")
    # --syntax-only: the gateway job's client certificate files are Docker secrets, present only in the container
    config = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_DIR / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 13 rules found" in rules.stdout
    jobs = {job["job_name"]: job for job in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["tf-serving"]["metrics_path"] == "/monitoring/prometheus/metrics"
    assert jobs["tf-serving"]["static_configs"][0]["targets"] == ["tf-serving:8501"]
    assert jobs["pushgateway"]["honor_labels"] is True and "statsd-exporter" in jobs
    gateway = jobs["gateway"]
    assert gateway["scheme"] == "https" and gateway["static_configs"][0]["targets"] == ["gateway:8501"]
    assert gateway["metrics_path"] == "/monitoring/prometheus/metrics"
    assert set(gateway["tls_config"]) == {"ca_file", "cert_file", "key_file"}
    assert all(path.startswith("/run/secrets/") for path in gateway["tls_config"].values())


def test_alert_rules_fire_on_their_thresholds(tmp_path):
    """promtool's rule unit tests: each alert fires on a series just over its threshold, and not under it."""
    promtool = _need("promtool")
    tests = {
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'medpipe_drift_psi{model="brain_mri",job="gateway"}', "values": "0.9x30"},
                {"series": 'medpipe_drift_psi{model="chest_xray",job="gateway"}', "values": "0.1x30"},
                {"series": 'medpipe_loaded_versions{model="brain_mri",version="1"}', "values": "0x10"},
                {"series": ':tensorflow:serving:request_count{model_name="brain_mri",status="OK"}',
                 "values": "0+90x20"},
                {"series": ':tensorflow:serving:request_count{model_name="brain_mri",status="ERROR"}',
                 "values": "0+10x20"},
                {"series": 'medpipe_ingest_files_read{dataset="brain_mri"}', "values": "100x5"},
                {"series": 'medpipe_ingest_files_rejected{dataset="brain_mri"}', "values": "20x5"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "InputDrift", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "model": "brain_mri"},
                    "exp_annotations": {
                        "summary": "brain_mri: input intensity PSI 0.90 (> 0.25)",
                        "description": "Served images differ from the training data (wrong modality, new scanner, "
                                       "preprocessing change)."}}]},
                {"eval_time": "10m", "alertname": "InputDrift", "exp_alerts": []},  # `for: 15m` not reached yet
                {"eval_time": "5m", "alertname": "ModelNotLoaded", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "model": "brain_mri"},
                    "exp_annotations": {
                        "summary": "model brain_mri has no loaded version",
                        "description": "Check the model repository and GET /v1/models/brain_mri for the load error."}}]},
                {"eval_time": "15m", "alertname": "HighErrorRate", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "model_name": "brain_mri"},
                    "exp_annotations": {"summary": "brain_mri: 10% of requests fail",
                                        "description": "More than 5% of requests returned a non-OK status over 5 minutes."}}]},
                {"eval_time": "2m", "alertname": "IngestRejectedFractionHigh", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "dataset": "brain_mri"},
                    "exp_annotations": {"summary": "ingest of brain_mri rejected 20% of its inputs",
                                        "description": "See rejected.jsonl in the ingest output for the reasons."}}]},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# The running stack: medpipe serve + Pushgateway + Prometheus on loopback
# --------------------------------------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(predicate, what: str, timeout: float = 60, processes=()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"{what}: {process.args[0]} exited with {process.returncode}")
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _prometheus_config_for(repo_config: dict, serving: str, pushgateway: str, gateway: str) -> dict:
    """The repo's prometheus.yml with compose service names replaced by loopback ports and 1 s intervals; the
    gateway runs as the loopback demo (plain HTTP, anonymous), so its job drops TLS here. Prometheus listens on a
    port the OS picks, known only once it runs, so its job of scraping itself is left out."""
    config = json.loads(json.dumps(repo_config))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    targets = {"tf-serving": serving, "pushgateway": pushgateway, "gateway": gateway}
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in targets]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if job["job_name"] == "gateway":
            job.pop("tls_config"), job.pop("scheme")
    return config




@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_sample_run, ingested_sample):
    prometheus_bin, pushgateway_bin = _need("prometheus"), _need("prometheus-pushgateway")
    work = tmp_path_factory.mktemp("observability")
    run_module("serving.publish", "--run", str(trained_sample_run), "--repository", str(work / "models"),
               "--model-name", MODEL, "--label", "stable", "--force")
    processes = []
    try:
        server = _start([sys.executable, "-m", "serving.server", "--repository", str(work / "models"),
                         "--host", "127.0.0.1", "--grpc-port", "0", "--rest-port", "auto"], work / "server.log")
        processes.append(server)
        served = wait_listening(work / "server.log", server)
        # the request log and the drift gauges live in the gateway, in front of the server
        front = _start([sys.executable, "-m", "serving.gateway", "--upstream", served["grpc"],
                        "--grpc-port", "0", "--rest-port", "0", "--allow-anonymous",
                        "--audit-log", str(work / "audit.jsonl"), "--request-log", str(work / "requests"),
                        "--drift-baseline", str(ingested_sample), "--model-repository", str(work / "models")],
                       work / "gateway.log")
        processes.append(front)
        rest = wait_listening(work / "gateway.log", front)["rest"]  # clients talk to the gateway
        # Debian's build persists to /var/lib/prometheus by default: keep this gateway's state in the test folder
        gateway = _start([pushgateway_bin, "--web.listen-address=127.0.0.1:0",
                          f"--persistence.file={work / 'pushgateway.data'}"], work / "pushgateway.log")
        processes.append(gateway)
        push = wait_listening(work / "pushgateway.log", gateway, GO_LISTENING, 30)["address"]
        config = _prometheus_config_for(yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text()),
                                        served["rest"].split("//")[1], push, rest.split("//")[1])
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = _start([prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", "--web.listen-address=127.0.0.1:0"],
                            work / "prometheus.log")
        processes.append(prometheus)
        prom = f"http://{wait_listening(work / 'prometheus.log', prometheus, GO_LISTENING, 60)['address']}"
        _wait(lambda: _get_json(f"{rest}/v1/models/{MODEL}")["model_version_status"][0]["state"] == "AVAILABLE",
              "the model to be served through the gateway", timeout=120, processes=[server, front])
        _wait(lambda: urllib.request.urlopen(f"{prom}/-/ready", timeout=2).status == 200,
              "Prometheus to be ready", processes=[prometheus])
        yield {"work": work, "rest": rest, "prometheus": prom, "pushgateway": push, "requests": work / "requests",
               "baseline": ingested_sample}
    finally:
        for process in reversed(processes):
            _stop(process)


def _predict(rest: str, files: list[Path], request_id: str) -> list[dict]:
    """REST :predict (TF Serving's row format with b64 bytes), one request per 8 files."""
    answers = []
    for start in range(0, len(files), 8):
        chunk = files[start:start + 8]
        body = {"instances": [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in chunk]}
        request = urllib.request.Request(f"{rest}/v1/models/{MODEL}/labels/stable:predict",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "x-request-id": f"{request_id}-{start}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers += json.loads(response.read())["predictions"]
    return answers


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    answer = _get_json(url)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _value(prometheus: str, expr: str) -> float | None:
    result = _query(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


def _eventually(prometheus: str, expr: str, check, what: str, timeout: float = 30) -> float:
    found = {}

    def ok():
        found["value"] = _value(prometheus, expr)
        return found["value"] is not None and check(found["value"])

    try:
        _wait(ok, what, timeout=timeout)
    except BaseException:
        print(f"last value of `{expr}`: {found.get('value')}; all series: {_query(prometheus, expr)}")
        raise
    return found["value"]


@pytest.fixture(scope="module")
def brain_traffic(stack) -> list[dict]:
    """In-distribution traffic: 10 brain MRI slices of each class, through REST, classes interleaved (as a clinic's
    traffic would be): a run of one class alone has its own intensity profile and would look like drift."""
    per_class = [sorted((SAMPLE / "brain_mri" / label).iterdir())[:10] for label in BRAIN_LABELS]
    files = [paths[index] for index in range(10) for paths in per_class]
    answers = _predict(stack["rest"], files, "brain")
    assert len(answers) == 40
    return answers


def _today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # the server names its log by the UTC day


def _monitor(stack, requests_dir: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    # The fixture's model is trained for 3 epochs on 100 images: near-uniform probabilities, so its predicted class
    # mix and confidence are off whatever it is shown. Input drift (PSI) is the signal under test; the class-shift
    # and low-confidence alerts are exercised in tests/test_monitoring.py.
    return subprocess.run([sys.executable, "-m", "serving.monitoring", "--requests", str(requests_dir),
                           "--baseline", str(stack["baseline"]), "--date", _today(), "--output", str(output),
                           "--model", MODEL, "--class-shift-threshold", "1", "--low-confidence-rate-threshold", "1",
                           "--pushgateway", stack["pushgateway"], *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_prometheus_scrapes_tf_serving_and_medpipe_metrics(stack, brain_traffic):
    prom = stack["prometheus"]
    assert _eventually(prom, 'up{job="tf-serving"}', lambda v: v == 1, "the server to be scraped") == 1
    assert _eventually(prom, 'up{job="gateway"}', lambda v: v == 1, "the gateway to be scraped") == 1
    ok = _eventually(prom, f'sum(medpipe_gateway_requests_total{{model="{MODEL}",outcome="OK"}})', lambda v: v == 5,
                     "the gateway's request counter")
    assert ok == 5
    _eventually(prom, f'sum(medpipe_predictions_total{{model="{MODEL}"}})', lambda v: v == 40, "40 predictions")
    requests = _eventually(prom, f'sum(:tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}})',
                           lambda v: v == 5, "TF Serving's request counter")
    assert requests == 5  # 40 images in 5 REST requests of 8
    assert _eventually(prom, f'sum(:tensorflow:serving:request_latency_count{{model_name="{MODEL}"}})',
                       lambda v: v == 5, "TF Serving's latency histogram") == 5
    p99 = _value(prom, f'histogram_quantile(0.99, sum by (le) (:tensorflow:serving:request_latency_bucket'
                       f'{{model_name="{MODEL}"}}))')
    assert p99 is not None and 0 < p99 <= 5_000_000  # microseconds, TF Serving's unit
    assert _value(prom, f'sum(medpipe_loaded_versions{{model="{MODEL}"}})') == 1
    assert _value(prom, f'medpipe_prediction_confidence_count{{model="{MODEL}"}}') == 40
    psi = _eventually(prom, f'medpipe_drift_psi{{model="{MODEL}"}}', lambda v: True, "the drift gauge")
    assert psi < 0.25, f"in-distribution traffic raised PSI to {psi}"
    assert _value(prom, f'medpipe_drift_class_shift{{model="{MODEL}"}}') is not None
    assert _value(prom, f'medpipe_low_confidence_rate{{model="{MODEL}"}}') is not None
    assert _query(prom, 'ALERTS{alertname="InputDrift"}') == []


@pytest.fixture(scope="module")
def drifted(stack, brain_traffic, tmp_path_factory) -> dict:
    """The day's in-distribution log kept aside, then chest X-rays routed to the brain MRI model (twice over, and a
    late batch: the gauges are refreshed at scrape time, so they cover every request): the drifted day."""
    day = _today()
    quiet = tmp_path_factory.mktemp("quiet_requests")
    shutil.copy(stack["requests"] / f"requests-{day}.jsonl", quiet / f"requests-{day}.jsonl")
    chest = sorted(path for path in (SAMPLE / "chest_xray").rglob("*") if path.suffix.lower() in (".jpeg", ".jpg", ".png"))
    assert len(_predict(stack["rest"], chest + chest, "chest")) == 2 * len(chest)
    assert len(_predict(stack["rest"], chest[:8], "chest-late")) == 8
    return {"day": day, "quiet": quiet, "sent": 2 * len(chest) + 8}


def test_chest_xrays_raise_drift_and_fail_the_monitoring_run(stack, drifted, tmp_path):
    prom, day, sent = stack["prometheus"], drifted["day"], drifted["sent"]
    # 1. the in-distribution part of the day: no alert
    quiet = _monitor(stack, drifted["quiet"], tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    quiet_report = json.loads((tmp_path / "quiet" / "drift_report.json").read_text())
    assert quiet_report["status"] == "ok" and quiet_report["n"] == 40 and quiet_report["psi"] < 0.1

    # 2. with the chest X-rays the day's monitoring run fails with an alert naming the metric and the threshold ...
    loud = _monitor(stack, stack["requests"], tmp_path / "loud")
    assert loud.returncode == 1, loud.stdout + loud.stderr
    assert f"ALERT {MODEL} {day}: medpipe_drift_psi=" in loud.stderr and "above the threshold 0.25" in loud.stderr
    report = json.loads((tmp_path / "loud" / "drift_report.json").read_text())
    assert report["n"] == 40 + sent and report["psi"] > 0.25

    # ... the server's live gauge, scraped by Prometheus, shows the same PSI (its window holds exactly the day's
    # requests), the InputDrift rule goes pending, and the pushed daily alert gauge is scraped too
    _eventually(prom, f'medpipe_drift_psi{{job="gateway",model="{MODEL}"}}',
                lambda v: v == pytest.approx(report["psi"], rel=1e-6),
                f"the live PSI gauge to reach the report's {report['psi']:.4f}")
    _eventually(prom, 'count(ALERTS{alertname="InputDrift",alertstate="pending"})', lambda v: v == 1,
                "the InputDrift rule to go pending")
    _eventually(prom, f'medpipe_monitoring_alert{{job="medpipe_monitoring",model="{MODEL}"}}', lambda v: v == 1,
                "the pushed daily alert gauge")


@pytest.mark.slow
def test_monitoring_dag_run_fails_with_an_alert(stack, drifted, tmp_path):
    """`airflow dags test medpipe_monitoring` over the drifted day: the task fails, the failure callback runs."""
    home = tmp_path / "airflow_home"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MEDPIPE_HOME": str(ROOT),
           "MEDPIPE_DATA_ROOT": str(tmp_path / "data"), "MEDPIPE_PUSHGATEWAY": stack["pushgateway"]}
    airflow = str(Path(sys.executable).parent / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, env=env, timeout=180)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    conf = {"date": drifted["day"], "request_log_uri": str(stack["requests"]), "baseline_uri": str(stack["baseline"]),
            "class_shift_threshold": 1, "low_confidence_rate_threshold": 1}
    run = subprocess.run([airflow, "dags", "test", "medpipe_monitoring", "--conf", json.dumps(conf)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-5000:]  # the DAG run failed
    assert "drift alert for brain_mri on" in output and "medpipe_drift_psi=" in output, output[-5000:]
    assert "medpipe alert MedpipeTaskFailed:" in output  # notify_failure, the on_failure_callback
    report = json.loads((tmp_path / "data" / "monitoring" / "brain_mri" / drifted["day"] / "drift_report.json").read_text())
    assert report["status"] == "alert"


# --------------------------------------------------------------------------------------------------------------
# Grafana provisioning (docker-compose mounts config/grafana/provisioning and config/grafana/dashboards)
# --------------------------------------------------------------------------------------------------------------

GRAFANA = ROOT / "config" / "grafana"


def _dashboard_targets() -> list[dict]:
    dashboard = json.loads((GRAFANA / "dashboards" / "medpipe_overview.json").read_text())
    return [target for panel in dashboard["panels"] for target in panel["targets"]]


def test_grafana_provisioning_is_consistent():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "medpipe.yml").read_text())["providers"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "medpipe_overview.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("requests", "latency", "error", "class mix", "drift", "throughput"):
        assert topic in titles, f"the dashboard has no {topic} panel"
    assert {target["datasource"]["uid"] for target in _dashboard_targets()} == {datasource["uid"]}


def test_grafana_dashboard_queries_run_in_prometheus(stack, brain_traffic):
    """Every panel query parses and evaluates in the real Prometheus; the serving panels return data."""
    with_data = []
    for target in _dashboard_targets():
        result = _query(stack["prometheus"], target["expr"].replace("$model", ".*"))  # asserts status success
        if result:
            with_data.append(target["expr"])
    assert any("request_count" in expr for expr in with_data), with_data
    assert any("medpipe_predictions_total" in expr for expr in with_data), with_data
    assert any("medpipe_drift_psi" in expr for expr in with_data), with_data
