"""`medpipe demo` end to end: the README's first command, on the sample shipped in the repo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_predicts_over_grpc_from_a_published_version(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "medpipe"), "demo", "--output", str(out), "--epochs", "4"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    stdout = result.stdout
    # Every stage ran, in order, as a real command.
    for module in ("beam_pipelines.ingest", "models.train", "models.evaluate", "serving.publish", "serving.server",
                   "serving.gateway", "serving.client"):
        assert f"python -m {module}" in stdout
    assert "server stopped" in stdout and "gateway stopped" in stdout
    # the prediction went through the gateway, which audited it
    lines = stdout.splitlines()
    audit = json.loads(lines[lines.index(next(line for line in lines if line.startswith("Audit line"))) + 1])
    assert audit["event"] == "predict" and audit["identity"] == "anonymous" and audit["outcome"] == "OK"
    assert audit["request_id"] == "demo-prediction" and audit["model"] == "brain_mri"

    versions = [p for p in (out / "models" / "brain_mri").iterdir() if p.name.isdigit()]
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").is_file()
    version = versions[0].name
    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    prediction_line = next(line for line in stdout.splitlines() if line.strip().startswith("class:"))
    predicted = prediction_line.split()[1]
    assert predicted in labels
    assert f"model version: {version}" in prediction_line
    assert audit["version"] == int(version) and audit["classes"] == [predicted]
    stats = json.loads((out / "data" / "brain_mri" / "stats.json").read_text())
    assert stats["input_files"] == 100
    assert (out / "runs" / "brain_mri" / "evaluation" / "report.html").is_file()
    assert "brain_mri" in (out / "models" / "models.config").read_text()
    viewer = next(line for line in lines if line.startswith("Web viewer"))
    assert viewer.split()[-1].startswith("http://127.0.0.1:") and viewer.endswith("/viewer/")
    from serving.demo import SHIPPED_NAME, shipped_version

    shipped = shipped_version()
    if shipped is not None:  # the validated model of models/shipped/, served beside the demo's own
        index = lines.index(next(line for line in lines if line.startswith(f"The shipped model {SHIPPED_NAME}")))
        finding = lines[index + 1].split()[1]
        assert finding in labels + ["outside"] and f"model version: {shipped.name}" in lines[index + 1]
        assert (out / "models" / SHIPPED_NAME / shipped.name / "saved_model.pb").is_file()
        assert "python -m serving.client --server" in stdout and "--model brain_mri_validated" in stdout


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("not the demo's")
    result = subprocess.run([str(Path(sys.executable).parent / "medpipe"), "demo", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0 and "not an earlier demo output" in result.stderr + result.stdout
    assert precious.read_text() == "not the demo's"
