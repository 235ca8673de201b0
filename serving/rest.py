"""TF Serving's REST API (api_rest.md) on Starlette + uvicorn, plus the Prometheus scrape path.

GET  /v1/models/M[/versions/V | /labels/L]            status
GET  /v1/models/M[...]/metadata                        signature defs
POST /v1/models/M[...]:predict                         {"instances": [...]} (row) or {"inputs": ...} (column)
GET  /monitoring/prometheus/metrics
Binary values travel as {"b64": "..."}; errors are {"error": "..."} with TF Serving's HTTP mapping.

HTTP parsing is h11's (through uvicorn): a malformed request line, header or Content-Length gets a 400. TLS
handshakes run on the event loop (asyncio, 60 s handshake timeout), so an idle TLS client blocks nobody. A request
must arrive whole within `read_timeout`: headers (ReadTimeoutProtocol) and body (read_body) each get a 408, and an
idle keep-alive connection is closed after KEEP_ALIVE_SECONDS. Handlers run in a thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time

import grpc
import h11
import numpy as np
from uvicorn.protocols.http.h11_impl import H11Protocol

from medpipe.errors import ConfigError
from serving.listen import bind_rest
from serving.manager import DEFAULT_SIGNATURE, ServingError

log = logging.getLogger("medpipe.serve")

READ_TIMEOUT_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5
ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d{1,18})|/labels/(?P<label>[^/:]+))?"
                   r"(?P<tail>/metadata|:predict|:classify)?$")
HTTP_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DEADLINE_EXCEEDED: 408,
}
NO_ROUTE = "no such route; TF Serving's REST API is /v1/models/NAME[/versions/V | /labels/L][/metadata | :predict]"


def _bad(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode_value(value):
    """JSON value -> Python value with {"b64": ...} turned into bytes (recursively)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise _bad(f"invalid base64 value: {exc}") from exc
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def to_array(values, spec) -> np.ndarray:
    """A JSON batch for one input -> numpy with the signature's dtype (strings stay object arrays of bytes)."""
    import tensorflow as tf

    if spec.dtype == tf.string:
        flat = np.array(values, dtype=object)
        return np.vectorize(lambda v: v if isinstance(v, bytes) else str(v).encode(), otypes=[object])(flat) \
            if flat.size else flat
    try:
        array = np.array(values, dtype=spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError) as exc:
        raise _bad(f"values cannot be read as {spec.dtype.name}: {exc}") from exc
    return array


def parse_predict_body(body: dict, signature) -> tuple[dict[str, np.ndarray], bool]:
    """-> (inputs, row_format). Row: instances; column: inputs; never both (TF Serving's rule)."""
    if ("instances" in body) == ("inputs" in body):
        raise _bad('the request must have exactly one of "instances" (row format) or "inputs" (column format)')
    names = list(signature.inputs)
    if "instances" in body:
        instances = decode_value(body["instances"])
        if not isinstance(instances, list):
            raise _bad('"instances" must be a list')
        if instances and isinstance(instances[0], dict):
            if not all(isinstance(row, dict) for row in instances):
                raise _bad('"instances" mixes objects and values: send one object per instance')
            inputs = {}
            for key in instances[0]:
                if key not in signature.inputs:
                    raise _bad(f"unknown input {key}; the signature takes {names}")
                inputs[key] = to_array([row.get(key) for row in instances], signature.inputs[key])
            return inputs, True
        if len(names) != 1:
            raise _bad(f"the signature has several inputs {names}: send objects in instances")
        return {names[0]: to_array(instances, signature.inputs[names[0]])}, True
    columns = decode_value(body["inputs"])
    if isinstance(columns, dict):
        unknown = [k for k in columns if k not in signature.inputs]
        if unknown:
            raise _bad(f"unknown input {unknown[0]}; the signature takes {names}")
        return {k: to_array(v, signature.inputs[k]) for k, v in columns.items()}, False
    if len(names) != 1:
        raise _bad(f"the signature has several inputs {names}: send an object in inputs")
    return {names[0]: to_array(columns, signature.inputs[names[0]])}, False


def read_predict_request(raw: bytes, signatures: dict) -> tuple[str, dict[str, np.ndarray], bool]:
    """Request body -> (signature name, inputs, row format); anything unreadable is INVALID_ARGUMENT (400),
    including JSON nested too deeply for the parser and ragged or oddly typed values."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise _bad("the body is nested too deeply to be a TF Serving request") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    signature_name = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature_name, str):
        raise _bad('"signature_name" must be a string')
    signature_name = signature_name or DEFAULT_SIGNATURE
    signature = signatures.get(signature_name)
    if signature is None:
        raise _bad(f"Serving signature name: \"{signature_name}\" not found in signature def")
    try:
        inputs, row = parse_predict_body(body, signature)
    except RecursionError:
        raise _bad("the inputs are nested too deeply") from None
    except (ValueError, TypeError) as exc:  # numpy on ragged or mixed values
        raise _bad(f"the inputs cannot be read as tensors: {str(exc).splitlines()[0][:200]}") from None
    return signature_name, inputs, row


def jsonable(name: str, array: np.ndarray):
    if array.dtype == object:
        if name.endswith("_bytes"):
            return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()}, otypes=[object])(array).tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


def format_predictions(outputs: dict[str, np.ndarray], row: bool) -> dict:
    if not row:
        if len(outputs) == 1:
            return {"outputs": jsonable(*next(iter(outputs.items())))}
        return {"outputs": {k: jsonable(k, v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": jsonable(*next(iter(outputs.items())))}
    columns = {k: jsonable(k, v) for k, v in outputs.items()}
    count = len(next(iter(columns.values())))
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(count)]}


def status_json(versions) -> dict:
    return {"model_version_status": [
        {"version": str(v.number), "state": v.state,
         "status": {"error_code": "UNKNOWN" if v.error else "OK", "error_message": v.error}} for v in versions]}


class RequestTooLarge(Exception):
    pass


async def read_body(receive_stream, declared: int | None, max_bytes: int, timeout: float) -> bytes:
    """The whole body within TIMEOUT (asyncio.TimeoutError otherwise) and MAX_BYTES (RequestTooLarge). A body a
    little over the limit is drained first so the client, still sending, can read the 413."""
    async with asyncio.timeout(timeout):
        if declared is not None and declared > 8 * max_bytes:
            raise RequestTooLarge(declared)
        chunks, size = [], 0
        async for chunk in receive_stream:
            size += len(chunk)
            if size <= max_bytes:
                chunks.append(chunk)
            elif size > 8 * max_bytes:
                break
        if size > max_bytes:
            raise RequestTooLarge(size)
        return b"".join(chunks)


def build_app(service, max_bytes: int, metrics_path: str, read_timeout: float = READ_TIMEOUT_SECONDS):
    from google.protobuf import json_format
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def error(code: int, message: str, close: bool = False) -> Response:
        return JSONResponse({"error": message}, status_code=code, headers={"Connection": "close"} if close else None)

    def status_or_metadata(name: str, version: int | None, label: str | None, tail: str | None) -> dict:
        if tail == "/metadata":
            _, found = service.manager.resolve(name, version, label)
            signature_def = json.loads(json_format.MessageToJson(found.signature_def_map))
            return {"model_spec": {"name": name, "signature_name": "", "version": str(found.number)},
                    "metadata": {"signature_def": signature_def}}
        return status_json(service.manager.status(name, version, label))

    def predict(name: str, version: int | None, label: str | None, raw: bytes) -> dict:
        _, found = service.manager.resolve(name, version, label)
        signature_name, inputs, row = read_predict_request(raw, found.signatures)
        _, outputs = service.predict(name, found.number, None, signature_name, inputs, "REST")
        return format_predictions(outputs, row)

    async def models(request) -> Response:
        match = ROUTE.match(request.scope["path"])
        if match is None:
            return error(404, NO_ROUTE)
        version = int(match["version"]) if match["version"] else None
        try:
            if request.method == "GET":
                if match["tail"] not in (None, "/metadata"):
                    return error(405, f"{match['tail']} takes POST")
                return JSONResponse(await run_in_threadpool(status_or_metadata, match["name"], version,
                                                            match["label"], match["tail"]))
            if match["tail"] != ":predict":
                return error(404 if match["tail"] != "/metadata" else 405, "POST goes to /v1/models/NAME[...]:predict")
            declared = request.headers.get("content-length")
            try:
                raw = await read_body(request.stream(), int(declared) if declared else None, max_bytes, read_timeout)
            except RequestTooLarge as exc:
                return error(413, f"request of {exc.args[0]} bytes exceeds the {max_bytes}-byte limit", close=True)
            except TimeoutError:
                return error(408, f"the request body did not arrive within {read_timeout:g} s", close=True)
            except ClientDisconnect:
                return Response(status_code=400)
            return JSONResponse(await run_in_threadpool(predict, match["name"], version, match["label"], raw))
        except ServingError as exc:
            return error(HTTP_CODES.get(exc.code, 500), exc.message)
        except Exception:  # noqa: BLE001 - details to the log, never to the client
            log.exception("REST %s %s failed", request.method, match["name"])
            return error(500, "internal error of the server; its log has the details")

    async def metrics(request) -> Response:
        return PlainTextResponse(await run_in_threadpool(service.metrics.render),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request, exc: HTTPException) -> Response:
        return error(exc.status_code, NO_ROUTE if exc.status_code == 404 else str(exc.detail))

    async def internal_error(request, exc: Exception) -> Response:  # details to the log, never to the client
        log.error("REST %s failed", request.scope.get("path"), exc_info=exc)
        return error(500, "internal error of the server; its log has the details")

    return Starlette(routes=[Route(metrics_path, metrics, methods=["GET"]),
                             Route("/v1/models/{rest:path}", models, methods=["GET", "POST"])],
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers: uvicorn times out only idle keep-alive
    connections, so a client that connects and then sends nothing, or its headers one byte at a time (slow-loris,
    on the first request or any later one of a keep-alive connection), would hold a connection forever. The clock
    runs from the connection (or the first byte of a later request) until the headers are complete; past
    `read_timeout`: 408, then close. The body has its own deadline (read_body)."""

    read_timeout = READ_TIMEOUT_SECONDS
    TIMEOUT_BODY = b'{"error": "the request headers did not arrive in time"}'
    TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_deadline = None
        self._arm()

    def _arm(self) -> None:
        if self._headers_deadline is None:
            self._headers_deadline = self.loop.call_later(self.read_timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state == h11.IDLE:
            self._arm()  # bytes of a request whose headers are not complete yet
        super().data_received(data)
        if self.conn.their_state != h11.IDLE:
            self._disarm()  # the headers are in

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_timed_out(self) -> None:
        self._headers_deadline = None
        if self.conn.their_state == h11.IDLE and not self.transport.is_closing():  # headers still incomplete
            self.transport.write(self.TIMEOUT_RESPONSE)
            self.transport.close()


class RestServer:
    """uvicorn on its own thread and event loop, on a socket bound here (so a taken port is a ConfigError)."""

    def __init__(self, app, host: str, port: int, tls: tuple | None, read_timeout: float):
        import uvicorn

        self.socket = bind_rest(host, port)
        protocol = type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": read_timeout})
        config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=KEEP_ALIVE_SECONDS, server_header=False,
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="rest")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the REST server on {host}:{port} did not start; see the log above")
            time.sleep(0.01)

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


def start_rest(service, host: str, port: int, max_bytes: int, metrics_path: str, tls: tuple | None = None,
               read_timeout: float = READ_TIMEOUT_SECONDS) -> RestServer:
    return RestServer(build_app(service, max_bytes, metrics_path, read_timeout), host, port, tls, read_timeout)
