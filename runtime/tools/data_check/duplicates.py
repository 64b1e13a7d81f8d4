"""Exact and near duplicates per modality, whole samples repeated, and which of them cross splits (leakage)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from polysense.modalities import MODALITIES
from polysense.tools.data_check.fingerprints import near_grid_pairs, near_hash_pairs
from polysense.tools.data_check.scan import ModalityScan, Scan
from polysense.tools.manifest import Row

NEAR_IMAGE_BITS = (
    32  # of 256: re-encoded or resized copies differ in at most 10, different photos in 42 or more
)
NEAR_AUDIO_DB = (
    0.8  # mean level difference: the same recording re-encoded 0.03 dB on average, others 1.18 or more
)


@dataclass(frozen=True)
class DuplicateGroup:
    """Rows whose cells of one modality (or whole samples: modality "sample") are the same."""

    modality: str  # image, text, audio or sample (every cell of the row)
    kind: str  # exact (same bytes, same text) or near (same after normalisation, or within a distance)
    lines: tuple[int, ...]  # manifest lines
    splits: tuple[str, ...]  # each row's split ("" without one)
    labels: tuple[str, ...]  # each row's label

    @property
    def cross_split(self) -> bool:
        return len(set(self.splits)) > 1

    @property
    def conflicting_labels(self) -> bool:
        return len(set(self.labels)) > 1


@dataclass(frozen=True)
class Leakage:
    """Samples of val and test that repeat a training sample exactly (every cell the same)."""

    val_rows: int  # rows in the val split
    test_rows: int
    val_in_train: int  # val rows whose sample is also in train
    test_in_train: int  # test rows whose sample is also in train
    test_in_val: int  # test rows whose sample is also in val (not in train)
    lines: tuple[int, ...] = ()  # the lines of those val and test rows

    @property
    def val_share(self) -> float:
        return self.val_in_train / self.val_rows if self.val_rows else 0.0


def group(modality: str, kind: str, members: Iterable[int], rows: Sequence[Row]) -> DuplicateGroup:
    members = sorted(members)
    return DuplicateGroup(
        modality,
        kind,
        tuple(rows[i].line for i in members),
        tuple(rows[i].split or "" for i in members),
        tuple(str(rows[i].label) for i in members),
    )


def exact_groups(modality: str, keys: dict[int, bytes], rows: Sequence[Row]) -> list[DuplicateGroup]:
    """Rows sharing an exact key, as groups of two or more."""
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for index, key in keys.items():
        by_key[key].append(index)
    return [group(modality, "exact", members, rows) for members in by_key.values() if len(members) > 1]


def sample_keys(scan: Scan) -> dict[int, bytes]:
    """Row -> the exact keys of all its cells together, for rows whose every cell was read."""
    keys = {}
    for index in range(len(scan.rows)):
        parts = []
        for modality in MODALITIES:
            cells = scan.modalities[modality]
            if getattr(scan.rows[index], modality) is None:
                parts.append(b"-")
            elif index in cells.exact:
                parts.append(cells.exact[index])
            else:
                break
        else:
            keys[index] = b"|".join(parts)
    return keys


def near_groups(
    modality: str, cells: ModalityScan, rows: Sequence[Row], image_bits: int, audio_db: float
) -> list[DuplicateGroup]:
    """Rows whose cells are near each other (linked in chains), leaving out groups that are one exact group."""
    if not cells.near_rows:
        return []
    keys = np.stack(cells.near_keys)
    if modality == "image":
        pairs = near_hash_pairs(keys, image_bits)
    elif modality == "audio":
        pairs = near_grid_pairs(keys, np.asarray(cells.lengths), audio_db)
    else:  # text: the same normalised words
        by_key: dict[bytes, list[int]] = defaultdict(list)
        for position, key in enumerate(keys):
            by_key[key.tobytes()].append(position)
        pairs = ((m[0], other) for m in by_key.values() for other in m[1:])
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = defaultdict(list)
    for position in range(len(keys)):
        members[root(position)].append(cells.near_rows[position])
    return [
        group(modality, "near", m, rows)
        for m in members.values()
        if len(m) > 1 and len({cells.exact[i] for i in m}) > 1
    ]


def leakage(sample_groups: Sequence[DuplicateGroup], rows: Sequence[Row]) -> Leakage:
    """How many val and test rows repeat a sample of an earlier split."""
    val_in_train = test_in_train = test_in_val = 0
    lines: list[int] = []
    for found in sample_groups:
        splits = set(found.splits)
        if "train" in splits:
            val_in_train += found.splits.count("val")
            test_in_train += found.splits.count("test")
        elif "val" in splits:
            test_in_val += found.splits.count("test")
        leaked = ("val", "test") if "train" in splits else ("test",) if "val" in splits else ()
        lines += [n for n, s in zip(found.lines, found.splits) if s in leaked]
    count = {s: sum(1 for r in rows if r.split == s) for s in ("val", "test")}
    return Leakage(
        count["val"], count["test"], val_in_train, test_in_train, test_in_val, tuple(sorted(lines))
    )
