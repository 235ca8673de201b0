"""Issue 28: a served answer must not depend on whether an MR DICOM carries a VOI window.

    python benchmarks/bench_dicom_parity.py [--per-class 20]

For PER_CLASS JPEGs of each class of ../shared/data/brain-tumor-mri/Training (sample_data/ when absent), the
shipped brain MRI model answers the JPEG and the same slice as a 12-bit MR DICOM (pixels x16) without and with a
VOI window (medpipe.imaging, settings from the version's own assets/preprocessing.json): how many answers equal the
JPEG's. The same images with the old default, percentiles 0.5/99.5 instead of the image's min..max, are measured
beside it by rewriting only that setting in a copy of the version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import ROOT, write_result  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args(argv)
    from fixtures_adversarial import dicom_parity

    shared = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
    source = shared if shared.is_dir() else ROOT / "sample_data" / "brain_mri"
    (version,) = [p for p in (ROOT / "models" / "shipped" / "brain_mri").iterdir() if p.name.isdigit()]
    labels = json.loads((version / "assets" / "preprocessing.json").read_text())["labels"]
    jpegs = [p for label in labels for p in sorted((source / label).glob("*.jp*g"))[:args.per_class]]
    now = dicom_parity(version, jpegs)
    with tempfile.TemporaryDirectory() as scratch:
        old = Path(scratch) / version.name
        shutil.copytree(version, old)
        params = json.loads((old / "assets" / "preprocessing.json").read_text())
        params["dicom"]["voi_percentiles"] = [0.5, 99.5]
        (old / "assets" / "preprocessing.json").write_text(json.dumps(params))
        before = dicom_parity(old, jpegs)
    figures = {"version": version.name, "source": "shared Training" if source == shared else "sample_data",
               "images": now["images"], "same_class_no_window": now["no_window"],
               "same_class_with_window": now["window"], "percentiles_0.5_99.5_no_window": before["no_window"],
               "percentiles_0.5_99.5_with_window": before["window"]}
    need = now["images"] - now["images"] // 80  # 79 of 80
    targets = {"no_window": f">= {need} of {now['images']} answers equal the JPEG's without a window",
               "with_window": f">= {need} of {now['images']} with the window"}
    passed = {"no_window": now["no_window"] >= need, "with_window": now["window"] >= need}
    write_result("dicom_parity", f"python benchmarks/bench_dicom_parity.py --per-class {args.per_class}", figures,
                 targets, passed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
