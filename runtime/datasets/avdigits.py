"""AV-digits: spoken digits (FSDD) paired with sign-language digit photos, in the form of the AV-MNIST benchmark.

The two datasets were recorded separately, so a sample is a pair drawn by label: each recording is paired with
a photo of the same digit from the same split (seeded). Splits:
    audio   FSDD's own rule: recordings with index 0-4 are test; of the rest, a seeded 10 % per digit and
            speaker is val, the others train;
    images  a seeded shuffle per digit: 10 % test, 10 % val, 80 % train (photos are reused within their split,
            as there are fewer photos than recordings).
With `holdout_speaker`, every recording of that speaker is test and no other recording is (the others' index
0-4 recordings go to val), so test accuracy is accuracy on a voice never heard in training.
Files are referenced where they are (paths relative to the manifest), never copied.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polysense.errors import InputError

RECORDING = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class AVDigitsSpec:
    fsdd: str  # folder of FSDD recordings ({digit}_{speaker}_{index}.wav), or its parent holding recordings/
    images: str  # folder with one sub-folder per digit (0-9) of photos
    seed: int = 0
    holdout_speaker: str | None = None  # every recording of this speaker in test, none in train/val


def _recordings(folder: Path) -> list[tuple[Path, str, str, int]]:
    if (folder / "recordings").is_dir():
        folder = folder / "recordings"
    if not folder.is_dir():
        raise InputError(f"FSDD folder not found: {folder}")
    found = []
    for path in sorted(folder.glob("*.wav")):
        match = RECORDING.match(path.name)
        if match:
            found.append((path, match.group(1), match.group(2), int(match.group(3))))
    if not found:
        raise InputError(f"{folder}: no FSDD recordings named like 3_theo_7.wav")
    return found


def _photos(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    photos = {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(folder.iterdir())
        if d.is_dir() and d.name.isdigit()
    }
    if not any(photos.values()):
        raise InputError(f"{folder}: expected sub-folders 0-9 holding photos")
    return photos


def build_rows(spec: AVDigitsSpec) -> list[dict]:
    """Manifest rows (absolute paths) for the spec, deterministic for its seed."""
    rng = np.random.default_rng(spec.seed)
    recordings = _recordings(Path(spec.fsdd))
    speakers = sorted({speaker for _, _, speaker, _ in recordings})
    if spec.holdout_speaker is not None and spec.holdout_speaker not in speakers:
        raise InputError(
            f"--holdout-speaker {spec.holdout_speaker!r} is unknown; the speakers are {', '.join(speakers)}"
        )
    photos = _photos(Path(spec.images))

    image_split: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for digit, paths in photos.items():
        order = [paths[i] for i in rng.permutation(len(paths))]
        n_test = n_val = max(1, round(0.1 * len(order)))
        image_split[(digit, "test")] = order[:n_test]
        image_split[(digit, "val")] = order[n_test : n_test + n_val]
        image_split[(digit, "train")] = order[n_test + n_val :]

    by_group: dict[tuple[str, str], list[tuple[Path, int]]] = defaultdict(list)
    for path, digit, speaker, index in recordings:
        by_group[(digit, speaker)].append((path, index))
    audio_split: list[tuple[Path, str, str, str]] = []
    for (digit, speaker), items in sorted(by_group.items()):
        rest = [p for p, index in items if index >= 5]
        val = (
            set(rng.choice(len(rest), size=max(1, round(0.1 * len(rest))), replace=False).tolist())
            if rest
            else set()
        )
        for path, index in items:
            if spec.holdout_speaker is not None:
                split = "test" if speaker == spec.holdout_speaker else ("val" if index < 5 else None)
            else:
                split = "test" if index < 5 else None
            if split is None:
                split = "val" if rest.index(path) in val else "train"
            audio_split.append((path, digit, split, speaker))

    rows = []
    cursors: defaultdict[tuple[str, str], int] = defaultdict(int)
    for path, digit, split, speaker in audio_split:
        pool = image_split[(digit, split)]
        if not pool:
            raise InputError(f"no photo of digit {digit} for the {split} split")
        if cursors[(digit, split)] % len(pool) == 0:  # a new pass over the pool: reshuffle, seeded
            pool[:] = [pool[i] for i in rng.permutation(len(pool))]
        image = pool[cursors[(digit, split)] % len(pool)]
        cursors[(digit, split)] += 1
        rows.append(
            {"image": str(image), "audio": str(path), "label": digit, "split": split, "speaker": speaker}
        )
    return rows


def write_avdigits(spec: AVDigitsSpec, out: str | os.PathLike) -> Path:
    """Write out/manifest.csv (paths relative to it) and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    rows = build_rows(spec)
    tmp = manifest.with_name("manifest.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "label", "split", "speaker"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "image": os.path.relpath(row["image"], out),
                    "audio": os.path.relpath(row["audio"], out),
                }
            )
    os.replace(tmp, manifest)
    return manifest
