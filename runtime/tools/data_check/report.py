"""The check's result as dataclasses, and its terminal and JSON forms."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from polysense.tools.data_check.duplicates import DuplicateGroup, Leakage
from polysense.tools.data_check.label_errors import LabelIssues
from polysense.tools.data_check.quality import AudioQuality, TextQuality

SHOWN = 10  # examples printed per finding in the terminal


@dataclass(frozen=True)
class ModalityReport:
    """One modality's cells: how many are there, missing or unreadable, and its duplicates."""

    present: int  # rows with a cell
    missing: int  # rows without one (an empty cell)
    not_found: tuple[int, ...]  # lines whose file does not exist
    unreadable: tuple[tuple[int, str], ...]  # (line, why) for cells that cannot be read or decoded
    exact: tuple[DuplicateGroup, ...]  # same bytes (files) or the same text
    near: tuple[DuplicateGroup, ...]  # same after normalisation or within the near distance, not exact

    def extra_copies(self, kind: str = "exact") -> int:
        """Rows beyond the first of each group: what removing duplicates would remove."""
        return sum(len(g.lines) - 1 for g in (self.exact if kind == "exact" else self.near))

    def cross_split(self, kind: str = "exact") -> int:
        return sum(g.cross_split for g in (self.exact if kind == "exact" else self.near))


@dataclass(frozen=True)
class CheckReport:
    manifest: str
    rows: int
    labels: tuple[str, ...]
    problems: tuple[str, ...]  # what read_manifest found wrong with the rows (as it reports them)
    balance: dict[str, dict[str, int]]  # split -> label -> rows
    modalities: dict[str, ModalityReport]
    samples: tuple[DuplicateGroup, ...]  # rows whose every cell repeats another row's (exact)
    leakage: Leakage
    audio: AudioQuality | None
    text: TextQuality | None
    label_issues: LabelIssues
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage
    machine: dict = field(default_factory=dict)  # where it ran (timings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def summary(self) -> str:
        """One line: rows, missing and unreadable cells, duplicates, leakage, label issues."""
        parts = [f"{self.rows} rows"]
        for modality, found in self.modalities.items():
            bad = len(found.not_found) + len(found.unreadable)
            parts.append(
                f"{modality} {found.present} ({found.missing} missing, {bad} unreadable, "
                f"{found.extra_copies()} exact + {found.extra_copies('near')} near copies)"
            )
        leak = self.leakage
        parts.append(
            f"leaked samples: val {leak.val_in_train}/{leak.val_rows}, test {leak.test_in_train}/{leak.test_rows}"
        )
        if self.label_issues.ran:
            parts.append(f"{len(self.label_issues.issues)} likely label errors")
        return "; ".join(parts)


def _lines(lines: tuple[int, ...]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOWN])
    return f"{len(lines)}" + (f" (lines {shown}{', ...' if len(lines) > SHOWN else ''})" if lines else "")


def _groups(title: str, groups: tuple[DuplicateGroup, ...]) -> list[str]:
    if not groups:
        return []
    out = [f"  {title}: {len(groups)} group(s), {sum(g.cross_split for g in groups)} across splits"]
    ordered = sorted(groups, key=lambda g: (not g.cross_split, not g.conflicting_labels, g.lines))
    for found in ordered[:SHOWN]:
        where = ", ".join(
            f"{n} ({s or '-'}, {label})" for n, s, label in zip(found.lines, found.splits, found.labels)
        )
        out.append(f"    lines {where}")
    if len(groups) > SHOWN:
        out.append(f"    ... and {len(groups) - SHOWN} more (--json lists them all)")
    return out


def format_report(report: CheckReport) -> str:
    """The terminal report."""
    out = [f"data check: {report.manifest}: {report.rows} rows, {len(report.labels)} labels"]
    out += [f"  manifest problem: {p}" for p in report.problems[:SHOWN]]
    out.append("balance (rows per label):")
    for split, counts in report.balance.items():
        values = list(counts.values())
        ratio = f"{max(values) / min(values):.2f}" if min(values) else "inf (a label has no rows)"
        out.append(
            f"  {split}: {sum(values)} rows, smallest {min(values)}, largest {max(values)}, ratio {ratio}"
        )
    for modality, found in report.modalities.items():
        out.append(f"{modality}: {found.present} cells, {found.missing} rows without one")
        if found.not_found:
            out.append(f"  files not found: {_lines(found.not_found)}")
        for line, why in found.unreadable[:SHOWN]:
            out.append(f"  unreadable: line {line}: {why}")
        if len(found.unreadable) > SHOWN:
            out.append(f"  ... {len(found.unreadable)} unreadable in all")
        out += _groups("exact duplicates", found.exact) + _groups("near duplicates", found.near)
    leak = report.leakage
    out.append(
        f"whole samples repeated: {len(report.samples)} group(s); leakage: val {leak.val_in_train} of "
        f"{leak.val_rows} rows also in train, test {leak.test_in_train} of {leak.test_rows} in train and "
        f"{leak.test_in_val} more in val"
    )
    out += _quality(report)
    out += _label_lines(report.label_issues)
    return "\n".join(out)


def _quality(report: CheckReport) -> list[str]:
    out = []
    if report.audio is not None and report.audio.recordings:
        audio = report.audio
        rates = ", ".join(f"{rate} Hz: {n}" for rate, n in audio.rates.items())
        out += [
            f"audio: {audio.recordings} recordings, median {audio.seconds_median:.2f} s; rates {rates}",
            f"  clipped {_lines(audio.clipped)}; silent {_lines(audio.silent)}; odd rate {_lines(audio.odd_rate)}",
            f"  under {0.1} s {_lines(audio.too_short)}; length outliers {_lines(audio.length_outliers)}; "
            f"{audio.below_model_rate} below the model's 16 kHz (upsampled)",
        ]
    if report.text is not None and report.text.texts:
        text = report.text
        out += [
            f"text: {text.texts} texts, median {text.words_median:g} words; no words {_lines(text.no_words)}",
            f"  length outliers {_lines(text.length_outliers)}; over 64 words (truncated) "
            f"{_lines(text.over_max_length)}",
        ]
    return out


WEAK_MODEL = 0.9  # out-of-sample accuracy below which the label-error flags come with a caution


def _label_lines(found: LabelIssues) -> list[str]:
    if not found.ran:
        return [f"likely label errors: skipped ({found.note})"]
    out = [
        f"likely label errors: {len(found.issues)} of {found.rows_used} rows (quick model's out-of-sample "
        f"accuracy {found.cv_accuracy:.3f}; {found.note})"
    ]
    if found.cv_accuracy < WEAK_MODEL:
        out.append(
            f"  caution: the quick model itself misreads {1 - found.cv_accuracy:.0%} of the rows, so most of "
            "these flags are its own mistakes; read them as hints, or check a model of yours (polysense eval "
            "--predictions)"
        )
    for issue in found.issues[:SHOWN]:
        out.append(
            f"  line {issue.line} ({issue.split or '-'}): labelled {issue.given!r}, looks like "
            f"{issue.suggested!r} (p(given) {issue.given_probability:.3f})"
        )
    return out
