"""The ingest's counts as Prometheus gauges, pushed once at the end of a run (a batch job ends before a scrape)."""

from __future__ import annotations

from typing import Mapping

from medpipe.metrics_push import push_gauges
from medpipe.schema import IngestStats


def push_ingest_stats(stats: Mapping, dataset: str, url: str | None = None,
                      duration_seconds: float | None = None) -> bool:
    """stats.json's totals (the names the alert rules and the Grafana dashboard use), the run's wall time (the
    dashboard's throughput panel divides by it), plus rejected counts by reason code (a bounded label); True when the
    Pushgateway took them, False without one."""
    counts = IngestStats.from_dict(dict(stats))
    gauges = {
        "medpipe_ingest_files_read": (counts.input_files, "input files the ingest read"),
        "medpipe_ingest_files_written": (counts.written, "examples written to TFRecords"),
        "medpipe_ingest_files_rejected": (counts.rejected, "input files rejected (all reasons)"),
        "medpipe_ingest_duplicates_dropped": (counts.duplicates_dropped, "duplicate images dropped"),
    }
    if duration_seconds is not None:
        gauges["medpipe_ingest_duration_seconds"] = (round(duration_seconds, 3), "wall time of the ingest run")
    ok = push_gauges("medpipe_ingest", gauges, labels={"dataset": dataset}, grouping_key={"dataset": dataset}, url=url)
    for reason, count in counts.rejected_by_reason.items() if ok else ():
        push_gauges("medpipe_ingest_rejected", {
            "medpipe_ingest_rejected_by_reason": (count, "input files rejected, by reason code")},
            labels={"dataset": dataset, "reason": reason}, grouping_key={"dataset": dataset, "reason": reason},
            url=url)
    return ok
