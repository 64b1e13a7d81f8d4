"""The training loop: solo epochs first for encoders without pretrained weights beside a pretrained family,
then joint or staged, modality dropout, AdamW with warm-up + cosine, a checkpoint every
epoch, --resume, early stopping on validation accuracy, and metrics on the test split.

What the run folder holds and how it is written: polysense.models.training.run_folder; opening a run (options, data,
model, checkpoint, processes): polysense.models.training.run_open. One epoch, in one process or several (torchrun):
polysense.models.training.epoch. Only rank 0 writes; every process re-estimates BatchNorm alike on the whole training
set, and rank 0 validates and sends its record, so they all take the same decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from polysense.errors import ConfigError
from polysense.models.training import run_folder
from polysense.models.training.batchnorm import recalibrate_batchnorm
from polysense.models.training.distributed.processes import (
    World,
    from_main,
    leave,
    meet,
    replicate,
    stop_quietly_when_a_peer_fails,
    world_from_environment,
)
from polysense.models.training.epoch import EpochRunner, TrainingObjective
from polysense.models.training.evaluate import evaluate, evaluate_heads
from polysense.models.training.optimization import optimizer_and_schedule, pretrained_parameters
from polysense.models.training.options import TrainOptions
from polysense.models.training.privacy import Accountant, PrivateTraining, plan_privacy, quiet
from polysense.models.training.run_folder import Checkpoint
from polysense.models.training.run_open import Run, open_run
from polysense.models.training.train_state import validation_score
from polysense.tools.metrics import format_metrics_table

log = logging.getLogger("polysense")


@dataclass(frozen=True)
class Phase:
    name: str  # solo | joint | frozen | alternating | pretrain | fusion
    epochs: int
    monitored: bool  # early stopping and best-model selection apply
    modalities: tuple[str, ...] = ()  # solo: the encoders it trains, each with its own head (the rest wait)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: dict  # test-split metrics, as in metrics.json
    best_epoch: int
    epochs_run: int
    stopped_early: bool

    def table(self) -> str:
        return format_metrics_table(self.metrics)


def phases(options: TrainOptions, modalities: tuple[str, ...]) -> list[Phase]:
    """The run's phases, in order, for a model of `modalities`."""
    solo = tuple(m for m in modalities if m in options.scratch_modalities())
    plan = [Phase("solo", options.solo_epochs, False, solo)] if options.solo_epochs > 0 and solo else []
    if options.strategy in ("joint", "frozen", "alternating"):
        return [*plan, Phase(options.strategy, options.epochs, True)]
    return [*plan, Phase("pretrain", options.pretrain_epochs, False), Phase("fusion", options.epochs, True)]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Every random draw of an epoch derives from (seed, epoch), so a resumed run repeats an uninterrupted one.
    return seed * 100_003 + epoch


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
    if options.dp_epsilon and world.distributed:
        raise ConfigError(
            "--dp-epsilon trains in one process: opacus's per-sample gradients are not summed over processes "
            "here; leave --nproc out (or run without torchrun)"
        )
    run = open_run(options, resume, changed, world)
    plan = phases(run.options, run.model.config.modalities)
    if run.options.dp_epsilon:
        run.privacy = _private_training(run, sum(p.epochs for p in plan))
    if run.options.solo_epochs > 0 and plan[0].name != "solo" and run.world.is_main:
        log.warning(
            "no solo epochs: every encoder of this data's modalities (%s) starts from pretrained weights",
            ", ".join(run.model.config.modalities),
        )
    total_epochs = sum(p.epochs for p in plan)
    stopped_early, first = False, 1
    for phase in plan:
        last = first + phase.epochs - 1
        if run.state.epoch < last and not stopped_early:
            stopped_early = _run_phase(run, phase, first, last, total_epochs)
        first = last + 1
    state = run.state
    # Early only if epochs were left out: patience that runs out with the last epoch stopped nothing.
    stopped_early = state.epoch < total_epochs
    metrics = {}
    meet(world)  # rank 0's last checkpoint is written
    if world.is_main:
        if run.options.keep == "best":
            run_folder.load_best(run.run_dir, run.model, run.device)
        metrics = evaluate(run.model, run.data.splits["test"], run.options.batch_size, run.device)
        metrics.update(
            split="test",
            labels=run.data.labels,
            best_epoch=state.best_epoch,
            kept=run.options.keep,
            history=state.history,
        )
        if run.privacy is not None:
            metrics["privacy"] = run.privacy.accountant.spent()
            log.info(
                "privacy: epsilon %.3f spent of %.3f (delta %.1e, %s accountant, noise multiplier %.3f, "
                "%d steps)",
                *(metrics["privacy"][k] for k in ("epsilon", "target_epsilon", "delta")),
                run.privacy.plan.accountant,
                run.privacy.plan.noise_multiplier,
                metrics["privacy"]["steps"],
            )
        run_folder.write_result(run.run_dir, run.config, run.model, metrics)
    return TrainResult(run.run_dir, metrics, state.best_epoch, state.epoch, stopped_early)


def _private_training(run: Run, epochs: int) -> PrivateTraining:
    """The DP mechanism for the run's `epochs` epochs over its training rows, and the accountant: a resumed
    run's goes on from its checkpoint."""
    plan = plan_privacy(run.options, len(run.data.splits["train"]), epochs)
    history = None
    if run.checkpoint is not None:
        if run.checkpoint.privacy is None:
            raise ConfigError(
                f"--resume: {run.run_dir}'s checkpoint has no privacy accounting; start a new --out"
            )
        history = run.checkpoint.privacy["history"]
    if run.world.is_main:
        log.info(
            "differential privacy: epsilon %.3g, delta %.1e over %d epochs of %d steps (each row in a step with "
            "probability %.4f): noise multiplier %.3f, rows' gradients clipped to %.3g",
            plan.target_epsilon,
            plan.delta,
            plan.epochs,
            plan.steps_per_epoch,
            plan.sample_rate,
            plan.noise_multiplier,
            plan.max_grad_norm,
        )
    return PrivateTraining(plan, Accountant(plan, history))


def _run_phase(run: Run, phase: Phase, first: int, last: int, total_epochs: int) -> bool:
    """Train epochs first..last of one phase; True if it stopped early.

    Resuming inside the phase (a checkpoint from epoch first..last-1) restores its optimizer and schedule.
    """
    options = run.options
    frozen = phase.name == "fusion" and not options.finetune_encoders
    for modality, encoder in run.model.encoders.items():
        encoder.requires_grad_(not frozen and (phase.name != "solo" or modality in phase.modalities))
    run.model.fusion.requires_grad_(phase.name != "solo")
    # Feature extraction: the pretrained weights stay fixed (BatchNorm statistics still adapt to the data).
    if options.strategy == "frozen":
        for parameter in pretrained_parameters(run.model):
            parameter.requires_grad_(False)
    steps = phase.epochs * run.data.splits["train"].num_batches(options.batch_size)
    optimizer, scheduler = optimizer_and_schedule(
        run.model, run.heads, options, phase.name, steps, frozen, phase.modalities
    )
    if run.checkpoint is not None and first <= run.checkpoint.state.epoch < last:
        optimizer.load_state_dict(run.checkpoint.optimizer)
        scheduler.load_state_dict(run.checkpoint.scheduler)
    # Built per phase: DistributedDataParallel takes the parameters that require a gradient when wrapping.
    objective = TrainingObjective(run.model, run.heads, phase.name, options, phase.modalities)
    if run.privacy is None:
        engine = replicate(objective, run.world, run.device, _may_leave_unused(run, phase))
    else:  # one process: per-sample gradients, clipped and noised by the optimizer, which counts each step
        engine, optimizer = run.privacy.engine(objective), run.privacy.optimizer(optimizer)
    runner = EpochRunner(
        engine,
        run.world,
        run.context,
        run.data.splits["train"],
        run.data.preprocessing,
        options,
        run.device,
        phase.modalities,
        run.privacy,
    )
    if run.privacy is None:
        return _run_epochs(run, runner, phase, (first, last, total_epochs), optimizer, scheduler, frozen)
    try:
        with quiet():
            return _run_epochs(run, runner, phase, (first, last, total_epochs), optimizer, scheduler, frozen)
    finally:
        run.privacy.close(engine)


def _run_epochs(
    run: Run,
    runner: EpochRunner,
    phase: Phase,
    epochs: tuple[int, int, int],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    frozen: bool,
) -> bool:
    """Epochs first..last (of total_epochs) of a phase; True if it stopped early."""
    options = run.options
    first, last, total_epochs = epochs
    for epoch in range(max(first, run.state.epoch + 1), last + 1):
        if phase.monitored and run.state.early_stop_due(options.patience):
            return True
        train_loss, seconds = _train_epoch(
            run, runner, phase, epoch, total_epochs, optimizer, scheduler, frozen
        )
        if not frozen:
            recalibrate_batchnorm(
                run.model,
                run.data.splits["train"],
                options.batch_size,
                run.device,
                modalities=phase.modalities or None,
            )
        _end_epoch(run, phase, epoch, total_epochs, (train_loss, seconds), optimizer, scheduler)
    return phase.monitored and run.state.early_stop_due(options.patience)


def _may_leave_unused(run: Run, phase: Phase) -> bool:
    """Whether a step of this phase can leave trainable parameters without a gradient."""
    some_sample_lacks_a_modality = bool((run.data.splits["train"].present() == 0).any())
    heads_unused = run.options.aux_loss_weight == 0 and phase.name not in ("pretrain", "alternating")
    return phase.name in ("solo", "pretrain", "alternating") or heads_unused or some_sample_lacks_a_modality


def _train_epoch(
    run: Run,
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
    run.heads.train()
    if frozen:
        run.model.encoders.eval()  # frozen BatchNorm statistics too
    return runner.run(seed, optimizer, scheduler, f"epoch {epoch}/{total_epochs} {phase.name}")


def _validate(run: Run, phase: Phase, epoch: int, train_loss: float) -> dict:
    """The epoch's record in the run's history: its losses and validation scores. Phases that train encoders
    alone are scored through the encoders' own heads (the fusion has not trained yet), with `val_by_head`."""
    val_split, batch_size = run.data.splits["val"], run.options.batch_size
    alone = {"solo": phase.modalities, "pretrain": run.model.config.modalities}.get(phase.name)
    if alone:
        val = evaluate_heads(run.model, run.heads, val_split, alone, batch_size, run.device)
    else:
        val = evaluate(run.model, val_split, batch_size, run.device)
    record = {
        "epoch": epoch,
        "phase": phase.name,
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_score": validation_score(val),
    }
    if alone:
        record["val_by_head"] = val["by_modality"]
    if any("val_score" not in h for h in run.state.history):  # resumed from a run scored on accuracy alone
        record["val_score"] = val["accuracy"]
    return record


def _end_epoch(
    run: Run,
    phase: Phase,
    epoch: int,
    total_epochs: int,
    trained: tuple[float, float],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> None:
    """Validate, track the best model and early stopping; rank 0 writes the epoch's checkpoint.

    Rank 0 validates and sends its record to the others, so every process takes the same decisions (best model,
    early stopping) even where float rounding could tip a near-tie differently."""
    record = _validate(run, phase, epoch, trained[0]) if run.world.is_main else None
    if record is not None and run.privacy is not None:
        record["epsilon"] = run.privacy.accountant.epsilon()  # spent so far
    record = from_main(run.world, record)
    improved = run.state.record_epoch(record, phase.monitored)
    if not run.world.is_main:
        return
    if improved:
        run_folder.save_best(run.run_dir, run.model)
    heads = record.get("val_by_head")
    scores = (
        "each encoder through its own head: " + ", ".join(f"{m} {a:.4f}" for m, a in heads.items())
        if heads is not None
        else f"mean over subsets {record['val_score']:.4f}"
    )
    log.info(
        "epoch %d/%d %s: train loss %.4f (%.1f samples/s in %d process(es)), val loss %.4f, val accuracy %.4f, "
        "%s%s",
        epoch,
        total_epochs,
        phase.name,
        record["train_loss"],
        len(run.data.splits["train"]) / max(trained[1], 1e-9),
        run.world.size,
        record["val_loss"],
        record["val_accuracy"],
        scores,
        " (best)" if improved else "",
    )
    if "epsilon" in record:
        log.info("epoch %d/%d: epsilon spent %.3f", epoch, total_epochs, record["epsilon"])
    checkpoint = Checkpoint(
        model=run.model.state_dict(),
        heads=run.heads.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        state=run.state,
        privacy=run.privacy.accountant.to_dict() if run.privacy is not None else None,
    )
    run_folder.save_checkpoint(run.run_dir, checkpoint)
