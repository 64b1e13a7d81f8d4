"""Every registered encoder family and fusion head exports, and its graph computes what torch computes.

Built from randomly initialised models (no training), so a family that cannot export cannot land: this is how
`--text-encoder transformer` and `--fusion transformer` once failed only after a whole training run.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from polysense.export.components import Component, components  # noqa: E402
from polysense.export.parity import TOLERANCE, check_component, export_component  # noqa: E402
from polysense.modalities import MODALITIES  # noqa: E402
from polysense.models import ENCODERS, FUSIONS, ModelConfig, MultimodalClassifier  # noqa: E402

pytestmark = pytest.mark.slow  # torch and onnx

# Each case varies one family or the fusion over the default (from-scratch, small) families, so that a case
# costs what its own family costs.
DEFAULTS = {m: ModelConfig.__dataclass_fields__[f"{m}_family"].default for m in MODALITIES}
CASES = [
    *[
        ({**DEFAULTS, modality: family}, "concat")
        for modality in MODALITIES
        for family in ENCODERS[modality]
        if family != DEFAULTS[modality]
    ],
    *[(DEFAULTS, fusion) for fusion in FUSIONS],
]


@pytest.mark.parametrize(
    "families, fusion", CASES, ids=[f"{'-'.join(f.values())}+{fusion}" for f, fusion in CASES]
)
def test_every_family_and_fusion_exports_with_parity(families, fusion, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(
        modalities=MODALITIES,
        num_classes=5,
        embed_dim=16,
        image_width=8,
        vocab_size=40,
        fusion=fusion,
        **{f"{m}_family": families[m] for m in MODALITIES},
    )
    model = MultimodalClassifier(config).eval()
    for component in components(model, image_size=32):
        path = tmp_path / f"{component.name}.onnx"
        export_component(component, path)
        assert check_component(component, path, []) <= TOLERANCE, component.name


def _linear_component(scale: float) -> Component:
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.mul_(scale)
    return Component(
        name="image_encoder",
        modality="image",
        module=linear.eval(),
        inputs=["x"],
        outputs=["embedding"],
        dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}},
        example_builder=lambda batch, length, generator: (torch.randn(batch, 64, generator=generator),),
    )


def test_parity_allows_rounding_in_proportion_to_the_output_and_refuses_real_differences(tmp_path):
    """float32 rounding grows with an output's size, so the rule is 1e-4 plus a thousandth of the output's
    largest magnitude; a graph that computes something else (here: weights changed by 1 % after export) is
    still refused, at any scale."""
    from polysense.errors import PolysenseError
    from polysense.export.parity import RELATIVE_TOLERANCE, allowed_difference

    assert allowed_difference(np.array([0.5, -0.2])) == pytest.approx(TOLERANCE + 0.5 * RELATIVE_TOLERANCE)
    assert allowed_difference(np.array([-3000.0, 1.0])) == pytest.approx(TOLERANCE + 3.0)
    assert allowed_difference(np.zeros(0)) == TOLERANCE

    torch.manual_seed(0)
    for scale in (1.0, 1e4):  # outputs of about 1 and about 10,000
        component = _linear_component(scale)
        path = tmp_path / f"linear_{scale}.onnx"
        export_component(component, path)
        check_component(component, path, [])
        with torch.no_grad():
            component.module.weight.mul_(1.01)
        with pytest.raises(PolysenseError, match="onnxruntime differs from torch by .* where .* is allowed"):
            check_component(component, path, [])


def test_static_int8_keeps_a_streaming_state_exact(tmp_path):
    """Static int8 leaves a streaming encoder's state, and what computes it, in float: the windowed audio
    family's int8 graph fed a recording in chunks gives the embedding one call gives. Before, its window state
    was quantized at every call and the two were 0.66 apart on a 5 s stream."""
    import onnxruntime as ort

    from polysense.export.components import encoder_component
    from polysense.export.quantize import quantize_int8_static
    from polysense.models.encoders.audio_window import efficientnet_lite0_audio

    torch.manual_seed(0)
    component = encoder_component("audio", efficientnet_lite0_audio(16, 40, pretrained=False).eval(), 32)
    fp32, int8 = tmp_path / "audio.fp32.onnx", tmp_path / "audio.int8.onnx"
    export_component(component, fp32)
    generator = torch.Generator().manual_seed(0)
    calibration = [component.example(1, 40, generator) for _ in range(8)]
    feeds = [{n: t.numpy() for n, t in zip(component.inputs, case)} for case in calibration]
    quantize_int8_static(fp32, int8, feeds, tuple(s.output_name for s in component.state))

    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    frames, *start = (t.numpy() for t in component.example(1, 150, generator))  # longer than the window
    whole = session.run(None, {"frames": frames, **dict(zip(component.inputs[1:], start))})
    state = start
    for begin in range(0, 150, 20):
        chunk = session.run(
            None, {"frames": frames[:, begin : begin + 20], **dict(zip(component.inputs[1:], state))}
        )
        state = chunk[1:]
    np.testing.assert_allclose(chunk[0], whole[0], atol=1e-6)
    np.testing.assert_array_equal(state[0], whole[1])


@pytest.mark.parametrize("image_size", [32, 33])
def test_tensorflow_same_padding_exports_as_the_convolutions_own_padding(image_size, tmp_path):
    """EfficientNet-Lite's "SAME" padding reaches the graph as constants inside each Conv: no Pad, and no
    shape arithmetic at every call. Traced from the input's shape, it once cost the int8 image encoder half its
    time (docs/export.md). Even sizes pad stride-2 convolutions asymmetrically, odd ones do not."""
    import onnx

    from polysense.export.components import encoder_component
    from polysense.models.encoders.efficientnet_lite import efficientnet_lite0

    torch.manual_seed(0)
    component = encoder_component("image", efficientnet_lite0(16, pretrained=False), image_size)
    component.module.eval()
    path = tmp_path / "image.onnx"
    export_component(component, path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Pad", "Shape", "Gather", "Slice"}, ops
    assert check_component(component, path, []) <= TOLERANCE


def test_minilm_int8_is_made_from_onnxruntimes_fused_attention_and_its_fp32_graph_stays_standard(tmp_path):
    """MiniLM's fp32 graph is plain ONNX; its int8 variant is quantized from an export where each layer's
    attention is one com.microsoft.Attention node (checked against torch, padding included), as QAttention:
    12-17 % faster than int8 of the plain graph at 8-32 tokens, same outputs (docs/export.md)."""
    import onnx
    import onnxruntime as ort

    from polysense.export.components import encoder_component
    from polysense.export.variants import quantize_dynamic_int8_of
    from polysense.models.encoders.minilm import minilm_l6

    torch.manual_seed(0)
    component = encoder_component("text", minilm_l6(16, pretrained=False), 0)
    component.module.eval()
    fp32, int8 = tmp_path / "text.fp32.onnx", tmp_path / "text.int8.onnx"
    export_component(component, fp32)
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(str(fp32)).graph.node)

    method = quantize_dynamic_int8_of(component, fp32, int8)
    assert method is not None and "Attention (fused)" in method
    assert sorted(tmp_path.iterdir()) == [fp32, int8]  # the fused fp32 form it was made from is gone
    ops = [node.op_type for node in onnx.load(str(int8)).graph.node]
    assert ops.count("QAttention") == 6 and "Softmax" not in ops

    ids, mask = component.example(4, 23, torch.Generator().manual_seed(2))  # rows padded to 23 tokens
    feeds = {"ids": ids.numpy(), "mask": mask.numpy()}
    run = {
        p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (fp32, int8)
    }
    cosine = (
        (run[fp32] * run[int8]).sum(1) / np.linalg.norm(run[fp32], axis=1) / np.linalg.norm(run[int8], axis=1)
    )
    assert cosine.min() > 0.98, cosine


def test_a_failing_int8_export_form_falls_back_to_the_fp32_graph(tmp_path, monkeypatch, caplog):
    """Should MiniLM's fused form fail (here: parity), int8 is made from the fp32 graph with a warning, no
    stray file is left, and the export goes on: an int8 variant is an option, the bundle is not."""
    import onnx

    from polysense.errors import PolysenseError
    from polysense.export import variants
    from polysense.export.components import encoder_component
    from polysense.models.encoders.minilm import minilm_l6

    def refuse(*args, **kwargs):
        raise PolysenseError("text_encoder: onnxruntime differs from torch")

    torch.manual_seed(0)
    component = encoder_component("text", minilm_l6(16, pretrained=False), 0)
    component.module.eval()
    fp32, int8 = tmp_path / "text.fp32.onnx", tmp_path / "text.int8.onnx"
    export_component(component, fp32)
    monkeypatch.setattr(variants, "check_component", refuse)
    with caplog.at_level("WARNING", logger="polysense"):
        method = variants.quantize_dynamic_int8_of(component, fp32, int8)
    assert method == "dynamic, per-channel MatMul/Gemm + Gather"
    assert "int8 export form failed" in caplog.text and "differs from torch" in caplog.text
    assert sorted(tmp_path.iterdir()) == [fp32, int8]
    assert "QAttention" not in [node.op_type for node in onnx.load(str(int8)).graph.node]


def test_the_fused_attention_switch_nests_and_leaves_torch_alone():
    """onnxruntime_attention() only changes what an ONNX export writes, and restores what was set before it."""
    from polysense.models.encoders.minilm import BertSelfAttention, minilm_l6, onnxruntime_attention

    torch.manual_seed(0)
    model = minilm_l6(16, pretrained=False).eval()
    ids = torch.randint(2, 1000, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(ids, mask)
        with onnxruntime_attention():
            with onnxruntime_attention():
                pass
            assert BertSelfAttention.fused_for_onnxruntime  # the inner exit kept the outer one's setting
            torch.testing.assert_close(model(ids, mask), plain)  # eager torch runs as before
    assert not BertSelfAttention.fused_for_onnxruntime
