"""Export one component to ONNX and prove the file computes what the torch module computes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from polysense.errors import PolysenseError
from polysense.export.components import OPSET, Component

TOLERANCE = 1e-4  # max abs difference allowed between torch and onnxruntime, on embeddings and logits
BATCHES = (1, 4)
LENGTHS = (1, 5, 23, 61)  # text tokens / audio frames tried for components with a length axis


class ExportError(PolysenseError):
    """An exported graph is invalid or disagrees with its torch module."""


def export_component(component: Component, path: Path) -> None:
    example = component.example(batch=2, length=11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about GRU batch sizes and tracing; parity below is the real check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            component.module,
            example,
            str(path),
            input_names=component.inputs,
            output_names=component.outputs,
            dynamic_axes=component.dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def max_difference(component: Component, session, cases: Sequence[tuple[torch.Tensor, ...]]) -> float:
    """Worst absolute difference over every output of every case, torch vs onnxruntime."""
    worst = 0.0
    with torch.no_grad():
        for inputs in cases:
            expected = component.module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            feeds = {name: tensor.numpy() for name, tensor in zip(component.inputs, inputs)}
            for want, got in zip(expected, session.run(component.outputs, feeds)):
                if want.shape != got.shape:
                    raise ExportError(
                        f"{component.name}: output shape {got.shape} != torch's {tuple(want.shape)}"
                    )
                worst = max(worst, float(np.abs(want.numpy() - got).max(initial=0.0)))
    return worst


def check_component(
    component: Component, path: Path, real_cases: Sequence[tuple[torch.Tensor, ...]]
) -> float:
    """Full ONNX check, then parity on random inputs (batch 1 and 4, several lengths) and on real inputs.

    Returns the worst absolute difference; raises ExportError above TOLERANCE.
    """
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{component.name}: the exported graph is not valid ONNX: {error}") from error
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    lengths = LENGTHS if component.has_length_axis else LENGTHS[:1]
    random_cases = [component.example(b, n, generator) for b in BATCHES for n in lengths]
    worst = max_difference(component, session, [*random_cases, *real_cases])
    if worst > TOLERANCE:
        raise ExportError(
            f"{component.name}: onnxruntime differs from torch by {worst:.2e} (> {TOLERANCE:.0e}); "
            "the export is not trustworthy"
        )
    return worst
