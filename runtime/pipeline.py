"""The runtime pipeline: preprocess -> one encoder session per present modality -> fusion -> probabilities."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polysense.audio import AudioPreprocessor
from polysense.bundle import FUSION, Bundle, encoder_name, open_bundle
from polysense.errors import InputError
from polysense.image import ImagePreprocessor
from polysense.precision import choose_precisions
from polysense.sessions import Session, SessionSettings, to_numpy
from polysense.streaming import AudioStream, VideoStream
from polysense.text import TextPreprocessor, pad_token_ids

SAMPLE_KEYS = ("image", "text", "audio", "sample_rate")


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # every label, summing to 1
    embeddings: dict[str, np.ndarray]  # per present modality, [embed_dim] float32
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage (of the whole batch)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "timings_ms": self.timings,
            "modalities": list(self.embeddings),
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Pipeline:
    """Load once, predict many times. Not thread-safe per instance; make one per thread if needed."""

    def __init__(
        self, bundle: Bundle, settings: SessionSettings, precision: str | dict[str, str] = "auto"
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.labels: list[str] = list(bundle.labels)
        self.modalities: tuple[str, ...] = bundle.modalities
        self.embed_dim: int = bundle.manifest["embed_dim"]
        pre = bundle.preprocessing
        self.preprocessors: dict[str, Any] = {}
        if "image" in self.modalities:
            image = pre["image"]
            self.preprocessors["image"] = ImagePreprocessor(
                image["size"], tuple(image["mean"]), tuple(image["std"])
            )
        if "text" in self.modalities:
            text = pre["text"]
            self.preprocessors["text"] = TextPreprocessor(bundle.path / text["tokenizer"], text["max_length"])
        if "audio" in self.modalities:
            self.preprocessors["audio"] = AudioPreprocessor(**pre["audio"])
        names = [*(encoder_name(m) for m in self.modalities), FUSION]
        self.precisions: dict[str, str] = choose_precisions(bundle, names, settings.device, precision)
        sessions = {name: Session(bundle.file(name, self.precisions[name]), settings) for name in names}
        self.sessions = {m: sessions[encoder_name(m)] for m in self.modalities}
        self.sessions[FUSION] = sessions[FUSION]
        if "audio" in self.modalities:
            state = bundle.manifest["streaming"]["audio"]["state"]
            self._audio_state = {name: np.array(shape) for name, shape in state.items()}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        precision: str | dict[str, str] = "auto",
        intra_op_threads: int = 0,
    ) -> Pipeline:
        """Open and verify the bundle at `path`, create one session per component on `device`.

        precision: "auto" takes per component the fastest variant the bundle kept for the device (int8 on CPU,
        fp16 on CUDA, where they passed export's accuracy and speed checks; else fp32); "fp32", "int8" or
        "fp16" forces one wherever the bundle has it (a warning names components that lack it); a dict
        {component: precision} sets components one by one (the others auto).
        """
        settings = SessionSettings(device=device, intra_op_threads=intra_op_threads)
        return cls(open_bundle(path), settings, precision)

    @property
    def providers(self) -> dict[str, str]:
        """The execution provider each component actually runs on."""
        return {name: session.provider for name, session in self.sessions.items()}

    # -- preprocessing -------------------------------------------------------------------------------------

    def preprocess(self, modality: str, value: Any, sample_rate: int | None = None) -> np.ndarray:
        """The runtime's preprocessing of one input (the same code training used)."""
        if modality == "audio":
            return self.preprocessors["audio"](value, sample_rate=sample_rate)
        return self.preprocessors[modality](value)

    def _check_sample(self, sample: dict, index: int | None = None) -> None:
        where = "" if index is None else f"sample {index}: "
        if not isinstance(sample, dict):
            raise InputError(
                f"{where}each sample is a dict like {{'image': ..., 'text': ...}}, got {type(sample).__name__}"
            )
        unknown = [k for k in sample if k not in SAMPLE_KEYS]
        if unknown:
            raise InputError(
                f"{where}unknown input {unknown[0]!r}; the inputs are image, text, audio (and sample_rate)"
            )
        given = [m for m in ("image", "text", "audio") if sample.get(m) is not None]
        if not given:
            raise InputError(f"{where}no input given; pass one or more of {', '.join(self.modalities)}")
        missing = [m for m in given if m not in self.modalities]
        if missing:
            raise InputError(
                f"{where}this bundle has no {missing[0]} encoder; it takes {', '.join(self.modalities)}"
            )
        if sample.get("sample_rate") is not None and sample.get("audio") is None:
            raise InputError(f"{where}sample_rate was given without audio")

    # -- inference -----------------------------------------------------------------------------------------

    def predict(
        self,
        image: Any = None,
        text: str | None = None,
        audio: Any = None,
        *,
        sample_rate: int | None = None,
        **unknown: Any,
    ) -> Prediction:
        """Predict from any non-empty subset of the bundle's modalities; only their encoders run.

        image: path, encoded bytes or an HxWxC uint8 RGB array; text: a str (longer texts are truncated to the
        bundle's max_length tokens); audio: path, encoded bytes or a sample array with `sample_rate`.
        """
        if unknown:
            raise InputError(
                f"unknown keyword {next(iter(unknown))!r}; predict takes image=, text=, audio= and sample_rate="
            )
        sample = {"image": image, "text": text, "audio": audio, "sample_rate": sample_rate}
        return self.predict_batch([{k: v for k, v in sample.items() if v is not None}])[0]

    def predict_batch(self, samples: Sequence[dict]) -> list[Prediction]:
        """Predict many samples at once; each is a dict with some of image, text, audio (+ sample_rate)."""
        if isinstance(samples, dict) or not len(samples):
            raise InputError("predict_batch takes a non-empty list of sample dicts")
        start = time.perf_counter()
        embeddings, mask, timings = self.embed(samples)
        tick = time.perf_counter()
        probabilities = self.fuse(embeddings, mask)
        timings["fusion"] = (time.perf_counter() - tick) * 1000
        host = {m: to_numpy(e) for m, e in embeddings.items()}
        timings["total"] = (time.perf_counter() - start) * 1000
        predictions = []
        for row, probs in enumerate(probabilities):
            present = {m: host[m][row] for i, m in enumerate(self.modalities) if mask[row, i] > 0}
            predictions.append(
                Prediction(
                    label=self.labels[int(probs.argmax())],
                    probabilities={label: float(p) for label, p in zip(self.labels, probs)},
                    embeddings=present,
                    timings=dict(timings),
                )
            )
        return predictions

    def embed(self, samples: Sequence[dict]) -> tuple[dict[str, Any], np.ndarray, dict[str, float]]:
        """Embeddings per modality [B, D] (zeros where a sample lacks it), the presence mask [B, M] and
        timings. Encoders run only for modalities some sample has."""
        for index, sample in enumerate(samples):
            self._check_sample(sample, index if len(samples) > 1 else None)
        features: dict[str, list[np.ndarray | None]] = {}
        timings: dict[str, float] = {}
        for modality in self.modalities:
            if not any(s.get(modality) is not None for s in samples):
                continue
            tick = time.perf_counter()
            features[modality] = [
                None
                if s.get(modality) is None
                else self.preprocess(modality, s[modality], s.get("sample_rate"))
                for s in samples
            ]
            timings[f"preprocess_{modality}"] = (time.perf_counter() - tick) * 1000
        embeddings, mask, encode_timings = self.embed_features(features, len(samples))
        return embeddings, mask, {**timings, **encode_timings}

    def embed_features(
        self, features: dict[str, list[np.ndarray | None]], rows: int
    ) -> tuple[dict[str, Any], np.ndarray, dict[str, float]]:
        """Like embed() for already preprocessed inputs: per modality a list of `rows` features (None = absent)."""
        mask = np.zeros((rows, len(self.modalities)), np.float32)
        embeddings: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for column, modality in enumerate(self.modalities):
            values = features.get(modality, [None] * rows)
            present = [i for i in range(rows) if values[i] is not None]
            mask[present, column] = 1.0
            if not present:
                embeddings[modality] = np.zeros((rows, self.embed_dim), np.float32)
                continue
            tick = time.perf_counter()
            encoded = self.encode(modality, [values[i] for i in present])
            timings[f"encode_{modality}"] = (time.perf_counter() - tick) * 1000
            if len(present) == rows:
                embeddings[modality] = encoded  # may live on the device under CUDA
            else:
                full = np.zeros((rows, self.embed_dim), np.float32)
                full[present] = to_numpy(encoded)
                embeddings[modality] = full
        return embeddings, mask, timings

    def encode(self, modality: str, features: list[np.ndarray]) -> Any:
        """Embeddings of preprocessed inputs of one modality, batched (device-resident under CUDA)."""
        session = self.sessions[modality]
        if modality == "image":
            return session.run({"image": np.stack(features)})[0]
        if modality == "text":
            ids, mask = pad_token_ids(features)
            return session.run({"ids": ids, "mask": mask})[0]
        return self._encode_audio(features)

    def _encode_audio(self, features: list[np.ndarray]) -> np.ndarray:
        """Audio clips of equal frame count run as one batch from the zero state; others in their own runs
        (padding would enter the causal state)."""
        session = self.sessions["audio"]
        out = np.zeros((len(features), self.embed_dim), np.float32)
        by_length: dict[int, list[int]] = {}
        for index, frames in enumerate(features):
            by_length.setdefault(frames.shape[0], []).append(index)
        for indices in by_length.values():
            feeds = {"frames": np.stack([features[i] for i in indices])}
            feeds.update(self.initial_audio_state(len(indices)))
            out[indices] = to_numpy(session.run(feeds)[0])
        return out

    def initial_audio_state(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """Zero state tensors for `batch_size` recordings (gru_hidden has its batch on axis 1)."""
        state = {}
        for name, shape in self._audio_state.items():
            shape = list(shape)
            shape[1 if name == "gru_hidden" else 0] = batch_size
            state[name] = np.zeros(shape, np.float32)
        return state

    def embed_one(self, modality: str, value: Any, sample_rate: int | None = None) -> np.ndarray:
        """Embedding [D] of one input of one modality."""
        sample = {modality: value}
        if sample_rate is not None:
            sample["sample_rate"] = sample_rate
        embeddings, _, _ = self.embed([sample])
        return to_numpy(embeddings[modality])[0]

    def fuse_embeddings(self, embeddings: dict[str, np.ndarray | None]) -> Prediction:
        """A prediction from one embedding [D] per modality (None or missing = absent)."""
        present = {m: e for m, e in embeddings.items() if e is not None}
        unknown = [m for m in present if m not in self.modalities]
        if unknown:
            raise InputError(
                f"this bundle has no {unknown[0]} encoder; it takes {', '.join(self.modalities)}"
            )
        if not present:
            raise InputError("nothing to fuse yet: no audio frame, image or text so far")
        start = time.perf_counter()
        mask = np.array([[float(m in present) for m in self.modalities]], dtype=np.float32)
        batch = {m: present.get(m, np.zeros(self.embed_dim, np.float32))[None] for m in self.modalities}
        probabilities = self.fuse(batch, mask)[0]
        elapsed = (time.perf_counter() - start) * 1000
        return Prediction(
            label=self.labels[int(probabilities.argmax())],
            probabilities={label: float(p) for label, p in zip(self.labels, probabilities)},
            embeddings={m: present[m] for m in self.modalities if m in present},
            timings={"fusion": elapsed, "total": elapsed},
        )

    def audio_stream(self, encode: bool = True) -> AudioStream:
        """A new live audio stream sharing this pipeline's sessions. With encode=False its frames wait for
        `polysense.streaming.encode_streams([...])`, which batches many streams into one encoder call."""
        return AudioStream(self, encode=encode)

    def video_stream(self, source: Any = None, fps: float = 5.0, window: int = 8) -> VideoStream:
        """Video frames from `source` (file path, camera index, URL) or pushed with `push(frame, t)`,
        sampled at `fps`, averaged over the last `window` sampled frames."""
        return VideoStream(self, source, fps, window)

    def fuse(self, embeddings: dict[str, Any], mask: np.ndarray) -> np.ndarray:
        """Probabilities [B, C] from per-modality embeddings and the presence mask."""
        feeds = {f"embedding_{m}": embeddings[m] for m in self.modalities}
        feeds["mask"] = mask
        return _softmax(to_numpy(self.sessions[FUSION].run(feeds)[0]))
