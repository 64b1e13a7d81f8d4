import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.bundle.reader import open_bundle  # noqa: E402
from polysense.bundle.schema import DESCRIPTION_FILE, SCHEMA_VERSION  # noqa: E402
from polysense.errors import BundleError, ConfigError  # noqa: E402
from polysense.export import ExportError, export_run  # noqa: E402
from polysense.export.parity import TOLERANCE  # noqa: E402
from polysense.export.reference import torch_logits  # noqa: E402
from polysense.inference.preprocessors import build_preprocessors  # noqa: E402
from polysense.models.training.run_folder import load_trained  # noqa: E402
from polysense.tools.manifest import read_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # trains and exports


@pytest.fixture(scope="module")
def bundle(exported_bundle):
    """The run trained and exported in this session (conftest.py), not the committed tiny bundle: these tests
    check what export writes now."""
    return exported_bundle


def _test_rows(run):
    return [r for r in read_manifest(run / "manifest.csv").rows if r.split == "test"]


def test_description_describes_every_component(bundle):
    description = json.loads((bundle / DESCRIPTION_FILE).read_text())
    assert description["schema_version"] == SCHEMA_VERSION
    assert set(description["components"]) == {"image_encoder", "text_encoder", "audio_encoder", "fusion"}
    text = description["components"]["text_encoder"]
    assert [i["name"] for i in text["inputs"]] == ["ids", "mask"]
    assert text["inputs"][0]["shape"] == ["batch", "length"] and text["inputs"][0]["dtype"] == "int64"
    audio = description["components"]["audio_encoder"]
    assert audio["inputs"][0]["shape"] == ["batch", "frames", 40]
    state = {s["name"]: s for s in description["streaming"]["audio"]["state"]}
    assert state["gru_hidden"] == {"name": "gru_hidden", "shape": [1, 1, 96], "batch_axis": 1}
    assert state["pool_sum"]["batch_axis"] == 0
    assert description["streaming"]["audio"]["frames_per_second"] == 100
    assert description["preprocessing"]["audio"]["hop_length"] == 160
    assert all(d <= TOLERANCE for d in description["metrics"]["parity_max_abs_diff"].values())
    assert "image+audio" in description["metrics"]["fp32"]["subsets"]
    assert {"polysense", "torch", "onnx", "onnxruntime", "opset"} <= set(description["producer"])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(bundle / "fusion.fp32.onnx")).metadata_props}
    assert json.loads(props["polysense"])["labels"] == description["labels"]


def test_description_round_trips_through_its_dict(bundle):
    description = open_bundle(bundle).description
    assert polysense.BundleDescription.from_dict(description.to_dict()) == description
    assert description.to_dict() == json.loads((bundle / DESCRIPTION_FILE).read_text())


def test_runtime_predictions_equal_torch_on_the_test_split(trained_run, bundle):
    model, _ = load_trained(trained_run)
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    preprocessors = build_preprocessors(pipeline.description.preprocessing, pipeline.modalities, bundle)
    rows = _test_rows(trained_run)
    samples = [{"image": r.image, "text": r.text, "audio": r.audio} for r in rows]
    predictions = pipeline.predict_batch(samples)
    for sample, prediction in zip(samples, predictions):
        features = {m: preprocessors[m](value) for m, value in sample.items()}
        expected = torch.softmax(torch_logits(model, features), dim=1)[0].numpy()
        got = np.array([prediction.probabilities[label] for label in pipeline.labels])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert prediction.label == pipeline.labels[int(expected.argmax())]


def test_runtime_eval_equals_training_metrics(trained_run, bundle):
    from polysense.tools.evaluate import evaluate_bundle

    torch_metrics = json.loads((trained_run / "metrics.json").read_text())
    runtime = evaluate_bundle(
        polysense.Pipeline.load(bundle, device="cpu", precision="fp32"),
        trained_run / "manifest.csv",
        "test",
        progress=False,
    )
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert runtime[key] == pytest.approx(torch_metrics[key]), key
    assert runtime["confusion_matrix"] == torch_metrics["confusion_matrix"]
    assert set(runtime["subsets"]) == set(torch_metrics["subsets"])
    for subset, values in torch_metrics["subsets"].items():
        assert runtime["subsets"][subset]["accuracy"] == pytest.approx(values["accuracy"]), subset


def test_export_failing_midway_leaves_no_bundle(trained_run, tmp_path, monkeypatch):
    import polysense.export.writer as writer

    real_check = writer.check_component

    def failing_on_fusion(component, path, cases):
        if component.name == "fusion":
            raise ExportError("simulated failure")
        return real_check(component, path, cases)

    monkeypatch.setattr(writer, "check_component", failing_on_fusion)
    with pytest.raises(ExportError, match="simulated"):
        export_run(trained_run, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_export_refuses_an_existing_folder_and_an_unfinished_run(trained_run, tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_run(trained_run, tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="no finished run"):
        export_run(tmp_path, tmp_path / "c", progress=False)


def _copy(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def test_altered_truncated_or_missing_files_are_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    data = bytearray((copy / "image_encoder.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "image_encoder.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        polysense.Pipeline.load(copy)  # every listed file is verified, whichever precision runs
    (copy / "image_encoder.fp32.onnx").write_bytes(bytes(data[:1000]))
    with pytest.raises(BundleError, match="truncated"):
        open_bundle(copy)
    (copy / "image_encoder.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(copy)


def test_corrupted_onnx_with_a_matching_hash_is_refused_cleanly(bundle, tmp_path):
    from polysense.bundle.reader import sha256_file

    copy = _copy(bundle, tmp_path)
    (copy / "fusion.fp32.onnx").write_bytes(b"not an onnx model at all")
    description = json.loads((copy / DESCRIPTION_FILE).read_text())
    fp32 = description["components"]["fusion"]["variants"]["fp32"]
    fp32.update(sha256=sha256_file(copy / "fusion.fp32.onnx"), bytes=24)
    (copy / DESCRIPTION_FILE).write_text(json.dumps(description))
    with pytest.raises(BundleError, match="onnxruntime cannot load it"):
        polysense.Pipeline.load(copy, precision="fp32")  # auto might pick a fusion variant instead


def test_bad_bundle_folders(bundle, tmp_path):
    with pytest.raises(polysense.InputError, match="not found"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        open_bundle(tmp_path / "file")
    copy = _copy(bundle, tmp_path)
    description = json.loads((copy / DESCRIPTION_FILE).read_text())
    (copy / DESCRIPTION_FILE).write_text(json.dumps({**description, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99"):
        open_bundle(copy)
    (copy / DESCRIPTION_FILE).write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(copy)
    (copy / DESCRIPTION_FILE).unlink()
    with pytest.raises(BundleError, match="no bundle.json"):
        open_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**description, "schema_version": 1}))
    with pytest.raises(BundleError, match="older polysense.*export it again"):
        open_bundle(copy)


def test_missing_modalities_train_export_and_evaluate(tiny_builtin, tmp_path):
    """Rows with empty cells (a modality missing) flow through training, export and runtime evaluation."""
    import csv

    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train
    from polysense.tools.evaluate import evaluate_bundle

    rows = list(csv.DictReader(tiny_builtin.open()))
    for index, row in enumerate(rows):
        row["image"] = str(tiny_builtin.parent / row["image"])
        row["audio"] = "" if index % 3 == 0 else str(tiny_builtin.parent / row["audio"])
        row["text"] = "" if index % 3 == 1 else row["text"]
    manifest = tmp_path / "gappy.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text", "audio", "label"])
        writer.writeheader()
        writer.writerows(rows)
    result = train(
        TrainOptions(
            data=str(manifest),
            out=str(tmp_path / "run"),
            epochs=1,
            image_width=8,
            embed_dim=32,
            progress=False,
        )
    )
    bundle = export_run(tmp_path / "run", tmp_path / "bundle", progress=False).bundle
    runtime = evaluate_bundle(
        polysense.Pipeline.load(bundle, device="cpu", precision="fp32"),
        tmp_path / "run" / "manifest.csv",
        "test",
        progress=False,
    )
    assert runtime["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert runtime["subsets"]["image+text+audio"]["count"] < runtime["subsets"]["image"]["count"]


def test_runtime_eval_skips_and_reports_an_unreadable_file(trained_run, bundle, tmp_path):
    """A damaged image costs only its own row: reported with its line, the rest evaluated."""
    import csv

    from polysense.tools.evaluate import evaluate_bundle

    rows = [r for r in _test_rows(trained_run)][:10]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "audio", "label"])
        for index, row in enumerate(rows):
            writer.writerow([broken if index == 3 else row.image, row.text, row.audio, row.label])
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    metrics = evaluate_bundle(pipeline, manifest, progress=False)
    assert metrics["count"] == len(rows) - 1
    assert len(metrics["skipped"]) == 1 and metrics["skipped"][0].startswith("line 5: ")
    assert "cannot decode image" in metrics["skipped"][0]


def test_cli_export_with_generated_flags_and_its_errors(trained_run, tmp_path, capsys):
    from polysense.cli.main import main

    out = tmp_path / "b"
    assert main(["export", str(trained_run), "--out", str(out), "--precisions", "fp32", "--no-progress"]) == 0
    assert "end to end" in capsys.readouterr().out
    assert set(open_bundle(out).description.component("fusion").precisions) == {"fp32"}
    assert main(["export", str(trained_run), "--out", str(tmp_path / "c"), "--precisions", "int4"]) == 2
    assert capsys.readouterr().err.startswith("error: --precisions: 'int4' is unknown")
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--max-accuracy-drop" in capsys.readouterr().out


def test_a_deleted_optional_variant_slims_the_bundle_instead_of_breaking_it(bundle, tmp_path):
    from polysense.errors import ConfigError

    copy = _copy(bundle, tmp_path)
    (copy / "image_encoder.fp16.onnx").unlink()
    assert "fp16" not in open_bundle(copy).description.component("image_encoder").precisions
    assert polysense.Pipeline.load(copy, device="cpu").predict(text="a calm day").probabilities
    with pytest.raises(ConfigError, match="image_encoder has no fp16 variant"):
        polysense.Pipeline.load(copy, device="cpu", precision={"image_encoder": "fp16"})
    (copy / "image_encoder.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(copy)  # fp32 is required
