"""Model lifecycle of the TF Serving-compatible server: poll the repository, apply version policies and labels,
load new versions before unloading old ones, and run signatures (through the batcher) for the API layers.

Status codes follow TF Serving: unknown model/version/label -> NOT_FOUND, malformed input -> INVALID_ARGUMENT,
a label pointing at an unavailable version in a reload -> FAILED_PRECONDITION (and the previous configuration stays in
effect). What only the files can tell: a version whose folder is gone is unloaded; a version that failed to load is
retried when its folder changes (a copy still in progress).
"""

from __future__ import annotations

import logging
import re
import threading
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
    fingerprint: tuple = ()  # the folder when its load began: a failed version is retried once this changes

    @property
    def failed(self) -> bool:
        return self.state == "END" and bool(self.error)


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


# what must not reach a client: file paths, TensorFlow graph nodes and function names ({{function_node ...}}, [[...]],
# [Op:__inference_...]), and the Python traceback TensorFlow puts before the actual error
_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"(){}\[\],;:]+){2,}")
_GRAPH_NAMES = re.compile(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]|\b__\w+")
_TRACEBACK = re.compile(r"^(Graph execution error|Detected at node|File \"|Traceback)")


def public_message(text: str, limit: int = 300) -> str:
    """TEXT as a client may see it: its first line that is not traceback, without paths or graph/function names."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = next((line for line in lines if not _TRACEBACK.match(line)), lines[0] if lines else "")
    line = _PATHS.sub("<path>", _GRAPH_NAMES.sub("", line))
    return re.sub(r"\s+", " ", line).strip(" :")[:limit]


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
        self.on_state = None                 # callback({model: has an AVAILABLE version}) after each change: health
        self._exported: set[tuple[str, str]] = set()  # (model, version) series of medpipe_loaded_versions
        self._lock = threading.RLock()       # guards self.models
        self._poll_lock = threading.Lock()   # one load cycle at a time
        self._report_lock = threading.Lock()
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
        """Load what CONFIG asks for, check its labels, and only then switch to it (models left out are unloaded,
        a reload replaces the whole config). A refused config changes nothing that serves: no label moves and no
        working version is unloaded."""
        with self._lock:
            current = dict(self.models)
        plan = []
        for entry in config.model_config_list.config:
            base = Path(entry.base_path)
            if not base.is_absolute():
                base = (relative_to / base).resolve()
            model = current.get(entry.name)
            if model is None or model.base_path != base:
                model = ModelEntry(entry.name, base, policy_of(entry))  # staged until the switch
            plan.append((model, policy_of(entry), {k: int(v) for k, v in entry.version_labels.items()}))
        for model, policy, _ in plan:
            self._load_wanted(model, policy)
        problems = [] if self.allow_unavailable_labels else [
            f"label {label} of {model.name} points at version {number}, which is not available "
            f"({self._describe(model, number)})"
            for model, _, labels in plan for label, number in sorted(labels.items())
            if not self._available(model, number)]
        if problems:
            for model, _, _ in plan:
                if current.get(model.name) is not model:
                    self._unload_all(model)
            for model in current.values():
                self._sync_model(model)  # unload what only the refused config wanted
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "; ".join(problems) + "; the previous configuration stays in effect")
        with self._lock:
            for model, policy, labels in plan:
                model.policy, model.labels = policy, labels
            self.models = {model.name: model for model, _, _ in plan}
        for model in current.values():
            if self.models.get(model.name) is not model:
                self._unload_all(model)
        for model in list(self.models.values()):
            self._sync_model(model)

    @staticmethod
    def _available(model: ModelEntry, number: int) -> bool:
        version = model.versions.get(number)
        return version is not None and version.state == "AVAILABLE"

    @staticmethod
    def _describe(model: ModelEntry, number: int) -> str:
        version = model.versions.get(number)
        if version is None:
            return "no such version folder" if number not in repo_lib.versions_on_disk(model.base_path) \
                else "not loaded"
        return f"{version.state}: {version.error}" if version.error else version.state

    def reload(self, config) -> None:
        """HandleReloadConfigRequest: load synchronously, then switch if every label points at an AVAILABLE
        version; otherwise FAILED_PRECONDITION and the previous configuration stays in effect."""
        with self._poll_lock:
            path = self._config_path()
            if path is not None and path.is_file():  # the file is re-applied only when edited after this reload
                self._config_mtime = path.stat().st_mtime
            try:
                self._apply(config, self.repository or Path.cwd())
            finally:
                self.report()

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
        self.report()

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive a bad config edit; it is logged
                log.exception("repository poll failed; still serving the loaded versions")

    def poll_once(self) -> None:
        with self._poll_lock:
            try:
                fresh = self._read_file_config()
                if fresh is None:
                    with self._lock:
                        models = list(self.models.values())
                    for model in models:
                        self._sync_model(model)
                    return
                try:
                    self._apply(*fresh)
                except ServingError as exc:  # TF Serving keeps its previous config when a file edit is refused
                    log.error("%s not applied: %s", self._config_path() or "repository", exc.message)
            finally:
                self.report()

    def _sync_model(self, model: ModelEntry) -> None:
        """Bring one model in line with its policy and the folders on disk: load before unload."""
        on_disk = repo_lib.versions_on_disk(model.base_path)
        self._drop_removed(model, on_disk)
        self._load_wanted(model, model.policy, on_disk)
        failed = {n for n, v in model.versions.items() if v.failed}
        wanted = set(wanted_versions(model.policy, on_disk, failed))
        available = [n for n, v in model.versions.items() if v.state == "AVAILABLE"]
        if available and not wanted.intersection(available):
            return  # nothing wanted is up (e.g. the new version failed): never unload the last working versions
        for number in available:
            if number not in wanted:
                self._unload(model, number)

    def _load_wanted(self, model: ModelEntry, policy: tuple, on_disk: list[int] | None = None) -> None:
        """Load every version POLICY wants that is not loaded; unload nothing."""
        on_disk = repo_lib.versions_on_disk(model.base_path) if on_disk is None else on_disk
        self._retry_changed(model, on_disk)
        failed = {n for n, v in model.versions.items() if v.failed}
        for number in wanted_versions(policy, on_disk, failed):
            current = model.versions.get(number)
            if current is None or current.state == "END":
                self._load(model, number)

    def _retry_changed(self, model: ModelEntry, on_disk: list[int]) -> None:
        """A version refused while its folder was incomplete (a non-atomic copy: saved_model.pb first, variables
        later) is forgotten once the folder changes, so the policy loads it again."""
        for number, version in list(model.versions.items()):
            if version.failed and number in on_disk and \
                    repo_lib.folder_fingerprint(version.path) != version.fingerprint:
                log.info("model %s version %d changed on disk since it failed to load: retrying", model.name, number)
                with self._lock:
                    del model.versions[number]

    def _drop_removed(self, model: ModelEntry, on_disk: list[int]) -> None:
        """A version whose folder is gone is unloaded (and a failed one forgotten): serve only what is on disk."""
        for number, version in list(model.versions.items()):
            if number in on_disk:
                continue
            if version.state == "AVAILABLE":
                log.warning("model %s version %d: its folder was removed; unloading it", model.name, number)
                self._unload(model, number)
            elif version.failed:
                with self._lock:
                    del model.versions[number]

    def _load(self, model: ModelEntry, number: int) -> None:
        path = model.base_path / str(number)
        version = Version(number, path, state="LOADING", fingerprint=repo_lib.folder_fingerprint(path))
        with self._lock:
            model.versions[number] = version
        try:
            loaded = load_version(path, self.batching, self._batch_observer(model.name))
        except Exception as exc:  # noqa: BLE001 - reported in the version's status, never replaces a working one
            # the status goes to clients: no path, no graph names (the server log has the full error)
            version.state = "END"
            version.error = f"could not load version {number}: {type(exc).__name__}: {public_message(exc)}"
            log.error("model %s version %d (%s) refused: %s: %s", model.name, number, path, type(exc).__name__,
                      str(exc)[:2000])
            if self.metrics is not None:
                self.metrics.tf.load(str(path), ok=False)
            return
        version.signatures, version.signature_def_map = loaded["signatures"], loaded["signature_def_map"]
        version.preprocessing = loaded["preprocessing"]
        version.state = "AVAILABLE"
        if self.metrics is not None:
            self.metrics.tf.load(str(path), ok=True)
        log.info("model %s version %d AVAILABLE", model.name, number)

    def _batch_observer(self, model_name: str):
        if self.metrics is None:
            return None
        histogram = self.metrics.batch_size.labels(model_name)
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

    def report(self) -> None:
        """Publish the loaded set: medpipe_loaded_versions has a series exactly for each AVAILABLE version, and
        on_state learns which models can answer (gRPC health)."""
        with self._report_lock:
            with self._lock:
                models = dict(self.models)
                loaded = {(name, str(n)) for name, m in models.items() for n, v in m.versions.items()
                          if v.state == "AVAILABLE"}
            if self.metrics is not None:
                gauge = self.metrics.loaded_versions
                for labels in self._exported - loaded:
                    gauge.remove(*labels)
                for labels in loaded:
                    gauge.labels(*labels).set(1)
                self._exported = loaded
            if self.on_state is not None:
                self.on_state({name: any(name == m for m, _ in loaded) for name in models})

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
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, public_message(exc.message)) from exc
