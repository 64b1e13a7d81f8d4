"""Export one component to ONNX and prove the file computes what the torch module computes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from polysense.errors import PolysenseError
from polysense.export.components import OPSET, Component
from polysense.export.fold_pads import fold_pads_into_convs

# How far onnxruntime may be from torch on an output: TOLERANCE absolute, plus RELATIVE_TOLERANCE of the output's
# largest magnitude. float32 rounding differs between the two (onnxruntime folds BatchNorm into convolutions and
# orders sums its own way), and a deep network scales that difference with its gains: a trained
# `--audio-encoder efficientnet-lite0` (a stem BatchNorm gain of 340 over flat spectrogram regions) gave 4.3e-4 on
# embeddings of magnitude 2.2, where the same network on photos gives 2e-6. Export bugs (a wrong constant, a lost
# state, a misread input) move outputs by far more than a thousandth of their scale. Every export records its
# worst difference per component in bundle.json (metrics.parity_max_abs_diff), which is where these came from.
TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-3
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
    model = onnx.load(str(path))
    if fold_pads_into_convs(model):
        onnx.save(model, str(path))


def allowed_difference(expected: np.ndarray) -> float:
    """The largest |torch - onnxruntime| accepted on an output whose torch value is `expected`."""
    return TOLERANCE + RELATIVE_TOLERANCE * float(np.abs(expected).max(initial=0.0))


@dataclass(frozen=True)
class Difference:
    """The worst output of a parity check: its |torch - onnxruntime| and what its scale allows."""

    found: float = 0.0
    allowed: float = TOLERANCE

    @property
    def share(self) -> float:
        return self.found / self.allowed

    def worse(self, other: Difference) -> Difference:
        return other if other.share > self.share else self


def max_difference(component: Component, session, cases: Sequence[tuple[torch.Tensor, ...]]) -> Difference:
    """The output, over every output of every case, furthest from torch relative to what it allows."""
    worst = Difference()
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
                found = float(np.abs(want.numpy() - got).max(initial=0.0))
                worst = worst.worse(Difference(found, allowed_difference(want.numpy())))
    return worst


def check_component(
    component: Component, path: Path, real_cases: Sequence[tuple[torch.Tensor, ...]]
) -> float:
    """Full ONNX check, then parity on random inputs (batch 1 and 4, several lengths) and on real inputs.

    Returns the worst absolute difference; raises ExportError where an output differs by more than its
    allowed_difference.
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
    if worst.found > worst.allowed:
        raise ExportError(
            f"{component.name}: onnxruntime differs from torch by {worst.found:.2e} where {worst.allowed:.2e} "
            "is allowed; the export is not trustworthy"
        )
    return worst.found
