"""`medpipe serve`: a TF Serving-compatible server over a model repository (gRPC 8500 + REST 8501).

Production runs the real tensorflow/serving image on the same repository; this server speaks the same API
(tensorflow_serving.apis PredictionService + ModelService, the REST routes, the Prometheus names) so clients and
publishers work unchanged against both. See docs/DESIGN.md and ../shared/notes/tf-serving-contract.md.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import signal
import threading
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from medpipe.cli import module_main
from medpipe.errors import ConfigError
from serving.batching import BatchingParameters, read_batching_config
from serving.listen import announce, bind_grpc, spec_version
from serving.manager import DEFAULT_SIGNATURE, ModelManager, ServingError, run_signature
from serving.metrics import ServerMetrics

log = logging.getLogger("medpipe.serve")
GIL_SWITCH_SECONDS = 0.0005  # Python default 0.005: see main()
STATE_CODES = {"UNKNOWN": 0, "START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


# Rows of one request. TF Serving refuses a batch over its max_batch_size; without a limit 1,000 images grew this
# server by 3.1 GB and 10,000 killed it. The gateway sends at most its limits.max_images (64), the client 16.
MAX_REQUEST_IMAGES = 256


def check_image_count(count: int, limit: int) -> None:
    """INVALID_ARGUMENT for a request of more than `limit` rows (images), checked before its tensors are built."""
    if count > limit:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"{count} images in one request; this server takes at "
                           f"most {limit} (--max-request-images): split the request")


def parse_flag_bool(text: str) -> bool:
    """TF Serving's boolean flag values (--enable_batching=true)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def rest_port(text: str) -> int | str:
    """--rest-port: a number (0: no REST, as TF Serving) or auto (a free port the OS picks, announced)."""
    if text.isdigit():
        return int(text)
    if text == "auto":
        return text
    raise argparse.ArgumentTypeError(f"expected a port number or auto, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe serve",
        description="TF Serving-compatible server: gRPC PredictionService/ModelService/health and the REST API over "
        "a model repository (REPO/NAME/<version>/), polling it for new versions. tensorflow_model_server's own flag "
        "names (--port, --rest_api_port, --model_config_file, --enable_batching=true, ...) are accepted too, so the "
        "same command line runs either server.")
    parser.add_argument("--repository", help="model repository; REPO/models.config is used when present")
    parser.add_argument("--model-config-file", "--model_config_file",
                        help="text ModelServerConfig (default: REPO/models.config, else every model folder of REPO "
                        "with the latest version)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes an unauthenticated server)")
    parser.add_argument("--grpc-port", "--port", type=int, default=8500, help="0: the OS picks a free port")
    parser.add_argument("--rest-port", "--rest_api_port", type=rest_port,
                        default=8501, help="REST + Prometheus port; 0 disables REST (TF Serving's meaning); auto: the "
                        "OS picks a free port. The bound ports are printed: 'medpipe serve: gRPC H:P REST URL'")
    parser.add_argument("--batching-config", "--batching_parameters_file",
                        help="TF Serving batching parameters file (config/serving/batching.config)")
    # one setting, two spellings: medpipe batches by default; TF Serving's flag can also switch it off
    parser.add_argument("--no-batching", dest="enable_batching", action="store_const", const=False,
                        help="run each request on its own")
    parser.add_argument("--enable_batching", type=parse_flag_bool, nargs="?", const=True, default=None,
                        metavar="true|false", help="TF Serving's flag; false is --no-batching")
    parser.add_argument("--monitoring-config", "--monitoring_config_file",
                        help="TF Serving monitoring config (prometheus path); default path "
                        "/monitoring/prometheus/metrics")
    parser.add_argument("--poll-seconds", "--model_config_file_poll_wait_seconds", type=float, default=0.5,
                        help="repository poll interval (default 0.5 s: a new version serves well within 2 s)")
    parser.add_argument("--max-request-mb", type=float, default=16.0, help="larger requests: RESOURCE_EXHAUSTED/413")
    parser.add_argument("--max-request-images", type=int, default=MAX_REQUEST_IMAGES,
                        help=f"images (batch rows) per request; more: INVALID_ARGUMENT/400 before anything is decoded "
                        f"(default {MAX_REQUEST_IMAGES})")
    parser.add_argument("--allow-reload", action="store_true",
                        help="accept ModelService.HandleReloadConfigRequest (what `medpipe publish --server` sends); "
                        "off by default: anyone who reaches the port could otherwise load any folder as a model")
    parser.add_argument("--rest-read-timeout", type=float, default=10.0,
                        help="seconds a REST client has to send a whole request (headers, then body): 408 after")
    parser.add_argument("--allow-version-labels-for-unavailable-models",
                        "--allow_version_labels_for_unavailable_models", type=parse_flag_bool, nargs="?",
                        const=True, default=False, metavar="true|false",
                        help="let a label point at a version that is not loaded yet")
    parser.add_argument("--threads", type=int, default=16, help="gRPC worker threads")
    parser.add_argument("--intra-op-threads", "--tensorflow_intra_op_parallelism", type=int, default=0,
                        help="TensorFlow threads inside one op (0 = TensorFlow's default, one per core)")
    parser.add_argument("--inter-op-threads", "--tensorflow_inter_op_parallelism", type=int, default=0,
                        help="TensorFlow threads running independent ops (0 = TensorFlow's default)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve gRPC and REST over TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    return parser


def monitoring_path(config_file: str | None) -> str:
    import re

    if not config_file:
        return "/monitoring/prometheus/metrics"
    text = Path(config_file).read_text(encoding="utf-8")
    match = re.search(r'path\s*:\s*"([^"]+)"', text)
    return match.group(1) if match else "/monitoring/prometheus/metrics"


class Service:
    """The API-independent core used by both gRPC and REST."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics, max_images: int = MAX_REQUEST_IMAGES,
                 allow_reload: bool = False):
        self.manager, self.metrics = manager, metrics
        self.max_images, self.allow_reload = max_images, allow_reload

    def predict(self, name: str, version: int | None, label: str | None, signature_name: str,
                inputs: dict[str, np.ndarray], entrypoint: str, api: str = "predict"):
        start = time.perf_counter()
        ok = False
        try:
            for array in inputs.values():
                check_image_count(int(array.shape[0]) if np.ndim(array) else 1, self.max_images)
            model, found = self.manager.resolve(name, version, label)
            outputs = run_signature(found, signature_name or DEFAULT_SIGNATURE, inputs)
            ok = True
        finally:
            self.metrics.tf.request(name, api, entrypoint, ok, time.perf_counter() - start)
        return found, outputs


# ---- gRPC ------------------------------------------------------------------------------------------------------
def to_tensor_proto(array: np.ndarray):
    """numpy -> TensorProto without tf.make_tensor_proto's generic path (~0.15 ms each, per output per request)."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    proto = tensor_pb2.TensorProto(tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = tf.string.as_datatype_enum
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    else:
        proto.dtype = tf.as_dtype(array.dtype).as_datatype_enum
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


# value fields of a TensorProto that hold the elements (a complex element takes two values)
VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "int64_val", "bool_val", "uint32_val", "uint64_val",
                "scomplex_val", "dcomplex_val", "float8_val")


def from_tensor_proto(proto, max_rows: int | None = None) -> np.ndarray:
    """TensorProto -> numpy, refusing (INVALID_ARGUMENT) a declared shape its content does not fill exactly, or of more
    than `max_rows` rows (images), before anything is allocated: tf.make_ndarray repeats the last value to fill the
    shape, so a 108-byte proto declaring 3,000 large strings would allocate gigabytes."""
    import tensorflow as tf

    def bad(message: str) -> ServingError:
        return ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed input tensor: {message}")

    if proto.tensor_shape.unknown_rank:
        raise bad("the shape has unknown rank")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise bad(f"negative dimension in shape {dims}")
    count = math.prod(dims)
    try:
        dtype = tf.dtypes.as_dtype(proto.dtype)
    except TypeError as exc:
        raise bad(f"unknown dtype {proto.dtype}") from exc
    if dtype == tf.string:
        held = len(proto.string_val)
        if proto.tensor_content:
            raise bad("string tensors carry their values in string_val, not tensor_content")
    elif dtype.is_numpy_compatible and dtype.base_dtype == dtype and dtype not in (tf.resource, tf.variant):
        itemsize = np.dtype(dtype.as_numpy_dtype).itemsize
        if proto.tensor_content:
            if len(proto.tensor_content) % itemsize:
                raise bad(f"tensor_content of {len(proto.tensor_content)} bytes is not a whole number of "
                          f"{dtype.name} values")
            held = len(proto.tensor_content) // itemsize
        else:
            held = sum(len(getattr(proto, name)) for name in VALUE_FIELDS if proto.DESCRIPTOR.fields_by_name.get(name))
            held //= 2 if dtype.is_complex else 1
    else:
        raise bad(f"dtype {dtype.name} cannot be sent in a request")
    if held != count:
        raise bad(f"the shape {dims} declares {count} values but the tensor holds {held}")
    if max_rows is not None and dims:
        check_image_count(dims[0], max_rows)
    return tf.make_ndarray(proto)


def guarded(method):
    """One error path for every RPC: ServingError -> its status code; anything else -> INTERNAL with a generic
    message (the traceback goes to the server log, never a path or function name to the client)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as exc:
            context.abort(exc.code, exc.message)
        except Exception:  # noqa: BLE001 - logged here, reported to the client without internals
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error of the server; its log has the details")
    return wrapper


def _fill_spec(target, name: str, version: int, signature_name: str) -> None:
    target.name = name
    target.version.value = version
    target.signature_name = signature_name


def make_servicers(service: Service):
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_management_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guarded
        def Predict(self, request, context):
            version, label = spec_version(request.model_spec)
            signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            inputs = {k: from_tensor_proto(v, service.max_images) for k, v in request.inputs.items()}
            found, outputs = service.predict(request.model_spec.name, version, label, signature_name, inputs, "GRPC")
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, request.model_spec.name, found.number, signature_name)
            wanted = set(request.output_filter) or set(outputs)
            for key in wanted:
                if key not in outputs:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter: no output {key}")
                response.outputs[key].CopyFrom(to_tensor_proto(outputs[key]))
            return response

        @guarded
        def Classify(self, request, context):
            """tf.Example inputs with an `image_bytes` bytes feature -> (class name, probability) per example."""
            version, label = spec_version(request.model_spec)
            examples = request.input.example_list.examples
            check_image_count(len(examples), service.max_images)
            try:
                images = np.array([ex.features.feature["image_bytes"].bytes_list.value[0] for ex in examples],
                                  dtype=object)
            except IndexError:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "Classify needs tf.Examples with an image_bytes bytes feature") from None
            found, outputs = service.predict(request.model_spec.name, version, label, DEFAULT_SIGNATURE,
                                             {"image_bytes": images}, "GRPC", api="classify")
            labels = found.preprocessing.get("labels") or [str(i) for i in range(outputs["probabilities"].shape[1])]
            response = classification_pb2.ClassificationResponse()
            _fill_spec(response.model_spec, request.model_spec.name, found.number, DEFAULT_SIGNATURE)
            for row in outputs["probabilities"]:
                result = response.result.classifications.add()
                for name, score in zip(labels, row):
                    result.classes.add(label=name, score=float(score))
            return response

        @guarded
        def GetModelMetadata(self, request, context):
            version, label = spec_version(request.model_spec)
            if list(request.metadata_field) != ["signature_def"]:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "metadata_field must be [\"signature_def\"]")
            _, found = service.manager.resolve(request.model_spec.name, version, label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(response.model_spec, request.model_spec.name, found.number, "")
            response.metadata["signature_def"].Pack(found.signature_def_map)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @guarded
        def GetModelStatus(self, request, context):
            version, label = spec_version(request.model_spec)
            versions = service.manager.status(request.model_spec.name, version, label)
            response = get_model_status_pb2.GetModelStatusResponse()
            for v in versions:
                entry = response.model_version_status.add(version=v.number, state=STATE_CODES[v.state])
                if v.error:
                    entry.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                    entry.status.error_message = v.error
            return response

        @guarded
        def HandleReloadConfigRequest(self, request, context):
            if not service.allow_reload:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "model reload is off on this server: start "
                                   "medpipe serve with --allow-reload (or let it pick up models.config by polling)")
            response = model_management_pb2.ReloadConfigResponse()
            try:
                service.manager.reload(request.config)
            except ServingError as exc:
                response.status.error_code = exc.code.value[0]
                response.status.error_message = exc.message
            return response

    return PredictionService(), ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc


def start_grpc(service: Service, host: str, port: int, threads: int, max_bytes: int, tls: tuple | None):
    """-> (server, bound port, health servicer)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", 64 * 2**20)])
    prediction, model, prediction_grpc, model_grpc = make_servicers(service)
    prediction_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_grpc.add_ModelServiceServicer_to_server(model, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("tensorflow.serving.ModelService", health_pb2.HealthCheckResponse.SERVING)  # status works
    health_reporter(health_servicer)({})  # NOT_SERVING until the manager reports its models (main)
    port = bind_grpc(server, host, port, tls)
    server.start()
    return server, port, health_servicer


def health_reporter(health_servicer):
    """-> the manager's on_state callback. gRPC health from the loaded set: each model name is a service, SERVING
    while it has an AVAILABLE version; "" and PredictionService are SERVING only when every configured model is (a
    restart with nothing loadable reports NOT_SERVING)."""
    from grpc_health.v1 import health_pb2

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    known: set[str] = set()

    def report(models: dict[str, bool]) -> None:
        for name in known - set(models):  # removed from the config
            health_servicer.set(name, not_serving)
        for name, up in models.items():
            health_servicer.set(name, serving if up else not_serving)
        known.update(models)
        overall = serving if models and all(models.values()) else not_serving
        for name in ("", "tensorflow.serving.PredictionService"):
            health_servicer.set(name, overall)

    return report


def configure_tensorflow(intra_op: int, inter_op: int) -> None:
    """Thread pools must be sized before TensorFlow runs its first op (TF Serving: --tensorflow_intra_op_parallelism)."""
    if intra_op or inter_op:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a request crosses several threads (gRPC poller, handler, batch thread); with Python's 5 ms GIL switch interval
    # a thread woken with its answer can wait behind a busy one: 0.5 ms cut the p50 gRPC overhead 0.73 -> ~0.2 ms
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    if not args.repository and not args.model_config_file:
        raise ConfigError("pass --repository REPO (or --model-config-file F)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    repository = Path(args.repository).resolve() if args.repository else None
    if repository is not None and not repository.is_dir():
        raise ConfigError(f"repository {repository} does not exist; publish a model first (medpipe publish)")
    batching = None if args.enable_batching is False else (
        read_batching_config(args.batching_config) if args.batching_config else BatchingParameters())
    configure_tensorflow(args.intra_op_threads, args.inter_op_threads)
    metrics = ServerMetrics()
    manager = ModelManager(repository, Path(args.model_config_file).resolve() if args.model_config_file else None,
                           batching, metrics, args.poll_seconds, args.allow_version_labels_for_unavailable_models)
    if args.max_request_images < 1:
        raise ConfigError(f"--max-request-images must be >= 1, not {args.max_request_images}")
    service = Service(manager, metrics, args.max_request_images, args.allow_reload)
    max_bytes = int(args.max_request_mb * 2**20)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None

    manager.start()
    grpc_server, grpc_port, health_servicer = start_grpc(service, args.host, args.grpc_port, args.threads, max_bytes,
                                                         tls)
    manager.on_state = health_reporter(health_servicer)
    manager.report()
    rest_server, rest_url = None, "off"
    if args.rest_port:
        from serving.rest import start_rest

        rest_server = start_rest(service, args.host, 0 if args.rest_port == "auto" else args.rest_port, max_bytes,
                                 monitoring_path(args.monitoring_config), tls, args.rest_read_timeout)
        rest_url = f"{'https' if tls else 'http'}://{args.host}:{rest_server.socket.getsockname()[1]}"
    # one parseable line (serving.listen): the demo, tests and benchmarks read the bound ports from it
    announce("serve", f"{args.host}:{grpc_port}", rest_url, f" batching {batching}")

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("shutting down: finishing in-flight requests")
    health_servicer.enter_graceful_shutdown()
    if rest_server is not None:
        rest_server.shutdown()
    grpc_server.stop(grace=10).wait()
    manager.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    module_main(main)
