"""Edge bundles: one variant per component, in onnxruntime's ORT format, with the operator list for a minimal
onnxruntime build (`polysense edge BUNDLE --out DIR`).

Each component keeps the variant `precision="auto"` picks on the target device (from the latencies export
measured), converted to ORT format after onnxruntime's "extended" graph optimizations: fusions that hold on
any CPU, none of the layout changes "all" makes for the exporting machine's vector units. The description
(schema version 3) lists the .ort files with their hashes; `Pipeline.load` serves it exactly like a full bundle.
`required_operators.config` names every operator and type the graphs use, for onnxruntime's reduced build;
its first lines give the build command. `--tar` packs the whole bundle into one file that `Pipeline.load`
opens directly (polysense.bundle.archive).

Signatures: an edge bundle's bundle.json is new (other files, other hashes), so the source's signature cannot
cover it; `--key KEY` signs the edge bundle as it is made (and a signed source requires it), `--trusted-key`
first checks the source's signature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from polysense.bundle.reader import Bundle, open_bundle
from polysense.bundle.schema import DESCRIPTION_FILE, EDGE_SCHEMA_VERSION
from polysense.bundle.signing import TrustedKeys, require_signing_key, sign_description
from polysense.errors import ConfigError, DependencyError
from polysense.inference.precision import choose_precisions
from polysense.inference.sessions import import_onnxruntime
from polysense.tools.tune import PROBE_FILE

OPERATORS_FILE = "required_operators.config"
OPTIMIZATION = {
    "cpu": "extended",
    "cuda": "basic",
}  # what an edge bundle's graphs are optimized with, per device
BUILD_COMMAND = (
    "python tools/ci_build/build.py --build_dir build/minimal --config MinSizeRel --minimal_build "
    "--disable_ml_ops --disable_exceptions --include_ops_by_config {config} "
    "--enable_reduced_operator_type_support --build_wheel --skip_tests"
)


@dataclass(frozen=True)
class EdgeResult:
    path: Path  # the edge bundle folder (or the .tar with --tar)
    precisions: dict[str, str]  # component -> the variant kept
    bytes: int  # the edge bundle's files, all together
    source_bytes: int  # the source bundle's files, all together
    build_command: str


def make_edge_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    device: str = "cpu",
    archive: bool = False,
    probe: bool = True,
    key: str | os.PathLike | None = None,
    trusted_keys: TrustedKeys | None = None,
    precision: str = "auto",
) -> EdgeResult:
    """Write the edge bundle of `bundle` for `device` (cpu or cuda) to the folder `out` (or `out`.tar); with
    `probe`, the source's probe.npz too, so `polysense tune` can check the bundle on its device. `key` signs
    the edge bundle (see above); `trusted_keys`: the source must be signed by one of them. `precision`: the
    variant kept per component, chosen as `Pipeline.load(precision=...)` chooses (auto: the fastest kept for
    `device`; fp32: fp32 throughout, for a device where int8 does not pay)."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: an edge bundle is made for cpu or cuda")
    source = open_bundle(bundle, trusted_keys=trusted_keys)  # verified: never convert a damaged bundle
    require_signing_key(  # a wrong key fails now, not after the conversion
        source.path,
        key,
        "its edge bundle has a new bundle.json, which the source's signature cannot cover: sign the edge bundle "
        "as it is made with --key KEY",
    )
    description = source.description
    if description.is_edge:
        raise ConfigError(f"{bundle} is an edge bundle already; make edge bundles from the full bundle")
    target = _target(Path(out), archive)
    chosen = choose_precisions(description, list(description.components), device, precision)
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.is_dir() else None) as work:
        folder = Path(work) / "edge"
        folder.mkdir()
        components = {}
        for name, precision in chosen.items():
            variant = description.component(name).variant(precision)
            file = f"{name}.{precision}.ort"
            data = _to_ort_format(source.read(variant.file), folder / file, device)
            kept = replace(variant, file=file, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            components[name] = replace(description.component(name), variants={precision: kept})
        _copy_extras(source, folder, probe)
        producer = {
            **description.producer,
            "edge": {"device": device, "format": "ort", "optimization": OPTIMIZATION[device]},
        }
        edge = replace(
            description, components=components, producer=producer, schema_version=EDGE_SCHEMA_VERSION
        )
        (folder / DESCRIPTION_FILE).write_text(json.dumps(edge.to_dict(), indent=2) + "\n", encoding="utf-8")
        models = [folder / components[name].variants[precision].file for name, precision in chosen.items()]
        command = _write_operator_config(folder, models, _config_path(target, archive))
        if key is not None:
            sign_description(folder, key)
        size = sum(f.stat().st_size for f in folder.iterdir())
        _place(folder, target, archive)
    source_size = sum(f.stat().st_size for f in source.path.iterdir() if f.is_file())
    return EdgeResult(target, dict(chosen), size, source_size, command)


def _target(out: Path, archive: bool) -> Path:
    """Where the edge bundle goes (`out`, or `out`.tar), refused if that would write over anything."""
    target = out.with_name(out.name + ".tar") if archive else out
    if not target.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {target.parent} does not exist; create it first")
    if target.exists() and (archive or not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} exists; choose a new name (an edge bundle is never written over files)")
    return target


def _place(folder: Path, target: Path, archive: bool) -> None:
    """The finished edge bundle from its working folder to `target`: a .tar, or the files moved."""
    if archive:
        from polysense.bundle.archive import write_archive

        write_archive(folder, target)
    else:
        target.mkdir(exist_ok=True)
        for written in folder.iterdir():
            shutil.move(str(written), target / written.name)


def _copy_extras(source: Bundle, folder: Path, probe: bool) -> None:
    """The files the preprocessors read (a tokenizer, a frozen audio front end's graphs; checked against their
    hashes) and, with `probe`, probe.npz: so the edge bundle can be tuned."""
    for name, _ in source.description.preprocessing.files():
        (folder / name).write_bytes(source.read(name))
    if probe and (source.path / PROBE_FILE).is_file():
        shutil.copyfile(source.path / PROBE_FILE, folder / PROBE_FILE)


def _to_ort_format(model: bytes, path: Path, device: str) -> bytes:
    """Save `model` (ONNX bytes) in ORT format at `path`: for a CPU, after the optimizations that hold on any CPU;
    for CUDA, after the basic ones only (the conversion runs on the CPU provider here, and "extended" would bake
    its CPU-only kernels and fp32 fallbacks into an fp16 graph meant for the GPU)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    level = {"extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}[OPTIMIZATION[device]]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return path.read_bytes()


def _config_path(target: Path, archive: bool) -> Path:
    """Where required_operators.config will be for the build: in the edge bundle folder, or (from a .tar) beside
    it once extracted (`tar -xf OUT.tar required_operators.config`)."""
    folder = target.parent if archive else target
    return folder.resolve() / OPERATORS_FILE


def _write_operator_config(folder: Path, models: list[Path], final: Path) -> str:
    """required_operators.config for the ORT-format `models`; returns the build command naming it at `final`
    (where it will be), also written at the file's top."""
    create_config = _import_config_tool()
    config = folder / OPERATORS_FILE
    create_config(models, config, enable_type_reduction=True)
    command = BUILD_COMMAND.format(config=shlex.quote(str(final)))
    lines = [line for line in config.read_text().splitlines() if not line.startswith("# -")]
    header = [
        "# The operators and types of this edge bundle's graphs. Build a minimal onnxruntime for them from an",
        "# onnxruntime source checkout (https://onnxruntime.ai/docs/build/custom.html) with:",
        f"#   {command}",
    ]
    config.write_text("\n".join(header + lines) + "\n")
    return command


def _import_config_tool():
    """onnxruntime's reduced-build config writer. Its package imports torch when torch is installed (for
    helpers polysense does not use); the runtime never loads torch, so torch is hidden while it imports."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # typeshed omits None, the documented block; find_spec("torch") is then None: the package skips its torch helpers
    try:
        from onnxruntime.tools.ort_format_model import create_config_from_models
    except ImportError as error:
        raise DependencyError(
            f"onnxruntime's ORT-format tools cannot be imported ({error}); reinstall onnxruntime"
        ) from error
    finally:
        if hide:
            del sys.modules["torch"]
    # Its logger (set to DEBUG as it loads) says "Created config in <path>": a temporary path, gone once the
    # bundle is placed; polysense says where the file is.
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    return create_config_from_models
