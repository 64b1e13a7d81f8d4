"""The packages one modality needs, imported when that modality is used: a runtime that serves an image-only
bundle needs neither soundfile, soxr nor tokenizers (pip install 'polysense[ort,image]')."""

from __future__ import annotations

import importlib
from types import ModuleType

from polysense.errors import DependencyError

EXTRA = {"cv2": "image", "soundfile": "audio", "soxr": "audio", "tokenizers": "text"}
MODULES = {"image": ("cv2",), "audio": ("soundfile", "soxr"), "text": ("tokenizers",)}
PACKAGE = {
    "cv2": "opencv-python-headless",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "tokenizers": "tokenizers",
}


def require(module: str) -> ModuleType:
    """`module`, or a DependencyError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        modality = EXTRA[module]
        raise DependencyError(
            f"{PACKAGE[module]} is not installed ({error}); the {modality} modality needs it: "
            f"pip install 'polysense[{modality}]'"
        ) from error


def require_modality(modality: str) -> None:
    """Every package `modality` needs, imported now: a missing one is an error at load, not at the first input."""
    for module in MODULES.get(modality, ()):
        require(module)
