"""polysense: multimodal classifiers served without torch.

`import polysense` is the lightweight runtime (numpy; onnxruntime from the `cpu` or `gpu` extra; per modality,
imported when used: OpenCV for images, soundfile and soxr for audio, tokenizers for text). Training lives in
`polysense.models`, export in `polysense.export` (both need torch).

    pipe = polysense.Pipeline.load("bundle/")
    pipe.predict(image="photo.jpg", text="a calm morning", audio="clip.wav")
"""

# First: onnxruntime must not be imported before telemetry is switched off (see polysense.privacy).
from polysense import privacy  # noqa: F401, I001
from polysense.bundle.schema import BundleDescription
from polysense.errors import (
    BundleError,
    ConfigError,
    DependencyError,
    InputError,
    LimitError,
    ManifestError,
    OverloadedError,
    PolysenseError,
    RequestTimeoutError,
)
from polysense.inference.ensemble.ensemble import Ensemble
from polysense.inference.fusion import Embeddings, Prediction, Prepared
from polysense.inference.pipeline import Pipeline
from polysense.inference.predictor import Predictor
from polysense.limits import Limits
from polysense.modalities import MODALITIES, subset_key
from polysense.preprocess.audio import AudioPreprocessor, LogMel, load_audio
from polysense.preprocess.image import ImagePreprocessor, decode_image
from polysense.preprocess.text import TextPreprocessor, train_tokenizer
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile
from polysense.version import __version__


__all__ = [
    "__version__",
    "MODALITIES",
    "AdaptiveVoice",
    "AudioPreprocessor",
    "BundleDescription",
    "BundleError",
    "ConfigError",
    "DependencyError",
    "Embeddings",
    "Ensemble",
    "ImagePreprocessor",
    "InputError",
    "LimitError",
    "Limits",
    "LogMel",
    "ManifestError",
    "OverloadedError",
    "Pipeline",
    "PolysenseError",
    "Predictor",
    "RequestTimeoutError",
    "Prediction",
    "Prepared",
    "TextPreprocessor",
    "VoiceProfile",
    "decode_image",
    "load_audio",
    "subset_key",
    "train_tokenizer",
]
