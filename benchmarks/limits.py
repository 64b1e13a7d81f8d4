"""Worst-case inputs against the target: any single input up to 10 MB costs at most 256 MB of extra peak memory
and 2 s, or is refused within that.

    python benchmarks/limits.py --bundle runs/demo/bundle      (or: make bench-limits)

Each case is the largest input the default limits accept for its kind (or a hostile one they must refuse),
predicted through a loaded, warmed-up Pipeline in a fresh process: extra peak memory is the process's peak RSS
above its RSS before the input, time is the wall clock of the one call. Results go to
benchmarks/results/limits.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/limits.py --bundle runs/demo/bundle"
TARGET_MB, TARGET_S = 256, 2.0

MEASURE = """
import json, sys, time
import numpy as np
import polysense
from polysense.tools.bench import peak_rss_mb, reset_peak_rss, rss_mb
pipe = polysense.Pipeline.load(sys.argv[1], device="cpu")
kind, path = sys.argv[2], sys.argv[3]
value = open(path, encoding="utf-8").read() if kind == "text" else open(path, "rb").read()
if kind == "audio_array":
    kind, value = "audio", np.frombuffer(value, np.float32)
warm = {"image": np.zeros((64, 64, 3), np.uint8), "text": "warm up", "audio": np.zeros(16000, np.float32)}
pipe.predict(**{kind: warm[kind]}, **({"sample_rate": 16000} if kind == "audio" else {}))
assert reset_peak_rss(), "needs Linux /proc/self/clear_refs to measure the peak of one call"
base = rss_mb()
tick = time.perf_counter()
try:
    rate = {"sample_rate": int(sys.argv[4])} if len(sys.argv) > 4 else {}
    pipe.predict(**{kind: value}, **rate)
    outcome = "predicted"
except polysense.PolysenseError as error:
    outcome = "refused: " + str(error)[:120]
seconds = time.perf_counter() - tick
extra = peak_rss_mb() - base
print(json.dumps({"outcome": outcome, "seconds": seconds, "extra_mb": extra}))
"""


def _image(height: int, width: int, extension: str, params=()) -> bytes:
    rng = np.random.default_rng(0)
    pixels = cv2.resize(rng.integers(0, 255, (height // 16, width // 16, 3), np.uint8), (width, height))
    return cv2.imencode(extension, pixels, list(params))[1].tobytes()


def _sound(seconds: float, rate: int, channels: int, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def _blank_png(height: int, width: int) -> bytes:
    return cv2.imencode(".png", np.zeros((height, width), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[
        1
    ].tobytes()


def _lying_jpeg() -> bytes:
    data = bytearray(_image(32, 32, ".jpg"))
    sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] == 0xC0)
    struct.pack_into(">HH", data, sof + 5, 60_000, 60_000)
    return bytes(data)


def _wav_with_rate(rate: int) -> bytes:
    data = bytearray(_sound(1.0, 16000, 1, "WAV"))
    struct.pack_into("<I", data, 24, rate)
    return bytes(data)


def cases() -> list[tuple[str, str, bytes, list[str]]]:
    """(name, kind, file bytes, extra arguments): the largest accepted and the hostile refused inputs."""
    words = " ".join(["calm", "busy", "morning", "market"] * 600_000)[: 10 << 20]
    return [
        (
            "24 MP progressive JPEG, 4:4:4 (decoder worst case)",
            "image",
            _image(
                4000,
                6000,
                ".jpg",
                (
                    cv2.IMWRITE_JPEG_PROGRESSIVE,
                    1,
                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
                ),
            ),
            [],
        ),
        ("24 MP baseline JPEG", "image", _image(4000, 6000, ".jpg"), []),
        ("24 MP PNG", "image", _image(4000, 6000, ".png", (cv2.IMWRITE_PNG_COMPRESSION, 9)), []),
        ("24 MP lossless WebP", "image", _image(4000, 6000, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), []),
        (
            "PNG of 20000 x 20000 pixels",
            "image",
            _blank_png(20_000, 20_000),
            [],
        ),
        ("JPEG whose header claims 60000 x 60000", "image", _lying_jpeg(), []),
        ("10 MB of text", "text", words.encode(), []),
        ("10 min of 16 kHz FLAC", "audio", _sound(600, 16000, 1, "FLAC"), []),
        ("5 min of 48 kHz stereo WAV", "audio", _sound(310, 48000, 2, "WAV"), []),
        ("WAV whose header says 2 GHz", "audio", _wav_with_rate(2_000_000_000), []),
        ("WAV whose header says 8 Hz", "audio", _wav_with_rate(8), []),
        ("10 MB float32 array at 1 Hz", "audio_array", np.zeros(10 << 18, np.float32).tobytes(), ["1"]),
        ("10 MB float32 array at 16 kHz", "audio_array", np.zeros(10 << 18, np.float32).tobytes(), ["16000"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "demo" / "bundle")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from polysense.tools.bench import machine

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, kind, data, extra in cases():
            path = Path(folder) / "input"
            path.write_bytes(data)
            command = [sys.executable, "-c", MEASURE, str(args.bundle), kind, str(path), *extra]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {"input": name, "bytes": len(data), **json.loads(done.stdout.strip().splitlines()[-1])}
            row["within_target"] = row["extra_mb"] <= TARGET_MB and row["seconds"] <= TARGET_S
            rows.append(row)
            print(
                f"{name}: {row['outcome'][:60]} {row['seconds']:.2f} s, +{row['extra_mb']:.0f} MB", flush=True
            )
    result = {
        "command": COMMAND,
        "machine": machine(),
        "target": {"mb": TARGET_MB, "s": TARGET_S},
        "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "limits.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Worst-case inputs (target: +{TARGET_MB} MB peak and {TARGET_S:.0f} s at most, or refused within that)",
        "",
        f"`{COMMAND}` on {result['machine']['cpus']} CPUs ({', '.join(result['machine']['isa'])}).",
        "",
        "| input | size | outcome | seconds | extra peak MB | within target |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        outcome = row["outcome"].split(":")[0]
        lines.append(
            f"| {row['input']} | {row['bytes'] / 1e6:.2f} MB | {outcome} | {row['seconds']:.3f} | "
            f"{row['extra_mb']:.0f} | {'yes' if row['within_target'] else 'NO'} |"
        )
    (args.out / "limits.md").write_text("\n".join(lines) + "\n")
    return 0 if all(row["within_target"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
