"""The training loop: joint or staged, modality dropout, AdamW with warm-up + cosine, a checkpoint every
epoch, --resume, early stopping on validation accuracy, and metrics on the test split.

What the run folder holds and how it is written: polysense.models.run_folder. One epoch, in one process or
several (torchrun): polysense.models.epoch. Only rank 0 writes; every process validates and re-estimates
BatchNorm alike on the whole validation and training sets, so they all take the same decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polysense.errors import ConfigError
from polysense.metrics import format_metrics_table
from polysense.models import run_folder
from polysense.models.batchnorm import recalibrate_batchnorm
from polysense.models.data_prep import PreparedData, prepare_data
from polysense.models.dataset import FeatureSet
from polysense.models.distributed import (
    World,
    from_main,
    join,
    leave,
    meet,
    replicate,
    stop_quietly_when_a_peer_fails,
    world_from_environment,
)
from polysense.models.epoch import EpochRunner, TrainingObjective
from polysense.models.evaluate import evaluate
from polysense.models.model import ModelConfig, MultimodalClassifier
from polysense.models.optimization import optimizer_and_schedule, pretrained_parameters
from polysense.models.options import TrainOptions
from polysense.models.run_folder import Checkpoint
from polysense.models.sharded_layers import StepContext, shard_layers
from polysense.models.sharding import check_split
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
    processes: int = 1  # processes that trained the last epochs (torchrun's WORLD_SIZE)

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
    world: World
    context: StepContext  # where this process's rows sit in the current batch (sharded_layers)


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


def _open_run(options: TrainOptions, resume: bool, changed: Collection[str], world: World) -> _Run:
    """Rank 0 checks the folder, prepares the data and writes the config; the other processes wait for it,
    then read the same options and data without writing anything."""
    run_dir = Path(options.out)
    device = join(world, pick_device(options.device))
    if world.is_main:
        options, data, config = _prepare_run(options, resume, changed, run_dir)
        from_main(world, (options, config))
    else:
        # Rank 0 settles the options (a resumed run's are in its folder) and writes what data preparation
        # writes; then the others prepare the same data without writing.
        options, config = from_main(world, None)
        data = prepare_data(options, run_dir, writes=False)
    check_split(options.batch_size, world.size, options.accumulate)

    torch.manual_seed(options.seed)
    model = MultimodalClassifier(ModelConfig.from_dict(config["model"]))
    _fit_input_statistics(model, data.splits["train"])
    heads = nn.ModuleDict({m: nn.Linear(options.embed_dim, len(data.labels)) for m in data.modalities})
    context = StepContext(synchronise=world.distributed)
    shard_layers(model, context)
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
    return _Run(options, run_dir, data, config, model, heads, device, state, checkpoint, world, context)


def _prepare_run(
    options: TrainOptions, resume: bool, changed: Collection[str], run_dir: Path
) -> tuple[TrainOptions, PreparedData, dict]:
    """Rank 0's part of opening a run: the options, the data and config.json, written to the run folder."""
    if resume:
        options = run_folder.resumed_options(options, run_dir, changed)
        # A finished run trained further is unfinished again until its new metrics are written, so that
        # --resume can continue it should this extension stop too.
        (run_dir / run_folder.METRICS_FILE).unlink(missing_ok=True)
    else:
        run_folder.check_fresh_run_dir(run_dir)
    run_folder.create_run_dir(run_dir)
    data = prepare_data(options, run_dir)
    model_config = _model_config(options, data)
    config = run_folder.run_config(options, model_config, data.labels, data.preprocessing.to_dict())
    run_folder.write_config(run_dir, config, resume)
    return options, data, config


def train(
    options: TrainOptions, resume: bool = False, changed: Collection[str] = run_folder.RESUME_MAY_CHANGE
) -> TrainResult:
    """Train on options.data, write the run folder, return the test metrics.

    resume: continue the run in options.out with its stored options, except the RESUME_MAY_CHANGE options named
    in `changed`, taken from `options` (all of them by default; the CLI passes the flags actually given).

    Under torchrun (several processes), every process calls this; rank 0 writes the run folder and gets the
    test metrics, the others get metrics == {}.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    world = world_from_environment()
    try:
        with stop_quietly_when_a_peer_fails(world):
            return _train(options, resume, changed, world)
    finally:
        leave()


def _train(options: TrainOptions, resume: bool, changed: Collection[str], world: World) -> TrainResult:
    run = _open_run(options, resume, changed, world)
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
    metrics = {}
    meet(world)  # rank 0's last checkpoint is written
    if world.is_main:
        run_folder.load_best(run.run_dir, run.model, run.device)
        metrics = evaluate(run.model, run.data.splits["test"], run.options.batch_size, run.device)
        metrics.update(
            split="test", labels=run.data.labels, best_epoch=state.best_epoch, history=state.history
        )
        run_folder.write_result(run.run_dir, run.config, run.model, metrics)
    return TrainResult(run.run_dir, metrics, state.best_epoch, state.epoch, stopped_early, world.size)


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
    steps = phase.epochs * run.data.splits["train"].num_batches(options.batch_size)
    optimizer, scheduler = optimizer_and_schedule(run.model, run.heads, options, phase.name, steps, frozen)
    if run.checkpoint is not None and first <= run.checkpoint.state.epoch < last:
        optimizer.load_state_dict(run.checkpoint.optimizer)
        scheduler.load_state_dict(run.checkpoint.scheduler)
    # Built per phase: DistributedDataParallel takes the parameters that require a gradient when wrapping.
    objective = TrainingObjective(run.model, run.heads, phase.name, options)
    runner = EpochRunner(
        replicate(objective, run.world, run.device, _may_leave_unused(run, phase)),
        run.world,
        run.context,
        run.data.splits["train"],
        run.data.preprocessing,
        options,
        run.device,
    )
    for epoch in range(max(first, run.state.epoch + 1), last + 1):
        if phase.monitored and run.state.early_stop_due(options.patience):
            return True
        train_loss, seconds = _train_epoch(
            run, runner, phase, epoch, total_epochs, optimizer, scheduler, frozen
        )
        if not frozen:
            recalibrate_batchnorm(run.model, run.data.splits["train"], options.batch_size, run.device)
        _end_epoch(run, phase, epoch, total_epochs, (train_loss, seconds), optimizer, scheduler)
    return phase.monitored and run.state.early_stop_due(options.patience)


def _may_leave_unused(run: _Run, phase: Phase) -> bool:
    """Whether a step of this phase can leave trainable parameters without a gradient."""
    some_sample_lacks_a_modality = bool((run.data.splits["train"].present() == 0).any())
    heads_unused = run.options.aux_loss_weight == 0 and phase.name not in ("pretrain", "alternating")
    return phase.name in ("pretrain", "alternating") or heads_unused or some_sample_lacks_a_modality


def _train_epoch(
    run: _Run,
    runner: EpochRunner,
    phase: Phase,
    epoch: int,
    total_epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    frozen: bool,
) -> tuple[float, float]:
    """One pass over the shuffled training set: (mean training loss, seconds)."""
    seed = _epoch_seed(run.options.seed, epoch)
    torch.manual_seed(seed)
    run.model.train()
    if frozen:
        run.model.encoders.eval()  # frozen BatchNorm statistics too
    return runner.run(seed, optimizer, scheduler, f"epoch {epoch}/{total_epochs} {phase.name}")


def _end_epoch(
    run: _Run,
    phase: Phase,
    epoch: int,
    total_epochs: int,
    trained: tuple[float, float],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> None:
    """Validate, track the best model and early stopping; rank 0 writes the epoch's checkpoint."""
    train_loss, seconds = trained
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
    if not run.world.is_main:
        return
    if improved:
        run_folder.save_best(run.run_dir, run.model)
    log.info(
        "epoch %d/%d %s: train loss %.4f (%.1f samples/s in %d process(es)), val loss %.4f, val accuracy %.4f, "
        "mean over subsets %.4f%s",
        epoch,
        total_epochs,
        phase.name,
        train_loss,
        len(run.data.splits["train"]) / max(seconds, 1e-9),
        run.world.size,
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
