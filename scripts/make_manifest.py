"""Write an ingest manifest (path,label,patient_id) for a folder of class folders whose file names carry the patient.

    .venv/bin/python scripts/make_manifest.py ../shared/data/chest-xray-pneumonia/train chest_manifest.csv \
        --patient-regex '^(person\\d+|NORMAL2-IM-\\d+|IM-\\d+)'

Kaggle's paediatric chest X-ray set names files `person1000_bacteria_2931.jpeg` / `IM-0115-0001.jpeg`: several
images per child. Splitting those by image leaks patients between train and validation and overstates accuracy, so
give ingest the patient through a manifest; ingest then splits by the patient's HMAC pseudonym. Files whose name
does not match get no patient_id (ingest splits them by pixel hash) and are counted on stderr.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path


def patient_of(name: str, pattern: re.Pattern) -> str:
    match = pattern.search(name)
    return match.group(1) if match else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of class folders")
    parser.add_argument("output", type=Path, help="manifest CSV to write")
    parser.add_argument("--patient-regex", required=True,
                        help="regular expression whose first group is the patient ID, searched in the file name")
    args = parser.parse_args(argv)
    pattern = re.compile(args.patient_regex)
    rows, unmatched = [], 0
    for class_dir in sorted(p for p in args.folder.iterdir() if p.is_dir()):
        for path in sorted(p for p in class_dir.iterdir() if p.is_file()):
            patient = patient_of(path.name, pattern)
            unmatched += not patient
            rows.append((str(path.resolve()), class_dir.name, patient))
    with args.output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    patients = len({row[2] for row in rows if row[2]})
    print(f"{len(rows)} files, {patients} patients, {unmatched} without a patient ID -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
