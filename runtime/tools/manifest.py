"""The data manifest: CSV or JSONL rows of `image`, `text`, `audio`, `label`, an optional `split` and an optional
`speaker` (who speaks in the audio: training with --voice-norm and evaluation adapt to each speaker's voice).

Paths are relative to the manifest's folder; an empty cell (or JSON null) means that modality is missing for
that sample. Problems are collected for every row with its line number, so a user fixes them all in one go
instead of meeting them one by one mid-epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polysense.errors import InputError, ManifestError
from polysense.modalities import MODALITIES, SPECS

log = logging.getLogger("polysense")

COLUMNS = (*MODALITIES, "label", "split", "speaker")
SPLITS = ("train", "val", "test")
MAX_LINE_CHARS = 1 << 20  # one JSONL row; longer lines are a problem, never held in memory whole
FILE_MODALITIES = tuple(m for m in MODALITIES if SPECS[m].cell_is_path)  # text cells hold the text itself


@dataclass(frozen=True)
class Row:
    """One sample. `image` and `audio` are absolute paths; None means the modality is missing."""

    line: int  # line number in the manifest file (the CSV header is line 1)
    label: str | None
    image: str | None = None
    text: str | None = None
    audio: str | None = None
    split: str | None = None
    speaker: str | None = None  # who speaks in the audio (any name; the same name is the same voice)

    def present(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)


@dataclass(frozen=True)
class Problem:
    """Why one row (or the file as a whole, line 0) cannot be used."""

    line: int
    reason: str
    # A missing or undecodable file: the row is skipped (and reported) rather than stopping the run, so one
    # damaged recording does not cost a whole training or evaluation. Other problems stop it.
    skippable: bool = False

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


@dataclass
class Manifest:
    path: Path
    rows: list[Row]
    has_split: bool
    problems: list[Problem] = field(default_factory=list)

    def modalities(self) -> tuple[str, ...]:
        """Modalities with data in at least one row, in canonical order."""
        return tuple(m for m in MODALITIES if any(getattr(r, m) is not None for r in self.rows))

    def labels(self) -> list[str]:
        return sorted({r.label for r in self.rows if r.label is not None})

    def raise_if_problems(self) -> None:
        """Stop on every problem, skippable ones included."""
        if self.problems:
            raise ManifestError(str(self.path), self.problems)

    def usable_rows(self) -> tuple[list[Row], list[Problem]]:
        """Rows without file problems, and those problems; raises ManifestError on any other problem."""
        fatal = [p for p in self.problems if not p.skippable]
        if fatal:
            raise ManifestError(str(self.path), fatal)
        skipped = [p for p in self.problems if p.skippable]
        bad = {p.line for p in skipped}
        return [r for r in self.rows if r.line not in bad], skipped


def report_skipped(problems: Sequence[Problem], total: int, source: str) -> None:
    """Log each skipped row with its reason, then the count."""
    if not problems:
        return
    for problem in problems:
        log.warning("%s: skipped %s", source, problem)
    lines = len({p.line for p in problems})
    log.warning("%s: skipped %d of %d rows whose files are missing or unreadable", source, lines, total)


def read_manifest(path: str | os.PathLike, labelled: bool = True) -> Manifest:
    """Parse a CSV (.csv) or JSONL (.jsonl / .json) manifest and check every row's structure and files.

    Problems are collected in `manifest.problems`; call `raise_if_problems()` to stop on them. With
    labelled=False (samples to predict) the label column is optional.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records, problems = _read_csv(path, labelled)
    elif suffix in (".jsonl", ".json"):
        records, problems = _read_jsonl(path, labelled)
    else:
        raise InputError(f"{path}: unknown manifest type {suffix!r}; use a .csv or .jsonl file")
    header = [p for p in problems if p.line == 0]
    if header:  # a header typo would otherwise repeat as one problem per row ("label is empty", ...)
        return Manifest(path, [], False, header)
    rows = []
    for line, record in records:
        row, row_problems = _parse_record(line, record, path.parent, labelled)
        problems.extend(row_problems)
        if row is not None:
            rows.append(row)
    has_split = any(r.split is not None for r in rows)
    if has_split:
        problems.extend(
            Problem(r.line, f"split is empty; fill it with one of {', '.join(SPLITS)} (other rows have one)")
            for r in rows
            if r.split is None
        )
    if not rows and not problems:
        problems.append(Problem(0, "manifest has no rows"))
    return Manifest(path, rows, has_split, sorted(problems, key=lambda p: p.line))


def _check_columns(columns: Sequence[str], labelled: bool) -> list[Problem]:
    unknown = [c for c in columns if c not in COLUMNS]
    problems = [
        Problem(0, f"unknown column {c!r}; the columns are {', '.join(COLUMNS)} (split and speaker optional)")
        for c in unknown
    ]
    if labelled and "label" not in columns:
        problems.append(Problem(0, "no 'label' column; every row needs its class label"))
    if not any(m in columns for m in MODALITIES):
        problems.append(Problem(0, f"no modality column; add one or more of {', '.join(MODALITIES)}"))
    return problems


def _read_csv(path: Path, labelled: bool) -> tuple[list[tuple[int, dict]], list[Problem]]:
    try:
        # utf-8-sig: spreadsheet programs (Excel) start a UTF-8 CSV with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            problems = _check_columns(columns, labelled)
            records = []
            for raw in reader:
                line = reader.line_num  # the row's last line (its only one unless a quoted cell spans lines)
                if None in raw:
                    problems.append(Problem(line, "more cells than header columns"))
                records.append((line, {k.strip(): v for k, v in raw.items() if k is not None}))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error}); save the manifest as UTF-8") from error
    except csv.Error as error:
        raise InputError(f"{path}: malformed CSV ({error})") from error
    return records, problems


def _lines(path: Path) -> Iterator[str | None]:
    """The manifest's lines, one at a time; None for a line over MAX_LINE_CHARS (not kept in memory)."""
    try:
        with path.open(encoding="utf-8-sig", newline=None) as handle:
            while line := handle.readline(MAX_LINE_CHARS + 1):
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    while (rest := handle.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                        pass
                    yield None
                else:
                    yield line
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error}); save the manifest as UTF-8") from error


def _read_jsonl(path: Path, labelled: bool) -> tuple[list[tuple[int, dict]], list[Problem]]:
    records: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    columns: set[str] = set()
    for number, text in enumerate(_lines(path), start=1):
        if text is None:
            problems.append(Problem(number, f"line longer than {MAX_LINE_CHARS:,} characters"))
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(Problem(number, f"not valid JSON ({error.msg})"))
            continue
        except RecursionError:
            problems.append(Problem(number, "JSON nested too deeply; a row is one flat {...} object"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(number, "not a JSON object; write one {...} per line"))
            continue
        columns.update(record)
        records.append((number, record))
    if records:
        problems.extend(_check_columns(sorted(columns), labelled))
    return records, problems


def _cell(record: dict, column: str, line: int, problems: list[Problem]) -> str | None:
    value = record.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        problems.append(Problem(line, f"{column}: expected text, got {type(value).__name__}"))
        return None
    value = str(value).strip()
    return value or None


def _parse_record(line: int, record: dict, root: Path, labelled: bool) -> tuple[Row | None, list[Problem]]:
    problems: list[Problem] = []
    cells = {c: _cell(record, c, line, problems) for c in COLUMNS}
    if all(v is None for v in cells.values()):
        return None, [Problem(line, "empty row; delete it or fill it in")]
    if labelled and cells["label"] is None:
        problems.append(Problem(line, "label is empty; every row needs its class label"))
    if not any(cells[m] is not None for m in MODALITIES):
        problems.append(Problem(line, f"no modality present ({', '.join(MODALITIES)} are all empty)"))
    if cells["split"] is not None and cells["split"] not in SPLITS:
        problems.append(Problem(line, f"split {cells['split']!r} is unknown; use one of {', '.join(SPLITS)}"))
    for modality in FILE_MODALITIES:
        name = cells[modality]
        if name is None:
            continue
        if "\0" in name:
            problems.append(
                Problem(line, f"{modality}: the file name contains a NUL character; fix the cell")
            )
            cells[modality] = None
            continue
        file = (root / name).resolve()
        if not file.is_file():
            problems.append(
                Problem(
                    line,
                    f"{modality}: file not found: {name} (looked in {file.parent})",
                    skippable=True,
                )
            )
        cells[modality] = str(file)
    return Row(line=line, **cells), problems


def check_labels(rows: Sequence[Row], known_labels: Sequence[str], reason: str) -> list[Problem]:
    """A problem for each row whose label is not in `known_labels`."""
    known = set(known_labels)
    return [Problem(r.line, f"unknown label {r.label!r}: {reason}") for r in rows if r.label not in known]


def stratified_split(
    rows: Sequence[Row], seed: int, fractions: tuple[float, float] = (0.1, 0.1)
) -> list[Row]:
    """Rows with `split` set: per label, a seeded shuffle puts `fractions` (val, test) aside, the rest train."""
    rng = np.random.default_rng(seed)
    by_label: dict[str | None, list[int]] = {}
    for index, row in enumerate(rows):
        by_label.setdefault(row.label, []).append(index)
    split = ["train"] * len(rows)
    for label in sorted(by_label, key=str):
        indices = np.array(by_label[label])[rng.permutation(len(by_label[label]))]
        n_val, n_test = (round(f * len(indices)) for f in fractions)
        for i in indices[:n_val]:
            split[i] = "val"
        for i in indices[n_val : n_val + n_test]:
            split[i] = "test"
    return [replace(row, split=s) for row, s in zip(rows, split)]


def preprocess_rows(
    rows: Sequence[Row],
    preprocessors: dict[str, Callable[[str], np.ndarray]],
    desc: str = "preprocessing",
    progress: bool = True,
) -> tuple[dict[str, list[np.ndarray | None]], list[Problem]]:
    """Run each modality's preprocessor on every row that has it.

    Returns features per modality (None where the row lacks it) and a problem per file that could not be
    decoded, so a damaged file is reported with its line instead of failing mid-epoch.
    """
    features: dict[str, list[np.ndarray | None]] = {m: [] for m in preprocessors}
    problems: list[Problem] = []
    for row in tqdm(rows, desc=desc, unit="row", disable=not progress, leave=False):
        for modality, preprocess in preprocessors.items():
            value = getattr(row, modality)
            result = None
            if value is not None:
                try:
                    result = preprocess(value)
                except InputError as error:
                    problems.append(Problem(row.line, f"{modality}: {error}", skippable=True))
            features[modality].append(result)
    return features, problems


def write_manifest(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Write rows as a CSV manifest with paths relative to its folder (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            cells = []
            for column in COLUMNS:
                value = getattr(row, column)
                if column in FILE_MODALITIES and value is not None:
                    value = os.path.relpath(value, path.parent)
                cells.append("" if value is None else value)
            writer.writerow(cells)
    os.replace(tmp, path)
