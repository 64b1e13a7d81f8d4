"""Per-cell quality: audio that is clipped, silent, at an odd rate or of an odd length; text of an odd length;
and how the labels are spread over the splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polysense.preprocess.audio import SAMPLE_RATE
from polysense.preprocess.text import MAX_LENGTH
from polysense.tools.data_check.scan import ModalityScan
from polysense.tools.manifest import SPLITS, Row

# Rates recording equipment and codecs use; anything else was most likely written with a wrong header.
COMMON_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000)
SILENT_PEAK = 10 ** (-50 / 20)  # a recording whose loudest sample is below -50 dBFS holds nothing to hear
# Neighbouring samples both at the peak level before a recording counts as clipped: a waveform cut flat at its
# loudest has runs of them; a natural one (a pure tone too) rarely repeats its peak value even once.
MIN_CLIPPED = 3
MIN_SECONDS = 0.1
OUTLIER_Z = 4.0  # robust z-score (median, MAD) of log length beyond which a length is an outlier


@dataclass(frozen=True)
class AudioQuality:
    recordings: int  # readable recordings
    rates: dict[int, int]  # sample rate -> recordings
    clipped: tuple[int, ...]  # lines: flat tops at the peak level (MIN_CLIPPED neighbouring pairs or more)
    silent: tuple[int, ...]  # lines: peak below -50 dBFS
    odd_rate: tuple[int, ...]  # lines: a rate not in COMMON_RATES
    below_model_rate: int  # recordings below the model's rate (upsampled: no content above half their rate)
    too_short: tuple[int, ...]  # lines: under MIN_SECONDS
    length_outliers: tuple[int, ...]  # lines: log duration beyond OUTLIER_Z robust deviations
    seconds_median: float


@dataclass(frozen=True)
class TextQuality:
    texts: int
    words_median: float
    no_words: tuple[int, ...]  # lines: nothing but punctuation or symbols
    length_outliers: tuple[int, ...]  # lines: log word count beyond OUTLIER_Z robust deviations
    over_max_length: tuple[int, ...]  # lines: more words than training keeps tokens by default (truncated)


def robust_outliers(values: np.ndarray) -> np.ndarray:
    """Positions of values whose log is more than OUTLIER_Z median absolute deviations (scaled to a standard
    deviation) from the median; none when most values are equal."""
    logs = np.log(np.maximum(values, 1e-9))
    median = np.median(logs)
    spread = 1.4826 * np.median(np.abs(logs - median))
    if spread == 0:
        return np.zeros(0, dtype=int)
    return np.flatnonzero(np.abs(logs - median) / spread > OUTLIER_Z)


def audio_quality(cells: ModalityScan, rows: Sequence[Row]) -> AudioQuality:
    facts = cells.audio
    lines = [rows[f.row].line for f in facts]
    seconds = np.array([f.seconds for f in facts], dtype=np.float64)
    outliers = robust_outliers(seconds) if len(facts) else np.zeros(0, dtype=int)
    return AudioQuality(
        recordings=len(facts),
        rates=dict(sorted(Counter(f.rate for f in facts).items())),
        clipped=tuple(
            line for line, f in zip(lines, facts) if f.at_peak >= MIN_CLIPPED and f.peak >= SILENT_PEAK
        ),
        silent=tuple(line for line, f in zip(lines, facts) if f.peak < SILENT_PEAK),
        odd_rate=tuple(line for line, f in zip(lines, facts) if f.rate not in COMMON_RATES),
        below_model_rate=sum(1 for f in facts if f.rate < SAMPLE_RATE),
        too_short=tuple(line for line, f in zip(lines, facts) if f.seconds < MIN_SECONDS),
        length_outliers=tuple(lines[i] for i in outliers),
        seconds_median=float(np.median(seconds)) if len(facts) else 0.0,
    )


def text_quality(cells: ModalityScan, rows: Sequence[Row]) -> TextQuality:
    indices = sorted(cells.words)
    words = np.array([cells.words[i] for i in indices], dtype=np.float64)
    with_words = set(cells.near_rows)
    outliers = robust_outliers(words) if len(words) else np.zeros(0, dtype=int)
    return TextQuality(
        texts=len(indices),
        words_median=float(np.median(words)) if len(words) else 0.0,
        no_words=tuple(rows[i].line for i in indices if i not in with_words),
        length_outliers=tuple(rows[indices[i]].line for i in outliers),
        over_max_length=tuple(rows[i].line for i in indices if cells.words[i] > MAX_LENGTH),
    )


def balance(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """Split -> label -> rows (every label of the manifest in every split, 0 where absent); "all" without a
    split column."""
    labels = sorted({str(r.label) for r in rows})
    splits = [s for s in SPLITS if any(r.split == s for r in rows)] or ["all"]
    counts = Counter((r.split or "all", str(r.label)) for r in rows)
    return {s: {label: counts[s, label] for label in labels} for s in splits}
