"""The gRPC door: TF Serving's PredictionService (Predict, GetModelMetadata) and ModelService.GetModelStatus.

An app written against TF Serving with the official `tensorflow_serving.apis` stubs works unchanged: it sends
`image_bytes` (DICOM, PNG, JPEG or TIFF) and reads `probabilities`, `class_ids`, `class_names` (and, when the model
has them, `ood_score`, `in_distribution`, `heatmap`), plus `study_instance_uid`, `series_instance_uid`,
`sop_instance_uid` for DICOM inputs. There is no HandleReloadConfigRequest (UNIMPLEMENTED): configuration reaches
TF Serving only from the publisher, inside the network. Credentials: the client certificate (mTLS) or
`authorization: Bearer <JWT>` metadata; `x-request-id` metadata names the request; the call's deadline is
propagated upstream.
"""

from __future__ import annotations

import functools
from concurrent import futures

import grpc

from serving.gateway.audit import AuditUnavailable
from serving.gateway.core import GatewayError, audit_refusal, check_model_spec
from serving.listen import bind_grpc, spec_version

# gRPC's transport refuses messages over this multiple of max_body_mb before the gateway sees them (unaudited);
# between 1x and this, the gateway refuses them itself, audited. Bounds what one call can buffer.
OVERSIZE_FACTOR = 2
STATE_NAMES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


def _spec_request(request_type, model: str, version: int | None, label: str | None):
    request = request_type()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    elif label:
        request.model_spec.version_label = label
    return request


def model_status(gateway, model: str, version: int | None, label: str | None, rest: bool = False,
                 request=None, timeout: float | None = None):
    from tensorflow_serving.apis import get_model_status_pb2

    from serving.gateway.core import upstream_error

    request = request or _spec_request(get_model_status_pb2.GetModelStatusRequest, model, version, label)
    try:
        response = gateway.upstream.models.GetModelStatus(request, timeout=gateway.deadline(timeout))
    except grpc.RpcError as exc:
        raise upstream_error(exc, model) from None
    if not rest:
        return response
    return {"model_version_status": [
        {"version": str(s.version), "state": STATE_NAMES.get(s.state, "UNKNOWN"),
         "status": {"error_code": "OK" if not s.status.error_code else "UNKNOWN", "error_message": ""}}
        for s in response.model_version_status]}


def model_metadata(gateway, model: str, version: int | None, label: str | None, rest: bool = False,
                   request=None, timeout: float | None = None):
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    from serving.gateway.core import upstream_error

    if request is None:
        request = _spec_request(get_model_metadata_pb2.GetModelMetadataRequest, model, version, label)
        request.metadata_field.append("signature_def")
    try:
        response = gateway.upstream.prediction.GetModelMetadata(request, timeout=gateway.deadline(timeout))
    except grpc.RpcError as exc:
        raise upstream_error(exc, model) from None
    if not rest:
        return response
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    return {"model_spec": {"name": model, "signature_name": "", "version": str(response.model_spec.version.value)},
            "metadata": {"signature_def": json_format.MessageToDict(signature_map)}}


def _metadata(context, key: str) -> str | None:
    for name, value in context.invocation_metadata():
        if name == key:
            return value
    return None


def make_servicers(gateway):
    from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

    from serving.gateway.tensors import from_numpy, image_batch

    def abort(context, exc: GatewayError):
        context.abort(exc.grpc_status, exc.message)

    def answering(method):
        """A refusal raised while auditing (the audit trail cannot be written) is answered, never a bare UNKNOWN."""

        @functools.wraps(method)
        def wrapper(self, request, context):
            try:
                return method(self, request, context)
            except GatewayError as exc:
                abort(context, exc)
            except AuditUnavailable:
                abort(context, audit_refusal())
        return wrapper

    limit = gateway.config.limits.max_body_bytes

    def check_size(request, context) -> None:
        """gRPC's transport takes messages up to OVERSIZE_FACTOR x the limit so that the gateway itself refuses (and
        audits) one over the limit; only a message beyond that is refused by the transport before any code runs."""
        size = request.ByteSize()
        if size > limit:
            message = (f"the request message ({size} bytes) exceeds the gateway's {limit}-byte limit; send fewer or "
                       "smaller images per request")
            gateway.metrics.limits.labels("body_size").inc()
            gateway.transport_refusals.refused("grpc", "body_size", context.peer(), message)
            abort(context, GatewayError("RESOURCE_EXHAUSTED", message, reason="body_size"))

    def principal(context):
        try:
            return gateway.authenticate_grpc(context)
        except GatewayError as exc:
            abort(context, exc)

    def remaining(context) -> float | None:
        left = context.time_remaining()
        return left if left is not None and left < 1e8 else None

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @answering
        def Predict(self, request, context):
            check_size(request, context)
            who = principal(context)
            model = request.model_spec.name
            version, label = spec_version(request.model_spec)
            signature = request.model_spec.signature_name or "serving_default"
            client = context.peer()
            try:
                if signature not in ("serving_default", "explain"):
                    raise GatewayError("INVALID_ARGUMENT", 'signature_name must be "serving_default" or "explain"')
                if set(request.inputs) != {"image_bytes"}:
                    raise GatewayError("INVALID_ARGUMENT", "the only input is image_bytes (a DT_STRING tensor of "
                                       "encoded DICOM/PNG/JPEG/TIFF images)")
                images = image_batch(request.inputs["image_bytes"], gateway.config.limits.max_images)
            except GatewayError as exc:
                from medpipe.ids import sanitize_request_id
                from serving.gateway.core import MODEL_NAME

                gateway.refused("grpc", client, who, exc, model=model if MODEL_NAME.match(model or "") else None,
                                request_id=sanitize_request_id(_metadata(context, "x-request-id")), event="predict")
                abort(context, exc)
            try:
                prediction = gateway.predict(who, model, images, version=version, label=label,
                                             explain=signature == "explain",
                                             request_id=_metadata(context, "x-request-id"),
                                             deadline_s=remaining(context), door="grpc", client=client)
            except GatewayError as exc:
                abort(context, exc)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = model
            response.model_spec.version.value = prediction.version
            response.model_spec.signature_name = signature
            outputs = dict(prediction.outputs)
            if any(item.dicom_uids for item in prediction.items):
                import numpy as np

                for key, name in (("StudyInstanceUID", "study_instance_uid"),
                                  ("SeriesInstanceUID", "series_instance_uid"), ("SOPInstanceUID", "sop_instance_uid")):
                    outputs[name] = np.array([(item.dicom_uids or {}).get(key, "").encode()
                                              for item in prediction.items], dtype=object)
            wanted = list(request.output_filter) or list(outputs)
            for key in wanted:
                if key not in outputs:
                    abort(context, GatewayError("INVALID_ARGUMENT", f"output_filter names no output {key}"))
                response.outputs[key].CopyFrom(from_numpy(outputs[key]))
            context.set_trailing_metadata((("x-request-id", prediction.request_id),))
            return response

        @answering
        def GetModelMetadata(self, request, context):
            return self._forward(principal(context), context, request, "metadata", model_metadata)

        def _forward(self, who, context, request, what, function):
            model = request.model_spec.name
            version, label = spec_version(request.model_spec)
            try:
                check_model_spec(model, label)
                gateway.authorize(who, model)
                response = function(gateway, model, version, label, request=request, timeout=remaining(context))
            except GatewayError as exc:
                from serving.gateway.core import MODEL_NAME

                gateway.access(who, model if MODEL_NAME.match(model or "") else None, what, "grpc", context.peer(),
                               exc.code, exc)
                abort(context, exc)
            gateway.access(who, model, what, "grpc", context.peer(), "OK")
            return response

        def Classify(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the gateway serves Predict; Classify is not offered")

        def Regress(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the gateway serves Predict; Regress is not offered")

        def MultiInference(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the gateway serves Predict; MultiInference is not offered")

    prediction_service = PredictionService()

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @answering
        def GetModelStatus(self, request, context):
            who = principal(context)
            return prediction_service._forward(who, context, request, "status", model_status)

        def HandleReloadConfigRequest(self, request, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the gateway does not reload models: configuration reaches "
                          "TF Serving only from the publisher (medpipe publish), inside the network")

    return prediction_service, ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc


def server_options(limits, threads: int, max_connections: int | None = None) -> list[tuple[str, int]]:
    """gRPC core channel arguments (public, grpc_types.h) that bound the door's sockets like the REST door's:
    connections at once, a handshake deadline, idle connections closed, streams per connection, keepalive pings."""
    return [("grpc.max_receive_message_length", OVERSIZE_FACTOR * limits.max_body_bytes),
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.max_allowed_incoming_connections", max_connections or limits.max_connections),
            ("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(max(limits.idle_timeout_s, 60) * 1000)),
            ("grpc.max_concurrent_streams", threads * 2),
            ("grpc.keepalive_time_ms", 120_000),  # the server pings a silent client every 2 min ...
            ("grpc.keepalive_timeout_ms", 20_000),  # ... and drops it when no answer comes within 20 s
            ("grpc.http2.min_ping_interval_without_data_ms", 30_000),  # clients may not ping faster ...
            ("grpc.http2.max_ping_strikes", 2)]  # ... than this (twice: GOAWAY)


def start_grpc(gateway, host: str, port: int, tls: tuple | None, client_ca: str | None, threads: int = 16,
               max_connections: int | None = None):
    """-> (server, bound port). With --client-ca, gRPC requires a client certificate at the TLS handshake."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         maximum_concurrent_rpcs=threads * 8,
                         options=server_options(gateway.config.limits, threads, max_connections))
    prediction, models, prediction_grpc, model_grpc = make_servicers(gateway)
    prediction_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_grpc.add_ModelServiceServicer_to_server(models, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = bind_grpc(server, host, port, tls, client_ca)
    server.start()
    return server, bound
