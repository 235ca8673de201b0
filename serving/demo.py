"""`medpipe demo`: the whole chain, for real, on the sample shipped in sample_data/.

ingest (Beam) -> train (Keras, MirroredStrategy) -> evaluate (report + gate) -> publish (versioned SavedModel)
-> serve (TF Serving-compatible server on 127.0.0.1) -> the clinical gateway in front of it (anonymous, loopback
only) -> predict one image over gRPC through the gateway -> print the prediction's audit line. The same server also
serves the validated model shipped in models/shipped/ (trained by the full recipe on the whole training set) as
`brain_mri_validated`; the demo predicts the sample glioma with it and prints the web viewer's URL, which opens on
that model. `--keep-server` (as `make demo` runs it) leaves both processes up for the viewer.

Each stage runs as the same command a user or an Airflow task would run (`python -m <stage> ...`), printed before
it runs, so the demo doubles as a walkthrough. Nothing here is simulated: a stage that fails stops the demo with
its exit status and output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from medpipe.cli import module_main
from medpipe.config import set_flags

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "brain_mri.yaml"
DEFAULT_SAMPLE = ROOT / "sample_data" / "brain_mri"

# What makes the demo a few-minute run instead of a clinical recipe. Printed when the demo starts.
DEMO_OVERRIDES = (
    "training.epochs=12",
    "training.early_stopping_patience=12",
    "image.size=96",
    "ingest.shards={train: 2, val: 1, test: 1}",
)
# 100 images cannot train a clinical model: the demo's gate asks only for better than chance (4 classes).
DEMO_GATE = ("evaluation.thresholds={accuracy: 0.25, macro_f1: 0.0, macro_auc: 0.5}",)
DEMO_DEID_KEY = "medpipe-demo-key-do-not-use-in-production"
SHIPPED = ROOT / "models" / "shipped"
SHIPPED_NAME = "brain_mri_validated"  # served beside the demo's own brain_mri
MARKER = ".medpipe-demo"  # the demo only ever replaces an output folder that holds this file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe demo",
        description="Run ingest -> train -> evaluate -> publish -> serve -> predict on the repository's sample, "
        "end to end, in a few minutes on a 2-core machine.",
    )
    parser.add_argument("--output", default="demo_output",
                        help="folder for every artefact: new, empty, or an earlier demo's (replaced on each run)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="task config (default: config/brain_mri.yaml)")
    parser.add_argument("--input", default=str(DEFAULT_SAMPLE), help="folder of class folders (default: the sample)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 12)")
    parser.add_argument("--cpu-replicas", type=int, default=2, help="logical CPU devices for MirroredStrategy")
    parser.add_argument("--keep-server", action="store_true", help="leave the server running after the prediction")
    return parser


def prepare_output(out: Path) -> Path:
    """A new or empty folder, or an earlier demo's output (recognised by MARKER): never another folder's files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise SystemExit(f"demo: --output {out} exists and is not an earlier demo output; choose a new or empty "
                         "folder (the demo replaces only its own output)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by medpipe demo; the next demo run replaces this folder\n")
    return out


def shipped_version(shipped: Path = SHIPPED, name: str = "brain_mri") -> Path | None:
    """The newest version folder of the shipped model, or None in a checkout without it."""
    folder = shipped / name
    versions = sorted((p for p in folder.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
                      key=lambda p: int(p.name)) if folder.is_dir() else []
    return versions[-1] if versions else None


def add_shipped_model(repo: Path, source: Path) -> int:
    """Copy the shipped version into the demo's repository as SHIPPED_NAME and add it to models.config."""
    from serving import repository as repo_lib

    target = repo / SHIPPED_NAME / source.name
    shutil.copytree(source, target)
    config_path = repo / repo_lib.CONFIG_FILE
    config = repo_lib.read_config(config_path)
    repo_lib.upsert_model(config, SHIPPED_NAME, str(repo / SHIPPED_NAME))
    repo_lib.write_config(config_path, config)
    return int(source.name)


class Step:
    """Prints a stage header and the command, runs it, and stops the demo with the stage's output on failure."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.number = 0
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, module: str, args: Sequence[str], capture: bool = False,
            ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        self.number += 1
        command = [sys.executable, "-m", module, *args]
        print(f"\n[{self.number}] {title}\n    $ {_shown(command)}", flush=True)
        start = time.monotonic()
        # stderr: the terminal (the quiet console's sys.stderr), so each stage shows its own progress lines
        result = subprocess.run(command, env=self.env, cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.PIPE if capture else sys.stderr)
        self.timings.append((title, time.monotonic() - start))
        if result.returncode not in ok:
            if capture:
                print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"demo: step {self.number} ({title}) failed with exit status {result.returncode}")
        print(f"    done in {self.timings[-1][1]:.1f} s", flush=True)
        return result


def _shown(command: Sequence[str]) -> str:
    shown = ["medpipe" if part == sys.executable else part for part in command]
    return shlex.join(shown).replace("medpipe -m ", "python -m ")


def wait_for_model(rest: str, model_name: str, process: subprocess.Popen, timeout: float = 120.0) -> dict:
    """Poll TF Serving's REST status route until a version is AVAILABLE (or the server died)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    url = f"{rest}/v1/models/{model_name}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the server exited with status {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                status = json.load(response)
            if any(v.get("state") == "AVAILABLE" for v in status.get("model_version_status", [])):
                return status
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: model {model_name} was not AVAILABLE at {url} within {timeout:.0f} s")


def listening(log: Path, process: subprocess.Popen) -> tuple[str, str]:
    """-> (gRPC HOST:PORT, REST base URL) the server or gateway announced."""
    from serving.listen import wait_listening

    try:
        match = wait_listening(log, process)
        return match["grpc"], match["rest"]
    except RuntimeError as exc:
        raise SystemExit(f"demo: {exc}") from None


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medpipe.config import load_config

    overrides = list(DEMO_OVERRIDES) + ([f"training.epochs={args.epochs}"] if args.epochs else [])
    config = load_config(args.config, overrides)  # fail here, before any work, on a bad config
    model_name = config.serving.model_name
    out = prepare_output(Path(args.output).resolve())
    data_dir, run_dir, repo = out / "data" / config.name, out / "runs" / config.name, out / "models"
    eval_dir = run_dir / "evaluation"

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if not env.get("MEDPIPE_DEID_KEY"):
        env["MEDPIPE_DEID_KEY"] = DEMO_DEID_KEY
        print("demo: MEDPIPE_DEID_KEY is not set; using a fixed demo key (set your own secret for real data)")
    print(f"demo: config {args.config} with demo overrides: {', '.join(overrides)}")
    print(f"demo: gate thresholds lowered to chance level for 100 images: {DEMO_GATE[0]}")
    started = time.monotonic()
    step = Step(env)
    config_flags = ["--config", str(args.config), *set_flags(overrides)]

    step.run("Ingest the sample with Apache Beam", "beam_pipelines.ingest",
             [*config_flags, "--input", str(args.input), "--output", str(data_dir)])
    step.run("Train with MirroredStrategy", "models.train",
             [*config_flags, "--data", str(data_dir), "--output", str(run_dir),
              "--cpu-replicas", str(args.cpu_replicas)])
    step.run("Evaluate on the test split and gate", "models.evaluate",
             ["--model", str(run_dir), "--data", str(data_dir), "--split", "test", "--output", str(eval_dir),
              "--repository", str(repo), "--model-name", model_name, *set_flags(DEMO_GATE)],
             ok=(0, 3))  # 3 = not blessed: said below
    blessing = json.loads((eval_dir / "blessing.json").read_text())
    publish_args = ["--run", str(run_dir), "--repository", str(repo), "--model-name", model_name, "--label", "stable"]
    if not blessing.get("blessed"):
        print(f"demo: the gate did not bless this model: {'; '.join(blessing.get('reasons', []))}")
        print("demo: publishing anyway with --force so the demo can show serving; never do this with a real model")
        publish_args.append("--force")
    step.run("Publish a versioned SavedModel", "serving.publish", publish_args)
    version = max(int(p.name) for p in (repo / model_name).iterdir() if p.name.isdigit())
    shipped = shipped_version()
    shipped_number = add_shipped_model(repo, shipped) if shipped else None
    if shipped is None:
        print(f"demo: no shipped model in {SHIPPED} (see models/shipped/README.md); the viewer shows the demo model")

    serve_command = [sys.executable, "-m", "serving.server", "--repository", str(repo), "--host", "127.0.0.1",
                     "--grpc-port", "0", "--rest-port", "auto"]
    step.number += 1
    print(f"\n[{step.number}] Serve with the TF Serving-compatible server\n    $ {_shown(serve_command)}", flush=True)
    server_log = open(out / "server.log", "w")
    server = subprocess.Popen(serve_command, env=env, cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    gateway = None
    audit_log = out / "gateway" / "audit.jsonl"
    gateway_log = open(out / "gateway.log", "w")
    try:
        upstream, rest = listening(out / "server.log", server)
        wait_for_model(rest, model_name, server)
        print(f"    serving {model_name} version {version}: gRPC {upstream}, REST {rest}")
        gateway_command = [sys.executable, "-m", "serving.gateway", "--upstream", upstream,
                           "--host", "127.0.0.1", "--grpc-port", "0", "--rest-port", "0", "--allow-anonymous",
                           "--audit-log", str(audit_log), "--request-log", str(out / "gateway" / "requests"),
                           "--model-repository", str(repo), "--feedback-dir", str(out / "gateway" / "feedback"),
                           *(["--viewer-model", SHIPPED_NAME] if shipped else []), "--viewer-model", model_name]
        step.number += 1
        print(f"\n[{step.number}] The clinical gateway in front of it (anonymous: loopback demo only)\n"
              f"    $ {_shown(gateway_command)}", flush=True)
        gateway = subprocess.Popen(gateway_command, env=env, cwd=ROOT, stdout=gateway_log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        gateway_address, viewer_url = listening(out / "gateway.log", gateway)
        viewer_url += "/viewer/"
        print(f"    gateway: gRPC {gateway_address} -> upstream {upstream}")
        image = sorted((Path(args.input) / config.labels[0]).iterdir())[0]
        result = step.run("Predict one image over gRPC through the gateway (tensorflow_serving.apis stubs)",
                          "serving.client",
                          ["--server", gateway_address, "--model", model_name, "--label", "stable",
                           "--config", str(run_dir / "config.yaml"), "--request-id", "demo-prediction", str(image)],
                          capture=True)
        prediction = json.loads(result.stdout.strip().splitlines()[-1])
        audit_line = next(line for line in audit_log.read_text().splitlines()
                          if json.loads(line).get("request_id") == "demo-prediction")
        validated = None
        if shipped is not None:
            wait_for_model(rest, SHIPPED_NAME, server)
            result = step.run(f"Predict the sample glioma with the shipped, validated model ({SHIPPED_NAME})",
                              "serving.client",
                              ["--server", gateway_address, "--model", SHIPPED_NAME, "--request-id",
                               "demo-validated", str(image)], capture=True)
            validated = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if args.keep_server:
            print(f"demo: server and gateway left running (pids {server.pid}"
                  f"{f', {gateway.pid}' if gateway else ''}); stop them with kill -TERM")
        else:
            if gateway is not None:
                stop(gateway)
                print("demo: gateway stopped")
            stop(server)
            print("demo: server stopped")
        server_log.close()
        gateway_log.close()

    metrics_file = eval_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    print("\n" + "=" * 78)
    print(f"Prediction for {image.relative_to(ROOT) if image.is_relative_to(ROOT) else image} "
          f"(true class: {config.labels[0]})")
    confidence = prediction.get("confidence")
    print(f"  class: {prediction.get('finding')}   confidence: "
          f"{'n/a' if confidence is None else format(confidence, '.3f')}   "
          f"in distribution: {prediction.get('in_distribution')}   model version: {prediction.get('model_version')}")
    print(f"  probabilities: {json.dumps(prediction.get('probabilities'))}")
    print(f"Audit line of this prediction ({audit_log}; check the chain: medpipe audit verify {audit_log}):")
    print(f"  {audit_line}")
    if validated is not None:
        confidence = validated.get("confidence")
        print(f"The shipped model {SHIPPED_NAME} (version {shipped_number}, trained on the full training set; "
              f"models/shipped/README.md) on the same image:")
        print(f"  class: {validated.get('finding')}   confidence: "
              f"{'n/a' if confidence is None else format(confidence, '.3f')}   "
              f"in distribution: {validated.get('in_distribution')}   model version: {validated.get('model_version')}")
    state = "open it now" if args.keep_server else "live only while the demo runs: use --keep-server (make demo does)"
    print(f"Web viewer (anonymous on loopback; {state}): {viewer_url}")
    if metrics:
        print(f"Test-split accuracy of this demo model: {metrics.get('accuracy', float('nan')):.3f} "
              f"(macro-F1 {metrics.get('macro_f1', float('nan')):.3f}); gate: "
              f"{'blessed' if blessing.get('blessed') else 'not blessed'}")
    print("Artefacts:")
    for label, path in [
        ("TFRecords, schema.json, stats.json, rejected.jsonl", data_dir),
        ("training run (model.keras, history.csv, TensorBoard)", run_dir),
        ("evaluation report", eval_dir / "report.html"),
        ("gate verdict", eval_dir / "blessing.json"),
        ("published SavedModel", repo / model_name / str(version)),
        ("TF Serving model config", repo / "models.config"),
        ("server log", out / "server.log"),
        ("gateway audit log (hash-chained)", audit_log),
        ("gateway request summaries (medpipe monitor)", out / "gateway" / "requests"),
    ]:
        print(f"  {label:<52} {path}")
    print("Timings: " + ", ".join(f"{title.split()[0].lower()} {seconds:.0f} s" for title, seconds in step.timings)
          + f"; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    module_main(main)
