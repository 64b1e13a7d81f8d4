"""Voice profiles: speaker normalisation of log-mel frames, as speech recognisers adapt to a speaker.

A model trained with `--voice-norm` never sees a speaker's raw spectrum: every recording's log-mel frames have
that speaker's profile removed, the mean of their voiced frames per mel band, with each band's spread scaled to
the speaker's own. What a voice adds to every word (its vocal tract's resonances, its microphone) is gone,
and what is left is what the word adds. The profile is built from a few of the speaker's recordings, without
labels: what they say does not matter, as long as there is enough of it (on AV-digits a profile from ten
one-second clips did nearly as well as one from five hundred).

A bundle trained this way carries the average profile of its training speakers, used for a voice with no
profile of its own; a profile of the actual speaker is what brings the gain. Where no recordings can be asked
for up front, an `AdaptiveVoice` learns the profile from the speaker's recordings as they are heard, starting
from the average voice.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from polysense.errors import InputError

# A frame counts as voiced when its mean log-mel is within this many natural-log units (about 22 dB) of the
# recording's loudest frame: the pauses around a word would otherwise make the profile the microphone's hiss.
VOICED_RANGE = 5.0
# Bands a voice never reaches (above 4 kHz in 8 kHz recordings) have a spread near 0; scaling by it would
# turn any sound there into huge inputs.
MIN_SPREAD = 0.5
MAX_PROFILE_BYTES = 1 << 20
MAX_BANDS = 4096  # far more mel bands than any front end uses; bounds what a hostile profile costs
# How many voiced frames the average voice counts for in an AdaptiveVoice: about one second of speech, so the
# first recording moves the profile half-way to its own voice and ten recordings nearly all the way.
PRIOR_FRAMES = 50


@dataclass(frozen=True, eq=False)
class VoiceProfile:
    """One speaker's mean log-mel frame and the spread of each band (geometric mean 1) over voiced frames."""

    mean: np.ndarray  # [n_mels] float32
    spread: np.ndarray  # [n_mels] float32, > 0
    frames: int  # voiced frames it was measured on

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, np.float32)
        spread = np.asarray(self.spread, np.float32)
        if mean.ndim != 1 or spread.shape != mean.shape or not mean.size:
            raise InputError(
                f"a voice profile needs mean and spread of one length, got {mean.shape} and {spread.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(spread).all() and (spread > 0).all()):
            raise InputError("a voice profile needs finite values and a positive spread in every band")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "spread", spread)

    @property
    def n_mels(self) -> int:
        return int(self.mean.size)

    @classmethod
    def from_frames(cls, recordings: Iterable[np.ndarray]) -> VoiceProfile:
        """The profile of log-mel frames [T, n_mels] of one speaker's recordings."""
        voiced = [_voiced(np.asarray(frames, np.float32)) for frames in recordings]
        voiced = [v for v in voiced if v.shape[0]]
        if not voiced:
            raise InputError(
                "no speech to build a voice profile from; give recordings of the speaker talking"
            )
        frames = np.concatenate(voiced)
        spread = np.maximum(frames.std(0), MIN_SPREAD)
        spread = spread / np.exp(np.log(spread).mean())  # only how the bands' spreads differ matters
        return cls(frames.mean(0), spread, int(frames.shape[0]))

    @classmethod
    def average(cls, profiles: Iterable[VoiceProfile]) -> VoiceProfile:
        """The average voice of several speakers (each counts once, however much of them was heard)."""
        profiles = list(profiles)
        if not profiles:
            raise InputError("no voice profiles to average")
        mean = np.mean([p.mean for p in profiles], axis=0)
        spread = np.exp(np.mean([np.log(p.spread) for p in profiles], axis=0))
        return cls(mean, spread, sum(p.frames for p in profiles))

    def normalise(self, frames: np.ndarray) -> np.ndarray:
        """Log-mel frames [..., n_mels] with this voice removed."""
        if frames.shape[-1] != self.n_mels:
            raise InputError(
                f"the voice profile has {self.n_mels} mel bands but the model's frames have {frames.shape[-1]}; "
                "build the profile with this bundle (polysense voice BUNDLE CLIPS)"
            )
        return ((frames - self.mean) / self.spread).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "spread": self.spread.tolist(), "frames": self.frames}

    @classmethod
    def from_dict(cls, data: Any, where: str = "voice profile") -> VoiceProfile:
        if not isinstance(data, dict) or not {"mean", "spread", "frames"} <= set(data):
            raise InputError(f"{where}: expected an object with mean, spread and frames")
        bands = [data[k] for k in ("mean", "spread") if isinstance(data[k], (list, tuple))]
        if any(len(values) > MAX_BANDS for values in bands):
            raise InputError(f"{where}: mean and spread have at most {MAX_BANDS} bands (one per mel band)")
        try:
            mean = np.array(data["mean"], dtype=np.float32)
            spread = np.array(data["spread"], dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as error:  # OverflowError: an integer past float range
            raise InputError(f"{where}: mean and spread must be lists of numbers ({error})") from error
        frames = data["frames"]
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise InputError(f"{where}: frames must be a positive whole number, got {frames!r}")
        try:
            return cls(mean, spread, frames)
        except InputError as error:
            raise InputError(f"{where}: {error}") from error

    def save(self, path: str | os.PathLike) -> None:
        try:
            Path(path).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")
        except OSError as error:
            raise InputError(
                f"cannot write the voice profile to {path}: {error.strerror or error}"
            ) from error

    @classmethod
    def load(cls, path: str | os.PathLike) -> VoiceProfile:
        """A profile that `save` (or `polysense voice`) wrote."""
        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"voice profile not found: {path}; make one with polysense voice BUNDLE CLIPS --out {path}"
            )
        if path.stat().st_size > MAX_PROFILE_BYTES:  # before reading: a huge file is never read in
            raise _too_large(str(path), path.stat().st_size)
        return cls.from_json(path.read_bytes(), str(path))

    @classmethod
    def from_json(cls, raw: str | bytes, where: str = "voice profile") -> VoiceProfile:
        """A profile from the JSON text `save` writes (a file's bytes, an HTTP field); at most
        MAX_PROFILE_BYTES, refused before parsing, which is what costs memory and time."""
        if len(raw) > MAX_PROFILE_BYTES:
            raise _too_large(where, len(raw))
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, or nesting too deep
            raise InputError(
                f"{where} is not a voice profile ({str(error)[:200]}); send the JSON file polysense voice wrote"
            ) from None
        return cls.from_dict(data, where)


class AdaptiveVoice:
    """A speaker's voice profile learnt as they talk, for bundles trained with --voice-norm used without
    enrolment: it starts as the bundle's average voice and moves towards the speaker's own with every recording
    heard. The profile is the average voice and the voiced frames heard so far, mixed in proportion to their
    counts (the average counting `prior_frames`), so one short recording cannot swing it far.

    Use one per speaker (a session, a device's owner) and pass it as `voice=` to `Pipeline.predict`,
    `predict_batch` or `audio_stream`: each recording is heard with the profile learnt from the recordings
    before it, then joins it (a stream's when its input finishes), so a stream hears what `predict` would.
    Memory is fixed (three numbers per mel band); safe to share between threads.
    """

    def __init__(self, prior: VoiceProfile, prior_frames: int = PRIOR_FRAMES) -> None:
        if not isinstance(prior, VoiceProfile):
            raise InputError(f"an adaptive voice starts from a VoiceProfile, got {type(prior).__name__}")
        if isinstance(prior_frames, bool) or not isinstance(prior_frames, int) or prior_frames < 0:
            raise InputError(f"prior_frames must be a whole number >= 0, got {prior_frames!r}")
        self.prior = prior
        self.prior_frames = prior_frames
        self._lock = threading.Lock()
        self.reset()

    @property
    def n_mels(self) -> int:
        return self.prior.n_mels

    @property
    def frames(self) -> int:
        """Voiced frames heard so far."""
        return self._count

    @property
    def profile(self) -> VoiceProfile:
        """The profile learnt so far (the prior before any speech was heard)."""
        with self._lock:
            return self._profile

    def hear(self, frames: np.ndarray) -> None:
        """Learn from one recording's log-mel frames [T, n_mels] (its pauses are left out, as in a profile)."""
        try:
            frames = np.asarray(frames, np.float64)
        except (TypeError, ValueError) as error:
            raise InputError(f"an adaptive voice hears log-mel frames, numbers: {error}") from None
        if frames.ndim != 2 or frames.shape[1] != self.n_mels:
            raise InputError(
                f"an adaptive voice hears log-mel frames [T, {self.n_mels}], got shape {frames.shape}"
            )
        voiced = _voiced(frames)
        voiced = voiced[np.isfinite(voiced).all(1)]
        if not voiced.shape[0]:
            return
        with self._lock:
            self._sum += voiced.sum(0)
            self._squares += np.square(voiced).sum(0)
            self._count += int(voiced.shape[0])
            self._profile = self._learnt()

    def reset(self) -> None:
        """Forget everything heard (a new speaker)."""
        with self._lock:
            self._sum = np.zeros(self.n_mels)
            self._squares = np.zeros(self.n_mels)
            self._count = 0
            self._profile = self.prior

    def _learnt(self) -> VoiceProfile:
        mean = self._sum / self._count
        spread = np.sqrt(np.maximum(self._squares / self._count - np.square(mean), 0.0))
        log_spread = np.log(np.maximum(spread, MIN_SPREAD))
        heard = self._count / (self._count + self.prior_frames)
        mean = heard * mean + (1 - heard) * self.prior.mean
        # Spreads mix as logarithms: only how the bands' spreads differ matters, fixed at geometric mean 1.
        log_spread = heard * (log_spread - log_spread.mean()) + (1 - heard) * np.log(self.prior.spread)
        return VoiceProfile(mean, np.exp(log_spread - log_spread.mean()), self._count)


def _too_large(where: str, size: int) -> InputError:
    return InputError(
        f"{where}: {size:,} bytes is too large for a voice profile (at most {MAX_PROFILE_BYTES:,}); "
        "send the JSON file polysense voice wrote"
    )


def _voiced(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 2 or not frames.shape[0]:
        return frames.reshape(0, frames.shape[-1] if frames.ndim else 0)
    loudness = frames.mean(1)
    return frames[loudness > loudness.max() - VOICED_RANGE]


def speaker_profiles(recordings: Iterable[tuple[str, np.ndarray]]) -> dict[str, VoiceProfile]:
    """speaker -> the profile of their recordings, from (speaker, log-mel frames) pairs."""
    by_speaker: dict[str, list[np.ndarray]] = {}
    for speaker, frames in recordings:
        by_speaker.setdefault(speaker, []).append(frames)
    profiles = {}
    for speaker, recorded in by_speaker.items():
        try:
            profiles[speaker] = VoiceProfile.from_frames(recorded)
        except InputError as error:
            raise InputError(f"speaker {speaker!r}: {error}") from error
    return profiles


class _VoiceSettings(Protocol):
    """What bundle_voice reads of a bundle's audio settings (polysense.bundle.settings.AudioSettings)."""

    @property
    def voice(self) -> VoiceProfile | None: ...


class _Preprocessing(Protocol):
    """What bundle_voice reads of a bundle's preprocessing (polysense.bundle.settings.Preprocessing, a layer
    above this module)."""

    @property
    def audio(self) -> _VoiceSettings | None: ...


def bundle_voice(preprocessing: _Preprocessing, modalities: tuple[str, ...], what: str) -> VoiceProfile:
    """The training speakers' average voice that a bundle trained with --voice-norm carries (`preprocessing`:
    its description's); `what` names what would need it, in the error for any other bundle."""
    if "audio" not in modalities:
        raise InputError(f"this bundle has no audio encoder; it takes {', '.join(modalities)}")
    audio = preprocessing.audio  # there with the audio modality (BundleDescription.check)
    if audio is None or audio.voice is None:
        raise InputError(f"this bundle was trained without --voice-norm, so {what} cannot help it")
    return audio.voice


def remove_voice(voice: VoiceProfile | AdaptiveVoice | None, frames: np.ndarray) -> np.ndarray:
    """One recording's log-mel frames with `voice` removed (None: left as they are). An adaptive voice removes
    what it learnt before this recording, then learns from it."""
    if isinstance(voice, AdaptiveVoice):
        normalised = voice.profile.normalise(frames)
        voice.hear(frames)
        return normalised
    return frames if voice is None else voice.normalise(frames)


def voice_for(default: VoiceProfile | None, given: object) -> VoiceProfile | AdaptiveVoice | None:
    """The voice to remove from a recording: the given profile or adaptive voice, else the bundle's `default`
    (None: the bundle was trained without --voice-norm and takes raw frames, so giving a voice is a mistake
    worth naming)."""
    if given is None:
        return default
    if not isinstance(given, (VoiceProfile, AdaptiveVoice)):
        raise InputError(
            f"voice must be a polysense.VoiceProfile or AdaptiveVoice, got {type(given).__name__}"
        )
    if default is None:
        raise InputError(
            "this bundle was trained without --voice-norm, so a voice profile cannot help it; drop voice="
        )
    if given.n_mels != default.n_mels:
        raise InputError(
            f"the voice profile has {given.n_mels} mel bands but this bundle's model takes {default.n_mels}; "
            "build the profile with this bundle (Pipeline.voice_profile or polysense voice)"
        )
    return given
