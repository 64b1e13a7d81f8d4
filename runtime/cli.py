"""The `polysense` command. Subcommands import their heavy parts lazily, so `polysense --help` is instant
and the runtime-only commands work without torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from polysense.errors import DependencyError, PolysenseError

log = logging.getLogger("polysense")


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="write datasets")
    kinds = data.add_subparsers(dest="kind", required=True, metavar="KIND")
    builtin = kinds.add_parser(
        "builtin", help="write the built-in tri-modal dataset (JPEG, WAV, text, manifest.csv)"
    )
    builtin.add_argument("--out", required=True, help="folder to write (must not hold a dataset yet)")
    builtin.add_argument("--n", type=int, default=3000, help="number of samples (default 3000)")
    builtin.add_argument(
        "--seed", type=int, default=0, help="the same seed writes the same files (default 0)"
    )
    builtin.set_defaults(run=_run_data_builtin)


def _run_data_builtin(args: argparse.Namespace) -> int:
    from polysense.builtin import BuiltinSpec, write_builtin

    manifest = write_builtin(args.out, BuiltinSpec(n=args.n, seed=args.seed))
    print(f"wrote {args.n} samples; manifest: {manifest}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a multimodal classifier (needs the train extra: torch)")
    train.add_argument(
        "--data", required=True, help="manifest (.csv/.jsonl), or 'builtin' for the built-in set"
    )
    train.add_argument("--out", required=True, help="run folder for checkpoints, config and metrics")
    train.add_argument(
        "--modalities", help="comma-separated subset, e.g. image,audio (default: all in the data)"
    )
    train.add_argument("--strategy", choices=("joint", "staged"), default="joint")
    train.add_argument("--epochs", type=int, default=12, help="joint epochs, or fusion epochs when staged")
    train.add_argument("--pretrain-epochs", type=int, default=4, help="staged: encoder pre-training epochs")
    train.add_argument(
        "--finetune-encoders", action="store_true", help="staged: train encoders with the fusion"
    )
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--modality-dropout", type=float, default=0.5, help="share of samples shown a subset")
    train.add_argument("--patience", type=int, default=4, help="early stopping patience in epochs (0: off)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--image-size", type=int, default=64)
    train.add_argument("--image-width", type=int, default=24, help="CNN width")
    train.add_argument("--embed-dim", type=int, default=128)
    train.add_argument("--text-encoder", default="gru", help="gru or transformer")
    train.add_argument("--fusion", default="concat", help="concat, attention or transformer")
    train.add_argument("--max-text-length", type=int, default=64, help="tokens kept per text")
    train.add_argument("--n", dest="builtin_n", type=int, default=3000, help="samples for --data builtin")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    return _training_module("polysense.models.cli").run_train(args)


def _training_module(name: str):
    """Training commands live in polysense.models (torch). The runtime never imports it statically, so an
    edge install without torch still has a working `polysense` command; here it is loaded on demand."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise DependencyError(
            f"this command needs the training extra ({error}); install it with: "
            "pip install torch==2.13.0 && pip install 'polysense[train]'"
        ) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polysense", description="Multimodal classifiers, trained and served."
    )
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(commands)
    _add_train(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            return args.run(args)
    except PolysenseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
