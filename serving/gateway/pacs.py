"""The PACS road through the gateway: receive (both doors) -> spool -> stable study -> Gateway.predict -> SR ->
outbox -> deliver with backoff. Asynchronous by nature: a sender is acknowledged once its instance is on disk.

    receive(data, header, door, identity, principal)   routing; not routed = acknowledged + audited, nothing spooled
    process_ready()   every stable (model, study): one predict call, aggregation, one SR in the outbox, done markers
    deliver_ready()   every outbox job whose backoff has passed: STOW-RS / C-STORE (+ webhook), then removed

Both loops run in background threads started by `start()`; tests call them directly. Logs and audit records carry
pseudonyms (HMAC under MEDPIPE_DEID_KEY) of study and instance UIDs, the calling AE title, the model and the outcome:
never a header value, a UID or a file name.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serving.gateway import results
from serving.gateway.pacs_config import PacsConfig, models_for, route_for, routing_keys
from serving.gateway.spool import Spool, StudyBatch, derived_uid, idempotency_key, key_of, read_job, size_of
from serving.gateway.study_store import StudyStore

log = logging.getLogger("medpipe.gateway.pacs")

DOORS = ("dimse", "dicomweb")


def _metrics(registry=None):
    """The PACS collectors, registered once per registry (the gateway's own, which /monitoring/prometheus/metrics
    renders; else the process default)."""
    from prometheus_client import REGISTRY, Counter, Gauge

    registry = registry if registry is not None else REGISTRY
    found = _METRICS.get(id(registry))
    if found is None:
        found = _METRICS[id(registry)] = {
            "queue": Gauge("medpipe_pacs_queue_length", "PACS work waiting: instances not yet inferred "
                           "(stage=incoming), results not yet delivered (stage=outbox), instances held for the "
                           "operator (stage=quarantine)", ["stage"],
                           registry=registry),
            "received": Counter("medpipe_pacs_instances", "Instances received by a PACS door, by outcome",
                                ["door", "outcome"], registry=registry),
            "results": Counter("medpipe_pacs_results", "Results produced and delivered, by outcome", ["outcome"],
                               registry=registry),
            "quarantined": Counter("medpipe_pacs_quarantined", "Instances moved to SPOOL/quarantine/ after "
                                   "quarantine_after failed (or crashed) processing attempts", ["model"],
                                   registry=registry),
        }
    return found


_METRICS: dict = {}


def quiet_dicom_loggers() -> None:
    """highdicom logs the source's SOP Instance UID at INFO ("copy Patient-related attributes from dataset ...");
    pynetdicom and dicomweb-client log requests and datasets at INFO/DEBUG. Header values never reach our logs:
    these libraries speak at WARNING and above only (their warnings carry no values in the calls made here)."""
    for name in ("highdicom", "pynetdicom", "dicomweb_client", "pydicom"):
        logging.getLogger(name).setLevel(logging.WARNING if name != "pydicom" else logging.CRITICAL)


OUT_OF_RESOURCES = 0xA700  # DIMSE "Refused: Out of resources": the sender keeps the instance and retries
DISK_FULL = "disk_full"  # Receipt.limit of a refusal for want of space: DIMSE A700, HTTP 507 (both retryable)
# failures that are not the study's fault: they do not count towards quarantine (the study waits and is retried)
NOT_THE_INPUTS_FAULT = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED")


@dataclass(frozen=True)
class Receipt:
    """The answer to one received instance. status: DIMSE status code (0x0000 stored; 0xA700 out of resources;
    0xC000 cannot understand; 0x0124 refused, not authorised), used by both doors. limit: which limit refused it
    (DISK_FULL: the STOW-RS door answers 507)."""

    status: int
    models: tuple[str, ...] = ()
    reason: str = ""
    sop_class: str = ""
    sop_instance: str = ""  # for the STOW-RS response to the sender only; never logged
    limit: str = ""


@dataclass
class _Backoff:
    attempts: int = 0
    next_time: float = 0.0


class PacsService:
    def __init__(self, gateway: Any, config: PacsConfig, destination: results.Destination, deid_key: bytes,
                 clock=time.time):
        quiet_dicom_loggers()
        self.gateway, self.config, self.destination = gateway, config, destination
        self.key = deid_key
        self.clock = clock
        self.spool = Spool(config.spool)
        self.spool.clean_temporaries()
        self.studies = StudyStore(config.spool)
        # the SR's Device Observer UID: one per installation (derived one-way from its MEDPIPE_DEID_KEY), not per study
        self.device_uid = derived_uid("device-observer", self.pseudonym("medpipe-device-observer"))
        self._backoff: dict[str, _Backoff] = {}
        self._upstream_wait: dict[str, _Backoff] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics = _metrics(getattr(getattr(gateway, "metrics", None), "registry", None))
        self.update_queue_metrics()

    # ---------------------------------------------------------------------------------------------------------
    def pseudonym(self, value: str) -> str:
        from medpipe.deid import pseudonym

        return pseudonym(value, self.key)[:16]

    def audit(self, record: dict) -> None:
        """door: dimse | dicomweb for what a door received, pacs for the road's own steps (process, deliver).
        A record that cannot be written raises GatewayError (507, `storage`): the step is refused."""
        self.gateway.audited({"door": "pacs", **record})

    # ---------------------------------------------------------------------------------------------------------
    # receiving (both doors)
    def receive(self, data: "bytes | os.PathLike", door: str, identity: str, principal: Any = None) -> Receipt:
        """One instance (a DICOM file, preamble optional) as bytes, or as the path of the file a door streamed it
        into (never read whole here, unless deflated: see routing_header) -> spooled for each model that takes it."""

        received = self.metrics["received"]
        source, size = data, size_of(data)
        if size > self.config.max_instance_mb * 2**20:
            received.labels(door, "too_large").inc()
            self.audit({"event": "pacs.refused", "door": door, "identity": identity, "reason": "too_large"})
            return Receipt(OUT_OF_RESOURCES, reason=f"instance over max_instance_mb={self.config.max_instance_mb}")
        short = self.space_refusal(door, identity, size)
        if short is not None:
            return short
        try:
            header = routing_header(data)  # bounded whatever the file claims
            study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
            sop, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
        except Exception:  # noqa: BLE001 - any parse failure is "cannot understand"; no message (it may quote PHI)
            received.labels(door, "unreadable").inc()
            self.audit({"event": "pacs.refused", "door": door, "identity": identity, "reason": "unreadable"})
            return Receipt(0xC000, reason="not a DICOM instance with Study/Series/SOP Instance UIDs")
        record = {"event": "pacs.received", "door": door, "identity": identity,
                  "via": getattr(principal, "via", "dimse"), "study": self.pseudonym(study),
                  "instance": self.pseudonym(sop)}
        models = models_for(self.config.routes, routing_keys(header))
        if principal is not None:
            allowed = [model for model in models if _may_call(principal, model)]
            if models and not allowed:
                received.labels(door, "forbidden").inc()
                self.audit({**record, "outcome": "permission_denied", "models": models})
                return Receipt(0x0124, reason="not authorised for the models this instance is routed to",
                               sop_class=sop_class, sop_instance=sop)
            models = allowed
        if not models:
            received.labels(door, "not_routed").inc()
            self.audit({**record, "outcome": "not routed"})
            return Receipt(0x0000, (), "not routed", sop_class, sop)
        short = self.space_refusal(door, identity, size * len(models), record)
        if short is not None:
            return short
        stored = []
        try:
            for model in models:
                stored.append(self.spool.put(model, study, series, sop, source, door, identity,
                                             via=getattr(principal, "via", "dimse")))
        except OSError as exc:
            self.spool.finish(stored)  # all or nothing: the sender re-sends the instance for every model
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            received.labels(door, DISK_FULL if full else "spool_error").inc()
            log.error("PACS spool write failed (%s): the sender is told to retry",
                      errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            self.audit({**record, "outcome": DISK_FULL if full else "spool_error"})
            return Receipt(OUT_OF_RESOURCES, reason="the gateway could not store the instance (its spool disk is "
                           "full); retry later" if full else "the gateway could not store the instance; retry later",
                           limit=DISK_FULL if full else "")
        received.labels(door, "spooled").inc()
        self.audit({**record, "outcome": "spooled", "models": models})
        self.update_queue_metrics()
        return Receipt(0x0000, tuple(models), "", sop_class, sop)

    def space_refusal(self, door: str, identity: str, needed: int, record: Optional[dict] = None
                      ) -> Optional[Receipt]:
        """A refusal when storing `needed` bytes would leave the spool's disk under reserve_mb (None: go ahead).
        Checked before anything is written, so a full disk answers "out of resources" (retryable) at once."""
        try:
            free = self.spool.free_bytes()
        except OSError:
            free = 0
        if free - needed > self.config.reserve_mb * 2**20:  # strict: reserve_mb 0 still refuses a full disk
            return None
        self.metrics["received"].labels(door, DISK_FULL).inc()
        log.warning("PACS %s instance refused: the spool disk has %d MB free, under reserve_mb=%d (A700/507, the "
                    "sender retries); free space or move the spool", door, free // 2**20, self.config.reserve_mb)
        if record is None:
            self.audit({"event": "pacs.refused", "door": door, "identity": identity, "reason": DISK_FULL,
                        "free_mb": free // 2**20})
        else:
            self.audit({**record, "outcome": DISK_FULL, "free_mb": free // 2**20})
        return Receipt(OUT_OF_RESOURCES, reason=f"the gateway's spool disk is below its {self.config.reserve_mb} MB "
                       "reserve; retry later", limit=DISK_FULL)

    # ---------------------------------------------------------------------------------------------------------
    # inference
    def process_ready(self) -> int:
        """Process every stable study (each on its own: one failure never blocks another). Returns results made.

        Poison quarantine: each attempt is counted on disk before it starts (Spool.begin_attempt), so a study that
        crashes the whole process is counted too; instances with quarantine_after attempts behind them move to
        SPOOL/quarantine/ instead of being tried again. A failure that is not the study's (model server down)
        gives its attempt back."""
        made = 0
        now = self.clock()
        self.studies.expire(now - self.config.study_retention_hours * 3600)
        for batch in self.spool.stable(self.config.stable_seconds, now=now):
            wait = self._upstream_wait.get(batch.study_key + batch.model)
            if wait is not None and now < wait.next_time:
                continue
            try:
                batch = self._quarantine_poison(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. the audit disk is full: quarantined at a later scan
                log.error("PACS study %s not quarantined yet (%s)", batch.study_key[:12], _describe(exc))
                continue
            if batch is None:
                continue
            try:
                self.spool.begin_attempt(batch.instances)
            except OSError as exc:
                log.warning("PACS study %s: its attempt could not be recorded (%s); not processed now",
                            batch.study_key[:12], type(exc).__name__)
                continue
            try:
                made += self.process(batch)
                self._upstream_wait.pop(batch.study_key + batch.model, None)
            except Exception as exc:  # noqa: BLE001 - the files stay spooled and are retried with backoff
                code = getattr(exc, "code", None)
                full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self.spool.end_attempt(batch.instances, _describe(exc),
                                       counts=not (full or code in NOT_THE_INPUTS_FAULT))
                state = self._upstream_wait.setdefault(batch.study_key + batch.model, _Backoff())
                self._schedule(state, now)
                log.warning("PACS study %s for model %s not processed (%s); retry in %.0f s",
                            batch.study_key[:12], batch.model, _describe(exc), state.next_time - now)
        self.update_queue_metrics()
        return made

    def _quarantine_poison(self, batch: StudyBatch) -> Optional[StudyBatch]:
        """Move the batch's instances that used up their attempts to quarantine; -> the rest (None if nothing)."""
        limit = self.config.quarantine_after
        counts = [self.spool.attempts(instance) for instance in batch.instances]
        poison = [instance for instance, count in zip(batch.instances, counts) if count >= limit]
        if not poison:
            return batch
        reason = {"model": batch.model, "study_key": batch.study_key, "instances": len(poison),
                  "attempts": max(counts), "quarantine_after": limit,
                  "last_error": self.spool.last_error(poison[0])}
        # audited first: if the record cannot be written the instances stay put (and are not processed either)
        self.audit({"event": "pacs.quarantined", "model": batch.model, "study_key": batch.study_key,
                    "instances": len(poison), "attempts": max(counts), "reason": reason["last_error"][:200]})
        folder = self.spool.quarantine(poison, reason)
        self.metrics["quarantined"].labels(batch.model).inc(len(poison))
        log.error("PACS study %s for model %s quarantined: %d instance(s) failed %d times (last: %s); see %s",
                  batch.study_key[:12], batch.model, len(poison), max(counts), reason["last_error"], folder)
        rest = tuple(instance for instance in batch.instances if instance not in poison)
        return StudyBatch(batch.model, batch.study_key, rest, batch.newest) if rest else None

    def process(self, batch: StudyBatch) -> int:
        """One stable study: its new instances and the ones kept from earlier results are scored together, decided
        by the model's study rule (medpipe.study), and one SR (+ SC for an abnormal finding) replaces the study's
        previous SR, if any (same series, next InstanceNumber, Predecessor Documents Sequence)."""
        from medpipe.imaging import read_dicom_header
        from serving.gateway.core import Principal

        kept = [instance for instance in self.studies.instances(batch.model, batch.study_key)
                if instance.path.name not in {new.path.name for new in batch.instances}]
        instances = list(batch.instances) + kept  # the whole study received so far, new ones first
        datas = [instance.read() for instance in instances]
        # bounded whatever a spooled file claims (one spooled before receive() checked whole deflated streams fails
        # here, counts as an attempt and ends in quarantine instead of being inflated whole)
        headers = [read_dicom_header(data) for data in datas]
        first = batch.instances[0].meta
        door = first.get("door", "dimse")
        principal = Principal(identity=f"pacs:{first.get('identity', 'unknown')}",
                              scopes=frozenset({f"predict:{batch.model}"}), via=first.get("via", "dimse"))
        request_id = f"pacs-{uuid.uuid4().hex[:16]}"
        usable, items, version = self._predict(principal, batch, datas, request_id, door)
        new_count = len(batch.instances)
        unusable = [instance for index, instance in enumerate(batch.instances) if index not in items]
        self.spool.reject(unusable)  # kept for the operator under SPOOL/rejected/, never inferred again
        new_usable = [index for index in usable if index < new_count]
        if not new_usable:
            return 0
        keys = {index: idempotency_key(str(headers[index].SOPInstanceUID), batch.model, version) for index in usable}
        fresh = [index for index in new_usable if not self.spool.is_done(keys[index])]
        study_uid = str(headers[0].StudyInstanceUID)
        base = {"model": batch.model, "version": version, "study": self.pseudonym(study_uid), "request_id": request_id}
        if not fresh:
            self.audit({"event": "pacs.replay_skipped", **base, "instances": len(new_usable)})
            self.spool.finish(batch.instances)
            return 0
        chosen = [items[index] for index in usable]
        rule = self.study_rule(batch.model, version, chosen)
        decision = results.aggregate(chosen, rule)
        sources = [headers[index] for index in usable]
        job_key = key_of(batch.model, str(version), *sorted(str(ds.SOPInstanceUID) for ds in sources))
        number, predecessor = self.studies.next_report(batch.model, batch.study_key, job_key)
        finding = results.finding_of(decision, chosen, batch.model, version, sources, rule,
                                     self.ood_threshold(batch.model, version))
        route = route_for(self.config.routes, batch.model)
        sr = results.build_sr(sources, finding, sr_uid=derived_uid(job_key, "sr"),
                              series_uid=derived_uid(study_uid, batch.model, "sr-series"),
                              codes=route.codes if route else {}, instance_number=number,
                              predecessor=predecessor, device_uid=self.device_uid)
        objects = {"sr.dcm": results.to_bytes(sr)}
        decider = decision.decider
        heatmap = getattr(chosen[decider], "heatmap", None) if decider is not None else None
        if self.config.secondary_capture and heatmap is not None and results.wants_secondary_capture(decision):
            sc = results.build_secondary_capture(sources[decider], chosen[decider].png, heatmap,
                                                 sop_uid=derived_uid(job_key, "sc"),
                                                 series_uid=derived_uid(study_uid, batch.model, "sc"),
                                                 instance_number=number)
            objects["sc.dcm"] = results.to_bytes(sc)
        uids = {"StudyInstanceUID": study_uid, "SRSOPInstanceUID": str(sr.SOPInstanceUID)}
        supersedes = predecessor["sr_uid"] if predecessor else None
        job = {"model": batch.model, "version": version, "study": base["study"], "created": self.clock(),
               "webhook": (results.webhook_payload(finding, uids, job_key, supersedes) if self.config.webhook
                           else None)}
        report = {"job": job_key, "sr_uid": str(sr.SOPInstanceUID), "series_uid": str(sr.SeriesInstanceUID),
                  "number": number}
        self.spool.add_job(job_key, objects, job)  # 1. the result is durable
        answered = [batch.instances[index] for index in new_usable]  # rejected ones were moved away above
        self.studies.record(batch.model, batch.study_key, answered, report)  # 2. the study remembers it
        self.spool.mark_done(keys[index] for index in fresh)  # 3. its new instances are answered
        self.spool.finish(batch.instances)  # 4. the inputs go (a crash before here replays into the same job)
        self.metrics["results"].labels("produced").inc()
        self.audit({"event": "pacs.result", **base, "job": job_key, "instances": len(usable),
                    "new_instances": len(fresh), "class_name": decision.class_name,
                    "outside_intended_use": decision.class_name is None, "excluded": len(decision.excluded),
                    "probability": None if decision.probability is None else round(decision.probability, 6),
                    "rule": decision.rule, "report_number": number,
                    "supersedes": predecessor["job"] if predecessor else None, "objects": sorted(objects)})
        return 1

    def ood_threshold(self, model: str, version: int) -> Optional[float]:
        """The version's OOD threshold (REPO/MODEL/VERSION/assets/ood.json), shown beside the score in the SR; None
        without the repository or the file."""
        import json
        from pathlib import Path

        repository = getattr(getattr(self.gateway, "catalog", None), "repository", None)
        path = Path(repository) / model / str(version) / "assets" / "ood.json" if repository else None
        try:
            return float(json.loads(path.read_text())["threshold"]) if path is not None else None
        except (OSError, ValueError, KeyError):
            return None

    def study_rule(self, model: str, version: int, items: list):
        """The model version's own rule (its assets), or max/mean when the PACS config names one explicitly."""
        from medpipe.study import explicit_rule

        from serving.gateway.core import GatewayError

        labels = list(items[0].probabilities)
        if self.config.aggregation != "model":
            return explicit_rule(self.config.aggregation, labels)
        rule = self.gateway.catalog.study_rule(model, version)
        if sorted(rule.labels) != sorted(labels):
            raise GatewayError("INTERNAL", f"model {model} version {version}: its study rule names labels "
                               f"{list(rule.labels)} but the model answers {labels}; re-export the version")
        return rule

    def _predict(self, principal, batch: StudyBatch, datas: list[bytes], request_id: str, door: str):
        """The study's images in calls of at most the gateway's max_images (all at one model version); if the
        gateway refuses a call as invalid, image by image, so that one undecodable instance cannot hold back the
        others. Returns (usable indices, items by index, version)."""
        from serving.gateway.core import GatewayError

        kwargs = dict(explain=self.config.secondary_capture, deadline_s=self.config.deadline_seconds, door=door)
        size = max(1, int(self.gateway.config.limits.max_images))
        items: dict[int, Any] = {}
        version: Optional[int] = None
        for start in range(0, len(datas), size):
            chunk = list(range(start, min(start + size, len(datas))))
            try:
                prediction = self.gateway.predict(principal, batch.model, [datas[i] for i in chunk],
                                                  version=version, request_id=f"{request_id}-{start}", **kwargs)
                version = int(prediction.version)
                items.update(zip(chunk, prediction.items))
                continue
            except GatewayError as exc:
                if exc.code != "INVALID_ARGUMENT":
                    raise
            for index in chunk:
                try:
                    prediction = self.gateway.predict(principal, batch.model, [datas[index]], version=version,
                                                      request_id=f"{request_id}-{index}", **kwargs)
                except GatewayError as exc:
                    if exc.code != "INVALID_ARGUMENT":
                        raise
                    self.audit({"event": "pacs.rejected", "model": batch.model, "request_id": request_id,
                                "reason": exc.message[:200]})
                    self.metrics["results"].labels("instance_rejected").inc()
                    continue
                version = int(prediction.version)
                items[index] = prediction.items[0]
        return sorted(items), items, (version if version is not None else 0)

    # ---------------------------------------------------------------------------------------------------------
    # delivery
    def deliver_ready(self) -> int:
        sent = 0
        now = self.clock()
        for folder in self.spool.jobs():
            state = self._backoff.setdefault(folder.name, _Backoff())
            if now < state.next_time:
                continue
            job = read_job(folder)
            try:
                objects = [(folder / name).read_bytes() for name in job["objects"]]
                results.send(self.destination, objects)
            except results.DeliveryError as exc:
                self._schedule(state, now)
                self.metrics["results"].labels("delivery_retry").inc()
                log.warning("PACS result %s not delivered (%s); attempt %d, next in %.1f s", folder.name[:12], exc,
                            state.attempts, state.next_time - now)
                continue
            if job.get("webhook") and self.config.webhook:
                try:
                    results.post_webhook(self.config.webhook, job["webhook"])
                except results.DeliveryError as exc:
                    log.warning("PACS result %s: %s (the DICOM result was delivered)", folder.name[:12], exc)
            self.spool.remove_job(folder)
            self._backoff.pop(folder.name, None)
            self.metrics["results"].labels("delivered").inc()
            self.audit({"event": "pacs.delivered", "job": folder.name, "model": job["model"],
                        "version": job["version"], "study": job["study"], "destination": self.destination.kind,
                        "attempts": state.attempts + 1})
            sent += 1
        self.update_queue_metrics()
        return sent

    def _schedule(self, state: _Backoff, now: float) -> None:
        retry = self.config.retry
        delay = min(retry.max_seconds, retry.initial_seconds * 2 ** state.attempts)
        state.attempts += 1
        state.next_time = now + delay

    def update_queue_metrics(self) -> None:
        """Never raises: a gauge must not turn a stored instance into a failed C-STORE."""
        try:
            self.metrics["queue"].labels("incoming").set(self.spool.pending_instances())
            self.metrics["queue"].labels("outbox").set(self.spool.outbox_length())
            self.metrics["queue"].labels("quarantine").set(self.spool.quarantined_instances())
        except OSError as exc:
            log.warning("PACS queue gauges not updated (%s)", type(exc).__name__)

    # ---------------------------------------------------------------------------------------------------------
    # background loops
    def start(self) -> "PacsService":
        for name, step in (("pacs-process", self.process_ready), ("pacs-deliver", self.deliver_ready)):
            thread = threading.Thread(target=self._loop, args=(step,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _loop(self, step) -> None:
        while not self._stop.wait(self.config.scan_seconds):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - a loop that dies silently would stop the PACS road
                log.error("PACS loop %s failed: %s", threading.current_thread().name, _describe(exc))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()


class PacsRoad:
    """What start_pacs started: the service (loops) and the SCP, stopped together."""

    def __init__(self, service: PacsService, scp: Any = None):
        self.service, self.scp = service, scp

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.shutdown()
        self.service.stop()


def start_pacs(gateway: Any, options: Any) -> Optional[PacsRoad]:
    """The gateway CLI's hook: with --results-to (and optionally --dicom-port) build the PacsService, attach it as
    `gateway.pacs` (the STOW-RS router uses it), start the SCP and the loops. None when neither flag is given."""
    from medpipe.deid import deid_key_from_env
    from medpipe.errors import ConfigError
    from serving.gateway.pacs_config import load_pacs_config

    dicom_port = getattr(options, "dicom_port", None)
    results_to = getattr(options, "results_to", None)
    if dicom_port is None and not results_to:
        return None
    if not results_to:
        raise ConfigError("--dicom-port needs --results-to (dicomweb+http://HOST:PORT/ROOT or dimse://AET@HOST:PORT):"
                          " the PACS road must know where its structured reports go")
    config = load_pacs_config(getattr(options, "pacs_config", None))
    if config.routes and not getattr(options, "model_repository", None):
        # never guess: without the served version's assets the road would name findings "0".."N", read DICOM with
        # default settings and decide studies by a rule the model never chose
        raise ConfigError("the PACS road names findings by the model's own labels and reads DICOM and decides "
                          "studies as the model's assets say (assets/preprocessing.json, assets/study_rule.json of "
                          "the served version): pass --model-repository REPO, the model repository TF Serving "
                          "serves (read-only)")
    if not config.routes:
        log.warning("the PACS config has no routes: every received instance is acknowledged and audited "
                    "'not routed' (pass --pacs-config with routes)")
    destination = results.parse_destination(results_to, ca=getattr(options, "results_ca", None),
                                            cert=getattr(options, "tls_cert", None),
                                            key=getattr(options, "tls_key", None))
    service = PacsService(gateway, config, destination, deid_key_from_env(required=True))
    gateway.pacs = service
    scp = None
    if dicom_port is not None:
        from serving.gateway.dimse import server_tls_context, start_scp

        host = getattr(options, "host", "127.0.0.1")
        context = (server_tls_context(options.tls_cert, options.tls_key, options.client_ca)
                   if getattr(options, "dicom_tls", False) else None)
        scp = start_scp(service, dicom_port, getattr(options, "dicom_ae_title", "MEDPIPE"), host, context)
        # one parseable line, like the gRPC/REST one: tests and the benchmark read the bound port from it
        print(f"medpipe gateway: DICOM {getattr(options, 'dicom_ae_title', 'MEDPIPE')}@{host}:"
              f"{scp.server_address[1]}", flush=True)
    service.start()
    return PacsRoad(service, scp)


def _may_call(principal, model: str) -> bool:
    from serving.gateway.core import may_call

    return may_call(principal, model)


HEADER_BYTES = 16 * 2**20  # what receive() reads of a streamed file to find its header (pixel data comes last)


def routing_header(data: "bytes | os.PathLike"):
    """The header of a received instance, in bounded memory whatever it claims (medpipe.imaging.read_dicom_header:
    no validation warnings or log lines that could quote a header value). A streamed file is read only up to
    HEADER_BYTES, unless it is deflated: only its whole stream, inflated chunk by chunk and kept nowhere, proves it
    is no bomb for the later reads of the PACS road (it is at most max_instance_mb, checked before)."""
    from medpipe.imaging import DEFLATED_TRANSFER_SYNTAX, file_meta_end, read_dicom_header

    if isinstance(data, (bytes, bytearray)):
        return read_dicom_header(bytes(data))
    head = _head(data)
    if file_meta_end(head)[1] == DEFLATED_TRANSFER_SYNTAX:
        return read_dicom_header(Path(data).read_bytes())
    return read_dicom_header(head)


def _head(path: "os.PathLike") -> bytes:
    """The start of a received file: enough for the header parse, never the whole (possibly huge) instance."""
    with open(path, "rb") as handle:
        return handle.read(HEADER_BYTES)


def _describe(exc: BaseException) -> str:
    """An exception for a log line: the gateway's own errors carry safe messages; anything else only its type."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code.isupper():
        return f"{code}: {getattr(exc, 'message', '')}"[:300]
    return type(exc).__name__
