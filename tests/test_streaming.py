import io
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import soundfile
import soxr

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.errors import InputError  # noqa: E402
from polysense.inference.streaming import encode_streams  # noqa: E402


@pytest.fixture(scope="module")
def pipe(bundle):
    return polysense.Pipeline.load(bundle, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def speech(fsdd_file):
    samples, rate = soundfile.read(fsdd_file, dtype="int16")
    return samples, rate


def _offline_frames(pipe, samples, rate):
    """Log-mel frames offline preprocessing makes of the recording (the bundle's own audio settings)."""
    settings = pipe.description.preprocessing.audio
    return polysense.AudioPreprocessor(**settings.front_end())(samples, sample_rate=rate).shape[0]


def _stream_in_chunks(pipe, samples, rate, sizes):
    stream = pipe.audio_stream()
    start, frames = 0, 0
    for size in [*sizes, samples.shape[0]]:
        if start >= samples.shape[0]:
            break
        frames += stream.accept_waveform(samples[start : start + size], rate)
        start += size
        # Never ahead of the input: no more frames than the audio so far holds (10 ms each). The resampler
        # releases output in blocks, so a one-sample chunk may complete several frames at once.
        assert frames <= min(start, samples.shape[0]) * 100 / rate + 1
    frames += stream.input_finished()
    return stream, frames


def _chunkings(length, rate, rng):
    yield "one sample", [1] * length
    yield "10 ms", [rate // 100] * (length // (rate // 100) + 1)
    yield "unaligned random", list(rng.integers(1, 997, length))
    yield "all at once", [length]


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_streaming_equals_offline_for_any_chunking_and_rate(pipe, speech, rate):
    samples, native = speech
    if rate != native:  # the same real recording, delivered at another rate
        samples = soxr.resample(samples.astype(np.float32) / 32768, native, rate).astype(np.float32)
    offline = pipe.predict(audio=samples, sample_rate=rate)
    offline_frames = _offline_frames(pipe, samples, rate)
    rng = np.random.default_rng(rate)
    for name, sizes in _chunkings(samples.shape[0], rate, rng):
        if name == "one sample" and rate > 16000:
            sizes = list(rng.integers(1, 40, samples.shape[0]))  # keep the test fast at high rates
        stream, frames = _stream_in_chunks(pipe, samples, rate, sizes)
        result = stream.result()
        np.testing.assert_allclose(
            result.embeddings["audio"], offline.embeddings["audio"], atol=1e-4, err_msg=name
        )
        assert result.label == offline.label, name
        # Work is proportional to the input: every frame goes through the encoder exactly once.
        assert frames == stream.frames_processed == offline_frames, name


def _good_chunks(speech):
    samples, rate = speech
    return [samples[i : i + 700] for i in range(0, samples.shape[0], 700)], rate


@pytest.mark.parametrize(
    "bad, rate, message",
    [
        (np.array([0.1, np.nan], np.float32), None, "NaN"),
        (np.array([np.inf, 0.0], np.float32), None, "NaN or Inf"),
        (np.zeros(10, np.complex64), None, "dtype"),
        (np.zeros((2, 3, 4), np.int16), None, "dimensions"),
        ([1, 2, 3], None, "numpy array"),
        (np.zeros(10, np.int16), 16000, "changed mid-stream"),
        (np.zeros(10, np.int16), 0, "positive"),
        (np.zeros(10, np.int16), -8000, "positive"),
    ],
)
def test_a_rejected_chunk_leaves_the_stream_as_it_was(pipe, speech, bad, rate, message):
    chunks, native = _good_chunks(speech)
    clean = pipe.audio_stream()
    for chunk in chunks:
        clean.accept_waveform(chunk, native)
    clean.input_finished()

    stream = pipe.audio_stream()
    for index, chunk in enumerate(chunks):
        stream.accept_waveform(chunk, native)
        if index == 2:
            with pytest.raises(InputError, match=message):
                stream.accept_waveform(bad, native if rate is None else rate)
            assert stream.accept_waveform(np.zeros(0, np.int16), native) == 0  # an empty chunk is a no-op
    stream.input_finished()
    np.testing.assert_array_equal(stream.result().embeddings["audio"], clean.result().embeddings["audio"])
    assert stream.frames_processed == clean.frames_processed
    with pytest.raises(InputError, match="after input_finished"):
        stream.accept_waveform(chunks[0], native)


def test_reset_and_independent_streams(pipe, speech):
    samples, rate = speech
    first, second = pipe.audio_stream(), pipe.audio_stream()
    # Interleaved: the two streams share sessions but nothing else.
    for start in range(0, samples.shape[0], 500):
        first.accept_waveform(samples[start : start + 500], rate)
        second.accept_waveform(samples[::-1][start : start + 500], rate)
    first.input_finished()
    second.input_finished()
    np.testing.assert_allclose(
        first.result().embeddings["audio"],
        pipe.predict(audio=samples, sample_rate=rate).embeddings["audio"],
        atol=1e-4,
    )
    first.reset()
    assert first.embedding is None and first.frames_processed == 0
    first.accept_waveform(samples[::-1].copy(), rate)
    first.input_finished()
    np.testing.assert_allclose(
        first.result().embeddings["audio"], second.result().embeddings["audio"], atol=1e-5
    )
    with pytest.raises(InputError, match="nothing to fuse"):
        pipe.audio_stream().result()


def test_batched_streams_equal_streams_run_alone(pipe, speech):
    samples, rate = speech
    recordings = [samples, samples[::-1].copy(), (samples // 2).astype(np.int16)]
    alone, deferred = [], [pipe.audio_stream(encode=False) for _ in recordings]
    for recording in recordings:
        stream = pipe.audio_stream()
        stream.accept_waveform(recording, rate)
        stream.input_finished()
        alone.append(stream.result().embeddings["audio"])
    for start in range(0, samples.shape[0], 800):
        for stream, recording in zip(deferred, recordings):
            stream.accept_waveform(recording[start : start + 800], rate)
        encode_streams(deferred)  # one encoder call for all three (equal frame counts)
    for stream in deferred:
        stream.input_finished()
    encode_streams(deferred)
    for stream, expected in zip(deferred, alone):
        np.testing.assert_allclose(stream.result().embeddings["audio"], expected, atol=1e-5)


def test_text_and_image_are_fused_with_the_stream(pipe, speech, split_manifest):
    from polysense.tools.manifest import read_manifest

    row = [r for r in read_manifest(split_manifest).rows if r.split == "test"][0]
    samples, rate = speech
    stream = pipe.audio_stream()
    stream.set_text(row.text)
    stream.set_image(row.image)
    stream.accept_waveform(samples, rate)
    stream.input_finished()
    streamed = stream.result()
    offline = pipe.predict(image=row.image, text=row.text, audio=samples, sample_rate=rate)
    assert list(streamed.embeddings) == ["image", "text", "audio"]
    np.testing.assert_allclose(
        list(streamed.probabilities.values()), list(offline.probabilities.values()), atol=1e-4
    )


@pytest.fixture(scope="module")
def sign_video(sign_photo, tmp_path_factory):
    """A 4 s, 10 fps video made of real sign-digit photos (each photo held for 0.5 s)."""
    photos = sorted(sign_photo.parent.parent.glob("*/*.JPG"))[:8]
    path = tmp_path_factory.mktemp("video") / "signs.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (100, 100))
    assert writer.isOpened()
    for photo in photos:
        frame = cv2.resize(cv2.imread(str(photo)), (100, 100))
        for _ in range(5):
            writer.write(frame)
    writer.release()
    return path


def test_video_stream_samples_at_the_target_rate_and_averages_a_window(pipe, sign_video):
    video = pipe.video_stream(sign_video, fps=2.0, window=3)
    times = list(video.run())
    assert video.frames_seen == 40
    assert times == pytest.approx([0.5 * i for i in range(8)])
    frames = [frame for t, frame in video.frames() if any(abs(t - s) < 1e-6 for s in times[-3:])]
    expected = np.mean([pipe.embed([{"image": f}]).vectors["image"][0] for f in frames], axis=0)
    np.testing.assert_allclose(video.embedding, expected, atol=1e-5)
    with pytest.raises(InputError, match="cannot open"):
        list(pipe.video_stream("missing.avi").run())


def test_video_stream_result_fuses_the_window_and_text(pipe, sign_video, split_manifest):
    from polysense.tools.manifest import read_manifest

    text = [r for r in read_manifest(split_manifest).rows if r.split == "test"][0].text
    video = pipe.video_stream(sign_video, fps=2.0, window=3)
    with pytest.raises(InputError, match="nothing to fuse"):
        video.result()
    list(video.run())
    video.set_text(text)
    fused = video.result()
    assert set(fused.embeddings) == {"image", "text"}
    np.testing.assert_allclose(fused.embeddings["image"], video.embedding)
    video.set_text(None)
    assert set(video.result().embeddings) == {"image"}


def test_streams_of_two_pipelines_are_encoded_by_their_own_engines(pipe, bundle, speech):
    samples, rate = speech
    other = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    streams = [pipe.audio_stream(encode=False), other.audio_stream(encode=False)]
    for stream in streams:
        stream.accept_waveform(samples, rate)
        stream.input_finished()
    with pytest.raises(InputError, match="another pipeline"):
        streams[0].engine.encode_streams(streams)
    encode_streams(streams)  # groups them by engine
    expected = pipe.predict(audio=samples, sample_rate=rate).embeddings["audio"]
    for stream in streams:
        assert stream.pending_frames.shape[0] == 0
        np.testing.assert_allclose(stream.result().embeddings["audio"], expected, atol=1e-5)


def test_cli_stream_prints_a_timeline(bundle, fsdd_file, sign_video, speech):
    from polysense.cli.main import main

    out = io.StringIO()
    sys_stdout = sys.stdout
    sys.stdout = out
    try:
        assert (
            main(
                [
                    "stream",
                    str(bundle),
                    "--audio",
                    str(fsdd_file),
                    "--video",
                    str(sign_video),
                    "--text",
                    "a calm day",
                    "--chunk-ms",
                    "100",
                    "--json",
                ]
            )
            == 0
        )
    finally:
        sys.stdout = sys_stdout
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[-1]["final"] and events[-1]["modalities"] == ["image", "text", "audio"]
    assert [e["time"] for e in events[:-1]] == sorted(e["time"] for e in events[:-1])
    samples, rate = speech
    pipe = polysense.Pipeline.load(bundle, device="cpu")
    assert sum(e["audio_frames"] for e in events) == _offline_frames(pipe, samples, rate)


def test_cli_stream_reads_pcm_from_stdin(bundle, speech):
    samples, rate = speech
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polysense.cli.main",
            "stream",
            str(bundle),
            "--audio",
            "-",
            "--sample-rate",
            str(rate),
            "--chunk-ms",
            "20",
            "--json",
        ],
        input=samples.astype("<i2").tobytes(),
        capture_output=True,
        check=True,
    )
    final = json.loads(result.stdout.decode().splitlines()[-1])
    offline = polysense.Pipeline.load(bundle, device="cpu").predict(audio=samples, sample_rate=rate)
    assert final["final"] and final["label"] == offline.label
