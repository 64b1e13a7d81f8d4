"""polysense: multimodal classifiers served without torch.

`import polysense` is the lightweight runtime (numpy, OpenCV, soundfile, soxr, tokenizers).
Training lives in `polysense.models` and needs the `train` extra (torch).
"""

from polysense.audio import AudioPreprocessor, LogMel, load_audio
from polysense.errors import ConfigError, DependencyError, InputError, ManifestError, PolysenseError
from polysense.image import ImagePreprocessor, decode_image
from polysense.modalities import MODALITIES, subset_key
from polysense.text import TextPreprocessor, train_tokenizer

__version__ = "0.1.0"

__all__ = [
    "MODALITIES",
    "AudioPreprocessor",
    "ConfigError",
    "DependencyError",
    "ImagePreprocessor",
    "InputError",
    "LogMel",
    "ManifestError",
    "PolysenseError",
    "TextPreprocessor",
    "decode_image",
    "load_audio",
    "subset_key",
    "train_tokenizer",
]
