"""The fusion head at run time: per-modality embeddings + presence mask -> probabilities -> predictions."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from polysense.bundle.schema import ComponentSpec
from polysense.errors import BundleError, InputError
from polysense.inference.sessions import DeviceArray, Session, to_numpy
from polysense.modalities import subset_key

# Rows of a batch to keep: an index array or a boolean mask (None: all).
Rows = np.ndarray | Sequence[int] | None


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


@dataclass(frozen=True)
class Prepared:
    """One sample checked and preprocessed by `Pipeline.prepare`: the encoders' inputs per present modality
    and the milliseconds each preprocessing took."""

    features: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def subset(self) -> str:
        """Its modalities as a key like 'image+text' (samples of one subset batch together best)."""
        return subset_key(self.features)


@dataclass(frozen=True)
class Embeddings:
    """What `Pipeline.embed` returns; `Pipeline.predict_batch` also takes it, to classify without encoding again.

    vectors: per modality of the bundle [B, D] float32, zeros where a sample lacks the modality;
    mask: [B, M] float32 presence, columns in the order of `modalities`; timings: ms per stage.
    """

    modalities: tuple[str, ...]
    vectors: dict[str, np.ndarray]
    mask: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def select(self, rows: Rows = None, modalities: Iterable[str] | None = None) -> Embeddings:
        """The given rows (index array or boolean mask; all when None), with only `modalities` marked present."""
        chosen = slice(None) if rows is None else rows
        mask = self.mask[chosen].copy()
        if modalities is not None:
            keep = set(modalities)
            unknown = keep - set(self.modalities)
            if unknown:
                raise InputError(
                    f"unknown modality {sorted(unknown)[0]!r}; these embeddings have {self.modalities}"
                )
            mask *= np.array([m in keep for m in self.modalities], dtype=np.float32)
        vectors = {m: v[chosen] for m, v in self.vectors.items()}
        return replace(self, vectors=vectors, mask=mask, timings={})


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class FusionHead:
    """The fusion session. Its graph takes one embedding per modality (so encoder outputs can stay on the
    device under CUDA) and the mask, named as the bundle describes them."""

    def __init__(
        self,
        session: Session,
        spec: ComponentSpec,
        modalities: tuple[str, ...],
        labels: tuple[str, ...],
        embed_dim: int,
    ) -> None:
        *embedding_inputs, mask_input = (tensor.name for tensor in spec.inputs)
        if len(embedding_inputs) != len(modalities):
            raise BundleError(
                f"the fusion graph takes {len(embedding_inputs)} embeddings for {len(modalities)} modalities; "
                "export the bundle again"
            )
        self._session = session
        self._inputs = dict(zip(modalities, embedding_inputs))
        self._mask_input = mask_input
        self.modalities = modalities
        self.labels = labels
        self.embed_dim = embed_dim

    def probabilities(self, vectors: Mapping[str, DeviceArray], mask: np.ndarray) -> np.ndarray:
        """[B, C] from per-modality embeddings [B, D] (arrays or device values) and the mask [B, M]."""
        feeds = {self._inputs[m]: vectors[m] for m in self.modalities}
        feeds[self._mask_input] = mask
        logits = to_numpy(self._session.run(feeds)[0])
        if logits.shape != (len(mask), len(self.labels)):  # a graph may declare one size and return another
            raise BundleError(
                f"the fusion graph returned logits of shape {logits.shape}, not one per label "
                f"({len(mask)}, {len(self.labels)}): it is not the graph its description vouches for; export "
                "the bundle again"
            )
        return softmax(logits)

    def predictions(
        self,
        probabilities: np.ndarray,
        vectors: Mapping[str, np.ndarray],
        mask: np.ndarray,
        timings: dict[str, float],
    ) -> list[Prediction]:
        """One Prediction per row, with the embeddings of the modalities present in that row."""
        predictions = []
        for row, probs in enumerate(probabilities):
            present = {m: vectors[m][row] for i, m in enumerate(self.modalities) if mask[row, i] > 0}
            predictions.append(
                Prediction(
                    label=self.labels[int(probs.argmax())],
                    probabilities={label: float(p) for label, p in zip(self.labels, probs)},
                    embeddings=present,
                    timings=dict(timings),
                )
            )
        return predictions

    def predict_one(self, embeddings: Mapping[str, np.ndarray | None]) -> Prediction:
        """A prediction from one embedding [D] per modality (None or missing = absent): what streams call."""
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
        zeros = np.zeros(self.embed_dim, np.float32)
        vectors = {m: present.get(m, zeros)[None] for m in self.modalities}
        probabilities = self.probabilities(vectors, mask)
        elapsed = (time.perf_counter() - start) * 1000
        return self.predictions(probabilities, vectors, mask, {"fusion": elapsed, "total": elapsed})[0]
