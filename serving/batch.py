"""Batch inference over a drop folder: one outcome per file, a partition replaced as a whole.

    python -m serving.batch (--drop DIR | --pacs dicomweb+http://HOST:PORT/ROOT?StudyDate=...) --output DIR
                            --server HOST:8500 --model NAME [--label stable] [--config CONFIG]
                            [--max-rejected-fraction 0.2] [--request-id ID]

Every file under DIR (recursively, hidden files skipped, sorted) gets exactly one line in `predictions.jsonl`:
`{"file", "outcome": "predicted", "finding", "class", "confidence", "probabilities", "ood_score", "in_distribution",
"model_version", "request_id"}` (finding "outside intended use", and no class, when the model's OOD guard flags the
image) or
`{"file", "outcome": "rejected", "reason", "error"}` (not an image, corrupt, unreadable...). `predictions.csv` and
`summary.json` (counts per outcome, reason and class) sit next to it. Paths are relative to DIR.
With --model-repository, `studies.jsonl` answers each DICOM study among the files once, by the model's own study
rule (medpipe/study.py, from the answering version's assets/study_rule.json): `{"StudyInstanceUID", "files",
"finding", "class", "probability", "abnormal", "deciding_file", "excluded_files", "rule", "operating_point",
"model_version"}`; files outside intended use are listed and take no part, a study with none in distribution gets
finding "outside intended use" and no class or probability.

With --pacs instead of --drop, the instances the DICOMweb query matches (QIDO-RS + WADO-RS,
beam_pipelines.dicomweb_source) are fetched into the partition's `instances/` (`NNNNNN.dcm`, and `instances.csv`
naming each file's study/series/instance UIDs) and scored from there: the scored files stay beside their
predictions, whose paths are then relative to `instances/`. Credentials: MEDPIPE_DICOMWEB_* in the environment.

The files are listed here, when scoring starts, so the outputs always describe the folder as it was scored (a
re-run after more files arrived scores them all). The outputs are written to a staging folder and swapped in:
a re-run replaces the partition. Exit status: 0; 3 when more than --max-rejected-fraction of the files were
rejected (the outputs are still written, so the reasons can be read); 2 for a bad argument; 1 when the server
fails (retry).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from medpipe.errors import DataError
from serving.client import add_connection_options

CSV_COLUMNS = ["file", "outcome", "finding", "class", "confidence", "in_distribution", "ood_score", "model_version",
               "request_id", "reason"]
EXIT_TOO_MANY_REJECTED = 3


def list_files(drop: Path) -> list[Path]:
    if not drop.is_dir():
        raise DataError(f"drop folder {drop} does not exist")
    return sorted(path for path in drop.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(drop).parts))


def outcome_rows(lines: Iterable[dict], drop: Path) -> list[dict]:
    """Client lines -> outcome rows with paths relative to the drop folder."""
    rows = []
    for line in lines:
        row = {**line, "file": str(Path(line["file"]).relative_to(drop))}
        if "error" in line:
            row["outcome"] = "rejected"
            row.setdefault("reason", "rejected")
        else:
            row["outcome"] = "predicted"
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict], max_rejected_fraction: float) -> dict:
    rejected = [row for row in rows if row["outcome"] == "rejected"]
    fraction = len(rejected) / len(rows) if rows else 0.0
    return {
        "files": len(rows),
        "predicted": len(rows) - len(rejected),
        "rejected": len(rejected),
        "rejected_fraction": round(fraction, 6),
        "max_rejected_fraction": max_rejected_fraction,
        "rejected_reasons": dict(Counter(row["reason"] for row in rejected)),
        # by finding: "outside intended use" is counted as such, not as a class
        "classes": dict(Counter(str(row.get("finding", row.get("class"))) for row in rows
                                if row["outcome"] == "predicted")),
        "model_versions": sorted({str(row["model_version"]) for row in rows if row["outcome"] == "predicted"}),
        "passed": fraction <= max_rejected_fraction,
    }


def study_uid_of(path: Path) -> str | None:
    """The DICOM file's StudyInstanceUID (header only), or None for anything else."""
    from medpipe.imaging import _pydicom

    try:
        header = _pydicom().dcmread(str(path), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - not DICOM (a JPEG, a PNG) or unreadable: not part of any study
        return None
    uid = header.get("StudyInstanceUID")
    return str(uid) if uid else None


def study_rows(rows: Sequence[dict], drop: Path, rule) -> list[dict]:
    """One answer per DICOM study among the predicted files, by the model's own study rule (serving.client
    study_summary, medpipe.study): {"StudyInstanceUID", "files", "finding", "class", "probability", "abnormal",
    "deciding_file", "excluded_files", "rule", "operating_point", "model_version"}."""
    from serving.client import study_summary

    studies: dict[str, list[dict]] = {}
    for row in rows:
        if row["outcome"] != "predicted":
            continue
        uid = study_uid_of(drop / row["file"])
        if uid is not None:
            studies.setdefault(uid, []).append(row)
    return [{"StudyInstanceUID": uid, **study_summary(members, rule)} for uid, members in sorted(studies.items())]


def staging_folder(output: Path) -> Path:
    """A fresh staging folder next to output (the partition is built there and swapped in whole)."""
    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def fetch_pacs(source: str, folder: Path) -> list[Path]:
    """The DICOMweb query's instances, downloaded into folder (NNNNNN.dcm + instances.csv)."""
    from beam_pipelines.dicomweb_source import fetch

    return sorted(Path(path) for path in fetch(source, str(folder)))


def write_partition(output: Path, rows: Sequence[dict], summary: dict, staging: Path | None = None) -> None:
    """Write the outputs into staging (default: a fresh one), then swap it in for output (readers never see half a
    partition)."""
    staging = staging or staging_folder(output)
    with (staging / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    with (staging / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--drop", help="folder of files to score (recursive)")
    source.add_argument("--pacs", metavar="URL", help="dicomweb+http(s)://HOST:PORT/ROOT?StudyDate=YYYYMMDD&...: "
                        "fetch the matching instances into OUTPUT/instances/ and score them")
    parser.add_argument("--output", required=True, help="output partition folder (replaced)")
    parser.add_argument("--server", required=True, help="gRPC HOST:PORT of TF Serving / the gateway")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--label", default="stable", help="version label (default stable)")
    parser.add_argument("--config", help="task config; default: image size and channels from the served model")
    parser.add_argument("--max-rejected-fraction", type=float, default=0.2,
                        help="fail (exit 3) above this fraction of rejected files (default 0.2)")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--request-id", help="base x-request-id of the run's requests")
    parser.add_argument("--model-repository", metavar="REPO",
                        help="also answer each DICOM study once (studies.jsonl) by the model's own study rule, read "
                        "from REPO/MODEL/<answering version>/assets/study_rule.json")
    add_connection_options(parser)  # the gateway: TLS, a client certificate and/or a bearer token
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from serving.client import config_for_model, connection_from_args, model_shape, predict_files

    args = build_parser().parse_args(argv)
    connection = connection_from_args(args)
    if not 0 <= args.max_rejected_fraction <= 1:
        raise DataError(f"--max-rejected-fraction must be between 0 and 1, got {args.max_rejected_fraction}")
    output = Path(args.output)
    # the model's own image size; a --config that disagrees with it is refused (serving.client)
    config = config_for_model(args.model, model_shape(args.model, None, args.label, args.deadline,
                                                      server=args.server, connection=connection), args.config)
    staging = staging_folder(output)
    try:
        if args.pacs:
            drop = staging / "instances"
            files = fetch_pacs(args.pacs, drop)
        else:
            drop = Path(args.drop)
            files = list_files(drop)
        lines = predict_files([str(path) for path in files], config, args.model, args.server, label=args.label,
                              deadline=args.deadline, request_id=args.request_id, connection=connection)
        rows = outcome_rows(lines, drop)
        summary = summarize(rows, args.max_rejected_fraction)
        if args.model_repository:
            from serving.client import study_rule_for

            versions = sorted({row["model_version"] for row in rows if row["outcome"] == "predicted"})
            studies = (study_rows(rows, drop, study_rule_for(args.model_repository, args.model, versions[-1]))
                       if versions else [])
            if len(versions) > 1:
                raise DataError(f"the files were answered by model versions {versions}: a study must be decided "
                                "by one version's rule; re-run the partition")
            with (staging / "studies.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(study, sort_keys=True) + "\n" for study in studies)
            summary["studies"] = dict(Counter(str(study["finding"]) for study in studies))
        write_partition(output, rows, summary, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours; a retry starts a new one
        raise
    print(json.dumps({"output": str(output), **summary}))
    if not summary["passed"]:
        print(f"{summary['rejected']} of {summary['files']} files were rejected ({summary['rejected_reasons']}), "
              f"more than the allowed fraction {args.max_rejected_fraction:g}; see {output / 'predictions.jsonl'}",
              file=sys.stderr)
        return EXIT_TOO_MANY_REJECTED
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
