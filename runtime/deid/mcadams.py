"""Speaker anonymisation by the McAdams coefficient (Patino, Tomashenko, Todisco, Nautsch and Evans, "Speaker
anonymisation using the McAdams coefficient", Interspeech 2021; baseline B2 of the VoicePrivacy 2020 and 2022
challenges).

A voice's timbre lives largely in its formants, the resonances of the speaker's vocal tract, which linear
prediction (LPC) models as the poles of an all-pole filter. Per short frame:

1. the frame (a square-root Hann window, 20 ms, hop 10 ms) is fitted with an LPC filter A(z) of order
   `4 + rate / 1000` (20 at 16 kHz) by the autocorrelation method (Levinson-Durbin);
2. the residual e = A(z) x, what the vocal folds and the noise put in, is kept as it is;
3. each complex pole p = r e^{j phi} of 1 / A(z) is moved to r e^{j phi^alpha} (phi in radians, alpha = 0.8 by
   default): poles below 1 rad (about 2.5 kHz at 16 kHz) move up and those above move down, so the formants
   shift and squeeze while their bandwidths (r) stay; real poles are kept;
4. the residual is filtered by the new all-pole filter, windowed again and overlap-added.

The pitch (in the residual) and the timing are untouched, and so are the words: the formant pattern moves as a
whole, as between two speakers. Both windows are the square root of a periodic Hann window, so with alpha = 1
the output equals the input. Loudness is kept: the output is scaled to the input's RMS (less, if that would clip).

What it does not do (docs/privacy.md): it is one fixed, public transformation, so an attacker who knows it can
anonymise their own enrolment recordings the same way and recognise speakers again (the VoicePrivacy
challenges' "lazy-informed" attacker does markedly better than the ignorant one), and the pitch, the speaking
rate and the words themselves identify people too. It is deterministic: the same input gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polysense.errors import ConfigError, InputError

FRAME_MS = 20.0  # analysis frame; the hop is half of it
SILENCE = 1e-10  # frames whose energy (autocorrelation at lag 0) is below this pass through unchanged
LAG0_CONDITIONING = 1e-9  # added to lag 0 in proportion (a white-noise floor of -90 dB) for a stable fit
PEAK = 0.999  # the output's largest magnitude at most


@dataclass(frozen=True)
class VoiceOptions:
    """The McAdams transformation's settings."""

    alpha: float = 0.8  # the McAdams coefficient: pole angles phi become phi ** alpha (1.0 changes nothing)
    frame_ms: float = FRAME_MS  # analysis window in milliseconds (hop: half of it)
    lpc_order: int | None = None  # None: 4 + sample_rate // 1000 (20 at 16 kHz, 12 at 8 kHz)

    def __post_init__(self) -> None:
        if not 0.5 <= self.alpha <= 1.5:
            raise ConfigError(
                f"McAdams alpha {self.alpha}: choose 0.5-1.5 (0.8 is the VoicePrivacy baseline)"
            )
        if not 5.0 <= self.frame_ms <= 100.0:
            raise ConfigError(f"frame_ms {self.frame_ms}: choose 5-100 ms")
        if self.lpc_order is not None and not 2 <= self.lpc_order <= 64:
            raise ConfigError(f"lpc_order {self.lpc_order}: choose 2-64")


def anonymize_voice(
    samples: np.ndarray, sample_rate: int, options: VoiceOptions = VoiceOptions()
) -> np.ndarray:
    """Mono float samples with the speaker's formants moved (same length and rate), float32."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or not x.size or not np.all(np.isfinite(x)):
        raise InputError("anonymize_voice takes mono samples: a non-empty 1-D array of finite floats")
    frame = 2 * max(2, round(sample_rate * options.frame_ms / 2000))  # even, so the hop is exact
    order = options.lpc_order or 4 + sample_rate // 1000
    if order >= frame:
        raise ConfigError(f"lpc_order {order} needs frames longer than {frame} samples; raise frame_ms")
    hop = frame // 2
    window = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame))  # sqrt of a periodic Hann
    count = -(-(x.size + hop) // hop)  # frames: every sample is covered by two
    padded = np.zeros((count + 1) * hop)
    padded[hop : hop + x.size] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop][:count] * window
    a = lpc(frames, order)
    residual = fir(a, frames)
    shifted = shift_poles(a, options.alpha)
    out = np.zeros_like(padded)
    for index, piece in enumerate(all_pole(shifted, residual) * window):
        out[index * hop : index * hop + frame] += piece
    y = out[hop : hop + x.size]
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    gain = rms_in / rms_out if rms_out > 0 else 1.0
    peak = np.max(np.abs(y)) * gain
    if peak > PEAK:
        gain *= PEAK / peak
    return (y * gain).astype(np.float32)


def lpc(frames: np.ndarray, order: int) -> np.ndarray:
    """LPC coefficients [frames, order + 1] (a[0] = 1) by autocorrelation and Levinson-Durbin, all frames at once.

    Silent frames get a = [1, 0, ...] (the identity filter)."""
    n_fft = 1 << int(np.ceil(np.log2(2 * frames.shape[1])))
    r = np.fft.irfft(np.abs(np.fft.rfft(frames, n_fft)) ** 2, n_fft)[:, : order + 1]
    silent = r[:, 0] < SILENCE
    r[silent, 0] = 1.0  # any positive energy: their filters are reset below
    r[:, 0] *= 1.0 + LAG0_CONDITIONING
    a = np.zeros((frames.shape[0], order + 1))
    a[:, 0] = 1.0
    error = r[:, 0].copy()
    for i in range(1, order + 1):
        reflection = -(r[:, i] + np.sum(a[:, 1:i] * r[:, i - 1 : 0 : -1], axis=1)) / error
        a[:, 1:i] = a[:, 1:i] + reflection[:, None] * a[:, i - 1 : 0 : -1]
        a[:, i] = reflection
        error = error * (1.0 - reflection**2)
    a[silent, 1:] = 0.0
    return a


def fir(a: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Each frame filtered by its A(z) (from rest): e[t] = sum_k a[k] x[t - k]."""
    out = frames * a[:, :1]
    for k in range(1, a.shape[1]):
        out[:, k:] += a[:, k : k + 1] * frames[:, :-k]
    return out


def all_pole(a: np.ndarray, excitation: np.ndarray) -> np.ndarray:
    """Each frame's excitation filtered by its 1 / A(z) (from rest): y[t] = e[t] - sum_k a[k] y[t - k]."""
    order = a.shape[1] - 1
    reversed_a = a[:, :0:-1]  # a[order], ..., a[1]
    y = np.zeros((a.shape[0], order + excitation.shape[1]))
    for t in range(excitation.shape[1]):
        y[:, order + t] = excitation[:, t] - np.sum(reversed_a * y[:, t : t + order], axis=1)
    return y[:, order:]


def shift_poles(a: np.ndarray, alpha: float) -> np.ndarray:
    """A(z) with each complex pole's angle phi raised to phi ** alpha (within [0, pi]); real poles kept."""
    order = a.shape[1] - 1
    companion = np.zeros((a.shape[0], order, order))
    companion[:, 0, :] = -a[:, 1:]
    companion[:, np.arange(1, order), np.arange(order - 1)] = 1.0
    poles = np.linalg.eigvals(companion)
    angle = np.angle(poles)
    moved = np.abs(angle) > 1e-9
    moved &= np.abs(angle) < np.pi - 1e-9  # real poles (angle 0 or pi) stay where they are
    new_angle = np.where(moved, np.sign(angle) * np.minimum(np.abs(angle) ** alpha, np.pi), angle)
    new_poles = np.abs(poles) * np.exp(1j * new_angle)
    coefficients = np.ones((a.shape[0], 1), dtype=complex)
    for k in range(order):  # the polynomial with these roots, one factor (1 - p z^-1) at a time
        zero = np.zeros((a.shape[0], 1), dtype=complex)
        coefficients = np.hstack([coefficients, zero]) - new_poles[:, k : k + 1] * np.hstack(
            [zero, coefficients]
        )
    return coefficients.real
