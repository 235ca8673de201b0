"""The gateway's core: who is calling, may they, and one road from encoded images to the model's answer.

Doors (gRPC, REST, and the routers other issues add: DICOMweb, the viewer) only translate: bytes + identity + model
+ deadline in, a `Prediction` or a `GatewayError` out. `Gateway.predict` preprocesses every image with
`medpipe.imaging.preprocess_bytes` (the one host pipeline; the preprocessing settings come from the served model's
own assets, cached per version), forwards the exact-size PNGs upstream to TF Serving over gRPC, and audits, counts
and logs every request. Nothing here binds a socket; serving.gateway.server wires the doors.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import grpc
import numpy as np

from medpipe.ids import sanitize_request_id
from serving.gateway import decode_worker
from serving.gateway.audit import AuditUnavailable
from serving.gateway.decode_pool import DecodeFailure, DecodePool
from serving.gateway.decode_worker import is_exact_png  # noqa: F401 - part of this module's interface

log = logging.getLogger("medpipe.gateway")

# The one table: gateway code -> (gRPC status, HTTP status). Doors never choose statuses themselves.
ERRORS: dict[str, tuple[grpc.StatusCode, int]] = {
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "UNAUTHENTICATED": (grpc.StatusCode.UNAUTHENTICATED, 401),
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, 403),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    "DEADLINE_EXCEEDED": (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    "UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, 503),
    "INTERNAL": (grpc.StatusCode.INTERNAL, 500),
}
# A body over the size limit is RESOURCE_EXHAUSTED like any limit, but HTTP has a more precise status for it; an
# image the decode pool refused (its worker ran out of memory, died or overran) is well-formed HTTP that cannot be
# processed: 422 (gRPC keeps INVALID_ARGUMENT); storage the gateway cannot write (the audit trail: `storage`; the
# PACS spool under its reserve: `disk_full`): 507, which clients and PACSs retry.
HTTP_BY_REASON = {"body_size": 413, "decode_limit": 422, "storage": 507, "disk_full": 507}

MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")  # no leading dot: never "." or ".." (a path)
LABEL_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
SIGNATURES = ("serving_default", "explain")
UID_KEYWORDS = decode_worker.UID_KEYWORDS  # what a DICOM answer carries (the worker reads them)


class GatewayError(Exception):
    """A refusal or failure a client sees: `code` is a key of ERRORS; `message` says what happened and how to fix
    it and never carries a header value, a file name or a patient identity. `reason` names the limit that refused
    the request (metric label), when one did."""

    def __init__(self, code: str, message: str, reason: str | None = None):
        if code not in ERRORS:
            raise ValueError(f"unknown gateway error code {code!r}; expected one of {sorted(ERRORS)}")
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.reason = code, message, reason

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return ERRORS[self.code][0]

    @property
    def http_status(self) -> int:
        return HTTP_BY_REASON.get(self.reason or "", ERRORS[self.code][1])


def audit_refusal() -> GatewayError:
    """What every door answers when the audit trail cannot be written: nothing is served unaudited."""
    return GatewayError("RESOURCE_EXHAUSTED", "the gateway cannot write its audit trail (storage full or failing), "
                        "so it answers nothing; retry later", reason="storage")


@dataclass(frozen=True)
class Principal:
    identity: str
    scopes: frozenset
    via: str  # mtls | jwt | session | anonymous | dimse


def may_call(principal: Principal, model: str) -> bool:
    return "predict:*" in principal.scopes or f"predict:{model}" in principal.scopes


@dataclass
class ItemResult:
    class_name: Optional[str]  # None when the model says the image is outside its intended use
    confidence: float
    probabilities: dict
    ood_score: Optional[float]
    in_distribution: Optional[bool]
    heatmap: Optional[np.ndarray]  # H x W float32 0..1, only when explain was asked
    png: bytes  # the image exactly as the model saw it
    dicom_uids: Optional[dict]  # Study/Series/SOP Instance UID: response only, never logged


@dataclass
class Prediction:
    model: str
    version: int
    items: list
    request_id: str
    # the model's raw outputs (numpy, by output name) for doors that answer in TF Serving's own format
    outputs: dict = field(default_factory=dict, repr=False)


def check_model_spec(model: str, label: str | None = None) -> None:
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise GatewayError("INVALID_ARGUMENT", "model names are 1-64 characters of A-Z a-z 0-9 . _ -, not starting "
                           "with a dot")
    if label is not None and not LABEL_NAME.match(label):
        raise GatewayError("INVALID_ARGUMENT", "version labels are 1-64 characters of A-Z a-z 0-9 _")


# ---- limits ------------------------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per identity: `rate_per_minute` sustained, bursts of a sixth of it (at least 1)."""

    def __init__(self, rate_per_minute: float):
        self.rate = rate_per_minute / 60.0
        self.burst = max(1.0, rate_per_minute / 6.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, identity: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[identity] = (tokens, now)
                return False
            self._buckets[identity] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle identities rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
            return True


class ConcurrencyLimit:
    """At most `slots` predictions at once; a request waits up to `queue_timeout_s` for a slot."""

    def __init__(self, slots: int, queue_timeout_s: float):
        self._semaphore = threading.BoundedSemaphore(slots)
        self.queue_timeout_s = queue_timeout_s

    def __enter__(self):
        if not self._semaphore.acquire(timeout=self.queue_timeout_s):
            raise GatewayError("RESOURCE_EXHAUSTED", f"the gateway is at its concurrency limit and no slot freed "
                               f"within {self.queue_timeout_s:g} s; retry with backoff", reason="concurrency")
        return self

    def __exit__(self, *exc):
        self._semaphore.release()


class RefusalAudit:
    """Refusals made below the core (413, 408, 503, over-size gRPC messages, DIMSE association rejects): one audit line
    each, up to `per_second` per (door, limit) and second; beyond that they are counted and one `refused.summary`
    line per (door, limit) and second says how many, so a flood cannot grow the log without bound. No PHI: the
    door, the limit, the client address and a fixed message."""

    def __init__(self, gateway, per_second: int = 20):
        self.gateway, self.per_second = gateway, per_second
        self._lock = threading.Lock()
        self._window = int(time.monotonic())
        self._counts: dict[tuple, int] = {}
        self._pending: list[dict] = []  # summaries of closed windows, written outside the lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="refusal-audit", daemon=True)
        self._thread.start()

    def refused(self, door: str, limit: str, client: str | None, message: str,
                code: str = "RESOURCE_EXHAUSTED", event: str = "refused") -> None:
        key = (door, limit, code)
        with self._lock:
            self._roll(int(time.monotonic()))
            count = self._counts[key] = self._counts.get(key, 0) + 1
        if count <= self.per_second:
            self._write({"event": event, "door": door, "limit": limit, "client": client, "outcome": code,
                         "error": message})

    def _roll(self, now: int) -> None:
        """Close the window when a new second began, queueing its summaries (called with the lock held)."""
        if now == self._window:
            return
        self._pending += [{"event": "refused.summary", "door": door, "limit": limit, "outcome": code, "count": count,
                           "audited_individually": self.per_second, "window_s": 1}
                          for (door, limit, code), count in self._counts.items() if count > self.per_second]
        self._window, self._counts = now, {}

    def _flush(self) -> None:
        with self._lock:
            self._roll(int(time.monotonic()))
            pending, self._pending = self._pending, []
        for record in pending:
            self._write(record)

    def _write(self, record: dict) -> None:
        try:
            self.gateway.audit.append(record)
        except AuditUnavailable:  # the refusal was made either way; the writer has logged the failure
            pass

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._window = -1  # closes the current window
        self._flush()


# ---- upstream: TF Serving over gRPC ------------------------------------------------------------------------------
def upstream_error(exc: grpc.RpcError, model: str) -> GatewayError:
    """An upstream failure in words a client can act on; upstream details (paths, internals) are not passed on."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.NOT_FOUND:
        return GatewayError("NOT_FOUND", f"model {model} (or that version/label) is not served")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError("DEADLINE_EXCEEDED", "the model server did not answer within the deadline; retry "
                            "or allow more time", reason="deadline")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return GatewayError("INVALID_ARGUMENT", f"the model server refused the input for {model}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError("RESOURCE_EXHAUSTED", "the model server is overloaded; retry with backoff",
                            reason="upstream")
    return GatewayError("UNAVAILABLE", "the model server is unavailable; retry shortly")


class Upstream:
    """A gRPC channel to TF Serving (real or `medpipe serve`) with the official stubs; TLS optional."""

    def __init__(self, target: str, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, max_message_bytes: int = 64 * 2**20):
        from pathlib import Path

        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                Path(tls_ca).read_bytes(), Path(tls_key).read_bytes() if tls_key else None,
                Path(tls_cert).read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.target = target
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


AVAILABLE = 30  # ModelVersionStatus.State.AVAILABLE


class ModelCatalog:
    """Which version a request means, and that version's preprocessing settings (from its own assets)."""

    STATUS_TTL_S = 1.0  # a newly published version is used within a second

    def __init__(self, upstream: Upstream, repository: str | None = None):
        self.upstream, self.repository = upstream, repository
        self._versions: dict[tuple, tuple[float, int]] = {}
        self._configs: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str, version: int | None, label: str | None, timeout: float) -> int:
        if version is not None:
            return int(version)
        key = (model, label)
        now = time.monotonic()
        with self._lock:
            cached = self._versions.get(key)
        if cached and now - cached[0] < self.STATUS_TTL_S:
            return cached[1]
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if label:
            request.model_spec.version_label = label
        try:
            response = self.upstream.models.GetModelStatus(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise upstream_error(exc, model) from None
        available = [s.version for s in response.model_version_status if s.state == AVAILABLE]
        if not available:
            raise GatewayError("NOT_FOUND", f"model {model} has no AVAILABLE version" +
                               (f" under label {label}" if label else ""))
        found = max(available)
        with self._lock:
            self._versions[key] = (now, found)
        return found

    def preprocessing(self, model: str, version: int, timeout: float):
        """The TaskConfig preprocess_bytes needs, cached per (model, version)."""
        with self._lock:
            config = self._configs.get((model, version))
        if config is None:
            config = self._load(model, version, timeout)
            with self._lock:
                self._configs[(model, version)] = config
        return config

    def _load(self, model: str, version: int, timeout: float):
        from medpipe.config import config_from_dict

        if self.repository:
            raw = self._from_assets(model, version)
            if raw is None:  # never guess labels or DICOM settings for a model the repository should describe
                raise GatewayError("INTERNAL", f"model {model} version {version} has no assets/preprocessing.json in "
                                   "the model repository (--model-repository): export it with medpipe train, or "
                                   "point --model-repository at the repository TF Serving serves")
        else:
            raw = self._from_metadata(model, version, timeout)
        return config_from_dict(raw, origin=f"assets of {model} version {version}")

    def _from_assets(self, model: str, version: int) -> dict | None:
        """REPO/MODEL/VERSION/assets/preprocessing.json, written by models.export next to the SavedModel."""
        import json
        from pathlib import Path

        path = Path(self.repository) / model / str(version) / "assets" / "preprocessing.json"
        if not path.is_file():
            return None
        params = json.loads(path.read_text(encoding="utf-8"))
        raw = {"name": model, "task": params.get("task", "multiclass"), "labels": params["labels"],
               "image": {"size": params["image_size"], "channels": params["channels"]}}
        for section in ("dicom", "ingest"):
            if params.get(section):
                raw[section] = params[section]
        return raw

    def study_rule(self, model: str, version: int):
        """The version's study decision rule (medpipe.study) from REPO/MODEL/VERSION/assets/study_rule.json. The
        rule belongs to the model: without the repository mounted, or without the file, there is no rule and the
        caller must refuse to decide a study (never a guessed default)."""
        from pathlib import Path

        from medpipe.study import RULE_FILE, load_rule

        if not self.repository:
            raise GatewayError("UNAVAILABLE", f"model {model}: the study rule lives in the version's assets; start "
                               "the gateway with --model-repository (or name aggregation: max|mean in the PACS "
                               "config explicitly)")
        rule = load_rule(Path(self.repository) / model / str(version) / "assets")
        if rule is None:
            raise GatewayError("UNAVAILABLE", f"model {model} version {version} has no assets/{RULE_FILE}: choose "
                               "its operating point with `python -m models.study_point` (or name aggregation: "
                               "max|mean in the PACS config explicitly)")
        return rule

    def _from_metadata(self, model: str, version: int, timeout: float) -> dict:
        """No repository mounted: the image size and channels from the predict_preprocessed signature's shape."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        request.model_spec.version.value = version
        try:
            response = self.upstream.prediction.GetModelMetadata(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise upstream_error(exc, model) from None
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        signature = signature_map.signature_def.get("predict_preprocessed")
        if signature is None or "images" not in signature.inputs:
            raise GatewayError("INTERNAL", f"model {model} version {version} has neither assets/preprocessing.json "
                               "(mount the model repository: --model-repository) nor a predict_preprocessed "
                               "signature to read its image size from")
        dims = [d.size for d in signature.inputs["images"].tensor_shape.dim]
        classes = signature.outputs["probabilities"].tensor_shape.dim[-1].size
        return {"name": model, "task": "multiclass", "labels": [str(i) for i in range(max(classes, 2))],
                "image": {"size": dims[1], "channels": dims[3]}}


# ---- the gateway ---------------------------------------------------------------------------------------------------
def dicom_uids(data: bytes) -> dict | None:
    """Study/Series/SOP Instance UIDs of a DICOM object, for the response only (a bounded header read)."""
    return decode_worker.dicom_uids(data)


class Gateway:
    """Built from the parsed CLI options (serving.gateway.server.build_parser)."""

    def __init__(self, options):
        from serving.gateway.audit import AuditTrail
        from serving.gateway.auth import Authenticator
        from serving.gateway.config import load_gateway_config
        from serving.gateway.metrics import GatewayMetrics

        self.options = options
        self.config = load_gateway_config(getattr(options, "config", None))
        limits = self.config.limits
        try:
            self.audit = AuditTrail(
                options.audit_log, key_file=getattr(options, "audit_key", None),
                anchor=getattr(options, "audit_anchor", None), syslog=getattr(options, "audit_syslog", None),
                syslog_ca=getattr(options, "audit_syslog_ca", None),
                syslog_cert=getattr(options, "audit_syslog_cert", None),
                syslog_key=getattr(options, "audit_syslog_key", None),
                checkpoint_seconds=getattr(options, "audit_checkpoint_seconds", None) or 5.0,
                syslog_format=getattr(options, "audit_syslog_format", None) or "json")
        except (ValueError, PermissionError) as exc:
            from medpipe.errors import ConfigError

            raise ConfigError(str(exc)) from None
        self.transport_refusals = RefusalAudit(self)
        self.metrics = GatewayMetrics(getattr(options, "drift_baseline", None))
        self.request_log = None
        if getattr(options, "request_log", None):
            from serving.gateway.metrics import RequestLog

            self.request_log = RequestLog(options.request_log)
        self.upstream = Upstream(options.upstream, getattr(options, "upstream_ca", None),
                                 getattr(options, "upstream_cert", None), getattr(options, "upstream_key", None))
        self.catalog = ModelCatalog(self.upstream, getattr(options, "model_repository", None))
        self.auth = Authenticator(self.config, jwt_key=getattr(options, "jwt_key", None),
                                  jwt_audience=getattr(options, "jwt_audience", None),
                                  jwt_issuer=getattr(options, "jwt_issuer", None),
                                  allow_anonymous=bool(getattr(options, "allow_anonymous", False)))
        from medpipe.deid import deid_key_from_env

        # with MEDPIPE_DEID_KEY, audit lines name a DICOM's patient by keyed pseudonym (traceable inside the
        # hospital, meaningless outside it); without it, not at all
        self.deid_key = deid_key_from_env(required=False)
        self.rate = RateLimiter(limits.rate_per_minute)
        # request summaries and class/drift metrics are written by one thread, off the answer's path (in order;
        # a full queue makes requests wait rather than drop a summary)
        self._summaries: queue.Queue = queue.Queue(maxsize=256)
        self._summariser = threading.Thread(target=self._summarise, daemon=True, name="summaries")
        self._summariser.start()
        self.slots = ConcurrencyLimit(limits.max_concurrent, limits.queue_timeout_s)
        # started now, before any request: a first image must not wait for the workers to import numpy and Pillow
        self.decoders = DecodePool(limits.decode_workers, limits.decode_memory_mb, limits.decode_timeout_s,
                                   limits.decode_max_tasks, limits.decode_recycle_mb)

    # -- identity --------------------------------------------------------------------------------------------------
    def authenticate(self, request) -> Principal:
        """A REST request (starlette) -> Principal; GatewayError UNAUTHENTICATED otherwise (audited)."""
        client = request.client.host if request.client else None
        subject = request.scope.get("medpipe.client_subject")
        return self._authenticated("rest", client, request.headers.get("authorization"), subject)

    def authenticate_grpc(self, context) -> Principal:
        from serving.gateway.auth import grpc_subject

        authorization = None
        for key, value in context.invocation_metadata():
            if key == "authorization":
                authorization = value
        return self._authenticated("grpc", context.peer(), authorization, grpc_subject(context))

    def _authenticated(self, door: str, client: str | None, authorization: str | None,
                       subject: str | None) -> Principal:
        try:
            return self.auth.principal(authorization, subject)
        except GatewayError as exc:
            self.refused(door, client, None, exc)
            raise

    def refused(self, door: str, client: str | None, principal: Principal | None, exc: GatewayError,
                model: str | None = None, request_id: str | None = None, event: str = "authenticate") -> None:
        """Audit and count a refusal that happened before any model was called."""
        self.metrics.refused(door, exc)
        self.audited({"event": event, "door": door, "identity": principal.identity if principal else None,
                      "via": principal.via if principal else None, "client": client, "model": model,
                      "request_id": request_id, "outcome": exc.code, "error": exc.message,
                      **({"limit": exc.reason} if exc.reason else {})})

    def audited(self, record: dict) -> dict:
        """Append to the audit trail, or refuse: nothing is answered unaudited (507 / RESOURCE_EXHAUSTED)."""
        try:
            return self.audit.append(record)
        except AuditUnavailable:
            raise audit_refusal() from None

    def authorize(self, principal: Principal, model: str) -> None:
        if not may_call(principal, model):
            raise GatewayError("PERMISSION_DENIED", f"{principal.identity} may not call model {model} "
                               f"(needs scope predict:{model} or predict:*)")

    # -- the one road ----------------------------------------------------------------------------------------------
    def deadline(self, deadline_s: float | None) -> float:
        default = self.config.limits.default_deadline_s
        return min(deadline_s, default) if deadline_s and deadline_s > 0 else default

    def predict(self, principal: Principal, model: str, images: list, *, version: int | None = None,
                label: str | None = None, explain: bool = False, request_id: str | None = None,
                deadline_s: float | None = None, door: str = "rest", client: str | None = None) -> Prediction:
        start = time.monotonic()
        request_id = sanitize_request_id(request_id)
        budget = self.deadline(deadline_s)
        signature = "explain" if explain else "serving_default"
        record = {"event": "predict", "door": door, "identity": principal.identity, "via": principal.via,
                  "client": client, "model": None, "version": None, "signature": signature,
                  "request_id": request_id, "images": len(images)}
        resolved = None
        try:
            check_model_spec(model, label)
            record["model"] = model
            self.authorize(principal, model)
            if not self.rate.allow(principal.identity):
                raise GatewayError("RESOURCE_EXHAUSTED", f"rate limit of {self.config.limits.rate_per_minute:g} "
                                   "requests per minute reached for this identity; retry later", reason="rate")
            if not images:
                raise GatewayError("INVALID_ARGUMENT", "the request holds no image")
            if len(images) > self.config.limits.max_images:
                raise GatewayError("INVALID_ARGUMENT", f"{len(images)} images in one request; send at most "
                                   f"{self.config.limits.max_images} per request", reason="max_images")
            with self.slots:
                remaining = budget - (time.monotonic() - start)
                if remaining <= 0:
                    raise GatewayError("DEADLINE_EXCEEDED", "the deadline passed while waiting for a slot",
                                       reason="deadline")
                resolved = self.catalog.resolve(model, version, label, remaining)
                record["version"] = resolved
                config = self.catalog.preprocessing(model, resolved, remaining)
                prepared = [self._prepare(index, data, config, budget - (time.monotonic() - start))
                            for index, data in enumerate(images)]
                remaining = budget - (time.monotonic() - start)
                if remaining <= 0:
                    raise GatewayError("DEADLINE_EXCEEDED", "the deadline passed during preprocessing",
                                       reason="deadline")
                outputs = self._call_upstream(model, resolved, signature, [p.png for p, _ in prepared], remaining)
            prediction = self._prediction(model, resolved, request_id, prepared, outputs, config)
        except GatewayError as exc:
            self._finish(record, start, exc.code, error=exc)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still be audited and answered, without details
            log.error("gateway internal error (%s) on a request to %s", type(exc).__name__, record["model"])
            error = GatewayError("INTERNAL", f"internal gateway error (request id {request_id}); the operator "
                                 "can find it in the gateway log")
            self._finish(record, start, "INTERNAL", error=error)
            raise error from None
        if self.deid_key is not None:
            from medpipe.deid import pseudonym

            record["patients"] = [pseudonym(image.decoded.patient_id, self.deid_key)
                                  if image.decoded.patient_id else None for image, _ in prepared]
        record["classes"] = [item.class_name for item in prediction.items]
        record["confidences"] = [round(item.confidence, 6) for item in prediction.items]
        self._finish(record, start, "OK")
        self._summaries.put((prediction, [image.pixels for image, _ in prepared]))
        return prediction

    def _prepare(self, index: int, data: bytes, config, timeout_s: float):
        """One image -> (PreparedImage with .png to forward, DICOM UIDs or None). Decoded in the decode pool within
        `timeout_s`; only an input whose header says it already is the exact PNG (image.size squared pixels at 8
        bits: bounded) is decoded here, in-process, and forwarded as sent."""
        from medpipe.errors import RejectedInput
        from medpipe.imaging import PreparedImage, encode_png, preprocess_bytes

        if not isinstance(data, (bytes, bytearray)):
            raise GatewayError("INVALID_ARGUMENT", f"image {index} is not binary data")
        data = bytes(data)
        try:
            if decode_worker.exact_png_header(data, config):
                prepared = preprocess_bytes(data, config, encode=False)
                png = data if is_exact_png(data, prepared, config) else encode_png(prepared.pixels)
                return dataclasses.replace(prepared, png=png), None
            decoded = self.decoders.decode(data, config, timeout_s)
        except RejectedInput as exc:
            reason = "pixel_budget" if exc.reason == "pixel_budget" else None
            raise GatewayError("INVALID_ARGUMENT", f"image {index} cannot be used ({exc.reason}): {exc.detail}",
                               reason=reason) from None
        except DecodeFailure as exc:
            if exc.kind in ("deadline", "busy"):
                raise GatewayError("DEADLINE_EXCEEDED", f"image {index}: {exc.message}; retry or allow more time",
                                   reason="deadline") from None
            log.warning("decode pool refused image %d of a request (%s); the worker was replaced", index, exc.kind)
            raise GatewayError("INVALID_ARGUMENT", f"image {index} was refused: {exc.message} (decode_limit); send "
                               "a smaller or well-formed image", reason="decode_limit") from None
        prepared = PreparedImage(png=data if decoded.exact else decoded.png, pixels=decoded.pixels,
                                 decoded=decoded.decoded, pixel_hash=decoded.pixel_hash)
        return prepared, decoded.uids

    def _call_upstream(self, model: str, version: int, signature: str, pngs: list, timeout: float) -> dict:
        from tensorflow_serving.apis import predict_pb2

        from serving.gateway.tensors import string_tensor, to_numpy

        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.version.value = version
        request.model_spec.signature_name = signature
        request.inputs["image_bytes"].CopyFrom(string_tensor(pngs))
        started = time.monotonic()
        try:
            response = self.upstream.prediction.Predict(request, timeout=timeout)
        except grpc.RpcError as exc:
            if signature == "explain" and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise GatewayError("INVALID_ARGUMENT", f"model {model} version {version} has no explain "
                                   "signature (exported before heat maps were added)", reason="no_explain") from None
            raise upstream_error(exc, model) from None
        finally:
            self.metrics.upstream_latency.observe(time.monotonic() - started)
        return {name: to_numpy(tensor) for name, tensor in response.outputs.items()}

    @staticmethod
    def _prediction(model, version, request_id, prepared, outputs, config) -> Prediction:
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        class_ids = np.asarray(outputs["class_ids"]).reshape(-1)
        names = outputs.get("class_names")
        labels = list(config.labels)
        ood = outputs.get("ood_score")
        in_dist = outputs.get("in_distribution")
        heatmaps = outputs.get("heatmap")
        items = []
        for i, (image, uids) in enumerate(prepared):
            row = probabilities[i]
            class_id = int(class_ids[i])
            name = names[i] if names is not None else labels[class_id]
            name = name.decode() if isinstance(name, bytes) else str(name)
            label_names = labels if len(labels) == len(row) else [str(k) for k in range(len(row))]
            inside = bool(in_dist.reshape(-1)[i]) if in_dist is not None else None
            items.append(ItemResult(
                class_name=None if inside is False else name, confidence=float(row[class_id]),
                probabilities={label_names[k]: float(p) for k, p in enumerate(row)},
                ood_score=float(ood.reshape(-1)[i]) if ood is not None else None, in_distribution=inside,
                heatmap=np.asarray(heatmaps[i], dtype=np.float32) if heatmaps is not None else None,
                png=image.png, dicom_uids=uids))
        return Prediction(model=model, version=int(version), items=items, request_id=request_id, outputs=outputs)

    def _finish(self, record: dict, start: float, outcome: str, error: GatewayError | None = None) -> None:
        latency = time.monotonic() - start
        record["latency_ms"] = round(latency * 1000, 2)
        record["outcome"] = outcome
        if error is not None:
            record["error"] = error.message
            if error.reason:
                record["limit"] = error.reason
        try:
            self.audited(record)
        except GatewayError as failed:  # counted as what the client gets: a storage refusal
            self.metrics.request(record["door"], None, None, failed.code, latency, failed.reason)
            raise
        self.metrics.request(record["door"], record["model"] if record["version"] is not None else None,
                             record["version"], outcome, latency, error.reason if error else None)

    def _summarise(self) -> None:
        """Request summaries and class/confidence/drift metrics of each answered prediction, until close()."""
        from serving.gateway.metrics import summaries

        while True:
            item = self._summaries.get()
            if item is None:
                return
            prediction, pixels = item
            try:
                records = summaries(prediction, pixels)
                self.metrics.predictions(prediction.model, records)
                if self.request_log is not None:
                    self.request_log.write(records)
            except Exception:  # noqa: BLE001 - reported, never raised: the prediction was already answered
                log.exception("could not log or measure a prediction of %s", prediction.model)

    def access(self, principal: Principal, model: str, what: str, door: str, client: str | None,
               outcome: str, error: GatewayError | None = None) -> None:
        """Audit a metadata or status read of a model."""
        self.audited({"event": what, "door": door, "identity": principal.identity, "via": principal.via,
                      "client": client, "model": model, "outcome": outcome,
                      **({"error": error.message} if error else {})})

    def close(self) -> None:
        self._summaries.put(None)  # the summaries already queued are written first
        self._summariser.join(timeout=30)
        self.decoders.close()
        self.upstream.close()
        self.transport_refusals.close()
        self.audit.close()
