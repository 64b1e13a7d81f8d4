"""Predictions for many unlabelled samples at once: a manifest (CSV/JSONL, label optional) or a folder of files,
written as JSONL or CSV. What `polysense predict --data ... --out ...` runs; `polysense eval --predictions`
writes its per-sample predictions with the same writer.

A folder holds one sample per file, its modality told by the extension (images: .jpg .jpeg .png .bmp .webp;
audio: .wav .flac .ogg; text: .txt). Each sample is prepared on its own, so a file that cannot be read costs
only its own row (reported with its reason, left out of the output); the model runs take BATCH samples at once.
The output is written to a temporary file beside it and renamed at the end, so a failed run leaves no half file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

from polysense.errors import ConfigError, InputError, PolysenseError
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import EmbeddingsT, Predictor, PreparedT
from polysense.preprocess.voice import VoiceProfile
from polysense.tools.manifest import Problem, read_manifest

if TYPE_CHECKING:
    from _csv import Writer  # what csv.writer returns (named in typeshed only)

log = logging.getLogger("polysense")

BATCH = 32
# Samples read ahead and run in order of text length, so that a batch pads its texts to a similar length rather
# than to the longest of 32 random ones; their predictions (small) wait to be written in the input's order.
GROUPED = 32 * BATCH
EXTENSIONS = {
    **dict.fromkeys((".jpg", ".jpeg", ".png", ".bmp", ".webp"), "image"),
    **dict.fromkeys((".wav", ".flac", ".ogg"), "audio"),
    ".txt": "text",
}
MAX_TEXT_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class Item:
    """One sample to predict: `source` names it in the output (a manifest line or a file)."""

    source: str
    sample: dict


@dataclass(frozen=True)
class BatchResult:
    written: int
    failed: tuple[Problem, ...]
    out: str


class PredictionWriter:
    """Rows of predictions to .jsonl or .csv (by the suffix; '-' is JSONL on stdout), atomically."""

    def __init__(self, out: str | os.PathLike, labels: Sequence[str], extra: Sequence[str] = ()) -> None:
        self.labels, self.extra = list(labels), list(extra)
        self.stdout = str(out) == "-"
        self.path = Path(out)
        self.format = "jsonl" if self.stdout else self.path.suffix.lower().lstrip(".")
        if self.format not in ("jsonl", "csv"):
            raise ConfigError(f"--out {out}: write .jsonl or .csv (or - for JSONL on stdout)")
        if not self.stdout and not self.path.parent.is_dir():
            raise ConfigError(f"--out {out}: the folder {self.path.parent} does not exist")
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._handle: TextIO | None = None  # open between __enter__ and __exit__
        self._csv: Writer | None = None

    def __enter__(self) -> PredictionWriter:
        import sys

        self._handle = sys.stdout if self.stdout else self._partial.open("w", newline="", encoding="utf-8")
        if self.format == "csv":
            self._csv = csv.writer(self._handle)
            self._csv.writerow(["source", *self.extra, "label", *(f"p_{label}" for label in self.labels)])
        return self

    def write(self, source: str, prediction: Prediction, **extra: object) -> None:
        if self._csv is not None:
            probabilities = [f"{prediction.probabilities[label]:.6g}" for label in self.labels]
            self._csv.writerow(
                [source, *(extra.get(k, "") for k in self.extra), prediction.label, *probabilities]
            )
            return
        row = {
            "source": source,
            **extra,
            "label": prediction.label,
            "probabilities": prediction.probabilities,
        }
        assert self._handle is not None, "write inside `with PredictionWriter(...)`"
        self._handle.write(json.dumps(row) + "\n")

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._handle is not None  # opened by __enter__
        if self.stdout:
            self._handle.flush()
            return
        self._handle.close()
        if kind is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


def items_from(data: str | os.PathLike, modalities: Sequence[str]) -> tuple[list[Item], list[Problem]]:
    """The samples of a manifest or a folder, and the problems of those that cannot be used."""
    path = Path(data)
    if path.is_dir():
        return _items_from_folder(path, modalities)
    manifest = read_manifest(path, labelled=False)
    rows, problems = manifest.usable_rows()
    items = []
    for row in rows:
        sample = {m: getattr(row, m) for m in modalities if getattr(row, m) is not None}
        if sample:
            items.append(Item(f"{path.name}:{row.line}", sample))
        else:
            problems.append(
                Problem(row.line, f"none of this bundle's inputs ({', '.join(modalities)})", True)
            )
    return items, problems


def _items_from_folder(folder: Path, modalities: Sequence[str]) -> tuple[list[Item], list[Problem]]:
    items, problems = [], []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for file in files:
        name = str(file.relative_to(folder))
        modality = EXTENSIONS.get(file.suffix.lower())
        if modality is None or modality not in modalities:
            kinds = ", ".join(sorted(e for e, m in EXTENSIONS.items() if m in modalities))
            problems.append(Problem(0, f"{name}: not a file this bundle takes ({kinds})", True))
            continue
        items.append(Item(name, {modality: file}))  # a .txt file is read when its batch comes
    if not files:
        raise InputError(f"{folder} holds no files to predict")
    return items, problems


def _read_text(file: Path) -> str:
    with file.open("rb") as handle:
        return handle.read(MAX_TEXT_FILE_BYTES).decode("utf-8", errors="replace")


def _loaded(sample: dict) -> dict:
    """The sample with a text file's contents in place of its path."""
    text = sample.get("text")
    return {**sample, "text": _read_text(text)} if isinstance(text, Path) else sample


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _text_length(item: Item) -> int:
    """How long the sample's text is, without reading a text file (its size stands for it); 0 without text."""
    text = item.sample.get("text")
    if isinstance(text, Path):
        try:
            return text.stat().st_size
        except OSError:  # reported when the file is read
            return 0
    return len(text) if isinstance(text, str) else 0


def _by_text_length(group: list[Item]) -> Iterator[list[Item]]:
    """The group's items in batches of up to BATCH, by text length (stable: equal lengths keep their order)."""
    yield from _batches(sorted(group, key=_text_length), BATCH)


def _predict(
    pipeline: Predictor[PreparedT, EmbeddingsT],
    batch: list[Item],
    voice: VoiceProfile | None,
    failed: list[Problem],
) -> list[tuple[Item, Prediction]]:
    """Predictions of the batch's usable items; the others are added to `failed` with their reason."""
    prepared: list[PreparedT] = []
    kept: list[Item] = []
    for item in batch:
        try:
            sample = _loaded(item.sample)
            if voice is not None and "audio" in sample:
                sample = {**sample, "voice": voice}
            prepared.append(pipeline.prepare(sample))
            kept.append(item)
        except PolysenseError as error:
            failed.append(Problem(0, f"{item.source}: {error}", True))
    return list(zip(kept, pipeline.predict_batch(prepared))) if prepared else []


def predict_to_file(
    pipeline: Predictor[PreparedT, EmbeddingsT],
    data: str | os.PathLike,
    out: str | os.PathLike,
    progress: bool = True,
    voice: VoiceProfile | None = None,
) -> BatchResult:
    """Predict every sample of `data` (manifest or folder) with `pipeline` into `out` (.jsonl or .csv); `voice`:
    the profile of the one speaker of every recording (bundles trained with --voice-norm)."""
    items, failed = items_from(data, pipeline.modalities)
    writer = PredictionWriter(out, pipeline.labels, extra=("modalities",))
    written = 0
    with writer, tqdm(total=len(items), desc="predicting", unit="sample", disable=not progress) as bar:
        for group in _batches(items, GROUPED):
            done: dict[str, Prediction] = {}
            for batch in _by_text_length(group):
                done.update((item.source, p) for item, p in _predict(pipeline, batch, voice, failed))
                bar.update(len(batch))
            for item in group:  # written in the input's order
                if item.source in done:
                    prediction = done[item.source]
                    writer.write(item.source, prediction, modalities="+".join(prediction.embeddings))
                    written += 1
    for problem in failed:
        log.warning("skipped %s", problem)
    return BatchResult(written, tuple(failed), str(out))
