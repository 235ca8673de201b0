"""The REST door: TF Serving's REST API (api_rest.md) on FastAPI + uvicorn, plus the Prometheus scrape path.

GET  /v1/models/M[/versions/V | /labels/L][/metadata]    status / signature defs (forwarded upstream)
POST /v1/models/M[/versions/V | /labels/L]:predict       {"instances": [{"b64": ...}, ...]} (row) or
                                                         {"inputs": {"image_bytes": [...]}} (column); images may be
                                                         DICOM, PNG, JPEG or TIFF; "signature_name": "explain" asks
                                                         for heat maps
GET  /monitoring/prometheus/metrics                      scope metrics:read
Request headers: Authorization: Bearer <JWT> (or a client certificate), X-Request-Id, X-Request-Timeout (seconds).
Errors are {"error": "..."} with the status of core.ERRORS. Other doors (DICOMweb, the viewer) are routers that
`build_app` includes when their modules exist (DOORS): `app.include_router(module.build_router(gateway))`.

Transport limits live here because only the transport sees them: the body size is enforced while the body streams
(and from Content-Length before it does), and `GatewayH11Protocol` gives every request a deadline for its headers
and body (a slow client is answered 408 and closed), on top of uvicorn's keep-alive timeout and h11's header size cap.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the endpoints' (string) annotations here

from medpipe.ids import sanitize_request_id
from serving.gateway.core import GatewayError, Principal

ROUTE = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d{1,19})|/labels/(?P<label>[^/:]+))?"
                   r"(?P<tail>/metadata|:predict)?$")
METRICS_PATH = "/monitoring/prometheus/metrics"


def error_response(exc: GatewayError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": exc.message}, status_code=exc.http_status)


# ---- body parsing (pure) ---------------------------------------------------------------------------------------
def _image(value, index: int) -> bytes:
    if isinstance(value, dict) and "image_bytes" in value and len(value) == 1:
        value = value["image_bytes"]
    if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise GatewayError("INVALID_ARGUMENT", f'instance {index} must be {{"b64": "<base64 image>"}} '
                           '(or {"image_bytes": {"b64": ...}})')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError("INVALID_ARGUMENT", f"instance {index} is not valid base64") from None


def parse_predict(raw: bytes, max_images: int) -> tuple[list[bytes], str, bool]:
    """A :predict body -> (images, signature name, row format). The image count is checked before any decode."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise GatewayError("INVALID_ARGUMENT", "the body nests too deeply to be a predict request") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError("INVALID_ARGUMENT", f"the body is not valid JSON ({type(exc).__name__} at "
                           f"character {getattr(exc, 'pos', '?')})") from None
    if not isinstance(body, dict):
        raise GatewayError("INVALID_ARGUMENT", "the body must be a JSON object")
    signature = body.get("signature_name", "serving_default")
    if not isinstance(signature, str) or signature not in ("serving_default", "explain", ""):
        raise GatewayError("INVALID_ARGUMENT", 'signature_name must be "serving_default" or "explain"')
    if ("instances" in body) == ("inputs" in body):
        raise GatewayError("INVALID_ARGUMENT", 'the request must have exactly one of "instances" (row format) '
                           'or "inputs" (column format)')
    row = "instances" in body
    values = body["instances"] if row else body["inputs"]
    if not row and isinstance(values, dict):
        if set(values) != {"image_bytes"}:
            raise GatewayError("INVALID_ARGUMENT", 'the only input is "image_bytes"')
        values = values["image_bytes"]
    if not isinstance(values, list):
        raise GatewayError("INVALID_ARGUMENT", "instances / inputs must be a list of images")
    if len(values) > max_images:
        raise GatewayError("INVALID_ARGUMENT", f"{len(values)} images in one request; send at most {max_images} "
                           "per request", reason="max_images")
    return [_image(v, i) for i, v in enumerate(values)], signature or "serving_default", row


def _jsonable(name: str, array: np.ndarray):
    if array.dtype == object:
        if name.endswith("_bytes"):
            return [{"b64": base64.b64encode(v).decode()} for v in array.reshape(-1)]
        return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b),
                            otypes=[object])(array).tolist()
    return array.tolist()


UID_KEYS = {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
            "SOPInstanceUID": "sop_instance_uid"}


def format_prediction(prediction, row: bool) -> dict:
    """TF Serving's answer shape (all model outputs), plus the version and, for DICOM inputs, their UIDs."""
    columns = {name: _jsonable(name, np.asarray(value)) for name, value in prediction.outputs.items()}
    if any(item.dicom_uids for item in prediction.items):
        for key, out in UID_KEYS.items():
            columns[out] = [(item.dicom_uids or {}).get(key, "") for item in prediction.items]
    answer = {"model_version": str(prediction.version), "request_id": prediction.request_id}
    if not row:
        return {"outputs": columns, **answer}
    count = len(prediction.items)
    return {"predictions": [{k: v[i] for k, v in columns.items()} for i in range(count)], **answer}


# ---- transport limits -------------------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware: refuse a body over `max_bytes` from its Content-Length, or while it streams."""

    def __init__(self, app, max_bytes: int, metrics=None):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # h11 has already refused a non-numeric one
            if int(length) <= self.DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive, more=True)
            return await self._refuse(send, int(length))
        received = 0
        started = False
        more = True

        async def limited_receive():
            nonlocal received, more
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._drain(receive, more, received)
                await self._refuse(send, received)

    DRAIN_FACTOR = 4

    async def _drain(self, receive, more: bool, received: int = 0) -> None:
        """Read (and drop) the rest of a body a little over the limit, so that a client that sends its whole body
        before reading gets the 413 instead of a reset connection. A far larger body is not read: the connection
        closes (the per-request read deadline bounds a slow one either way)."""
        while more and received <= self.DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, send, size: int):
        if self.metrics is not None:
            self.metrics.limits.labels("body_size").inc()
        body = json.dumps({"error": f"the request body ({size} bytes or more) exceeds the gateway's "
                                    f"{self.max_bytes}-byte limit; send fewer or smaller images per request"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def make_protocol(header_timeout_s: float, metrics=None):
    """uvicorn's h11 protocol with a per-request read deadline and the verified client certificate's subject."""
    import functools

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from serving.gateway.auth import subject_of

    timeout_body = json.dumps({"error": f"the request did not arrive within {header_timeout_s:g} s"}).encode()

    async def with_subject(app, subject, scope, receive, send):
        scope["medpipe.client_subject"] = subject
        return await app(scope, receive, send)

    class GatewayH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                self.app = functools.partial(with_subject, self.app, subject_of(der))
            self._read_timer = None
            self._arm()

        def _arm(self):
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(header_timeout_s, self._read_timeout)

        def _disarm(self):
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def data_received(self, data):
            self._arm()  # the clock runs from the first byte of a request until it is complete
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                self._disarm()

        def on_response_complete(self):
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _read_timeout(self):
            self._read_timer = None
            if self.transport.is_closing() or self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
                return
            if metrics is not None:
                metrics.limits.labels("read_timeout").inc()
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: " + str(len(timeout_body)).encode()
                                     + b"\r\n\r\n" + timeout_body)
            self.transport.close()

    return GatewayH11Protocol


# ---- the app ----------------------------------------------------------------------------------------------------
def build_app(gateway):
    """The gateway's FastAPI app: TF Serving's REST routes and the metrics path. Other doors add routers."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="medpipe gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, max_bytes=gateway.config.limits.max_body_bytes, metrics=gateway.metrics)
    # a refusal raised while auditing another refusal (the audit disk is full: 507) is still the table's answer
    app.add_exception_handler(GatewayError, lambda request, exc: error_response(exc))

    def client_of(request: Request) -> str | None:
        return request.client.host if request.client else None

    def principal_of(request: Request) -> Principal:
        return gateway.authenticate(request)

    @app.get(METRICS_PATH)
    async def metrics(request: Request):
        try:
            principal = await run_in_threadpool(principal_of, request)
        except GatewayError as exc:
            return error_response(exc)  # audited by authenticate
        if "metrics:read" not in principal.scopes:
            exc = GatewayError("PERMISSION_DENIED", f"{principal.identity} may not read metrics (needs scope "
                               "metrics:read)")
            gateway.refused("rest", client_of(request), principal, exc, event="metrics")
            return error_response(exc)
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models/{spec:path}")
    async def model_get(spec: str, request: Request):
        return await run_in_threadpool(_model_get, spec, request)

    def _model_get(spec: str, request: Request):
        match = ROUTE.match(spec)
        if not match or match["tail"] == ":predict":
            return JSONResponse({"error": "no such route; see TF Serving's REST API (GET /v1/models/NAME"
                                 "[/versions/V|/labels/L][/metadata])"}, status_code=404)
        what = "metadata" if match["tail"] == "/metadata" else "status"
        try:
            principal = principal_of(request)
        except GatewayError as exc:
            return error_response(exc)
        from serving.gateway.grpc_door import model_metadata, model_status

        version = int(match["version"]) if match["version"] else None
        try:
            gateway_check(gateway, principal, match["name"], match["label"])
            if what == "metadata":
                body = model_metadata(gateway, match["name"], version, match["label"], rest=True)
            else:
                body = model_status(gateway, match["name"], version, match["label"], rest=True)
        except GatewayError as exc:
            gateway.access(principal, match["name"] if _plain(match["name"]) else None, what, "rest",
                           client_of(request), exc.code, exc)
            return error_response(exc)
        gateway.access(principal, match["name"], what, "rest", client_of(request), "OK")
        return JSONResponse(body)

    @app.post("/v1/models/{spec:path}")
    async def model_post(spec: str, request: Request):
        match = ROUTE.match(spec)
        if not match or match["tail"] != ":predict":
            return JSONResponse({"error": "no such route; POST /v1/models/NAME[/versions/V|/labels/L]:predict"},
                                status_code=404)
        try:
            principal = await run_in_threadpool(principal_of, request)
        except GatewayError as exc:
            return error_response(exc)
        raw = await request.body()
        return await run_in_threadpool(_predict, match, raw, principal, request)

    def _predict(match, raw: bytes, principal: Principal, request: Request):
        client = client_of(request)
        request_id = request.headers.get("x-request-id")
        try:
            images, signature, row = parse_predict(raw, gateway.config.limits.max_images)
        except GatewayError as exc:
            gateway.refused("rest", client, principal, exc, model=match["name"] if _plain(match["name"]) else None,
                            request_id=sanitize_request_id(request_id), event="predict")
            return error_response(exc)
        try:
            prediction = gateway.predict(
                principal, match["name"], images, version=int(match["version"]) if match["version"] else None,
                label=match["label"], explain=signature == "explain", request_id=request_id,
                deadline_s=_deadline(request.headers.get("x-request-timeout")), door="rest", client=client)
        except GatewayError as exc:
            return error_response(exc)
        return JSONResponse(format_prediction(prediction, row))

    for door in DOORS:  # the routers of the other doors, when their modules are present
        try:
            module = importlib.import_module(door)
        except ModuleNotFoundError as exc:
            if exc.name != door:
                raise  # the door exists but is broken: fail loudly
            continue
        app.include_router(module.build_router(gateway))
    return app


# Other doors, each a module with build_router(gateway) -> fastapi.APIRouter (the PACS and viewer issues).
DOORS = ("serving.gateway.dicomweb", "serving.viewer")


def _plain(name: str) -> bool:
    from serving.gateway.core import MODEL_NAME

    return bool(MODEL_NAME.match(name or ""))


def _deadline(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def gateway_check(gateway, principal: Principal, model: str, label: str | None) -> None:
    from serving.gateway.core import check_model_spec

    check_model_spec(model, label)
    gateway.authorize(principal, model)
