"""The runtime pipeline: preprocess -> one encoder session per present modality -> fusion -> probabilities.

One Pipeline serves predictions, embeddings and live streams from one bundle. Below it: the preprocessors
(polysense.inference.preprocessors), the sessions (polysense.inference.sessions), the audio engine (polysense.inference.audio_engine) and the
fusion head (polysense.inference.fusion); none of them is part of the Pipeline's public surface.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from polysense.bundle.archive import is_archive, unpacked
from polysense.bundle.graph_check import check_graph
from polysense.bundle.reader import Bundle, open_bundle
from polysense.bundle.schema import FUSION, BundleDescription
from polysense.bundle.signing import KeySource, TrustedKeys
from polysense.errors import ConfigError, InputError
from polysense.inference.audio_engine import AudioEngine
from polysense.inference.fusion import Embeddings, FusionHead, Prediction, Prepared
from polysense.inference.precision import TUNING_FILE, choose_precisions, tuned_choices
from polysense.inference.preprocessors import build_preprocessors
from polysense.inference.sessions import DeviceArray, Session, SessionSettings, runnable, to_numpy
from polysense.inference.streaming import AudioStream, VideoSource, VideoStream
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.modalities import MODALITIES, SPECS
from polysense.optional import require_modality
from polysense.preprocess import voice as voices
from polysense.preprocess.audio import AudioInput
from polysense.preprocess.image import ImageInput
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile

SAMPLE_KEYS = (*MODALITIES, "sample_rate", "voice")
log = logging.getLogger("polysense")

__all__ = ["Embeddings", "Pipeline", "Prediction", "Prepared"]


class Pipeline:
    """Load once, predict many times."""

    def __init__(
        self,
        bundle: Bundle,
        settings: SessionSettings,
        precision: str | dict[str, str] = "auto",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        description = bundle.description
        settings = runnable(settings)
        self._description = description
        self._limits = limits
        for modality in description.modalities:
            require_modality(modality)
        self._preprocessors = build_preprocessors(
            description.preprocessing, description.modalities, bundle.read, limits
        )
        names = list(description.components)
        self._precision_source = "asked" if precision != "auto" else "export"
        if precision == "auto":
            tuned = tuned_choices(bundle.path, settings.device)
            if tuned is not None and all(tuned.get(n) in description.component(n).variants for n in names):
                precision, self._precision_source = {n: tuned[n] for n in names}, "tuned"
                log.info(
                    "precision auto: the variants `polysense tune` chose on this device (%s)", TUNING_FILE
                )
        self._precisions = choose_precisions(description, names, settings.device, precision)
        self._sessions = {name: self._session(bundle, name, settings) for name in names}
        used = [description.component(n).variant(p).file for n, p in self._precisions.items()]
        used += [name for name, _ in description.preprocessing.files()]
        bundle.verify(skip=used)  # the used files were verified as they were read, each once
        self._fusion = FusionHead(
            self._sessions[FUSION],
            description.component(FUSION),
            description.modalities,
            description.labels,
            description.embed_dim,
        )
        self._audio: AudioEngine | None = None
        for spec in (SPECS[m] for m in description.modalities if SPECS[m].streaming):
            assert description.streaming is not None  # check(): there with a streaming encoder
            frames_input = spec.graph_inputs[0]
            self._audio = AudioEngine(
                self._sessions[spec.component], description.streaming, frames_input, description.embed_dim
            )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        precision: str | dict[str, str] = "auto",
        intra_op_threads: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        trusted_keys: TrustedKeys | KeySource | Sequence[KeySource] | None = None,
    ) -> Pipeline:
        """Open and verify the bundle at `path` (a folder, or the .tar of an edge bundle), create one session per
        component on `device`.

        precision: "auto" takes per component the fastest variant the bundle kept for the device (int8 on CPU,
        fp16 on CUDA, where they passed export's accuracy and speed checks; else fp32); "fp32", "int8" or
        "fp16" forces one wherever the bundle has it (a warning names components that lack it); a dict
        {component: precision} sets components one by one (the others auto).
        limits: what one input may cost before it is refused (polysense.Limits: image pixels, audio duration,
        sample rates, bytes); raise one when genuine inputs exceed it.
        trusted_keys: public keys (paths to the KEY.pub `polysense keygen` wrote, or their bytes); given, the
        bundle must be signed by one of them (`polysense bundle sign`) or it is refused (docs/security.md).
        """
        if not isinstance(limits, Limits):
            raise ConfigError(f"limits must be a polysense.Limits, got {type(limits).__name__}")
        trusted = None if trusted_keys is None else TrustedKeys.parse(trusted_keys)
        settings = SessionSettings(device=device, intra_op_threads=intra_op_threads)
        if is_archive(path):  # one .tar (polysense edge --tar): unpacked while the sessions read their files
            with unpacked(path) as folder:
                return cls(open_bundle(folder, False, trusted), settings, precision, limits)
        return cls(open_bundle(path, False, trusted), settings, precision, limits)

    # -- read-only properties ------------------------------------------------------------------------------

    @property
    def description(self) -> BundleDescription:
        """The bundle's typed description (labels, components, preprocessing, streaming state, metrics)."""
        return self._description

    @property
    def labels(self) -> tuple[str, ...]:
        return self._description.labels

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._description.modalities

    @property
    def embed_dim(self) -> int:
        return self._description.embed_dim

    @property
    def limits(self) -> Limits:
        """What one input may cost before it is refused."""
        return self._limits

    @property
    def precisions(self) -> dict[str, str]:
        """component -> the precision it runs at."""
        return dict(self._precisions)

    @property
    def precision_source(self) -> str:
        """Where the precisions came from: "tuned" (tuning.json, measured on this device by `polysense tune`),
        "export" (auto from export's measurements) or "asked" (precision given to load)."""
        return self._precision_source

    @property
    def providers(self) -> dict[str, str]:
        """component -> the execution provider it actually runs on."""
        return {name: session.provider for name, session in self._sessions.items()}

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
        """Predict from any non-empty subset of the bundle's modalities; only their encoders run.

        image: path, encoded bytes or an HxWxC uint8 RGB array; text: a str (longer texts are truncated to the
        bundle's max_length tokens); audio: path, encoded bytes or a sample array with `sample_rate`; voice:
        the speaker's profile (`voice_profile`) or the voice learnt so far (`adaptive_voice`, which then
        hears this recording), for bundles trained with --voice-norm.
        """
        if unknown:
            raise InputError(
                f"unknown keyword {next(iter(unknown))!r}; "
                "predict takes image=, text=, audio=, sample_rate= and voice="
            )
        sample = {"image": image, "text": text, "audio": audio, "sample_rate": sample_rate, "voice": voice}
        return self.predict_batch([{k: v for k, v in sample.items() if v is not None}])[0]

    def predict_batch(self, samples: Sequence[dict] | Sequence[Prepared] | Embeddings) -> list[Prediction]:
        """Predict many samples at once; each is a dict with some of image, text, audio (+ sample_rate, voice),
        or what `prepare` made of one.

        Also takes the Embeddings that embed() returned (optionally narrowed with `Embeddings.select`), so
        embeddings computed once can be classified under several subsets of modalities.
        """
        start = time.perf_counter()
        timings: dict[str, float]
        if isinstance(samples, Embeddings):
            vectors, mask, timings = samples.vectors, samples.mask, {}
        else:
            vectors, mask, timings = self._embed(samples)
        tick = time.perf_counter()
        probabilities = self._fusion.probabilities(vectors, mask)
        timings["fusion"] = (time.perf_counter() - tick) * 1000
        host = {m: to_numpy(v) for m, v in vectors.items()}
        timings["total"] = (time.perf_counter() - start) * 1000
        return self._fusion.predictions(probabilities, host, mask, timings)

    def prepare(self, sample: dict) -> Prepared:
        """Check one sample and preprocess it (decode, resize, tokenize, log-mel), without running a model.

        `predict_batch` takes Prepared samples as it takes dicts. A server prepares each request on its own
        thread, so a bad input fails only its request, and then batches the model runs of many requests
        (polysense.serving.DynamicBatcher).
        """
        return self._prepare(sample)

    def embed(self, samples: Sequence[dict] | Sequence[Prepared]) -> Embeddings:
        """Embeddings of each sample's modalities (no fusion): [B, D] per modality, zeros where absent. Takes
        sample dicts or what `prepare` made of them."""
        vectors, mask, timings = self._embed(samples)
        return Embeddings(self.modalities, {m: to_numpy(v) for m, v in vectors.items()}, mask, timings)

    def audio_stream(
        self, encode: bool = True, voice: VoiceProfile | AdaptiveVoice | None = None
    ) -> AudioStream:
        """A new live audio stream sharing this pipeline's audio engine. With encode=False its frames wait for
        `polysense.inference.streaming.encode_streams([...])`, which batches many streams into one encoder call.
        voice: the speaker's profile or adaptive voice, for bundles trained with --voice-norm (as in predict;
        an adaptive voice hears the recording when its input finishes)."""
        if self._audio is None:
            raise InputError(f"this bundle has no audio encoder; it takes {', '.join(self.modalities)}")
        settings = self._description.preprocessing.of("audio")
        return AudioStream(
            self._audio,
            settings,
            self._preprocessors["audio"].frames(),  # type: ignore[attr-defined]  # an audio preprocessor's
            self._embed_one,
            self._fusion.predict_one,
            encode=encode,
            limits=self._limits,
            voice=voices.voice_for(settings.voice, voice),
        )

    def voice_profile(self, recordings: Sequence[AudioInput], sample_rate: int | None = None) -> VoiceProfile:
        """A speaker's voice profile from a few recordings of them talking (paths, encoded bytes, or sample
        arrays at `sample_rate`); what they say does not matter. For bundles trained with --voice-norm."""
        voices.bundle_voice(self._description.preprocessing, self.modalities, "a voice profile")
        if isinstance(recordings, (str, bytes, np.ndarray)) or not len(recordings):
            raise InputError("pass a non-empty list of recordings of the speaker")
        preprocess = self._preprocessors["audio"]
        return VoiceProfile.from_frames(preprocess(r, sample_rate) for r in recordings)

    def adaptive_voice(self, prior_frames: int = voices.PRIOR_FRAMES) -> AdaptiveVoice:
        """A voice (pass it as `voice=`) that learns one speaker's profile from the recordings it hears, starting
        from the bundle's average voice (worth `prior_frames` voiced frames). For bundles trained with --voice-norm."""
        average = voices.bundle_voice(self._description.preprocessing, self.modalities, "an adaptive voice")
        return AdaptiveVoice(average, prior_frames)

    def video_stream(
        self, source: VideoSource | None = None, fps: float = 5.0, window: int = 8
    ) -> VideoStream:
        """Video frames from `source` (file path, camera index, URL) or pushed with `push(frame, t)`,
        sampled at `fps`, averaged over the last `window` sampled frames."""
        if "image" not in self.modalities:
            raise InputError(f"this bundle has no image encoder; it takes {', '.join(self.modalities)}")
        return VideoStream(self._embed_one, self._fusion.predict_one, source, fps, window, self._limits)

    # -- internals -----------------------------------------------------------------------------------------

    def _session(self, bundle: Bundle, name: str, settings: SessionSettings) -> Session:
        """The component's session from the chosen variant's verified bytes, its graph checked against the
        description."""
        component = self._description.component(name)
        file = component.variant(self._precisions[name]).file
        session = Session(bundle.read(file), settings, name=file)
        check_graph(self._description, component, file, session.signature())
        return session

    def _check_sample(self, sample: object, where: str) -> dict:
        """The sample, once it is known to be a dict of this bundle's inputs; else an InputError."""
        if not isinstance(sample, dict):
            raise InputError(
                f"{where}each sample is a dict like {{'image': ..., 'text': ...}}, got {type(sample).__name__}"
            )
        unknown = [k for k in sample if k not in SAMPLE_KEYS]
        if unknown:
            raise InputError(
                f"{where}unknown input {unknown[0]!r}; the inputs are image, text, audio (and sample_rate, voice)"
            )
        given = [m for m in MODALITIES if sample.get(m) is not None]
        if not given:
            raise InputError(f"{where}no input given; pass one or more of {', '.join(self.modalities)}")
        missing = [m for m in given if m not in self.modalities]
        if missing:
            raise InputError(
                f"{where}this bundle has no {missing[0]} encoder; it takes {', '.join(self.modalities)}"
            )
        for key in ("sample_rate", "voice"):
            if sample.get(key) is not None and sample.get("audio") is None:
                raise InputError(f"{where}{key} was given without audio")
        return sample

    def _prepare(self, sample: object, where: str = "") -> Prepared:
        sample = self._check_sample(sample, where)
        features: dict[str, np.ndarray] = {}
        timings: dict[str, float] = {}
        for modality in self.modalities:
            if sample.get(modality) is None:
                continue
            tick = time.perf_counter()
            features[modality] = self._preprocessors[modality](sample[modality], sample.get("sample_rate"))
            if modality == "audio":
                voice = voices.voice_for(
                    self._description.preprocessing.of("audio").voice, sample.get("voice")
                )
                features[modality] = voices.remove_voice(voice, features[modality])
            timings[f"preprocess_{modality}"] = (time.perf_counter() - tick) * 1000
        return Prepared(features, timings)

    def _embed(
        self, samples: Sequence[dict] | Sequence[Prepared]
    ) -> tuple[dict[str, DeviceArray], np.ndarray, dict[str, float]]:
        """Embeddings per modality [B, D] (device-resident under CUDA where every row has the modality),
        the presence mask [B, M] and timings. Encoders run only for modalities some sample has."""
        if isinstance(samples, (dict, str, bytes)) or not isinstance(samples, Sequence) or not len(samples):
            raise InputError("pass a non-empty list of sample dicts")
        prepared = [
            s if isinstance(s, Prepared) else self._prepare(s, f"sample {i}: " if len(samples) > 1 else "")
            for i, s in enumerate(samples)
        ]
        timings: dict[str, float] = {}
        for item in prepared:
            for stage, ms in item.timings.items():
                timings[stage] = timings.get(stage, 0.0) + ms
        mask = np.zeros((len(prepared), len(self.modalities)), np.float32)
        vectors: dict[str, DeviceArray] = {}
        for index, modality in enumerate(self.modalities):
            present = [row for row, item in enumerate(prepared) if modality in item.features]
            mask[present, index] = 1.0
            if not present:
                vectors[modality] = np.zeros((len(prepared), self.embed_dim), np.float32)
                continue
            tick = time.perf_counter()
            encoded = self._encode(modality, [prepared[row].features[modality] for row in present])
            timings[f"encode_{modality}"] = (time.perf_counter() - tick) * 1000
            if len(present) == len(prepared):
                vectors[modality] = encoded  # may live on the device under CUDA
            else:
                vectors[modality] = np.zeros((len(prepared), self.embed_dim), np.float32)
                vectors[modality][present] = to_numpy(encoded)
        return vectors, mask, timings

    def _encode(self, modality: str, features: list[np.ndarray]) -> DeviceArray:
        """Embeddings of preprocessed inputs of one modality, batched (device-resident under CUDA)."""
        spec = SPECS[modality]
        if spec.streaming:
            assert self._audio is not None  # made in __init__ for the bundle's streaming modality
            return self._audio.encode_clips(features)
        inputs = spec.encoder_inputs(self._description.preprocessing.of(modality))
        feeds = dict(zip(inputs, spec.codec.feeds(features)))
        return self._sessions[spec.component].run(feeds)[0]

    def _embed_one(self, modality: str, value: ImageInput | str) -> np.ndarray:
        """Embedding [D] of one input of one modality (what streams use for a set image, text or frame)."""
        vectors, _, _ = self._embed([{modality: value}])
        return to_numpy(vectors[modality])[0]
