"""TF Serving's REST API (api_rest.md) on a ThreadingHTTPServer, plus the Prometheus scrape path.

GET  /v1/models/M[/versions/V | /labels/L]            status
GET  /v1/models/M[...]/metadata                        signature defs
POST /v1/models/M[...]:predict                         {"instances": [...]} (row) or {"inputs": ...} (column)
GET  /monitoring/prometheus/metrics
Binary values travel as {"b64": "..."}; errors are {"error": "..."} with TF Serving's HTTP mapping.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np

from serving.manager import DEFAULT_SIGNATURE, ServingError

ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<tail>/metadata|:predict|:classify)?$")
HTTP_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNIMPLEMENTED: 501,
}


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


def make_handler(service, max_bytes: int, metrics_path: str):
    from google.protobuf import json_format

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "medpipe-serving"

        def log_message(self, format, *args):  # noqa: A002 - access log off: requests are measured in metrics
            pass

        def _send(self, code: int, body, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: ServingError) -> None:
            self._send(HTTP_CODES.get(exc.code, 500), {"error": exc.message})

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] == metrics_path:
                return self._send(200, service.metrics.render(), "text/plain; version=0.0.4")
            match = ROUTE.match(self.path.split("?")[0])
            if not match or match["tail"] not in (None, "/metadata"):
                return self._send(404, {"error": f"no route {self.path}; see TF Serving's REST API"})
            version = int(match["version"]) if match["version"] else None
            try:
                if match["tail"] == "/metadata":
                    _, found = service.manager.resolve(match["name"], version, match["label"])
                    signature_def = json.loads(json_format.MessageToJson(found.signature_def_map))
                    return self._send(200, {"model_spec": {"name": match["name"], "signature_name": "",
                                                           "version": str(found.number)},
                                            "metadata": {"signature_def": signature_def}})
                return self._send(200, status_json(service.manager.status(match["name"], version, match["label"])))
            except ServingError as exc:
                return self._error(exc)

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_bytes:
                self.close_connection = True
                remaining = length if length <= 8 * max_bytes else 0  # drain so the client reads our answer
                while remaining > 0:
                    remaining -= len(self.rfile.read(min(remaining, 1 << 20)) or b"x" * remaining)
                return self._send(413, {"error": f"request of {length} bytes exceeds the {max_bytes}-byte limit"})
            raw = self.rfile.read(length)
            match = ROUTE.match(self.path)
            if not match or match["tail"] != ":predict":
                return self._send(404, {"error": f"no route POST {self.path}; use /v1/models/NAME:predict"})
            version = int(match["version"]) if match["version"] else None
            try:
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError as exc:
                    raise _bad(f"the body is not JSON: {exc}") from exc
                if not isinstance(body, dict):
                    raise _bad("the body must be a JSON object")
                signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
                _, found = service.manager.resolve(match["name"], version, match["label"])
                signature = found.signatures.get(signature_name)
                if signature is None:
                    raise _bad(f"Serving signature name: \"{signature_name}\" not found in signature def")
                inputs, row = parse_predict_body(body, signature)
                found, outputs = service.predict(match["name"], found.number, None, signature_name, inputs,
                                                 self.headers.get("X-Request-Id"))
                return self._send(200, format_predictions(outputs, row))
            except ServingError as exc:
                return self._error(exc)

    return Handler


def start_rest(service, host: str, port: int, max_bytes: int, metrics_path: str, tls: tuple | None = None):
    server = ThreadingHTTPServer((host, port), make_handler(service, max_bytes, metrics_path))
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="rest").start()
    return server
