import json

import numpy as np
import pytest
import soundfile

pytest.importorskip("onnxruntime")

from blocking import run_blocked  # noqa: E402

import polysense  # noqa: E402
from polysense.errors import DependencyError, InputError  # noqa: E402
from polysense.tools.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def row(test_rows):
    return test_rows[0]


def _probs(prediction):
    return np.array(list(prediction.probabilities.values()))


def test_prediction_fields(pipe, row):
    prediction = pipe.predict(image=row.image, text=row.text, audio=row.audio)
    assert prediction.label in pipe.labels
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(prediction.embeddings) == {"image", "text", "audio"}
    assert prediction.embeddings["audio"].shape == (pipe.embed_dim,)
    for stage in ("preprocess_image", "encode_image", "encode_text", "encode_audio", "fusion", "total"):
        assert stage in prediction.timings
    assert pipe.providers["fusion"] == "CPUExecutionProvider"


def test_only_present_encoders_run(pipe, row):
    prediction = pipe.predict(text=row.text)
    assert set(prediction.embeddings) == {"text"}
    assert "encode_image" not in prediction.timings and "encode_audio" not in prediction.timings


def test_file_bytes_and_array_give_the_same_prediction(pipe, row):
    import cv2

    from_files = pipe.predict(image=row.image, audio=row.audio)
    with open(row.image, "rb") as image, open(row.audio, "rb") as audio:
        from_bytes = pipe.predict(image=image.read(), audio=audio.read())
    rgb = cv2.cvtColor(cv2.imread(row.image), cv2.COLOR_BGR2RGB)
    samples, rate = soundfile.read(row.audio, dtype="int16")
    from_arrays = pipe.predict(image=rgb, audio=samples, sample_rate=rate)
    np.testing.assert_allclose(_probs(from_bytes), _probs(from_files), atol=1e-6)
    np.testing.assert_allclose(_probs(from_arrays), _probs(from_files), atol=1e-5)


def test_predict_batch_equals_repeated_predict(pipe, split_manifest):
    rows = [r for r in read_manifest(split_manifest).rows if r.split == "test"][:6]
    # Mixed subsets in one batch, including different audio lengths.
    samples = [
        {"image": rows[0].image, "text": rows[0].text, "audio": rows[0].audio},
        {"text": rows[1].text},
        {"image": rows[2].image, "audio": rows[2].audio},
        {"audio": rows[3].audio},
        {"image": rows[4].image, "text": rows[4].text},
        {"text": rows[5].text, "audio": rows[5].audio},
    ]
    batched = pipe.predict_batch(samples)
    for sample, prediction in zip(samples, batched):
        alone = pipe.predict(**sample)
        assert alone.label == prediction.label
        np.testing.assert_allclose(_probs(alone), _probs(prediction), atol=1e-5)
        for modality, embedding in alone.embeddings.items():
            np.testing.assert_allclose(prediction.embeddings[modality], embedding, atol=1e-5)


def test_long_text_is_truncated_to_max_length(pipe, bundle, row):
    from polysense.preprocess.text import TextPreprocessor

    settings = pipe.description.preprocessing.text
    words = (row.text + " ") * 100
    truncated = TextPreprocessor(bundle / settings.tokenizer, settings.max_length)(words)
    assert truncated.size == settings.max_length
    pipe.predict(text=words)  # no error


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "no input given"),
        ({"video": "x.mp4"}, "unknown keyword 'video'"),
        ({"image": b"not an image"}, "cannot decode"),
        ({"audio": np.zeros(0, np.float32), "sample_rate": 16000}, "empty"),
        ({"audio": np.array([0.1, np.nan], np.float32), "sample_rate": 16000}, "NaN"),
        ({"audio": np.ones(100, np.float32)}, "sample rate"),
        ({"audio": np.zeros((2, 3, 4), np.float32), "sample_rate": 16000}, "dimensions"),
        ({"image": np.zeros((8, 8, 3), np.float64)}, "dtype"),
        ({"image": np.zeros((8,), np.uint8)}, "shape"),
        ({"text": "   "}, "empty"),
        ({"text": "hello", "sample_rate": 8000}, "sample_rate was given without audio"),
    ],
)
def test_bad_inputs_raise_polysense_errors(pipe, inputs, message):
    with pytest.raises(InputError, match=message):
        pipe.predict(**inputs)


def test_bad_batches(pipe):
    with pytest.raises(InputError, match="non-empty list"):
        pipe.predict_batch([])
    with pytest.raises(InputError, match="sample 1: unknown input 'colour'"):
        pipe.predict_batch([{"text": "a"}, {"colour": "red"}])


def test_onnxruntime_twice_installed_is_explained(monkeypatch):
    import polysense.inference.sessions as sessions

    monkeypatch.setattr(sessions, "_installed", lambda name: True)
    with pytest.raises(DependencyError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        sessions.import_onnxruntime()


@pytest.mark.slow
def test_runtime_works_where_torch_and_onnx_cannot_be_imported(exported_bundle, trained_run, row):
    bundle = exported_bundle  # trained_run's, whose torch metrics the runtime's are compared with
    result = run_blocked(
        ("torch", "onnx", "onnxscript"),
        f"""
        import json, polysense
        from polysense.tools.evaluate import evaluate_bundle
        pipe = polysense.Pipeline.load({str(bundle)!r}, device="cpu", precision="fp32")
        p = pipe.predict(image={row.image!r}, text={row.text!r}, audio={row.audio!r})
        m = evaluate_bundle(pipe, {str(trained_run / "manifest.csv")!r}, "test", progress=False)
        print(json.dumps({{"label": p.label, "accuracy": m["accuracy"]}}))
        """,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    torch_metrics = json.loads((trained_run / "metrics.json").read_text())
    assert out["accuracy"] == pytest.approx(torch_metrics["accuracy"])

    cli = run_blocked(
        ("torch", "onnx"),
        f"""
        import sys
        from polysense.cli.main import main
        sys.exit(main(["predict", {str(bundle)!r}, "--text", {row.text!r}, "--json"]))
        """,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["label"] in json.loads((bundle / "bundle.json").read_text())["labels"]


def test_missing_onnxruntime_gives_an_install_hint(bundle):
    result = run_blocked(
        ("onnxruntime",),
        f"""
        import polysense
        try:
            polysense.Pipeline.load({str(bundle)!r})
        except polysense.DependencyError as error:
            print(error)
        """,
    )
    assert "pip install 'polysense[cpu]'" in result.stdout, result.stderr


def test_cli_predict_eval_info(bundle, split_manifest, row, capsys):
    from polysense.cli.main import main

    assert main(["predict", str(bundle), "--image", row.image, "--audio", row.audio, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modalities"] == ["image", "audio"]
    assert (
        main(
            [
                "eval",
                str(bundle),
                "--data",
                str(split_manifest),
                "--split",
                "test",
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_precision", "macro_recall", "macro_f1", "subsets"} <= set(metrics)
    assert "text+audio" in metrics["subsets"]
    assert main(["info", str(bundle)]) == 0
    assert "audio_encoder" in capsys.readouterr().out
    assert main(["predict", str(bundle)]) == 2
    assert "no input given" in capsys.readouterr().err


def test_embed_then_classify_subsets_equals_predicting_the_subset(pipe, split_manifest):
    """embed() once, then predict_batch on narrowed Embeddings == predicting with only those inputs."""
    rows = [r for r in read_manifest(split_manifest).rows if r.split == "test"][:4]
    samples = [{"image": r.image, "text": r.text, "audio": r.audio} for r in rows]
    embeddings = pipe.embed(samples)
    assert len(embeddings) == 4 and embeddings.mask.tolist() == [[1.0, 1.0, 1.0]] * 4
    assert {m: v.shape for m, v in embeddings.vectors.items()} == {
        m: (4, pipe.embed_dim) for m in pipe.modalities
    }
    for subset in (("image",), ("text", "audio")):
        narrowed = embeddings.select(np.array([True, False, True, True]), subset)
        assert narrowed.mask.tolist() == [[float(m in subset) for m in pipe.modalities]] * 3
        for prediction, row in zip(pipe.predict_batch(narrowed), [rows[0], rows[2], rows[3]]):
            alone = pipe.predict(**{m: getattr(row, m) for m in subset})
            assert prediction.label == alone.label and set(prediction.embeddings) == set(subset)
            np.testing.assert_allclose(_probs(prediction), _probs(alone), atol=1e-5)
    with pytest.raises(InputError, match="unknown modality"):
        embeddings.select(None, ("smell",))


def test_public_surface_is_small(pipe):
    public = {name for name in dir(polysense.Pipeline) if not name.startswith("_")}
    methods = {"load", "predict", "predict_batch", "prepare", "embed", "audio_stream", "video_stream"}
    methods |= {"voice_profile", "adaptive_voice"}
    properties = {"labels", "modalities", "embed_dim", "description", "precisions", "providers", "limits"}
    properties |= {"precision_source"}
    assert public == methods | properties
    assert set(pipe.precisions) == set(pipe.providers) == set(pipe.description.components)


@pytest.mark.parametrize("bad", [None, "text", {"text": "a"}, iter([{"text": "a"}]), []])
def test_predict_batch_rejects_what_is_not_a_list_of_samples(pipe, bad):
    with pytest.raises(InputError, match="non-empty list of sample dicts"):
        pipe.predict_batch(bad)


def test_cuda_without_cuda_support_warns_once_and_picks_cpu_variants(bundle):
    import warnings

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback cannot be shown here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = polysense.Pipeline.load(bundle, device="cuda")
    assert len(caught) == 1, [str(w.message) for w in caught]  # one warning for the pipeline, not per session
    assert "no CUDA support" in str(caught[0].message)
    assert "fp16" not in pipe.precisions.values()  # fp16 variants are for CUDA; on a CPU they are slower
    assert set(pipe.providers.values()) == {"CPUExecutionProvider"}
