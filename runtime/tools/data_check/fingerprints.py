"""What makes two cells the same: exact keys (the bytes of a file, the text as written) and near keys (an image's
perceptual hash, a recording's normalised log-mel grid, a text's normalised words), and the searches that pair
near keys within a distance.

Measured on the real data (docs/data.md, "Checking a dataset"): the 256-bit DCT hash of two different sign-digit
photos differs in 42 bits or more, a JPEG re-encoded at quality 50 or a resized copy in 10 at most; two different
FSDD recordings differ by 1.18 dB or more on the log-mel grid, the same recording at another gain, padded with
silence or resampled to 8 kHz and back by 1.03 dB at most (0.03 on average).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator

import numpy as np

from polysense.optional import require
from polysense.preprocess.audio import N_MELS, LogMel

HASH_SIDE = 64  # an image is reduced to 64 x 64 grey pixels before its DCT
HASH_FREQS = 16  # the lowest 16 x 16 DCT coefficients give the hash: 256 bits
HASH_BITS = HASH_FREQS * HASH_FREQS
GRID_FRAMES = 32  # a recording's grid: 32 stretches of time (whatever its length) ...
GRID_BANDS = 20  # ... by 20 groups of the 40 mel bands
TRIM_DB = 30.0  # leading and trailing samples quieter than this below the peak are cut before the grid
FLOOR_DB = 45.0  # grid cells more than this below the loudest one are raised to it (the noise floor differs)
GRID_STEP_DB = 0.25  # grid cells are stored as uint8 steps of 0.25 dB above the floor
_LOGMEL = LogMel()
_TEN_OVER_LN10 = 10.0 / np.log(10.0)
_PUNCTUATION = re.compile(r"[\W_]+", re.UNICODE)
_BLOCK = 1024  # rows compared at once in the near searches


def digest(data: bytes) -> bytes:
    """The exact key of a file's bytes (16 bytes of SHA-256)."""
    return hashlib.sha256(data).digest()[:16]


def text_digest(text: str) -> bytes:
    return digest(text.encode("utf-8", errors="replace"))


def normalise_text(text: str) -> str:
    """Case, accents, punctuation and spacing removed: "Too bad!" and "too  bad" read the same."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return " ".join(_PUNCTUATION.sub(" ", folded).split())


def image_hash(rgb: np.ndarray) -> np.ndarray:
    """A 256-bit perceptual hash (32 uint8) of an RGB image: its grey 64 x 64 reduction's lowest DCT frequencies,
    each above or below their median."""
    cv2 = require("cv2")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:HASH_FREQS, :HASH_FREQS].ravel()
    return np.packbits(low > np.median(low[1:]))  # the DC term (overall brightness) left out of the median


def audio_grid(samples: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A recording at the model rate as a 32 x 20 grid of log-mel levels (uint8, GRID_STEP_DB steps), invariant
    to gain and to silence before and after it, and the samples it covers; None for digital silence."""
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak == 0.0:
        return None
    loud = np.flatnonzero(np.abs(samples) >= peak * 10 ** (-TRIM_DB / 20))
    trimmed = samples[loud[0] : loud[-1] + 1] / np.float32(peak)
    power = np.exp(_LOGMEL(trimmed))  # [frames, 40] mel power
    frames = len(power)
    starts = np.minimum(np.linspace(0, frames, GRID_FRAMES + 1)[:-1].astype(int), frames - 1)
    ends = np.maximum(np.ceil(np.linspace(0, frames, GRID_FRAMES + 1)[1:]).astype(int), starts + 1)
    cells = np.stack([power[a:b].mean(axis=0) for a, b in zip(starts, ends)])
    bands = cells.reshape(GRID_FRAMES, GRID_BANDS, N_MELS // GRID_BANDS).sum(axis=2)
    level = np.log(bands + 1e-20) * _TEN_OVER_LN10
    level = np.maximum(level, level.max() - FLOOR_DB) - (level.max() - FLOOR_DB)
    return np.round(level.ravel() / GRID_STEP_DB).astype(np.uint8), len(trimmed)


def near_hash_pairs(hashes: np.ndarray, max_bits: int) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) of packed hashes [N, bytes] that differ in at most `max_bits` bits.

    Every pair is compared (N^2 / 2 popcounts, in blocks of rows to bound memory): 1,653 photos take
    milliseconds, 50,000 about a minute."""
    words = np.ascontiguousarray(hashes).view(np.uint64)  # [N, 4]
    for first in range(0, len(words), _BLOCK):
        block = words[first : first + _BLOCK]
        distance = np.zeros((len(block), len(words)), np.int32)
        for k in range(words.shape[1]):
            distance += np.bitwise_count(block[:, k, None] ^ words[None, :, k])
        rows, cols = np.nonzero(distance <= max_bits)
        for i, j in zip(rows + first, cols):
            if i < j:
                yield int(i), int(j)


def near_grid_pairs(grids: np.ndarray, lengths: np.ndarray, max_db: float) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) of audio grids [N, cells] whose mean absolute difference is at most `max_db`.

    Only recordings whose trimmed lengths are within 10 % of each other are compared (sorted by length, a sliding
    window), so the work follows how many recordings share a length, not N^2."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    limit = max_db / GRID_STEP_DB
    for position, i in enumerate(order):
        end = int(np.searchsorted(sorted_lengths, sorted_lengths[position] * 1.1, side="right"))
        others = order[position + 1 : end]
        if not len(others):
            continue
        difference = np.abs(grids[others].astype(np.int16) - grids[i].astype(np.int16)).mean(axis=1)
        for j in others[difference <= limit]:
            yield (int(i), int(j)) if i < j else (int(j), int(i))
