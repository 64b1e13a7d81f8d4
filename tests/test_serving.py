"""Serving without HTTP: one Pipeline shared by threads, the dynamic batcher, live streams batched together."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile

pytest.importorskip("onnxruntime")

from polysense import Ensemble, Pipeline  # noqa: E402
from polysense.errors import ConfigError, InputError, OverloadedError, RequestTimeoutError  # noqa: E402
from polysense.inference.fusion import Prediction, Prepared  # noqa: E402
from polysense.serving import BatcherOptions, DynamicBatcher, StreamEncoder  # noqa: E402

SUBSETS = [
    ("text",),
    ("image",),
    ("audio",),
    ("image", "text"),
    ("text", "audio"),
    ("image", "text", "audio"),
]


@pytest.fixture(scope="module")
def rows(test_rows):
    return test_rows[:12]


def _samples(rows):
    """Every subset of every row: mixed subsets, as concurrent callers send them."""
    return [{m: getattr(row, m) for m in subset} for row in rows for subset in SUBSETS]


def _probs(prediction):
    return np.array(list(prediction.probabilities.values()))


def test_one_pipeline_shared_by_eight_threads_gives_the_single_threaded_results(pipe, rows):
    samples = _samples(rows)
    reference = [_probs(pipe.predict(**s)) for s in samples]
    audio, rate = soundfile.read(rows[0].audio, dtype="int16")
    stream_reference = _probs(pipe.predict(audio=rows[0].audio, text=rows[0].text))

    def predict_all(offset):
        order = [(i + offset) % len(samples) for i in range(len(samples))]  # threads collide on all subsets
        return {i: _probs(pipe.predict(**samples[i])) for i in order}

    def stream_one(chunk):
        stream = pipe.audio_stream()
        stream.set_text(rows[0].text)
        for start in range(0, audio.size, chunk):
            stream.accept_waveform(audio[start : start + chunk], rate)
        stream.input_finished()
        return _probs(stream.result())

    with ThreadPoolExecutor(8) as pool:
        predicted = [pool.submit(predict_all, 7 * t) for t in range(6)]
        streamed = [pool.submit(stream_one, chunk) for chunk in (160, 333, 800, 1601)]
        for future in predicted:
            for index, probs in future.result().items():
                np.testing.assert_array_equal(probs, reference[index])
        for future in streamed:
            np.testing.assert_allclose(future.result(), stream_reference, atol=1e-6)


def test_batcher_results_equal_pipeline_predict_and_batches_form_under_load(pipe, rows):
    samples = _samples(rows)
    reference = [pipe.predict(**s) for s in samples]
    with DynamicBatcher(pipe, BatcherOptions(max_batch=8, max_wait_ms=5)) as batcher:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(batcher.predict, samples))
        stats = batcher.stats
    for prediction, expected in zip(got, reference):
        assert prediction.label == expected.label
        np.testing.assert_allclose(_probs(prediction), _probs(expected), atol=1e-5)
        assert prediction.timings["queue"] >= 0
    assert stats.requests == len(samples)
    assert max(stats.batch_sizes) > 1  # 16 concurrent callers: some requests shared a model run
    assert max(stats.batch_sizes) <= 8


def test_a_bad_input_fails_at_submit_on_the_callers_thread(pipe):
    with DynamicBatcher(pipe) as batcher:
        with pytest.raises(InputError, match="no input given"):
            batcher.submit({})
        with pytest.raises(InputError, match="has no|unknown input"):
            batcher.submit({"video": "x"})
        assert batcher.predict({"text": "still serving"}).label in pipe.labels


def test_a_batcher_on_an_ensemble_takes_what_its_prepare_made_without_preparing_it_again(
    pipe, other_bundle, rows
):
    ensemble = Ensemble([pipe, Pipeline.load(other_bundle, device="cpu", precision="fp32")])
    samples = _samples(rows[:2])
    prepared = [ensemble.prepare(s) for s in samples]
    expected = ensemble.predict_batch(prepared)
    prepare, calls = ensemble.prepare, []

    def counted(sample):  # prepare is declared for sample dicts (Ensemble's passes its own output through)
        calls.append(type(sample).__name__)
        return prepare(sample)

    ensemble.prepare = counted
    with DynamicBatcher(ensemble) as batcher:
        got = [future.result(10) for future in [batcher.submit(p) for p in prepared]]
        assert calls == []  # once prepared is enough: the batcher queues an EnsemblePrepared as it is
        assert batcher.predict(samples[0]).label == expected[0].label and calls == ["dict"]
        with pytest.raises(InputError, match="sample dict .* got str"):
            batcher.submit("a dog barking")
    for prediction, reference in zip(got, expected):
        np.testing.assert_allclose(_probs(prediction), _probs(reference), atol=1e-5)
        assert prediction.timings["queue"] >= 0
    # What another pipeline prepared reaches the model run, which refuses it (for that request alone).
    with DynamicBatcher(pipe) as batcher:
        with pytest.raises(InputError, match="got EnsemblePrepared"):
            batcher.submit(prepared[0]).result(10)
        assert batcher.predict(pipe.prepare(samples[0])).label in pipe.labels


class FakePipeline:
    """Records the batches it runs; `gate` holds the worker inside a model run until set; a sample whose text
    is 'poison' fails any batch it is in (as a model run failing for one input would)."""

    labels = ("a", "b")

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def prepare(self, sample):
        if not sample:
            raise InputError("no input given")
        return Prepared({m: np.asarray(v) for m, v in sample.items()})

    def predict_batch(self, prepared):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append([(p.subset, str(next(iter(p.features.values())))) for p in prepared])
        if any(str(v) == "poison" for p in prepared for v in p.features.values()):
            raise RuntimeError("the model failed on one input")
        return [Prediction("a", {"a": 1.0, "b": 0.0}, {}, {"total": 1.0}) for _ in prepared]


def _hold_worker(fake, batcher):
    """Occupy the worker with one request inside a model run; return its future."""
    fake.gate.clear()
    fake.entered.clear()
    held = batcher.submit({"text": "held"})
    assert fake.entered.wait(5)
    return held


def test_requests_wait_per_subset_and_batch_up_to_max_batch():
    fake = FakePipeline()
    with DynamicBatcher(fake, BatcherOptions(max_batch=3, max_wait_ms=0)) as batcher:
        held = _hold_worker(fake, batcher)
        futures = [batcher.submit({"text": f"t{i}"}) for i in range(4)]
        futures += [batcher.submit({"image": f"i{i}"}) for i in range(2)]
        fake.gate.set()
        for future in [held, *futures]:
            future.result(5)
    sizes = [len(b) for b in fake.batches]
    assert sizes == [1, 3, 1, 2]  # the oldest request first (t3 came before the images), at most max_batch
    assert all(len({subset for subset, _ in batch}) == 1 for batch in fake.batches)


def test_a_lone_request_never_waits_for_a_batch_to_fill():
    fake = FakePipeline()
    # A batcher that waited for max_wait_ms would not answer within the 5 s below.
    with DynamicBatcher(fake, BatcherOptions(max_batch=64, max_wait_ms=10_000)) as batcher:
        for _ in range(3):
            assert batcher.predict({"text": "alone"}, timeout=5).label == "a"


def test_one_failing_request_does_not_fail_its_batch_mates():
    fake = FakePipeline()
    with DynamicBatcher(fake, BatcherOptions(max_batch=8, max_wait_ms=0)) as batcher:
        held = _hold_worker(fake, batcher)
        good = [batcher.submit({"text": f"ok{i}"}) for i in range(3)]
        bad = batcher.submit({"text": "poison"})
        fake.gate.set()
        held.result(5)
        assert all(f.result(5).label == "a" for f in good)
        with pytest.raises(RuntimeError, match="failed on one input"):
            bad.result(5)


def test_a_full_queue_is_refused_at_once_and_cancelled_requests_are_dropped():
    fake = FakePipeline()
    with DynamicBatcher(fake, BatcherOptions(max_batch=8, max_queue=2, max_wait_ms=0)) as batcher:
        held = _hold_worker(fake, batcher)
        kept = batcher.submit({"text": "kept"})
        gone = batcher.submit({"text": "gone"})
        with pytest.raises(OverloadedError, match="queue is full"):
            batcher.submit({"text": "one too many"})
        assert gone.cancel()  # the caller went away
        fake.gate.set()
        held.result(5)
        kept.result(5)
    assert batcher.stats.dropped_cancelled == 1 and batcher.stats.rejected_full == 1
    assert ("text", "gone") not in [item for batch in fake.batches for item in batch]


def test_a_request_past_its_timeout_is_dropped_with_a_clear_error():
    fake = FakePipeline()
    with DynamicBatcher(fake, BatcherOptions(timeout_s=0.05, max_wait_ms=0)) as batcher:
        held = _hold_worker(fake, batcher)
        late = batcher.submit({"text": "late"})
        time.sleep(0.2)
        fake.gate.set()
        held.result(5)
        with pytest.raises(RequestTimeoutError, match="timeout_s"):
            late.result(5)
        with pytest.raises(RequestTimeoutError, match="no answer within"):
            fake.gate.clear()
            batcher.predict({"text": "waits too long"}, timeout=0.05)
        fake.gate.set()


def test_close_answers_what_is_queued_and_refuses_what_comes_after():
    fake = FakePipeline()
    batcher = DynamicBatcher(fake, BatcherOptions(max_wait_ms=0))
    held = _hold_worker(fake, batcher)
    queued = [batcher.submit({"text": f"q{i}"}) for i in range(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    fake.gate.set()
    closer.join(5)
    assert held.result(0).label == "a" and all(f.result(0).label == "a" for f in queued)
    with pytest.raises(OverloadedError, match="shutting down"):
        batcher.submit({"text": "too late"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"max_queue": 0}, "max_queue"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_batcher_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        BatcherOptions(**options)


def test_streams_encoded_together_equal_offline_prediction(pipe, rows):
    encoder = StreamEncoder()
    recordings = [soundfile.read(r.audio, dtype="float32") for r in rows[:6]]

    def run(index):
        samples, rate = recordings[index]
        stream = pipe.audio_stream(encode=False)
        for start in range(0, samples.size, 1000):
            if stream.accept_waveform(samples[start : start + 1000], rate):
                encoder.encode(stream).result(10)
        if stream.input_finished():
            encoder.encode(stream).result(10)
        return _probs(stream.result())

    try:
        with ThreadPoolExecutor(6) as pool:
            streamed = list(pool.map(run, range(len(recordings))))
    finally:
        encoder.close()
    for row, probs in zip(rows, streamed):
        np.testing.assert_allclose(probs, _probs(pipe.predict(audio=row.audio)), atol=1e-5)
    assert encoder.streams_encoded >= encoder.batches > 0


def test_service_time_is_an_ewma_of_busy_seconds_per_sample():
    from polysense.serving.batcher import ServiceTime

    estimate = ServiceTime(alpha=0.5)
    assert estimate.per_sample_s == 0 and estimate.wait_s(100) == 0  # nothing measured: no wait expected
    estimate.observe(0.004, 4)  # the first observation is the estimate
    assert estimate.per_sample_s == pytest.approx(0.001)
    estimate.observe(0.003, 1)
    assert estimate.per_sample_s == pytest.approx(0.002)
    estimate.observe(1.0, 0)  # nothing done: no observation
    assert estimate.wait_s(10) == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="alpha"):
        ServiceTime(alpha=0)
