"""Push a batch job's metrics to a Prometheus Pushgateway: the one writer every batch stage shares (ingest:
beam_pipelines/ingest_metrics.py, training: models/train.py, serving/monitoring.py, serving/feedback.py).

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
