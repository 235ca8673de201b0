"""Run every benchmark (or some) and render BENCHMARKS.md from benchmarks/results/*.json.

    .venv/bin/python benchmarks/run_all.py                  # all of them (the training one takes ~45 min)
    .venv/bin/python benchmarks/run_all.py --only ingest    # one
    .venv/bin/python benchmarks/run_all.py --render-only    # just rewrite BENCHMARKS.md from the last results
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

from common import RESULTS, ROOT

BENCHMARKS = {
    "ingest": "benchmarks/bench_ingest.py",
    "ingest_128": "benchmarks/bench_ingest.py --size 128",
    "input_pipeline": "benchmarks/bench_input_pipeline.py",
    "serving": "benchmarks/bench_serving.py",
    "gateway": "benchmarks/bench_gateway.py",
    "pacs": "benchmarks/bench_pacs.py",
    "pacs_memory": "benchmarks/bench_pacs_memory.py",
    "train_brain_mri": "benchmarks/bench_train_brain_mri.py",
    "train_chest_xray": "benchmarks/bench_train_chest_xray.py",
    "train_chest_xray_adjacent": "benchmarks/bench_train_chest_xray.py --name train_chest_xray_adjacent "
                                 "--set 'ingest.shift_holdout.before=[[person, 435], [NORMAL2-IM, 572], [IM, 277]]'",
    "scaling": "benchmarks/bench_scaling.py",
    "safety": "benchmarks/bench_safety.py",
    "audit": "benchmarks/bench_audit.py",
    "connections": "benchmarks/bench_connections.py",
    "study": "benchmarks/bench_study.py",
    "brain_mri_validation": "benchmarks/bench_brain_validation.py",
    "dicom_parity": "benchmarks/bench_dicom_parity.py",
}


def _flatten(figures: dict, prefix: str = "") -> dict:
    """Nested figures (e.g. one block per model) as `model.figure` rows."""
    flat = {}
    for key, value in figures.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def render() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Speed and memory are measured by scripts in `benchmarks/`, never by timed tests. Each one measures its",
        "baseline in the same run and reports a ratio, because absolute numbers on a shared 2-core machine are noisy.",
        "Run one with `.venv/bin/python benchmarks/run_all.py --only NAME` (or all with `make bench`); this page is",
        "rewritten from `benchmarks/results/*.json` by `benchmarks/run_all.py --render-only`.",
        "",
    ]
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        note = ROOT / "benchmarks" / "notes" / f"{name}.md"  # hand-written context that a re-run must not erase
        if not path.exists():
            lines += [f"## {name}", "", f"Not measured yet: `.venv/bin/python {BENCHMARKS[name]}`.", ""]
            lines += [note.read_text().strip(), ""] if note.exists() else []
            continue
        result = json.loads(path.read_text())
        m = result["machine"]
        lines += [
            f"## {name}",
            "",
            f"- command: `{result['command']}`",
            f"- measured: {result['when']} at revision {result['revision']} on {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gib']} GiB, Python {m['python']}",
            "",
            "| check | target | met |",
            "| --- | --- | --- |",
        ]
        for check, target in result["targets"].items():
            lines.append(f"| {check} | {target} | {'yes' if result['passed'].get(check) else '**no**'} |")
        lines += ["", "| figure | value |", "| --- | --- |"]
        for key, value in _flatten(result["figures"]).items():
            shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (dict, list)) else value
            lines.append(f"| {key} | {shown} |")
        lines.append("")
        if (RESULTS / f"{name}.png").exists():
            lines += [f"![{name}](benchmarks/results/{name}.png)", ""]
        if note.exists():
            lines += [note.read_text().strip(), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this benchmark")
    parser.add_argument("--render-only", action="store_true", help="only rewrite BENCHMARKS.md")
    args = parser.parse_args()
    failed = []
    if not args.render_only:
        for name in args.only or BENCHMARKS:
            print(f"== {name}", flush=True)
            if subprocess.run([sys.executable, *shlex.split(BENCHMARKS[name])], cwd=ROOT).returncode != 0:
                failed.append(name)
    (ROOT / "BENCHMARKS.md").write_text(render())
    print(f"wrote {ROOT / 'BENCHMARKS.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
