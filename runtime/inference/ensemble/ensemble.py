"""An ensemble: several bundles trained for the same labels (other seeds, other settings), one prediction.

Each member predicts as its own Pipeline, and the ensemble's probabilities are the mean of theirs. Models that
err differently average their errors out: on AV-digits, audio alone on a speaker never heard in training,
three seeds of one configuration together beat each of them (benchmarks/avdigits/loso_ensemble.py). It costs
one encoder run per member and modality; nothing is shared but the inputs.

    ensemble = polysense.Ensemble.load(["seed0/bundle", "seed1/bundle", "seed2/bundle"])
    ensemble.predict(audio="clip.wav", voice=ensemble.voice_profile(["a.wav", "b.wav"]))
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from polysense.bundle.schema import BundleDescription
from polysense.bundle.signing import KeySource, TrustedKeys
from polysense.errors import BundleError, ConfigError, InputError
from polysense.inference.ensemble.results import (
    EnsembleEmbeddings,
    EnsemblePrepared,
    combine_predictions,
)
from polysense.inference.ensemble.stream import EnsembleAudioStream
from polysense.inference.fusion import Embeddings, Prediction, Prepared
from polysense.inference.pipeline import Pipeline
from polysense.inference.predictor import Predictor
from polysense.inference.preprocessors import build_preprocessors
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.modalities import Preprocess
from polysense.preprocess import voice as voices
from polysense.preprocess.audio import AudioInput
from polysense.preprocess.image import ImageInput
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile

MAX_MEMBERS = 16  # each member holds its own sessions; more is a mistake, not an ensemble

__all__ = ["Ensemble", "EnsembleAudioStream", "EnsembleEmbeddings", "EnsemblePrepared"]


class Ensemble:
    """Pipelines of the same labels and modalities whose probabilities are averaged. Safe to share between
    threads as a Pipeline is."""

    def __init__(self, members: Sequence[Pipeline], names: Sequence[str] | None = None) -> None:
        """`names`: what errors call each member (Ensemble.load passes the bundle paths; default "bundle 0", ...)."""
        members = list(members)
        if not members or not all(isinstance(m, Pipeline) for m in members):
            raise ConfigError("an ensemble is built from a non-empty list of polysense.Pipeline")
        if len(members) > MAX_MEMBERS:
            raise ConfigError(f"an ensemble takes at most {MAX_MEMBERS} bundles, got {len(members)}")
        names = [f"bundle {i}" for i in range(len(members))] if names is None else [str(n) for n in names]
        if len(names) != len(members):
            raise ConfigError(f"{len(names)} names for {len(members)} members; give one name per member")
        for index, member in enumerate(members[1:], 1):
            _check_member(members[0], member, names[0], names[index])
            _check_distinct(members[:index], member, names[:index], names[index])
        self._members = members
        self._voice = _shared_voice(members, names)
        self._audio_frames: Preprocess | None = None
        if self._voice is not None:  # log-mel frames an adaptive voice hears, computed as every member does
            first = members[0]
            self._audio_frames = build_preprocessors(
                first.description.preprocessing, ("audio",), _no_files, first.limits
            )["audio"]

    @classmethod
    def load(
        cls,
        paths: Sequence[str | os.PathLike],
        device: str = "auto",
        precision: str | dict[str, str] = "auto",
        intra_op_threads: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        trusted_keys: TrustedKeys | KeySource | Sequence[KeySource] | None = None,
    ) -> Ensemble:
        """One Pipeline per bundle path (see Pipeline.load for the options, which every member shares: with
        `trusted_keys`, every member must be signed by one of them)."""
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise ConfigError("pass a list of bundle paths, one per member of the ensemble, not one path")
        paths = list(paths)
        if not paths:
            raise ConfigError("pass a non-empty list of bundle paths, one per member of the ensemble")
        if len(paths) > MAX_MEMBERS:
            raise ConfigError(f"an ensemble takes at most {MAX_MEMBERS} bundles, got {len(paths)}")
        trusted = None if trusted_keys is None else TrustedKeys.parse(trusted_keys)
        members = [Pipeline.load(p, device, precision, intra_op_threads, limits, trusted) for p in paths]
        return cls(members, names=[str(p) for p in paths])

    @property
    def members(self) -> tuple[Pipeline, ...]:
        return tuple(self._members)

    @property
    def labels(self) -> tuple[str, ...]:
        return self._members[0].labels

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._members[0].modalities

    @property
    def embed_dim(self) -> int:
        return self._members[0].embed_dim  # every member's (checked when the ensemble is made)

    @property
    def limits(self) -> Limits:
        return self._members[0].limits  # every member's

    @property
    def description(self) -> BundleDescription:
        """The first member's bundle description. Members may preprocess differently (image sizes, sample
        rates); each has its own in `members[i].description`."""
        return self._members[0].description

    @property
    def precisions(self) -> list[dict[str, str]]:
        """Each member's component -> the precision it runs at."""
        return [m.precisions for m in self._members]

    @property
    def providers(self) -> list[dict[str, str]]:
        """Each member's component -> the execution provider it actually runs on."""
        return [m.providers for m in self._members]

    # -- inference -----------------------------------------------------------------------------------------

    def predict(
        self,
        image: ImageInput | None = None,
        text: str | None = None,
        audio: AudioInput | None = None,
        *,
        sample_rate: int | None = None,
        voice: VoiceProfile | AdaptiveVoice | None = None,
        **unknown: object,
    ) -> Prediction:
        """As Pipeline.predict; the probabilities are the members' mean (see predict_batch)."""
        if unknown:
            raise InputError(
                f"unknown keyword {next(iter(unknown))!r}; "
                "predict takes image=, text=, audio=, sample_rate= and voice="
            )
        sample = {"image": image, "text": text, "audio": audio, "sample_rate": sample_rate, "voice": voice}
        return self.predict_batch([{k: v for k, v in sample.items() if v is not None}])[0]

    def predict_batch(
        self, samples: Sequence[dict] | Sequence[EnsemblePrepared] | EnsembleEmbeddings
    ) -> list[Prediction]:
        """As Pipeline.predict_batch: sample dicts, what `prepare` made of them, or what `embed` returned. Each
        member predicts the batch, and each sample's probabilities are the mean of the members'. A prediction's
        embeddings are the members' embeddings of each modality stacked ([members, embed_dim]); its timings add
        up the members' stages, and `total` is the ensemble's own. An adaptive voice hears each recording once,
        as with one Pipeline."""
        start = time.perf_counter()
        if isinstance(samples, Embeddings):
            raise InputError(
                "these embeddings come from one Pipeline; an ensemble takes what its own embed returned "
                "(every member's embeddings)"
            )
        if isinstance(samples, EnsembleEmbeddings):
            if len(samples.members) != len(self._members):
                raise InputError(
                    f"these embeddings come from an ensemble of {len(samples.members)} bundles, this one has "
                    f"{len(self._members)}; pass what this ensemble's embed returned"
                )
            per_member = [m.predict_batch(e) for m, e in zip(self._members, samples.members)]
        else:
            if (
                isinstance(samples, (dict, str, bytes))
                or not isinstance(samples, Sequence)
                or not len(samples)
            ):
                raise InputError("pass a non-empty list of sample dicts")
            prepared = self._prepared(samples)
            per_member = [m.predict_batch(_member(prepared, i)) for i, m in enumerate(self._members)]
        total = (time.perf_counter() - start) * 1000
        labels = self.labels
        return [
            combine_predictions([m[row] for m in per_member], labels, total)
            for row in range(len(per_member[0]))
        ]

    def prepare(self, sample: dict) -> EnsemblePrepared:
        """Check one sample and preprocess it for every member (see Pipeline.prepare); an adaptive voice hears
        it here."""
        return self._prepared([sample])[0]

    def embed(self, samples: Sequence[dict] | Sequence[EnsemblePrepared]) -> EnsembleEmbeddings:
        """Every member's embeddings of the samples (see Pipeline.embed), sample dicts or what `prepare` made of
        them; `predict_batch` takes them."""
        if isinstance(samples, (dict, str, bytes)) or not isinstance(samples, Sequence) or not len(samples):
            raise InputError("pass a non-empty list of sample dicts")
        prepared = self._prepared(samples)
        return EnsembleEmbeddings(tuple(m.embed(_member(prepared, i)) for i, m in enumerate(self._members)))

    def audio_stream(
        self, encode: bool = True, voice: VoiceProfile | AdaptiveVoice | None = None
    ) -> EnsembleAudioStream:
        """A live audio stream through every member (see Pipeline.audio_stream); `result()` averages them."""
        return EnsembleAudioStream(self._members, self.labels, encode, voice)

    def voice_profile(self, recordings: Sequence[AudioInput], sample_rate: int | None = None) -> VoiceProfile:
        """A speaker's voice profile (see Pipeline.voice_profile), good for every member."""
        self._needs_voice("a voice profile")
        return self._members[0].voice_profile(recordings, sample_rate)

    def adaptive_voice(self, prior_frames: int = voices.PRIOR_FRAMES) -> AdaptiveVoice:
        """A voice that learns its speaker as they talk (see Pipeline.adaptive_voice), starting from the mean of
        the members' average voices."""
        return AdaptiveVoice(self._needs_voice("an adaptive voice"), prior_frames)

    # -- internals -----------------------------------------------------------------------------------------

    def _needs_voice(self, what: str) -> VoiceProfile:
        voices.bundle_voice(self._members[0].description.preprocessing, self.modalities, what)
        assert self._voice is not None  # _shared_voice made every member agree with the first
        return self._voice

    def _prepared(self, samples: Sequence[dict] | Sequence[EnsemblePrepared]) -> list[EnsemblePrepared]:
        """Each sample prepared by every member, in order (so an adaptive voice hears them one after another)."""
        prepared: list[EnsemblePrepared] = []
        for index, sample in enumerate(samples):
            if isinstance(sample, EnsemblePrepared):
                if len(sample.members) != len(self._members):
                    raise InputError(
                        f"sample {index} was prepared by an ensemble of {len(sample.members)} bundles, this "
                        f"one has {len(self._members)}; pass what this ensemble's prepare made"
                    )
                prepared.append(sample)
                continue
            if not isinstance(sample, dict):
                raise InputError(
                    "an ensemble takes sample dicts, or what its own prepare made of them (each member "
                    f"prepares its own), got {type(sample).__name__}"
                )
            # The members' own checks and preprocessing (which name the sample in their errors), all before an
            # adaptive voice hears it, so a refused sample teaches it nothing.
            where = f"sample {index}: " if len(samples) > 1 else ""
            self._members[0]._check_sample(sample, where)
            lent = self._lent_voice(sample)
            prepared.append(EnsemblePrepared(tuple(m._prepare(lent, where) for m in self._members)))
            if lent is not sample and self._audio_frames is not None:  # lent: an adaptive voice with frames
                sample["voice"].hear(self._audio_frames(sample["audio"], sample.get("sample_rate")))
        return prepared

    def _lent_voice(self, sample: dict) -> dict:
        """The sample with an adaptive voice replaced by the profile it has learnt so far, which every member
        hears it with; the voice itself hears the recording once, for the whole ensemble (in _prepared)."""
        if not isinstance(sample.get("voice"), AdaptiveVoice):
            return sample
        if self._audio_frames is None or sample.get("audio") is None:
            return sample  # the members refuse it with the message a Pipeline gives
        return {**sample, "voice": sample["voice"].profile}


def _check_member(first: Pipeline, member: Pipeline, first_name: str, name: str) -> None:
    """`member` can be averaged with `first`: the same labels, modalities, embedding size and limits."""
    if sorted(member.labels) != sorted(first.labels):
        raise ConfigError(
            f"{name} has the labels {', '.join(member.labels)} but {first_name} has "
            f"{', '.join(first.labels)}; an ensemble's bundles classify into the same labels"
        )
    if member.modalities != first.modalities:
        raise ConfigError(
            f"{name} takes {'+'.join(member.modalities)} but {first_name} takes "
            f"{'+'.join(first.modalities)}; an ensemble's bundles take the same modalities"
        )
    if member.embed_dim != first.embed_dim:
        # A prediction stacks the members' embeddings of each modality ([members, embed_dim]).
        raise ConfigError(
            f"{name} embeds into {member.embed_dim} numbers but {first_name} into "
            f"{first.embed_dim}; an ensemble's bundles are trained with the same --embed-dim"
        )
    if member.limits != first.limits:
        # One input is checked once against these limits; a member with other limits would refuse it
        # after the others took it (a stream's chunk, half fed).
        raise ConfigError(
            f"{name} was loaded with other limits than {first_name}; load an ensemble's pipelines "
            "with the same polysense.Limits (Ensemble.load does)"
        )


def _check_distinct(earlier: Sequence[Pipeline], member: Pipeline, names: Sequence[str], name: str) -> None:
    """One model given twice (the same path, or a copy: the same bundle.json, which hashes every file) would
    only count double in the average: an ensemble of one model is that model, so it is refused."""
    for other, other_name in zip(earlier, names):
        if other is member or other.description == member.description:
            raise ConfigError(
                f"{name} is the same model as {other_name} (the same bundle.json); an ensemble averages "
                "different models: give each bundle once"
            )


def _shared_voice(members: list[Pipeline], names: list[str]) -> VoiceProfile | None:
    """The mean of the members' average voices, when every member was trained with --voice-norm on the same
    log-mel front end (so one speaker's profile serves them all); None when none was."""
    if "audio" not in members[0].modalities:  # every member's modalities (checked before)
        return None
    audio = [m.description.preprocessing.of("audio") for m in members]
    with_voice = [a.voice is not None for a in audio]
    if any(with_voice) and not all(with_voice):
        index = with_voice.index(not with_voice[0])
        raise ConfigError(
            f"{names[index]} was trained {'with' if with_voice[index] else 'without'} --voice-norm and {names[0]} "
            f"{'with' if with_voice[0] else 'without'}; an ensemble's bundles take recordings the same way"
        )
    if not with_voice[0]:
        return None
    for index, settings in enumerate(audio[1:], 1):
        if settings.front_end() != audio[0].front_end():
            raise ConfigError(
                f"{names[index]} computes log-mel frames unlike {names[0]} ({settings.front_end()} against "
                f"{audio[0].front_end()}); one voice profile cannot serve both"
            )
    return VoiceProfile.average(a.voice for a in audio if a.voice is not None)  # every member's (checked)


def _member(prepared: Sequence[EnsemblePrepared], index: int) -> list[Prepared]:
    """What member `index` made of each sample."""
    return [p.members[index] for p in prepared]


def _no_files(name: str) -> bytes:
    raise BundleError(f"an ensemble's audio front end reads no file, but {name!r} was asked for")


# `make typecheck` proves that both satisfy polysense.Predictor (tests/test_predictor.py compares them too).
if TYPE_CHECKING:

    def _predictors(
        pipeline: Pipeline, ensemble: Ensemble
    ) -> tuple[Predictor[Prepared, Embeddings], Predictor[EnsemblePrepared, EnsembleEmbeddings]]:
        return pipeline, ensemble
