"""The gateway's decode pool: every image is decoded and preprocessed in one of a few worker processes
(serving/gateway/decode_worker.py), never in the gateway's own process.

    pool = DecodePool(workers=2, memory_mb=1024, task_timeout_s=20, max_tasks=500, recycle_mb=256)
    decoded = pool.decode(data, config, timeout_s=remaining_deadline)   # -> decode_worker.Decoded
    pool.close()

Each worker runs under RLIMIT_AS = memory_mb and is given min(task_timeout_s, the request's remaining deadline).
A worker that dies (killed, out of memory), overruns or answers garbage is killed and replaced, and its input is
refused with a DecodeFailure naming what happened; the next request gets a fresh worker. Workers are forked from a
forkserver that preloaded decode_worker (no TensorFlow, no gRPC), started with the gateway; a worker is recycled
after max_tasks images or when its resident memory stays above recycle_mb after a task, so that memory a large
image took is given back to the system.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field

from serving.gateway import decode_worker

log = logging.getLogger("medpipe.gateway")


class DecodeFailure(Exception):
    """An input the pool could not decode for a reason of the pool's own (not a verdict of medpipe.imaging):
    kind = memory | died | overrun | deadline | busy | error. `message` is safe to show a client."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: object
    tasks: int = 0
    started: float = field(default_factory=time.monotonic)


class DecodePool:
    def __init__(self, workers: int = 2, memory_mb: int = 1024, task_timeout_s: float = 20.0, max_tasks: int = 500,
                 recycle_mb: int = 256):
        if workers < 1:
            raise ValueError(f"a decode pool needs at least 1 worker, not {workers}")
        self.memory_bytes = int(memory_mb * 2**20)
        self.task_timeout_s, self.max_tasks, self.recycle_mb = task_timeout_s, max_tasks, recycle_mb
        self._context = multiprocessing.get_context("forkserver")
        # "__main__" as multiprocessing does by default (each child would otherwise re-import it), then the worker
        self._context.set_forkserver_preload(["__main__", decode_worker.__name__])
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._all: set = set()
        self.replaced = 0  # workers killed and replaced (died, overran, recycled)
        for _ in range(workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=decode_worker.serve, args=(theirs, self.memory_bytes),
                                        name="medpipe-decode", daemon=True)
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        with self._lock:
            self._all.add(worker.process.pid)
        return worker

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(self._all)

    # -- one image ---------------------------------------------------------------------------------------------
    def decode(self, data: bytes, config, timeout_s: float) -> decode_worker.Decoded:
        """The decoded image, or medpipe.errors.RejectedInput (the file's own fault, as preprocess_bytes says), or
        DecodeFailure (the pool's limits refused it). Never waits longer than timeout_s in all."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        worker = self._take(deadline)
        try:
            worker.connection.send((data, config))
        except (OSError, ValueError):
            self._replace(worker)
            raise DecodeFailure("died", "the decoder process failed while receiving the image") from None
        limit = min(self.task_timeout_s, max(0.0, deadline - time.monotonic()))
        if not worker.connection.poll(limit):
            self._replace(worker)
            if limit < self.task_timeout_s:
                raise DecodeFailure("deadline", "the deadline passed while the image was being decoded")
            raise DecodeFailure("overrun", f"decoding the image took longer than the decoder's limit of "
                                f"{self.task_timeout_s:g} s")
        try:
            result, rss_mb = worker.connection.recv()
        except (EOFError, OSError, ValueError):
            self._replace(worker)
            raise DecodeFailure("died", "the decoder process died on this image (out of memory or a crash)") from None
        worker.tasks += 1
        # a worker that hit its memory limit is replaced too: a MemoryError can leave a library half-way
        if result[0] == "memory" or worker.tasks >= self.max_tasks or rss_mb > self.recycle_mb:
            self._replace(worker)
        else:
            self._idle.put(worker)
        return _unpack(result, self.memory_bytes)

    def _take(self, deadline: float) -> _Worker:
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DecodeFailure("busy", "every decoder was busy until the deadline passed") from None
            if worker.process.is_alive():
                return worker
            self._replace(worker)  # died while idle (killed from outside): never give it an input

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` and start its replacement in the background (the refusal does not wait for it)."""
        with self._lock:
            self.replaced += 1
            self._all.discard(worker.process.pid)
        worker.process.kill()
        worker.connection.close()

        def restart() -> None:
            worker.process.join(timeout=10)
            if self._closed:
                return
            try:
                self._idle.put(self._spawn())
            except Exception as exc:  # noqa: BLE001 - retried on the next replacement; the pool shrinks meanwhile
                log.error("could not start a decode worker (%s)", type(exc).__name__)

        threading.Thread(target=restart, name="decode-restart", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            try:
                worker.connection.send(None)
            except (OSError, ValueError):
                pass
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
            worker.connection.close()


def _unpack(result: tuple, memory_bytes: int) -> decode_worker.Decoded:
    from medpipe.errors import RejectedInput

    kind = result[0]
    if kind == "ok":
        return result[1]
    if kind == "rejected":
        raise RejectedInput(result[1], result[2])
    if kind == "memory":
        raise DecodeFailure("memory", f"decoding the image needs more than the decoder's memory limit of "
                            f"{memory_bytes // 2**20} MB")
    raise DecodeFailure("error", f"the decoder failed on this image ({result[1]})")
