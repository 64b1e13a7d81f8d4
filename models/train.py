"""The training loop: joint or staged, modality dropout, AdamW with warm-up + cosine, a checkpoint every
epoch, --resume, early stopping on validation accuracy, and metrics on the test split.

What the run folder holds and how it is written: polysense.models.run_folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from polysense.errors import ConfigError
from polysense.metrics import format_metrics_table
from polysense.models import run_folder
from polysense.models.augment import augment_batch
from polysense.models.batchnorm import recalibrate_batchnorm
from polysense.models.data_prep import PreparedData, prepare_data
from polysense.models.dataset import FeatureSet
from polysense.models.evaluate import evaluate
from polysense.models.losses import alternating_loss, fused_loss, unimodal_loss
from polysense.models.model import ModelConfig, MultimodalClassifier
from polysense.models.options import TrainOptions
from polysense.models.run_folder import Checkpoint
from polysense.models.train_state import TrainState, validation_score

log = logging.getLogger("polysense")


@dataclass(frozen=True)
class Phase:
    name: str  # joint | pretrain | fusion
    epochs: int
    monitored: bool  # early stopping and best-model selection apply


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: dict  # test-split metrics, as in metrics.json
    best_epoch: int
    epochs_run: int
    stopped_early: bool

    def table(self) -> str:
        return format_metrics_table(self.metrics)


def phases(options: TrainOptions) -> list[Phase]:
    if options.strategy in ("joint", "frozen", "alternating"):
        return [Phase(options.strategy, options.epochs, True)]
    return [Phase("pretrain", options.pretrain_epochs, False), Phase("fusion", options.epochs, True)]


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Every random draw of an epoch derives from (seed, epoch), so a resumed run repeats an uninterrupted one.
    return seed * 100_003 + epoch


def _lr_lambda(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10 % of the steps (at most 100), then cosine decay to 5 % of the peak."""
    warmup = max(1, min(total_steps // 10, 100))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _fit_input_statistics(model: MultimodalClassifier, train: FeatureSet) -> None:
    """Encoders that normalise their input with training statistics (`fit_input_stats`) get them here."""
    for modality, encoder in model.encoders.items():
        if hasattr(encoder, "fit_input_stats"):
            encoder.fit_input_stats([x for x in train.features[modality] if x is not None])


@dataclass
class _Run:
    """Everything one training run works on."""

    options: TrainOptions
    run_dir: Path
    data: PreparedData
    config: dict  # options, model config, labels, preprocessing: config.json, and inside model.pt
    model: MultimodalClassifier
    heads: nn.ModuleDict  # per-modality linear heads of staged pre-training and the auxiliary losses
    device: torch.device
    state: TrainState
    checkpoint: Checkpoint | None  # the checkpoint resumed from (its optimizer and schedule are reused)


def _model_config(options: TrainOptions, data: PreparedData) -> ModelConfig:
    return ModelConfig(
        modalities=data.modalities,
        num_classes=len(data.labels),
        embed_dim=options.embed_dim,
        image_family=options.image_encoder,
        image_width=options.image_width,
        text_family=options.text_encoder,
        audio_family=options.audio_encoder,
        audio_norm_frames=options.audio_norm_frames,
        vocab_size=data.vocab_size,
        max_text_length=options.max_text_length,
        fusion=options.fusion,
        pretrained=not options.from_scratch,
    )


def _open_run(options: TrainOptions, resume: bool, changed: Collection[str]) -> _Run:
    run_dir = Path(options.out)
    if resume:
        options = run_folder.resumed_options(options, run_dir, changed)
    else:
        run_folder.check_fresh_run_dir(run_dir)
    device = pick_device(options.device)
    run_folder.create_run_dir(run_dir)
    data = prepare_data(options, run_dir)
    model_config = _model_config(options, data)
    config = run_folder.run_config(options, model_config, data.labels, data.preprocessing.to_dict())
    run_folder.write_config(run_dir, config, resume)

    torch.manual_seed(options.seed)
    model = MultimodalClassifier(model_config)
    _fit_input_statistics(model, data.splits["train"])
    heads = nn.ModuleDict({m: nn.Linear(options.embed_dim, len(data.labels)) for m in data.modalities})
    model.to(device)
    heads.to(device)
    state, checkpoint = TrainState(), None
    if resume:
        checkpoint = run_folder.load_latest_checkpoint(run_dir, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        heads.load_state_dict(checkpoint.heads)
        state = checkpoint.state
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
    return _Run(options, run_dir, data, config, model, heads, device, state, checkpoint)


def train(
    options: TrainOptions, resume: bool = False, changed: Collection[str] = run_folder.RESUME_MAY_CHANGE
) -> TrainResult:
    """Train on options.data, write the run folder, return the test metrics.

    resume: continue the run in options.out with its stored options, except the RESUME_MAY_CHANGE options named
    in `changed`, taken from `options` (all of them by default; the CLI passes the flags actually given).
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    run = _open_run(options, resume, changed)
    plan = phases(run.options)
    total_epochs = sum(p.epochs for p in plan)
    stopped_early, first = False, 1
    for phase in plan:
        last = first + phase.epochs - 1
        if run.state.epoch < last and not stopped_early:
            stopped_early = _run_phase(run, phase, first, last, total_epochs)
        first = last + 1
    state = run.state
    stopped_early = stopped_early or state.early_stop_due(run.options.patience)

    run_folder.load_best(run.run_dir, run.model, run.device)
    metrics = evaluate(run.model, run.data.splits["test"], run.options.batch_size, run.device)
    metrics.update(split="test", labels=run.data.labels, best_epoch=state.best_epoch, history=state.history)
    run_folder.write_result(run.run_dir, run.config, run.model, metrics)
    return TrainResult(run.run_dir, metrics, state.best_epoch, state.epoch, stopped_early)


def _optimizer_and_schedule(
    run: _Run, phase: Phase, frozen: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over what the phase trains, and its warm-up + cosine schedule over the phase's steps."""
    options, model = run.options, run.model
    if phase.name == "pretrain":
        trainable = [*model.encoders.parameters(), *run.heads.parameters()]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if (options.aux_loss_weight > 0 or options.strategy == "alternating") and not frozen:
            trainable += list(run.heads.parameters())
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, trainable, options), lr=options.lr, weight_decay=options.weight_decay
    )
    steps = phase.epochs * run.data.splits["train"].num_batches(options.batch_size)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps))


def pretrained_parameters(model: MultimodalClassifier) -> list[nn.Parameter]:
    """The parameters that came pretrained (none when the model was built --from-scratch)."""
    if not model.config.pretrained:
        return []
    found = []
    for encoder in model.encoders.values():
        prefixes = getattr(encoder, "pretrained_prefixes", ())
        found += [p for name, p in encoder.named_parameters() if prefixes and name.startswith(prefixes)]
    return found


def _parameter_groups(model: MultimodalClassifier, trainable: list, options: TrainOptions) -> list[dict]:
    """The pretrained layers of pretrained encoders at --pretrained-lr, everything else at --lr."""
    pretrained = {id(p) for p in pretrained_parameters(model)}
    slow = [p for p in trainable if id(p) in pretrained]
    fast = [p for p in trainable if id(p) not in pretrained]
    groups = [{"params": fast}]
    return groups + [{"params": slow, "lr": options.pretrained_lr}] if slow else groups


def _run_phase(run: _Run, phase: Phase, first: int, last: int, total_epochs: int) -> bool:
    """Train epochs first..last of one phase; True if it stopped early.

    Resuming inside the phase (a checkpoint from epoch first..last-1) restores its optimizer and schedule.
    """
    options = run.options
    frozen = phase.name == "fusion" and not options.finetune_encoders
    for parameter in run.model.encoders.parameters():
        parameter.requires_grad_(not frozen)
    # Feature extraction: the pretrained weights stay fixed (BatchNorm statistics still adapt to the data).
    if options.strategy == "frozen":
        for parameter in pretrained_parameters(run.model):
            parameter.requires_grad_(False)
    optimizer, scheduler = _optimizer_and_schedule(run, phase, frozen)
    if run.checkpoint is not None and first <= run.checkpoint.state.epoch < last:
        optimizer.load_state_dict(run.checkpoint.optimizer)
        scheduler.load_state_dict(run.checkpoint.scheduler)

    for epoch in range(max(first, run.state.epoch + 1), last + 1):
        if phase.monitored and run.state.early_stop_due(options.patience):
            return True
        train_loss = _train_epoch(run, phase, epoch, total_epochs, optimizer, scheduler, frozen)
        if not frozen:
            recalibrate_batchnorm(run.model, run.data.splits["train"], options.batch_size, run.device)
        _end_epoch(run, phase, epoch, total_epochs, train_loss, optimizer, scheduler)
    return phase.monitored and run.state.early_stop_due(options.patience)


def _train_epoch(
    run: _Run,
    phase: Phase,
    epoch: int,
    total_epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    frozen: bool,
) -> float:
    """One pass over the shuffled training set; returns the mean training loss."""
    options, model, train_set = run.options, run.model, run.data.splits["train"]
    seed = _epoch_seed(options.seed, epoch)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    if frozen:
        model.encoders.eval()  # frozen BatchNorm statistics too
    loss_sum, seen = 0.0, 0
    batches = tqdm(
        train_set.batches(options.batch_size, run.device, generator),
        total=train_set.num_batches(options.batch_size),
        desc=f"epoch {epoch}/{total_epochs} {phase.name}",
        unit="batch",
        disable=not options.progress,
        leave=False,
    )
    for step, batch in enumerate(batches):
        if options.augment:
            batch = augment_batch(batch, run.data.preprocessing, generator)
        if phase.name == "pretrain":
            loss = unimodal_loss(model, run.heads, batch)
        elif phase.name == "alternating":
            loss = alternating_loss(model, run.heads, batch, step, options.modality_dropout, generator)
        else:
            loss = fused_loss(
                model, run.heads, batch, options.modality_dropout, options.aux_loss_weight, generator
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # parameters left without a gradient this step (set_to_none) are not touched
        scheduler.step()
        loss_sum += loss.item() * batch["labels"].shape[0]
        seen += batch["labels"].shape[0]
        batches.set_postfix(loss=f"{loss_sum / seen:.3f}")
    return loss_sum / max(seen, 1)


def _end_epoch(
    run: _Run,
    phase: Phase,
    epoch: int,
    total_epochs: int,
    train_loss: float,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> None:
    """Validate, track the best model and early stopping, write the epoch's checkpoint."""
    val = evaluate(run.model, run.data.splits["val"], run.options.batch_size, run.device)
    record = {
        "epoch": epoch,
        "phase": phase.name,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_score": validation_score(val),
    }
    if any("val_score" not in h for h in run.state.history):  # resumed from a run scored on accuracy alone
        record["val_score"] = val["accuracy"]
    improved = run.state.record_epoch(record, phase.monitored)
    if improved:
        run_folder.save_best(run.run_dir, run.model)
    log.info(
        "epoch %d/%d %s: train loss %.4f, val loss %.4f, val accuracy %.4f, mean over subsets %.4f%s",
        epoch,
        total_epochs,
        phase.name,
        train_loss,
        val["loss"],
        val["accuracy"],
        record["val_score"],
        " (best)" if improved else "",
    )
    checkpoint = Checkpoint(
        model=run.model.state_dict(),
        heads=run.heads.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        state=run.state,
    )
    run_folder.save_checkpoint(run.run_dir, checkpoint)
