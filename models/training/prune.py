"""`polysense prune RUN --out RUN2`: a finished run's encoders pruned (polysense.models.pruning), then fine-tuned
briefly with the ordinary training loop into a new run folder, which `polysense export RUN2` exports like any
run.

RUN2 starts as a copy of what RUN's training read (its config, manifest, tokenizer, built-in data) with the
pruned structure in its model config, the fine-tuning options (--epochs, strategy joint, no solo or staged
phases; the rest as RUN trained) and one checkpoint, epoch 0, holding the pruned weights (and RUN's per-modality
heads). Training then resumes it, exactly as `polysense train --resume` would: the data is prepared again and
checked to give the same model, and the epochs run, validate, checkpoint and end in model.pt and metrics.json.
pruning.json records where it came from, the criterion and the parameters before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from polysense.bundle.settings import Preprocessing
from polysense.errors import ConfigError
from polysense.models.model import MultimodalClassifier
from polysense.models.pruning import PrunePlan, PruneReport, check_prunable, prune_model
from polysense.models.training import run_folder
from polysense.models.training.data_prep import TOKENIZER_FILE, prepare_data
from polysense.models.training.options import TrainOptions
from polysense.models.training.run_folder import Checkpoint
from polysense.models.training.run_open import pick_device
from polysense.models.training.train import TrainResult, train
from polysense.models.training.train_state import TrainState
from polysense.tools.metrics import format_metrics_table

log = logging.getLogger("polysense")

PRUNING_FILE = "pruning.json"
CRITERION = (
    "first-order Taylor importance: |sum of weight x gradient| over the weights of each head, feed-forward unit "
    "or channel, the training loss's gradient summed over the scoring batches; the same share removed in every "
    "layer or block"
)
DEFAULT_EPOCHS = 1
DEFAULT_PLAN = PrunePlan()


@dataclass(frozen=True)
class PruneResult:
    run_dir: Path
    report: PruneReport
    training: TrainResult
    source_metrics: dict  # the unpruned run's test metrics


def prune_run(
    source: str | os.PathLike,
    out: str | os.PathLike,
    plan: PrunePlan = DEFAULT_PLAN,
    epochs: int = DEFAULT_EPOCHS,
    progress: bool = True,
) -> PruneResult:
    """Prune the finished run in `source` by `plan`, fine-tune it for `epochs` epochs, write the run `out`."""
    source, out = Path(source), Path(out)
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (the fine-tuning after pruning), got {epochs}")
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out for the pruned run, or remove it")
    model, config = run_folder.load_trained(source)
    stored = TrainOptions.from_dict({**run_folder.OPTIONS_BEFORE_THEY_EXISTED, **config["options"]})
    if stored.dp_epsilon:
        raise ConfigError(
            f"{source} was trained with --dp-epsilon: fine-tuning its pruned model would spend privacy its "
            "accounting does not cover; prune a run trained without it"
        )
    check_prunable(model, plan)  # before anything is written
    options = replace(
        stored,
        out=str(out),
        epochs=epochs,
        strategy="joint",
        solo_epochs=0,
        pretrain_epochs=0,
        finetune_encoders=False,
        progress=progress,
    )
    try:
        report = _prune_into(source, out, model, config, options, plan)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing that looks like a run is left
        raise
    _log_report(report)
    training = train(options, resume=True, changed=())
    source_metrics = json.loads((source / run_folder.METRICS_FILE).read_text())
    return PruneResult(out, report, training, source_metrics)


def _prune_into(
    source: Path, out: Path, model: MultimodalClassifier, config: dict, options: TrainOptions, plan: PrunePlan
) -> PruneReport:
    """Copy what training reads into `out`, score and prune the model on its training split, and write the
    config, the epoch-0 checkpoint and pruning.json."""
    _copy_inputs(source, out, config)
    device = pick_device(options.device)
    data = prepare_data(options, out, writes=False)
    train_split = data.splits["train"]
    generator = torch.Generator().manual_seed(options.seed)
    batches = train_split.batches(options.batch_size, device, generator)
    model.to(device)
    report = prune_model(model, plan, (b for _, b in zip(range(plan.batches), batches)))
    model.cpu()
    pruned_config = {**config, "options": options.to_dict(), "model": model.config.to_dict()}
    (out / run_folder.CHECKPOINT_DIR).mkdir()
    checkpoint = Checkpoint(
        model=model.state_dict(),
        heads=_heads(source, options, len(config["labels"]), model.config.modalities),
        optimizer={},
        scheduler={},
        state=TrainState(),
    )
    run_folder.save_checkpoint(out, checkpoint)
    run_folder.atomic_write_json(
        {
            "source": str(source),
            "criterion": CRITERION,
            "plan": asdict(plan),
            "scoring_rows": min(len(train_split), plan.batches * options.batch_size),
            "fine_tuning_epochs": options.epochs,
            "structures": report.structures,
            "parameters_before": report.parameters_before,
            "parameters_after": report.parameters_after,
        },
        out / PRUNING_FILE,
    )
    run_folder.atomic_write_json(pruned_config, out / run_folder.CONFIG_FILE)  # last: now it is a run
    return report


def _copy_inputs(source: Path, out: Path, config: dict) -> None:
    """What preparing the run's data reads from its folder: the manifest as used, the tokenizer, the built-in
    set and the graphs of frozen front ends."""
    out.mkdir(parents=True)
    names = ["manifest.csv", TOKENIZER_FILE]
    settings = Preprocessing.from_dict(config["preprocessing"])
    for modality in (settings.image, settings.text, settings.audio):
        names += [graph.file for graph in (modality.graphs if modality is not None else ())]
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (source / "builtin_data").is_dir():
        shutil.copytree(source / "builtin_data", out / "builtin_data")


def _heads(source: Path, options: TrainOptions, classes: int, modalities: tuple[str, ...]) -> dict:
    """The per-modality linear heads (auxiliary losses) of the source's last checkpoint, which pruning leaves
    alone (they read the embeddings); new ones when it kept none."""
    torch.manual_seed(options.seed)
    heads = nn.ModuleDict({m: nn.Linear(options.embed_dim, classes) for m in modalities})
    checkpoint = run_folder.load_latest_checkpoint(source, torch.device("cpu"))
    if checkpoint is not None:
        heads.load_state_dict(checkpoint.heads)
    return heads.state_dict()


def _log_report(report: PruneReport) -> None:
    for modality, structure in report.structures.items():
        before, after = report.parameters_before[modality], report.parameters_after[modality]
        log.info(
            "%s encoder pruned: %d -> %d parameters (%.0f%%); keeps %s",
            modality,
            before,
            after,
            100 * after / before,
            structure,
        )


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `polysense prune` and its command."""
    parser.description = (
        "Prune a finished run's encoders (minilm-l6: attention heads and feed-forward units; efficientnet-lite0: "
        "each block's expanded channels) by first-order Taylor importance, fine-tune briefly, and write a new "
        "run folder; export it with `polysense export RUN2 --out BUNDLE`."
    )
    defaults = DEFAULT_PLAN
    parser.add_argument("run_dir", help="a finished training run folder")
    parser.add_argument("--out", required=True, help="the pruned run's folder (must not exist)")
    parser.add_argument(
        "--amount",
        type=float,
        default=defaults.amount,
        help="share of each layer's heads and feed-forward units, or each block's channels, removed",
    )
    parser.add_argument("--heads", type=int, metavar="N", help="minilm-l6: heads each layer keeps (of 12)")
    parser.add_argument(
        "--ffn", type=int, metavar="N", help="minilm-l6: feed-forward units each layer keeps (of 1536)"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="fine-tuning epochs after pruning")
    parser.add_argument(
        "--batches",
        type=int,
        default=defaults.batches,
        help="training batches (of the run's --batch-size) whose gradients score the units",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=prune_command)


def prune_command(args: argparse.Namespace) -> int:
    plan = PrunePlan(amount=args.amount, heads=args.heads, ffn=args.ffn, batches=args.batches)
    result = prune_run(args.run_dir, args.out, plan, args.epochs, progress=not args.no_progress)
    for modality, structure in result.report.structures.items():
        before, after = result.report.parameters_before[modality], result.report.parameters_after[modality]
        print(f"{modality} encoder: {before:,} -> {after:,} parameters; keeps {structure}")
    source_accuracy = result.source_metrics.get("accuracy")
    print(f"\ntest split of {result.run_dir} (unpruned: accuracy {source_accuracy:.4f}):")
    print(format_metrics_table(result.training.metrics))
    print(f"\nexport it: polysense export {result.run_dir} --out BUNDLE")
    return 0
