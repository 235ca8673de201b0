"""`medpipe monitor` on request logs built from real images of the repo's sample: report files, exit codes, alerts,
and the daily gauges pushed to a real Pushgateway (Debian `prometheus-pushgateway`; skipped when absent)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import monitoring
from medpipe.drift import histogram

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
LABELS = ["glioma", "meningioma", "notumor", "pituitary"]
DAY = "2026-11-27"


def _pixels(path: Path, size: int = 64) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size)))


def _images(folder: Path, limit: int) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """A stats.json in the ingest's format, from the brain MRI sample's pixels (the monitoring input contract)."""
    folder = tmp_path_factory.mktemp("ingest")
    counts = np.zeros(32, dtype=np.int64)
    for path in _images(SAMPLE / "brain_mri", 100):
        counts += np.asarray(histogram(_pixels(path)))
    (folder / "stats.json").write_text(json.dumps({
        "name": "brain_mri", "input_files": 100, "written": 100, "rejected": 0, "duplicates_dropped": 0,
        "rejected_by_reason": {}, "pixel_histogram": counts.tolist(),
        "class_distribution": {label: 0.25 for label in LABELS}}))
    (folder / "schema.json").write_text(json.dumps({"labels": LABELS}))
    return folder


def _write_log(folder: Path, images: list[Path], probabilities, model="brain_mri", day=DAY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"requests-{day}.jsonl").open("w") as handle:
        for index, path in enumerate(images):
            pixels = _pixels(path)
            probs = probabilities(index)
            handle.write(json.dumps({
                "ts": f"{day}T10:00:{index % 60:02d}Z", "request_id": f"req-{index:04d}", "model": model,
                "version": 1764230000, "class": LABELS[int(np.argmax(probs))], "confidence": float(max(probs)),
                "probabilities": probs, "pixel_histogram": histogram(pixels), "pixel_mean": float(pixels.mean()),
            }) + "\n")
    return folder


def _confident_mix(index: int) -> list[float]:
    probs = [0.05] * 4
    probs[index % 4] = 0.85
    return probs


def _monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.monitoring", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_in_distribution_day_passes(tmp_path, baseline_dir):
    logs = _write_log(tmp_path / "logs", _images(SAMPLE / "brain_mri", 40), _confident_mix)
    result = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", DAY,
                      "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "drift_report.json").read_text())
    assert report["status"] == "ok" and report["n"] == 40 and report["alerts"] == []
    assert report["psi"] < 0.1  # same scanner population as the baseline
    assert report["class_shift"] == pytest.approx(0.0, abs=1e-9)  # 10 of each class vs 25% each
    assert report["low_confidence_rate"] == 0.0
    for suffix in ("md", "html", "png"):
        assert (tmp_path / "out" / f"drift_report.{suffix}").stat().st_size > 200
    assert (tmp_path / "out" / "drift_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chest_xrays_to_the_brain_model_alert(tmp_path, baseline_dir):
    # all predicted `notumor`, half of them unsure: the kind of output an MRI model gives on X-rays
    logs = _write_log(tmp_path / "logs", _images(SAMPLE / "chest_xray", 40),
                      lambda i: [0.1, 0.1, 0.75, 0.05] if i % 2 else [0.2, 0.2, 0.45, 0.15])
    result = _monitor("--requests", str(logs), "--baseline", str(baseline_dir / "stats.json"), "--date", DAY,
                      "--output", str(tmp_path / "out"))
    assert result.returncode == monitoring.EXIT_ALERT
    report = json.loads((tmp_path / "out" / "drift_report.json").read_text())
    assert report["status"] == "alert" and report["psi"] > monitoring.PSI_THRESHOLD
    assert report["class_shift"] == pytest.approx(0.75)
    assert report["low_confidence_rate"] == pytest.approx(0.5)
    assert {alert["metric"] for alert in report["alerts"]} == {"medpipe_drift_psi", "medpipe_drift_class_shift"}
    assert "ALERT brain_mri 2026-11-27: medpipe_drift_psi=" in result.stderr
    assert "above the threshold 0.25" in result.stderr and "above the threshold 0.3" in result.stderr
    # raising the thresholds over the measured figures silences the alert: the verdict is the thresholds'
    relaxed = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", DAY, "--output",
                       str(tmp_path / "relaxed"), "--psi-threshold", str(report["psi"] + 1),
                       "--class-shift-threshold", "0.8")
    assert relaxed.returncode == 0, relaxed.stderr


def test_too_few_requests_do_not_alert_but_a_day_without_traffic_does(tmp_path, baseline_dir):
    logs = _write_log(tmp_path / "logs", _images(SAMPLE / "chest_xray", 5), _confident_mix)
    report = monitoring.build_report(monitoring.read_request_log(logs / f"requests-{DAY}.jsonl")[0],
                                     monitoring.load_baseline(baseline_dir), DAY, None, monitoring.Thresholds(),
                                     0.6, min_requests=20)
    assert report["status"] == "insufficient_data" and report["alerts"] == [] and report["psi"] > 0.25
    empty = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", "2026-11-28",
                     "--output", str(tmp_path / "empty"))
    assert empty.returncode == monitoring.EXIT_ALERT, empty.stderr
    report = json.loads((tmp_path / "empty" / "drift_report.json").read_text())
    assert report["n"] == 0 and report["status"] == "no_traffic"
    assert "no request was logged on 2026-11-28" in empty.stderr


def test_bad_lines_are_listed_and_mixed_models_need_a_choice(tmp_path, baseline_dir):
    logs = _write_log(tmp_path / "logs", _images(SAMPLE / "brain_mri", 3), _confident_mix)
    with (logs / f"requests-{DAY}.jsonl").open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"request_id": "x", "model": "other"}) + "\n")
        handle.write(json.dumps({"request_id": "y", "model": "other", "probabilities": [1, 0, 0, 0],
                                 "pixel_histogram": [1] * 32}) + "\n")
    records, skipped = monitoring.read_request_log(logs / f"requests-{DAY}.jsonl")
    assert [s["line"] for s in skipped] == [4, 5] and "missing pixel_histogram" in skipped[1]["reason"]
    mixed = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", DAY,
                     "--output", str(tmp_path / "out"))
    assert mixed.returncode == 2 and "several models (brain_mri, other): pass --model NAME" in mixed.stderr
    chosen = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", DAY,
                      "--output", str(tmp_path / "out"), "--model", "brain_mri", "--min-requests", "1")
    assert chosen.returncode == 0, chosen.stderr
    assert len(json.loads((tmp_path / "out" / "drift_report.json").read_text())["skipped"]) == 2


def _wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.skipif(shutil.which("prometheus-pushgateway") is None,
                    reason="prometheus-pushgateway is not installed: run scripts/install_system_deps.sh (as root)")
def test_daily_gauges_reach_a_real_pushgateway(tmp_path, baseline_dir):
    from conftest import GO_LISTENING
    from serving.listen import wait_listening

    # Debian's build persists to /var/lib/prometheus by default: keep this gateway's state in tmp_path
    gateway = subprocess.Popen(["prometheus-pushgateway", "--web.listen-address=127.0.0.1:0",
                                f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                               stdout=(tmp_path / "pushgateway.log").open("w"), stderr=subprocess.STDOUT)
    try:
        port = wait_listening(tmp_path / "pushgateway.log", gateway, GO_LISTENING, 20)["address"].rsplit(":", 1)[1]
        _wait_http(f"http://127.0.0.1:{port}/-/ready")
        images = _images(SAMPLE / "chest_xray", 30)
        logs = _write_log(tmp_path / "logs", images, _confident_mix)
        result = _monitor("--requests", str(logs), "--baseline", str(baseline_dir), "--date", DAY,
                          "--output", str(tmp_path / "out"), "--pushgateway", f"127.0.0.1:{port}")
        assert result.returncode == monitoring.EXIT_ALERT
        report = json.loads((tmp_path / "out" / "drift_report.json").read_text())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                 if line.startswith("medpipe_") and 'job="medpipe_monitoring"' in line}
        key = '{instance="",job="medpipe_monitoring",model="brain_mri"}'
        assert lines[f"medpipe_drift_psi{key}"] == pytest.approx(report["psi"], rel=1e-6)
        assert lines[f"medpipe_monitoring_alert{key}"] == 1.0
        assert lines[f"medpipe_monitoring_requests{key}"] == len(images) >= monitoring.MIN_REQUESTS

        # the helpers for ingest and training push the names the alert rules and the dashboard use
        from beam_pipelines.ingest_metrics import push_ingest_stats
        from models.train import push_training_metrics

        stats = {"name": "brain_mri", "input_files": 104, "written": 98, "rejected": 4, "duplicates_dropped": 2,
                 "rejected_by_reason": {"corrupt": 1, "not_image": 3}, "class_distribution": {},
                 "pixel_histogram": []}
        assert push_ingest_stats(stats, "brain_mri", url=f"127.0.0.1:{port}")
        assert push_training_metrics({"val_accuracy": 0.9, "loss": 0.25}, "brain_mri", epoch=3,
                                     duration_seconds=40.5, url=f"127.0.0.1:{port}")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'medpipe_ingest_files_rejected{dataset="brain_mri",instance="",job="medpipe_ingest"} 4' in text
        assert 'medpipe_ingest_files_read{dataset="brain_mri",instance="",job="medpipe_ingest"} 104' in text
        assert ('medpipe_ingest_rejected_by_reason{dataset="brain_mri",instance="",job="medpipe_ingest_rejected",'
                'reason="not_image"} 3') in text
        assert 'medpipe_training_val_accuracy{dataset="brain_mri",instance="",job="medpipe_training"} 0.9' in text
        assert 'medpipe_training_epoch{dataset="brain_mri",instance="",job="medpipe_training"} 3' in text

        # and the real ingest pushes its counts at the end of a run
        from conftest import ROOT, run_module

        run_module("beam_pipelines.ingest", "--config", str(ROOT / "config" / "chest_xray.yaml"),
                   "--input", str(SAMPLE / "chest_xray"), "--output", str(tmp_path / "ingest"),
                   "--set", "image.size=32", "--pushgateway", f"127.0.0.1:{port}")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'medpipe_ingest_files_read{dataset="chest_xray",instance="",job="medpipe_ingest"} 24' in text
        # the dashboard's throughput panel: files written / the run's wall time
        duration = [float(line.split(" ")[1]) for line in text.splitlines()
                    if line.startswith('medpipe_ingest_duration_seconds{dataset="chest_xray"')]
        assert len(duration) == 1 and 0.0 < duration[0] < 600
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def test_an_unreachable_pushgateway_is_a_warning_not_a_failure(caplog):
    from medpipe.metrics_push import push_gauges

    with socket.socket() as sock:  # held, never listening: connections are refused and no one else can take it
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
        assert push_gauges("medpipe_test", {"medpipe_test_value": (1.0, "test")}, url=url, timeout=2) is False
    assert "did not accept" in caplog.text
    assert push_gauges("medpipe_test", {"medpipe_test_value": (1.0, "test")}, url="") is False  # not configured


def test_the_alert_rules_use_the_monitoring_thresholds():
    """config/prometheus/alerts.yml cannot import Python: each live drift gauge's rule must alert above the same
    default threshold as the daily report (serving.monitoring)."""
    import re

    import yaml

    groups = yaml.safe_load((ROOT / "config" / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups if group["name"] == "medpipe-drift" for rule in group["rules"]]
    limits = {}
    for rule in rules:
        match = re.fullmatch(r"max by \(model\) \((?P<gauge>\w+)\) > (?P<limit>[\d.]+)", rule["expr"].strip())
        if match and match["gauge"] in monitoring.GAUGES:
            limits[match["gauge"]] = float(match["limit"])
    defaults = monitoring.Thresholds()
    assert limits == {gauge: getattr(defaults, key) for gauge, key in monitoring.GAUGES.items()}
