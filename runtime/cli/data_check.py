"""`polysense data check MANIFEST`: the data check's report in the terminal, and as JSON or HTML files."""

from __future__ import annotations

import argparse


def add_check(kinds: argparse._SubParsersAction) -> None:
    check = kinds.add_parser(
        "check",
        help="check a manifest: missing and unreadable cells, duplicates and leakage, balance, audio and text "
        "quality, likely label errors",
    )
    check.add_argument("manifest", metavar="MANIFEST", help="the data manifest (.csv / .jsonl)")
    check.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    check.add_argument("--html", metavar="OUT", help="also write a small self-contained HTML page")
    labels = check.add_mutually_exclusive_group()
    labels.add_argument(
        "--label-errors",
        dest="label_errors",
        action="store_const",
        const=True,
        default=None,
        help="find likely label errors, or fail if scikit-learn and cleanlab are missing (default: find "
        "them where installed: pip install 'polysense[check]')",
    )
    labels.add_argument(
        "--no-label-errors", dest="label_errors", action="store_const", const=False, help="skip them"
    )
    check.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds of the label model (default 5)"
    )
    check.add_argument(
        "--near-image-bits",
        type=int,
        default=None,
        help="images whose 256-bit perceptual hashes differ in at most this many bits are near duplicates "
        "(default 32)",
    )
    check.add_argument(
        "--near-audio-db",
        type=float,
        default=None,
        help="recordings whose level grids differ by at most this many dB on average are near duplicates "
        "(default 0.8)",
    )
    check.add_argument("--seed", type=int, default=0, help="seeds the label model's folds (default 0)")
    check.add_argument("--no-progress", action="store_true")
    check.set_defaults(run=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from polysense.tools.data_check import CheckOptions, check_manifest, format_report
    from polysense.tools.data_check.html import write_html

    options = CheckOptions(label_errors=args.label_errors, folds=args.folds, seed=args.seed)
    if args.near_image_bits is not None:
        options = replace(options, near_image_bits=args.near_image_bits)
    if args.near_audio_db is not None:
        options = replace(options, near_audio_db=args.near_audio_db)
    report = check_manifest(args.manifest, options, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    if args.html:
        write_html(report, args.html)
        print(f"wrote {args.html}")
    return 0
