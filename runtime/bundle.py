"""The bundle: a folder with bundle.json, one ONNX file per component and precision, tokenizer.json.

Export writes it (polysense.export); the runtime opens it here, refusing anything it cannot trust: a missing
file, a hash that does not match, a description it cannot read or of a schema version it does not know.
Nothing in a bundle is ever unpickled. The description itself is typed in polysense.schema.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from polysense.errors import BundleError, InputError
from polysense.schema import DESCRIPTION_FILE, LEGACY_DESCRIPTION_FILE, BundleDescription

MAX_DESCRIPTION_BYTES = 4 << 20
_EXPORT_AGAIN = "export it again with `polysense export RUN_DIR --out BUNDLE`"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    description: BundleDescription

    def file(self, component: str, precision: str = "fp32") -> Path:
        return self.path / self.description.component(component).variant(precision).file


def read_description(path: Path) -> BundleDescription:
    """The typed description in bundle folder `path` (no file checks)."""
    description_path = path / DESCRIPTION_FILE
    if not description_path.is_file():
        if (path / LEGACY_DESCRIPTION_FILE).is_file():
            raise BundleError(
                f"{path} was exported by an older polysense (bundle schema 1, {LEGACY_DESCRIPTION_FILE}); "
                f"this version reads schema 2: {_EXPORT_AGAIN}"
            )
        raise BundleError(
            f"{path} has no {DESCRIPTION_FILE}: not a polysense bundle (or an export that did not finish); "
            f"{_EXPORT_AGAIN}"
        )
    size = description_path.stat().st_size
    if size > MAX_DESCRIPTION_BYTES:
        raise BundleError(
            f"{description_path} is {size:,} bytes; a bundle description is a few KB (at most "
            f"{MAX_DESCRIPTION_BYTES:,}): it is not one polysense wrote; {_EXPORT_AGAIN}"
        )
    try:
        data = json.loads(description_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BundleError(f"{description_path} is not valid JSON ({error}); {_EXPORT_AGAIN}") from error
    try:
        return BundleDescription.from_dict(data)
    except BundleError as error:
        raise BundleError(f"{path}: {error}; {_EXPORT_AGAIN}") from error


def _without_removed_variants(path: Path, description: BundleDescription) -> BundleDescription:
    """Only fp32 is required: a variant whose file was deleted (to slim a bundle for its device) is dropped
    from the description instead of making the bundle unloadable."""
    components = {}
    for name, component in description.components.items():
        kept = {p: v for p, v in component.variants.items() if p == "fp32" or (path / v.file).is_file()}
        components[name] = replace(component, variants=kept)
    return replace(description, components=components)


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open and verify a bundle folder: its description, every listed file present with its sha256."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"bundle not found: {path}")
    if not path.is_dir():
        raise BundleError(f"{path} is a file; a bundle is the folder `polysense export` writes")
    description = _without_removed_variants(path, read_description(path))
    for name, sha256 in description.files():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: {name} is missing; copy the whole bundle folder, or export it again")
        if sha256_file(file) != sha256:
            raise BundleError(
                f"{path}: {name} does not match its sha256 in {DESCRIPTION_FILE}: the file was altered "
                "or corrupted (truncated copy?); copy the bundle again or export it again"
            )
    return Bundle(path, description)
