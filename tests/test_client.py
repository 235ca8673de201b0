"""The clinicians' client (library + `medpipe predict`) against medpipe's server, and against a real TF Serving
when MEDPIPE_TF_SERVING_GRPC=host:port points at one (see README: docker compose up tf-serving)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE
from test_serving import MODEL, publish, start_server, stop_server

pytest.importorskip("tensorflow")

JPEGS = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[:3]
DICOM = SAMPLE / "dicom" / "CR-MONO1-10-chest.dcm"


@pytest.fixture(scope="module")
def server(trained_sample_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("client")
    version = publish(trained_sample_run, base / "models", "--label", "stable")
    process, grpc_address, rest = start_server(base / "models", base)
    yield {"grpc": grpc_address, "rest": rest, "version": version, "config": trained_sample_run / "config.yaml"}
    stop_server(process)


def test_cli_one_line_per_file_and_bad_file_continues(server, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # PNG signature, no image
    files = [str(JPEGS[0]), str(bad), str(DICOM)]
    result = subprocess.run(
        [sys.executable, "-m", "serving.client", "--server", server["grpc"], "--model", MODEL, "--label", "stable",
         "--config", str(server["config"]), "--request-id", "cli-test", *files],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == files
    assert {"file", "class", "confidence", "probabilities", "model_version", "request_id"} <= set(lines[0])
    assert lines[0]["model_version"] == server["version"] and lines[0]["request_id"] == "cli-test"
    assert lines[0]["class"] in ("glioma", "meningioma", "notumor", "pituitary")
    assert abs(sum(lines[0]["probabilities"]) - 1) < 1e-5
    assert lines[0]["confidence"] == max(lines[0]["probabilities"])
    assert lines[1]["reason"] in ("corrupt", "truncated") and "error" in lines[1]
    assert "class" in lines[2], "DICOM goes through the ingest grey pipeline and is classified"
    assert "1 of 3" in result.stderr


def test_library_grpc_equals_rest_and_metadata_config(server):
    from medpipe.config import load_config
    from serving.client import config_from_metadata, predict_files

    config = load_config(server["config"])
    paths = [str(p) for p in JPEGS]
    over_grpc = list(predict_files(paths, config, MODEL, server=server["grpc"], label="stable"))
    over_rest = list(predict_files(paths, config, MODEL, rest=server["rest"], label="stable"))
    assert [g["class"] for g in over_grpc] == [r["class"] for r in over_rest]
    for g, r in zip(over_grpc, over_rest):
        assert g["probabilities"] == pytest.approx(r["probabilities"], abs=1e-6)
        assert g["model_version"] == r["model_version"] == server["version"]
    from_metadata = config_from_metadata(server["grpc"], MODEL, None, "stable", 10)
    assert (from_metadata.image.size, from_metadata.image.channels) == (config.image.size, config.image.channels)


def test_rest_without_config_uses_the_model_metadata_and_a_mismatched_config_is_refused(server, tmp_path):
    """The trial: `medpipe predict --rest URL` without --config; then a --config at another image size."""
    from medpipe.config import dump_config, load_config
    from serving.client import config_from_metadata

    def predict(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medpipe.cli", "predict", "--model", MODEL, "--label", "stable",
                               *extra, str(JPEGS[0])], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})

    over_rest = predict("--rest", server["rest"])
    assert over_rest.returncode == 0, over_rest.stderr
    over_grpc = predict("--server", server["grpc"], "--config", str(server["config"]))
    assert over_grpc.returncode == 0, over_grpc.stderr
    rest_line, grpc_line = json.loads(over_rest.stdout), json.loads(over_grpc.stdout)
    assert rest_line["probabilities"] == pytest.approx(grpc_line["probabilities"], abs=1e-6)
    from_rest = config_from_metadata(None, MODEL, None, "stable", 10, rest=server["rest"])
    config = load_config(server["config"])
    assert (from_rest.image.size, from_rest.image.channels) == (config.image.size, config.image.channels)

    wrong = tmp_path / "wrong_size.yaml"
    dump_config(load_config(server["config"], [f"image.size={config.image.size * 2}"]), wrong)
    for door in (["--rest", server["rest"]], ["--server", server["grpc"]]):
        refused = predict(*door, "--config", str(wrong))
        assert refused.returncode == 2 and refused.stdout == ""
        assert f"expects {config.image.size}x{config.image.size}" in refused.stderr, refused.stderr


def test_clear_errors_for_unreachable_server_and_unknown_model(server):
    from serving.client import ServerError, predict_images

    with socket.socket() as sock, pytest.raises(ServerError, match="cannot reach the model server"):
        sock.bind(("127.0.0.1", 0))  # held, never listening: connections are refused and no one else can take it
        predict_images(f"127.0.0.1:{sock.getsockname()[1]}", MODEL, [b"x"], deadline=3)
    with pytest.raises(ServerError, match="does not serve"):
        predict_images(server["grpc"], "no_such_model", [JPEGS[0].read_bytes()], deadline=10)


@pytest.mark.skipif(not os.environ.get("MEDPIPE_TF_SERVING_GRPC"),
                    reason="MEDPIPE_TF_SERVING_GRPC is not set (no real TF Serving to test against)")
def test_against_real_tf_serving(server):
    """The same client call against the real tensorflow/serving binary serving the same kind of repository."""
    from medpipe.config import load_config
    from serving.client import predict_files

    config = load_config(server["config"])
    model = os.environ.get("MEDPIPE_TF_SERVING_MODEL", MODEL)
    lines = list(predict_files([str(p) for p in JPEGS], config, model, server=os.environ["MEDPIPE_TF_SERVING_GRPC"]))
    assert all("class" in line and len(line["probabilities"]) == len(config.labels) for line in lines)
    assert all(isinstance(line["model_version"], int) for line in lines)
