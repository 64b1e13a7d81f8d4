"""Slim a bundle for the device it will run on: drop the variants that device never uses.

Only fp32 is required (it is the reference every other variant was checked against), so any other variant may
go. The description is rewritten first, atomically (a new file renamed over the old one), and the dropped files
are deleted after: an interruption leaves at worst an unlisted file behind, never a listed file missing.

The new description is not the one a signature (bundle.sig) covered: a signed bundle is slimmed only with a
private key, which signs the slimmed bundle anew (as `polysense edge` does); it is never left with a stale
signature.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from polysense.bundle.reader import open_bundle
from polysense.bundle.schema import DESCRIPTION_FILE
from polysense.bundle.signing import TrustedKeys, require_signing_key, sign_description
from polysense.errors import ConfigError

# What each target keeps: the variants meant for its device (plus fp32, always).
KEEP = {
    "cpu": ("cpu", "any"),
    "cuda": ("cuda", "any"),
    "fp32": (),
}


@dataclass(frozen=True)
class SlimResult:
    removed: tuple[str, ...]  # file names deleted
    freed_bytes: int
    kept: dict[str, tuple[str, ...]]  # component -> precisions left


def slim_bundle(
    path: str | os.PathLike,
    keep: str,
    key: str | os.PathLike | None = None,
    trusted_keys: TrustedKeys | None = None,
) -> SlimResult:
    """Remove from the bundle at `path` every variant but fp32 and those meant for `keep` (cpu, cuda, fp32).
    `key` (a private key, `polysense keygen`) signs the slimmed bundle, and is required when the bundle is
    signed; `trusted_keys`: the bundle must be signed by one of them before anything changes."""
    if keep not in KEEP:
        raise ConfigError(f"--keep {keep!r} is unknown; choose {', '.join(KEEP)}")
    # verified (and its signature, with trusted_keys): never rewrite the description of a damaged bundle
    bundle = open_bundle(path, trusted_keys=trusted_keys)
    require_signing_key(
        bundle.path,
        key,
        "slimming writes a new bundle.json, which its signature cannot cover: sign the slimmed bundle anew with "
        "--key KEY",
    )
    description = bundle.description
    components, removed, freed = {}, [], 0
    for name, component in description.components.items():
        variants = {
            precision: variant
            for precision, variant in component.variants.items()
            if precision == "fp32" or variant.device in KEEP[keep]
        }
        for precision, variant in component.variants.items():
            if precision not in variants:
                removed.append(variant.file)
                freed += variant.bytes
        components[name] = replace(component, variants=variants)
    slimmed = replace(description, components=components)
    _write_atomically(bundle.path / DESCRIPTION_FILE, json.dumps(slimmed.to_dict(), indent=2) + "\n")
    if (
        key is not None
    ):  # until then the old signature fails to verify: a crash leaves a refused bundle, not a lie
        sign_description(bundle.path, key)
    for file in removed:
        (bundle.path / file).unlink(missing_ok=True)
    return SlimResult(tuple(removed), freed, {n: c.precisions for n, c in components.items()})


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
