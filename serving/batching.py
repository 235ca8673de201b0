"""Server-side batching with TF Serving's parameters (max_batch_size, batch_timeout_micros, num_batch_threads,
max_enqueued_batches): concurrent requests for the same signature are concatenated into one model call.

A batch that fails (e.g. one undecodable image) is retried request by request, so one bad request never fails
another client's request.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchingParameters:
    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100


class QueueFull(Exception):
    """More requests are waiting than max_enqueued_batches x max_batch_size (TF Serving answers UNAVAILABLE)."""


def parse_batching_config(text: str) -> BatchingParameters:
    """TF Serving's --batching_parameters_file text format: `max_batch_size { value: 32 }` (or `key: value`)."""
    values = {}
    for field in BatchingParameters.__dataclass_fields__:
        match = re.search(rf"\b{field}\s*(?:\{{\s*value\s*:\s*(\d+)\s*\}}|:\s*(\d+))", text)
        if match:
            values[field] = int(match.group(1) or match.group(2))
    return BatchingParameters(**values)


def read_batching_config(path: str | Path) -> BatchingParameters:
    return parse_batching_config(Path(path).read_text(encoding="utf-8"))


def _key(inputs: Inputs) -> tuple:
    return tuple(sorted((name, array.shape[1:], array.dtype.str) for name, array in inputs.items()))


class Batcher:
    """Queue + worker threads around `run(inputs) -> outputs` (every array batch-major)."""

    def __init__(self, run: Callable[[Inputs], Outputs], params: BatchingParameters,
                 on_batch: Callable[[int], None] | None = None):
        self.run, self.params, self.on_batch = run, params, on_batch or (lambda size: None)
        self.queue: queue.Queue = queue.Queue(maxsize=params.max_enqueued_batches * params.max_batch_size)
        self.stopped = threading.Event()
        self._submit_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"batch-{i}")
                        for i in range(max(1, params.num_batch_threads))]
        for thread in self.threads:
            thread.start()

    def submit(self, inputs: Inputs) -> Outputs:
        size = len(next(iter(inputs.values())))
        if size >= self.params.max_batch_size:  # already a full batch: no reason to wait
            self.on_batch(size)
            return self.run(inputs)
        future: Future = Future()
        with self._submit_lock:
            if self.stopped.is_set():  # the version is being unloaded: finish this request directly
                return self.run(inputs)
            try:
                self.queue.put_nowait((inputs, size, future, time.monotonic()))
            except queue.Full as exc:
                raise QueueFull(f"batch queue is full ({self.queue.maxsize} requests waiting)") from exc
        return future.result()

    def stop(self) -> None:
        """Stop the workers, then answer whatever is still queued: no request is dropped by an unload."""
        with self._submit_lock:
            self.stopped.set()
        for _ in self.threads:
            self.queue.put((None, 0, None, 0.0))
        for thread in self.threads:
            thread.join(timeout=30)
        while True:
            try:
                inputs, _, future, _ = self.queue.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                _resolve(future, lambda inputs=inputs: self.run(inputs))

    def _work(self) -> None:
        carry = None
        while True:
            first = carry or self.queue.get()
            carry = None
            if first[0] is None:
                return
            items, total, key = [first], first[1], _key(first[0])
            # as in TF Serving, the timeout runs from when the batch's first request arrived, not from when a busy
            # thread got to it: requests that already waited go out at once with whatever queued behind them
            deadline = first[3] + self.params.batch_timeout_micros / 1e6
            while total < self.params.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] is None or _key(item[0]) != key or total + item[1] > self.params.max_batch_size:
                    carry = item  # starts the next batch
                    break
                items.append(item)
                total += item[1]
            self._execute(items, total)

    def _execute(self, items: list, total: int) -> None:
        if len(items) == 1:
            inputs, _, future, _ = items[0]
            self.on_batch(total)
            _resolve(future, lambda: self.run(inputs))
            return
        merged = {name: np.concatenate([item[0][name] for item in items]) for name in items[0][0]}
        try:
            self.on_batch(total)
            outputs = self.run(merged)
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: retry one by one
            for inputs, _, future, _ in items:
                _resolve(future, lambda inputs=inputs: self.run(inputs))
            return
        start = 0
        for _, size, future, _ in items:
            future.set_result({name: value[start:start + size] for name, value in outputs.items()})
            start += size


def _resolve(future: Future, call: Callable[[], Outputs]) -> None:
    try:
        future.set_result(call())
    except Exception as exc:  # noqa: BLE001 - handed to the waiting request thread, which maps it to a status
        future.set_exception(exc)
