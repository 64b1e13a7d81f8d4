"""Bring your own text and audio encoders: small torch encoders exported to ONNX as a user would (a text graph
with its tokenizer.json beside it; an audio graph over windows of samples) come back as `--text-encoder
onnx:PATH` and `--audio-encoder onnx:PATH`, train (only the heads on top), export, predict, serve and stream;
their graphs travel byte for byte; graphs outside the contracts are refused with the fix."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,  # torch, training, export
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the user-side TorchScript export below
]
torch = pytest.importorskip("torch")

import polysense  # noqa: E402
from polysense.errors import BundleError, ConfigError  # noqa: E402
from polysense.preprocess.audio import load_audio  # noqa: E402

WINDOW = 1600  # samples the audio graph takes (0.1 s at 16 kHz)
WORDS = "the a red green blue square circle triangle small large bright dark calm noisy quiet loud"


def _export_text(folder: Path, with_type_ids: bool = True) -> Path:
    """A text encoder as a user would bring it: token ids [N, L] (+ mask, type ids) -> hidden states [N, L, 12],
    written as model.onnx with the tokenizer.json that makes its ids beside it (Optimum's layout)."""
    from torch import nn

    from polysense.preprocess.text import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([WORDS] * 3)
    tokenizer.save(str(folder / "tokenizer.json"))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(tokenizer.get_vocab_size(), 12)
            self.mix = nn.Linear(12, 12)

        def forward(self, ids, mask, types):
            hidden = torch.tanh(self.mix(self.embed(ids)))
            return hidden * mask.unsqueeze(-1).float() + types.unsqueeze(-1).float()

    torch.manual_seed(0)
    ids = torch.ones(1, 5, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if not with_type_ids:
        Encoder.forward = lambda self, ids, mask: torch.tanh(self.mix(self.embed(ids))) * mask.unsqueeze(-1)  # type: ignore[method-assign]
        names = names[:2]
    torch.onnx.export(
        Encoder().eval(),
        (ids, ids, torch.zeros_like(ids))[: len(names)],
        str(folder / "model.onnx"),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={
            **{n: {0: "n", 1: "length"} for n in names},
            "last_hidden_state": {0: "n", 1: "length"},
        },
        dynamo=False,
    )
    return folder / "model.onnx"


def _export_audio(path: Path, window: int | None = WINDOW) -> Path:
    """An audio encoder over windows of samples: [N, WINDOW] -> [N, T, 10] (frames of a strided convolution)."""
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 10, 400, stride=160)

        def forward(self, samples):
            return torch.relu(self.conv(samples.unsqueeze(1))).transpose(1, 2)

    torch.manual_seed(0)
    axes = {"samples": {0: "n"} if window else {0: "n", 1: "s"}, "frames": {0: "n", 1: "t"}}
    torch.onnx.export(
        Encoder().eval(),
        (torch.randn(2, window or WINDOW),),
        str(path),
        input_names=["samples"],
        output_names=["frames"],
        dynamic_axes=axes,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def brought(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    folder = tmp_path_factory.mktemp("frozen_ta")
    text_graph = _export_text(folder / "text_model")
    audio_graph = _export_audio(folder / "audio_model.onnx")
    options = TrainOptions(
        data="builtin",
        builtin_n=240,
        out=str(folder / "run"),
        modalities=("text", "audio"),
        text_encoder=f"onnx:{text_graph}",
        audio_encoder=f"onnx:{audio_graph}",
        epochs=2,
        embed_dim=16,
        progress=False,
    )
    train(options)
    bundle = export_run(folder / "run", folder / "bundle", progress=False, policy=None).bundle
    return text_graph, audio_graph, Path(bundle), folder / "run"


def _rows(run: Path, count: int = 3) -> list[dict]:
    import csv

    with (run / "builtin_data" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))[-count:]
    for row in rows:
        row["audio"] = str(run / "builtin_data" / row["audio"])
    return rows


def test_the_graphs_and_tokenizer_travel_byte_for_byte(brought) -> None:
    text_graph, audio_graph, bundle, _ = brought
    preprocessing = polysense.Pipeline.load(bundle, device="cpu").description.preprocessing
    for settings, source in ((preprocessing.text, text_graph), (preprocessing.audio, audio_graph)):
        (graph,) = settings.graphs
        assert (bundle / graph.file).read_bytes() == source.read_bytes()
        assert graph.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert graph.source == str(source.resolve())
    tokenizer = (text_graph.parent / "tokenizer.json").read_bytes()
    assert (bundle / preprocessing.text.tokenizer).read_bytes() == tokenizer
    audio = preprocessing.audio
    assert (audio.front, audio.n_fft, audio.hop_length, audio.n_mels) == (
        "frozen-windows",
        WINDOW,
        WINDOW // 2,
        10,
    )


def test_predicts_serves_and_streams(brought) -> None:
    from starlette.testclient import TestClient

    from polysense.serving.http import create_app

    _, _, bundle, run = brought
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    text_input = pipeline.description.component("text_encoder").inputs
    assert [t.name for t in text_input] == ["vectors"] and text_input[0].shape[-1] == 12
    rng = np.random.default_rng(0)
    for row in _rows(run):
        expected = pipeline.predict(text=row["text"], audio=row["audio"])
        # a live stream of the recording in chunks of 1 to 900 samples equals the offline answer
        samples, rate = load_audio(row["audio"])
        stream = pipeline.audio_stream()
        start = 0
        while start < samples.size:
            size = int(rng.integers(1, 900))
            stream.accept_waveform(samples[start : start + size], rate)
            start += size
        stream.input_finished()
        audio_only = pipeline.predict(audio=row["audio"])
        streamed = stream.result()
        assert streamed.label == audio_only.label
        for label, p in audio_only.probabilities.items():
            assert streamed.probabilities[label] == pytest.approx(p, abs=1e-5)
    with TestClient(create_app(pipeline, warmed_up=True)) as client:
        audio_bytes = base64.b64encode(Path(row["audio"]).read_bytes()).decode()
        answer = client.post("/v1/predict", json={"text": row["text"], "audio": audio_bytes})
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] == expected.label
    for label, p in expected.probabilities.items():
        assert answer.json()["probabilities"][label] == pytest.approx(p, abs=1e-6)


def test_an_altered_graph_is_refused(brought, tmp_path) -> None:
    _, _, bundle, _ = brought
    for file in ("text_frozen.onnx", "audio_frozen.onnx"):
        copy = tmp_path / file
        shutil.copytree(bundle, copy)
        (copy / file).write_bytes((copy / file).read_bytes() + b"\0")
        with pytest.raises(BundleError, match=f"{file} does not match its sha256"):
            polysense.Pipeline.load(copy, device="cpu")


def test_windows_stream_as_offline_for_any_chunking(tmp_path) -> None:
    from polysense.preprocess.frozen_windows import WindowEncoder, WindowFrames

    encoder = WindowEncoder(_export_audio(tmp_path / "a.onnx").read_bytes(), None)
    assert (encoder.window, encoder.width) == (WINDOW, 10)
    samples = np.random.default_rng(1).uniform(-0.5, 0.5, 7_777).astype(np.float32)
    whole = WindowFrames(encoder, WINDOW // 2)
    offline = np.concatenate([whole.push(samples), whole.flush()])
    assert offline.shape == (7_777 // 800 + 1, 10)  # one a hop while streaming, one more over the tail
    for sizes in ([1] * 2000, [160], [3_001, 17]):
        frames = WindowFrames(encoder, WINDOW // 2)
        out, start, turn = [], 0, 0
        while start < samples.size:
            size = sizes[turn % len(sizes)]
            out.append(frames.push(samples[start : start + size]))
            start, turn = start + size, turn + 1
        np.testing.assert_array_equal(np.concatenate([*out, frames.flush()]), offline)
    # each window is the graph on its own samples: the first ends one hop into the recording
    first = np.concatenate([np.zeros(WINDOW - 800, np.float32), samples[:800]])
    np.testing.assert_allclose(offline[0], encoder(first[None])[0], rtol=1e-6)
    dynamic = WindowEncoder(_export_audio(tmp_path / "d.onnx", window=None).read_bytes(), None)
    assert dynamic.window == 16_000  # a graph that leaves its length open reads one second


def test_text_vectors_average_the_tokens_and_type_ids_are_optional(tmp_path) -> None:
    from polysense.preprocess.frozen import FrozenTextEncoder
    from polysense.preprocess.text import TextPreprocessor

    for with_types in (True, False):
        graph = _export_text(tmp_path / str(with_types), with_type_ids=with_types)
        encoder = FrozenTextEncoder(graph.read_bytes())
        tokens = TextPreprocessor(str(graph.parent / "tokenizer.json"))("a red square")
        vector = encoder(tokens)
        assert vector.shape == (12,) and vector.dtype == np.float32
        import onnxruntime as ort

        session = ort.InferenceSession(str(graph))
        feeds = {"input_ids": tokens[None], "attention_mask": np.ones_like(tokens[None])}
        if with_types:
            feeds["token_type_ids"] = np.zeros_like(tokens[None])
        np.testing.assert_allclose(vector, session.run(None, feeds)[0][0].mean(0), rtol=1e-6)


def test_graphs_outside_the_contract_are_refused_with_the_fix(tmp_path) -> None:
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train
    from polysense.preprocess.frozen import FrozenTextEncoder
    from polysense.preprocess.frozen_windows import WindowEncoder

    text_graph = _export_text(tmp_path / "text")
    audio_graph = _export_audio(tmp_path / "audio.onnx")
    with pytest.raises(BundleError, match="input_ids"):
        FrozenTextEncoder(audio_graph.read_bytes())  # float samples, not token ids
    with pytest.raises(BundleError, match=r"one float32 input \[batch, samples\]"):
        WindowEncoder(text_graph.read_bytes(), None)
    with pytest.raises(BundleError, match=f"windows of {WINDOW} samples, not 800"):
        WindowEncoder(audio_graph.read_bytes(), 800)

    def run(**families) -> None:
        options = TrainOptions(
            data="builtin", builtin_n=60, out=str(tmp_path / "run"), progress=False, epochs=1, **families
        )
        train(options)

    lone = tmp_path / "lone" / "model.onnx"
    lone.parent.mkdir()
    shutil.copyfile(text_graph, lone)
    with pytest.raises(ConfigError, match="no tokenizer.json beside the graph"):
        run(modalities=("text",), text_encoder=f"onnx:{lone}")
    with pytest.raises(ConfigError, match="--audio-encoder onnx:.*must take one float32 input"):
        run(modalities=("audio",), audio_encoder=f"onnx:{text_graph}")
    shutil.copyfile(text_graph.parent / "tokenizer.json", audio_graph.parent / "tokenizer.json")
    with pytest.raises(ConfigError, match="--text-encoder onnx:.*input_ids"):
        run(modalities=("text",), text_encoder=f"onnx:{audio_graph}")
    assert not (tmp_path / "run" / "builtin_data").exists()  # refused before any data was generated


def test_info_names_the_graphs_and_edge_bundles_keep_them(brought, tmp_path, capsys) -> None:
    from polysense.cli.main import main
    from polysense.tools.edge import make_edge_bundle

    text_graph, audio_graph, bundle, run = brought
    assert main(["info", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert f"text front end, frozen: text_frozen.onnx (from {text_graph.resolve()})" in printed
    assert f"audio front end, frozen: audio_frozen.onnx (from {audio_graph.resolve()})" in printed
    make_edge_bundle(bundle, tmp_path / "edge")
    row = _rows(run, 1)[0]
    expected = polysense.Pipeline.load(bundle, device="cpu", precision="fp32").predict(**row_inputs(row))
    on_edge = polysense.Pipeline.load(tmp_path / "edge", device="cpu").predict(**row_inputs(row))
    assert on_edge.label == expected.label


def row_inputs(row: dict) -> dict:
    return {"text": row["text"], "audio": row["audio"]}
