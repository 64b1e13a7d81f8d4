"""The bundle: a folder with manifest.json, one ONNX file per component and precision, tokenizer.json.

Export writes it (polysense.export); the runtime opens it here, refusing anything it cannot trust: a missing
file, a hash that does not match, a schema version it does not know. Nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from polysense.errors import BundleError, InputError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
FUSION = "fusion"


def encoder_name(modality: str) -> str:
    return f"{modality}_encoder"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.manifest["modalities"])

    @property
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    def component(self, name: str) -> dict:
        return self.manifest["components"][name]

    def precisions(self, name: str) -> list[str]:
        return list(self.component(name)["precisions"])

    def file(self, name: str, precision: str = "fp32") -> Path:
        return self.path / self.component(name)["precisions"][precision]["file"]


def _listed_files(manifest: dict) -> list[dict]:
    """Every {file, sha256} entry the manifest vouches for."""
    entries = [p for c in manifest["components"].values() for p in c["precisions"].values()]
    text = manifest["preprocessing"].get("text")
    if text:
        entries.append({"file": text["tokenizer"], "sha256": text["sha256"]})
    return entries


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open and verify a bundle folder: schema version, every listed file present with its sha256."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"bundle not found: {path}")
    if not path.is_dir():
        raise BundleError(f"{path} is a file; a bundle is the folder `polysense export` writes")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(
            f"{path} has no {MANIFEST_FILE}: not a polysense bundle (or an export that did not finish); "
            "export it again with `polysense export RUN_DIR --out BUNDLE`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); export the bundle again") from error
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version!r}, but this polysense reads version {SCHEMA_VERSION}; "
            "export it again with this version of polysense, or use the polysense version that made it"
        )
    try:
        entries = _listed_files(manifest)
        manifest["labels"], manifest["modalities"]  # noqa: B018 - presence check
    except (KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{manifest_path} lacks {error}; export the bundle again") from error
    for entry in entries:
        file = path / entry["file"]
        if not file.is_file():
            raise BundleError(
                f"{path}: {entry['file']} is missing; copy the whole bundle folder, or export it again"
            )
        if sha256_file(file) != entry["sha256"]:
            raise BundleError(
                f"{path}: {entry['file']} does not match its sha256 in {MANIFEST_FILE}: the file was altered "
                "or corrupted (truncated copy?); copy the bundle again or export it again"
            )
    return Bundle(path, manifest)
