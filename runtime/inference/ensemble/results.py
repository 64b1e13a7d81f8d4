"""What an Ensemble's members made of the same samples, and how their predictions become one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from polysense.inference.fusion import Embeddings, Prediction, Prepared, Rows


@dataclass(frozen=True)
class EnsemblePrepared:
    """One sample as `Ensemble.prepare` made it: what each member's own preprocessing made of it."""

    members: tuple[Prepared, ...]

    @property
    def subset(self) -> str:
        """Its modalities as a key like 'image+text' (see Prepared.subset)."""
        return self.members[0].subset

    @property
    def timings(self) -> dict[str, float]:
        """The members' preprocessing, ms per stage added up."""
        return summed_timings(p.timings for p in self.members)


@dataclass(frozen=True)
class EnsembleEmbeddings:
    """What `Ensemble.embed` returns (each member's Embeddings of the same samples); `Ensemble.predict_batch`
    takes it, narrowed with `select` as Embeddings are."""

    members: tuple[Embeddings, ...]

    def __len__(self) -> int:
        return len(self.members[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.members[0].modalities

    @property
    def mask(self) -> np.ndarray:
        """[B, M] presence, the same for every member."""
        return self.members[0].mask

    @property
    def timings(self) -> dict[str, float]:
        return summed_timings(e.timings for e in self.members)

    def select(self, rows: Rows = None, modalities: Iterable[str] | None = None) -> EnsembleEmbeddings:
        """The given rows, with only `modalities` marked present (see Embeddings.select)."""
        return EnsembleEmbeddings(tuple(e.select(rows, modalities) for e in self.members))


def combine_predictions(
    predictions: Sequence[Prediction], labels: Sequence[str], total_ms: float
) -> Prediction:
    """The members' predictions of one sample as one: probabilities averaged by label name (members may order
    their labels differently), each modality's embeddings stacked ([members, embed_dim]), stages added up."""
    probabilities = np.mean([[p.probabilities[label] for label in labels] for p in predictions], axis=0)
    embeddings = {m: np.stack([p.embeddings[m] for p in predictions]) for m in predictions[0].embeddings}
    return Prediction(
        label=labels[int(probabilities.argmax())],
        probabilities={label: float(p) for label, p in zip(labels, probabilities)},
        embeddings=embeddings,
        timings={**summed_timings(p.timings for p in predictions), "total": total_ms},
    )


def summed_timings(timings: Iterable[dict[str, float]]) -> dict[str, float]:
    """Milliseconds per stage added up over the members (their own totals left out)."""
    summed: dict[str, float] = {}
    for stages in timings:
        for stage, ms in stages.items():
            if stage != "total":
                summed[stage] = summed.get(stage, 0.0) + ms
    return summed
