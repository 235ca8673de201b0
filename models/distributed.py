"""Multi-worker training: who is who in TensorFlow's `TF_CONFIG`, where each worker writes, and a local launcher.

TensorFlow's own variable decides the topology (the same on a laptop, in compose and in a Kubernetes indexed Job):

    TF_CONFIG='{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}'

Every worker runs the same `medpipe train` command with the same --output. The chief (task type `chief`, else worker
0) writes the run folder; the others write the same files into a private temporary folder that is deleted when they
exit (TensorFlow's multi-worker guide: every worker saves, because saving may involve collective ops, but only the
chief's copy is kept). `medpipe train --workers N` starts N such processes on localhost.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medpipe.errors import ConfigError

log = logging.getLogger("medpipe.train")

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Cluster:
    """This process's place in the training cluster (one worker, the chief, when TF_CONFIG is absent)."""

    workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    is_chief: bool = True

    @property
    def multi_worker(self) -> bool:
        return self.workers > 1

    def describe(self) -> str:
        return f"{self.task_type} {self.task_index}{' (chief)' if self.is_chief else ''}"


def parse_tf_config(text: str | None) -> Cluster:
    """TF_CONFIG's JSON -> Cluster; ConfigError naming what is wrong (parameter servers are not supported)."""
    if not text:
        return Cluster()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{TF_CONFIG} is not valid JSON ({exc}); expected "
                          '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from exc
    cluster, task = spec.get("cluster") or {}, spec.get("task") or {}
    unsupported = sorted(set(cluster) - {"chief", "worker"})
    if unsupported:
        raise ConfigError(f"{TF_CONFIG} names {', '.join(unsupported)} tasks; medpipe trains with "
                          "MultiWorkerMirroredStrategy, whose cluster has only `chief` and `worker` tasks")
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{TF_CONFIG} names {len(cluster['chief'])} chiefs; a cluster has at most one")
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    task_type, index = task.get("type"), task.get("index", 0)
    if workers == 0 or task_type not in ("chief", "worker"):
        raise ConfigError(f"{TF_CONFIG} must list the workers under cluster.worker and give this process's "
                          f"task.type (chief or worker) and task.index; got cluster {sorted(cluster)} and task {task}")
    if not isinstance(index, int) or not 0 <= index < len(cluster.get(task_type, [])):
        raise ConfigError(f"{TF_CONFIG} task.index {index!r} is not a valid index into cluster.{task_type} "
                          f"({len(cluster.get(task_type, []))} entries)")
    is_chief = task_type == "chief" or (not cluster.get("chief") and index == 0)
    return Cluster(workers=workers, task_type=task_type, task_index=index, is_chief=is_chief)


def cluster_from_env() -> Cluster:
    return parse_tf_config(os.environ.get(TF_CONFIG))


def artefact_dir(run_dir: Path, cluster: Cluster) -> Path:
    """Where this process writes: the run folder on the chief, a private temporary folder (removed at exit) on the
    other workers."""
    if cluster.is_chief:
        return run_dir
    scratch = Path(tempfile.mkdtemp(prefix=f"medpipe-{cluster.task_type}{cluster.task_index}-"))
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def worker_backup(backup_dir: Path, restore_dir: Path, delete_checkpoint: bool = True):
    """keras BackupAndRestore that writes into this worker's own `backup_dir` but restores from `restore_dir` (the
    chief's): replicas hold identical weights, so a restarted cluster resumes every worker from the same epoch even
    when the other workers' temporary folders are gone."""
    import keras

    class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _load_model(self) -> None:
            own = self._weights_path, self._training_metadata_path
            self._weights_path = str(restore_dir / "latest.weights.h5")
            self._training_metadata_path = str(restore_dir / "training_metadata.json")
            try:
                super()._load_model()
            finally:
                self._weights_path, self._training_metadata_path = own

    return WorkerBackupAndRestore(str(backup_dir), save_freq="epoch", delete_checkpoint=delete_checkpoint)


# ------------------------------------------------------------------------------------------------- local launcher
def free_ports(count: int) -> list[int]:
    """`count` distinct free localhost ports. The one place medpipe chooses a port before a process starts: every
    worker must know all the others' addresses (TF_CONFIG) before any of them binds, so this cannot be port 0.
    (Servers medpipe runs bind port 0 and announce their ports: serving.listen.) They are released before the
    workers bind them (TensorFlow's gRPC server does not share a port), so another process could take one in
    between: the worker then fails to start and the launcher stops the others."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_tf_configs(ports: Sequence[int]) -> list[str]:
    """One TF_CONFIG per worker of a localhost cluster (worker 0 is the chief)."""
    workers = [f"localhost:{port}" for port in ports]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            for index in range(len(workers))]


def launch_local_workers(argv: Sequence[str], workers: int, poll_seconds: float = 0.5) -> int:
    """Run `python -m models.train ARGV` as `workers` processes on localhost; exit status of the first failure, else 0.

    A worker that fails leaves the others waiting in a collective op forever, so the rest are stopped then.
    """
    if workers < 2:
        raise ConfigError(f"--workers must be >= 2 to launch a local cluster, got {workers}")
    if os.environ.get(TF_CONFIG):
        raise ConfigError(f"--workers starts its own cluster but {TF_CONFIG} is already set; unset it, or start "
                          "each worker yourself with its TF_CONFIG and without --workers")
    ports = free_ports(workers)
    processes = []
    try:
        for index, tf_config in enumerate(local_tf_configs(ports)):
            env = {**os.environ, TF_CONFIG: tf_config}
            processes.append(subprocess.Popen([sys.executable, "-m", "models.train", *argv], env=env))
            log.info("started worker %d of %d (pid %d, localhost:%d)", index, workers, processes[-1].pid, ports[index])
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                log.error("a worker exited with status %d: stopping the other workers", failed[0])
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_seconds)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------------------------ Keras 3 + MultiWorker
def patch_keras_for_multi_worker() -> None:
    """Make Keras 3's TensorFlow trainer work under MultiWorkerMirroredStrategy (keras-team/keras#20585, open for
    Keras 3.7-3.15): `fit()` (1) builds the model from its first batch averaged with `strategy.reduce(..., axis=None)`
    over the whole (x, y, weight) tuple, which the multi-worker strategy cannot reduce, and (2) averages each step's
    scalar logs with `strategy.reduce("MEAN", v, axis=0)`, which fails for a scalar. (1) builds from this worker's own
    slice of the batch instead (the same shapes, which is all the build needs); (2) averages over every replica of
    every worker with axis=None, so all workers see the same loss and metrics (and EarlyStopping/ModelCheckpoint
    decide alike on every worker). Applied only when the multi-worker strategy is in use; idempotent."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_medpipe_multi_worker_patch", False):
        return
    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and tf_trainer._collective_all_reduce_multi_worker(strategy):
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues) else value, batch)
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer._medpipe_multi_worker_patch = True
