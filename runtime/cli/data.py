"""`polysense data KIND`: write datasets (built-in, AV-digits, SST-2) as manifests the other commands read.
Each kind is a sub-command added here; its heavy parts are imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from polysense.cli.data_anonymize import add_anonymize
from polysense.cli.data_check import add_check
from polysense.tools.manifest import SPLITS


def add_data(commands: argparse._SubParsersAction) -> None:
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
    builtin.add_argument("--no-progress", action="store_true")
    builtin.set_defaults(run=_run_data_builtin)
    avdigits = kinds.add_parser(
        "avdigits", help="pair FSDD spoken digits with sign-digit photos (a manifest)"
    )
    avdigits.add_argument("--fsdd", required=True, help="FSDD folder (e.g. ../shared/data/fsdd)")
    avdigits.add_argument("--images", required=True, help="photo folder with sub-folders 0-9")
    avdigits.add_argument("--out", required=True, help="folder for manifest.csv (files are not copied)")
    avdigits.add_argument("--seed", type=int, default=0)
    avdigits.add_argument(
        "--holdout-speaker", help="put every recording of this speaker in test, none in train/val"
    )
    avdigits.set_defaults(run=_run_data_avdigits)
    sst2 = kinds.add_parser("sst2", help="SST-2 sentences (text, label): dev as test, part of train as val")
    sst2.add_argument("--dir", required=True, help="folder with train.tsv and dev.tsv (../shared/data/sst2)")
    sst2.add_argument("--out", required=True, help="folder for manifest.csv")
    sst2.add_argument("--val-share", type=float, default=0.1, help="share of train held out (default 0.1)")
    sst2.add_argument("--seed", type=int, default=0)
    sst2.set_defaults(run=_run_data_sst2)
    add_check(kinds)
    add_anonymize(kinds)


def _run_data_builtin(args: argparse.Namespace) -> int:
    from polysense.datasets.builtin import BuiltinSpec, write_builtin

    manifest = write_builtin(args.out, BuiltinSpec(n=args.n, seed=args.seed), progress=not args.no_progress)
    print(f"wrote {args.n} samples; manifest: {manifest}")
    return 0


def _run_data_sst2(args: argparse.Namespace) -> int:
    from polysense.datasets.sst2 import SST2Spec, write_sst2

    return _wrote(write_sst2(SST2Spec(args.dir, args.val_share, args.seed), args.out))


def _run_data_avdigits(args: argparse.Namespace) -> int:
    from polysense.datasets.avdigits import AVDigitsSpec, write_avdigits

    spec = AVDigitsSpec(args.fsdd, args.images, args.seed, args.holdout_speaker)
    return _wrote(write_avdigits(spec, args.out))


def _wrote(manifest: Path) -> int:
    """Say where a data manifest was written and how many rows each split got."""
    from collections import Counter

    from polysense.tools.manifest import read_manifest

    counts = Counter(row.split for row in read_manifest(manifest).rows)
    print(f"wrote {manifest}: " + ", ".join(f"{split} {counts[split]}" for split in SPLITS))
    return 0
