"""`polysense train`: the runtime's CLI hands the arguments after "train" to run_train, which parses them with
flags generated from TrainOptions (polysense.models.flags) and trains."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from polysense.models.flags import add_arguments
from polysense.models.flags import options_from_args as _options_from_args
from polysense.models.options import TrainOptions, flag, option_choices
from polysense.models.run_folder import RESUME_MAY_CHANGE
from polysense.models.train import train


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
    return parser


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return _options_from_args(args, TrainOptions)


def run_train(argv: Sequence[str]) -> int:
    """Parse `polysense train` arguments, train, print the test metrics. argparse exits on bad flags."""
    args = build_train_parser().parse_args(argv)
    given = {name for name in RESUME_MAY_CHANGE if any(a.split("=")[0] == flag(name) for a in argv)}
    result = train(options_from_args(args), resume=args.resume, changed=given)
    stop = "stopped early, " if result.stopped_early else ""
    print(f"\ntest split of {result.run_dir} ({stop}best epoch {result.best_epoch} of {result.epochs_run}):")
    print(result.table())
    print(f"\nmetrics: {result.run_dir / 'metrics.json'}  model: {result.run_dir / 'model.pt'}")
    return 0
