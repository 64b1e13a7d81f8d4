"""`polysense data anonymize MANIFEST --out DIR`: a de-identified copy of a dataset (polysense.deid)."""

from __future__ import annotations

import argparse

from polysense.deid.faces import FaceOptions
from polysense.deid.images import IMAGE_MODES
from polysense.deid.text import KINDS


def add_anonymize(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "anonymize",
        help="write a de-identified copy of a dataset: faces blurred, PII in text replaced, voices transformed",
        description="Reads MANIFEST (never changing its files) and writes, in the new folder --out, anonymized "
        "images and audio, manifest.csv and report.json (per row: what was found and changed). "
        "See docs/privacy.md for what each step protects against and what it does not.",
    )
    parser.add_argument("manifest", metavar="MANIFEST", help="the dataset's manifest (.csv or .jsonl)")
    parser.add_argument("--out", required=True, help="a new or empty folder for the anonymized copy")
    parser.add_argument(
        "--images", choices=IMAGE_MODES, default="blur", help="faces blurred, boxed out in black, or kept"
    )
    parser.add_argument(
        "--text",
        choices=("replace", "keep"),
        default="replace",
        help=f"personal information ({', '.join(KINDS)}) replaced by <KIND>, or text kept (default replace)",
    )
    parser.add_argument(
        "--audio", choices=("mcadams", "keep"), default="mcadams", help="voices transformed, or kept"
    )
    parser.add_argument("--alpha", type=float, default=0.8, help="McAdams coefficient (default 0.8)")
    parser.add_argument(
        "--phone-region", default="US", help="country of phone numbers written without +code (default US)"
    )
    parser.add_argument(
        "--face-threshold",
        type=float,
        default=FaceOptions().threshold,
        help=f"lowest face probability blurred (default {FaceOptions().threshold}; lower finds more)",
    )
    parser.add_argument(
        "--keep-speakers", action="store_true", help="keep the speaker column's names (default: pseudonyms)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=_run_anonymize)


def _run_anonymize(args: argparse.Namespace) -> int:
    from polysense.deid.anonymize import AnonymizeOptions, anonymize_manifest
    from polysense.deid.images import ImageOptions
    from polysense.deid.mcadams import VoiceOptions
    from polysense.deid.text import TextOptions

    options = AnonymizeOptions(
        images=ImageOptions(args.images, faces=FaceOptions(threshold=args.face_threshold)),
        text=TextOptions(phone_region=args.phone_region) if args.text == "replace" else None,
        audio=VoiceOptions(alpha=args.alpha) if args.audio == "mcadams" else None,
        pseudonymize_speakers=not args.keep_speakers,
    )
    result = anonymize_manifest(args.manifest, args.out, options, progress=not args.no_progress)
    replaced = ", ".join(f"{k} {n}" for k, n in sorted(result.text_findings.items())) or "none"
    faces = {"blur": f"{result.faces} faces blurred", "box": f"{result.faces} faces boxed out"}
    print(
        f"wrote {result.manifest}: {result.rows} rows; {result.files['image']} images "
        f"({faces.get(args.images, 'copied as they are')}), "
        f"{result.files['audio']} recordings; text replaced: {replaced}; report: {result.report}"
    )
    return 0
