"""The bundle: a folder with bundle.json, one ONNX file per component and precision, tokenizer.json.

Export writes it (polysense.export); the runtime opens it here, refusing anything it cannot trust: a missing
file, a hash that does not match, a description it cannot read or of a schema version it does not know.
Nothing in a bundle is ever unpickled. The description itself is typed in polysense.bundle.schema.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from polysense.bundle.schema import DESCRIPTION_FILE, LEGACY_DESCRIPTION_FILE, BundleDescription
from polysense.bundle.signing import TrustedKeys, verify_description
from polysense.errors import BundleError, InputError

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
    path: Path  # resolved: every file of the bundle lies inside it
    description: BundleDescription

    def file(self, component: str, precision: str = "fp32") -> Path:
        return self.path / self.description.component(component).variant(precision).file

    def read(self, name: str) -> bytes:
        """The bytes of file `name`, read once and checked against the sha256 the description lists for it:
        callers hand these same bytes on (to onnxruntime, to the tokenizer), so the file cannot change
        between the check and its use."""
        data = _inside(self.path, name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self._sha256(name):
            raise _altered(self.path, name)
        return data

    def verify(self, skip: Iterable[str] = ()) -> None:
        """Hash every listed file (but `skip`, read with `read`) against the description."""
        skipped = set(skip)
        for name, sha256 in self.description.files():
            if name not in skipped and sha256_file(_inside(self.path, name)) != sha256:
                raise _altered(self.path, name)

    def _sha256(self, name: str) -> str:
        listed = dict(self.description.files())
        if name not in listed:
            raise BundleError(f"{self.path}: {name} is not listed in {DESCRIPTION_FILE}")
        return listed[name]


def _altered(path: Path, name: str) -> BundleError:
    return BundleError(
        f"{path}: {name} does not match its sha256 in {DESCRIPTION_FILE}: the file was altered "
        "or corrupted; copy the bundle again or export it again"
    )


def _inside(folder: Path, name: str) -> Path:
    """folder/name with links resolved, refused unless it is a file inside `folder` (itself resolved)."""
    try:
        resolved = (folder / name).resolve()
        is_file = resolved.is_file()
    except (OSError, RuntimeError) as error:  # a link loop, a name the file system refuses
        raise BundleError(f"{folder}: {name!r} cannot be opened ({error})") from error
    if not resolved.is_relative_to(folder):
        raise BundleError(
            f"{folder}: {name} links to {resolved}, outside the bundle folder; a bundle must hold its own "
            "files (copy them in instead of linking)"
        )
    if not is_file:
        raise BundleError(f"{folder}: {name} is missing; copy the whole bundle folder, or export it again")
    return resolved


def read_description(path: Path, trusted_keys: TrustedKeys | None = None) -> BundleDescription:
    """The typed description in bundle folder `path` (no file checks). With `trusted_keys`, its bytes must carry
    a valid signature (bundle.sig) by one of them; the same bytes are then parsed."""
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
    raw = description_path.read_bytes()
    if trusted_keys is not None:
        verify_description(path, raw, trusted_keys)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BundleError(f"{description_path} is not valid JSON ({error}); {_EXPORT_AGAIN}") from error
    try:
        return BundleDescription.from_dict(data)
    except BundleError as error:
        raise BundleError(f"{path}: {error}; {_EXPORT_AGAIN}") from error


def _without_removed_variants(path: Path, description: BundleDescription) -> BundleDescription:
    """Only fp32 is required: a variant whose file was deleted (to slim a bundle for its device) is dropped
    from the description instead of making the bundle unloadable."""
    if description.is_edge:
        return description  # one variant per component: none may go
    components = {}
    for name, component in description.components.items():
        kept = {p: v for p, v in component.variants.items() if p == "fp32" or (path / v.file).is_file()}
        components[name] = replace(component, variants=kept)
    return replace(description, components=components)


def open_bundle(
    path: str | os.PathLike, verify: bool = True, trusted_keys: TrustedKeys | None = None
) -> Bundle:
    """Open a bundle folder: its description (with `trusted_keys`, signed by one of them), every listed file
    present inside the folder at its listed size and, with `verify`, its sha256. (Pipeline.load verifies as it
    reads, each file once: `Bundle.read`.)"""
    path = Path(path)
    if not path.exists():
        raise InputError(f"bundle not found: {path}")
    if not path.is_dir():
        raise BundleError(f"{path} is a file; a bundle is the folder `polysense export` writes")
    path = path.resolve()
    if (path / DESCRIPTION_FILE).exists():
        _inside(path, DESCRIPTION_FILE)
    description = _without_removed_variants(path, read_description(path, trusted_keys))
    sizes = {v.file: v.bytes for c in description.components.values() for v in c.variants.values()}
    for name, _ in description.files():
        size = _inside(path, name).stat().st_size
        if name in sizes and size != sizes[name]:
            raise BundleError(
                f"{path}: {name} has {size:,} bytes but {DESCRIPTION_FILE} lists {sizes[name]:,} "
                "(a truncated or altered copy?); copy the bundle again or export it again"
            )
    bundle = Bundle(path, description)
    if verify:
        bundle.verify()
    return bundle
