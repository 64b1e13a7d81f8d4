"""Frozen ONNX encoders a user brings (`--image-encoder onnx:PATH`, `--text-encoder onnx:PATH`), run after the
modality's own preprocessing.

The contracts (docs/training.md, "Bring your own encoder"):

- image: one float32 input, a batch of preprocessed images [N, 3, S, S] (RGB, resized and centre-cropped to
  S = --image-size, normalised with the ImageNet mean and std);
- text: int64 inputs [N, L] named `input_ids` (required), `attention_mask` and `token_type_ids` (optional,
  given ones and zeros), the ids of the `tokenizer.json` beside the graph (as Optimum and the tokenizers
  library write them), truncated to --max-text-length tokens;

and for both, the first output is one vector per input [N, D] or a sequence [N, T, D], which is averaged
over T. The graph is used as it is (copied into the run and the bundle byte for byte, hashed); what trains is
a projection of its vectors (polysense.models.encoders.frozen_onnx). Preparing the data runs it once per
input; the runtime runs it on each input before the trained part. (Audio: polysense.preprocess.frozen_windows.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from polysense.errors import BundleError
from polysense.preprocess.image import ImageInput, ImagePreprocessor
from polysense.preprocess.text import TextPreprocessor

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a frozen text graph may take


def frozen_session(graph: bytes, name: str) -> Any:
    """An onnxruntime session (CPU) of a user's graph whose first output is [N, D] or [N, T, D]."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for graphs it cannot load
        raise BundleError(f"{name} cannot be loaded by onnxruntime: {error}") from error
    output = session.get_outputs()[0]
    if len(output.shape) not in (2, 3):
        raise BundleError(f"{name}'s first output must be [batch, D] or [batch, T, D]; it is {output.shape}")
    return session


def one_vector(out: np.ndarray) -> np.ndarray:
    """A first output of batch 1 ([1, D] or a sequence [1, T, D], averaged) -> vector [D] float32."""
    vector = out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1)[0]
    return np.ascontiguousarray(vector, dtype=np.float32)


class FrozenEncoder:
    """One user graph in an onnxruntime session on the CPU: preprocessed image [3, S, S] -> vector [D]."""

    def __init__(self, graph: bytes, image_size: int, name: str = "the frozen encoder") -> None:
        self._session = frozen_session(graph, name)
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise BundleError(
                f"{name} must take one float32 input [batch, 3, {image_size}, {image_size}]; it takes {found}"
            )
        expected = (3, image_size, image_size)
        if any(
            isinstance(d, int) and d != e for d, e in zip(inputs[0].shape[1:], expected)
        ):  # names: dynamic
            raise BundleError(
                f"{name} takes {inputs[0].shape[1:]}, not [3, {image_size}, {image_size}]: train with "
                "--image-size matching its input"
            )
        self._input = inputs[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: pixels[None].astype(np.float32, copy=False)})[:1]
        return one_vector(out)


@dataclass(frozen=True)
class FrozenImagePreprocessor:
    """Any image input -> the runtime's image preprocessing -> the frozen encoder -> vector [D] float32."""

    pixels: ImagePreprocessor
    encoder: FrozenEncoder

    def __call__(self, image: ImageInput, sample_rate: int | None = None) -> np.ndarray:
        return self.encoder(self.pixels(image))


class FrozenTextEncoder:
    """A user's text graph on the CPU: token ids [n] -> vector [D] (its sequence averaged over the tokens)."""

    def __init__(self, graph: bytes, name: str = "the frozen text encoder") -> None:
        self._session = frozen_session(graph, name)
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        wrong = [
            f"{i.name} {i.type} {i.shape}"
            for i in inputs
            if i.name not in TEXT_INPUTS or i.type != "tensor(int64)" or len(i.shape) != 2
        ]
        if wrong or "input_ids" not in names:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise BundleError(
                f"{name} must take int64 inputs [batch, tokens] named input_ids and optionally "
                f"attention_mask and token_type_ids; it takes {found}"
            )
        self._inputs = tuple(names)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        row = ids[None].astype(np.int64, copy=False)
        given = {
            "input_ids": row,
            "attention_mask": np.ones_like(row),  # one text a call: every token is real
            "token_type_ids": np.zeros_like(row),  # one segment
        }
        (out,) = self._session.run(None, {name: given[name] for name in self._inputs})[:1]
        return one_vector(out)


@dataclass(frozen=True)
class FrozenTextPreprocessor:
    """A text -> the tokenizer's ids (truncated) -> the frozen encoder -> vector [D] float32."""

    tokens: TextPreprocessor
    encoder: FrozenTextEncoder

    def __call__(self, text: str, sample_rate: int | None = None) -> np.ndarray:
        return self.encoder(self.tokens(text))
