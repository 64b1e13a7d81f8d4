"""`polysense tune`: every kept variant timed on this device and checked against fp32's labels on the bundle's
probe; the choice lands in tuning.json, and precision auto follows it only for this bundle on this device."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.cli.main import main  # noqa: E402
from polysense.errors import BundleError, ConfigError  # noqa: E402
from polysense.tools.tune import MIN_AGREEMENT, PROBE_FILE, TUNING_FILE, read_probe, tune_bundle  # noqa: E402


def test_export_writes_a_probe_of_validation_samples_with_fp32_labels(bundle, pipe):
    probe = read_probe(bundle)
    assert 0 < len(probe.samples) <= 32 and len(probe.labels) == len(probe.samples)
    again = [pipe.labels.index(pipe.predict_batch([s])[0].label) for s in probe.samples]
    assert again == list(probe.labels)
    assert not (bundle / TUNING_FILE).exists()


def test_tune_picks_variants_no_slower_than_fp32_that_agree_with_it(copied_bundle):
    result = tune_bundle(copied_bundle, device="cpu")
    for name, precision in result.choices.items():
        chosen = result.measurements[name][precision]
        assert chosen["agreement"] >= MIN_AGREEMENT
        assert chosen["latency_ms"] <= result.measurements[name]["fp32"]["latency_ms"]
    tuned = polysense.Pipeline.load(copied_bundle, device="cpu")
    assert tuned.precision_source == "tuned" and tuned.precisions == result.choices
    assert polysense.Pipeline.load(copied_bundle, device="cpu", precision="fp32").precision_source == "asked"
    record = json.loads((copied_bundle / TUNING_FILE).read_text())
    assert record["machine"]["cpus"] >= 1 and "isa" in record["machine"]


@pytest.fixture
def with_int8(copied_bundle):
    """The copied bundle with a dynamic int8 variant of its fusion head (the tiny test model keeps none: int8
    does not pay at its size), listed and hashed as export lists a kept variant."""
    pytest.importorskip("onnx")
    from dataclasses import replace

    from polysense.bundle.reader import open_bundle, sha256_file
    from polysense.bundle.schema import Variant
    from polysense.export.description import write_description
    from polysense.export.quantize import quantize_int8_dynamic

    description = open_bundle(copied_bundle).description
    fusion = description.component("fusion")
    target = copied_bundle / "fusion.int8.onnx"
    quantize_int8_dynamic(copied_bundle / fusion.variant("fp32").file, target)
    variant = Variant("int8", target.name, sha256_file(target), target.stat().st_size, "cpu", 0.001)
    components = {
        **description.components,
        "fusion": replace(fusion, variants={**fusion.variants, "int8": variant}),
    }
    write_description(copied_bundle, replace(description, components=components))
    return copied_bundle


@pytest.mark.slow
def test_on_a_device_where_int8_is_slow_fp32_is_chosen(with_int8):
    copied_bundle = with_int8
    assert (
        polysense.Pipeline.load(copied_bundle, device="cpu").precisions["fusion"] == "int8"
    )  # export's pick
    with_int8 = ["fusion"]

    def slow_int8(pipeline, component, samples):
        return 5.0 if pipeline.precisions[component] == "int8" else 1.0

    result = tune_bundle(copied_bundle, device="cpu", measure=slow_int8)
    assert all(result.choices[n] == "fp32" for n in with_int8)
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precisions == result.choices


def test_a_tuning_for_another_bundle_or_device_is_ignored(copied_bundle):
    def fast_int8(pipeline, component, samples):
        return 0.5 if pipeline.precisions[component] == "int8" else 1.0

    tune_bundle(copied_bundle, device="cpu", measure=fast_int8)
    record = json.loads((copied_bundle / TUNING_FILE).read_text())
    (copied_bundle / TUNING_FILE).write_text(json.dumps({**record, "device": "cuda"}))
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "export"
    (copied_bundle / TUNING_FILE).write_text(json.dumps({**record, "bundle_sha256": "0" * 64}))
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "export"
    (copied_bundle / TUNING_FILE).write_text(
        json.dumps({**record, "machine": {**record["machine"], "isa": []}})
    )
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "export"  # another CPU
    (copied_bundle / TUNING_FILE).write_text(
        json.dumps(
            {**record, "machine": {**record["machine"], "model": "another CPU, same instruction sets"}}
        )
    )
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "export"
    older = {key: value for key, value in record["machine"].items() if key != "model"}
    (copied_bundle / TUNING_FILE).write_text(json.dumps({**record, "machine": older}))  # tuned before models
    assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "tuned"
    for damaged in ("{not json", "[]", "[" * 100_000):
        (copied_bundle / TUNING_FILE).write_text(damaged)
        assert polysense.Pipeline.load(copied_bundle, device="cpu").precision_source == "export"


def test_probe_problems_say_how_to_fix_them(copied_bundle):
    (copied_bundle / PROBE_FILE).unlink()
    with pytest.raises(ConfigError, match="--data MANIFEST"):
        tune_bundle(copied_bundle)
    (copied_bundle / PROBE_FILE).write_bytes(b"PK not really a zip")
    with pytest.raises(BundleError, match="not a probe polysense wrote"):
        tune_bundle(copied_bundle)
    np.savez(copied_bundle / PROBE_FILE, labels=np.zeros(3, np.int64))  # labels without samples
    with pytest.raises(BundleError, match="do not match"):
        tune_bundle(copied_bundle)


def test_tune_cli_makes_a_probe_from_a_manifest_and_prints_the_choice(copied_bundle, split_manifest, capsys):
    (copied_bundle / PROBE_FILE).unlink()
    assert main(["tune", str(copied_bundle), "--data", str(split_manifest)]) == 0
    out = capsys.readouterr().out
    assert "probe: 32 samples" in out and "precision auto now uses it" in out
    assert main(["tune", str(copied_bundle), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["choices"]) == {
        "image_encoder",
        "text_encoder",
        "audio_encoder",
        "fusion",
    }
    assert main(["tune", str(copied_bundle), "--threads", "-1"]) == 2


def test_an_edge_bundle_carries_the_probe_and_can_be_tuned_on_its_device(bundle, tmp_path):
    from polysense.tools.edge import make_edge_bundle

    edge = make_edge_bundle(bundle, tmp_path / "edge")
    result = tune_bundle(edge.path)
    assert result.choices == edge.precisions  # one variant each: measured and confirmed
    packed = make_edge_bundle(bundle, tmp_path / "packed", archive=True).path
    with pytest.raises(ConfigError, match="unpack it"):
        tune_bundle(packed)
    assert polysense.Pipeline.load(edge.path, device="cpu").precision_source == "tuned"
