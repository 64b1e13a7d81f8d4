"""A dynamic batcher: concurrent predictions grouped into model runs, usable without any HTTP.

Each caller prepares its own sample (decode, resize, tokenize, log-mel: `Pipeline.prepare`) on its own thread,
so a bad input fails at once and only for that caller. Prepared samples wait in one queue per modality subset;
a single worker thread takes the oldest request's subset and runs up to `max_batch` of them through the
encoders and the fusion head at once.

The worker never waits when there is nothing to wait for: batches form by themselves under load, from the
requests that arrived while the previous batch ran. With `max_wait_ms` > 0, and only while the load is evidently
concurrent (the last batch held more than one request), the worker also waits that long for a batch to fill:
worth it where a model run costs much more than a request's own handling (large models, GPUs). The default is
0: on the built-in bundle on 2 cores, waiting 2 ms cut 4 clients' throughput from 1,274 (unbatched) to 884
requests/s, as the clients fell into lock-step with the wait (an earlier run of benchmarks/serving.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Generic

from polysense.errors import ConfigError, InputError, OverloadedError, RequestTimeoutError
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import EmbeddingsT, Predictor, PreparedSample, PreparedT


@dataclass(frozen=True)
class BatcherOptions:
    """max_batch: requests per model run; max_wait_ms: how long a batch may wait to fill under load;
    max_queue: requests waiting at most (beyond it OverloadedError, at once); timeout_s: a request still
    waiting after this long is dropped with RequestTimeoutError."""

    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 256
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"max_batch must be 1-4096, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms must be 0-10000, got {self.max_wait_ms}")
        if not 1 <= self.max_queue <= 1_000_000:
            raise ConfigError(f"max_queue must be 1-1000000, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass
class _Request(Generic[PreparedT]):
    prepared: PreparedT
    future: Future[Prediction]
    enqueued: float
    deadline: float


class ServiceTime:
    """An EWMA of the seconds one sample costs a server while it is busy: how fast its queue drains now,
    batching and contention for the CPU included. Fed with (busy seconds, samples done in them);
    `per_sample_s` is 0 until a first observation. One float, written by one thread, read from any."""

    def __init__(self, alpha: float = 0.02) -> None:
        """`alpha`: the weight of each new observation. 0.02 follows a change within about 50 departures (a
        few tens of ms under load) while one stall of the process (10 ms on a shared core) moves the
        estimate by a fifth of a millisecond, not by one."""
        if not 0 < alpha <= 1:
            raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.per_sample_s = 0.0

    def observe(self, seconds: float, samples: int) -> None:
        """One batch of `samples` that took `seconds` of wall time."""
        if samples < 1 or not seconds >= 0:
            return
        sample = seconds / samples
        self.per_sample_s = (
            sample if not self.per_sample_s else self.per_sample_s + self.alpha * (sample - self.per_sample_s)
        )

    def wait_s(self, samples_ahead: int) -> float:
        """The expected wait of a request behind `samples_ahead` samples."""
        return samples_ahead * self.per_sample_s


@dataclass
class BatcherStats:
    """Counters since the batcher started (read them from any thread; they only grow)."""

    batches: int = 0
    requests: int = 0
    dropped_cancelled: int = 0
    dropped_timeout: int = 0
    rejected_full: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> how many batches had it

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class DynamicBatcher(Generic[PreparedT, EmbeddingsT]):
    """Groups concurrent `predict` calls on one Pipeline (or Ensemble) into batches. Thread-safe; close() when
    done.

    with DynamicBatcher(pipe, BatcherOptions(max_batch=16)) as batcher:
        prediction = batcher.predict({"text": "a dog barking"})      # from any number of threads
        future = batcher.submit({"image": "cat.jpg"})               # or without blocking
    """

    def __init__(
        self,
        pipeline: Predictor[PreparedT, EmbeddingsT],
        options: BatcherOptions | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`pipeline`: a polysense.Pipeline or Ensemble (a polysense.Predictor); `on_batch(size)` is called on
        the worker thread after each model run (for metrics)."""
        self.pipeline = pipeline
        self.options = options or BatcherOptions()
        self.stats = BatcherStats()
        self._on_batch = on_batch
        self._queues: dict[str, deque[_Request[PreparedT]]] = {}
        self._depth = 0
        self._last_batch_size = 0
        self._closed = False
        self._condition = threading.Condition()
        self._worker = threading.Thread(target=self._serve, name="polysense-batcher", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a model run."""
        return self._depth

    # -- callers' side -------------------------------------------------------------------------------------

    def submit(self, sample: dict | PreparedT) -> Future[Prediction]:
        """Queue one sample (a dict, or what the pipeline's `prepare` made of one); the Future's result is its
        Prediction. Preparation happens here, on the caller's thread: a bad input raises InputError now. A full
        queue raises OverloadedError now. Cancel the Future to withdraw the request; a cancelled request is
        dropped before it reaches the model."""
        if isinstance(sample, dict):
            prepared = self.pipeline.prepare(sample)
        elif isinstance(getattr(sample, "subset", None), str):
            # What a prepare made: a Pipeline's Prepared, an Ensemble's EnsemblePrepared. The model run refuses
            # one that another pipeline made (as predict_batch does).
            prepared = sample
        else:
            raise InputError(
                "submit takes a sample dict like {'image': ..., 'text': ...} or what the pipeline's prepare made "
                f"of one, got {type(sample).__name__}"
            )
        now = time.perf_counter()
        request: _Request[PreparedT] = _Request(prepared, Future(), now, now + self.options.timeout_s)
        with self._condition:
            if self._closed:
                raise OverloadedError("the batcher is shutting down; send the request elsewhere")
            if self._depth >= self.options.max_queue:
                self.stats.rejected_full += 1
                raise OverloadedError(
                    f"the queue is full ({self.options.max_queue} requests waiting); retry shortly",
                    retry_after_s=1.0,
                )
            self._queues.setdefault(prepared.subset, deque()).append(request)
            self._depth += 1
            self._condition.notify()
        return request.future

    def predict(self, sample: dict | PreparedT, timeout: float | None = None) -> Prediction:
        """Submit and wait for the Prediction (at most `timeout` s, default the options' timeout_s)."""
        future = self.submit(sample)
        try:
            return future.result(timeout=self.options.timeout_s if timeout is None else timeout)
        except FutureTimeout:
            future.cancel()
            raise RequestTimeoutError(
                f"no answer within {timeout or self.options.timeout_s:g} s; the server is overloaded"
            ) from None

    def close(self) -> None:
        """Stop accepting requests, answer every queued one, stop the worker."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._worker.join()

    def __enter__(self) -> DynamicBatcher[PreparedT, EmbeddingsT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the worker ----------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Request[PreparedT]] | None:
        options = self.options
        with self._condition:
            while not self._depth and not self._closed:
                self._condition.wait()
            if not self._depth:
                return None  # closed and drained
            queue = min((q for q in self._queues.values() if q), key=lambda q: q[0].enqueued)
            batch = [queue.popleft() for _ in range(min(len(queue), options.max_batch))]
            if self._last_batch_size > 1 and options.max_wait_ms > 0:
                until = batch[0].enqueued + options.max_wait_ms / 1000
                while len(batch) < options.max_batch and not self._closed:
                    if queue:
                        batch.append(queue.popleft())
                        continue
                    left = until - time.perf_counter()
                    if left <= 0:
                        break
                    self._condition.wait(left)
            self._depth -= len(batch)
            self._last_batch_size = len(batch)
            return batch

    def _run(self, batch: list[_Request[PreparedT]]) -> None:
        now = time.perf_counter()
        live = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                self.stats.dropped_cancelled += 1  # the caller went away
            elif now > request.deadline:
                self.stats.dropped_timeout += 1
                request.future.set_exception(
                    RequestTimeoutError(
                        f"waited {now - request.enqueued:.1f} s in the queue, over timeout_s="
                        f"{self.options.timeout_s:g}; the server is overloaded"
                    )
                )
            else:
                live.append(request)
        if not live:
            return
        for request, result in zip(live, predict_each(self.pipeline, [r.prepared for r in live])):
            if isinstance(result, Exception):
                request.future.set_exception(result)  # the caller gets it; the worker lives on
            else:
                timed = with_own_preprocessing(result, request.prepared)
                timed.timings["queue"] = (now - request.enqueued) * 1000
                request.future.set_result(timed)
        self.stats.batches += 1
        self.stats.requests += len(live)
        self.stats.batch_sizes[len(live)] = self.stats.batch_sizes.get(len(live), 0) + 1
        if self._on_batch is not None:
            self._on_batch(len(live))


def predict_each(
    pipeline: Predictor[PreparedT, EmbeddingsT], batch: Sequence[PreparedT]
) -> list[Prediction | Exception]:
    """Model runs of `batch`, one per modality subset; a run that fails is retried sample by sample, so only
    the sample at fault gets the error (in its place in the result) and its batch mates their predictions."""
    results: list[Prediction | Exception] = [ValueError("not run")] * len(batch)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(batch):
        groups.setdefault(item.subset, []).append(index)
    for rows in groups.values():
        try:
            for row, prediction in zip(rows, pipeline.predict_batch([batch[r] for r in rows])):
                results[row] = prediction
        except Exception:
            for row in rows:
                try:
                    results[row] = pipeline.predict_batch([batch[row]])[0]
                except Exception as error:
                    results[row] = error
    return results


def with_own_preprocessing(prediction: Prediction, prepared: PreparedSample) -> Prediction:
    """The batch's model timings with this sample's own preprocessing (the batch's is a sum over samples)."""
    timings = {k: v for k, v in prediction.timings.items() if not k.startswith("preprocess_")}
    return replace(prediction, timings={**timings, **prepared.timings})
