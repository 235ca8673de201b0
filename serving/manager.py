"""Model lifecycle of the TF Serving-compatible server: poll the repository, apply version policies and labels,
load new versions before unloading old ones, and run signatures (through the batcher) for the API layers.

Status codes follow TF Serving: unknown model/version/label -> NOT_FOUND, malformed input -> INVALID_ARGUMENT,
a label pointing at an unavailable version in a reload -> FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving import repository as repo_lib
from serving.batching import Batcher, BatchingParameters, QueueFull

log = logging.getLogger("medpipe.serve")

DEFAULT_SIGNATURE = "serving_default"


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Signature:
    name: str
    function: Any
    inputs: dict[str, Any]   # name -> tf.TensorSpec
    outputs: dict[str, Any]  # name -> tf.TensorSpec
    owner: Any = None        # the loaded SavedModel object: keeps the function's variables alive
    batcher: Batcher | None = None

    def call(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        result = self.function(**{k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in result.items()}


@dataclass
class Version:
    number: int
    path: Path
    state: str = "START"
    error: str = ""
    signatures: dict[str, Signature] = field(default_factory=dict)
    signature_def_map: Any = None  # tensorflow.serving SignatureDefMap
    preprocessing: dict = field(default_factory=dict)


@dataclass
class ModelEntry:
    name: str
    base_path: Path
    policy: tuple  # ("latest", n) | ("all",) | ("specific", frozenset)
    labels: dict[str, int] = field(default_factory=dict)
    versions: dict[int, Version] = field(default_factory=dict)


def policy_of(config_entry) -> tuple:
    which = config_entry.model_version_policy.WhichOneof("policy_choice")
    if which == "all":
        return ("all",)
    if which == "specific":
        return ("specific", frozenset(config_entry.model_version_policy.specific.versions))
    n = config_entry.model_version_policy.latest.num_versions if which == "latest" else 1
    return ("latest", max(1, n))


def wanted_versions(policy: tuple, on_disk: list[int], failed: set[int]) -> list[int]:
    """Versions the policy asks for; a broken version never displaces a working one under `latest`."""
    if policy[0] == "all":
        return [v for v in on_disk if v not in failed]
    if policy[0] == "specific":
        return [v for v in on_disk if v in policy[1] and v not in failed]
    return [v for v in on_disk if v not in failed][-policy[1]:]


class ModelManager:
    def __init__(self, repository: Path | None, config_file: Path | None, batching: BatchingParameters | None,
                 metrics=None, poll_seconds: float = 0.5, allow_unavailable_labels: bool = False):
        self.repository, self.config_file = repository, config_file
        self.batching, self.metrics, self.poll_seconds = batching, metrics, poll_seconds
        self.allow_unavailable_labels = allow_unavailable_labels
        self.models: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()       # guards self.models
        self._poll_lock = threading.Lock()   # one load cycle at a time
        self._config_mtime: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- configuration -------------------------------------------------------------------------------------
    def _config_path(self) -> Path | None:
        if self.config_file is not None:
            return self.config_file
        if self.repository is not None and (self.repository / repo_lib.CONFIG_FILE).is_file():
            return self.repository / repo_lib.CONFIG_FILE
        return None

    def _read_file_config(self):
        """models.config if any (re-read when it changes), else every folder of the repository, latest 1."""
        path = self._config_path()
        if path is not None:
            mtime = path.stat().st_mtime
            if mtime == self._config_mtime:
                return None
            self._config_mtime = mtime
            return repo_lib.read_config(path), path.parent
        self._config_mtime = None
        from tensorflow_serving.config import model_server_config_pb2

        config = model_server_config_pb2.ModelServerConfig()
        for child in sorted(self.repository.iterdir()) if self.repository.is_dir() else []:
            if child.is_dir() and repo_lib.versions_on_disk(child):
                entry = config.model_config_list.config.add()
                entry.name, entry.base_path = child.name, str(child)
        return config, self.repository

    def _apply(self, config, relative_to: Path) -> None:
        with self._lock:
            names = set()
            for entry in config.model_config_list.config:
                names.add(entry.name)
                base = Path(entry.base_path)
                if not base.is_absolute():
                    base = (relative_to / base).resolve()
                model = self.models.get(entry.name)
                if model is None or model.base_path != base:
                    model = self.models[entry.name] = ModelEntry(entry.name, base, policy_of(entry))
                model.policy = policy_of(entry)
                model.labels = {k: int(v) for k, v in entry.version_labels.items()}
            for name in list(self.models):
                if name not in names:  # a reload replaces the whole config: models left out are unloaded
                    self._unload_all(self.models.pop(name))

    def reload(self, config) -> None:
        """HandleReloadConfigRequest: apply, load synchronously, then check labels point at AVAILABLE versions."""
        path = self._config_path()
        if path is not None and path.is_file():  # the file is re-applied only when edited after this reload
            self._config_mtime = path.stat().st_mtime
        self._apply(config, self.repository or Path.cwd())
        self.poll_once()
        if self.allow_unavailable_labels:
            return
        for entry in config.model_config_list.config:
            model = self.models.get(entry.name)
            for label, version in entry.version_labels.items():
                loaded = model.versions.get(int(version)) if model else None
                if loaded is None or loaded.state != "AVAILABLE":
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"label {label} of {entry.name} points at version {version}, which is not "
                                       f"available (state {loaded.state if loaded else 'absent'})")

    # ---- polling / loading ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._poll_forever, daemon=True, name="repository-poller")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            for model in self.models.values():
                self._unload_all(model)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive a bad config edit; it is logged
                log.exception("repository poll failed; still serving the loaded versions")

    def poll_once(self) -> None:
        with self._poll_lock:
            fresh = self._read_file_config()
            if fresh is not None:
                self._apply(*fresh)
            with self._lock:
                models = list(self.models.values())
            for model in models:
                self._sync_model(model)

    def _sync_model(self, model: ModelEntry) -> None:
        on_disk = repo_lib.versions_on_disk(model.base_path)
        failed = {n for n, v in model.versions.items() if v.state == "END" and v.error}
        wanted = wanted_versions(model.policy, on_disk, failed)
        for number in wanted:
            current = model.versions.get(number)
            if current is None or current.state == "END" and not current.error:
                self._load(model, number)
        # a failed newest version under `latest`: the next wanted set now excludes it, keep the working ones
        failed = {n for n, v in model.versions.items() if v.state == "END" and v.error}
        wanted = set(wanted_versions(model.policy, on_disk, failed))
        available = [n for n, v in model.versions.items() if v.state == "AVAILABLE"]
        if not any(n in wanted for n in available) and available:
            return  # nothing new is up: never unload the last working versions
        for number in available:
            if number not in wanted:
                self._unload(model, number)
        if self.metrics is not None:
            for n, v in model.versions.items():
                self.metrics.loaded_versions.labels(model.name, str(n)).set(1 if v.state == "AVAILABLE" else 0)

    def _load(self, model: ModelEntry, number: int) -> None:
        path = model.base_path / str(number)
        version = Version(number, path, state="LOADING")
        with self._lock:
            model.versions[number] = version
        try:
            loaded = load_version(path, self.batching, self._batch_observer(model.name))
        except Exception as exc:  # noqa: BLE001 - reported in the version's status, never replaces a working one
            version.state, version.error = "END", f"could not load {path}: {type(exc).__name__}: {exc}"[:2000]
            log.error("model %s version %d refused: %s", model.name, number, version.error)
            if self.metrics is not None:
                self.metrics.tf.load(model.name, ok=False)
            return
        version.signatures, version.signature_def_map = loaded["signatures"], loaded["signature_def_map"]
        version.preprocessing = loaded["preprocessing"]
        version.state = "AVAILABLE"
        if self.metrics is not None:
            self.metrics.tf.load(model.name, ok=True)
        log.info("model %s version %d AVAILABLE", model.name, number)

    def _batch_observer(self, model_name: str):
        if self.metrics is None:
            return None
        histogram = self.metrics.medpipe.batch_size.labels(model_name)
        return histogram.observe

    def _unload(self, model: ModelEntry, number: int) -> None:
        """Stop batching and drop the version from the table; requests that already resolved it keep their own
        reference and finish (the memory is freed when the last one is done)."""
        version = model.versions[number]
        version.state = "UNLOADING"
        for signature in version.signatures.values():
            if signature.batcher is not None:
                signature.batcher.stop()
        with self._lock:
            model.versions[number] = Version(number, version.path, state="END")
        log.info("model %s version %d unloaded", model.name, number)

    def _unload_all(self, model: ModelEntry) -> None:
        for number, version in list(model.versions.items()):
            if version.state == "AVAILABLE":
                self._unload(model, number)

    # ---- lookups -------------------------------------------------------------------------------------------
    @staticmethod
    def _labelled_version(model: ModelEntry, label: str) -> int:
        if label not in model.labels:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Unrecognized servable version label: {label}")
        return model.labels[label]

    def _lookup(self, name: str, version: int | None, label: str | None,
                missing: str) -> tuple[ModelEntry, int | None]:
        """The model and the version asked for (a label resolved to its number); `missing` is TF Serving's wording
        for an unknown model, which differs between Predict and GetModelStatus."""
        with self._lock:
            model = self.models.get(name)
        if model is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, missing)
        return model, self._labelled_version(model, label) if label else version

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> tuple[ModelEntry, Version]:
        model, version = self._lookup(name, version, label, f"Servable not found for request: Latest({name})")
        if version is not None:
            found = model.versions.get(int(version))
            if found is None or found.state != "AVAILABLE":
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Specific({name}, {version})")
            return model, found
        available = [v for v in model.versions.values() if v.state == "AVAILABLE"]
        if not available:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        return model, max(available, key=lambda v: v.number)

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[Version]:
        model, version = self._lookup(name, version, label, f"Could not find any versions of model {name}")
        if version is not None:
            if int(version) not in model.versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {version} of model {name}")
            return [model.versions[int(version)]]
        return sorted(model.versions.values(), key=lambda v: -v.number)


def load_version(path: Path, batching: BatchingParameters | None, on_batch=None) -> dict:
    """tf.saved_model.load + signature specs + the SignatureDefMap for metadata + warmup replay."""
    import json

    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    if not (path / "saved_model.pb").is_file():
        raise FileNotFoundError("saved_model.pb is missing (incomplete or corrupt version folder)")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    signature_def_map = get_model_metadata_pb2.SignatureDefMap()
    for key, value in proto.meta_graphs[0].signature_def.items():
        signature_def_map.signature_def[key].CopyFrom(value)
    loaded = tf.saved_model.load(str(path))
    signatures = {}
    for key, function in loaded.signatures.items():
        signature = Signature(key, function, dict(function.structured_input_signature[1]),
                              dict(function.structured_outputs), owner=loaded)
        if batching is not None:
            signature.batcher = Batcher(signature.call, batching, on_batch)
        signatures[key] = signature
    preprocessing_file = path / "assets" / "preprocessing.json"
    preprocessing = json.loads(preprocessing_file.read_text()) if preprocessing_file.is_file() else {}
    try:
        replay_warmup(path, signatures)
    except Exception:
        for signature in signatures.values():  # a version that fails warmup is refused: free its threads
            if signature.batcher is not None:
                signature.batcher.stop()
        raise
    return {"signatures": signatures, "signature_def_map": signature_def_map, "preprocessing": preprocessing}


def replay_warmup(path: Path, signatures: dict) -> int:
    """Run assets.extra/tf_serving_warmup_requests (PredictionLog) before the version becomes AVAILABLE."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = path / "assets.extra" / "tf_serving_warmup_requests"
    if not warmup.is_file():
        return 0
    count = 0
    for raw in tf.data.TFRecordDataset(str(warmup)).take(1000):
        record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        if record.WhichOneof("log_type") != "predict_log":
            continue
        request = record.predict_log.request
        signature = signatures[request.model_spec.signature_name or DEFAULT_SIGNATURE]
        signature.call({k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        count += 1
    return count


def validate_inputs(signature: Signature, inputs: dict[str, np.ndarray]) -> int:
    """TF Serving's INVALID_ARGUMENT checks; returns the batch size."""
    import tensorflow as tf

    if not inputs:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no inputs")
    unknown = set(inputs) - set(signature.inputs)
    missing = set(signature.inputs) - set(inputs)
    if unknown or missing:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input names do not match signature {signature.name}: expected "
                           f"{sorted(signature.inputs)}, got {sorted(inputs)}")
    sizes = set()
    for name, array in inputs.items():
        spec = signature.inputs[name]
        expected = spec.dtype
        got = tf.as_dtype(array.dtype) if array.dtype != object else tf.string
        if got != expected:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name} has dtype {got.name}, signature {signature.name} expects {expected.name}")
        if array.ndim != len(spec.shape) or any(
                d is not None and d != s for d, s in zip(spec.shape.as_list()[1:], array.shape[1:])):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name} has shape {list(array.shape)}, expected {spec.shape.as_list()}")
        sizes.add(array.shape[0])
    if 0 in sizes:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "empty batch: the inputs have 0 rows")
    if len(sizes) > 1:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def run_signature(version: Version, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    signature = version.signatures.get(signature_name or DEFAULT_SIGNATURE)
    if signature is None:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Serving signature key \"{signature_name}\" not found; available: "
                           f"{sorted(version.signatures)}")
    validate_inputs(signature, inputs)
    try:
        if signature.batcher is not None:
            return signature.batcher.submit(inputs)
        return signature.call(inputs)
    except QueueFull as exc:
        raise ServingError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
    except tf.errors.InvalidArgumentError as exc:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, exc.message.splitlines()[0][:500]) from exc
