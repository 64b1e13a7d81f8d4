"""The commands about a bundle folder itself: `polysense info` and `polysense bundle slim`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polysense.bundle.schema import PRECISIONS
from polysense.bundle.slim import KEEP
from polysense.cli.predict import add_trusted_key


def add_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="describe a bundle")
    info.add_argument("bundle", help="bundle folder, or the .tar `polysense edge --tar` writes")
    info.add_argument("--json", action="store_true", help="print the whole bundle description (bundle.json)")
    add_trusted_key(info, "check that the bundle is signed by this public key (repeatable)")
    info.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from polysense.bundle.archive import is_archive, unpacked
    from polysense.bundle.reader import open_bundle
    from polysense.bundle.signing import TrustedKeys

    trusted = TrustedKeys.parse(args.trusted_key) if args.trusted_key else None
    if is_archive(args.bundle):  # an edge bundle's .tar, checked as Pipeline.load checks it
        with unpacked(args.bundle) as folder:
            description = open_bundle(folder, trusted_keys=trusted).description
        path = Path(args.bundle)
    else:
        bundle = open_bundle(args.bundle, trusted_keys=trusted)
        description, path = bundle.description, bundle.path
    if args.json:
        print(json.dumps(description.to_dict(), indent=2))
        return 0
    made_by = description.producer.get("polysense", "?")
    print(f"{path}: schema {description.schema_version}, made by polysense {made_by}")
    print(f"  labels ({len(description.labels)}): {', '.join(description.labels)}")
    print(f"  modalities: {', '.join(description.modalities)}; embedding size {description.embed_dim}")
    for name, component in description.components.items():
        files = ", ".join(f"{p} {v.bytes / 1e3:.0f} kB" for p, v in component.variants.items())
        inputs = ", ".join(f"{t.name}{list(t.shape)}" for t in component.inputs)
        print(f"  {name:<14} {files}; inputs {inputs}")
    for modality in ("image", "text", "audio"):  # a frozen front end: where its graphs came from
        settings = getattr(description.preprocessing, modality)
        if settings is not None and settings.graphs:
            graphs = ", ".join(
                f"{g.file} ({g.package} {g.version}: {g.source})"
                if g.package
                else f"{g.file} (from {g.source})"
                for g in settings.graphs
            )
            print(f"  {modality} front end, frozen: {graphs}")
    fp32 = description.metrics.get("fp32", {})
    if isinstance(fp32, dict) and isinstance(fp32.get("accuracy"), (int, float)):
        print(f"  test accuracy at export: {fp32['accuracy']:.4f}")
    privacy = description.privacy
    if privacy is not None:
        print(
            f"  trained with differential privacy: epsilon {privacy.epsilon:.3g} spent (asked "
            f"{privacy.target_epsilon:.3g}), delta {privacy.delta:.1e}, rows' gradients clipped to "
            f"{privacy.max_grad_norm:g}, noise multiplier {privacy.noise_multiplier:.3f}, {privacy.accountant} "
            f"accountant, {privacy.steps} steps"
        )
    if trusted is not None:
        print("  signature: valid, by a trusted key (bundle.sig over bundle.json)")
    return 0


def add_bundle(commands: argparse._SubParsersAction) -> None:
    bundle = commands.add_parser("bundle", help="manage a bundle folder")
    actions = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    slim = actions.add_parser(
        "slim",
        help="remove the variants a device never uses (fp32 always stays)",
        description="Remove the variants a device never uses and rewrite bundle.json atomically. "
        "cpu keeps fp32 and int8, cuda keeps fp32 and fp16, fp32 keeps fp32 only. A signed bundle (bundle.sig) "
        "needs --key KEY: the slimmed bundle is signed anew.",
    )
    slim.add_argument("bundle", help="bundle folder (changed in place)")
    slim.add_argument("--keep", choices=tuple(KEEP), required=True, help="the device the bundle is for")
    slim.add_argument(
        "--key",
        help="sign the slimmed bundle with this private key (`polysense keygen`); required for a signed bundle",
    )
    add_trusted_key(slim, "refuse the bundle unless it is signed by this public key (repeatable)")
    slim.set_defaults(run=_run_slim)
    sign = actions.add_parser(
        "sign",
        help="sign the bundle's description (bundle.json, which holds every file's sha256) with an Ed25519 key",
        description="Check every file against bundle.json, then write bundle.sig: an Ed25519 signature over "
        "bundle.json by KEY (from `polysense keygen`). Load it with --trusted-key KEY.pub / trusted_keys=.",
    )
    sign.add_argument("bundle", help="bundle folder (bundle.sig is written into it)")
    sign.add_argument("--key", required=True, help="the private key `polysense keygen --out KEY` wrote")
    sign.set_defaults(run=_run_sign)


def add_keygen(commands: argparse._SubParsersAction) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing bundles: KEY (private, mode 0600) and KEY.pub",
    )
    keygen.add_argument("--out", required=True, help="the private key file to write (never written over)")
    keygen.set_defaults(run=_run_keygen)


def _run_keygen(args: argparse.Namespace) -> int:
    from polysense.bundle.signing import TrustedKeys, generate_key

    private, public = generate_key(args.out)
    (fingerprint,) = TrustedKeys.parse(public).keys
    print(f"wrote {private} (private: keep it secret; mode 0600) and {public} (public: for --trusted-key)")
    print(f"key id {fingerprint}")
    return 0


def _run_sign(args: argparse.Namespace) -> int:
    from polysense.bundle.reader import open_bundle
    from polysense.bundle.signing import sign_description
    from polysense.errors import ConfigError

    if Path(args.bundle).is_file():
        raise ConfigError(
            f"{args.bundle}: sign a bundle folder (an edge .tar is signed as it is made: polysense edge --key)"
        )
    bundle = open_bundle(args.bundle)  # every file checked against bundle.json: never sign a damaged bundle
    written = sign_description(bundle.path, args.key)
    print(
        f"wrote {written}: {bundle.path / 'bundle.json'} and the {len(bundle.description.files())} files it hashes"
    )
    return 0


def _run_slim(args: argparse.Namespace) -> int:
    from polysense.bundle.signing import TrustedKeys
    from polysense.bundle.slim import slim_bundle

    trusted = TrustedKeys.parse(args.trusted_key) if args.trusted_key else None
    result = slim_bundle(args.bundle, args.keep, key=args.key, trusted_keys=trusted)
    kept = "; ".join(f"{name} {', '.join(precisions)}" for name, precisions in result.kept.items())
    print(
        f"removed {len(result.removed)} file(s), {result.freed_bytes / 1e6:.1f} MB: {', '.join(result.removed) or '-'}"
    )
    print(f"kept: {kept}")
    if args.key is not None:
        print(f"signed anew: {Path(args.bundle) / 'bundle.sig'}")
    return 0


def add_edge(commands: argparse._SubParsersAction) -> None:
    edge = commands.add_parser(
        "edge",
        help="an edge bundle: one variant per component in ORT format, with the operator list for a minimal "
        "onnxruntime build",
    )
    edge.add_argument("bundle", help="the full bundle folder (what `polysense export` writes)")
    edge.add_argument("--out", required=True, help="the edge bundle folder to write (new or empty)")
    edge.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="keep the variants auto picks there (default cpu)",
    )
    edge.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="the variant kept per component (default auto: the fastest kept for --device; fp32 for a device "
        "where int8 does not pay, as polysense tune finds)",
    )
    edge.add_argument("--tar", action="store_true", help="write one OUT.tar file instead of a folder")
    edge.add_argument(
        "--no-probe",
        action="store_true",
        help="leave out probe.npz (smaller; the edge bundle then cannot be checked with polysense tune)",
    )
    edge.add_argument(
        "--key",
        help="sign the edge bundle with this private key (`polysense keygen`); required for a signed bundle",
    )
    add_trusted_key(edge, "refuse the source bundle unless it is signed by this public key (repeatable)")
    edge.set_defaults(run=_run_edge)


def _run_edge(args: argparse.Namespace) -> int:
    from polysense.bundle.signing import TrustedKeys
    from polysense.tools.edge import make_edge_bundle

    result = make_edge_bundle(
        args.bundle,
        args.out,
        device=args.device,
        archive=args.tar,
        probe=not args.no_probe,
        key=args.key,
        trusted_keys=TrustedKeys.parse(args.trusted_key) if args.trusted_key else None,
        precision=args.precision,
    )
    kept = ", ".join(f"{name} {precision}" for name, precision in result.precisions.items())
    share = result.bytes / result.source_bytes if result.source_bytes else float("nan")
    print(
        f"wrote {result.path}: {kept}; {result.bytes / 1e6:.2f} MB ({share:.0%} of the full bundle's files)"
    )
    print("minimal onnxruntime build (from an onnxruntime source checkout):")
    if args.tar:  # the command names the operator list beside the .tar, where this puts it
        print(f"  tar -xf {result.path} -C {result.path.parent} required_operators.config")
    print(f"  {result.build_command}")
    return 0


def add_tune(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune",
        help="measure every kept variant on this device; precision auto then uses the choice (tuning.json)",
    )
    tune.add_argument("bundle")
    tune.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default cpu)")
    tune.add_argument(
        "--threads", type=int, default=0, help="onnxruntime threads, as the application will run"
    )
    tune.add_argument(
        "--data",
        help="make the probe from this manifest first (its val split if it has one; for bundles without probe.npz)",
    )
    tune.add_argument("--json", action="store_true", help="print the measurements as JSON")
    tune.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polysense.errors import ConfigError
    from polysense.tools.tune import tune_bundle

    if args.threads < 0:
        raise ConfigError("--threads cannot be negative (0 = one per core)")
    if args.data is not None:
        _probe_from_manifest(args.bundle, args.data)
    result = tune_bundle(Path(args.bundle), device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps({"choices": result.choices, "measurements": result.measurements}, indent=2))
        return 0
    for name, variants in result.measurements.items():
        shown = ", ".join(
            f"{p} {m['latency_ms']:.3f} ms agree {m['agreement']:.1%}" for p, m in variants.items()
        )
        print(f"{name:<14} -> {result.choices[name]:<5} ({shown})")
    print(f"wrote {result.path}; precision auto now uses it on {args.device}")
    return 0


def _probe_from_manifest(bundle: str, manifest: str) -> None:
    from polysense.inference.pipeline import Pipeline
    from polysense.tools.manifest import read_manifest
    from polysense.tools.tune import PROBE_SAMPLES, write_probe

    data = read_manifest(manifest, labelled=False)
    rows, _ = data.usable_rows()
    rows = [r for r in rows if r.split == "val"] or rows
    pipeline = Pipeline.load(bundle, device="cpu", precision="fp32")
    samples = [{m: getattr(r, m) for m in pipeline.modalities if getattr(r, m) is not None} for r in rows]
    count = write_probe(pipeline, [s for s in samples if s][:PROBE_SAMPLES], bundle)
    print(f"probe: {count} samples from {manifest}")
