"""The bundle description (`bundle.json`) as frozen dataclasses: read once at the boundary, attributes after.

Export builds a `BundleDescription` and writes `to_dict()`; the runtime reads `from_dict()` once, when the bundle
is opened, and every other module uses attributes. A field that is missing or of the wrong type is a
BundleError here, not a KeyError somewhere later. Bump SCHEMA_VERSION whenever an older runtime could not read
what export now writes (or the other way round).

Naming: a *component* is one ONNX graph of a bundle (`image_encoder`, `text_encoder`, `audio_encoder`,
`fusion`); an *encoder family* is the architecture a model used for a modality (`cnn`, `gru`, ...); the *data
manifest* is the user's CSV/JSONL of samples (polysense.tools.manifest), never this file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from polysense.bundle.fields import get, items, plain_file_name, strings, typed
from polysense.bundle.settings import Preprocessing
from polysense.errors import BundleError
from polysense.modalities import SPECS, STREAMING, component_name

# 2: bundle.json with typed components, variants and streaming state (1 was manifest.json, read by hand).
SCHEMA_VERSION = 2
# An edge bundle (`polysense edge`) holds one variant per component, not necessarily fp32, in ORT format: a
# runtime that predates it must refuse it by its version rather than fail on a missing fp32 file.
EDGE_SCHEMA_VERSION = 3
DESCRIPTION_FILE = "bundle.json"
LEGACY_DESCRIPTION_FILE = "manifest.json"  # what schema 1 bundles hold instead (read as a legacy marker only)
FUSION = "fusion"  # the fusion head's component name
PRECISIONS = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph; a dynamic axis is named (e.g. "batch"), a fixed one is a size."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        shape = get(data, "shape", list, where)
        dims = tuple(typed(d, (int, str), f"{where}.shape[{i}]") for i, d in enumerate(shape))
        return cls(get(data, "name", str, where), get(data, "dtype", str, where), dims)


@dataclass(frozen=True)
class Variant:
    """One file of a component at one precision, as export kept it."""

    precision: str  # fp32 | int8 | fp16
    file: str  # a plain file name inside the bundle folder
    sha256: str
    bytes: int
    device: str = "any"  # where it is meant to run: cpu | cuda | any
    latency_ms: float | None = (
        None  # batch-1 median where it runs (CPU, or CUDA when export had CUDA), if measured
    )

    def to_dict(self) -> dict:
        values = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, "device": self.device}
        if self.latency_ms is not None:
            values["latency_ms"] = self.latency_ms
        return values

    @classmethod
    def from_dict(cls, precision: str, data: Any, where: str) -> Variant:
        if precision not in PRECISIONS:
            raise BundleError(f"{where}: unknown precision {precision!r}")
        latency = get(data, "latency_ms", (int, float), where, None)
        device = get(data, "device", str, where, "any")
        if device not in ("cpu", "cuda", "any"):
            raise BundleError(f"{where}.device: {device!r} is not cpu, cuda or any")
        return cls(
            precision,
            plain_file_name(get(data, "file", str, where), where),
            get(data, "sha256", str, where),
            get(data, "bytes", int, where),
            device,
            None if latency is None else float(latency),
        )


def _dynamic_axes(data: dict, where: str) -> dict[str, dict[int, str]]:
    """{tensor: {axis: name}} with the axes (JSON object keys) back to integers."""
    axes = {}
    for tensor, named in data.items():
        typed(named, dict, f"{where}.{tensor}")
        if not all(isinstance(a, str) and a.isdigit() for a in named):
            raise BundleError(f"{where}.{tensor}: axes must be whole numbers, got {list(named)}")
        axes[tensor] = {int(a): typed(n, str, f"{where}.{tensor}.{a}") for a, n in named.items()}
    return axes


@dataclass(frozen=True)
class ComponentSpec:
    """One graph of the bundle: its inputs and outputs, dynamic axes, and the variants kept."""

    name: str  # image_encoder | text_encoder | audio_encoder | fusion
    modality: str | None  # None for the fusion head
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_axes: dict[str, dict[int, str]]  # tensor name -> {axis: symbolic name}
    variants: dict[str, Variant]  # precision -> file; fp32 is always there
    measurements: tuple[dict, ...] = ()  # every variant tried at export, kept or not, with its numbers

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def variant(self, precision: str) -> Variant:
        if precision not in self.variants:
            raise BundleError(f"{self.name} has no {precision} variant (it has {', '.join(self.variants)})")
        return self.variants[precision]

    def to_dict(self) -> dict:
        return {
            "modality": self.modality,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
            "variants": {p: v.to_dict() for p, v in self.variants.items()},
            "measurements": list(self.measurements),
        }

    @classmethod
    def from_dict(cls, name: str, data: Any, where: str, edge: bool = False) -> ComponentSpec:
        variants = {
            precision: Variant.from_dict(precision, entry, f"{where}.variants.{precision}")
            for precision, entry in get(data, "variants", dict, where).items()
        }
        if edge and len(variants) != 1:
            raise BundleError(f"{where}: an edge bundle holds one variant per component, not {len(variants)}")
        if not edge and "fp32" not in variants:
            raise BundleError(f"{where} has no fp32 variant")
        return cls(
            name,
            get(data, "modality", (str, type(None)), where),
            items(data, "inputs", TensorSpec.from_dict, where),
            items(data, "outputs", TensorSpec.from_dict, where),
            _dynamic_axes(get(data, "dynamic_axes", dict, where), f"{where}.dynamic_axes"),
            variants,
            tuple(
                typed(m, dict, f"{where}.measurements") for m in get(data, "measurements", list, where, [])
            ),
        )


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a streaming encoder's state: graph input `name`, output `name` + "_out"."""

    name: str
    shape: tuple[int, ...]  # with a batch of one
    batch_axis: int  # the axis along which the states of several streams are stacked

    @property
    def output_name(self) -> str:
        return f"{self.name}_out"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "batch_axis": self.batch_axis}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StateTensor:
        shape = tuple(typed(d, int, f"{where}.shape") for d in get(data, "shape", list, where))
        axis = get(data, "batch_axis", int, where)
        if not 0 <= axis < len(shape) or shape[axis] != 1:
            raise BundleError(f"{where}: batch_axis {axis} does not index a size-1 axis of shape {shape}")
        return cls(get(data, "name", str, where), shape, axis)


@dataclass(frozen=True)
class AudioStreaming:
    """How the causal audio encoder streams: any number of new frames makes a step, state carried along."""

    state: tuple[StateTensor, ...]  # zeros start a recording
    frames_per_second: float
    min_frames_per_step: int = 1  # a causal encoder with no look-ahead takes any number of new frames
    lookahead_frames: int = 0

    def to_dict(self) -> dict:
        return {
            "state": [s.to_dict() for s in self.state],
            "frames_per_second": self.frames_per_second,
            "min_frames_per_step": self.min_frames_per_step,
            "lookahead_frames": self.lookahead_frames,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> AudioStreaming:
        return cls(
            items(data, "state", StateTensor.from_dict, where),
            float(get(data, "frames_per_second", (int, float), where)),
            get(data, "min_frames_per_step", int, where, 1),
            get(data, "lookahead_frames", int, where, 0),
        )


def _streaming_from_dict(streaming: dict, where: str) -> AudioStreaming | None:
    unknown = [m for m in streaming if m not in STREAMING]
    if unknown:
        raise BundleError(f"{where}.streaming: {unknown[0]!r} is not a streaming modality")
    entries = [AudioStreaming.from_dict(v, f"{where}.streaming.{m}") for m, v in streaming.items()]
    return entries[0] if entries else None


@dataclass(frozen=True)
class TrainingPrivacy:
    """How the model was trained under differential privacy (`polysense train --dp-epsilon`): the training rows
    are protected at (epsilon, delta), epsilon as the accountant counted every step taken."""

    epsilon: float  # spent
    delta: float
    max_grad_norm: float  # each training row's gradient clipped to this L2 norm
    accountant: str  # prv | rdp (opacus's accountants)
    noise_multiplier: float  # Gaussian noise std / max_grad_norm
    target_epsilon: float  # asked for (--dp-epsilon); epsilon is at most this when every planned step ran
    sample_rate: float  # each row's chance to be in a step's batch (Poisson sampling)
    steps: int

    _FLOATS = ("epsilon", "delta", "max_grad_norm", "noise_multiplier", "target_epsilon", "sample_rate")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in (*self._FLOATS, "accountant", "steps")}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TrainingPrivacy:
        values = {name: float(get(data, name, (int, float), where)) for name in cls._FLOATS}
        if not 0 < values["delta"] < 1 or min(values.values()) < 0:
            raise BundleError(f"{where}: delta must be in (0, 1) and every number at least 0, got {values}")
        return cls(
            accountant=get(data, "accountant", str, where), steps=get(data, "steps", int, where), **values
        )


@dataclass(frozen=True)
class BundleDescription:
    """Everything a bundle says about itself (bundle.json)."""

    labels: tuple[str, ...]
    modalities: tuple[str, ...]  # canonical order: image, text, audio
    embed_dim: int  # every encoder's output size
    components: dict[str, ComponentSpec]  # the encoders in modality order, then the fusion head
    preprocessing: Preprocessing
    streaming: AudioStreaming | None = None  # present when the bundle has an audio encoder
    metrics: dict = field(default_factory=dict)  # measured at export (test accuracy, parity)
    producer: dict = field(default_factory=dict)  # versions of what made the bundle
    schema_version: int = SCHEMA_VERSION  # EDGE_SCHEMA_VERSION for an edge bundle
    privacy: TrainingPrivacy | None = None  # trained under differential privacy (older runtimes ignore it)

    @property
    def is_edge(self) -> bool:
        """One variant per component, in ORT format (polysense.tools.edge)."""
        return self.schema_version == EDGE_SCHEMA_VERSION

    def component(self, name: str) -> ComponentSpec:
        if name not in self.components:
            raise BundleError(f"this bundle has no {name}; it has {', '.join(self.components)}")
        return self.components[name]

    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256) of every file the description vouches for."""
        files = [(v.file, v.sha256) for c in self.components.values() for v in c.variants.values()]
        return files + self.preprocessing.files()

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "labels": list(self.labels),
            "modalities": list(self.modalities),
            "embed_dim": self.embed_dim,
            "components": {name: c.to_dict() for name, c in self.components.items()},
            "preprocessing": self.preprocessing.to_dict(),
            "streaming": {
                m: self.streaming.to_dict()
                for m in self.modalities
                if m in STREAMING and self.streaming is not None  # present exactly then (check)
            },
            "metrics": self.metrics,
            "producer": self.producer,
            **({"privacy": self.privacy.to_dict()} if self.privacy is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> BundleDescription:
        where = DESCRIPTION_FILE
        version = get(data, "schema_version", int, where)
        if version not in (SCHEMA_VERSION, EDGE_SCHEMA_VERSION):
            raise BundleError(
                f"bundle schema version {version}, but this polysense reads versions {SCHEMA_VERSION} and "
                f"{EDGE_SCHEMA_VERSION} (edge) (for a newer bundle, use the polysense version that made it)"
            )
        components = {
            name: ComponentSpec.from_dict(
                name, entry, f"{where}.components.{name}", edge=version == EDGE_SCHEMA_VERSION
            )
            for name, entry in get(data, "components", dict, where).items()
        }
        streaming = get(data, "streaming", dict, where, {})
        privacy = get(data, "privacy", dict, where, None)
        description = cls(
            strings(get(data, "labels", list, where), f"{where}.labels"),
            strings(get(data, "modalities", list, where), f"{where}.modalities"),
            get(data, "embed_dim", int, where),
            components,
            Preprocessing.from_dict(get(data, "preprocessing", dict, where)),
            _streaming_from_dict(streaming, where),
            get(data, "metrics", dict, where, {}),
            get(data, "producer", dict, where, {}),
            version,
            None if privacy is None else TrainingPrivacy.from_dict(privacy, f"{where}.privacy"),
        )
        description.check()
        return description

    def check(self) -> None:
        """Cross-field consistency: a component per modality and a fusion head, settings and state present."""
        if not self.labels:
            raise BundleError(f"{DESCRIPTION_FILE} lists no labels")
        label, count = Counter(self.labels).most_common(1)[0]
        if count > 1:
            raise BundleError(
                f"{DESCRIPTION_FILE}: label {label!r} is listed {count} times; each label names one output of "
                "the fusion head, so every label must be different"
            )
        expected = [component_name(m) for m in self.modalities] + [FUSION]
        if sorted(self.components) != sorted(expected):
            raise BundleError(
                f"{DESCRIPTION_FILE} has components {', '.join(self.components)} but its modalities "
                f"({', '.join(self.modalities)}) need {', '.join(expected)}"
            )
        self._check_logits()
        for modality in self.modalities:
            self._check_encoder_inputs(modality)
        streaming = [m for m in self.modalities if m in STREAMING]
        if bool(streaming) != (self.streaming is not None):
            raise BundleError(
                f"{DESCRIPTION_FILE}: the streaming state must be there exactly when a streaming encoder is "
                f"({', '.join(streaming) or 'none here'})"
            )
        state = self.streaming.state if self.streaming is not None else ()
        for modality in streaming:
            component = self.components[component_name(modality)]
            names = {t.name for t in component.inputs} | {t.name for t in component.outputs}
            missing = [n for t in state for n in (t.name, t.output_name) if n not in names]
            if missing:
                raise BundleError(f"{DESCRIPTION_FILE}: {component.name} has no state tensor {missing[0]!r}")

    def _check_encoder_inputs(self, modality: str) -> None:
        """An encoder takes what its preprocessing gives (token ids, or a frozen encoder's vectors), in order;
        a streaming one its state after that."""
        spec = SPECS[modality]
        expected = spec.encoder_inputs(self.preprocessing.of(modality))
        component = self.components[spec.component]
        declared = tuple(t.name for t in component.inputs)[: len(expected)]
        if declared != expected:
            raise BundleError(
                f"{DESCRIPTION_FILE}: {component.name} takes {', '.join(declared) or 'nothing'}, but its "
                f"preprocessing gives {', '.join(expected)}"
            )

    def _check_logits(self) -> None:
        """The fusion head's first output must be [batch, one logit per label]: the probabilities are read
        under the labels one to one, in order."""
        outputs = self.components[FUSION].outputs
        shape = outputs[0].shape if outputs else ()
        if len(shape) != 2 or shape[1] != len(self.labels):
            raise BundleError(
                f"{DESCRIPTION_FILE}: the fusion head's output has shape {list(shape)}, but its "
                f"{len(self.labels)} labels need [batch, {len(self.labels)}]: one logit per label"
            )
