"""`polysense export`: the runtime's CLI hands the arguments after "export" to run_export, which parses them
with flags generated from VariantPolicy (polysense.models.training.flags) and exports."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from polysense.export.variants import VariantPolicy
from polysense.export.writer import export_run
from polysense.models.training.flags import add_arguments, options_from_args


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polysense export",
        description="Export a finished training run to a verified bundle: one ONNX graph per encoder and one "
        "for the fusion head, checked against torch, with int8/fp16 variants kept only where they pay.",
    )
    parser.add_argument("run_dir", help="a finished training run folder")
    parser.add_argument("--out", required=True, help="bundle folder to write (must not exist)")
    add_arguments(parser, VariantPolicy)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_export(argv: Sequence[str]) -> int:
    """Parse `polysense export` arguments, export, print what was checked and kept."""
    args = build_export_parser().parse_args(argv)
    policy: VariantPolicy = options_from_args(args, VariantPolicy)
    report = export_run(args.run_dir, args.out, progress=not args.no_progress, policy=policy)
    print(f"bundle: {report.bundle}")
    print(f"  end to end     max |probability difference| {report.end_to_end:.1e}")
    print(f"  size           {sum(report.sizes.values()) / 1e6:.2f} MB in {len(report.sizes)} files")
    if report.variants_table():
        print(report.variants_table())
    return 0
