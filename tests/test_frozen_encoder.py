"""Bring your own encoder: a small torch image encoder exported to ONNX comes back as `--image-encoder
onnx:PATH`, trains (only the projection on top), exports, and is served; its graph travels byte for byte with
its sha256 and origin; graphs outside the contract and missing files are refused with the fix."""

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

SIZE = 32


def _export_cnn(path: Path, size: int = SIZE, sequence: bool = False) -> Path:
    """A small convolutional encoder as a user would export it: pixels [N, 3, S, S] -> [N, 16] (or [N, T, 16])."""
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)
            )

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            maps = self.body(pixels).flatten(2).transpose(1, 2)  # [N, positions, 16]
            return maps if sequence else maps.mean(1)

    torch.manual_seed(0)
    torch.onnx.export(
        Encoder().eval(),
        (torch.randn(1, 3, size, size),),
        str(path),
        input_names=["pixels"],
        output_names=["vectors"],
        dynamic_axes={"pixels": {0: "n"}, "vectors": {0: "n"}},
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def brought(tmp_path_factory) -> tuple[Path, Path, Path]:
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    folder = tmp_path_factory.mktemp("frozen")
    graph = _export_cnn(folder / "my_encoder.onnx")
    options = TrainOptions(
        data="builtin",
        builtin_n=240,
        out=str(folder / "run"),
        modalities=("image",),
        image_encoder=f"onnx:{graph}",
        image_size=SIZE,
        epochs=2,
        embed_dim=16,
        progress=False,
    )
    train(options)
    bundle = export_run(folder / "run", folder / "bundle", progress=False, policy=None).bundle
    return graph, Path(bundle), folder / "run"


def _some_image(run: Path) -> Path:
    return next((run / "builtin_data" / "images").rglob("*.jpg"))


def test_the_graph_travels_byte_for_byte_with_its_origin(brought) -> None:
    graph, bundle, _ = brought
    settings = polysense.Pipeline.load(bundle, device="cpu").description.preprocessing.image
    (frozen,) = settings.graphs
    assert (bundle / frozen.file).read_bytes() == graph.read_bytes()
    assert frozen.sha256 == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert frozen.source == str(graph.resolve()) and frozen.role == "encoder"


def test_predicts_and_serves(brought) -> None:
    from starlette.testclient import TestClient

    from polysense.serving.http import create_app

    _, bundle, run = brought
    pipeline = polysense.Pipeline.load(bundle, device="cpu")
    image = _some_image(run)
    expected = pipeline.predict(image=str(image))
    assert (
        pipeline.description.component("image_encoder").inputs[0].shape[-1] == 16
    )  # the vectors, not pixels
    with TestClient(create_app(pipeline, warmed_up=True)) as client:
        answer = client.post("/v1/predict", json={"image": base64.b64encode(image.read_bytes()).decode()})
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] == expected.label
    for label, p in expected.probabilities.items():
        assert answer.json()["probabilities"][label] == pytest.approx(p, abs=1e-6)


def test_an_altered_graph_is_refused(brought, tmp_path) -> None:
    _, bundle, _ = brought
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    frozen = copy / "image_frozen.onnx"
    frozen.write_bytes(frozen.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="image_frozen.onnx does not match its sha256"):
        polysense.Pipeline.load(copy, device="cpu")


def test_a_sequence_output_is_averaged(tmp_path) -> None:
    from polysense.preprocess.frozen import FrozenEncoder

    pooled = FrozenEncoder(_export_cnn(tmp_path / "pooled.onnx").read_bytes(), SIZE)
    sequence = FrozenEncoder(_export_cnn(tmp_path / "seq.onnx", sequence=True).read_bytes(), SIZE)
    pixels = np.random.default_rng(0).standard_normal((3, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(sequence(pixels), pooled(pixels), rtol=1e-5, atol=1e-6)
    assert pooled(pixels).shape == (16,)


def test_graphs_outside_the_contract_and_missing_files_are_refused(tmp_path) -> None:
    from polysense.models.training.options import TrainOptions
    from polysense.preprocess.frozen import FrozenEncoder

    wrong_size = _export_cnn(tmp_path / "wide.onnx", size=64)
    # a fixed input size other than --image-size names the flag (torch exports the spatial sizes fixed)
    with pytest.raises(BundleError, match="--image-size"):
        FrozenEncoder(wrong_size.read_bytes(), SIZE)
    with pytest.raises(BundleError, match="cannot be loaded"):
        FrozenEncoder(b"not a graph", SIZE)
    from polysense.models.training.data_prep import _image_settings

    options = TrainOptions(data="x.csv", out=str(tmp_path), image_encoder="onnx:/nowhere/x.onnx")
    with pytest.raises(ConfigError, match="is not a file"):
        _image_settings(options, [], tmp_path)
    from polysense.models.training.train import train

    missing = TrainOptions(
        data="builtin", out=str(tmp_path / "run"), image_encoder="onnx:/nowhere/x.onnx", progress=False
    )
    with pytest.raises(
        ConfigError, match="--image-encoder onnx:/nowhere/x.onnx: /nowhere/x.onnx is not a file"
    ):
        train(missing)  # before the built-in set is generated into the run folder
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--text-encoder 'onnx:' is unknown; choose .* or onnx:PATH"):
        TrainOptions(data="x.csv", out=str(tmp_path), text_encoder="onnx:")
