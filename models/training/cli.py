"""`polysense train`: its flags, generated from TrainOptions (polysense.models.training.flags), and the command.

The runtime's `polysense` parser holds a `train` sub-parser that it fills with add_train_arguments when the
command is used (the runtime never imports torch itself), so there is one parser tree and each flag is defined
once, here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Sequence
from pathlib import Path

from polysense.errors import ConfigError
from polysense.models.training.distributed.launch import check_devices, launch
from polysense.models.training.distributed.sharding import check_split
from polysense.models.training.flags import add_arguments, arguments_for, given_options
from polysense.models.training.flags import options_from_args as _options_from_args
from polysense.models.training.options import TrainOptions, option_choices
from polysense.models.training.run_folder import RESUME_MAY_CHANGE, check_fresh_run_dir, resumed_options
from polysense.models.training.train import train

DESCRIPTION = (
    "Train a multimodal classifier; the run folder (--out) receives checkpoints, config and metrics. Export it "
    "afterwards with `polysense export RUN_DIR --out BUNDLE`."
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `polysense train` (one per TrainOptions field, then --resume and --nproc) and its command."""
    parser.description = DESCRIPTION
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
    parser.set_defaults(run=train_command)


def build_train_parser() -> argparse.ArgumentParser:
    """`polysense train`'s parser on its own (library use and tests; the command line uses the runtime's tree)."""
    parser = argparse.ArgumentParser(prog="polysense train")
    add_train_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return _options_from_args(args, TrainOptions)


def run_train(argv: Sequence[str]) -> int:
    """`polysense train argv` without the rest of the command line. argparse exits on bad flags."""
    return train_command(build_train_parser().parse_args(argv))


def train_command(args: argparse.Namespace) -> int:
    """Train with the parsed `polysense train` arguments and print the test metrics (or start --nproc
    processes that do)."""
    started_by_torchrun = "WORLD_SIZE" in os.environ
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if started_by_torchrun and args.nproc not in (None, int(os.environ["WORLD_SIZE"])):
        raise ConfigError(
            f"--nproc {args.nproc} differs from torchrun's {os.environ['WORLD_SIZE']} processes; "
            "leave --nproc out under torchrun"
        )
    options = options_from_args(args)  # bad options fail here, once, before any process starts
    # Progress turned off, by --no-progress or by `polysense` (--quiet, no terminal), counts as asked for.
    given = given_options(args) | ({"progress"} if not options.progress else set())
    changed = given & set(RESUME_MAY_CHANGE)
    if not started_by_torchrun and (args.nproc or 1) > 1:
        # What can be checked here is, so that a mistake gives one message instead of one per process.
        run_dir = Path(options.out)
        stored = resumed_options(options, run_dir, changed) if args.resume else options
        if not args.resume:
            check_fresh_run_dir(run_dir)
        check_split(stored.batch_size, args.nproc, stored.accumulate)
        check_devices(stored.device, args.nproc)
        return launch(relaunch_arguments(args, given), args.nproc)
    result = train(options, resume=args.resume, changed=changed)
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


def relaunch_arguments(args: argparse.Namespace, given: Collection[str]) -> list[str]:
    """The `polysense train` arguments each launched process gets: the options given here (so that each
    process resumes with the same changes) and --resume, without --nproc (they learn their number from
    torchrun)."""
    arguments = arguments_for(TrainOptions, {name: getattr(args, name) for name in given})
    return [*arguments, "--resume"] if args.resume else arguments
