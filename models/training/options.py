"""Training options: one frozen dataclass, every conflict checked in one place.

Each field's help (declared with flags.option, kept in the field's metadata) documents it and is the help text
of its `polysense train` flag, which polysense.models.training.flags generates from this class: every field
needs one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from polysense.errors import ConfigError
from polysense.inference.sessions import DEVICES
from polysense.modalities import MODALITIES, check_modalities
from polysense.models.registry import ENCODERS, FUSIONS, FamilyNames, family_defaults, family_takes
from polysense.models.training.flags import flag_name, option

STRATEGIES = ("joint", "staged", "frozen", "alternating")
DP_ACCOUNTANTS = ("prv", "rdp")  # polysense.models.training.privacy.ACCOUNTANTS
KEEP = ("best", "last")
AUDIO_NOISE = ("none", "light", "strong")  # polysense.models.training.augment.NOISE_LEVELS
DEFAULT_EPOCHS = 12
DEFAULT_IMAGE_SIZE = 64
DEFAULT_AUDIO_NORM_FRAMES = 20
# What config.json recorded for "the families decide" before None said it (older versions): read as None.
OLD_SENTINELS = {
    "epochs": 0,
    "pretrain_epochs": 0,
    "solo_epochs": -1,
    "pretrained_lr": 0.0,
    "label_smoothing": -1.0,
    "keep": "",
    "image_size": 0,
}
# Fields that must be at least 1.
_POSITIVE_INTS = ("batch_size", "accumulate", "image_size", "image_width", "embed_dim", "max_text_length")


@dataclass(frozen=True)
class TrainOptions:
    """What a training run does. An option left at None is decided by the chosen encoder families (or by the
    data's modalities), in _resolve_family_defaults, so a run's config.json records the numbers used."""

    data: str = option(
        help='manifest (.csv / .jsonl), or "builtin" to generate the built-in set in the run folder'
    )
    out: str = option(help="run folder for checkpoints, tokenizer, config and metrics")
    modalities: tuple[str, ...] | None = option(
        None, help="subset to train, e.g. image,audio (default: all in the data)"
    )
    strategy: str = option(
        "joint", help="joint, staged, frozen (pretrained layers fixed), alternating (encoders|fusion)"
    )
    epochs: int | None = option(
        None,
        help="joint (or staged fusion) epochs (default: 12, or a pretrained family's own: minilm-l6 3, "
        "efficientnet-lite0 4 for images and 8 for audio)",
    )
    pretrain_epochs: int | None = option(
        None,
        help="staged only: epochs of each encoder with its own head (default: as many as --epochs, late fusion)",
    )
    solo_epochs: int | None = option(
        None,
        help="epochs encoders from random weights train alone first "
        "(default: 12 minus a pretrained family's --epochs, else 0)",
    )
    finetune_encoders: bool = option(
        False, help="staged only: keep training the encoders with the fusion (else frozen)"
    )
    batch_size: int = option(
        64, help="training samples per optimizer step, over all processes and micro-batches"
    )
    accumulate: int = option(
        1, help="micro-batches per optimizer step (gradient accumulation: less memory, same batch)"
    )
    lr: float = option(3e-3, help="peak learning rate of AdamW (linear warm-up, then cosine decay)")
    pretrained_lr: float | None = option(
        None,
        help="peak learning rate of pretrained layers (default: the family's own, minilm-l6 5e-5, "
        "efficientnet-lite0 3e-4)",
    )
    from_scratch: bool = option(
        False,
        help="start families with pretrained weights (minilm-l6, efficientnet-lite0) from random weights",
    )
    weight_decay: float = option(1e-4, help="AdamW's decoupled weight decay")
    augment: bool = option(
        True,
        help="perturb training audio (tempo, vocal tract, gain, noise, masks) and images",
        flag="--no-augment",
    )
    audio_noise: str = option(
        "light", help="noise added to training audio: light, strong (for --voice-norm) or none"
    )
    modality_dropout: float = option(
        0.5, help="share of training samples shown a random subset of their modalities"
    )
    aux_loss_weight: float = option(0.5, help="weight of each encoder's own loss (0: the fusion's loss only)")
    label_smoothing: float | None = option(
        None,
        help="share of each target spread over all classes, 0: off "
        "(default: 0.1 for efficientnet-lite0 trained alone, else 0)",
    )
    patience: int = option(
        4, help="stop after this many epochs without a better validation accuracy (0: never)"
    )
    keep: str | None = option(
        None,
        help="end with the best validation epoch (best) or the last (default: the family's choice, else best)",
    )
    seed: int = option(
        0, help="seeds the split, the weights and each epoch's draws: the same seed gives the same run"
    )
    device: str = option("auto", help="where to train (auto: CUDA when torch sees a device, else CPU)")
    image_size: int | None = option(
        None, help="pixels, square (default: 64, or the image family's own: efficientnet-lite0 192)"
    )
    image_width: int = option(24, help="CNN width (channels of its first stage)")
    embed_dim: int = option(128, help="size of each encoder's embedding")
    image_encoder: str = option("cnn", help="image encoder family")
    text_encoder: str = option("gru", help="text encoder family")
    audio_encoder: str = option("causal", help="audio encoder family")
    fusion: str = option("concat", help="fusion head over the encoders' embeddings")
    audio_norm_frames: int = option(
        DEFAULT_AUDIO_NORM_FRAMES, help="causal audio encoder: running mean's prior, frames (0: off)"
    )
    voice_norm: bool = option(
        False,
        help="remove each speaker's voice from their audio "
        "(needs a speaker column; polysense.preprocess.voice)",
    )
    max_text_length: int = option(64, help="tokens kept per text")
    dp_epsilon: float = option(
        0.0,
        help="train with differential privacy (DP-SGD, opacus: the dp extra), spending at most this epsilon "
        "over the planned epochs (0: off)",
    )
    dp_delta: float | None = option(
        None, help="--dp-epsilon's delta (default: 1e-5, or 1 / (10 x training rows) when smaller)"
    )
    dp_max_grad_norm: float = option(
        1.0, help="--dp-epsilon: each training row's gradient is clipped to this L2 norm"
    )
    dp_accountant: str = option(
        "prv", help="--dp-epsilon: how the privacy spent is counted, prv or rdp (opacus's accountants)"
    )
    builtin_n: int = option(3000, help='samples when data is "builtin"', flag="--n")
    allow_leakage: bool = option(
        False,
        help="train even though test samples (or over 1% of val samples) repeat training samples exactly; "
        "without it such a run is refused (polysense data check MANIFEST lists them)",
    )
    progress: bool = option(True, help="progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        if self.modalities is not None:
            object.__setattr__(self, "modalities", check_modalities(self.modalities))
        self._resolve_family_defaults()
        problems = [
            f"{flag(name)} {getattr(self, name)!r} is unknown; choose {_one_of(allowed)}"
            for name, allowed in option_choices().items()
            if getattr(self, name) not in allowed
        ]
        problems += [
            f"{flag(name)} must be at least 1, got {getattr(self, name)}"
            for name in _POSITIVE_INTS
            if getattr(self, name) < 1
        ]
        if self.strategy == "staged" and self.pretrain_epochs < 1:
            problems.append(f"{flag('pretrain_epochs')} must be at least 1 with --strategy staged")
        if self.finetune_encoders and self.strategy != "staged":
            problems.append(f"{flag('finetune_encoders')} only applies to --strategy staged")
        if not self.lr > 0 or not self.pretrained_lr > 0:
            problems.append(f"{flag('lr')} and {flag('pretrained_lr')} must be positive")
        if self.epochs < 1:
            problems.append(
                f"{flag('epochs')} must be at least 1, got {self.epochs} (leave it out for the families' own)"
            )
        if self.pretrain_epochs < 0:
            problems.append(f"{flag('pretrain_epochs')} cannot be negative, got {self.pretrain_epochs}")
        if self.solo_epochs < 0:
            problems.append(
                f"{flag('solo_epochs')} must be 0 or more (leave it out to have the families decide)"
            )
        if min(self.weight_decay, self.patience, self.aux_loss_weight, self.audio_norm_frames) < 0:
            problems.append(
                "--weight-decay, --patience, --aux-loss-weight and --audio-norm-frames cannot be negative"
            )
        if self.audio_norm_frames != DEFAULT_AUDIO_NORM_FRAMES and self.family_ignores(
            "audio", "audio_norm_frames"
        ):
            problems.append(
                f"{flag('audio_norm_frames')} only applies to an audio family that takes it (causal); "
                f"--audio-encoder {self.audio_encoder} has its own normalisation"
            )
        if self.audio_noise != "light" and not self.augment:
            problems.append(
                f"{flag('audio_noise')} is part of the augmentation, which --no-augment turns off"
            )
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            problems.append(f"{flag('label_smoothing')} must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.modality_dropout <= 1:
            problems.append(f"{flag('modality_dropout')} must be in [0, 1], got {self.modality_dropout}")
        if self.builtin_n < 12:
            problems.append(
                f"{flag('builtin_n')} {self.builtin_n} is too small for the built-in set; use 12 or more"
            )
        problems += self._privacy_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _privacy_problems(self) -> list[str]:
        """What --dp-epsilon cannot train with (polysense.models.training.privacy)."""
        dp_flags = ("dp_delta", "dp_max_grad_norm", "dp_accountant")
        if not self.dp_epsilon:
            changed = [flag(n) for n in dp_flags if getattr(self, n) != _DEFAULTS[n]]
            verb = "applies" if len(changed) == 1 else "apply"
            return [f"{', '.join(changed)} only {verb} with --dp-epsilon"] if changed else []
        problems = [] if self.dp_epsilon > 0 else [f"{flag('dp_epsilon')} must be positive (0: off)"]
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            problems.append(f"{flag('dp_delta')} must be in (0, 1), got {self.dp_delta}")
        if not self.dp_max_grad_norm > 0:
            problems.append(f"{flag('dp_max_grad_norm')} must be positive, got {self.dp_max_grad_norm}")
        if self.accumulate != 1:
            problems.append(
                "--dp-epsilon computes every row's gradient of a whole batch at once: leave --accumulate at 1"
            )
        if self.strategy == "alternating":
            problems.append(
                "--dp-epsilon cannot train --strategy alternating (each step would add noise to the half of "
                "the model it does not train); use joint, staged or frozen"
            )
        if self.voice_norm:
            problems.append(
                "--dp-epsilon cannot train with --voice-norm: the bundle keeps the training speakers' average "
                "voice, a statistic of the training rows outside the privacy accounting"
            )
        # The families are checked by prepare_data, once the data has decided the modalities (privacy.py).
        return problems

    def _resolve_family_defaults(self) -> None:
        """None for epochs, pretrained_lr, image_size or keep means: what the chosen families ask for (a
        pretrained one: few epochs, a small learning rate, maybe its last epoch; an image family: its
        resolution), else the general default; for pretrain_epochs, as many as epochs (staged; other
        strategies have no such phase: 0); for solo_epochs, what encoders without pretrained weights need on
        top of a pretrained family's epochs; for label_smoothing, what the trained modalities' families ask
        for (settled by for_data_modalities when the data decides them). Resolved here, so a run's config
        records the numbers."""
        # Only the families of the modalities trained (all when the data decides) ask for anything.
        scratch = self.scratch_modalities()
        used = self.modalities or MODALITIES
        pretrained = [family_defaults(m, self.encoder(m)) for m in used if m not in scratch]
        if self.image_size is None:
            size = family_defaults("image", self.image_encoder).get("image_size", DEFAULT_IMAGE_SIZE)
            object.__setattr__(self, "image_size", size)
        family_sets_epochs = self.epochs is None and bool(pretrained)
        if self.epochs is None:
            epochs = min((d["epochs"] for d in pretrained), default=DEFAULT_EPOCHS)
            object.__setattr__(self, "epochs", epochs)
        if self.solo_epochs is None:
            # The few epochs a pretrained family asks for are too few for an encoder learning from random
            # weights beside it (AV-digits: the causal audio encoder alone 0.61 after 4). Such encoders first
            # train alone, with their own heads, up to the general default; each costs little next to the
            # pretrained one, which waits.
            solo = DEFAULT_EPOCHS - self.epochs if family_sets_epochs and scratch else 0
            object.__setattr__(self, "solo_epochs", max(solo, 0))
        if self.keep is None:
            # A family whose validation split saturates early asks for its last epoch (efficientnet-lite0
            # on AV-digits: 1.0 from epoch 3 of 4, and "best" keeps the first such, not yet annealed).
            wanted = {d.get("keep", "best") for d in pretrained}
            object.__setattr__(self, "keep", "last" if "last" in wanted else "best")
        if self.pretrained_lr is None:
            lr = min((d["pretrained_lr"] for d in pretrained), default=self.lr)
            object.__setattr__(self, "pretrained_lr", lr)
        asked = self._label_smoothing_asked(used)
        if self.label_smoothing is None and (self.modalities is not None or not any(asked)):
            # Otherwise the data decides the modalities, and for_data_modalities settles it.
            object.__setattr__(self, "label_smoothing", min(asked))
        if self.pretrain_epochs is None:
            # Each encoder learns alone as long as a unimodal model would, so once frozen under the fusion it
            # is that model: with one modality missing, the fused model is as good as the unimodal one.
            object.__setattr__(self, "pretrain_epochs", self.epochs if self.strategy == "staged" else 0)

    def _label_smoothing_asked(self, modalities: tuple[str, ...]) -> list[float]:
        """The label smoothing each family of `modalities` asks for (0: none). A run takes the smallest, so it
        applies only when every one of them asks, since one setting covers every loss. Measured for
        efficientnet-lite0 on its own (image alone: 0.994 against 0.988 on average); a fused run keeps 0, as its
        other encoders were not measured with it."""
        scratch = self.scratch_modalities()
        return [
            0.0 if m in scratch else family_defaults(m, self.encoder(m)).get("label_smoothing", 0.0)
            for m in modalities
        ]

    def scratch_modalities(self) -> tuple[str, ...]:
        """The modalities trained (all when the data decides) whose encoders start from random weights."""
        used = self.modalities or MODALITIES
        if self.from_scratch:
            return tuple(used)
        return tuple(m for m in used if "epochs" not in family_defaults(m, self.encoder(m)))

    def for_data_modalities(self, modalities: tuple[str, ...]) -> TrainOptions:
        """These options once the data has decided the modalities (no --modalities): no solo epochs when none
        of them trains from random weights (None was resolved over every modality before the data was read, so a
        text-only MiniLM run recorded 9 solo epochs it never ran and warned about them), and the label smoothing
        their families ask for."""
        options = self
        if options.label_smoothing is None:
            options = replace(options, label_smoothing=min(options._label_smoothing_asked(modalities)))
        scratch = options.scratch_modalities()
        if (
            options.modalities is not None
            or options.solo_epochs == 0
            or any(m in scratch for m in modalities)
        ):
            return options
        return replace(options, solo_epochs=0)

    def encoder(self, modality: str) -> str:
        return getattr(self, f"{modality}_encoder")

    def family_ignores(self, modality: str, option: str) -> bool:
        """Whether the chosen (known) family of `modality` ignores model option `option`."""
        family = self.encoder(modality)
        return family in FamilyNames(modality, tuple(ENCODERS[modality])) and not family_takes(
            modality, family, option
        )

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["modalities"] = list(self.modalities) if self.modalities else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainOptions:
        """Options as to_dict wrote them, or as older versions did: their 0, -1 or "" for "the families
        decide" (OLD_SENTINELS) is read as None, which resolves to what those versions resolved it to."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values.update({k: None for k, old in OLD_SENTINELS.items() if k in values and _same(values[k], old)})
        if values.get("modalities") is not None:
            values["modalities"] = tuple(values["modalities"])
        return cls(**values)


_DEFAULTS = {f.name: f.default for f in fields(TrainOptions)}


def option_choices() -> dict[str, tuple[str, ...]]:
    """The fields with a fixed set of values, and those values: checked by TrainOptions, offered by the CLI.
    The registries are read when called, so an encoder or fusion registered later is included."""
    return {
        "strategy": STRATEGIES,
        "keep": KEEP,
        "audio_noise": AUDIO_NOISE,
        "dp_accountant": DP_ACCOUNTANTS,
        "device": DEVICES,
        **{f"{m}_encoder": FamilyNames(m, tuple(ENCODERS[m])) for m in MODALITIES},
        "fusion": tuple(FUSIONS),
    }


def flag(name: str) -> str:
    """The `polysense train` flag of a TrainOptions field, for messages: --batch-size, --n, ..."""
    return flag_name(next(f for f in fields(TrainOptions) if f.name == name))


def _same(value: object, old: object) -> bool:
    """Whether a stored value is the old sentinel (of the same kind: False is not 0)."""
    return type(value) in (int, float, str) and value == old


def _one_of(values: tuple[str, ...]) -> str:
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else ", ".join(values)
