"""TrainOptions that the encoder families decide are None until resolved; runs recorded when 0, -1 or "" said
"the families decide" (config.json of earlier versions) are read, resumed and exported as they were then."""

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # polysense.models needs torch
pytest.importorskip("torch")

from polysense.errors import ConfigError  # noqa: E402
from polysense.models.training.options import OLD_SENTINELS, TrainOptions  # noqa: E402

# The options of the conftest's trained_run as the version before None recorded them in config.json (data and
# out aside), measured with that version.
RECORDED_BEFORE = {
    "modalities": None,
    "strategy": "joint",
    "epochs": 3,
    "pretrain_epochs": 0,
    "solo_epochs": 0,
    "finetune_encoders": False,
    "batch_size": 32,
    "accumulate": 1,
    "lr": 0.005,
    "pretrained_lr": 0.005,
    "from_scratch": False,
    "weight_decay": 0.0001,
    "augment": True,
    "audio_noise": "light",
    "modality_dropout": 0.5,
    "aux_loss_weight": 0.5,
    "label_smoothing": 0.0,
    "patience": 0,
    "keep": "best",
    "seed": 0,
    "device": "auto",
    "image_size": 64,
    "image_width": 8,
    "embed_dim": 32,
    "image_encoder": "cnn",
    "text_encoder": "gru",
    "audio_encoder": "causal",
    "fusion": "concat",
    "audio_norm_frames": 20,
    "voice_norm": False,
    "max_text_length": 64,
    "dp_epsilon": 0.0,
    "dp_delta": None,
    "dp_max_grad_norm": 1.0,
    "dp_accountant": "prv",
    "builtin_n": 3000,
    "allow_leakage": False,
    "progress": False,
}
TRAINED_RUN = {"epochs": 3, "image_width": 8, "embed_dim": 32, "batch_size": 32, "progress": False}
TRAINED_RUN |= {"patience": 0, "lr": 5e-3}
# Options stored with every old sentinel, and what the version before None resolved them to once the data had
# given image and text (measured with that version).
OLD_RUNS = {
    "small": (TRAINED_RUN, (12, 0, 0, 0.005, 0.0, "best", 64)),
    "minilm": ({"text_encoder": "minilm-l6", "modalities": ["text"]}, (3, 0, 0, 5e-05, 0.0, "best", 64)),
    "lite, staged": (
        {"image_encoder": "efficientnet-lite0", "modalities": ["image"], "strategy": "staged"},
        (4, 4, 0, 0.0003, 0.1, "last", 192),
    ),
    "lite, the data decides": ({"image_encoder": "efficientnet-lite0"}, (4, 0, 8, 0.0003, 0.0, "last", 192)),
}


def test_options_the_families_decide_default_to_none():
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    assert all(defaults[name] is None for name in OLD_SENTINELS)
    resolved = TrainOptions(data="d", out="o")
    assert [getattr(resolved, name) for name in OLD_SENTINELS] == [12, 0, 0, 3e-3, 0.0, "best", 64]
    # Only label smoothing may wait for the data (efficientnet-lite0 asks for it when it trains alone).
    undecided = TrainOptions(data="d", out="o", image_encoder="efficientnet-lite0")
    assert [name for name in OLD_SENTINELS if getattr(undecided, name) is None] == ["label_smoothing"]
    assert undecided.for_data_modalities(("image",)).label_smoothing == 0.1


def test_a_run_records_its_options_as_before():
    recorded = TrainOptions(data="d", out="o", **TRAINED_RUN).to_dict()
    assert recorded == {"data": "d", "out": "o", **RECORDED_BEFORE}
    assert list(recorded)[2:] == list(RECORDED_BEFORE)  # config.json keeps its order too


@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_old_sentinels_are_read_as_the_families_decision(name):
    settings, expected = OLD_RUNS[name]
    stored = {"data": "d", "out": "o", **settings, **OLD_SENTINELS}
    options = TrainOptions.from_dict(json.loads(json.dumps(stored))).for_data_modalities(("image", "text"))
    assert tuple(getattr(options, option) for option in OLD_SENTINELS) == expected
    # A value that only looks like a sentinel is not one (a bool is no 0).
    assert TrainOptions.from_dict({**stored, "from_scratch": False}).from_scratch is False


@pytest.mark.parametrize(
    "given, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1, got 0 (leave it out for the families' own)"),
        ({"solo_epochs": -1}, "--solo-epochs must be 0 or more (leave it out to have the families decide)"),
        ({"pretrain_epochs": -1}, "--pretrain-epochs cannot be negative, got -1"),
        ({"label_smoothing": -1.0}, "--label-smoothing must be in [0, 1), got -1.0"),
        ({"keep": ""}, "--keep '' is unknown; choose best or last"),
        ({"image_size": 0}, "--image-size must be at least 1, got 0"),
        ({"pretrained_lr": 0.0}, "--lr and --pretrained-lr must be positive"),
    ],
)
def test_an_old_sentinel_given_now_is_refused_with_its_fix(given, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainOptions(data="d", out="o", **given)


def test_resuming_a_run_stored_with_old_sentinels(tmp_path):
    from polysense.models.training.run_folder import resumed_options

    stored = {"data": "d", "out": str(tmp_path), **RECORDED_BEFORE, **OLD_SENTINELS, "epochs": 3}
    (tmp_path / "config.json").write_text(json.dumps({"options": stored}))
    asked = TrainOptions(data="d", out=str(tmp_path), epochs=5, device="cpu")
    resumed = resumed_options(asked, tmp_path, changed={"epochs", "device"})
    assert resumed.to_dict() == {
        "data": "d",
        "out": str(tmp_path),
        **RECORDED_BEFORE,
        "epochs": 5,
        "device": "cpu",
    }


def _with_old_sentinels(run, folder):
    """A copy of `run` whose config.json holds 0, -1 and "" wherever the families' decision is what the run
    used, as an earlier version may have written it."""
    shutil.copytree(run, folder)
    config = json.loads((folder / "config.json").read_text())
    options = config["options"] | {"out": str(folder)}
    same = {
        name: old
        for name, old in OLD_SENTINELS.items()
        if getattr(TrainOptions.from_dict({**options, name: old}), name) == options[name]
    }
    assert len(same) >= 5, same  # all but --epochs for the small runs of the tests
    config["options"] = options | same
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_run_recorded_with_old_sentinels_exports_and_resumes_as_before(trained_run, tmp_path):
    from polysense.export import export_run
    from polysense.export.variants import VariantPolicy
    from polysense.models.training.cli import run_train

    recorded = json.loads((trained_run / "config.json").read_text())["options"]
    # The run's manifest.csv names its files relative to the run's folder: the copies' parent gets them too.
    rows = (trained_run / "manifest.csv").read_text().splitlines()[1:]
    for folder in {Path(path).parts[1] for row in rows for path in row.split(",") if path.startswith("../")}:
        (tmp_path / folder).symlink_to(trained_run.parent / folder, target_is_directory=True)
    now = shutil.copytree(trained_run, tmp_path / "now")
    config = json.loads((now / "config.json").read_text())
    config["options"]["out"] = str(now)
    (now / "config.json").write_text(json.dumps(config))
    before = _with_old_sentinels(trained_run, tmp_path / "before")

    # Export reads the run (its options included) and checks the bundle against torch through the runtime.
    report = export_run(
        before, tmp_path / "bundle", progress=False, policy=VariantPolicy(precisions=("fp32",))
    )
    assert report.end_to_end < 1e-4
    more = str(recorded["epochs"] + 1)
    for run in (now, before):
        flags = [
            "--data",
            recorded["data"],
            "--out",
            str(run),
            "--resume",
            "--epochs",
            more,
            "--device",
            "cpu",
        ]
        assert run_train([*flags, "--no-progress"]) == 0
    configs = [json.loads((run / "config.json").read_text()) for run in (now, before)]
    assert configs[1]["options"] == {**configs[0]["options"], "out": str(before)}
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (now, before)]
    assert metrics[0]["history"] == metrics[1]["history"]
    assert len(metrics[0]["history"]) == recorded["epochs"] + 1 + recorded["solo_epochs"]
