"""The clinicians' client: `medpipe predict` and a small library over the official TF Serving stubs.

    medpipe predict --server HOST:8500 --model NAME [--label stable | --version V] [--config CONFIG] FILE...
    medpipe predict --rest http://HOST:8501 --model NAME FILE...
    medpipe predict ... --study --model-repository REPO FILE...   # + one line: the study's answer

The image size and channels come from the served model's metadata (its predict_preprocessed signature), over gRPC
or REST alike; a --config whose image size or channels differ from the model's is refused (preprocessing it would
change the answer), and one is needed only for a model that does not declare them.

Every file (DICOM, PNG, JPEG) goes through medpipe.imaging.preprocess_bytes, the host-side pipeline ingest uses, so
the server receives exactly the PNG ingest would have produced; the SavedModel decodes it in its graph. One JSON line
per file: {"file", "finding", "class", "confidence", "probabilities", "ood_score", "in_distribution",
"model_version", "request_id"}. An image the model's OOD guard flags (in_distribution false) gets
"finding": "outside intended use" and no class, confidence or probabilities; a model exported before the guard
existed answers ood_score/in_distribution null (no OOD information) and its class as before. A file that cannot be
read gets {"file", "error", "reason"} and the others continue (exit status 1). Works unchanged against the real
tensorflow/serving. With --study the files are one study, answered once more as a whole by the model's own rule
(medpipe/study.py, read from the answering version's assets): {"study": {"finding", "class", "probability",
"abnormal", "deciding_file", "excluded_files", "rule", "operating_point", "model_version", "files"}}.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from medpipe.cli import module_main
from medpipe.errors import MedpipeError, RejectedInput

SIGNATURE = "serving_default"
CHUNK = 16  # images per request
OUTSIDE_INTENDED_USE = "outside intended use"


class ServerError(MedpipeError):
    """The server could not be reached or refused the request (unknown model, bad input...)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpipe predict",
        description="Classify DICOM/PNG/JPEG files with a served model (medpipe serve or TF Serving); "
        "one JSON line per file on stdout.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM, PNG or JPEG files")
    parser.add_argument("--server", default="localhost:8500", help="gRPC HOST:PORT (default localhost:8500)")
    parser.add_argument("--rest", help="use REST at this base URL instead of gRPC, e.g. http://localhost:8501")
    parser.add_argument("--model", required=True, help="model name (ModelSpec.name)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--label", help="version label, e.g. stable or canary")
    group.add_argument("--version", type=int, help="a specific model version")
    parser.add_argument("--config", help="task config for the host-side preprocessing (default: image size and "
                        "channels from the model's metadata; a config that disagrees with them is refused)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--signature", default=SIGNATURE, help="signature name (default serving_default)")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per request (default 10)")
    parser.add_argument("--request-id", help="base x-request-id (default: a random one per request)")
    parser.add_argument("--study", action="store_true",
                        help="the files are one study: after the per-file lines, one {\"study\": ...} line decided "
                        "by the model's own study rule (needs --model-repository)")
    parser.add_argument("--model-repository", metavar="REPO",
                        help="the served model repository; the study rule is read from "
                        "REPO/MODEL/<answering version>/assets/study_rule.json")
    add_connection_options(parser)
    return parser


def study_rule_for(repository: str | None, model: str, version) -> Any:
    """The study rule of the version that answered (REPO/MODEL/VERSION/assets/study_rule.json); a clear error when
    it cannot be found: the rule belongs to the model and is never guessed."""
    from medpipe.errors import ConfigError
    from medpipe.study import RULE_FILE, load_rule

    if not repository:
        raise ConfigError("--study needs --model-repository REPO: the study rule is shipped in the model version's "
                          f"assets/{RULE_FILE}")
    if version is None:
        raise ConfigError("the server did not say which model version answered; the study rule cannot be chosen")
    rule = load_rule(Path(repository) / model / str(version))
    if rule is None:
        raise ConfigError(f"{Path(repository) / model / str(version)}: no assets/{RULE_FILE}; choose the version's "
                          "operating point with `python -m models.study_point`")
    return rule


def study_summary(lines: Sequence[dict], rule) -> dict:
    """Per-file lines of one study -> the study's answer by the model's rule (medpipe.study.decide). Files that could
    not be read take no part; files outside intended use are listed and take no part."""
    from medpipe.study import decide

    used = [line for line in lines if "error" not in line]
    if not used:
        return {"files": 0, "finding": None, "class": None, "probability": None}
    decision = decide([dict(zip(rule.labels, line.get("probabilities") or [])) for line in used],
                      [line.get("in_distribution") for line in used], rule)
    outside = decision.class_name is None
    return {"files": len(used), "finding": OUTSIDE_INTENDED_USE if outside else decision.class_name,
            "class": decision.class_name, "probability": decision.probability, "abnormal": decision.abnormal,
            "deciding_file": None if outside else used[decision.decider]["file"],
            "excluded_files": [used[i]["file"] for i in decision.excluded], "rule": decision.rule,
            "operating_point": decision.operating_point,
            "model_version": used[0].get("model_version")}


# ---- TLS, mTLS and bearer tokens (the gateway; TF Serving behind TLS) ---------------------------------------------
@dataclass(frozen=True)
class Connection:
    """How to reach a server: plain, TLS (tls_ca), mTLS (+ tls_cert, tls_key), and/or a bearer token."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None

    def channel(self, target: str):
        import grpc

        if not self.tls_ca:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            Path(self.tls_ca).read_bytes(), Path(self.tls_key).read_bytes() if self.tls_key else None,
            Path(self.tls_cert).read_bytes() if self.tls_cert else None)
        return grpc.secure_channel(target, credentials)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def ssl_context(self):
        import ssl

        if not self.tls_ca:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate: connect with TLS")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS, with --tls-key and --tls-ca)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", help="file holding a bearer token (JWT) sent as Authorization: Bearer")


def connection_from_args(args) -> Connection:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MedpipeError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise MedpipeError("--tls-cert needs --tls-ca (the CA of the server's certificate)")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MedpipeError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc
        if not token:
            raise MedpipeError(f"--token-file {args.token_file} is empty")
    return Connection(args.tls_ca, args.tls_cert, args.tls_key, token)


def _spec(request_spec, model: str, version: int | None, label: str | None, signature: str) -> None:
    request_spec.name = model
    request_spec.signature_name = signature
    if version is not None:
        request_spec.version.value = int(version)
    elif label:
        request_spec.version_label = label


def _grpc_error(exc, host: str, model: str) -> ServerError:
    import grpc

    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerError(f"cannot reach the model server at {host} ({exc.details()}); is it running? "
                           f"(medpipe serve, or TF Serving's gRPC port)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerError(f"the server at {host} did not answer within the deadline; retry or raise --deadline")
    if code == grpc.StatusCode.NOT_FOUND:
        return ServerError(f"the server at {host} does not serve that model/version/label of {model!r}: "
                           f"{exc.details()}")
    return ServerError(f"the server at {host} answered {code.name}: {exc.details()}")


def predict_images(host: str, model: str, images: Sequence[bytes], version: int | None = None,
                   label: str | None = None, signature: str = SIGNATURE, deadline: float = 10.0,
                   request_id: str | None = None, channel=None, connection: Connection | None = None) -> list[dict]:
    """Encoded PNG/JPEG images -> one dict per image (class, confidence, probabilities, model_version,
    request_id) from one gRPC Predict call with the official stubs. Raises ServerError with a clear message."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    _spec(request.model_spec, model, version, label, signature)
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    request_id = request_id or uuid.uuid4().hex
    connection = connection or Connection()
    own = channel is None
    channel = channel or connection.channel(host)
    try:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=deadline, metadata=[("x-request-id", request_id), *connection.metadata()])
    except grpc.RpcError as exc:
        raise _grpc_error(exc, host, model) from exc
    finally:
        if own:
            channel.close()
    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    return rows(outputs, response.model_spec.version.value, request_id)


def predict_images_rest(url: str, model: str, images: Sequence[bytes], version: int | None = None,
                        label: str | None = None, signature: str = SIGNATURE, deadline: float = 10.0,
                        request_id: str | None = None, connection: Connection | None = None) -> list[dict]:
    """The same over TF Serving's REST API (row format, b64 values)."""
    import urllib.error
    import urllib.request

    import numpy as np

    path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else
                                     f"/labels/{label}" if label else "")
    body = json.dumps({"signature_name": signature,
                       "instances": [{"b64": base64.b64encode(i).decode()} for i in images]}).encode()
    request_id = request_id or uuid.uuid4().hex
    connection = connection or Connection()
    auth = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
    context = connection.ssl_context()
    request = urllib.request.Request(url.rstrip("/") + path + ":predict", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Id": request_id, **auth})
    try:
        with urllib.request.urlopen(request, timeout=deadline, context=context) as response:
            predictions = json.load(response)["predictions"]
        status_request = urllib.request.Request(url.rstrip("/") + path, headers=auth)
        with urllib.request.urlopen(status_request, timeout=deadline, context=context) as response:
            status = json.load(response)["model_version_status"]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ServerError(f"the server at {url} answered HTTP {exc.code} for {model!r}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"cannot reach the model server at {url} ({exc}); is it running?") from exc
    # REST predictions do not carry the version: the status route of the same spec names it
    available = [int(s["version"]) for s in status if s["state"] == "AVAILABLE"]
    outputs = {key: np.array([p[key] for p in predictions]) for key in predictions[0]}
    outputs["class_names"] = np.array([str(n).encode() for n in outputs["class_names"]], dtype=object)
    return rows(outputs, max(available) if available else None, request_id)


def rows(outputs: dict, model_version: int | None, request_id: str) -> list[dict]:
    """Served outputs -> one dict per image. ood_score/in_distribution are optional outputs (None when the model
    predates them); an image outside the intended use gets no finding."""
    from serving.metrics import request_ids

    probabilities = outputs["probabilities"]
    ids = request_ids(request_id, len(probabilities))
    scores, flags = outputs.get("ood_score"), outputs.get("in_distribution")
    result = []
    for i, probs in enumerate(probabilities):
        class_id = int(outputs["class_ids"][i])
        name = outputs["class_names"][i]
        name = name.decode() if isinstance(name, bytes) else str(name)
        in_distribution = None if flags is None else bool(flags[i])
        row = {"finding": name, "class": name, "confidence": float(probs[class_id]),
               "probabilities": [float(p) for p in probs],
               "ood_score": None if scores is None else float(scores[i]), "in_distribution": in_distribution,
               "model_version": model_version, "request_id": ids[i]}
        if in_distribution is False:
            row.update(finding=OUTSIDE_INTENDED_USE, **{"class": None, "confidence": None, "probabilities": None})
        result.append(row)
    return result


def _shape_of(signature_map, model: str) -> tuple[int, int, int] | None:
    """(image size, channels, classes) from the predict_preprocessed signature, or None when the model has none."""
    signature = signature_map.signature_def.get("predict_preprocessed")
    if signature is None or "images" not in signature.inputs:
        return None
    dims = [d.size for d in signature.inputs["images"].tensor_shape.dim]
    classes = signature.outputs["probabilities"].tensor_shape.dim[-1].size
    if len(dims) != 4 or dims[1] <= 0 or dims[3] <= 0:
        return None
    return dims[1], dims[3], classes


def model_shape(model: str, version: int | None, label: str | None, deadline: float, server: str | None = None,
                rest: str | None = None, connection: Connection | None = None) -> tuple[int, int, int] | None:
    """(image size, channels, classes) the served model declares, over REST (GET .../metadata) or gRPC
    (GetModelMetadata); None when it declares none. Raises ServerError when the server cannot answer."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    signature_map = get_model_metadata_pb2.SignatureDefMap()
    if rest:
        import urllib.error
        import urllib.request

        from google.protobuf import json_format

        path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else
                                         f"/labels/{label}" if label else "") + "/metadata"
        connection = connection or Connection()
        auth = {"Authorization": f"Bearer {connection.token}"} if connection.token else {}
        try:
            request = urllib.request.Request(rest.rstrip("/") + path, headers=auth)
            with urllib.request.urlopen(request, timeout=deadline, context=connection.ssl_context()) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ServerError(f"the server at {rest} answered HTTP {exc.code} for {model!r}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"cannot reach the model server at {rest} ({exc}); is it running?") from exc
        signature_def = (body.get("metadata") or {}).get("signature_def") or {}
        signature_def = {k: v for k, v in signature_def.items() if not k.startswith("@")}  # an Any's type URL
        json_format.ParseDict(signature_def, signature_map, ignore_unknown_fields=True)
        return _shape_of(signature_map, model)
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    _spec(request.model_spec, model, version, label, "")
    connection = connection or Connection()
    with connection.channel(server) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
                request, timeout=deadline, metadata=connection.metadata())
        except grpc.RpcError as exc:
            raise _grpc_error(exc, server, model) from exc
    response.metadata["signature_def"].Unpack(signature_map)
    return _shape_of(signature_map, model)


def config_for_model(model: str, shape: tuple[int, int, int] | None, config_path: str | None = None,
                     overrides: Sequence[str] = ()):
    """The preprocessing config: the model's own size and channels; a --config must agree with them."""
    from medpipe.config import config_from_dict, load_config

    if config_path:
        config = load_config(config_path, overrides)
        if shape is None:
            print(f"medpipe predict: model {model} does not declare its image size; using {config_path} unchecked",
                  file=sys.stderr)
        elif (config.image.size, config.image.channels) != shape[:2]:
            raise MedpipeError(
                f"--config {config_path} preprocesses to {config.image.size}x{config.image.size} with "
                f"{config.image.channels} channel(s), but model {model} expects {shape[0]}x{shape[0]} with "
                f"{shape[1]}; its answers would differ from the model's own. Drop --config (the model's metadata "
                f"is used) or pass the config the model was trained with")
        return config
    if shape is None:
        raise MedpipeError(f"model {model} has no predict_preprocessed signature to read the image size from; "
                           "pass --config with the model's task config")
    size, channels, classes = shape
    return config_from_dict({"name": model, "task": "multiclass", "labels": [str(i) for i in range(classes)],
                             "image": {"size": size, "channels": channels}}, origin=f"metadata of {model}")


def config_from_metadata(host: str, model: str, version: int | None, label: str | None, deadline: float,
                         connection: Connection | None = None, rest: str | None = None):
    """No --config: the image size and channels from the served predict_preprocessed signature's input shape."""
    return config_for_model(model, model_shape(model, version, label, deadline, server=host, rest=rest,
                                               connection=connection))


def prepare(paths: Sequence[str], config) -> Iterator[tuple[str, bytes | None, dict | None]]:
    """(file, png bytes, None) or (file, None, error line) per path, in order."""
    from medpipe.imaging import preprocess_bytes

    for path in paths:
        try:
            data = Path(path).read_bytes()
            yield path, preprocess_bytes(data, config).png, None
        except RejectedInput as exc:
            yield path, None, {"file": path, "error": f"cannot use this file: {exc.detail or exc.reason}",
                               "reason": exc.reason}
        except OSError as exc:
            yield path, None, {"file": path, "error": f"cannot read the file: {exc.strerror or exc}",
                               "reason": "unreadable"}


def predict_files(paths: Sequence[str], config, model: str, server: str | None = None, rest: str | None = None,
                  version: int | None = None, label: str | None = None, signature: str = SIGNATURE,
                  deadline: float = 10.0, request_id: str | None = None,
                  connection: Connection | None = None) -> Iterator[dict]:
    """One dict per file, in order: a prediction, or an error line for a file that cannot be used."""
    import grpc

    pending: list[tuple[str, bytes]] = []
    connection = connection or Connection()
    channel = None if rest else connection.channel(server)
    chunks = [0]

    def flush():
        images = [png for _, png in pending]
        # a caller's id names the whole call: later requests of it get -r<n> so ids never repeat
        rid = request_id and (request_id if chunks[0] == 0 else f"{request_id}-r{chunks[0]}")
        chunks[0] += 1
        if rest:
            results = predict_images_rest(rest, model, images, version, label, signature, deadline, rid,
                                          connection=connection)
        else:
            results = predict_images(server, model, images, version, label, signature, deadline, rid,
                                     channel=channel, connection=connection)
        lines = [{"file": path, **result} for (path, _), result in zip(pending, results)]
        pending.clear()
        return lines

    try:
        for path, png, error in prepare(paths, config):
            if error is not None:
                yield from flush() if pending else []
                yield error
                continue
            pending.append((path, png))
            if len(pending) >= CHUNK:
                yield from flush()
        if pending:
            yield from flush()
    finally:
        if channel is not None:
            channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connection = connection_from_args(args)
    shape = model_shape(args.model, args.version, args.label, args.deadline, server=args.server, rest=args.rest,
                        connection=connection)
    config = config_for_model(args.model, shape, args.config, args.overrides)
    failed = 0
    lines = []
    for line in predict_files(args.files, config, args.model, args.server, args.rest, args.version, args.label,
                              args.signature, args.deadline, args.request_id, connection):
        failed += "error" in line
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.study:
        answered = next((line.get("model_version") for line in lines if "error" not in line), args.version)
        rule = study_rule_for(args.model_repository, args.model, answered)
        print(json.dumps({"study": study_summary(lines, rule)}), flush=True)
    if failed:
        print(f"medpipe predict: {failed} of {len(args.files)} file(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    module_main(main)
