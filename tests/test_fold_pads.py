"""Zero Pad nodes are folded into the convolutions they feed, and nothing else is."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from polysense.export.fold_pads import fold_pads_into_convs  # noqa: E402

pytestmark = pytest.mark.slow  # onnx


def _model(
    pad_inputs: list[str], extra_nodes=(), extra_initializers=(), mode="constant", second_reader=False
):
    """X [1, 2, 6, 6] -> Pad -> Conv 3x3 stride 2 (4 channels) -> Y; optionally a Relu reading the Pad too."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "W")
    nodes = [
        *extra_nodes,
        helper.make_node("Pad", ["X", *pad_inputs], ["P"], mode=mode),
        helper.make_node("Conv", ["P", "W"], ["Y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 0]),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 3, 3])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["P"], ["R"]))
        outputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 6, 6])],
        outputs,
        [weight, *extra_initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _pads(values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), "pads")


def _run(model) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 6)).astype(np.float32)
    return session.run(None, {"X": x})


def _ops(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_an_asymmetric_zero_pad_moves_into_the_conv_and_the_output_is_unchanged():
    model = _model(["pads"], extra_initializers=[_pads([0, 0, 0, 0, 0, 0, 1, 1])])
    before = _run(model)
    assert fold_pads_into_convs(model) == 1
    assert _ops(model) == ["Conv"]
    conv = model.graph.node[0]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 0, 1, 1]  # added to its own
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model)[0], before[0], atol=1e-6)


def test_pads_computed_from_constants_fold_and_their_arithmetic_goes_with_them():
    """The TorchScript exporter writes a Pad's pads as Constant -> ... -> Cast, with an empty constant value."""
    constant = helper.make_node(
        "Constant", [], ["raw"], value=numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 2, 1], np.int32))
    )
    cast = helper.make_node("Cast", ["raw"], ["pads"], to=TensorProto.INT64)
    unrelated = helper.make_node("Constant", [], ["unread"], value_float=1.0)  # dead before: not the pass's
    model = _model(["pads", ""], extra_nodes=[unrelated, constant, cast])
    before = _run(model)
    assert fold_pads_into_convs(model) == 1
    assert _ops(model) == ["Constant", "Conv"] and model.graph.node[0].output[0] == "unread"
    np.testing.assert_allclose(_run(model)[0], before[0], atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["reflect", "nonzero value", "two readers", "channels padded", "pads from the input's shape"],
)
def test_pads_a_conv_cannot_take_are_left_alone(case):
    pads = _pads([0, 0, 0, 0, 0, 0, 1, 1])
    kwargs = {
        "reflect": dict(pad_inputs=["pads"], extra_initializers=[pads], mode="reflect"),
        "nonzero value": dict(
            pad_inputs=["pads", "value"],
            extra_initializers=[pads, numpy_helper.from_array(np.array(1.0, np.float32), "value")],
        ),
        "two readers": dict(pad_inputs=["pads"], extra_initializers=[pads], second_reader=True),
        "channels padded": dict(pad_inputs=["pads"], extra_initializers=[_pads([0, 1, 0, 0, 0, 0, 1, 1])]),
        "pads from the input's shape": dict(
            pad_inputs=["pads"],
            extra_nodes=[
                helper.make_node("Shape", ["X"], ["shape"]),
                helper.make_node("Div", ["shape", "six"], ["ends"]),
                helper.make_node("Concat", ["zeros", "ends"], ["pads"], axis=0),
            ],
            extra_initializers=[
                numpy_helper.from_array(np.array([6, 6, 6, 6], np.int64), "six"),
                numpy_helper.from_array(np.zeros(4, np.int64), "zeros"),
            ],
        ),
    }[case]
    model = _model(**kwargs)
    if case != "channels padded":  # a Conv would refuse those channels anyway; the rest must still run
        before = _run(model)
    assert fold_pads_into_convs(model) == 0
    assert "Pad" in _ops(model)
    if case != "channels padded":
        np.testing.assert_allclose(_run(model)[0], before[0], atol=1e-6)
