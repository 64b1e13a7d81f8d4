"""`polysense train`: the runtime's CLI hands the arguments after "train" to run_train, which parses them with
flags generated from TrainOptions (polysense.models.training.flags) and trains."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from polysense.errors import ConfigError
from polysense.models.training.distributed.launch import check_devices, launch
from polysense.models.training.distributed.sharding import check_split
from polysense.models.training.flags import add_arguments
from polysense.models.training.flags import options_from_args as _options_from_args
from polysense.models.training.options import TrainOptions, flag, option_choices
from polysense.models.training.run_folder import RESUME_MAY_CHANGE, check_fresh_run_dir, resumed_options
from polysense.models.training.train import train


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polysense train",
        description="Train a multimodal classifier; the run folder (--out) receives checkpoints, config and "
        "metrics. Export it afterwards with `polysense export RUN_DIR --out BUNDLE`.",
    )
    add_arguments(parser, TrainOptions, option_choices())
    # Not an option of the run itself: it says where the run comes from.
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    # Nor is the number of processes: a run may resume with another.
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train in N processes on this machine (DistributedDataParallel via torchrun; gloo on CPU, NCCL on "
        "CUDA); --batch-size and --lr keep their meaning. Default 1, or torchrun's WORLD_SIZE",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return _options_from_args(args, TrainOptions)


def run_train(argv: Sequence[str]) -> int:
    """Parse `polysense train` arguments, train, print the test metrics. argparse exits on bad flags."""
    args = build_train_parser().parse_args(argv)
    started_by_torchrun = "WORLD_SIZE" in os.environ
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if started_by_torchrun and args.nproc not in (None, int(os.environ["WORLD_SIZE"])):
        raise ConfigError(
            f"--nproc {args.nproc} differs from torchrun's {os.environ['WORLD_SIZE']} processes; "
            "leave --nproc out under torchrun"
        )
    options = options_from_args(args)  # bad options fail here, once, before any process starts
    given = {name for name in RESUME_MAY_CHANGE if any(a.split("=")[0] == flag(name) for a in argv)}
    if not started_by_torchrun and (args.nproc or 1) > 1:
        # What can be checked here is, so that a mistake gives one message instead of one per process.
        run_dir = Path(options.out)
        stored = resumed_options(options, run_dir, given) if args.resume else options
        if not args.resume:
            check_fresh_run_dir(run_dir)
        check_split(stored.batch_size, args.nproc, stored.accumulate)
        check_devices(stored.device, args.nproc)
        return launch(_without_nproc(argv), args.nproc)
    result = train(options, resume=args.resume, changed=given)
    if not result.metrics:  # a process other than rank 0 of a distributed run: rank 0 reports
        return 0
    stop = "stopped early, " if result.stopped_early else ""
    kept = "last epoch kept, " if result.metrics.get("kept") == "last" else ""
    print(
        f"\ntest split of {result.run_dir} ({stop}{kept}best epoch {result.best_epoch} of {result.epochs_run}):"
    )
    print(result.table())
    print(f"\nmetrics: {result.run_dir / 'metrics.json'}  model: {result.run_dir / 'model.pt'}")
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The arguments minus --nproc N / --nproc=N (the launched processes learn their number from torchrun)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept
