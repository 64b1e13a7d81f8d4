"""Voice profiles (polysense.preprocess.voice) and models trained with --voice-norm, from training to the runtime."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, _require

import polysense
from polysense.cli.main import main
from polysense.errors import InputError
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile, speaker_profiles, voice_for

N_MELS = 40


def _recordings(seed: int, count: int = 6) -> list[np.ndarray]:
    """Log-mel-like clips: a loud middle (the word) between quiet pauses at the floor."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        frames = np.full((60, N_MELS), -13.8, np.float32)
        frames[15:45] = rng.normal(-6, 2, (30, N_MELS))
        clips.append(frames)
    return clips


def test_a_profile_removes_what_a_voice_adds_to_every_band():
    clips = _recordings(0)
    offset = np.linspace(-3, 2, N_MELS).astype(np.float32)  # a voice's (or microphone's) colour
    scale = np.linspace(0.7, 1.4, N_MELS).astype(np.float32)
    other = [c * scale + offset for c in clips]
    plain, coloured = VoiceProfile.from_frames(clips), VoiceProfile.from_frames(other)
    assert plain.frames == coloured.frames
    for clip, changed in zip(clips, other):
        # The same up to one overall gain (the spread's geometric mean is fixed at 1): the scale's own
        gain = np.exp(np.log(scale).mean())
        assert np.allclose(coloured.normalise(changed), plain.normalise(clip) * gain, atol=1e-4)
    assert plain.frames == 6 * 30 and np.exp(np.log(plain.spread).mean()) == pytest.approx(1.0, rel=1e-5)


def test_pauses_do_not_enter_the_profile():
    clips = _recordings(1)
    longer = [np.concatenate([np.full((200, N_MELS), -13.8, np.float32), c]) for c in clips]
    a, b = VoiceProfile.from_frames(clips), VoiceProfile.from_frames(longer)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.spread, b.spread) and a.frames == b.frames


def test_silence_alone_and_bad_profiles_are_refused(tmp_path):
    with pytest.raises(InputError, match="no speech"):
        VoiceProfile.from_frames([np.zeros((0, N_MELS), np.float32)])
    with pytest.raises(InputError, match="speaker 'x'"):
        speaker_profiles([("x", np.zeros((0, N_MELS), np.float32))])
    with pytest.raises(InputError, match="positive spread"):
        VoiceProfile(np.zeros(N_MELS), np.zeros(N_MELS), 1)
    with pytest.raises(InputError, match="one length"):
        VoiceProfile(np.zeros(N_MELS), np.ones(3), 1)
    profile = VoiceProfile.from_frames(_recordings(2))
    with pytest.raises(InputError, match="40 mel bands but the model's frames have 3"):
        profile.normalise(np.zeros((5, 3), np.float32))
    path = tmp_path / "voice.json"
    profile.save(path)
    loaded = VoiceProfile.load(path)
    assert np.array_equal(loaded.mean, profile.mean) and loaded.frames == profile.frames
    for text, match in [
        ("not json", "not a voice profile"),
        ("[" * 100_000, "not a voice profile"),  # nesting too deep for the parser: refused, not a crash
        ("[1, 2]", "mean, spread and frames"),
        (json.dumps({"mean": [1.0], "spread": ["a"], "frames": 1}), "lists of numbers"),
        (json.dumps({"mean": [1.0], "spread": [1.0], "frames": True}), "positive whole number"),
        (json.dumps({"mean": [1.0], "spread": [-1.0], "frames": 3}), "positive spread"),
    ]:
        path.write_text(text)
        with pytest.raises(InputError, match=match):
            VoiceProfile.load(path)
    path.write_bytes(b'{"mean": "\xff"}')  # not UTF-8
    with pytest.raises(InputError, match="not a voice profile"):
        VoiceProfile.load(path)
    with pytest.raises(InputError, match="polysense voice BUNDLE"):
        VoiceProfile.load(tmp_path / "missing.json")
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(InputError, match="too large"):
        VoiceProfile.load(path)


def test_which_profile_a_recording_gets():
    default, mine = VoiceProfile.from_frames(_recordings(3)), VoiceProfile.from_frames(_recordings(4))
    assert voice_for(default, None) is default and voice_for(default, mine) is mine
    assert voice_for(None, None) is None
    with pytest.raises(InputError, match="trained without --voice-norm"):
        voice_for(None, mine)
    with pytest.raises(InputError, match="polysense.VoiceProfile"):
        voice_for(default, "voice.json")
    narrow = VoiceProfile(np.zeros(8), np.ones(8), 1)
    with pytest.raises(InputError, match="8 mel bands"):
        voice_for(default, narrow)


def test_an_adaptive_voice_moves_from_the_prior_to_the_speakers_own():
    prior = VoiceProfile.from_frames(_recordings(6))
    offset = np.linspace(-3, 2, N_MELS).astype(np.float32)
    clips = [c * np.linspace(0.7, 1.4, N_MELS).astype(np.float32) + offset for c in _recordings(7)]
    own = VoiceProfile.from_frames(clips)
    voice = AdaptiveVoice(prior, prior_frames=30)
    assert voice.profile is prior and voice.frames == 0
    voice.hear(np.zeros((0, N_MELS), np.float32))  # an empty recording teaches nothing
    distances = [np.abs(voice.profile.mean - own.mean).mean()]
    for clip in clips:  # 30 voiced frames each (the pauses around the word are left out)
        voice.hear(clip)
        distances.append(np.abs(voice.profile.mean - own.mean).mean())
    assert all(later < earlier for earlier, later in zip(distances, distances[1:]))
    assert voice.frames == voice.profile.frames == 6 * 30
    # The prior counts for 30 frames against the 180 heard: the mean is the count-weighted mixture.
    mixed = (180 * own.mean + 30 * prior.mean) / 210
    np.testing.assert_allclose(voice.profile.mean, mixed, atol=1e-4)
    assert np.exp(np.log(voice.profile.spread).mean()) == pytest.approx(1.0, rel=1e-5)
    unswayed = AdaptiveVoice(prior, prior_frames=0)  # no prior weight: exactly the profile of what it heard
    for clip in clips:
        unswayed.hear(clip)
    np.testing.assert_allclose(unswayed.profile.mean, own.mean, atol=1e-4)
    np.testing.assert_allclose(unswayed.profile.spread, own.spread, rtol=1e-4)
    voice.reset()
    assert voice.profile is prior and voice.frames == 0


def test_an_adaptive_voice_refuses_what_it_cannot_use():
    prior = VoiceProfile.from_frames(_recordings(8))
    with pytest.raises(InputError, match="starts from a VoiceProfile"):
        AdaptiveVoice("voice.json")
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match="prior_frames must be a whole number"):
            AdaptiveVoice(prior, bad)
    voice = AdaptiveVoice(prior)
    with pytest.raises(InputError, match=r"log-mel frames \[T, 40\]"):
        voice.hear(np.zeros((10, 3), np.float32))
    with pytest.raises(InputError, match="log-mel frames, numbers"):
        voice.hear([["a"] * N_MELS])
    voice.hear(np.full((5, N_MELS), np.nan))  # nothing finite to learn from: left as it was
    assert voice.frames == 0 and voice.profile is prior
    assert voice_for(prior, voice) is voice
    with pytest.raises(InputError, match="trained without --voice-norm"):
        voice_for(None, voice)
    with pytest.raises(InputError, match="8 mel bands"):
        voice_for(prior, AdaptiveVoice(VoiceProfile(np.zeros(8), np.ones(8), 1)))


# -- a model trained with --voice-norm on real voices ---------------------------------------------------------


@pytest.fixture(scope="module")
def voice_run(tmp_path_factory):
    """Audio alone on a small AV-digits subset with a speaker column, theo never heard in training."""
    pytest.importorskip("torch")
    from polysense.datasets.avdigits import AVDigitsSpec, build_rows
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    fsdd, images = _require(SHARED_DATA / "fsdd"), _require(SHARED_DATA / "sign_digits")
    rows = build_rows(AVDigitsSpec(str(fsdd), str(images), seed=0, holdout_speaker="theo"))
    folder = tmp_path_factory.mktemp("voice")
    manifest = folder / "small.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["audio", "label", "split", "speaker"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for i, r in enumerate(rows) if i % 10 == 0)
    options = TrainOptions(
        data=str(manifest), out=str(folder / "run"), epochs=2, embed_dim=32, progress=False, voice_norm=True
    )
    result = train(options)
    bundle = export_run(folder / "run", folder / "bundle", progress=False, policy=None).bundle
    return manifest, folder / "run", result, bundle


@pytest.mark.slow
def test_evaluation_hears_each_speaker_as_training_did(voice_run):
    from polysense.tools.evaluate import evaluate_bundle

    _, run, result, bundle = voice_run
    pipeline = polysense.Pipeline.load(bundle, device="cpu")
    assert pipeline.description.preprocessing.audio.voice is not None  # the training speakers' average
    metrics = evaluate_bundle(pipeline, run / "manifest.csv", "test", progress=False)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])


@pytest.mark.slow
def test_evaluation_without_speakers_says_what_stands_in(voice_run, tmp_path, caplog):
    from polysense.tools.evaluate import evaluate_bundle

    manifest, _, _, bundle = voice_run
    rows = list(csv.DictReader(manifest.open()))[:20]
    anonymous = tmp_path / "anonymous.csv"
    with anonymous.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["audio", "label"])
        writer.writeheader()
        writer.writerows(
            {"audio": str((manifest.parent / r["audio"]).resolve()), "label": r["label"]} for r in rows
        )
    pipeline = polysense.Pipeline.load(bundle, device="cpu")
    with caplog.at_level("WARNING", logger="polysense"):
        evaluate_bundle(pipeline, anonymous, progress=False)
    assert "20 recordings have no speaker" in caplog.text and "add a speaker column" in caplog.text


@pytest.mark.slow
def test_a_profile_changes_what_the_model_hears_and_streams_hear_it_too(voice_run):
    manifest, _, _, bundle = voice_run
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    theo = [r["audio"] for r in csv.DictReader(manifest.open()) if r["speaker"] == "theo"]
    theo = [str((manifest.parent / p).resolve()) for p in theo]
    voice = pipeline.voice_profile(theo[:10])
    clip = theo[-1]
    own = pipeline.embed([{"audio": clip, "voice": voice}]).vectors["audio"][0]
    average = pipeline.embed([{"audio": clip}]).vectors["audio"][0]
    assert not np.allclose(own, average, atol=1e-3)
    assert pipeline.predict(audio=clip, voice=voice).label in pipeline.labels

    import soundfile

    samples, rate = soundfile.read(clip, dtype="float32")
    stream = pipeline.audio_stream(voice=voice)
    for start in range(0, samples.size, 800):
        stream.accept_waveform(samples[start : start + 800], rate)
    stream.input_finished()
    assert np.allclose(stream.embedding, own, atol=1e-5)


@pytest.mark.slow
def test_an_adaptive_voice_hears_each_recording_with_what_came_before_and_streams_alike(voice_run):
    import soundfile

    manifest, _, _, bundle = voice_run
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    theo = [r["audio"] for r in csv.DictReader(manifest.open()) if r["speaker"] == "theo"]
    theo = [str((manifest.parent / p).resolve()) for p in theo][:4]
    voice = pipeline.adaptive_voice()
    assert voice.profile is pipeline.description.preprocessing.audio.voice
    learnt = []
    for clip in theo:  # each recording heard with the profile learnt before it, then learnt from
        before = voice.profile
        got = pipeline.embed([{"audio": clip, "voice": voice}]).vectors["audio"][0]
        np.testing.assert_array_equal(
            got, pipeline.embed([{"audio": clip, "voice": before}]).vectors["audio"][0]
        )
        assert voice.frames > (learnt[-1][1] if learnt else 0)
        learnt.append((got, voice.frames))
    # A batch is heard in order, as one call after another.
    batch = pipeline.adaptive_voice()
    vectors = pipeline.embed([{"audio": clip, "voice": batch} for clip in theo]).vectors["audio"]
    np.testing.assert_allclose(vectors, [v for v, _ in learnt], atol=1e-6)
    # Streams: a recording is heard with the voice learnt when it starts, and joins it when it finishes.
    streamed = pipeline.adaptive_voice()
    for clip, (offline, frames) in zip(theo, learnt):
        samples, rate = soundfile.read(clip, dtype="float32")
        stream = pipeline.audio_stream(voice=streamed)
        for start in range(0, samples.size, 800):
            stream.accept_waveform(samples[start : start + 800], rate)
        heard_before = streamed.frames
        stream.input_finished()
        assert heard_before < frames  # nothing of this recording was learnt before it finished
        assert np.allclose(stream.embedding, offline, atol=1e-5) and streamed.frames == frames
    np.testing.assert_allclose(streamed.profile.mean, voice.profile.mean, atol=1e-5)
    # A long stream teaches at most its first MAX_HEARD_FRAMES frames; one reset before its end, nothing.
    from polysense.inference.streaming import MAX_HEARD_FRAMES

    long_voice = pipeline.adaptive_voice()
    stream = pipeline.audio_stream(voice=long_voice)
    samples = np.tile(samples, int(40 * rate / samples.size) + 1)  # over 40 s of the last clip, repeated
    stream.accept_waveform(samples[: samples.size // 2], rate)
    stream.reset()
    assert long_voice.frames == 0
    stream.accept_waveform(samples, rate)
    stream.input_finished()
    assert 0 < long_voice.frames <= MAX_HEARD_FRAMES < stream.frames_processed


@pytest.mark.slow
def test_voice_cli_writes_a_profile_that_predict_takes(voice_run, tmp_path, capsys):
    manifest, _, _, bundle = voice_run
    clips = [
        str((manifest.parent / r["audio"]).resolve())
        for r in csv.DictReader(manifest.open())
        if r["speaker"] == "george"
    ][:5]
    out = tmp_path / "george.json"
    assert main(["voice", str(bundle), *clips, "--out", str(out)]) == 0
    assert "voiced frames" in capsys.readouterr().out
    assert main(["voice", str(bundle), *clips, "--out", str(tmp_path / "missing" / "v.json")]) == 2
    assert "cannot write the voice profile" in capsys.readouterr().err
    assert main(["predict", str(bundle), "--audio", clips[0], "--voice", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in [str(d) for d in range(10)]
    assert main(["stream", str(bundle), "--audio", clips[0], "--voice", str(out), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    voice = polysense.VoiceProfile.load(out)
    expected = polysense.Pipeline.load(bundle, device="cpu").predict(audio=clips[0], voice=voice)
    assert events[-1]["final"] and events[-1]["label"] == expected.label
    preds = tmp_path / "preds.jsonl"
    assert (
        main(["predict", str(bundle), "--data", str(manifest), "--out", str(preds), "--voice", str(out)]) == 0
    )
    assert len(preds.read_text().splitlines()) == len(list(csv.DictReader(manifest.open())))


@pytest.mark.slow
def test_voice_norm_needs_audio_and_a_speaker_for_every_recording(tiny_builtin, tmp_path):
    pytest.importorskip("torch")
    from polysense.errors import ConfigError, ManifestError
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    base = dict(out=str(tmp_path / "run"), epochs=1, progress=False, voice_norm=True)
    with pytest.raises(ManifestError, match="speaker is empty; --voice-norm needs who speaks"):
        train(TrainOptions(data=str(tiny_builtin), **base))
    with pytest.raises(ConfigError, match="--voice-norm removes speakers' voices from audio"):
        train(TrainOptions(data=str(tiny_builtin), modalities=("image",), **base))
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_bundle_without_voice_norm_refuses_profiles(bundle, pipe, test_rows, tmp_path, capsys):
    """The session's bundle (built-in data, trained without --voice-norm) names the mistake in one line."""
    profile = tmp_path / "voice.json"
    VoiceProfile.from_frames(_recordings(5)).save(profile)
    audio = next(r.audio for r in test_rows if r.audio is not None)
    assert main(["voice", str(bundle), audio, "--out", str(tmp_path / "x.json")]) == 2
    assert "trained without --voice-norm" in capsys.readouterr().err
    assert main(["predict", str(bundle), "--audio", audio, "--voice", str(profile)]) == 2
    assert "trained without --voice-norm" in capsys.readouterr().err
    assert main(["predict", str(bundle), "--text", "hi", "--voice", str(tmp_path / "none.json")]) == 2
    assert "voice profile not found" in capsys.readouterr().err
    with pytest.raises(InputError, match="voice was given without audio"):
        pipe.predict(text="hi", voice=VoiceProfile.load(profile))
    with pytest.raises(InputError, match="trained without --voice-norm"):
        pipe.audio_stream(voice=VoiceProfile.load(profile))
    with pytest.raises(InputError, match="trained without --voice-norm, so an adaptive voice"):
        pipe.adaptive_voice()


@pytest.mark.slow
def test_served_requests_and_streams_take_a_profile(voice_run):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import base64

    import soundfile
    from starlette.testclient import TestClient

    from polysense.serving.handler import ServeOptions
    from polysense.serving.http import create_app

    manifest, _, _, bundle = voice_run
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    clips = [str((manifest.parent / r["audio"]).resolve()) for r in csv.DictReader(manifest.open())]
    voice = pipeline.voice_profile(clips[:10])
    expected = pipeline.predict(audio=clips[-1], voice=voice)
    audio = base64.b64encode(Path(clips[-1]).read_bytes()).decode()
    with TestClient(create_app(pipeline, ServeOptions())) as client:
        assert client.app.state.service.ready.wait(10)
        answer = client.post("/v1/predict", json={"audio": audio, "voice": voice.to_dict()}).json()
        assert answer["label"] == expected.label
        got = [answer["probabilities"][k] for k in expected.probabilities]
        np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)
        profile = json.dumps(voice.to_dict())
        clip = Path(clips[-1]).read_bytes()
        as_file = {"audio": ("a.wav", clip), "voice": ("voice.json", profile.encode())}
        as_field = {"files": {"audio": ("a.wav", clip)}, "data": {"voice": profile}}
        for multipart in ({"files": as_file}, as_field):
            answer = client.post("/v1/predict", **multipart).json()
            got = [answer["probabilities"][k] for k in expected.probabilities]
            np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=1e-5)
        samples, rate = soundfile.read(clips[-1], dtype="int16")
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"sample_rate": rate, "format": "s16le", "voice": voice.to_dict()})
            assert ws.receive_json()["type"] == "ready"
            ws.send_bytes(samples.tobytes())
            assert ws.receive_json()["type"] == "partial"
            ws.send_json({"type": "end"})
            final = ws.receive_json()
        assert final["type"] == "final" and final["label"] == expected.label
