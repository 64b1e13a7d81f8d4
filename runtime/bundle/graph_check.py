"""Each graph a pipeline loads must be the graph its bundle description promises.

Hashes prove a file is the one export wrote, but a description can be edited and files swapped: an image encoder
in place of the text encoder would fail only at the first prediction with a raw onnxruntime error, and a fusion
graph with a different number of outputs would silently return probabilities under the wrong labels. So at load
every graph's input and output names, ranks, dtypes and fixed sizes are compared with the description, and the
sizes the runtime relies on with the description's own numbers: embeddings of `embed_dim`, one logit per label,
streaming state tensors of the recorded shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from polysense.bundle.schema import (
    DESCRIPTION_FILE,
    FUSION,
    AudioStreaming,
    BundleDescription,
    ComponentSpec,
    TensorSpec,
)
from polysense.errors import BundleError
from polysense.modalities import STREAMING

_FIX = "the file was swapped or the description edited; export the bundle again"


def check_graph(
    description: BundleDescription,
    component: ComponentSpec,
    file: str,
    signature: tuple[Sequence[TensorSpec], Sequence[TensorSpec]],
) -> None:
    """BundleError unless the graph in `file` (its declared inputs and outputs) matches `component`."""
    inputs, outputs = signature
    _same_tensors(component.inputs, inputs, "input", file)
    _same_tensors(component.outputs, outputs, "output", file)
    for tensor, size in _promised_sizes(description, component):
        declared = next(t for t in (*component.inputs, *component.outputs) if t.name == tensor.name)
        if declared.shape[-1] != size:
            raise BundleError(
                f"{file}: {tensor.name} has {declared.shape[-1]} values per sample but {DESCRIPTION_FILE} "
                f"needs {size} ({_why(component, tensor.name)}); {_FIX}"
            )
    if component.name == FUSION:
        _check_logits(outputs[0], len(description.labels), file)
    if component.modality in STREAMING and description.streaming is not None:
        _check_state(description.streaming, inputs, file)


def _check_logits(logits: TensorSpec, labels: int, file: str) -> None:
    """The fusion graph itself must fix its last axis at one logit per label: with a symbolic size it could
    return any number of logits, and probabilities would be read under the wrong labels or dropped."""
    if logits.shape[-1] != labels:
        raise BundleError(
            f"{file}: output {logits.name} has {logits.shape[-1]!r} values per sample, not a fixed {labels} "
            f"(one logit per label of {DESCRIPTION_FILE}); {_FIX}"
        )


def _same_tensors(expected: Sequence[TensorSpec], found: Sequence[TensorSpec], kind: str, file: str) -> None:
    if [t.name for t in found] != [t.name for t in expected]:
        raise BundleError(
            f"{file}: the graph's {kind}s are {[t.name for t in found]}, {DESCRIPTION_FILE} lists "
            f"{[t.name for t in expected]}; {_FIX}"
        )
    for want, got in zip(expected, found):
        if got.dtype != want.dtype or len(got.shape) != len(want.shape):
            raise BundleError(
                f"{file}: {kind} {got.name} is {got.dtype} of rank {len(got.shape)}, {DESCRIPTION_FILE} says "
                f"{want.dtype} of rank {len(want.shape)}; {_FIX}"
            )
        for axis, (a, b) in enumerate(zip(want.shape, got.shape)):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                raise BundleError(
                    f"{file}: {kind} {got.name} has size {b} on axis {axis}, {DESCRIPTION_FILE} says {a}; {_FIX}"
                )


def _promised_sizes(description: BundleDescription, component: ComponentSpec) -> list[tuple[TensorSpec, int]]:
    """(tensor, size of its last axis) that the runtime relies on."""
    if component.name == FUSION:
        embeddings = [(t, description.embed_dim) for t in component.inputs if t.name.startswith("embedding_")]
        return [*embeddings, (component.outputs[0], len(description.labels))]
    return [(component.outputs[0], description.embed_dim)]


def _why(component: ComponentSpec, tensor: str) -> str:
    if component.name == FUSION and tensor == component.outputs[0].name:
        return "one logit per label"
    return "embed_dim"


def _check_state(streaming: AudioStreaming, inputs: Sequence[TensorSpec], file: str) -> None:
    by_name = {t.name: t for t in inputs}
    for state in streaming.state:
        graph = by_name.get(state.name)
        if graph is None or len(graph.shape) != len(state.shape):
            raise BundleError(
                f"{file}: state tensor {state.name} is not a graph input of rank {len(state.shape)}"
            )
        for axis, (size, declared) in enumerate(zip(state.shape, graph.shape)):
            if axis != state.batch_axis and isinstance(declared, int) and declared != size:
                raise BundleError(
                    f"{file}: state tensor {state.name} has size {declared} on axis {axis}, the streaming "
                    f"description says {size}; {_FIX}"
                )
