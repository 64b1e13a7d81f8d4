"""The built-in tri-modal dataset: real JPEG and WAV files plus a CSV manifest, deterministic for a seed.

Each label is a combination of three independent attributes, one carried by each modality:

    image  shape of a drawn figure   circle | square | triangle   (3 values)
    text   mood of a sentence        calm | busy                  (2 values, many synonyms)
    audio  direction of a tone sweep rising | falling             (2 values)

giving 3 x 2 x 2 = 12 labels such as "triangle-busy-rising", drawn uniformly. Because the attributes are
independent, a modality alone narrows the label down to the labels sharing its attribute and no further:

    modalities present   best possible accuracy
    image                1/4  = 25.0 %
    text                 1/6  = 16.7 %
    audio                1/6  = 16.7 %
    image+text           1/2  = 50.0 %
    image+audio          1/2  = 50.0 %
    text+audio           1/3  = 33.3 %
    image+text+audio     100 %

So no single modality can exceed 25 % (well under the 70 % bound), and only the three together determine the
label. Nuisance factors keep each attribute a real recognition problem: random colours, sizes, positions,
rotations, background gradients and JPEG noise for images; random pitch, sweep range, duration, loudness,
harmonics and background noise for audio; many sentence templates, synonyms and filler words for text.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile
from tqdm import tqdm

from polysense.errors import InputError

SHAPES = ("circle", "square", "triangle")
MOODS = ("calm", "busy")
SWEEPS = ("rising", "falling")
LABELS = tuple(f"{s}-{m}-{w}" for s in SHAPES for m in MOODS for w in SWEEPS)  # 12 labels

IMAGE_SIDE = 72  # pixels of the stored JPEGs (the preprocessor crops them to its own size)
SAMPLE_RATE = 16_000  # Hz of the stored WAVs

_MOOD_WORDS = {
    "calm": ("calm", "quiet", "peaceful", "gentle", "serene", "still", "relaxed", "tranquil", "soothing"),
    "busy": ("busy", "loud", "noisy", "hectic", "chaotic", "crowded", "rowdy", "frantic", "bustling"),
}
_TEMPLATES = (
    "the {place} felt {mood} {time}",
    "a {mood} day at the {place} {time}",
    "we spent a {mood} hour near the {place} {time}",
    "{time} the {place} was {mood} and {filler}",
    "it was a {mood} scene by the {place}",
    "everyone said the {place} seemed {mood} {time}",
    "{filler} , the {place} stayed {mood}",
    "my {relative} found the {place} {mood} {time}",
)
_PLACES = (
    "market",
    "harbour",
    "station",
    "park",
    "library",
    "kitchen",
    "street",
    "beach",
    "garden",
    "office",
)
_TIMES = ("this morning", "at noon", "tonight", "yesterday", "on sunday", "after the rain", "all day", "")
_FILLERS = ("as usual", "for once", "somehow", "of course", "to our surprise", "like always", "honestly")
_RELATIVES = ("aunt", "brother", "friend", "neighbour", "teacher", "grandmother")


@dataclass(frozen=True)
class BuiltinSpec:
    n: int = 3000  # samples to write
    seed: int = 0  # the same seed writes the same files


def _rng(seed: int, index: int) -> np.random.Generator:
    # One generator per sample, so sample i is the same whatever n is.
    return np.random.default_rng([seed, index])


def make_image(shape: str, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image of one bright filled shape on a darker, noisy gradient background."""
    side = IMAGE_SIDE
    low, high = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
    ramp = np.linspace(0.0, 1.0, side)[:, None, None]
    background = low + (high - low) * ramp
    if rng.random() < 0.5:
        background = background.transpose(1, 0, 2)
    image = np.broadcast_to(background, (side, side, 3)).copy()
    # Any hue, but brighter than every background: the shape's outline is the signal, its colour is not.
    colour = rng.uniform(0, 255, 3)
    colour = colour + (190 - colour.mean()) if colour.mean() < 190 else colour
    radius = rng.uniform(16, 26)
    centre = rng.uniform(radius + 4, side - radius - 4, 2)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((side, side), dtype=np.uint8)
    if shape == "circle":
        cv2.circle(canvas, (int(centre[0]), int(centre[1])), int(radius), 255, -1, lineType=cv2.LINE_AA)
    else:
        corners = 4 if shape == "square" else 3
        angles = angle + 2 * np.pi * np.arange(corners) / corners
        points = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    alpha = (canvas.astype(np.float64) / 255.0)[:, :, None]
    image = image * (1 - alpha) + np.clip(colour, 0, 255) * alpha
    image += rng.normal(0, rng.uniform(2, 10), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_audio(sweep: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 tone sweeping up or down in pitch, with harmonics and background noise, at 16 kHz."""
    duration = rng.uniform(0.4, 0.9)
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    start = rng.uniform(250, 1400)
    ratio = rng.uniform(1.7, 3.0)
    end = start * ratio if sweep == "rising" else start / ratio
    # Exponential sweep: instantaneous frequency start * (end/start)^(t/duration); phase is its integral.
    k = np.log(end / start) / duration
    phase = 2 * np.pi * start * (np.exp(k * t) - 1) / k
    tone = np.sin(phase) + rng.uniform(0, 0.5) * np.sin(2 * phase + rng.uniform(0, 2 * np.pi))
    fade = np.minimum(1.0, np.minimum(t, duration - t) / 0.02)
    signal = tone * fade * rng.uniform(0.15, 0.6) / 1.5
    snr_db = rng.uniform(8, 25)
    noise = rng.normal(0, 1, t.size) * np.sqrt(np.mean(signal**2) / 10 ** (snr_db / 10))
    return np.clip(signal + noise, -1, 1).astype(np.float32)


def make_text(mood: str, rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    words = {
        "mood": _MOOD_WORDS[mood][rng.integers(len(_MOOD_WORDS[mood]))],
        "place": _PLACES[rng.integers(len(_PLACES))],
        "time": _TIMES[rng.integers(len(_TIMES))],
        "filler": _FILLERS[rng.integers(len(_FILLERS))],
        "relative": _RELATIVES[rng.integers(len(_RELATIVES))],
    }
    return " ".join(template.format(**words).split())


def write_builtin(out: str | os.PathLike, spec: BuiltinSpec = BuiltinSpec(), progress: bool = True) -> Path:
    """Write images/, audio/ and manifest.csv under `out`; returns the manifest path.

    The manifest is written last and atomically, so an interrupted run leaves no folder that looks complete.
    """
    if spec.n < len(LABELS):
        raise InputError(f"--n {spec.n} is too small; the built-in set needs at least {len(LABELS)} samples")
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists():
        raise InputError(f"{out} already holds a dataset; remove it or choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    # Labels cycle through all 12 in a seeded order, so every label has n/12 samples (+-1).
    order = np.random.default_rng(spec.seed).permutation(spec.n) % len(LABELS)
    rows = [("image", "text", "audio", "label")]
    for index in tqdm(range(spec.n), desc="writing built-in data", unit="sample", disable=not progress):
        label = LABELS[order[index]]
        shape, mood, sweep = label.split("-")
        rng = _rng(spec.seed, index)
        image_path, audio_path = f"images/{index:05d}.jpg", f"audio/{index:05d}.wav"
        bgr = cv2.cvtColor(make_image(shape, rng), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(out / image_path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"could not write {out / image_path}")
        soundfile.write(str(out / audio_path), make_audio(sweep, rng), SAMPLE_RATE, subtype="PCM_16")
        rows.append((image_path, make_text(mood, rng), audio_path, label))
    tmp = manifest.with_name("manifest.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    (out / "builtin.json").write_text(json.dumps(asdict(spec)) + "\n")
    os.replace(tmp, manifest)
    return manifest


def ensure_builtin(out: str | os.PathLike, spec: BuiltinSpec = BuiltinSpec(), progress: bool = True) -> Path:
    """The manifest of the built-in set in `out`, written unless a complete one with the same spec is there."""
    out = Path(out)
    manifest, stamp = out / "manifest.csv", out / "builtin.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return manifest
    if out.exists():
        shutil.rmtree(out)
    return write_builtin(out, spec, progress)
