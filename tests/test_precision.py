import json
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import polysense  # noqa: E402
from polysense.bundle.reader import open_bundle  # noqa: E402
from polysense.bundle.schema import (  # noqa: E402
    DESCRIPTION_FILE,
    BundleDescription,
    ComponentSpec,
    Variant,
)
from polysense.bundle.settings import Preprocessing  # noqa: E402
from polysense.errors import ConfigError  # noqa: E402
from polysense.export.variants import cuda_available  # noqa: E402
from polysense.inference.precision import choose_precisions  # noqa: E402
from polysense.tools.manifest import read_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # exports

NAMES = ["image_encoder", "text_encoder", "audio_encoder", "fusion"]


@pytest.fixture(scope="module")
def permissive_bundle(trained_run, tmp_path_factory):
    """Every variant kept, whatever its accuracy or speed, so each one can be loaded and run."""
    from polysense.export import VariantPolicy, export_run

    policy = VariantPolicy(max_accuracy_drop=100.0, min_speedup=0.0, latency_runs=5)
    return export_run(
        trained_run, tmp_path_factory.mktemp("perm") / "bundle", progress=False, policy=policy
    ).bundle


def test_every_variant_is_measured_and_only_kept_ones_ship(exported_bundle):
    bundle = exported_bundle
    description = json.loads((bundle / DESCRIPTION_FILE).read_text())
    for name, component in description["components"].items():
        assert {v["precision"] for v in component["measurements"]} == {"int8", "fp16"}, name
        for variant in component["measurements"]:
            for key in ("val_accuracy", "accuracy_drop_points", "reason"):
                assert variant[key] is not None, (name, key)
            # Speed is measured where the variant runs: always for CPU ones, for CUDA ones only with CUDA.
            measured = variant["device"] == "cpu" or cuda_available()
            for key in ("latency_ms", "fp32_latency_ms", "speedup"):
                assert (variant[key] is not None) == measured, (name, key)
            shipped = variant["precision"] in component["variants"]
            assert shipped == variant["kept"], (name, variant)
            assert (bundle / f"{name}.{variant['precision']}.onnx").exists() == variant["kept"]


def test_auto_never_picks_a_rejected_variant(exported_bundle):
    bundle = exported_bundle
    pipe = polysense.Pipeline.load(bundle, device="cpu")
    description = open_bundle(bundle).description
    for name, precision in pipe.precisions.items():
        component = description.component(name)
        assert component.variant(precision).device in ("cpu", "any")
        rejected = {v["precision"] for v in component.measurements if not v["kept"]}
        assert precision not in rejected


def _fake_bundle(precisions: dict[str, dict]) -> BundleDescription:
    def component(name: str, variants: dict[str, dict]) -> ComponentSpec:
        kept = {p: Variant(p, f"{name}.{p}.onnx", "", 0, **entry) for p, entry in variants.items()}
        return ComponentSpec(name, None, (), (), {}, kept)

    components = {name: component(name, precisions) for name in NAMES}
    return BundleDescription(("a",), ("image", "text", "audio"), 8, components, Preprocessing())


def _with_fusion(description: BundleDescription, precisions: dict[str, dict]) -> BundleDescription:
    from dataclasses import replace

    fusion = _fake_bundle(precisions).components["fusion"]
    return replace(description, components={**description.components, "fusion": fusion})


def test_auto_takes_the_fastest_kept_variant_for_the_device():
    fast_int8 = _fake_bundle(
        {
            "fp32": {"device": "any", "latency_ms": 1.0},
            "int8": {"device": "cpu", "latency_ms": 0.4},
            "fp16": {"device": "cuda", "latency_ms": 2.0},
        }
    )
    assert set(choose_precisions(fast_int8, NAMES, "cpu", "auto").values()) == {"int8"}
    assert set(choose_precisions(fast_int8, NAMES, "cuda", "auto").values()) == {"fp16"}
    # fp16 kept without a CUDA measurement (export had no CUDA): not counted as paying, so auto runs fp32.
    unmeasured = _fake_bundle({"fp32": {"device": "any"}, "fp16": {"device": "cuda", "latency_ms": None}})
    assert set(choose_precisions(unmeasured, NAMES, "cuda", "auto").values()) == {"fp32"}
    assert set(choose_precisions(unmeasured, NAMES, "cuda", "fp16").values()) == {"fp16"}
    fp32_only = _fake_bundle({"fp32": {"device": "any"}})
    assert set(choose_precisions(fp32_only, NAMES, "cpu", "auto").values()) == {"fp32"}
    assert set(choose_precisions(fp32_only, NAMES, "cuda", "auto").values()) == {"fp32"}


def test_forcing_a_precision_says_when_it_does_not_exist():
    partial = _with_fusion(_fake_bundle({"fp32": {}}), {"fp32": {}, "int8": {"device": "cpu"}})
    with pytest.warns(UserWarning, match="no int8 variant of image_encoder, text_encoder, audio_encoder"):
        chosen = choose_precisions(partial, NAMES, "cpu", "int8")
    assert chosen["fusion"] == "int8" and chosen["image_encoder"] == "fp32"
    with pytest.raises(ConfigError, match="no fp16 variant of any component"):
        choose_precisions(partial, NAMES, "cpu", "fp16")
    with pytest.raises(ConfigError, match="image_encoder has no int8 variant"):
        choose_precisions(partial, NAMES, "cpu", {"image_encoder": "int8"})
    with pytest.raises(ConfigError, match="unknown"):
        choose_precisions(partial, NAMES, "cpu", "int4")


def test_every_variant_loads_and_predicts(permissive_bundle, trained_run):
    row = [r for r in read_manifest(trained_run / "manifest.csv").rows if r.split == "test"][0]
    sample = {"image": row.image, "text": row.text, "audio": row.audio}
    reference = polysense.Pipeline.load(permissive_bundle, device="cpu", precision="fp32").predict(**sample)
    description = open_bundle(permissive_bundle).description
    for name in NAMES:
        for precision in description.component(name).precisions:
            pipe = polysense.Pipeline.load(permissive_bundle, device="cpu", precision={name: precision})
            assert pipe.precisions[name] == precision
            prediction = pipe.predict(**sample)
            probabilities = np.array(list(prediction.probabilities.values()))
            assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
            if (
                precision == "fp16"
            ):  # fp16 stays close to fp32; int8 may move more (that is what export measures)
                np.testing.assert_allclose(probabilities, list(reference.probabilities.values()), atol=2e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        polysense.Pipeline.load(permissive_bundle, device="cpu", precision="int8")  # every component has int8


def test_latency_is_compared_side_by_side(permissive_bundle):
    from polysense.export.variants import compare_latency

    graphs = [permissive_bundle / "fusion.fp32.onnx", permissive_bundle / "fusion.int8.onnx"]
    feeds = {
        spec.name: np.ones([1 if isinstance(d, str) else d for d in spec.shape], np.float32)
        for spec in _graph_inputs(graphs[0])
    }
    fp32_ms, int8_ms = compare_latency(graphs, feeds, runs=7)  # timings themselves are not asserted
    assert fp32_ms > 0 and int8_ms > 0
    if not cuda_available():  # a CUDA figure is never a CPU one in disguise
        assert compare_latency(graphs, feeds, runs=7, device="cuda") is None
    # `auto` compares fp32 with int8 using the figures of the same side-by-side timing that kept int8.
    for name, component in json.loads((permissive_bundle / DESCRIPTION_FILE).read_text())[
        "components"
    ].items():
        int8 = next(m for m in component["measurements"] if m["precision"] == "int8")
        assert component["variants"]["fp32"]["latency_ms"] == int8["fp32_latency_ms"], name


def _graph_inputs(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()


def test_a_cuda_variant_pays_only_from_a_cuda_measurement():
    from polysense.export.variants import VariantPolicy, decide

    policy = VariantPolicy()
    kept, reason = decide("cuda", 0.0, None, policy)
    assert kept and "not measured" in reason
    assert decide("cuda", 0.0, 0.8, policy)[0] is False  # measured on CUDA and slower: rejected
    assert decide("cuda", 0.0, 1.5, policy) == (
        True,
        "kept: accuracy within budget, 1.50x fp32 speed on CUDA",
    )
    forced = VariantPolicy(min_speedup=0.0)
    kept, reason = decide("cpu", 0.0, 0.95, forced)
    assert kept and "not faster" in reason and "faster than" not in reason
    assert decide("cpu", 0.0, 0.9, policy)[0] is False
    assert decide("cuda", 50.0, None, policy)[0] is False  # accuracy first


def test_the_export_report_prints_a_variant_whose_speed_was_not_measured(tmp_path):
    from polysense.export.writer import ExportReport

    unmeasured = {
        "precision": "fp16",
        "speedup": None,
        "accuracy_drop_points": 0.0,
        "reason": "kept for CUDA",
    }
    measured = {"precision": "int8", "speedup": 1.7, "accuracy_drop_points": 0.1, "reason": "kept"}
    table = ExportReport(
        tmp_path, {}, 0.0, variants={"text_encoder": [measured, unmeasured]}
    ).variants_table()
    assert "1.70x fp32 speed" in table and "fp16  speed not measured" in table


def test_variants_judged_on_too_few_validation_samples_say_so():
    # Issue 43: on 2 validation samples export reported "0.00 points lost" with no caveat.
    from polysense.export.variants import VariantPolicy, resolution_caveat

    caveat = resolution_caveat(2, VariantPolicy())
    assert caveat.startswith("2 validation samples, each 50.00 accuracy points, over the 1-point budget")
    assert "100 or more check it" in caveat
    assert resolution_caveat(100, VariantPolicy()) == ""  # one sample is the budget: a loss beyond it shows
    assert resolution_caveat(2, VariantPolicy(max_accuracy_drop=0.0)) == ""  # any flipped sample refuses
    assert resolution_caveat(0, VariantPolicy()).startswith("0 validation samples")
