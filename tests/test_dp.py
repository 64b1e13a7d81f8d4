"""Differential privacy in training (--dp-epsilon): the rows' gradients opacus computes are each row's own, the
clipping bounds them, the noise hides them, the epsilon spent stays within the target and is recorded in
metrics.json and the bundle; families DP cannot train are refused with the alternative, and resuming goes on
counting from the checkpoint."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow  # torch, opacus, training
torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from polysense.errors import ConfigError  # noqa: E402
from polysense.models.training.options import TrainOptions  # noqa: E402

EPSILON = 4.0
EPOCHS = 2


def _options(out, **changes) -> TrainOptions:
    values = dict(
        data="builtin",
        out=str(out),
        builtin_n=72,
        modalities=("image", "audio"),
        image_width=8,
        epochs=EPOCHS,
        batch_size=32,
        dp_epsilon=EPSILON,
        progress=False,
    )
    return TrainOptions(**{**values, **changes})


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """A DP run on the built-in image and audio (the CNN's BatchNorm as GroupNorm, the audio GRU as DPGRU)."""
    from polysense.models.training.train import train

    out = tmp_path_factory.mktemp("dp") / "run"
    return train(_options(out))


def test_epsilon_spent_is_within_the_target_and_recorded(private_run):
    privacy = private_run.metrics["privacy"]
    assert EPSILON - 0.05 <= privacy["epsilon"] <= EPSILON  # every planned step ran
    assert privacy["target_epsilon"] == EPSILON and privacy["accountant"] == "prv"
    assert privacy["delta"] == pytest.approx(1e-5) and privacy["max_grad_norm"] == 1.0
    assert privacy["steps"] == EPOCHS * privacy["steps_per_epoch"] and privacy["noise_multiplier"] > 0.3
    spent = [record["epsilon"] for record in private_run.metrics["history"]]
    assert len(spent) == EPOCHS and 0 < spent[0] < spent[1] == privacy["epsilon"]
    stored = json.loads((private_run.run_dir / "metrics.json").read_text())
    assert stored["privacy"] == privacy


def test_the_saved_model_is_the_plain_network(private_run):
    """Checkpoints hold torch GRU names (not opacus's), the CNN's norms are GroupNorm, and export builds it."""
    from polysense.models.model import ModelConfig, MultimodalClassifier
    from polysense.models.training.run_folder import load_trained

    model, config = load_trained(private_run.run_dir)
    assert config["model"]["group_norm"] is True
    norms = [type(m).__name__ for m in model.encoders["image"].modules() if "Norm" in type(m).__name__]
    assert norms and set(norms) == {"GroupNorm"}
    assert type(model.encoders["audio"].gru) is torch.nn.GRU
    plain = MultimodalClassifier(ModelConfig.from_dict(config["model"]), load_pretrained=False)
    assert set(plain.state_dict()) == set(model.state_dict())


def test_the_bundle_records_the_privacy_spent(private_run, tmp_path, capsys):
    import polysense
    from polysense.cli.main import main
    from polysense.export import export_run

    export_run(private_run.run_dir, tmp_path / "bundle", progress=False, policy=None)
    recorded = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["privacy"]
    spent = private_run.metrics["privacy"]
    assert recorded == {k: spent[k] for k in recorded} and recorded["epsilon"] == spent["epsilon"]
    pipeline = polysense.Pipeline.load(tmp_path / "bundle", device="cpu")
    assert pipeline.description.privacy.epsilon == spent["epsilon"]
    assert main(["info", str(tmp_path / "bundle")]) == 0
    assert f"differential privacy: epsilon {spent['epsilon']:.3g} spent" in capsys.readouterr().out


def _mechanism(noise_multiplier: float, max_grad_norm: float):
    """A small DP model, its objective under opacus's hooks and the DPOptimizer, on one built-in batch."""
    from polysense.models.model import ModelConfig, MultimodalClassifier
    from polysense.models.training.epoch import TrainingObjective
    from polysense.models.training.privacy import Accountant, PrivacyPlan, PrivateTraining, private_layers

    torch.manual_seed(0)
    config = ModelConfig(("image", "audio"), num_classes=3, image_width=8, embed_dim=16, group_norm=True)
    model = MultimodalClassifier(config)
    private_layers(model)
    for module in model.modules():  # every row's loss deterministic, so one row alone computes the same
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    heads = torch.nn.ModuleDict({m: torch.nn.Linear(16, 3) for m in config.modalities})
    options = TrainOptions(data="x", out="x", modality_dropout=0.0, label_smoothing=0.0, dp_epsilon=1.0)
    plan = PrivacyPlan(
        target_epsilon=1.0,
        delta=1e-5,
        max_grad_norm=max_grad_norm,
        accountant="rdp",
        train_rows=4,
        sample_rate=0.5,  # an expected batch of 2
        steps_per_epoch=2,
        epochs=1,
        noise_multiplier=noise_multiplier,
    )
    private = PrivateTraining(plan, Accountant(plan))
    objective = TrainingObjective(model, heads, "joint", options)
    optimizer = torch.optim.SGD([*model.parameters(), *heads.parameters()], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(4, 3, 16, 16, generator=generator),
        "audio": torch.randn(4, 12, 40, generator=generator),
        "audio_mask": torch.ones(4, 12),
        "present": torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "labels": torch.tensor([0, 1, 2, 1]),
    }
    batch["image"][0] *= 50  # one row far from the others: its gradient is the largest
    return objective, private, optimizer, batch


def _loss(objective, batch, rows):
    from polysense.models.training.privacy import PerSampleShare

    part = {k: v[rows] for k, v in batch.items()}
    counts = tuple(int(n) for n in (part["present"] > 0).sum(dim=0))
    return objective(part, [torch.Generator() for _ in rows], PerSampleShare(len(rows), counts), 0)


def test_each_rows_gradient_is_its_own():
    """opacus's per-row gradients over the batch equal each row's gradient computed alone: no row's gradient
    depends on the others (GroupNorm, DPGRU, the losses divided by the batch's rows), so clipping bounds it."""
    objective, private, optimizer, batch = _mechanism(noise_multiplier=0.0, max_grad_norm=1.0)
    engine = private.engine(objective)
    _loss(engine, batch, [0, 1, 2, 3]).backward()
    parameters = [p for p in objective.parameters() if getattr(p, "grad_sample", None) is not None]
    assert len(parameters) == len(list(objective.parameters()))
    per_row = [p.grad_sample.clone() for p in parameters]
    private.close(engine)
    for row in range(4):
        objective.zero_grad(set_to_none=True)
        _loss(objective, batch, [row]).backward()
        for parameter, together in zip(parameters, per_row):
            alone = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            torch.testing.assert_close(together[row], alone, atol=1e-5, rtol=1e-4)


def _step_gradient(noise_multiplier: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(the DP step's gradient, the clean gradient of the mean loss, the largest row's gradient norm)."""
    objective, private, optimizer, batch = _mechanism(noise_multiplier, max_grad_norm=0.1)
    engine = private.engine(objective)
    dp_optimizer = private.optimizer(optimizer)
    loss = _loss(engine, batch, [0, 1, 2, 3])
    loss.backward()
    params = dp_optimizer.params
    largest = max(float(torch.cat([p.grad_sample[row].flatten() for p in params]).norm()) for row in range(4))
    clean = torch.cat([p.grad.flatten() for p in params]).clone()
    dp_optimizer.pre_step()  # clip, add the noise, divide by the expected batch (2), count the step
    step = torch.cat([p.grad.flatten() for p in params])
    assert private.accountant.steps == 1
    private.close(engine)
    return step, clean, largest


def test_clipping_bounds_the_step_and_noise_hides_it():
    step, clean, largest = _step_gradient(noise_multiplier=0.0)
    assert largest > 10 * 0.1  # the rows' gradients are far above the bound...
    assert float(step.norm()) <= 4 * 0.1 / 2 + 1e-6  # ...and each counts at most 0.1: 4 rows / expected 2
    assert float(torch.nn.functional.cosine_similarity(step, clean, dim=0)) > 0.5  # clipped, still downhill
    noisy, clean, _ = _step_gradient(noise_multiplier=50.0)
    assert abs(float(torch.nn.functional.cosine_similarity(noisy, clean, dim=0))) < 0.1  # noise drowns it
    expected = 50.0 * 0.1 / 2 * math.sqrt(noisy.numel())  # noise std x sqrt(dimensions), over the batch
    assert 0.9 * expected < float(noisy.norm()) < 1.1 * expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"strategy": "alternating"}, "use joint, staged or frozen"),
        ({"accumulate": 2}, "--accumulate at 1"),
        ({"dp_epsilon": 0.0, "dp_max_grad_norm": 2.0}, "--dp-max-grad-norm only applies with --dp-epsilon"),
        ({"dp_delta": 1.5}, r"--dp-delta must be in \(0, 1\)"),
    ],
)
def test_option_conflicts_are_refused(tmp_path, changes, expected):
    with pytest.raises(ConfigError, match=expected):
        _options(tmp_path / "run", **changes)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"image_encoder": "efficientnet-lite0"}, "--image-encoder cnn"),
        ({"modalities": ("audio",), "audio_encoder": "speech-embedding"}, "three rows"),
        ({"modalities": ("text",)}, "--text-encoder minilm-l6"),
        ({"modalities": ("text",), "text_encoder": "transformer"}, "vocabulary is learned"),
        ({"modalities": None}, "--text-encoder gru cannot train"),  # the built-in data has text
    ],
)
def test_families_dp_cannot_train_are_refused_with_the_alternative(tmp_path, changes, expected):
    """Refused once the data has decided the modalities, before the tokenizer learns the training words."""
    from polysense.models.training.train import train

    with pytest.raises(ConfigError, match=expected):
        train(_options(tmp_path / "run", builtin_n=24, **changes))
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_resume_counts_on_and_keeps_the_planned_epochs(private_run, tmp_path):
    """An interrupted DP run resumes with its accountant; asking for other epochs is refused (more epochs
    would spend more than the epsilon its noise was set for)."""
    import shutil

    from polysense.models.training import run_folder
    from polysense.models.training.train import train

    with pytest.raises(ConfigError, match="other --epochs would spend another epsilon"):
        run_folder.resumed_options(_options(private_run.run_dir, epochs=4), private_run.run_dir, {"epochs"})
    copy = tmp_path / "run"
    shutil.copytree(private_run.run_dir, copy)
    for finished in ("metrics.json", "model.pt", f"checkpoints/epoch_{EPOCHS:03d}.pt"):
        (copy / finished).unlink()  # stopped after epoch 1
    resumed = train(_options(copy), resume=True)
    assert resumed.metrics["privacy"]["epsilon"] == private_run.metrics["privacy"]["epsilon"]
    assert [h["epsilon"] for h in resumed.metrics["history"]] == [
        h["epsilon"] for h in private_run.metrics["history"]
    ]


def test_a_frozen_encoder_trains_its_projection_under_dp(tmp_path):
    """DP's strongest setting: a frozen graph the user brings (onnx:PATH) and only the projection on top trained
    privately. The projection is sized by the graph's vector width (not a statistic of the rows)."""
    from torch import nn

    from polysense.models.training.train import train

    class Encoder(nn.Module):
        def forward(self, pixels):
            return nn.functional.avg_pool2d(pixels, 8).flatten(1)  # [N, 3 * 4 * 4]

    graph = tmp_path / "encoder.onnx"
    torch.onnx.export(
        Encoder(),
        (torch.zeros(1, 3, 32, 32),),
        str(graph),
        input_names=["pixels"],
        dynamic_axes={"pixels": {0: "n"}},
        dynamo=False,
    )
    options = _options(
        tmp_path / "run", modalities=("image",), image_encoder=f"onnx:{graph}", image_size=32, epochs=1
    )
    result = train(options)
    spent = result.metrics["privacy"]["epsilon"]
    assert 0 < spent <= EPSILON


def test_minilm_gives_every_parameter_per_row_gradients():
    """The text family DP recommends (a fixed vocabulary): every parameter, the embedding tables included, gets
    one gradient per row (the position and segment lookups were broadcast over the batch, and opacus refused
    the step); the network's own size, random weights, three rows."""
    from opacus import GradSampleModule

    from polysense.models.registry import create_encoder

    encoder = GradSampleModule(create_encoder("text", "minilm-l6", embed_dim=8, pretrained=False))
    ids = torch.randint(5, 1000, (3, 7))
    encoder(ids, torch.ones_like(ids)).sum().backward()
    shapes = {name: p.grad_sample.shape[0] for name, p in encoder.named_parameters() if p.requires_grad}
    assert shapes and set(shapes.values()) == {3}, shapes
