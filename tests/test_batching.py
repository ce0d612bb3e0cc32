"""`embedding.batching`: the dynamic batcher (rows back to their callers, batches bounded by
max_batch and the timeout, the bounded queue all-or-nothing, errors to every caller, close
drains) and `BatchedEmbedder`, with a numpy stand-in for the model."""

import threading
import time

import numpy as np
import pytest

from embedding.batching import (
    BatchedEmbedder,
    BatcherClosedError,
    DynamicBatcher,
    OverloadedError,
)
from embedding.errors import ImageLoadError
from embedding.preprocess import Preprocessor

pytestmark = pytest.mark.once("jax")  # numpy and threads only


class Model:
    """(N, 2) -> (N, 2) rows * 10, recording the size of each call; `gate` holds calls."""

    def __init__(self, gate: threading.Event | None = None, fail=None):
        self.sizes = []
        self.gate = gate
        self.fail = fail

    def __call__(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        self.sizes.append(len(batch))
        if self.fail is not None:
            raise self.fail
        return batch * 10.0


def test_rows_return_to_their_callers_in_shared_batches():
    model = Model()
    batcher = DynamicBatcher(model, max_batch=4, timeout_s=0.05)
    results, start = {}, threading.Barrier(12)

    def caller(i):
        start.wait()
        results[i] = batcher.submit(np.array([i, -i], np.float32)).result(10)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    for i in range(12):
        np.testing.assert_array_equal(results[i], [10.0 * i, -10.0 * i])
    assert sum(model.sizes) == 12 and max(model.sizes) <= 4
    assert len(model.sizes) < 12  # callers shared model calls


def test_max_batch_one_runs_each_alone_and_a_lone_item_waits_at_most_the_timeout():
    model = Model()
    batcher = DynamicBatcher(model, max_batch=1, timeout_s=5.0)
    futures = batcher.submit_many([np.ones(2, np.float32)] * 5)
    assert [f.result(10)[0] for f in futures] == [10.0] * 5
    assert model.sizes == [1] * 5  # a full batch of one never waits for the timeout
    batcher.close()

    waiting = DynamicBatcher(Model(), max_batch=8, timeout_s=0.3)
    start = time.monotonic()
    waiting.submit(np.zeros(2, np.float32)).result(10)
    elapsed = time.monotonic() - start
    assert 0.25 < elapsed < 3.0  # waited for company, then went alone
    waiting.close()


def test_the_bounded_queue_takes_all_of_a_request_or_none():
    gate = threading.Event()
    batcher = DynamicBatcher(Model(gate), max_batch=1, timeout_s=0.0, max_queue=3)
    running = batcher.submit(np.zeros(2, np.float32))  # taken by the worker, held at the gate
    deadline = time.monotonic() + 10
    while batcher.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = batcher.submit_many([np.zeros(2, np.float32)] * 2)
    with pytest.raises(OverloadedError, match="queue is full") as refused:
        batcher.submit_many([np.zeros(2, np.float32)] * 2)  # one place left, two asked
    assert refused.value.retry_after >= 1
    assert batcher.queue_depth == 2  # nothing of the refused request was queued
    with pytest.raises(OverloadedError, match="more than the queue holds") as never:
        batcher.submit_many([np.zeros(2, np.float32)] * 4)
    assert never.value.retry_after == 0  # will never fit: not a matter of waiting
    gate.set()
    assert [f.result(10)[0] for f in [running, *queued]] == [0.0] * 3
    batcher.close()


def test_a_failing_model_call_reaches_every_caller_and_the_worker_goes_on():
    model = Model(fail=RuntimeError("boom"))
    batcher = DynamicBatcher(model, max_batch=4, timeout_s=0.05)
    futures = batcher.submit_many([np.zeros(2, np.float32)] * 3)
    for future in futures:
        with pytest.raises(RuntimeError, match="boom"):
            future.result(10)
    model.fail = None
    assert batcher.submit(np.ones(2, np.float32)).result(10)[0] == 10.0
    batcher.close()


def test_callable_items_are_made_by_the_worker_between_model_calls_and_fail_alone():
    """A callable item (an upload to decode) is called by the worker's pool just before its
    batch runs, never while the model runs; one that raises fails only its own future."""
    events, lock = [], threading.Lock()

    def record(what):
        with lock:
            events.append((what, time.monotonic()))

    def model(batch):
        record("model start")
        time.sleep(0.05)
        record("model end")
        return batch * 10.0

    def make(value):
        def prepare():
            record("prepare start")
            time.sleep(0.01)
            record("prepare end")
            if value == 3:
                raise ImageLoadError("bytes", "not a readable image", index=3)
            return np.full(2, value, np.float32)

        return prepare

    batcher = DynamicBatcher(model, max_batch=4, timeout_s=0.05, prepare_threads=2)
    callers = [threading.Thread(target=lambda i=i: futures.__setitem__(i, batcher.submit(make(i))))
               for i in range(8)]  # fmt: skip
    futures = [None] * 8
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    for i, future in enumerate(futures):
        if i == 3:
            with pytest.raises(ImageLoadError, match="input #3"):
                future.result(10)
        else:
            assert future.result(10)[0] == 10.0 * i
    batcher.close()
    running = 0  # model calls in progress at each event
    for what, _ in sorted(events, key=lambda event: event[1]):
        running += {"model start": 1, "model end": -1}.get(what, 0)
        if what.startswith("prepare"):
            assert running == 0, "an item was prepared while the model ran"
    assert sum(what == "prepare start" for what, _ in events) == 8


def test_close_finishes_the_queue_then_refuses_work():
    gate = threading.Event()
    batcher = DynamicBatcher(Model(gate), max_batch=2, timeout_s=0.0)
    futures = batcher.submit_many([np.full(2, i, np.float32) for i in range(5)])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [f.result(0)[0] for f in futures] == [0.0, 10.0, 20.0, 30.0, 40.0]
    with pytest.raises(BatcherClosedError):
        batcher.submit(np.zeros(2, np.float32))


class StandInEmbedder:
    """What BatchedEmbedder needs of an embedder: preprocess, embed_arrays, dim, ..."""

    def __init__(self):
        self.preprocessor = Preprocessor({"input_size": (3, 8, 8), "crop_pct": 1.0})
        self.channel_order = "rgb"
        self.dim = 3
        self.threshold = None

    def preprocess(self, item, channel_order=None, data_format=None, *, index=None):
        return self.preprocessor(item, channel_order or "rgb", index)

    def embed_arrays(self, batch):
        means = batch.mean(axis=(1, 2))
        return means / np.linalg.norm(means, axis=1, keepdims=True)


def test_batched_embedder_embeds_like_the_embedder_and_names_a_bad_input():
    embedder = StandInEmbedder()
    batcher = DynamicBatcher(embedder.embed_arrays, max_batch=2, timeout_s=0.01)
    batched = BatchedEmbedder(embedder, batcher)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (12, 10, 3), dtype=np.uint8) for _ in range(5)]
    expected = embedder.embed_arrays(np.stack([embedder.preprocess(i) for i in images]))
    np.testing.assert_allclose(batched.embed(images), expected, rtol=1e-6)
    with pytest.raises(ImageLoadError, match=r"input #1 .*not a readable image"):
        batched.embed([images[0], b"not an image"])
    batcher.close()
