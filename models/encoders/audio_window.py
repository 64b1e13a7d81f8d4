"""The `efficientnet-lite0` audio encoder family: the ImageNet EfficientNet-Lite0 reading a log-mel window.

No pretrained audio encoder ships on the registries, so this family transfers the nearest pretrained network,
the image one: a log-mel spectrogram is an image whose rows are bands and whose columns are frames, and
ImageNet CNNs fine-tuned on spectrograms are a common start for audio classifiers. How it does on voices never
heard in training is measured by `make bench-avdigits-audio` (see docs/results/unheard-voices.md).

To stay streamable it reads a sliding window, the last WINDOW frames (1.28 s; 99 % of FSDD's spoken digits are
shorter than 0.97 s), and its state is that window:

    new frames [B, T, n_mels] + window [B, WINDOW, n_mels] -> the last WINDOW frames
        -> frames before the recording read as its background -> levels relative to the window's peak
        -> bands standardised -> [B, 3, 2 * n_mels, WINDOW] (bands upsampled twice, the channel repeated)
        -> EfficientNet-Lite0

Every step after the window is a function of the window alone, so a whole recording and the same recording fed
in any chunks give the same embedding: the window after the last chunk holds the same frames. The state stores
frames relative to the log floor, so the zero state a stream starts from marks frames not heard yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from polysense.models.encoders.audio_causal import band_statistics
from polysense.models.encoders.efficientnet_lite import EfficientNetLite0
from polysense.models.encoders.pretrained import EFFICIENTNET_LITE0
from polysense.models.registry import register_encoder
from polysense.preprocess.audio import LOG_FLOOR, N_MELS

WINDOW = 128  # frames (10 ms each) the encoder sees
SILENCE = math.log(LOG_FLOOR)  # the log-mel value of digital silence
_SPREAD = 3.0  # standardised inputs are divided by this and clipped to [-1, 1], the range Lite models expect


class WindowedSpectrogramEncoder(nn.Module):
    """Log-mel frames [B, T, n_mels] -> embedding [B, embed_dim] of the last WINDOW frames."""

    pretrained_prefixes = ("network.stem", "network.blocks", "network.head")
    int8_method = "static"  # convolutions, as the image family
    channels_last = True  # its network's weights (the spectrogram image is built inside forward)

    def __init__(self, n_mels: int = N_MELS, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim, self.n_mels = embed_dim, n_mels
        self.register_buffer("input_mean", torch.zeros(n_mels))
        self.register_buffer("input_std", torch.ones(n_mels))
        self.network = EfficientNetLite0(embed_dim)
        # Uniform draws [rows] for the rows of a training batch (the silence after each, in forward): from
        # torch's global generator. A run in several processes replaces it with draws for the whole batch cut
        # to the process's rows, so that N processes repeat one (training.distributed.sharded_layers).
        self.uniform_rows: Callable[[int, torch.device], torch.Tensor] = _uniform

    def fit_input_stats(self, clips: list[np.ndarray]) -> None:
        """Per-band mean and std of the training frames relative to their clip's loudest point (what _embed
        normalises), with the causal family's std floor."""
        mean, std = band_statistics([clip - clip.max() for clip in clips if clip.size])
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def state_layout(self) -> dict[str, tuple[tuple[int, ...], int]]:
        return {"window": ((1, WINDOW, self.n_mels), 0)}

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> tuple[torch.Tensor]:
        return (torch.zeros(batch_size, WINDOW, self.n_mels, device=device or self.input_mean.device),)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Whole recordings, padded at the end to a batch (`frame_mask` [B, T], 1 = real frame): each row's
        last WINDOW real frames, right-aligned after silence, as a stream would hold them at its end.

        In training each row is followed by a random stretch of silence that still fits the window (a stream
        may be read some time after the word), so the network does not learn where in the window words end."""
        batch, count, bands = frames.shape
        if frame_mask is None:
            lengths = torch.full((batch,), count, device=frames.device)
            relative = frames - SILENCE
        else:
            lengths = frame_mask.sum(dim=1).long()
            relative = (frames - SILENCE) * frame_mask.unsqueeze(-1).to(frames.dtype)  # padding is silence
        ends = lengths
        if self.training:
            room = (WINDOW - lengths).clamp(min=0)
            ends = lengths + (self.uniform_rows(batch, frames.device) * (room + 1)).long().clamp(max=room)
        silence = frames.new_zeros(batch, WINDOW, bands)
        padded = torch.cat([silence, relative, silence], dim=1)
        # Row b's window is padded[b, end_b : end_b + WINDOW]: it ends on frame end_b - 1 of the row.
        positions = ends.unsqueeze(1) + torch.arange(WINDOW, device=frames.device)
        window = padded.gather(1, positions.unsqueeze(-1).expand(-1, -1, bands))
        return self._embed(window)

    def step(
        self, frames: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """Streaming: new frames after `state` (None: a new recording) -> embedding of the window, new state."""
        if state is None:
            state = self.initial_state(frames.shape[0], frames.device)
        window = torch.cat([state[0], frames - SILENCE], dim=1)[:, -WINDOW:]
        return self._embed(window), (window,)

    def _embed(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, WINDOW, n_mels] relative to silence -> embedding."""
        # Each step is a function of the window alone, so streaming still equals offline.
        # Frames before the recording began (zeros: digital silence) read as the quietest level each band
        # reaches in the recording itself, its background: a step from background to digital silence would
        # mark where the recording starts, which says nothing about the word.
        heard = window > 0
        background = torch.where(heard, window, window.amax(dim=1, keepdim=True)).amin(dim=1, keepdim=True)
        window = torch.where(heard, window, background)
        # Levels relative to the loudest point of the window, so a recording's gain and a voice's loudness do
        # not move the input; then each band standardised, so the weak high bands (consonants) count as much
        # as the loud low ones.
        relative = window - window.amax(dim=(1, 2), keepdim=True)
        x = (relative - self.input_mean) / self.input_std
        x = (x / _SPREAD).clamp(-1.0, 1.0).transpose(1, 2).unsqueeze(1)  # [B, 1, n_mels, WINDOW]
        x = nn.functional.interpolate(x, scale_factor=(2.0, 1.0), mode="bilinear", align_corners=False)
        return self.network(x.expand(-1, 3, -1, -1))


def _uniform(rows: int, device: torch.device) -> torch.Tensor:
    return torch.rand(rows, device=device)


@register_encoder("audio", "efficientnet-lite0")
def efficientnet_lite0_audio(
    embed_dim: int = 128, n_mels: int = N_MELS, pretrained: bool = True
) -> WindowedSpectrogramEncoder:
    encoder = WindowedSpectrogramEncoder(n_mels, embed_dim)
    if pretrained:
        encoder.network.load_pretrained(EFFICIENTNET_LITE0.path())
    return encoder


# Few epochs and a small learning rate for the pretrained layers, as the image family asks (on AV-digits the
# validation accuracy was still rising at 8 epochs: see docs/results/unheard-voices.md).
efficientnet_lite0_audio.defaults = {"epochs": 8, "pretrained_lr": 3e-4}
