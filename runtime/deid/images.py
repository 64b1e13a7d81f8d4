"""Faces in images, blurred or boxed out.

A face the detector finds (polysense.deid.faces) is widened by `margin` on every side (the detector's boxes are
tight around the face; hair and ears identify people too) and then either blurred so strongly that no feature
survives (a box filter half the face's size, applied three times: close to a Gaussian with a sigma of about a
quarter of the face) or filled with black. A face the detector misses is left as it is: the report says how
many faces were found, never that an image has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from polysense.deid.faces import Face, FaceDetector, FaceOptions
from polysense.errors import ConfigError
from polysense.optional import require

IMAGE_MODES = ("blur", "box", "keep")  # keep: images copied as decoded, faces neither looked for nor changed
BLUR_PASSES = 3


@dataclass(frozen=True)
class ImageOptions:
    """What `anonymize_image` does with each face."""

    mode: str = "blur"  # one of IMAGE_MODES
    margin: float = 0.2  # share of the face's width and height added on each side before blurring or boxing
    faces: FaceOptions = field(default_factory=FaceOptions)

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ConfigError(f"image mode {self.mode!r} is unknown; choose one of {', '.join(IMAGE_MODES)}")
        if not 0.0 <= self.margin <= 1.0:
            raise ConfigError(f"face margin {self.margin}: choose a share between 0 and 1")


@dataclass(frozen=True)
class ImageResult:
    pixels: np.ndarray  # RGB uint8 [H, W, 3], a new array (the input is never changed)
    faces: tuple[Face, ...]  # what the detector found, in the image's pixels (before the margin)
    regions: tuple[tuple[int, int, int, int], ...]  # what was blurred or boxed: (left, top, width, height)


def anonymize_image(
    rgb: np.ndarray, options: ImageOptions = ImageOptions(), detector: FaceDetector | None = None
) -> ImageResult:
    """Every face in an RGB uint8 image [H, W, 3] blurred or boxed out (per `options.mode`).

    Pass one `detector` to many calls: building it loads the graph (about 0.1 s).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"anonymize_image takes an RGB uint8 array [H, W, 3], not {rgb.dtype} {rgb.shape}")
    pixels = rgb.copy()
    if options.mode == "keep":
        return ImageResult(pixels, (), ())
    faces = tuple((detector or FaceDetector(options.faces))(rgb))
    regions = tuple(widen(face, options.margin, rgb.shape[1], rgb.shape[0]) for face in faces)
    for region in regions:
        hide(pixels, region, options.mode)
    return ImageResult(pixels, faces, regions)


def widen(face: Face, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The face's box grown by `margin` of its size on each side, within the image."""
    dx, dy = round(face.width * margin), round(face.height * margin)
    left, top = max(0, face.left - dx), max(0, face.top - dy)
    right = min(width, face.left + face.width + dx)
    bottom = min(height, face.top + face.height + dy)
    return left, top, right - left, bottom - top


def hide(pixels: np.ndarray, region: tuple[int, int, int, int], mode: str) -> None:
    """Blur or black out `region` of `pixels` in place."""
    left, top, width, height = region
    patch = pixels[top : top + height, left : left + width]
    if mode == "box":
        patch[...] = 0
        return
    cv2 = require("cv2")
    kernel = max(3, max(width, height) // 2)
    blurred = patch
    for _ in range(BLUR_PASSES):
        blurred = cv2.blur(blurred, (kernel, kernel), borderType=cv2.BORDER_REFLECT)
    patch[...] = blurred
