"""`polysense export`: its flags, generated from VariantPolicy (polysense.models.training.flags), and the command.
The runtime's `polysense` parser fills its `export` sub-parser with add_export_arguments when the command is used."""

from __future__ import annotations

import argparse

from polysense.export.variants import VariantPolicy
from polysense.export.writer import export_run
from polysense.models.training.flags import add_arguments, options_from_args

DESCRIPTION = (
    "Export a finished training run to a verified bundle: one ONNX graph per encoder and one for the fusion "
    "head, checked against torch, with int8/fp16 variants kept only where they pay."
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `polysense export` (a run folder, --out, one flag per VariantPolicy field) and its
    command."""
    parser.description = DESCRIPTION
    parser.add_argument("run_dir", help="a finished training run folder")
    parser.add_argument("--out", required=True, help="bundle folder to write (must not exist)")
    add_arguments(parser, VariantPolicy)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> int:
    """Export with the parsed `polysense export` arguments; print what was checked and kept."""
    policy: VariantPolicy = options_from_args(args, VariantPolicy)
    report = export_run(args.run_dir, args.out, progress=not args.no_progress, policy=policy)
    print(f"bundle: {report.bundle}")
    print(f"  end to end     max |probability difference| {report.end_to_end:.1e}")
    print(f"  size           {sum(report.sizes.values()) / 1e6:.2f} MB in {len(report.sizes)} files")
    if report.variants_table():
        print(report.variants_table())
    return 0
