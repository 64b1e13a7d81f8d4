"""One pass over a manifest's rows: every cell read once with the runtime's own readers (what training sees), and
what the checks need kept per cell: its exact and near keys, a few numbers, and small features for the label
model. Nothing decoded is kept, so memory grows with the rows, not with the files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polysense.errors import InputError
from polysense.limits import DEFAULT_LIMITS
from polysense.modalities import MODALITIES
from polysense.optional import require
from polysense.preprocess.audio import SAMPLE_RATE, LogMel, load_audio, resample
from polysense.preprocess.image import decode_image
from polysense.tools.data_check.fingerprints import (
    audio_grid,
    digest,
    image_hash,
    normalise_text,
    text_digest,
)
from polysense.tools.manifest import Row

log = logging.getLogger("polysense")

THUMB_SIDE = 12  # the label model sees an image as 12 x 12 RGB pixels (432 numbers)
_LOGMEL = LogMel()


@dataclass(frozen=True)
class AudioFacts:
    """What the audio checks look at, for one readable recording."""

    row: int  # index in the rows scanned
    rate: int  # its own sample rate, Hz
    seconds: float
    peak: float  # largest absolute sample, full scale 1.0
    at_peak: int  # neighbouring samples both exactly at the peak level (a flat top: clipping, at any level)


@dataclass
class ModalityScan:
    """One modality's cells: which rows have one, and what was read from each."""

    present: list[int] = field(default_factory=list)  # rows with a cell
    not_found: list[int] = field(default_factory=list)  # rows whose file is missing
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # rows whose cell could not be read, why
    exact: dict[int, bytes] = field(default_factory=dict)  # row -> exact key, for every readable cell
    near_rows: list[int] = field(default_factory=list)  # rows with a near key, in the order of near_keys
    near_keys: list[np.ndarray] = field(default_factory=list)  # image hash, audio grid (or text key digest)
    lengths: list[int] = field(default_factory=list)  # audio: trimmed samples of each grid
    features: dict[int, np.ndarray] = field(
        default_factory=dict
    )  # row -> label-model features (image, audio)
    audio: list[AudioFacts] = field(default_factory=list)
    words: dict[int, int] = field(default_factory=dict)  # text: row -> words in it

    def readable(self) -> int:
        return len(self.exact)


@dataclass
class Scan:
    rows: list[Row]
    modalities: dict[str, ModalityScan]


def scan_rows(rows: Sequence[Row], progress: bool = True) -> Scan:
    """Read every cell of `rows` once; a cell that cannot be read is recorded with its reason, never raised."""
    scan = Scan(list(rows), {m: ModalityScan() for m in MODALITIES})
    readers = {"image": _read_image, "audio": _read_audio, "text": _read_text}
    for index, row in enumerate(
        tqdm(scan.rows, desc="checking", unit="row", disable=not progress, leave=False)
    ):
        for modality in MODALITIES:
            value = getattr(row, modality)
            if value is None:
                continue
            cells = scan.modalities[modality]
            cells.present.append(index)
            if modality != "text" and not Path(value).is_file():
                cells.not_found.append(index)
                continue
            try:
                readers[modality](index, value, cells)
            except InputError as error:  # read from bytes: the message says "image bytes", so name the file
                cells.unreadable.append(
                    (index, f"{value if modality == 'text' else Path(value).name}: {error}")
                )
    return scan


def _file_bytes(path: str) -> bytes:
    DEFAULT_LIMITS.check_bytes(Path(path).stat().st_size, f"file {path}")
    return Path(path).read_bytes()


def _read_image(index: int, path: str, cells: ModalityScan) -> None:
    cv2 = require("cv2")
    data = _file_bytes(path)
    rgb = decode_image(data)
    cells.exact[index] = digest(data)
    cells.near_rows.append(index)
    cells.near_keys.append(image_hash(rgb))
    thumb = cv2.resize(rgb, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    cells.features[index] = thumb.astype(np.float32).ravel() / 255.0


def _read_audio(index: int, path: str, cells: ModalityScan) -> None:
    data = _file_bytes(path)
    samples, rate = load_audio(data)
    peak = float(np.abs(samples).max())
    at = np.abs(samples) >= peak  # samples exactly at the peak level
    at_peak = int(np.count_nonzero(at[1:] & at[:-1])) if peak > 0 else 0
    cells.exact[index] = digest(data)
    cells.audio.append(AudioFacts(index, rate, samples.size / rate, peak, at_peak))
    waveform = resample(samples, rate, SAMPLE_RATE)  # what the model hears
    grid = audio_grid(waveform)
    if grid is not None:
        cells.near_rows.append(index)
        cells.near_keys.append(grid[0])
        cells.lengths.append(grid[1])
    frames = _LOGMEL(waveform)
    # The mean and spread of each mel band, and each band's mean over quarters of the recording (whether a pitch
    # rises or falls).
    quarters = [part.mean(axis=0) for part in np.array_split(frames, 4) if len(part)] or [frames.mean(axis=0)]
    quarters += [quarters[-1]] * (4 - len(quarters))
    cells.features[index] = np.concatenate([frames.mean(axis=0), frames.std(axis=0), *quarters])


def _read_text(index: int, text: str, cells: ModalityScan) -> None:
    cells.exact[index] = text_digest(text)
    cells.words[index] = len(text.split())
    normalised = normalise_text(text)
    if normalised:
        cells.near_rows.append(index)
        cells.near_keys.append(np.frombuffer(text_digest(normalised), np.uint8))
