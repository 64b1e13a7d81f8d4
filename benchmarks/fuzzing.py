"""A seeded fuzzer for everything a user (or an attacker) can hand polysense.

Each input is made from (seed, index) alone, so any finding replays with `Fuzzer(...).run_one(index)`. Kinds:
mutated encoded images (JPEG, progressive JPEG, PNG, BMP, WebP) and audio (WAV, FLAC, OGG), text of random code
points, image and audio arrays of random dtypes, shapes and rates, CSV and JSONL data manifests, and bundle
descriptions (bundle.json), opened and, when they still open, loaded into a Pipeline. An outcome is "ok",
"refused" (a PolysenseError) or, for anything else, "failure: <type>: <message>".

tests/test_fuzz.py runs a few thousand inputs in the suite (importing this as benchmarks.fuzzing; pytest puts the
repository root on the import path); benchmarks/fuzz.py runs 100,000 or more in worker processes that also catch
crashes, hangs and memory (`make fuzz`).
"""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import soundfile

import polysense
from polysense.bundle.reader import open_bundle
from polysense.bundle.schema import DESCRIPTION_FILE
from polysense.errors import PolysenseError
from polysense.tools.manifest import read_manifest

KINDS = ("image", "audio", "text", "image_array", "audio_array", "manifest", "description")
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF)
_HEADER_VALUES = (0, 1, 0xFFFF, 0x7FFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = cv2.resize(rng.integers(0, 255, (6, 8, 3), np.uint8), (48, 36))
    encodings = [
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".png", []),
        (".bmp", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    ]
    return [cv2.imencode(extension, pixels, params)[1].tobytes() for extension, params in encodings]


def _sounds() -> list[bytes]:
    t = np.arange(4000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sounds = []
    for fmt, subtype, channels in [
        ("WAV", "PCM_16", 1),
        ("WAV", "FLOAT", 2),
        ("FLAC", "PCM_16", 1),
        ("OGG", "VORBIS", 1),
    ]:
        buffer = io.BytesIO()
        soundfile.write(buffer, np.stack([tone] * channels, axis=1), 8000, format=fmt, subtype=subtype)
        sounds.append(buffer.getvalue())
    return sounds


def mutate(data: bytes, rng: np.random.Generator, others: list[bytes]) -> bytes:
    """1-4 random byte-level mutations: bit flips, interesting bytes, header fields, cuts, inserts, splices."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not data:
            data = bytearray(rng.integers(0, 256, 16, np.uint8).tobytes())
        at = int(rng.integers(0, len(data)))
        operation = int(rng.integers(0, 8))
        if operation == 0:
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif operation == 1:
            data[at] = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
        elif operation == 2:  # a size or count field near the start, set to something extreme
            at = int(rng.integers(0, min(len(data), 64)))
            value = _HEADER_VALUES[int(rng.integers(0, len(_HEADER_VALUES)))]
            width = int(rng.choice([2, 4]))
            order = "little" if rng.random() < 0.5 else "big"
            data[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)
        elif operation == 3:
            del data[at:]
        elif operation == 4:
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 65)), np.uint8).tobytes()
        elif operation == 5:
            del data[at : at + int(rng.integers(1, 65))]
        elif operation == 6:
            block = data[at : at + int(rng.integers(1, 33))]
            data[at:at] = block * int(rng.integers(1, 17))
        else:
            other = others[int(rng.integers(0, len(others)))]
            data = data[:at] + other[int(rng.integers(0, len(other))) :]
    return bytes(data)


_CODE_POINT_RANGES = [
    (0x20, 0x7F),  # ASCII
    (0x0, 0x20),  # controls, NUL
    (0xA0, 0x250),  # Latin
    (0x300, 0x370),  # combining marks
    (0x4E00, 0x9FFF),  # CJK
    (0xD800, 0xE000),  # lone surrogates: not valid text
    (0x1F300, 0x1FAFF),  # emoji
    (0x200B, 0x2070),  # zero-width and bidi controls
    (0xFFF0, 0x10000),  # specials, noncharacters
    (0x10000, 0x110000),  # anything in the supplementary planes
]


def random_text(rng: np.random.Generator) -> str:
    length = int(math.exp(rng.uniform(0, math.log(200_000))))
    ranges = [
        _CODE_POINT_RANGES[i] for i in rng.integers(0, len(_CODE_POINT_RANGES), 1 + int(rng.integers(0, 3)))
    ]
    chosen = rng.integers(0, len(ranges), length)
    low = np.array([r[0] for r in ranges])[chosen]
    high = np.array([r[1] for r in ranges])[chosen]
    return "".join(map(chr, (low + rng.random(length) * (high - low)).astype(np.int64)))


def _random_array(rng: np.random.Generator, max_elements: int) -> np.ndarray:
    dtype = rng.choice(
        ["uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool", "complex64"]
    )
    ndim = int(rng.integers(0, 5))
    shape = [int(rng.choice([0, 1, 2, 3, 4, int(rng.integers(1, 400))])) for _ in range(ndim)]
    if math.prod(shape) > max_elements:
        shape = [1] * ndim
    values = rng.standard_normal(shape) * float(rng.choice([1, 100, 1e6]))
    if rng.random() < 0.1 and values.size:
        values.flat[int(rng.integers(0, values.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    with np.errstate(all="ignore"):
        return values.astype(dtype)


_RATES = (16000, 8000, 44100, 1, 0, -16000, 7.5, float("nan"), 10**12, True, "16000", None)


def _mutate_json(value, rng: np.random.Generator):
    """The parsed description with one node deleted, retyped or replaced by something hostile."""
    paths = []

    def walk(node, path):
        paths.append(path)
        children = (
            node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        )
        for key, child in children:
            walk(child, (*path, key))

    walk(value, ())
    path = paths[int(rng.integers(1, len(paths)))]
    *parents, last = path
    node = value
    for key in parents:
        node = node[key]
    replacements = [
        None,
        True,
        -1,
        0,
        2**63,
        1e308,
        "",
        "../x.onnx",
        "/etc/passwd",
        [],
        {},
        "x" * 10_000,
        [[[[[[]]]]]],
        {"a": {"b": {"c": None}}},
        1.5,
        "fp32",
    ]
    if rng.random() < 0.3 and isinstance(node, dict):
        del node[last]
    else:
        node[last] = copy.deepcopy(replacements[int(rng.integers(0, len(replacements)))])
    return value


class Fuzzer:
    """Seed inputs and the preprocessors they go through; `run_one(index)` makes and runs one input."""

    def __init__(self, bundle: Path, workdir: Path, seed: int = 0) -> None:
        self.seed = seed
        self.workdir = workdir
        self.images, self.sounds = _images(), _sounds()
        self.image = polysense.ImagePreprocessor(size=64)
        self.audio = polysense.AudioPreprocessor()
        corpus = ["a calm quiet morning", "the market after rain", "Ünïcødé and 数字 and emoji 🎉"]
        self.text = polysense.TextPreprocessor(polysense.train_tokenizer(corpus), max_length=64)
        (workdir / "photo.jpg").write_bytes(self.images[0])
        (workdir / "clip.wav").write_bytes(self.sounds[0])
        self.manifests = {
            ".csv": 'image,text,audio,label,split\nphoto.jpg,"a calm, quiet day",clip.wav,calm,train\n'
            "photo.jpg,busy street,,busy,test\n",
            ".jsonl": '{"image": "photo.jpg", "text": "calm", "label": "calm"}\n'
            '{"audio": "clip.wav", "label": "busy", "split": "val"}\n',
        }
        self.bundle = workdir / "bundle"
        shutil.copytree(bundle, self.bundle, dirs_exist_ok=True)
        self.description = json.loads((self.bundle / DESCRIPTION_FILE).read_text())

    def make(self, index: int) -> tuple[str, Callable[[], object]]:
        """The kind of input `index` and a call that feeds it to polysense."""
        rng = np.random.default_rng([self.seed, index])
        kind = KINDS[index % len(KINDS)]
        if kind == "image":
            data = mutate(self.images[int(rng.integers(0, len(self.images)))], rng, self.images)
            return kind, lambda: self.image(data)
        if kind == "audio":
            data = mutate(self.sounds[int(rng.integers(0, len(self.sounds)))], rng, self.sounds)
            return kind, lambda: self.audio(data)
        if kind == "text":
            text = random_text(rng)
            return kind, lambda: self.text(text)
        if kind == "image_array":
            array = _random_array(rng, 1_000_000)
            return kind, lambda: self.image(array)
        if kind == "audio_array":
            array, rate = _random_array(rng, 2_000_000), _RATES[int(rng.integers(0, len(_RATES)))]
            return kind, lambda: self.audio(array, sample_rate=rate)
        if kind == "manifest":
            return kind, self._manifest_call(rng)
        return kind, self._description_call(rng)

    def _manifest_call(self, rng: np.random.Generator) -> Callable[[], object]:
        suffix = ".csv" if rng.random() < 0.5 else ".jsonl"
        text = self.manifests[suffix]
        data = mutate(text.encode(), rng, [m.encode() for m in self.manifests.values()])
        if rng.random() < 0.5:  # text-level: valid UTF-8 with hostile characters
            data = data.decode("utf-8", errors="ignore").encode("utf-8", errors="surrogatepass")
        path = self.workdir / f"manifest{suffix}"

        def call() -> object:
            path.write_bytes(data)
            manifest = read_manifest(path)
            manifest.raise_if_problems()
            return manifest

        return call

    def _description_call(self, rng: np.random.Generator) -> Callable[[], object]:
        if rng.random() < 0.8:
            text = json.dumps(_mutate_json(copy.deepcopy(self.description), rng))
        else:
            original = json.dumps(self.description).encode()
            text = mutate(original, rng, [original]).decode("utf-8", errors="replace")

        def call() -> object:
            (self.bundle / DESCRIPTION_FILE).write_text(text, encoding="utf-8", errors="surrogatepass")
            open_bundle(self.bundle)
            return polysense.Pipeline.load(self.bundle, device="cpu")

        return call

    def run_one(self, index: int) -> tuple[str, str]:
        """(kind, outcome): "ok", "refused", or "failure: <type>: <message>" for anything else raised."""
        kind, call = self.make(index)
        try:
            call()
        except PolysenseError:
            return kind, "refused"
        except Exception as error:  # noqa: BLE001 - what the fuzzer is looking for
            return kind, f"failure: {type(error).__name__}: {str(error)[:300]}"
        return kind, "ok"
