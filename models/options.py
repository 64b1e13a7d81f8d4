"""Training options: one frozen dataclass, every conflict checked in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields

from polysense.errors import ConfigError
from polysense.modalities import check_modalities
from polysense.models.registry import ENCODERS, FUSIONS

STRATEGIES = ("joint", "staged")


@dataclass(frozen=True)
class TrainOptions:
    data: str  # manifest path (.csv / .jsonl), or "builtin" to generate the built-in set in the run folder
    out: str  # run folder: checkpoints, tokenizer, config, metrics
    modalities: tuple[str, ...] | None = None  # default: those the manifest has data for
    strategy: str = "joint"  # joint: everything end to end; staged: encoders first, then the fusion
    epochs: int = 12  # joint epochs, or fusion epochs after pre-training when staged
    pretrain_epochs: int = 4  # staged only: epochs of each encoder with its own head
    finetune_encoders: bool = False  # staged only: keep training the encoders with the fusion (else frozen)
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate of AdamW (linear warm-up, then cosine decay)
    weight_decay: float = 1e-4
    modality_dropout: float = 0.5  # share of training samples shown a random subset of their modalities
    aux_loss_weight: float = 0.5  # weight of each encoder's own loss (joint/fine-tuned fusion training)
    patience: int = 4  # stop after this many epochs without a better validation accuracy (0: never)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    image_size: int = 64  # pixels, square
    image_width: int = 24  # CNN width (channels of its first stage)
    embed_dim: int = 128
    text_encoder: str = "gru"  # gru | transformer
    fusion: str = "concat"  # concat | attention | transformer
    max_text_length: int = 64  # tokens kept per text
    builtin_n: int = 3000  # samples when data is "builtin"
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.modalities is not None:
            object.__setattr__(self, "modalities", check_modalities(self.modalities))
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"--strategy {self.strategy!r} is unknown; choose {' or '.join(STRATEGIES)}")
        for name in ("epochs", "batch_size", "image_size", "image_width", "embed_dim", "max_text_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.strategy == "staged" and self.pretrain_epochs < 1:
            problems.append("--pretrain-epochs must be at least 1 with --strategy staged")
        if self.finetune_encoders and self.strategy != "staged":
            problems.append("--finetune-encoders only applies to --strategy staged")
        if not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.patience < 0 or self.aux_loss_weight < 0:
            problems.append("--weight-decay, --patience and --aux-loss-weight cannot be negative")
        if not 0 <= self.modality_dropout <= 1:
            problems.append(f"--modality-dropout must be in [0, 1], got {self.modality_dropout}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device {self.device!r} is unknown; choose auto, cpu or cuda")
        if self.text_encoder not in ENCODERS["text"]:
            problems.append(
                f"--text-encoder {self.text_encoder!r} is unknown; choose {', '.join(ENCODERS['text'])}"
            )
        if self.fusion not in FUSIONS:
            problems.append(f"--fusion {self.fusion!r} is unknown; choose {', '.join(FUSIONS)}")
        if self.builtin_n < 12:
            problems.append(f"--n {self.builtin_n} is too small for the built-in set; use 12 or more")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["modalities"] = list(self.modalities) if self.modalities else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainOptions:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if values.get("modalities") is not None:
            values["modalities"] = tuple(values["modalities"])
        return cls(**values)
