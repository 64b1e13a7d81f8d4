"""`check_manifest`: every check of a data manifest, in one pass over its files, as a CheckReport."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from polysense.errors import ConfigError
from polysense.machine import machine
from polysense.tools.data_check.duplicates import (
    NEAR_AUDIO_DB,
    NEAR_IMAGE_BITS,
    exact_groups,
    leakage,
    near_groups,
    sample_keys,
)
from polysense.tools.data_check.fingerprints import HASH_BITS
from polysense.tools.data_check.label_errors import label_issues
from polysense.tools.data_check.quality import audio_quality, balance, text_quality
from polysense.tools.data_check.report import CheckReport, ModalityReport
from polysense.tools.data_check.scan import Scan, scan_rows
from polysense.tools.manifest import read_manifest


@dataclass(frozen=True)
class CheckOptions:
    near_image_bits: int = NEAR_IMAGE_BITS  # images whose 256-bit hashes differ in at most this many are near
    near_audio_db: float = (
        NEAR_AUDIO_DB  # recordings whose level grids differ by at most this (mean dB) are near
    )
    # Likely label errors: None runs it where scikit-learn and cleanlab are installed (else a note says how to
    # get them), True requires them (DependencyError), False skips it.
    label_errors: bool | None = None
    folds: int = 5  # cross-validation folds of the label model
    seed: int = 0  # of the folds

    def __post_init__(self) -> None:
        if not 0 <= self.near_image_bits <= HASH_BITS:
            raise ConfigError(f"near_image_bits must be 0 to {HASH_BITS}, got {self.near_image_bits}")
        if not self.near_audio_db >= 0:
            raise ConfigError(f"near_audio_db must be 0 or more (dB), got {self.near_audio_db}")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2, got {self.folds}")


def check_manifest(
    path: str | os.PathLike, options: CheckOptions = CheckOptions(), progress: bool = True
) -> CheckReport:
    """Check the manifest at `path`: missing and unreadable cells, exact and near duplicates per modality and
    across splits, class balance, audio and text quality, likely label errors. Raises ManifestError only when
    the file cannot be read as a manifest at all (its header); bad rows and files are reported."""
    started = time.perf_counter()
    manifest = read_manifest(path)
    if not manifest.rows:
        manifest.raise_if_problems()
    scan = scan_rows(manifest.rows, progress)
    scanned = time.perf_counter()
    modalities = {m: _modality_report(m, scan, options) for m in manifest.modalities()}
    samples = tuple(exact_groups("sample", sample_keys(scan), scan.rows))
    compared = time.perf_counter()
    labels = label_issues(scan, options.label_errors, options.folds, options.seed, progress)
    finished = time.perf_counter()
    present = set(modalities)
    return CheckReport(
        manifest=str(manifest.path),
        rows=len(scan.rows),
        labels=tuple(manifest.labels()),
        problems=tuple(str(p) for p in manifest.problems),
        balance=balance(scan.rows),
        modalities=modalities,
        samples=samples,
        leakage=leakage(samples, scan.rows),
        audio=audio_quality(scan.modalities["audio"], scan.rows) if "audio" in present else None,
        text=text_quality(scan.modalities["text"], scan.rows) if "text" in present else None,
        label_issues=labels,
        seconds={
            "read": round(scanned - started, 3),
            "duplicates": round(compared - scanned, 3),
            "label_errors": round(finished - compared, 3),
            "total": round(finished - started, 3),
        },
        machine=machine(),
    )


def _modality_report(modality: str, scan: Scan, options: CheckOptions) -> ModalityReport:
    cells, rows = scan.modalities[modality], scan.rows
    return ModalityReport(
        present=len(cells.present),
        missing=len(rows) - len(cells.present),
        not_found=tuple(rows[i].line for i in cells.not_found),
        unreadable=tuple((rows[i].line, why) for i, why in cells.unreadable),
        exact=tuple(exact_groups(modality, cells.exact, rows)),
        near=tuple(near_groups(modality, cells, rows, options.near_image_bits, options.near_audio_db)),
    )
