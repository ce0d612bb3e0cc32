"""Dynamic batching: images submitted one by one from many threads (or coroutines, through
`asyncio.wrap_future`) run together, one model call per batch.

    batcher = DynamicBatcher(embedder.embed_arrays, max_batch=32, timeout_s=0.005)
    futures = batcher.submit_many([partial(embedder.preprocess, data) for data in uploads])
    vectors = np.stack([f.result() for f in futures])
    batched = BatchedEmbedder(embedder, batcher)       # `Embedder.embed`'s interface, batched
    faces = embed_faces(batched, frame)                 # face crops share batches too

One worker thread takes the oldest waiting image and up to `max_batch - 1` more, waiting
until `timeout_s` after the oldest arrived for the batch to fill (Triton's
`max_queue_delay`): an image that waited while the model ran on the previous batch goes
at once. `max_batch=1` turns batching off.

An item is an array or a callable that makes one (decoding an upload). The worker calls
those for the whole batch, in its own pool of `prepare_threads`, and then runs the model:
decoding and the model take turns on the CPU instead of running side by side. On a CPU
they would share the same cores, and the model's threads (OpenMP, Eigen, XLA) wait for
each other at every operation, spinning while a decoder holds one of their cores. It is
the order `Embedder.embed` follows one batch at a time. Decoded images exist only for
the batch being run; the queue holds what was uploaded.

The queue is bounded: `submit_many` refuses work it cannot hold (`OverloadedError`, all
of a request or none of it) instead of letting latency grow without end. `close` stops
taking work and lets the worker finish what is queued (a graceful shutdown drains).
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from embedding.errors import ImageLoadError, NonFiniteError, without_traceback
from embedding.images import as_input_list, describe_input


class OverloadedError(RuntimeError):
    """The batcher's queue cannot take the work now; `retry_after` (seconds) estimates when
    it could."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosedError(RuntimeError):
    """Work submitted after `DynamicBatcher.close`."""


@dataclass
class _Waiting:
    item: np.ndarray | Callable[[], np.ndarray]  # the array, or what makes it
    future: Future
    enqueued: float  # time.monotonic()


@dataclass
class _Failed:
    error: BaseException  # what an item's callable raised: that item's answer


class DynamicBatcher:
    """Runs `run_batch` ((N, ...) array -> (N, D) array) on batches of the items submitted.

    Args:
        run_batch: the model call; N is at most `max_batch`.
        max_batch: most items per call (1: no batching).
        timeout_s: the longest the oldest waiting item waits for its batch to fill.
        max_queue: most items waiting; beyond, `submit_many` raises `OverloadedError`.
        on_batch: called as `on_batch(size, seconds)` after each model call (metrics).
        prepare_threads: threads that call a batch's callable items before the model
            call (default: the CPU count).
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        timeout_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
        prepare_threads: int | None = None,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        if prepare_threads is not None and prepare_threads < 1:
            raise ValueError(f"prepare_threads must be >= 1, got {prepare_threads}")
        if not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.timeout_s = float(timeout_s)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.prepare_threads = prepare_threads or max(1, os.cpu_count() or 1)
        self._name = name
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._seconds_per_item = 0.0  # moving average, for retry_after
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def __repr__(self):
        return (
            f"DynamicBatcher(max_batch={self.max_batch}, timeout_s={self.timeout_s}, "
            f"max_queue={self.max_queue}, waiting={self.queue_depth})"
        )

    @property
    def queue_depth(self) -> int:
        """Items waiting for the model."""
        return len(self._queue)

    def submit_many(self, items: Sequence[np.ndarray | Callable[[], np.ndarray]]) -> list[Future]:
        """One future per item, resolved to its output row; all are queued or none
        (`OverloadedError` when the queue cannot hold them all, `BatcherClosedError`
        after `close`). An item is an array or a callable returning one, called by the
        worker just before its batch runs; what the callable raises is that item's
        future's exception, and the rest of the batch runs."""
        now = time.monotonic()
        waiting = [_Waiting(item, Future(), now) for item in items]
        with self._ready:
            if self._closed:
                raise BatcherClosedError("the batcher is closed (shutting down)")
            if len(waiting) > self.max_queue:
                raise OverloadedError(
                    f"{len(waiting)} images at once is more than the queue holds "
                    f"({self.max_queue}); send fewer per request",
                    retry_after=0.0,
                )
            if len(self._queue) + len(waiting) > self.max_queue:
                retry = max(1.0, math.ceil(len(self._queue) * self._seconds_per_item))
                raise OverloadedError(
                    f"the queue is full ({len(self._queue)} images waiting, at most "
                    f"{self.max_queue}); try again later",
                    retry_after=retry,
                )
            self._queue.extend(waiting)
            self._ready.notify()
        return [item.future for item in waiting]

    def submit(self, item: np.ndarray | Callable[[], np.ndarray]) -> Future:
        return self.submit_many([item])[0]

    def run(self, items: Sequence[np.ndarray | Callable[[], np.ndarray]]) -> np.ndarray:
        """The outputs of `items` (N, D), waiting for them (from a thread, not a coroutine);
        the first item that failed raises its error."""
        futures = self.submit_many(items)
        return np.stack([future.result() for future in futures])

    def close(self, timeout: float | None = None) -> None:
        """Take no more work; the worker runs what is queued, then stops."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------

    def _next_batch(self) -> list[_Waiting] | None:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = self._queue[0].enqueued + self.timeout_s
            while len(self._queue) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        prefix = f"{self._name}-prepare"
        with ThreadPoolExecutor(self.prepare_threads, thread_name_prefix=prefix) as pool:
            while (batch := self._next_batch()) is not None:
                self._run(batch, pool)

    def _run(self, batch: list[_Waiting], pool: ThreadPoolExecutor) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        in_pool = len(live) > 1 and any(callable(item.item) for item in live)
        arrays = list(pool.map(_prepared, live)) if in_pool else [_prepared(i) for i in live]
        for item, array in zip(live, arrays, strict=True):
            if isinstance(array, _Failed):
                item.future.set_exception(array.error)
        kept = [n for n, array in enumerate(arrays) if not isinstance(array, _Failed)]
        live, arrays = [live[n] for n in kept], [arrays[n] for n in kept]
        if not live:
            return
        start = time.perf_counter()
        try:
            outputs = self.run_batch(np.stack(arrays))
        except BaseException as error:  # handed to every waiting caller, never lost
            for item in live:
                item.future.set_exception(error)
            return
        seconds = time.perf_counter() - start
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * seconds / len(live)
        for item, row in zip(live, outputs, strict=True):
            item.future.set_result(row)
        if self.on_batch is not None:
            self.on_batch(len(live), seconds)


def _prepared(waiting: _Waiting) -> np.ndarray | _Failed:
    """The item's array: the item itself, or what its callable returns (its error kept)."""
    if not callable(waiting.item):
        return waiting.item
    try:
        return waiting.item()
    except BaseException as error:  # the item's own answer, not the batch's
        return _Failed(error)


class BatchedEmbedder:
    """An embedder (`Embedder` or `OnnxEmbedder`) whose model calls go through a
    `DynamicBatcher`: the interface the face pipeline uses (`embed`, `preprocessor`,
    `channel_order`, `dim`, `threshold`), so threads embedding at once share batches.

    Decoding and resizing run in the batcher's worker, just before each batch's model call
    (see `DynamicBatcher`): the queue holds the inputs as given, a batch's decoded
    images exist while it runs.
    """

    def __init__(self, embedder, batcher: DynamicBatcher):
        self.embedder = embedder
        self.batcher = batcher

    @property
    def preprocessor(self):
        return self.embedder.preprocessor

    @property
    def channel_order(self) -> str:
        return self.embedder.channel_order

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def threshold(self):
        return self.embedder.threshold

    def submit(self, inputs, channel_order: str | None = None) -> list[Future]:
        """One future per input, resolved to its (D,) unit embedding; the worker decodes
        and preprocesses the input when its batch runs, and an unreadable input's future
        raises `ImageLoadError` naming it and its index. All are queued or none
        (`OverloadedError`)."""
        return self.batcher.submit_many(self._loaders(as_input_list(inputs), channel_order))

    def embed(self, inputs, *, channel_order: str | None = None) -> np.ndarray:
        """(N, D) float32 unit embeddings of `inputs`, through the batcher (blocks); the
        first unreadable input raises its `ImageLoadError`."""
        items = as_input_list(inputs)
        vectors = self.batcher.run(self._loaders(items, channel_order))
        return check_finite_rows(vectors, items)

    def _loaders(self, items: list, channel_order: str | None) -> list[Callable[[], np.ndarray]]:
        """Per item, what the batcher's worker calls to preprocess it."""
        return [partial(self._preprocess, item, channel_order, n) for n, item in enumerate(items)]

    def _preprocess(self, item, channel_order: str | None, index: int) -> np.ndarray:
        try:
            return self.embedder.preprocess(item, channel_order, index=index)
        except ImageLoadError as error:
            raise without_traceback(error) from None


def check_finite_rows(vectors: np.ndarray, items) -> np.ndarray:
    """`vectors`, unless a row holds NaN or infinity (`NonFiniteError` naming its input:
    a broken checkpoint or normalisation would otherwise score NaN against everything)."""
    bad = ~np.all(np.isfinite(vectors), axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteError(
            f"the model produced NaN or infinite embeddings for {int(bad.sum())} input(s), "
            f"first input #{first} ({describe_input(items[first])})"
        )
    return vectors
