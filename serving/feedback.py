"""`medpipe feedback`: radiologists' confirmed labels for served studies -> a labelled partition + live accuracy.

    medpipe feedback --labels confirmed.csv --requests LOG_DIR --output PARTITION_DIR [--config brain_mri]
                     [--pushgateway URL]

`confirmed.csv` has a header `request_id,label[,image_path]` (image_path relative to the CSV's folder). Each row is
joined by request id with the gateway's request log (LOG_DIR/requests-*.jsonl, `medpipe gateway --request-log`):

- the rows with an image become PARTITION_DIR/<label>/<request_id><ext> plus PARTITION_DIR/manifest.csv
  (`path,label`, paths relative to the manifest): `medpipe ingest --input PARTITION_DIR/manifest.csv` reads them
  like any other labelled manifest (the `medpipe_ingest` DAG's `source_uri`), so the next training run learns from
  them. Pass the manifest rather than the folder: in folder mode ingest would count manifest.csv and
  feedback_summary.json as unlabelled inputs;
- every joined row counts towards the live accuracy (confirmed label == served class), written with the per-class
  figures to PARTITION_DIR/feedback_summary.json and pushed as the gauge `medpipe_live_accuracy{model}`.

Rows that cannot be used are listed in feedback_summary.json with a reason (unknown request id, unknown label,
conflicting labels, missing image...), never dropped silently. Re-running on the same CSV rewrites the same files.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

from medpipe.errors import DataError
from medpipe.files import write_atomic, write_json_atomic
from medpipe.metrics_push import push_gauges

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SUMMARY = "feedback_summary.json"
UNUSABLE = "unusable"  # the viewer's "mark image unusable" answer: recorded, never trained on
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # used as a file name: no path separators

# Reasons a feedback row is not used (stable keys: they appear in feedback_summary.json).
REASONS = {
    "missing_request_id": "the row has no request_id",
    "unsafe_request_id": "the request id is not a plain token (letters, digits, _ . -)",
    "unknown_request_id": "no request with this id in the request logs",
    "missing_label": "the row has no label",
    "unknown_label": "the label is not one of the model's labels",
    "label_conflict": "the same request id was given two different labels",
    "marked_unusable": "the reader marked the image unusable (kept out of training and of live accuracy)",
    "image_missing": "image_path does not exist",
}


def read_request_logs(requests_dir: str | Path) -> dict[str, dict]:
    """request_id -> its log record, over every requests-*.jsonl in the folder (malformed lines are skipped)."""
    folder = Path(requests_dir)
    if not folder.is_dir():
        raise DataError(f"--requests {folder} is not a directory: pass the gateway's --request-log folder")
    records: dict[str, dict] = {}
    for path in sorted(folder.glob("requests-*.jsonl")):
        with path.open() as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("request_id"):
                    records[str(record["request_id"])] = record
    return records


def read_labels_csv(path: str | Path) -> list[dict]:
    """Rows as {"row", "request_id", "label", "image_path"}; the header must name request_id and label."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--labels {path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip() for name in reader.fieldnames or []]
        if "request_id" not in fields or "label" not in fields:
            raise DataError(f"{path}: the header must be request_id,label[,image_path]; found {fields}")
        rows = []
        for number, raw in enumerate(reader, start=2):
            row = {key.strip(): (value or "").strip() for key, value in raw.items() if key}
            image = row.get("image_path", "")
            rows.append({"row": number, "request_id": row.get("request_id", ""), "label": row.get("label", ""),
                         "image_path": str((path.parent / image).resolve()) if image else ""})
    return rows


def validate(rows: Iterable[dict], requests: dict[str, dict], labels: Sequence[str] | None) -> tuple[list, list]:
    """(accepted, rejected): one accepted row per request id; rejected rows carry a `reason` key of REASONS."""
    rows = list(rows)
    given: dict[str, set] = collections.defaultdict(set)
    for row in rows:
        if row["request_id"] and row["label"]:
            given[row["request_id"]].add(row["label"])
    accepted, rejected, seen = [], [], set()
    for row in rows:
        rid, label = row["request_id"], row["label"]
        reason = None
        if not rid:
            reason = "missing_request_id"
        elif not SAFE_NAME.match(rid):
            reason = "unsafe_request_id"
        elif not label:
            reason = "missing_label"
        elif label == UNUSABLE:
            reason = "marked_unusable"
        elif labels is not None and label not in labels:
            reason = "unknown_label"
        elif labels is None and not SAFE_NAME.match(label):
            reason = "unknown_label"  # without a config the label still becomes a folder name
        elif len(given[rid]) > 1:
            reason = "label_conflict"
        elif rid not in requests:
            reason = "unknown_request_id"
        elif row["image_path"] and not Path(row["image_path"]).is_file():
            reason = "image_missing"
        if reason:
            rejected.append({**row, "reason": reason, "detail": REASONS[reason]})
        elif rid not in seen:  # an exact duplicate (same id, same label) counts once
            seen.add(rid)
            accepted.append(row)
    return accepted, rejected


def live_accuracy(accepted: Sequence[dict], requests: dict[str, dict]) -> dict:
    """Confirmed label vs served class, overall, per model and per confirmed class."""
    per_model: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    per_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for row in accepted:
        record = requests[row["request_id"]]
        correct = int(str(record.get("class")) == row["label"])
        for bucket in (per_model[str(record.get("model"))], per_class[row["label"]]):
            bucket[0] += correct
            bucket[1] += 1
    total = sum(n for _, n in per_model.values())
    correct = sum(c for c, _ in per_model.values())
    return {
        "live_accuracy": correct / total if total else None,
        "n": total,
        "per_model": {m: {"accuracy": c / n, "n": n} for m, (c, n) in sorted(per_model.items())},
        "per_class": {k: {"recall": c / n, "n": n} for k, (c, n) in sorted(per_class.items())},
    }


def write_partition(accepted: Sequence[dict], output: Path) -> list[dict]:
    """Copy each row's image to output/<label>/<request_id><ext> and write manifest.csv; returns manifest rows."""
    output.mkdir(parents=True, exist_ok=True)
    manifest = []
    for row in accepted:
        if not row["image_path"]:
            continue
        source = Path(row["image_path"])
        target = output / row["label"] / f"{row['request_id']}{source.suffix.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, source.read_bytes())
        manifest.append({"path": target.relative_to(output).as_posix(), "label": row["label"]})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["path", "label"])
    writer.writeheader()
    writer.writerows(manifest)
    write_atomic(output / MANIFEST, table.getvalue())
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe feedback",
        description="Confirmed labels for served requests -> a labelled partition for ingest, plus live accuracy.",
    )
    parser.add_argument("--labels", required=True, help="CSV with header request_id,label[,image_path]")
    parser.add_argument("--requests", required=True, help="the gateway's --request-log directory")
    parser.add_argument("--output", required=True, help="partition directory to write (class folders + manifest.csv)")
    parser.add_argument("--config", help="task config (name or path): labels are checked against its label list")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set labels=[a,b] (repeatable)")
    parser.add_argument("--pushgateway", help="Pushgateway URL for medpipe_live_accuracy (default env MEDPIPE_PUSHGATEWAY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = None
    if args.config:
        from medpipe.config import load_config

        labels = list(load_config(args.config, args.overrides).labels)
    requests = read_request_logs(args.requests)
    rows = read_labels_csv(args.labels)
    accepted, rejected = validate(rows, requests, labels)
    output = Path(args.output)
    manifest = write_partition(accepted, output)
    accuracy = live_accuracy(accepted, requests)
    summary = {
        **accuracy,
        "rows": len(rows),
        "accepted": len(accepted),
        "images_written": len(manifest),
        "without_image": [row["request_id"] for row in accepted if not row["image_path"]],
        "rejected": [{k: row[k] for k in ("row", "request_id", "label", "reason", "detail")} for row in rejected],
        "rejected_by_reason": dict(collections.Counter(row["reason"] for row in rejected)),
        "labels_checked_against": labels,
        "manifest": str(output / MANIFEST),
    }
    write_json_atomic(output / SUMMARY, summary, sort_keys=True)
    for row in rejected:
        log.warning("feedback row %d (request %s) not used: %s", row["row"], row["request_id"] or "-", row["detail"])
    for model, figures in accuracy["per_model"].items():
        push_gauges("medpipe_feedback", {
            "medpipe_live_accuracy": (figures["accuracy"], "accuracy of served predictions against confirmed labels"),
            "medpipe_feedback_labels": (figures["n"], "confirmed labels joined with served requests"),
        }, labels={"model": model}, url=args.pushgateway)
    print(json.dumps({"live_accuracy": accuracy["live_accuracy"], "accepted": len(accepted),
                      "rejected": len(rejected), "images_written": len(manifest), "output": str(output),
                      "ingest_input": str(output / MANIFEST)}))
    if not accepted:
        raise DataError(f"none of the {len(rows)} rows of {args.labels} could be used "
                        f"({summary['rejected_by_reason']}); see {output / SUMMARY}")
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
