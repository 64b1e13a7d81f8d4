"""Ensembles (polysense.Ensemble): several bundles' probabilities averaged, offline, in batches and in streams."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, _require

import polysense
from polysense.errors import ConfigError, InputError


def _train(data: Path, out: Path, **options) -> Path:
    """A small run on `data`, exported without variants; its bundle."""
    pytest.importorskip("torch")
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    settings = dict(epochs=2, image_width=8, embed_dim=32, batch_size=32, progress=False, patience=0)
    train(TrainOptions(data=str(data), out=str(out / "run"), **{**settings, **options}))
    return export_run(out / "run", out / "bundle", progress=False, policy=None).bundle


@pytest.fixture(scope="module")
def other(other_bundle):
    return polysense.Pipeline.load(other_bundle, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def image_only(tiny_builtin, tmp_path_factory) -> Path:
    """A model of the same data and labels that takes images alone."""
    return _train(tiny_builtin, tmp_path_factory.mktemp("image"), modalities=("image",), epochs=1)


def _probabilities(prediction, labels) -> np.ndarray:
    return np.array([prediction.probabilities[label] for label in labels])


def test_an_ensemble_predicts_the_mean_of_its_members(pipe, other, test_rows):
    ensemble = polysense.Ensemble([pipe, other])
    assert ensemble.labels == pipe.labels and ensemble.modalities == pipe.modalities
    row = test_rows[0]
    for sample in ({"image": row.image, "text": row.text, "audio": row.audio}, {"text": row.text}):
        got = ensemble.predict(**sample)
        members = [_probabilities(m.predict(**sample), pipe.labels) for m in (pipe, other)]
        assert not np.allclose(members[0], members[1], atol=1e-3)  # two models, not one twice
        np.testing.assert_allclose(_probabilities(got, pipe.labels), np.mean(members, 0), atol=1e-6)
        assert got.label == pipe.labels[int(np.mean(members, 0).argmax())]
        assert sum(got.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert sorted(got.embeddings) == sorted(sample)
        assert all(e.shape == (2, pipe.embed_dim) for e in got.embeddings.values())
        assert got.timings["total"] > 0 and "fusion" in got.timings
    samples = [{"image": r.image, "text": r.text} for r in test_rows[:5]]
    batch = ensemble.predict_batch(samples)
    for sample, prediction in zip(samples, batch):
        one = ensemble.predict(**sample)
        np.testing.assert_allclose(
            _probabilities(prediction, pipe.labels), _probabilities(one, pipe.labels), atol=1e-5
        )


@pytest.mark.slow
def test_an_ensemble_loads_bundles_and_refuses_what_cannot_be_averaged(
    bundle, other_bundle, pipe, other, image_only
):
    loaded = polysense.Ensemble.load([bundle, other_bundle], device="cpu", precision="fp32")
    assert len(loaded.members) == 2 and loaded.labels == pipe.labels
    paths = (p for p in (bundle, other_bundle))  # any iterable of paths
    assert len(polysense.Ensemble.load(paths).members) == 2
    with pytest.raises(ConfigError, match="non-empty list of bundle paths"):
        polysense.Ensemble.load([])
    for path in (str(bundle), Path(bundle)):
        with pytest.raises(ConfigError, match="not one path"):
            polysense.Ensemble.load(path)
    with pytest.raises(ConfigError, match="at most 16 bundles"):
        polysense.Ensemble.load([bundle] * 17)
    with pytest.raises(ConfigError, match="non-empty list of polysense.Pipeline"):
        polysense.Ensemble([])
    with pytest.raises(ConfigError, match="non-empty list of polysense.Pipeline"):
        polysense.Ensemble([pipe, "bundle/"])
    with pytest.raises(ConfigError, match="bundle 1 takes image but bundle 0 takes image\\+text\\+audio"):
        polysense.Ensemble([pipe, polysense.Pipeline.load(image_only, device="cpu")])
    with pytest.raises(ConfigError, match="bundle 1 was loaded with other limits than bundle 0"):
        polysense.Ensemble(
            [pipe, polysense.Pipeline.load(bundle, limits=polysense.Limits(max_audio_seconds=99))]
        )
    ensemble = polysense.Ensemble([pipe, other])
    with pytest.raises(InputError, match="non-empty list of sample dicts"):
        ensemble.predict_batch([])
    with pytest.raises(InputError, match="an ensemble takes sample dicts"):
        ensemble.predict_batch([pipe.prepare({"text": "a calm morning"})])
    with pytest.raises(InputError, match="unknown keyword 'video'"):
        ensemble.predict(video="x.mp4")
    with pytest.raises(InputError, match="no input given"):
        ensemble.predict()
    with pytest.raises(InputError, match="trained without --voice-norm"):
        ensemble.adaptive_voice()


@pytest.fixture(scope="module")
def voice_members(tmp_path_factory):
    """Two audio-only models (seeds 0 and 1) trained with --voice-norm on a small AV-digits subset, theo never
    heard; and the subset's manifest."""
    from polysense.datasets.avdigits import AVDigitsSpec, build_rows

    fsdd, images = _require(SHARED_DATA / "fsdd"), _require(SHARED_DATA / "sign_digits")
    rows = build_rows(AVDigitsSpec(str(fsdd), str(images), seed=0, holdout_speaker="theo"))
    folder = tmp_path_factory.mktemp("ensemble_voice")
    manifest = folder / "small.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["audio", "label", "split", "speaker"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for i, r in enumerate(rows) if i % 10 == 0)
    bundles = [_train(manifest, folder / f"seed{seed}", seed=seed, voice_norm=True) for seed in (0, 1)]
    return [polysense.Pipeline.load(b, device="cpu", precision="fp32") for b in bundles], manifest


def _theo(manifest: Path, count: int) -> list[str]:
    clips = [r["audio"] for r in csv.DictReader(manifest.open()) if r["speaker"] == "theo"]
    return [str((manifest.parent / c).resolve()) for c in clips][:count]


@pytest.mark.slow
def test_an_ensemble_hears_a_voice_once_and_streams_as_it_predicts(voice_members):
    import soundfile

    members, manifest = voice_members
    ensemble = polysense.Ensemble(members)
    clips = _theo(manifest, 4)
    profile = ensemble.voice_profile(clips)
    np.testing.assert_array_equal(profile.mean, members[0].voice_profile(clips).mean)
    with_profile = ensemble.predict(audio=clips[0], voice=profile)
    expected = np.mean(
        [_probabilities(m.predict(audio=clips[0], voice=profile), m.labels) for m in members], 0
    )
    np.testing.assert_allclose(_probabilities(with_profile, members[0].labels), expected, atol=1e-6)
    # An adaptive voice hears each recording once, as it would through one Pipeline, and lends every member
    # what it had learnt before that recording.
    adaptive, alone = ensemble.adaptive_voice(), members[0].adaptive_voice()
    np.testing.assert_allclose(adaptive.profile.mean, alone.profile.mean, atol=1e-6)  # same training voices
    batch = ensemble.predict_batch([{"audio": c, "voice": adaptive} for c in clips])
    learning = ensemble.adaptive_voice()
    for clip, prediction in zip(clips, batch):
        before = learning.profile
        one = ensemble.predict(audio=clip, voice=learning)
        lent = ensemble.predict(audio=clip, voice=before)
        for got in (prediction, one):
            np.testing.assert_allclose(
                _probabilities(got, members[0].labels), _probabilities(lent, members[0].labels), atol=1e-5
            )
    for clip in clips:
        members[0].predict(audio=clip, voice=alone)
    assert adaptive.frames == learning.frames == alone.frames > 0
    # A stream through the ensemble: every member's stream, averaged; its adaptive voice learns once.
    streamed = ensemble.adaptive_voice()
    stream = ensemble.audio_stream(voice=streamed)
    for clip, offline in zip(clips, batch):
        samples, rate = soundfile.read(clip, dtype="float32")
        for start in range(0, samples.size, 800):
            stream.accept_waveform(samples[start : start + 800], rate)
        stream.input_finished()
        assert stream.finished and stream.frames_processed > 0
        np.testing.assert_allclose(
            _probabilities(stream.result(), members[0].labels),
            _probabilities(offline, members[0].labels),
            atol=1e-4,
        )
        stream.reset()
    assert streamed.frames == alone.frames
    with pytest.raises(InputError, match="sample rate changed mid-stream"):
        stream.accept_waveform(samples[:800], rate)
        stream.accept_waveform(samples[:800], rate * 2)


@pytest.mark.slow
def test_an_ensemble_refuses_members_heard_with_and_without_voices(voice_members, tmp_path):
    members, manifest = voice_members
    plain = polysense.Pipeline.load(_train(manifest, tmp_path, modalities=("audio",), epochs=1), device="cpu")
    with pytest.raises(ConfigError, match="bundle 1 was trained without --voice-norm and bundle 0 with"):
        polysense.Ensemble([members[0], plain])
    with pytest.raises(ConfigError, match="b.wav was trained with --voice-norm and a.wav without"):
        polysense.Ensemble([plain, members[0]], names=["a.wav", "b.wav"])


@pytest.mark.slow
def test_a_sample_an_ensemble_refuses_teaches_its_adaptive_voice_nothing(tmp_path):
    """An image+audio model with --voice-norm: a broken photo is refused after the audio was readable, and the
    adaptive voice must not have heard that recording."""
    from polysense.datasets.avdigits import AVDigitsSpec, build_rows

    fsdd, images = _require(SHARED_DATA / "fsdd"), _require(SHARED_DATA / "sign_digits")
    rows = build_rows(AVDigitsSpec(str(fsdd), str(images), seed=0, holdout_speaker="theo"))
    manifest = tmp_path / "small.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "label", "split", "speaker"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for i, r in enumerate(rows) if i % 20 == 0)
    from polysense.tools.edge import make_edge_bundle

    trained = _train(manifest, tmp_path, epochs=1, voice_norm=True)
    edge = make_edge_bundle(trained, tmp_path / "edge").path  # a second member (one model twice is refused)
    ensemble = polysense.Ensemble.load([trained, edge], device="cpu")
    clip = _theo(manifest, 1)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a photo")
    voice = ensemble.adaptive_voice()
    with pytest.raises(InputError):
        ensemble.predict(image=str(broken), audio=clip, voice=voice)
    assert voice.frames == 0
    ensemble.predict(audio=clip, voice=voice)
    assert voice.frames > 0


def test_an_ensemble_prepares_and_embeds_once_for_many_subsets(pipe, other, bundle, test_rows, tmp_path):
    ensemble = polysense.Ensemble([pipe, other])
    samples = [{"image": r.image, "text": r.text, "audio": r.audio} for r in test_rows[:4]]
    direct = ensemble.predict_batch(samples)
    prepared = ensemble.predict_batch([ensemble.prepare(s) for s in samples])
    embeddings = ensemble.embed(samples)
    assert len(embeddings) == 4 and embeddings.modalities == pipe.modalities
    assert embeddings.mask.shape == (4, 3) and "encode_text" in embeddings.timings
    for got in (prepared, ensemble.predict_batch(embeddings)):
        for a, b in zip(direct, got):
            np.testing.assert_allclose(
                _probabilities(a, pipe.labels), _probabilities(b, pipe.labels), atol=1e-5
            )
    text_only = ensemble.predict_batch(embeddings.select([0, 1], ["text"]))
    for sample, prediction in zip(samples, text_only):
        expected = ensemble.predict(text=sample["text"])
        np.testing.assert_allclose(
            _probabilities(prediction, pipe.labels), _probabilities(expected, pipe.labels), atol=1e-5
        )
        assert list(prediction.embeddings) == ["text"]
    with pytest.raises(InputError, match="sample 1: unknown input 'video'"):
        ensemble.embed([samples[0], {"video": "x.mp4"}])
    # What another ensemble, or one Pipeline, made is refused, not silently cut to fit.
    from polysense.tools.edge import make_edge_bundle

    # A third model: the same weights in another bundle (one model twice is refused).
    third = make_edge_bundle(bundle, tmp_path / "edge").path
    larger = polysense.Ensemble([pipe, other, polysense.Pipeline.load(third, device="cpu")])
    with pytest.raises(InputError, match="ensemble of 2 bundles, this one has 3"):
        larger.predict_batch(embeddings)
    with pytest.raises(InputError, match="sample 0 was prepared by an ensemble of 2 bundles, this one has 3"):
        larger.predict_batch([ensemble.prepare(samples[0])])
    with pytest.raises(InputError, match="come from one Pipeline"):
        ensemble.predict_batch(pipe.embed(samples))


def test_ensemble_streams_encode_in_batches_as_a_pipeline_s_do(pipe, other, fsdd_file):
    import soundfile

    from polysense.inference.streaming import encode_streams

    samples, rate = soundfile.read(fsdd_file, dtype="int16")
    ensemble = polysense.Ensemble([pipe, other])
    alone, deferred = ensemble.audio_stream(), ensemble.audio_stream(encode=False)
    for start in range(0, samples.shape[0], 800):
        for stream in (alone, deferred):
            stream.accept_waveform(samples[start : start + 800], rate)
        encode_streams([deferred])  # each member's stream, grouped by its own engine
    for stream in (alone, deferred):
        stream.input_finished()
    encode_streams([deferred])
    expected = alone.result()
    got = deferred.result()
    np.testing.assert_allclose(got.embeddings["audio"], expected.embeddings["audio"], atol=1e-5)
    np.testing.assert_allclose(
        _probabilities(got, pipe.labels), _probabilities(expected, pipe.labels), atol=1e-5
    )


@pytest.mark.slow
def test_an_ensemble_refuses_members_of_other_embedding_widths(tiny_builtin, pipe, tmp_path):
    narrow = polysense.Pipeline.load(_train(tiny_builtin, tmp_path, epochs=1, embed_dim=16), device="cpu")
    with pytest.raises(ConfigError, match="bundle 1 embeds into 16 numbers but bundle 0 into 32"):
        polysense.Ensemble([pipe, narrow])


@pytest.mark.slow
def test_the_cli_predicts_and_evaluates_with_an_ensemble(
    bundle, other_bundle, image_only, split_manifest, test_rows, tmp_path, capsys
):
    import json

    from polysense.cli.main import main
    from polysense.tools.evaluate import evaluate_bundle

    members = [str(bundle), str(other_bundle)]
    ensemble = polysense.Ensemble.load(members, device="cpu", precision="fp32")
    row = next(r for r in test_rows if r.text is not None)
    assert main(["predict", *members, "--text", row.text, "--precision", "fp32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = ensemble.predict(text=row.text)
    assert printed["label"] == expected.label and printed["modalities"] == ["text"]
    np.testing.assert_allclose(
        [printed["probabilities"][k] for k in ensemble.labels],
        _probabilities(expected, ensemble.labels),
        atol=1e-5,
    )
    manifest = str(split_manifest)
    args = ["eval", *members, "--data", manifest, "--split", "test", "--precision", "fp32", "--json"]
    assert main([*args, "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    expected = evaluate_bundle(ensemble, manifest, "test", progress=False)
    assert (
        metrics["accuracy"] == pytest.approx(expected["accuracy"]) and metrics["count"] == expected["count"]
    )
    assert set(metrics["subsets"]) >= {"image", "text", "audio", "image+text+audio"}
    for subset, scores in expected["subsets"].items():  # each subset scored by the ensemble on that subset
        assert metrics["subsets"][subset]["accuracy"] == pytest.approx(scores["accuracy"])
    assert main(["eval", *members, "--data", manifest, "--split", "test", "--no-progress"]) == 0
    assert f"{members[0]} + {members[1]} on {manifest}" in capsys.readouterr().out
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", *members, "--data", manifest, "--out", str(preds), "--no-progress"]) == 0
    with open(manifest) as handle:
        assert len(preds.read_text().splitlines()) == len(list(csv.DictReader(handle)))
    assert main(["predict", str(bundle), str(image_only), "--text", "hi"]) == 2
    assert f"{image_only} takes image but {bundle} takes image+text+audio" in capsys.readouterr().err


def test_one_model_twice_is_refused_and_errors_name_the_bundles_as_given(bundle, tmp_path, capsys):
    # Issue 43: the same bundle given twice was a two-member ensemble; errors said "bundle 0/1", not the paths.
    from polysense.cli.main import main

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    for twice in ([bundle, bundle], [bundle, copy]):
        with pytest.raises(
            ConfigError, match=f"{twice[1]} is the same model as {bundle} .*give each bundle once"
        ):
            polysense.Ensemble.load(twice, device="cpu")
    assert main(["predict", str(bundle), str(bundle), "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bundle} is the same model as {bundle}") and err.count("\n") == 1
    pipe = polysense.Pipeline.load(bundle, device="cpu")
    with pytest.raises(ConfigError, match="bundle 1 is the same model as bundle 0"):
        polysense.Ensemble([pipe, pipe])
