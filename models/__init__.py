"""polysense.models: PyTorch encoders, fusion heads, datasets and training (needs the `train` extra)."""

from polysense.models.model import ModelConfig, MultimodalClassifier
from polysense.models.registry import (
    ENCODERS,
    FUSIONS,
    create_encoder,
    create_fusion,
    register_encoder,
    register_fusion,
)

__all__ = [
    "ENCODERS",
    "FUSIONS",
    "ModelConfig",
    "MultimodalClassifier",
    "create_encoder",
    "create_fusion",
    "register_encoder",
    "register_fusion",
]
