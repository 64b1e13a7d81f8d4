"""The progress of a training run: what a checkpoint must carry so that a resumed run repeats an
uninterrupted one (the weights, optimizer and schedule travel beside it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from polysense.errors import ConfigError


@dataclass
class TrainState:
    epoch: int = 0  # last finished epoch (0: none yet)
    best_score: float = -1.0  # best validation score (train.validation_score) of a monitored epoch (-1: none)
    best_epoch: int = 0  # the epoch that scored best_score, whose weights are checkpoints/best.pt
    stale_epochs: int = 0  # monitored epochs since the last improvement (early stopping counts these)
    history: list[dict] = field(default_factory=list)  # one record per epoch: phase, losses, val accuracy

    def record_epoch(self, record: dict, monitored: bool) -> bool:
        """Add an epoch's record (with "epoch", "val_accuracy" and "val_score"); True if it is the new best model."""
        self.history.append(record)
        self.epoch = record["epoch"]
        if not monitored:
            return False
        score = record.get("val_score", record["val_accuracy"])  # runs recorded before val_score had accuracy
        if score > self.best_score:
            self.best_score, self.best_epoch, self.stale_epochs = score, self.epoch, 0
            return True
        self.stale_epochs += 1
        return False

    def early_stop_due(self, patience: int) -> bool:
        """True once `patience` monitored epochs in a row brought no improvement (patience 0: never)."""
        return patience > 0 and self.stale_epochs >= patience

    def to_dict(self) -> dict:
        """Plain data (numbers, strings, lists, dicts), so checkpoints load with torch.load(weights_only=True)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**values, "history": [dict(record) for record in self.history]}

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        missing = known - set(values)
        if missing:
            raise ConfigError(
                f"a checkpoint's training state lacks {', '.join(sorted(missing))}; the checkpoint is damaged "
                "or from another version: delete it to resume from the one before, or start a new --out"
            )
        state = cls(**{k: values[k] for k in known})
        state.history = [dict(record) for record in state.history]
        return state


def validation_score(val: dict) -> float:
    """What early stopping and best-model selection maximise: validation accuracy averaged, with equal weights,
    over every non-empty subset of the model's modalities (for image+audio: both, image alone, audio alone), so a
    fused model is also chosen for how it does when modalities are absent. Monitoring the full set alone stopped AV-digits training while the audio branch
    was still learning: the fused model without its image scored 12.8 points below an audio-only model."""
    subsets = val.get("subsets") or {}
    return sum(s["accuracy"] for s in subsets.values()) / len(subsets) if subsets else val["accuracy"]
