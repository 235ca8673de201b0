"""Push a batch job's metrics to a Prometheus Pushgateway (ingest, training, monitoring, feedback).

Batch stages end before Prometheus could scrape them, so they push their final figures once. The gateway URL comes
from the stage's `--pushgateway` flag, else env MEDPIPE_PUSHGATEWAY; with neither, pushing is skipped (the figures
are in the stage's JSON outputs anyway). A gateway that is down is a warning, never a failed stage.

Names follow Prometheus conventions (`medpipe_<stage>_<what>[_unit]`) and carry no identifying labels: only the
job (stage), the dataset/model name and bounded enums such as a rejection reason.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

PUSHGATEWAY_ENV = "MEDPIPE_PUSHGATEWAY"


def pushgateway_url(explicit: str | None = None) -> str | None:
    return (explicit or os.environ.get(PUSHGATEWAY_ENV, "")).strip() or None


def push_gauges(
    job: str,
    gauges: Mapping[str, tuple[float, str]],
    labels: Mapping[str, str] | None = None,
    grouping_key: Mapping[str, str] | None = None,
    url: str | None = None,
    timeout: float = 10.0,
) -> bool:
    """Push {name: (value, help)} as gauges with the same `labels`; True when the gateway accepted them.

    The push replaces the group (job + grouping_key), so a re-run of the same job overwrites its previous figures.
    """
    target = pushgateway_url(url)
    if not target:
        return False
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway  # lazy: batch CLIs start fast

    registry = CollectorRegistry()
    label_names = sorted(labels or {})
    for name, (value, help_text) in gauges.items():
        gauge = Gauge(name, help_text, label_names, registry=registry)
        (gauge.labels(**{k: str(labels[k]) for k in label_names}) if label_names else gauge).set(float(value))
    try:
        push_to_gateway(target, job=job, registry=registry, grouping_key=dict(grouping_key or {}), timeout=timeout)
    except Exception as exc:  # a monitoring outage must not fail the data pipeline
        log.warning("Pushgateway %s did not accept %d metrics for job %s: %s", target, len(gauges), job, exc)
        return False
    log.info("pushed %d metrics for job %s to %s", len(gauges), job, target)
    return True


def _total(node) -> float:
    """Sum of the numbers in a count or a nested {split: {class: count}} dict."""
    if isinstance(node, (int, float)):
        return float(node)
    if isinstance(node, Mapping):
        return sum(_total(value) for value in node.values())
    return 0.0


def ingest_gauges(stats: Mapping) -> dict[str, tuple[float, str]]:
    """The ingest's stats.json as gauges (the names the alert rules and the Grafana dashboard use)."""
    gauges = {
        "medpipe_ingest_files_read": (_total(stats.get("input_files", 0)), "input files the ingest read"),
        "medpipe_ingest_files_written": (_total(stats.get("written", 0)), "examples written to TFRecords"),
        "medpipe_ingest_files_rejected": (_total(stats.get("rejected", 0)), "input files rejected (all reasons)"),
        "medpipe_ingest_duplicates_dropped": (_total(stats.get("duplicates_dropped", stats.get("duplicates", 0))),
                                              "duplicate images dropped"),
    }
    if isinstance(stats.get("duration_seconds"), (int, float)):
        gauges["medpipe_ingest_duration_seconds"] = (float(stats["duration_seconds"]), "ingest wall time")
    return gauges


def push_ingest_stats(stats: Mapping, dataset: str, url: str | None = None) -> bool:
    """One call at the end of an ingest: totals, plus rejected counts by reason code (a bounded label)."""
    ok = push_gauges("medpipe_ingest", ingest_gauges(stats), labels={"dataset": dataset},
                     grouping_key={"dataset": dataset}, url=url)
    rejected = stats.get("rejected_by_reason", stats.get("rejected"))
    if ok and isinstance(rejected, Mapping):
        for reason, count in rejected.items():
            push_gauges("medpipe_ingest_rejected", {
                "medpipe_ingest_rejected_by_reason": (_total(count), "input files rejected, by reason code")},
                labels={"dataset": dataset, "reason": str(reason)},
                grouping_key={"dataset": dataset, "reason": str(reason)}, url=url)
    return ok


def push_training_metrics(metrics: Mapping[str, float], dataset: str, epoch: int | None = None,
                          duration_seconds: float | None = None, url: str | None = None) -> bool:
    """Epoch or final training figures, e.g. {"val_accuracy": 0.91, "loss": 0.3} -> medpipe_training_<name>."""
    gauges = {f"medpipe_training_{name}": (float(value), f"training {name} (latest epoch or final)")
              for name, value in metrics.items() if isinstance(value, (int, float))}
    if epoch is not None:
        gauges["medpipe_training_epoch"] = (float(epoch), "last completed epoch")
    if duration_seconds is not None:
        gauges["medpipe_training_duration_seconds"] = (float(duration_seconds), "training wall time")
    return push_gauges("medpipe_training", gauges, labels={"dataset": dataset}, grouping_key={"dataset": dataset},
                       url=url)
