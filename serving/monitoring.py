"""`medpipe monitor`: the daily drift report of a served model, from the gateway's request log.

    medpipe monitor --requests LOG_DIR --baseline INGEST_DIR_OR_STATS --date 2026-11-27 --output REPORT_DIR
                    [--model NAME] [--psi-threshold 0.25] [--class-shift-threshold 0.3]
                    [--low-confidence-rate-threshold 0.5] [--feedback FEEDBACK_DIR] [--pushgateway URL]

Reads LOG_DIR/requests-<date>.jsonl (one JSON line per served image, written by `medpipe gateway --request-log`),
compares the day's traffic with the training data's statistics (`medpipe.drift`) and writes REPORT_DIR/
drift_report.{json,md,html,png}. Exit status 1 means an alert: a figure is over its threshold, and stderr names the
metric, its value and the threshold (the `medpipe_monitoring` DAG turns this into a failed task and its failure
callback). A day with no request at all is an alert too (status `no_traffic`): drift monitoring that sees nothing
must not pass silently (the gateway down, traffic routed around it, or its request log not configured). Exit status
0: no alert (including days with too few requests to judge, reported as such).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from medpipe.drift import LOW_CONFIDENCE_THRESHOLD, DriftTracker, load_baseline
from medpipe.errors import DataError
from medpipe.files import write_atomic, write_json_atomic
from medpipe.metrics_push import push_gauges

log = logging.getLogger(__name__)

# Default alert thresholds. PSI > 0.25 is the conventional "significant shift"; a total-variation class shift of 0.3
# means at least 30% of predictions would have to move class to match the training mix; half the predictions under
# the confidence cut-off means the model is mostly guessing. Override per deployment with the flags below.
PSI_THRESHOLD = 0.25
CLASS_SHIFT_THRESHOLD = 0.3
LOW_CONFIDENCE_RATE_THRESHOLD = 0.5
MIN_REQUESTS = 20  # fewer requests than this in a day: reported, never alerted on (too noisy to judge)

EXIT_ALERT = 1
REPORT_NAME = "drift_report"


@dataclass(frozen=True)
class Thresholds:
    psi: float = PSI_THRESHOLD
    class_shift: float = CLASS_SHIFT_THRESHOLD
    low_confidence_rate: float = LOW_CONFIDENCE_RATE_THRESHOLD
    min_live_accuracy: float | None = None  # alert when feedback accuracy is below this (off by default)


# Metric name (also the exported gauge name) -> snapshot key. The names equal the server's live gauges.
GAUGES = {
    "medpipe_drift_psi": "psi",
    "medpipe_drift_class_shift": "class_shift",
    "medpipe_low_confidence_rate": "low_confidence_rate",
}


def request_log_path(requests_dir: str | Path, date: str) -> Path:
    return Path(requests_dir) / f"requests-{date}.jsonl"


def read_request_log(path: Path, model: str | None = None) -> tuple[list[dict], list[dict]]:
    """(records, skipped): skipped lines carry their line number and why they were not used."""
    records: list[dict] = []
    skipped: list[dict] = []
    if not path.is_file():
        return records, skipped
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                skipped.append({"line": number, "reason": f"not JSON ({exc.msg})"})
                continue
            missing = [key for key in ("pixel_histogram", "probabilities") if key not in record]
            if missing:
                skipped.append({"line": number, "reason": f"missing {', '.join(missing)}"})
                continue
            if model and record.get("model") != model:
                continue
            records.append(record)
    return records, skipped


def evaluate(snapshot: dict, thresholds: Thresholds, live_accuracy: float | None = None,
             min_requests: int = MIN_REQUESTS) -> list[dict]:
    """The alerts for one snapshot: one dict per figure over its threshold (empty when below min_requests)."""
    if snapshot["n"] < min_requests:
        return []
    limits = {"psi": thresholds.psi, "class_shift": thresholds.class_shift,
              "low_confidence_rate": thresholds.low_confidence_rate}
    alerts = []
    for metric, key in GAUGES.items():
        value, limit = float(snapshot[key]), limits[key]
        if value > limit:
            alerts.append({"metric": metric, "value": round(value, 6), "threshold": limit,
                           "message": f"{metric}={value:.4f} is above the threshold {limit}"})
    if thresholds.min_live_accuracy is not None and live_accuracy is not None \
            and live_accuracy < thresholds.min_live_accuracy:
        alerts.append({"metric": "medpipe_live_accuracy", "value": round(live_accuracy, 6),
                       "threshold": thresholds.min_live_accuracy,
                       "message": f"medpipe_live_accuracy={live_accuracy:.4f} is below {thresholds.min_live_accuracy}"})
    return alerts


def read_live_accuracy(feedback_dir: str | Path | None) -> float | None:
    if not feedback_dir:
        return None
    summary = Path(feedback_dir) / "feedback_summary.json"
    if not summary.is_file():
        raise DataError(f"--feedback {feedback_dir} has no feedback_summary.json: run `medpipe feedback` first")
    value = json.loads(summary.read_text()).get("live_accuracy")
    return None if value is None else float(value)


def build_report(records: list[dict], baseline: dict, date: str, model: str | None, thresholds: Thresholds,
                 confidence_cutoff: float, min_requests: int, live_accuracy: float | None = None,
                 skipped: list[dict] | None = None) -> dict:
    tracker = DriftTracker(baseline, window=None, low_confidence_threshold=confidence_cutoff)
    bad: list[dict] = list(skipped or [])
    for record in records:
        try:
            tracker.observe(record["pixel_histogram"], record["probabilities"])
        except (ValueError, TypeError) as exc:
            bad.append({"request_id": record.get("request_id"), "reason": str(exc)})
    snapshot = tracker.snapshot()
    alerts = evaluate(snapshot, thresholds, live_accuracy, min_requests)
    status = "alert" if alerts else ("insufficient_data" if snapshot["n"] < min_requests else "ok")
    if snapshot["n"] == 0:
        status = "no_traffic"
        alerts = [{"metric": "medpipe_monitoring_requests", "value": 0, "threshold": 1,
                   "message": f"no request was logged on {date}: is the gateway running with --request-log, and does "
                              "traffic go through it?"}]
    base_hist = baseline["pixel_histogram"]
    base_total = float(sum(base_hist)) or 1.0
    served_total = float(sum(snapshot["histogram"])) or 1.0
    confidences = [float(r["confidence"]) for r in records if isinstance(r.get("confidence"), (int, float))]
    return {
        "date": date,
        "model": model or (records[0].get("model") if records else None),
        "versions": sorted({str(r.get("version")) for r in records if r.get("version") is not None}),
        "status": status,
        "n": snapshot["n"],
        "psi": snapshot["psi"],
        "class_shift": snapshot["class_shift"],
        "low_confidence_rate": snapshot["low_confidence_rate"],
        "mean_confidence": sum(confidences) / len(confidences) if confidences else None,
        "live_accuracy": live_accuracy,
        "thresholds": {**asdict(thresholds), "confidence_cutoff": confidence_cutoff, "min_requests": min_requests},
        "alerts": alerts,
        "baseline": {"source": baseline.get("source"), "labels": baseline["labels"]},
        "pixel_histogram": {"baseline": [v / base_total for v in base_hist],
                            "served": [v / served_total for v in snapshot["histogram"]]},
        "class_mix": {"baseline": baseline["class_distribution"], "served": snapshot["class_mix"]},
        "skipped": bad,
    }


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def write_outputs(report: dict, output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / f"{REPORT_NAME}.json", "md": output / f"{REPORT_NAME}.md",
             "html": output / f"{REPORT_NAME}.html", "png": output / f"{REPORT_NAME}.png"}
    write_json_atomic(paths["json"], report, sort_keys=True)
    write_atomic(paths["md"], render_markdown(report))
    write_atomic(paths["html"], render_html(report))
    plot(report, paths["png"])
    return paths


def _summary_rows(report: dict) -> list[tuple[str, str, str]]:
    limits = report["thresholds"]
    return [
        ("requests", str(report["n"]), f">= {limits['min_requests']} to judge"),
        ("PSI (pixel intensities)", f"{report['psi']:.4f}", f"<= {limits['psi']}"),
        ("class shift (TV distance)", f"{report['class_shift']:.4f}", f"<= {limits['class_shift']}"),
        (f"low-confidence rate (< {limits['confidence_cutoff']})", f"{report['low_confidence_rate']:.4f}",
         f"<= {limits['low_confidence_rate']}"),
        ("live accuracy (feedback)", "-" if report["live_accuracy"] is None else f"{report['live_accuracy']:.4f}",
         "-" if limits["min_live_accuracy"] is None else f">= {limits['min_live_accuracy']}"),
    ]


def render_markdown(report: dict) -> str:
    lines = [f"# Drift report: {report['model']} on {report['date']}", "",
             f"Status: **{report['status']}** (versions {', '.join(report['versions']) or '-'})", "",
             "| figure | value | threshold |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {limit} |" for name, value, limit in _summary_rows(report)]
    lines += ["", "## Alerts", ""] + ([f"- {a['message']}" for a in report["alerts"]] or ["none"])
    lines += ["", "## Class mix (predicted vs training)", "", "| class | served | training |", "| --- | --- | --- |"]
    served, base = report["class_mix"]["served"], report["class_mix"]["baseline"]
    lines += [f"| {label} | {served.get(label, 0):.3f} | {base.get(label, 0):.3f} |" for label in base]
    if report["skipped"]:
        lines += ["", f"{len(report['skipped'])} log lines skipped (see drift_report.json)."]
    lines += ["", f"![histograms and class mix]({REPORT_NAME}.png)", ""]
    return "\n".join(lines)


def render_html(report: dict) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(v)}</td><td>{esc(t)}</td></tr>" for n, v, t in _summary_rows(report))
    alerts = "".join(f"<li>{esc(a['message'])}</li>" for a in report["alerts"]) or "<li>none</li>"
    colour = {"alert": "#b00020", "ok": "#1b5e20"}.get(report["status"], "#555")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Drift report {esc(str(report['model']))} "
            f"{esc(report['date'])}</title></head><body style='font-family:sans-serif'>"
            f"<h1>Drift report: {esc(str(report['model']))} on {esc(report['date'])}</h1>"
            f"<p>Status: <b style='color:{colour}'>{esc(report['status'])}</b></p>"
            f"<table border='1' cellpadding='4'><tr><th>figure</th><th>value</th><th>threshold</th></tr>{rows}</table>"
            f"<h2>Alerts</h2><ul>{alerts}</ul><img src='{REPORT_NAME}.png' alt='histograms and class mix'>"
            "</body></html>\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: Airflow workers and CI have no display
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist = report["pixel_histogram"]
    centers = [(i + 0.5) * 256 / len(hist["baseline"]) for i in range(len(hist["baseline"]))]
    width = 256 / len(hist["baseline"]) * 0.45
    left.bar([c - width / 2 for c in centers], hist["baseline"], width=width, label="training")
    left.bar([c + width / 2 for c in centers], hist["served"], width=width, label="served")
    left.set(title=f"pixel intensities (PSI {report['psi']:.3f})", xlabel="intensity", ylabel="fraction")
    left.legend()
    labels = list(report["class_mix"]["baseline"])
    xs = range(len(labels))
    right.bar([x - 0.2 for x in xs], [report["class_mix"]["baseline"][l] for l in labels], width=0.4, label="training")
    right.bar([x + 0.2 for x in xs], [report["class_mix"]["served"].get(l, 0) for l in labels], width=0.4,
              label="predicted")
    right.set_xticks(list(xs), labels, rotation=20)
    right.set(title=f"class mix (shift {report['class_shift']:.3f})", ylabel="fraction")
    right.legend()
    figure.suptitle(f"{report['model']} {report['date']}: {report['status']} ({report['n']} requests)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def push_report(report: dict, url: str | None) -> bool:
    gauges = {name: (report[key], f"daily {key} of served traffic against the training data")
              for name, key in GAUGES.items()}
    gauges["medpipe_monitoring_requests"] = (report["n"], "requests in the daily drift report")
    gauges["medpipe_monitoring_alert"] = (1.0 if report["alerts"] else 0.0, "1 when the daily drift report alerted")
    if report["live_accuracy"] is not None:
        gauges["medpipe_live_accuracy"] = (report["live_accuracy"], "accuracy of served predictions vs feedback")
    return push_gauges("medpipe_monitoring", gauges, labels={"model": str(report["model"])}, url=url)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _day(text: str) -> str:
    """--date must be a calendar day: it names the log file read and the report written."""
    import datetime

    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe monitor",
        description="Daily drift report of a served model from the gateway's request log; exit 1 = alert.",
    )
    parser.add_argument("--requests", required=True, help="the gateway's --request-log directory")
    parser.add_argument("--baseline", required=True, help="the training data's ingest directory or its stats.json")
    parser.add_argument("--date", required=True, type=_day, help="day to report, YYYY-MM-DD (reads requests-<date>.jsonl)")
    parser.add_argument("--output", required=True, help="directory for drift_report.{json,md,html,png}")
    parser.add_argument("--model", help="only requests to this model name (required when the log has several)")
    parser.add_argument("--psi-threshold", type=float, default=PSI_THRESHOLD, help="alert above (default %(default)s)")
    parser.add_argument("--class-shift-threshold", type=float, default=CLASS_SHIFT_THRESHOLD,
                        help="alert above this total variation distance (default %(default)s)")
    parser.add_argument("--low-confidence-rate-threshold", type=float, default=LOW_CONFIDENCE_RATE_THRESHOLD,
                        help="alert above this fraction of low-confidence predictions (default %(default)s)")
    parser.add_argument("--confidence-cutoff", type=float, default=LOW_CONFIDENCE_THRESHOLD,
                        help="a prediction whose top probability is below this is low-confidence (default %(default)s)")
    parser.add_argument("--min-live-accuracy", type=float, default=None,
                        help="alert when the feedback's live accuracy is below this (needs --feedback)")
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS,
                        help="fewer requests than this: report only, no alert (default %(default)s)")
    parser.add_argument("--feedback", help="a `medpipe feedback` output directory (adds live accuracy)")
    parser.add_argument("--pushgateway", help="Pushgateway URL for the daily gauges (default env MEDPIPE_PUSHGATEWAY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    baseline = load_baseline(args.baseline)
    log_path = request_log_path(args.requests, args.date)
    records, skipped = read_request_log(log_path, args.model)
    models = sorted({str(r.get("model")) for r in records})
    if len(models) > 1:
        raise DataError(f"{log_path} holds requests for several models ({', '.join(models)}): pass --model NAME")
    if not log_path.is_file():
        log.warning("no request log %s: reporting a day without traffic", log_path)
    thresholds = Thresholds(args.psi_threshold, args.class_shift_threshold, args.low_confidence_rate_threshold,
                            args.min_live_accuracy)
    report = build_report(records, baseline, args.date, args.model, thresholds, args.confidence_cutoff,
                          args.min_requests, read_live_accuracy(args.feedback), skipped)
    paths = write_outputs(report, Path(args.output))
    push_report(report, args.pushgateway)
    print(json.dumps({key: report[key] for key in ("date", "model", "status", "n", "psi", "class_shift",
                                                   "low_confidence_rate", "live_accuracy")} | {"report": str(paths["json"])}))
    if report["alerts"]:
        for alert in report["alerts"]:
            print(f"ALERT {report['model']} {report['date']}: {alert['message']} ({report['n']} requests; "
                  f"report {paths['html']})", file=sys.stderr)
        return EXIT_ALERT
    if report["status"] == "insufficient_data":
        log.warning("only %d requests on %s (< %d): no drift verdict", report["n"], args.date, args.min_requests)
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
