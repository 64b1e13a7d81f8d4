"""Training-time perturbations of preprocessed batches, so encoders learn what must not matter.

Features are preprocessed once before training (polysense.models.training.dataset), so the perturbations work on the
preprocessed tensors, per sample, each with the sample's own generator of the epoch (dataset.row_generators:
a resumed run repeats them, and so does a run split among processes):

    audio (log-mel frames [B, T, n_mels]), for voices never heard in training:
        tempo         the time axis stretched by 0.85-1.15 (speaking rate)
        vocal tract   the frequency axis warped by 0.88-1.12 in Hz (VTLP: vocal-tract length differs by speaker)
        gain          -20 to +10 dB (an additive constant of the log power; quiet microphones are common)
        noise         white noise added in the power domain (--audio-noise): light, 10-40 dB SNR on half of
                      the clips (the default); strong, 0-30 dB on 80 % of them; or none
        masking       two frequency bands of up to 5 mel bins and two spans of up to 10 % of the frames
                      (SpecAugment), filled with the clip's mean

    image (normalised [B, 3, H, W]):
        affine        rotation +-12 degrees, scale 0.85-1.15, shift +-8 % (edges repeat the border)
        photometric   contrast x0.75-1.25 and brightness +-0.25 (in normalised units)

Nothing here changes inference: the exported graphs and the streaming path never see it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from polysense.bundle.settings import AudioSettings, Preprocessing
from polysense.preprocess.audio import LOG_FLOOR, hz_to_mel, mel_to_hz

TEMPO = (0.85, 1.15)
VOCAL_TRACT = (0.88, 1.12)
GAIN_DB = (-20.0, 10.0)
FREQUENCY_MASKS, FREQUENCY_MASK_BINS = 2, 5
TIME_MASKS, TIME_MASK_SHARE = 2, 0.10
ROTATION_DEGREES, SCALE, SHIFT = 12.0, (0.85, 1.15), 0.08
CONTRAST, BRIGHTNESS = (0.75, 1.25), 0.25


@dataclass(frozen=True)
class NoiseLevel:
    """White noise added to a training clip's mel power."""

    snr_db: tuple[float, float]  # the signal-to-noise ratio is drawn uniformly from this range
    share: float  # share of the clips that get noise


# --audio-noise (TrainOptions.audio_noise names these). Light draws the random numbers runs drew before the
# option existed, so their results repeat; tempo, warp and gain are drawn before the noise, alike at every
# level. Strong noise was measured with --voice-norm, on voices never heard in training (docs/results/unheard-voices.md).
NOISE_LEVELS = {
    "none": NoiseLevel((10.0, 40.0), 0.0),
    "light": NoiseLevel((10.0, 40.0), 0.5),
    "strong": NoiseLevel((0.0, 30.0), 0.8),
}


def augment_batch(
    batch: dict, preprocessing: Preprocessing, generators: Sequence[torch.Generator], noise: str = "light"
) -> dict:
    """A copy of a training batch with its image and audio perturbed (other keys unchanged); `generators`
    holds one generator per row; `noise` names the audio's NoiseLevel."""
    batch = dict(batch)
    if "image" in batch and batch["image"].dim() == 4:  # pixels, not a frozen encoder's vectors
        moved = augment_images(batch["image"], generators)
        absent = batch["image"].flatten(1).eq(0).all(dim=1)  # rows of samples without an image stay zeros
        batch["image"] = torch.where(absent.view(-1, 1, 1, 1), batch["image"], moved)
    # Only log-mel frames are perturbed: a frozen front end's vectors (speech-embedding) are taken as they are.
    if "audio" in batch and preprocessing.audio is not None and preprocessing.audio.front == "log-mel":
        batch["audio"], batch["audio_mask"] = augment_log_mel(
            batch["audio"], batch["audio_mask"], preprocessing.audio, generators, NOISE_LEVELS[noise]
        )
    return batch


def _uniform(generator: torch.Generator, low: float, high: float, size: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def augment_images(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    rows = images.shape[0]
    draws = torch.stack([torch.rand(6, generator=g) for g in generators])  # [rows, 6] uniform in [0, 1)

    def uniform(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * draws[:, column]

    angle = uniform(0, -ROTATION_DEGREES, ROTATION_DEGREES) * (math.pi / 180)
    scale = uniform(1, *SCALE)
    shift = torch.stack([uniform(2, -2 * SHIFT, 2 * SHIFT), uniform(3, -2 * SHIFT, 2 * SHIFT)], 1)  # grid: 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    contrast = uniform(4, *CONTRAST).view(rows, 1, 1, 1).to(images)
    brightness = uniform(5, -BRIGHTNESS, BRIGHTNESS).view(rows, 1, 1, 1).to(images)
    return moved * contrast + brightness


def augment_log_mel(
    frames: torch.Tensor,
    mask: torch.Tensor,
    settings: AudioSettings,
    generators: Sequence[torch.Generator],
    noise: NoiseLevel = NOISE_LEVELS["light"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [B, T, n_mels] (natural log of mel power), mask [B, T] -> perturbed frames and their new mask
    (tempo changes each clip's length)."""
    clips = []
    for row in range(frames.shape[0]):
        length = int(mask[row].sum().item())
        if length == 0:  # the sample lacks audio: keep its zeros
            clips.append(frames[row, :0])
            continue
        clips.append(_perturb_clip(frames[row, :length], settings, generators[row], noise))
    longest = max([1] + [clip.shape[0] for clip in clips])
    out = frames.new_zeros(frames.shape[0], longest, frames.shape[2])
    new_mask = mask.new_zeros(frames.shape[0], longest)
    for row, clip in enumerate(clips):
        out[row, : clip.shape[0]] = clip
        new_mask[row, : clip.shape[0]] = 1
    return out, new_mask


def _perturb_clip(
    clip: torch.Tensor, settings: AudioSettings, generator: torch.Generator, noise: NoiseLevel
) -> torch.Tensor:
    """One clip [T, n_mels] -> its perturbed copy [T', n_mels]."""
    tempo = float(_uniform(generator, *TEMPO))
    length = max(1, round(clip.shape[0] / tempo))
    clip = F.interpolate(clip.t()[None], size=length, mode="linear", align_corners=False)[0].t()
    clip = _warp_frequencies(clip, float(_uniform(generator, *VOCAL_TRACT)), settings)
    # Gain and noise act on the mel power above the floor the runtime adds, so silence stays at the floor
    # (log(LOG_FLOOR)) exactly as a quieter recording would show it.
    power = (clip.exp() - LOG_FLOOR).clamp(min=0) * 10 ** (float(_uniform(generator, *GAIN_DB)) / 10)
    if float(torch.rand(1, generator=generator)) < noise.share:
        snr_db = float(_uniform(generator, *noise.snr_db))
        noise = power.mean() * 10 ** (-snr_db / 10) * torch.rand(clip.shape, generator=generator).to(clip) * 2
        power = power + noise
    return _mask((power + LOG_FLOOR).log(), generator)


def _warp_frequencies(clip: torch.Tensor, factor: float, settings: AudioSettings) -> torch.Tensor:
    """Vocal-tract length perturbation: the spectrum scaled by `factor` along Hz, read at the mel centres."""
    n_mels = clip.shape[1]
    centres_mel = _mel_centres(settings, n_mels)
    # The bin that showed frequency f / factor now shows f: read each centre from where it came from.
    source_mel = hz_to_mel(mel_to_hz(centres_mel) / factor)
    position = np.interp(source_mel, centres_mel, np.arange(n_mels))  # clamped at both ends
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_mels - 1)
    weight = torch.from_numpy((position - low).astype(np.float32)).to(clip)
    return clip[:, low] * (1 - weight) + clip[:, high] * weight


@functools.lru_cache(maxsize=8)
def _mel_centres(settings: AudioSettings, n_mels: int) -> np.ndarray:
    """The mel-scale centre of each filter of the runtime's filterbank (computed once per settings)."""
    fmax = settings.fmax if settings.fmax is not None else settings.sample_rate / 2
    return np.linspace(hz_to_mel(settings.fmin), hz_to_mel(fmax), n_mels + 2)[1:-1]


def _mask(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    clip = clip.clone()
    fill = clip.mean()
    length, n_mels = clip.shape
    for _ in range(FREQUENCY_MASKS):
        width = int(torch.randint(0, min(FREQUENCY_MASK_BINS, n_mels) + 1, (1,), generator=generator))
        start = int(torch.randint(0, n_mels - width + 1, (1,), generator=generator))
        clip[:, start : start + width] = fill
    for _ in range(TIME_MASKS):
        width = int(torch.randint(0, max(1, int(length * TIME_MASK_SHARE)) + 1, (1,), generator=generator))
        start = int(torch.randint(0, max(1, length - width + 1), (1,), generator=generator))
        clip[start : start + width] = fill
    return clip
