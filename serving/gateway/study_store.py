"""A study's memory after its result: one current result per study.

    SPOOL/studies/<model>/<study key>/<instance key>.dcm (+ .json)   instances already answered (kept copies)
    SPOOL/studies/<model>/<study key>/state.json                    {"reports": [{"job", "sr_uid", "number"}]}

When new instances of a study arrive after its SR, the PACS road scores the kept instances and the new ones
together and issues the next SR of the same series (InstanceNumber + 1, Predecessor Documents Sequence naming the
previous one). A report is looked up by its job key, so a replay after a crash gets the same number and the same
predecessor as the first attempt: exactly-once still holds (spool.py's keys and derived UIDs).
Kept instances are PHI: they stay `study_retention_hours` after the study's last result, then `expire` removes the
study's folder (only folders this store made). File names are digests, never UIDs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from serving.gateway.spool import SpooledInstance, _children, _files, _read_meta, _safe, write_durable

STUDIES = "studies"
STATE_FILE = "state.json"


class StudyStore:
    def __init__(self, spool_root: str | Path):
        self.root = Path(spool_root) / STUDIES
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # kept instances are PHI: only the gateway's user may enter

    def folder(self, model: str, study_key: str) -> Path:
        return self.root / _safe(model) / study_key

    def instances(self, model: str, study_key: str) -> list[SpooledInstance]:
        """The study's answered instances kept so far (sorted by file name)."""
        folder = self.folder(model, study_key)
        return [SpooledInstance(path, model, study_key, _read_meta(path))
                for path in sorted(_files(folder, ".dcm"))]

    def reports(self, model: str, study_key: str) -> list[dict]:
        path = self.folder(model, study_key) / STATE_FILE
        try:
            return list(json.loads(path.read_text()).get("reports", []))
        except FileNotFoundError:
            return []

    def next_report(self, model: str, study_key: str, job_key: str) -> tuple[int, Optional[dict]]:
        """(InstanceNumber, predecessor report or None) of the SR for job_key: the recorded ones on a replay."""
        reports = self.reports(model, study_key)
        for index, report in enumerate(reports):
            if report["job"] == job_key:
                return int(report["number"]), (reports[index - 1] if index else None)
        return (int(reports[-1]["number"]) + 1 if reports else 1), (reports[-1] if reports else None)

    def record(self, model: str, study_key: str, instances: Iterable[SpooledInstance], report: dict) -> None:
        """Keep copies of the answered instances and append the report (once per job); each write durable."""
        folder = self.folder(model, study_key)
        for instance in instances:
            target = folder / instance.path.name
            if not target.exists():
                sidecar = instance.path.with_suffix(".json")
                if sidecar.exists():
                    write_durable(target.with_suffix(".json"), sidecar.read_bytes())
                write_durable(target, instance.path.read_bytes())
        reports = self.reports(model, study_key)
        if all(existing["job"] != report["job"] for existing in reports):
            reports.append(report)
        write_durable(folder / STATE_FILE, json.dumps({"reports": reports}).encode())

    def expire(self, older_than: float) -> int:
        """Remove studies whose last result is older than the UNIX time `older_than`; returns how many."""
        removed = 0
        for model_dir in _children(self.root):
            for study_dir in _children(model_dir):
                try:
                    last = (study_dir / STATE_FILE).stat().st_mtime
                except FileNotFoundError:
                    continue  # being written: its state comes last
                if last < older_than:
                    shutil.rmtree(study_dir, ignore_errors=True)
                    removed += 1
        return removed
