"""Image preprocessing: path, encoded bytes or an HxWxC uint8 array -> normalised float32 CHW.

Training (the torch Dataset) and serving call this same code, so they cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polysense.errors import InputError
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.optional import require
from polysense.preprocess.image_header import read_header

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The longest side an image keeps before it is resized, as a multiple of its shorter side: a longer image is
# centre-cropped to this aspect ratio first. The resized intermediate is then at most size x (MAX_ASPECT * size)
# pixels whatever the input's shape (a 65535 x 1 image would otherwise be scaled to 64 x 4,194,240 pixels, +1 GB,
# to keep its central 64 x 64). Photos, screenshots and panoramas (up to 16:1) are resized exactly as before.
MAX_ASPECT = 16


def decode_image(image: ImageInput, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode any accepted image input to an RGB uint8 array [H, W, 3], EXIF orientation applied.

    Encoded images may be JPEG, PNG, BMP or WebP, within `limits` (bytes, pixels read from the header).
    Arrays are taken as RGB (grey [H, W] and [H, W, 1] are expanded; RGBA loses alpha).
    """
    cv2 = require("cv2")
    pixels, is_bgr = _decode(image, limits)
    if not is_bgr:
        return pixels
    with _opencv("image"):
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


@contextmanager
def _opencv(source: str) -> Iterator[None]:
    """OpenCV's failures (an allocation it cannot make, a size it does not support) as an InputError."""
    cv2 = require("cv2")
    try:
        yield
    except cv2.error as error:
        detail = str(error).strip()[:200]
        raise InputError(
            f"{source}: OpenCV cannot process it ({detail}); re-save it as a plain PNG or JPEG"
        ) from error


def _decode(image: ImageInput, limits: Limits) -> tuple[np.ndarray, bool]:
    """Pixels [H, W, 3] uint8 and whether they are in OpenCV's BGR order (decoded) or RGB (an array)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        limits.check_bytes(path.stat().st_size, f"image file {path}")
        return _decode_bytes(path.read_bytes(), str(path), limits), True
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        limits.check_bytes(len(data), "image bytes")
        return _decode_bytes(data, "image bytes", limits), True
    if isinstance(image, np.ndarray):
        return _check_array(image, limits), False
    raise InputError(
        f"unsupported image input of type {type(image).__name__}; pass a path, encoded bytes "
        "or an HxWxC uint8 RGB array"
    )


def _decode_bytes(data: bytes, source: str, limits: Limits) -> np.ndarray:
    cv2 = require("cv2")
    if not data:
        raise InputError(f"{source}: empty image data")
    header = read_header(data, source)
    if header.pixels > limits.max_image_pixels:
        what = f"{source} is a {header.width}x{header.height} {header.format} ({header.pixels:,} pixels)"
        raise limits.refuse(what, "max_image_pixels")
    buffer = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation tag (unlike IMREAD_UNCHANGED), so phone photos come out upright.
    with _opencv(source):
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{source}: cannot decode the {header.format} data (corrupted or truncated)")
    if bgr.shape[0] * bgr.shape[1] > limits.max_image_pixels:  # the header parsed above lied to us
        raise InputError(f"{source}: decoded to more pixels than its {header.format} header declares")
    return bgr


def _check_array(array: np.ndarray, limits: Limits) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(
            f"image array has dtype {array.dtype}; pass uint8 RGB values 0-255 "
            "(for floats in [0, 1]: (x * 255).round().astype(np.uint8))"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"image array has shape {array.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"image array has shape {array.shape}; height and width must be at least 1")
    pixels = array.shape[0] * array.shape[1]
    if pixels > limits.max_image_pixels:  # before the copies below, as for a file before decoding
        what = f"image array of shape {array.shape} ({pixels:,} pixels)"
        raise limits.refuse(what, "max_image_pixels")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize the shorter side to `size`, center-crop `size` x `size`, normalise, return float32 [3, size, size]."""

    size: int = 64  # side of the square the encoder sees, in pixels
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)  # per-channel RGB mean, on a 0-1 scale
    std: tuple[float, float, float] = field(default=IMAGENET_STD)  # per-channel RGB std, on a 0-1 scale
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)  # what one input may cost

    def __post_init__(self) -> None:
        if self.size < 8:
            raise InputError(f"image size {self.size} is too small; use 8 or more pixels")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("image mean and std need three values each, std all positive")

    def __call__(self, image: ImageInput) -> np.ndarray:
        cv2 = require("cv2")
        pixels, is_bgr = _decode(image, self.limits)
        # Resize first, then reorder the channels of the small square: a full-size BGR->RGB copy would double
        # the peak memory of a large photo.
        with _opencv("image"):
            square = self.resize_and_crop(pixels)
            if is_bgr:
                square = cv2.cvtColor(square, cv2.COLOR_BGR2RGB)
        scale = np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normalised = (square.astype(np.float32) * scale - mean) / std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def resize_and_crop(self, rgb: np.ndarray) -> np.ndarray:
        cv2 = require("cv2")
        rgb = crop_aspect(rgb, MAX_ASPECT)
        height, width = rgb.shape[:2]
        ratio = self.size / min(height, width)
        new_h, new_w = max(self.size, round(height * ratio)), max(self.size, round(width * ratio))
        if (new_h, new_w) != (height, width):
            # INTER_AREA for shrinking avoids aliasing; INTER_LINEAR for enlarging.
            interpolation = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return rgb[top : top + self.size, left : left + self.size]


def crop_aspect(pixels: np.ndarray, max_aspect: int) -> np.ndarray:
    """The centre of `pixels` whose longer side is at most `max_aspect` times its shorter one (a view, no copy)."""
    height, width = pixels.shape[:2]
    longest = min(height, width) * max_aspect
    if height > longest:
        top = (height - longest) // 2
        pixels = pixels[top : top + longest]
    if width > longest:
        left = (width - longest) // 2
        pixels = pixels[:, left : left + longest]
    return pixels
