"""SST-2 (Stanford Sentiment Treebank, binary, sentence level) as a polysense data manifest.

The folder holds `train.tsv` and `dev.tsv`, one `sentence<TAB>label` per line (0 negative, 1 positive), as in
../shared/data/sst2. The manifest keeps dev as the test split (the split papers report) and holds out a seeded,
label-stratified share of train for validation, so model selection never sees the test sentences.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polysense.errors import InputError
from polysense.tools.manifest import Row, write_manifest

LABELS = {"0": "negative", "1": "positive"}


@dataclass(frozen=True)
class SST2Spec:
    folder: str  # holds train.tsv and dev.tsv
    val_share: float = 0.1  # of train, per label, held out for validation
    seed: int = 0


def _read(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise InputError(f"{path} is missing; --dir must hold SST-2's train.tsv and dev.tsv")
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text, _, label = line.rpartition("\t")
        if label not in LABELS or not text.strip():
            raise InputError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:80]!r}")
        sentences.append((text.strip(), LABELS[label]))
    return sentences


def write_sst2(spec: SST2Spec, out: str | os.PathLike) -> Path:
    """Write OUT/manifest.csv (text, label, split) and return its path."""
    if not 0 < spec.val_share < 1:
        raise InputError(f"val share must be between 0 and 1, got {spec.val_share}")
    folder = Path(spec.folder)
    train, dev = _read(folder / "train.tsv"), _read(folder / "dev.tsv")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(train):
        by_label[label].append(index)
    rng = np.random.default_rng(spec.seed)
    held_out = set()
    for label in sorted(by_label):
        indices = by_label[label]
        held_out.update(rng.permutation(indices)[: round(len(indices) * spec.val_share)].tolist())
    rows = [
        Row(line=0, label=label, text=text, split="val" if index in held_out else "train")
        for index, (text, label) in enumerate(train)
    ]
    rows += [Row(line=0, label=label, text=text, split="test") for text, label in dev]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, out / "manifest.csv")
    return out / "manifest.csv"
