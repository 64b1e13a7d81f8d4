"""A frozen ONNX encoder a user brings (`--image-encoder onnx:PATH`), run after the modality's own preprocessing.

The contract (docs/training.md, "Bring your own encoder"): the graph has one float32 input, a batch of
preprocessed images [N, 3, S, S] (RGB, resized and centre-cropped to S = --image-size, normalised with the
ImageNet mean and std), and its first output is one vector per image [N, D] or a sequence [N, T, D], which is
averaged over T. The graph is used as it is (copied into the run and the bundle byte for byte, hashed); what
trains is a projection of its vectors (polysense.models.encoders.frozen_onnx). Preparing the data runs it once
per image; the runtime runs it on each image before the trained part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polysense.errors import BundleError
from polysense.preprocess.image import ImageInput, ImagePreprocessor


class FrozenEncoder:
    """One user graph in an onnxruntime session on the CPU: preprocessed input [3, S, S] -> vector [D]."""

    def __init__(self, graph: bytes, image_size: int, name: str = "the frozen encoder") -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for graphs it cannot load
            raise BundleError(f"{name} cannot be loaded by onnxruntime: {error}") from error
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
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
        if len(outputs[0].shape) not in (2, 3):
            raise BundleError(
                f"{name}'s first output must be [batch, D] or [batch, T, D]; it is {outputs[0].shape}"
            )
        self._input = inputs[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: pixels[None].astype(np.float32, copy=False)})[:1]
        vector = out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1)[0]  # a sequence is averaged
        return np.ascontiguousarray(vector, dtype=np.float32)


@dataclass(frozen=True)
class FrozenImagePreprocessor:
    """Any image input -> the runtime's image preprocessing -> the frozen encoder -> vector [D] float32."""

    pixels: ImagePreprocessor
    encoder: FrozenEncoder

    def __call__(self, image: ImageInput, sample_rate: int | None = None) -> np.ndarray:
        return self.encoder(self.pixels(image))
