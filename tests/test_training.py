import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from polysense.cli.main import main  # noqa: E402
from polysense.errors import ConfigError, ManifestError  # noqa: E402
from polysense.models.training.data_prep import prepare_data  # noqa: E402
from polysense.models.training.dataset import row_generators  # noqa: E402
from polysense.models.training.losses import BatchShare, alternating_loss, fused_loss, unimodal_loss  # noqa: E402
from polysense.models.training.options import DEFAULT_EPOCHS, TrainOptions  # noqa: E402
from polysense.models.training.run_folder import load_trained  # noqa: E402
from polysense.models.training.train import train  # noqa: E402
from polysense.models.training.train_state import TrainState  # noqa: E402

pytestmark = pytest.mark.slow  # trains

SMALL = {"image_width": 8, "embed_dim": 32, "batch_size": 32, "progress": False, "patience": 0}


def _train(data, out, **options):
    return train(TrainOptions(data=str(data), out=str(out), **{**SMALL, **options}))


def test_training_beats_chance_and_writes_the_run(tiny_builtin, tmp_path):
    result = _train(tiny_builtin, tmp_path / "run", epochs=8, lr=5e-3)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["accuracy"] == result.metrics["accuracy"]
    # 12 balanced labels: chance is 1/12. Text alone can reach 1/6, so fusion must be working to pass 0.3.
    assert metrics["accuracy"] > 0.3
    assert set(metrics["subsets"]) == {
        "image",
        "text",
        "audio",
        "image+text",
        "image+audio",
        "text+audio",
        "image+text+audio",
    }
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "confusion_matrix"):
        assert key in metrics and key in metrics["subsets"]["image+audio"]
    assert len(metrics["confusion_matrix"]) == 12
    for name in ("config.json", "manifest.csv", "tokenizer.json", "model.pt", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch_*.pt"))) == 2  # the newest two are kept
    model, config = load_trained(tmp_path / "run")
    assert config["labels"] == metrics["labels"] and model.config.modalities == ("image", "text", "audio")


def test_same_seed_gives_identical_metrics(tiny_builtin, tmp_path):
    a = _train(tiny_builtin, tmp_path / "a", epochs=2)
    b = _train(tiny_builtin, tmp_path / "b", epochs=2)
    assert a.metrics == b.metrics


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tiny_builtin, tmp_path, monkeypatch):
    straight = _train(tiny_builtin, tmp_path / "straight", epochs=3)

    import polysense.models.training.train as training

    real_evaluate, calls = training.evaluate, []

    def interrupted_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", interrupted_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_builtin, tmp_path / "resumed", epochs=3)
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    run = tmp_path / "resumed"
    # Nothing that looks finished is left behind; the last complete epoch is checkpointed.
    assert not (run / "model.pt").exists() and not (run / "metrics.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_001.pt",
        "epoch_002.pt",
    ]
    assert not list(run.rglob("*.tmp"))

    resumed = train(TrainOptions(data=str(tiny_builtin), out=str(run), **{**SMALL, "epochs": 3}), resume=True)
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2, 3]
    assert resumed.metrics == straight.metrics


def test_staged_strategy_and_other_heads(tiny_builtin, tmp_path):
    result = _train(
        tiny_builtin,
        tmp_path / "staged",
        strategy="staged",
        pretrain_epochs=1,
        epochs=1,
        fusion="transformer",
        text_encoder="transformer",
    )
    phases = [h["phase"] for h in result.metrics["history"]]
    assert phases == ["pretrain", "fusion"]
    # Pre-training is scored through each encoder's own head (the fusion has not trained yet).
    pretrain, fusion = result.metrics["history"]
    assert set(pretrain["val_by_head"]) == {"image", "text", "audio"} and "val_by_head" not in fusion
    assert pretrain["val_accuracy"] == pytest.approx(sum(pretrain["val_by_head"].values()) / 3)
    result = _train(
        tiny_builtin,
        tmp_path / "finetune",
        strategy="staged",
        pretrain_epochs=1,
        epochs=1,
        finetune_encoders=True,
        fusion="attention",
        modalities=("image", "audio"),
    )
    assert set(result.metrics["subsets"]) == {"image", "audio", "image+audio"}


def test_staged_pretrains_each_encoder_as_long_as_a_unimodal_model_by_default():
    # Late fusion: an encoder frozen after fewer epochs than its unimodal model is a weaker classifier alone.
    assert TrainOptions(data="x", out="y", strategy="staged", epochs=7).pretrain_epochs == 7
    assert (
        TrainOptions(data="x", out="y", strategy="staged", epochs=7, pretrain_epochs=2).pretrain_epochs == 2
    )
    assert TrainOptions(data="x", out="y", strategy="staged").pretrain_epochs == DEFAULT_EPOCHS
    with pytest.raises(ConfigError, match="--pretrain-epochs must be at least 1"):
        TrainOptions(data="x", out="y", strategy="staged", pretrain_epochs=-1)


def test_audio_norm_frames_is_refused_where_the_audio_family_ignores_it():
    from polysense.models.training.run_open import _model_config

    with pytest.raises(ConfigError, match="--audio-norm-frames only applies .* efficientnet-lite0"):
        TrainOptions(data="x", out="y", audio_encoder="efficientnet-lite0", audio_norm_frames=5)
    assert TrainOptions(data="x", out="y", audio_norm_frames=5).audio_norm_frames == 5  # causal takes it
    # Left at its default, it is not recorded as the windowed family's normalisation.
    data = SimpleNamespace(
        modalities=("audio",), labels=["a", "b"], vocab_size=0, preprocessing=SimpleNamespace(audio=None)
    )
    windowed = TrainOptions(data="x", out="y", audio_encoder="efficientnet-lite0")
    assert _model_config(windowed, data, {}).audio_norm_frames == 0
    assert _model_config(TrainOptions(data="x", out="y"), data, {}).audio_norm_frames == 20


def test_early_stopping(tiny_builtin, tmp_path):
    result = _train(tiny_builtin, tmp_path / "run", epochs=30, patience=1, lr=1e-6)
    assert result.stopped_early and result.epochs_run < 30


def test_user_mistakes_get_clear_errors(tiny_builtin, tmp_path):
    _train(tiny_builtin, tmp_path / "run", epochs=1)
    with pytest.raises(ConfigError, match="--resume"):
        _train(tiny_builtin, tmp_path / "run", epochs=1)
    with pytest.raises(ConfigError, match="holds no run"):
        train(TrainOptions(data=str(tiny_builtin), out=str(tmp_path / "empty"), **SMALL), resume=True)
    with pytest.raises(ConfigError, match="--strategy"):
        TrainOptions(data="x", out="y", strategy="greedy")
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nnope.jpg,a\n,b\n")
    with pytest.raises(ManifestError, match="1 problem.*\n  line 3: no modality present"):
        _train(bad, tmp_path / "bad_run", epochs=1)  # line 2's missing file alone would be skipped
    # Nothing of a run was written, so the same --out works once the manifest is fixed.
    assert not (tmp_path / "bad_run" / "config.json").exists()
    assert not (tmp_path / "bad_run" / "manifest.csv").exists()
    _train(tiny_builtin, tmp_path / "bad_run", epochs=1)
    only_text = tmp_path / "text.csv"
    only_text.write_text("text,label\nhello,a\n")
    with pytest.raises(ConfigError, match="no audio data"):
        _train(only_text, tmp_path / "text_run", modalities=("audio",))


def test_cli_trains_and_reports(tiny_builtin, tmp_path, capsys):
    args = [
        "--quiet",
        "train",
        "--data",
        str(tiny_builtin),
        "--out",
        str(tmp_path / "cli"),
        "--epochs",
        "1",
        "--image-width",
        "8",
        "--embed-dim",
        "32",
        "--no-progress",
        "--modalities",
        "text,audio",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "text+audio" in out and "accuracy" in out
    assert main(args) == 2  # the run folder exists now
    assert "already holds a run" in capsys.readouterr().err


def test_batchnorm_recalibration_matches_batch_statistics(tiny_builtin, tmp_path):
    from polysense.models.training.batchnorm import recalibrate_batchnorm

    result = _train(tiny_builtin, tmp_path / "run", epochs=1, modalities=("image",))
    model, _ = load_trained(result.run_dir)
    from polysense.models.training.data_prep import prepare_data

    data = prepare_data(
        TrainOptions(data=str(tiny_builtin), out=str(tmp_path / "run"), **SMALL, modalities=("image",)),
        tmp_path / "run",
    ).splits["train"]
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(5.0)  # garbage the recalibration must replace
    device = torch.device("cpu")
    recalibrate_batchnorm(model, data, batch_size=len(data), device=device)
    batch = data.collate(range(len(data)), device)
    with torch.no_grad():
        eval_mode = model.encode("image", batch)
        model.encoders.train()
        batch_stats = model.encode("image", batch)
    torch.testing.assert_close(eval_mode, batch_stats, atol=1e-3, rtol=1e-3)


def test_rows_with_unreadable_files_are_skipped_and_reported(tiny_builtin, tmp_path, caplog):
    import csv

    rows = list(csv.DictReader(tiny_builtin.open()))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "broken.wav").write_bytes(b"RIFF but not a wav")
    for row in rows:
        row["image"], row["audio"] = (str(tiny_builtin.parent / row[k]) for k in ("image", "audio"))
    rows[3]["image"] = str(tmp_path / "broken.jpg")
    rows[7]["audio"] = str(tmp_path / "broken.wav")
    rows[9]["audio"] = str(tmp_path / "missing.wav")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text", "audio", "label"])
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level("WARNING", logger="polysense"):
        result = _train(manifest, tmp_path / "run", epochs=1)
    log = caplog.text
    assert "line 5: image" in log and "broken.jpg" in log and "cannot decode" in log
    assert "line 9: audio" in log and "line 11: audio: file not found" in log
    assert "skipped 3 of 360 rows" in log
    assert sum(m["count"] for k, m in result.metrics["subsets"].items() if k == "image") < 360


def test_train_state_tracks_the_best_epoch_and_round_trips():
    state = TrainState()
    assert not state.record_epoch({"epoch": 1, "val_accuracy": 0.9}, monitored=False)  # pre-training
    assert state.record_epoch({"epoch": 2, "val_accuracy": 0.5}, monitored=True)
    assert not state.record_epoch({"epoch": 3, "val_accuracy": 0.5}, monitored=True)  # not better
    assert (state.epoch, state.best_epoch, state.best_score, state.stale_epochs) == (3, 2, 0.5, 1)
    assert state.early_stop_due(1) and not state.early_stop_due(2) and not state.early_stop_due(0)
    assert TrainState.from_dict(state.to_dict()) == state
    with pytest.raises(ConfigError, match="damaged"):
        TrainState.from_dict({"epoch": 1})


def test_cli_resume_keeps_the_stored_epochs_and_extends_only_on_request(tiny_builtin, tmp_path):
    from polysense.models.training.cli import run_train

    run = tmp_path / "run"
    small = [
        "--image-width",
        "8",
        "--embed-dim",
        "32",
        "--batch-size",
        "32",
        "--patience",
        "0",
        "--no-progress",
    ]
    base = ["--data", str(tiny_builtin), "--out", str(run), *small]
    assert run_train([*base, "--epochs", "2"]) == 0
    finished = (run / "metrics.json").read_text()
    with pytest.raises(ConfigError, match="already finished its 2 epochs.*--epochs"):
        run_train([*base, "--resume"])  # without --epochs: nothing silently retrained or overwritten
    assert (run / "metrics.json").read_text() == finished
    with pytest.raises(ConfigError, match="already finished"):
        run_train([*base, "--resume", "--epochs", "2"])
    assert run_train([*base, "--resume", "--epochs=3"]) == 0
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_alternating_strategy_trains_branches_and_fusion_in_turn(tiny_builtin, tmp_path):
    options = {"strategy": "alternating", "fusion": "reliability", "lr": 5e-3}
    result = _train(tiny_builtin, tmp_path / "alt", epochs=8, **options)
    assert [h["phase"] for h in result.metrics["history"]] == ["alternating"] * 8
    assert result.metrics["accuracy"] > 1 / 12  # above chance; the gradients below are the real check

    model, _ = load_trained(tmp_path / "alt")
    options = TrainOptions(data=str(tiny_builtin), out=str(tmp_path / "again"), **{**SMALL, **options})
    (tmp_path / "again").mkdir()
    batch = next(prepare_data(options, tmp_path / "again").splits["train"].batches(8, torch.device("cpu")))
    heads = torch.nn.ModuleDict({m: torch.nn.Linear(32, 12) for m in model.config.modalities})
    model.train()
    for step, trained, untouched in ((0, model.encoders, model.fusion), (1, model.fusion, model.encoders)):
        model.zero_grad(set_to_none=True)
        generators = row_generators(0, range(8))
        alternating_loss(model, heads, batch, step, 0.5, generators, BatchShare.whole(batch)).backward()
        assert all(p.grad is not None for p in trained.parameters()), step
        assert all(p.grad is None for p in untouched.parameters()), step


def test_audio_noise_reaches_the_training_batches(tiny_builtin, tmp_path):
    losses = {}
    for level in ("none", "strong"):
        result = _train(tiny_builtin, tmp_path / level, epochs=1, audio_noise=level)
        config = json.loads((tmp_path / level / "config.json").read_text())
        assert config["options"]["audio_noise"] == level
        losses[level] = result.metrics["history"][0]["train_loss"]
    assert losses["none"] != losses["strong"]  # the same seed: only the noise differs
    with pytest.raises(ConfigError, match="--audio-noise is part of the augmentation"):
        TrainOptions(data="x", out="y", audio_noise="strong", augment=False)
    with pytest.raises(ConfigError, match="--audio-noise 'loud' is unknown; choose none, light or strong"):
        TrainOptions(data="x", out="y", audio_noise="loud")


def test_label_smoothing_reaches_every_training_loss(tiny_builtin, tmp_path):
    result = _train(tiny_builtin, tmp_path / "smooth", epochs=1, label_smoothing=0.1)
    assert json.loads((tmp_path / "smooth" / "config.json").read_text())["options"]["label_smoothing"] == 0.1
    assert result.metrics["accuracy"] >= 0
    with pytest.raises(ConfigError, match=r"--label-smoothing must be in \[0, 1\), got 1.0"):
        TrainOptions(data="x", out="y", label_smoothing=1.0)

    model, _ = load_trained(tmp_path / "smooth")
    options = TrainOptions(data=str(tiny_builtin), out=str(tmp_path / "again"), **SMALL)
    (tmp_path / "again").mkdir()
    batch = next(prepare_data(options, tmp_path / "again").splits["train"].batches(8, torch.device("cpu")))
    heads = torch.nn.ModuleDict({m: torch.nn.Linear(32, 12) for m in model.config.modalities})
    share = BatchShare.whole(batch)
    losses = {
        "unimodal": lambda s: unimodal_loss(model, heads, batch, share, s),
        "fused": lambda s: fused_loss(
            model, heads, batch, 0.0, 0.5, row_generators(0, range(8)), share, label_smoothing=s
        ),
        "fused, fusion only": lambda s: fused_loss(
            model, heads, batch, 0.0, 0.0, row_generators(0, range(8)), share, label_smoothing=s
        ),
        "alternating, branches": lambda s: alternating_loss(
            model, heads, batch, 0, 0.0, row_generators(0, range(8)), share, s
        ),
        "alternating, fusion": lambda s: alternating_loss(
            model, heads, batch, 1, 0.0, row_generators(0, range(8)), share, s
        ),
    }
    model.eval()  # no dropout: the two calls differ by the smoothing alone
    with torch.no_grad():
        for name, loss in losses.items():
            assert float(loss(0.1)) != pytest.approx(float(loss(0.0)), abs=1e-6), name


def test_best_model_is_chosen_on_validation_accuracy_over_every_modality_subset():
    from polysense.models.training.train_state import validation_score

    subsets = {"image": {"accuracy": 0.9}, "audio": {"accuracy": 0.6}, "image+audio": {"accuracy": 1.0}}
    assert validation_score({"accuracy": 1.0, "subsets": subsets}) == pytest.approx(2.5 / 3)
    assert validation_score({"accuracy": 0.7, "subsets": {}}) == 0.7
    state = TrainState()
    assert state.record_epoch({"epoch": 1, "val_accuracy": 1.0, "val_score": 0.8}, monitored=True)
    # The full set is as good, but the model got worse with a modality missing: not the new best.
    assert not state.record_epoch({"epoch": 2, "val_accuracy": 1.0, "val_score": 0.7}, monitored=True)
    assert state.record_epoch({"epoch": 3, "val_accuracy": 0.99, "val_score": 0.9}, monitored=True)
    assert state.best_epoch == 3


def test_a_run_stored_before_augmentation_audio_normalisation_keep_and_solo_resumes_as_it_was_trained(
    tmp_path,
):
    from polysense.models.training.run_folder import resumed_options

    # The pretrained image family now asks for its last epoch, and for solo epochs of the encoders beside it; a
    # run stored before --keep and --solo-epochs kept its best and had no solo phase.
    options = TrainOptions(data="x", out=str(tmp_path), image_encoder="efficientnet-lite0")
    assert options.solo_epochs > 0
    stored = options.to_dict()
    for name in ("augment", "audio_norm_frames", "keep", "solo_epochs"):  # config.json before they existed
        del stored[name]
    (tmp_path / "config.json").write_text(json.dumps({"options": stored}))
    resumed = resumed_options(options, tmp_path)
    assert resumed.augment is False and resumed.audio_norm_frames == 0 and resumed.keep == "best"
    assert resumed.solo_epochs == 0


def test_the_fusion_turn_of_alternating_skips_a_modality_no_sample_in_the_batch_has(tiny_builtin, tmp_path):
    options = TrainOptions(data=str(tiny_builtin), out=str(tmp_path), **{**SMALL, "strategy": "alternating"})
    batch = next(prepare_data(options, tmp_path).splits["train"].batches(8, torch.device("cpu")))
    batch["present"][:, 0] = 0  # no image in this batch
    from polysense.models.model import ModelConfig, MultimodalClassifier

    model = MultimodalClassifier(ModelConfig(("image", "text", "audio"), 12, embed_dim=32, vocab_size=200))
    encoded = []
    model.encoders["image"].register_forward_hook(lambda *args: encoded.append(1))
    model.train()
    alternating_loss(
        model, None, batch, 1, 0.5, row_generators(0, range(8)), BatchShare.whole(batch)
    ).backward()
    assert encoded == []


def test_keep_chooses_between_the_best_validation_epoch_and_the_last(
    tiny_builtin, tmp_path, capsys, monkeypatch
):
    """--keep best (the default) ends with checkpoints/best.pt's weights, --keep last with the final epoch's."""
    import polysense.models.training.train as training

    scores = iter([0.9, 0.5, 0.1] * 2)  # the first epoch validates best, so best and last differ
    monkeypatch.setattr(training, "validation_score", lambda val: next(scores))
    for keep in ("best", "last"):
        run = tmp_path / keep
        assert main(["--quiet", "train", "--data", str(tiny_builtin), "--out", str(run), "--epochs", "3",
                     "--image-width", "8", "--embed-dim", "32", "--patience", "0", "--no-progress",
                     *(["--keep", keep] if keep == "last" else [])]) == 0  # fmt: skip
        kept = torch.load(run / "model.pt", weights_only=True)["model"]
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        last = torch.load(run / "checkpoints" / "epoch_003.pt", weights_only=True)["model"]
        expected = best if keep == "best" else last
        assert all(torch.equal(kept[name], expected[name]) for name in kept), keep
        assert not all(torch.equal(best[name], last[name]) for name in best)
        metrics = json.loads((run / "metrics.json").read_text())
        assert (
            metrics["kept"] == keep
            and json.loads((run / "config.json").read_text())["options"]["keep"] == keep
        )
    assert "last epoch kept, best epoch" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--keep 'first' is unknown; choose best or last"):
        TrainOptions(data="x", out="y", keep="first")


def test_patience_running_out_with_the_last_epoch_is_not_an_early_stop(tiny_builtin, tmp_path):
    # Issue 43: "stopped early, best epoch 4 of 8" when every epoch ran.
    result = _train(tiny_builtin, tmp_path / "run", epochs=2, patience=1, lr=1e-6)
    assert result.epochs_run == 2 and not result.stopped_early


def _text_manifest(path, labels):
    path.write_text("text,label\n" + "".join(f"sample {i} words,{label}\n" for i, label in enumerate(labels)))
    return path


def test_too_few_rows_for_the_automatic_split_names_the_cause(tmp_path, capsys):
    # Issue 43: 10 rows, no split column: "give it rows in the split column", a column that is not there.
    manifest = _text_manifest(tmp_path / "m.csv", ["a", "b"] * 5)
    assert main(["train", "--data", str(manifest), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "10 usable rows are too few for the automatic split" in err and "split column" in err
    assert "the largest label has 5 rows; give each label at least 6 rows" in err


def test_a_failed_train_leaves_no_run_folder(tmp_path, capsys):
    # Issue 43: a missing manifest left an empty OUT/checkpoints behind.
    args = ["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out" / "run")]
    assert main(args) == 2 and "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()


def test_a_manifest_with_one_label_is_refused(tmp_path):
    # Issue 43: it trained to loss 0 and accuracy 1.0 without a word.
    manifest = _text_manifest(tmp_path / "m.csv", ["only"] * 30)
    with pytest.raises(ConfigError, match="every usable row has the label 'only'; .* at least two labels"):
        _train(manifest, tmp_path / "run", epochs=1)
