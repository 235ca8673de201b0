"""scripts/make_manifest.py: patient IDs from chest X-ray file names, so ingest splits by patient, not by image."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import ROOT, SAMPLE

PATTERN = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"


def test_manifest_carries_the_patient_of_every_file(tmp_path):
    manifest = tmp_path / "manifest.csv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_manifest.py"), str(SAMPLE / "chest_xray"),
                    str(manifest), "--patient-regex", PATTERN], check=True, cwd=ROOT)
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == 24 and all(row["patient_id"] for row in rows)
    for row in rows:  # the ID is the file name's patient part, e.g. person1000 / IM-0115
        name = row["path"].rsplit("/", 1)[1]
        assert name.startswith(row["patient_id"]) and name[len(row["patient_id"])] in "_-"
