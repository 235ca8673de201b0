"""benchmarks/bench_gateway.py runs on a clean checkout (issue 34): its smoke mode, end to end, on tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_gateway_smoke_runs_and_reports_every_figure():
    recorded = ROOT / "benchmarks" / "results" / "gateway.json"
    before = recorded.read_bytes() if recorded.exists() else None
    result = subprocess.run([sys.executable, "benchmarks/bench_gateway.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index('{\n  "figures"'):])
    figures, passed = report["figures"], report["passed"]
    assert set(passed) == {"png_p50_overhead_ms", "gateway_peak_rss_growth_mb", "trial_tree_growth_max_mb",
                           "memory_per_image_max_ratio"}
    trial = figures["trial"]
    assert trial["deflated_bomb_128m"] < 10 and trial["deflated_bomb_128m_tree_growth_mb"] < 1024
    assert all(status in (200, 422, 504) for status in trial["parallel_4x2048_16bit_statuses"])
    assert {"png8_2048", "png16_2048", "dicom16_deflated_2048"} <= set(figures["decode_worker_memory_per_image"])
    assert (recorded.read_bytes() if recorded.exists() else None) == before, "a smoke run must not overwrite results"
