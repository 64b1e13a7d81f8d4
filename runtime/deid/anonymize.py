"""A whole data manifest de-identified into a new folder: `polysense data anonymize MANIFEST --out DIR`.

Every image is decoded and written again with its faces blurred or boxed out (and so without its EXIF
metadata: GPS position, camera serial, time), every text cell has its personal information replaced by typed
placeholders, every recording is written again with the speaker's voice transformed (McAdams), and speaker
names become pseudonyms (`speaker-1`, ... in order of first appearance; no key is kept). Labels and splits are
copied. New files are named by number, as file names identify people too (`3_george_7.wav`).

The originals are only read. `out` must be a new or empty folder; it gets `images/`, `audio/`, `report.json`
(per row: what was found and what was changed, never the personal information itself) and `manifest.csv`,
written last, so an interrupted run leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from polysense.deid.faces import FaceDetector
from polysense.deid.images import ImageOptions, anonymize_image
from polysense.deid.mcadams import VoiceOptions, anonymize_voice
from polysense.deid.text import TextOptions, anonymize_text
from polysense.errors import InputError
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.optional import require
from polysense.preprocess.audio import load_audio
from polysense.preprocess.image import decode_image
from polysense.tools.manifest import Row, read_manifest, write_manifest
from polysense.version import __version__

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # written in the source's format; others as PNG
JPEG_QUALITY = 95


@dataclass(frozen=True)
class AnonymizeOptions:
    """What is done to each modality. None keeps that modality's cells and files as they are (files copied)."""

    images: ImageOptions = field(default_factory=ImageOptions)  # mode "keep": files copied byte for byte
    text: TextOptions | None = field(default_factory=TextOptions)
    audio: VoiceOptions | None = field(default_factory=VoiceOptions)
    pseudonymize_speakers: bool = True  # the speaker column: names replaced by speaker-1, speaker-2, ...
    limits: Limits = DEFAULT_LIMITS  # what one input file may cost to decode


@dataclass(frozen=True)
class AnonymizeResult:
    manifest: Path  # the new manifest.csv
    report: Path  # report.json beside it
    rows: int
    faces: int  # faces blurred or boxed, over all distinct images
    text_findings: dict[str, int]  # replacements per kind, over all rows
    files: dict[str, int]  # distinct image and audio files written


def anonymize_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    options: AnonymizeOptions = AnonymizeOptions(),
    progress: bool = True,
) -> AnonymizeResult:
    """De-identify every row of `manifest` into the new folder `out` (see the module's docstring)."""
    source = read_manifest(manifest, labelled=False)
    source.raise_if_problems()
    out = _new_folder(Path(out))
    writer = _Writer(out, options)
    rows, reports = [], []
    for row in tqdm(source.rows, desc="anonymizing", unit="row", disable=not progress):
        new_row, report = writer.row(row)
        rows.append(new_row)
        reports.append(report)
    text_findings: Counter[str] = Counter()
    for report in reports:
        text_findings.update(report.get("text", {}).get("replaced", {}))
    files = {m: len(writer.written[m]) for m in ("image", "audio")}
    totals = {"rows": len(rows), "faces": writer.faces, "text_replaced": dict(text_findings), "files": files}
    document = {
        "polysense": __version__,
        "source": str(source.path),
        "options": _jsonable(asdict(options)),
        "totals": totals,
        "rows": reports,
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    write_manifest(rows, out / "manifest.csv")
    return AnonymizeResult(
        out / "manifest.csv", report_path, len(rows), writer.faces, dict(text_findings), files
    )


def _new_folder(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"{out} is not an empty folder (it may hold a dataset); anonymized data goes to a new folder: "
            "choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


class _Writer:
    """Writes each distinct source file once (a photo reused by many rows is anonymized once)."""

    def __init__(self, out: Path, options: AnonymizeOptions) -> None:
        self.out, self.options = out, options
        self.written: dict[str, dict[str, dict[str, Any]]] = {"image": {}, "audio": {}}  # source -> report
        self.speakers: dict[str, str] = {}
        self.faces = 0
        self._detector: FaceDetector | None = None

    def row(self, row: Row) -> tuple[Row, dict[str, Any]]:
        report: dict[str, Any] = {"line": row.line}
        changes: dict[str, Any] = {}
        if row.image is not None:
            report["image"] = self._file("image", row.image)
            changes["image"] = str(self.out / report["image"]["file"])
        if row.audio is not None:
            report["audio"] = self._file("audio", row.audio)
            changes["audio"] = str(self.out / report["audio"]["file"])
        if row.text is not None and self.options.text is not None:
            result = anonymize_text(row.text, self.options.text)
            changes["text"] = result.text
            report["text"] = {
                "replaced": result.counts(),
                "spans": [[f.kind, f.start, f.end] for f in result.findings],  # in the original text
            }
        if row.speaker is not None and self.options.pseudonymize_speakers:
            name = self.speakers.setdefault(row.speaker, f"speaker-{len(self.speakers) + 1}")
            changes["speaker"] = name
            report["speaker"] = "pseudonymized"
        return replace(row, **changes), report

    def _file(self, modality: str, source: str) -> dict[str, Any]:
        done = self.written[modality]
        if source not in done:
            number = len(done) + 1
            write = self._image if modality == "image" else self._audio
            done[source] = write(Path(source), number)
        return done[source]

    def _image(self, source: Path, number: int) -> dict[str, Any]:
        cv2 = require("cv2")
        options = self.options.images
        if options.mode == "keep":
            return {"file": _copy(source, self.out, "images", number), "action": "keep"}
        if self._detector is None:
            self._detector = FaceDetector(options.faces)
        result = anonymize_image(decode_image(source, self.options.limits), options, self._detector)
        suffix = source.suffix.lower() if source.suffix.lower() in IMAGE_SUFFIXES else ".png"
        name = f"images/{number:06d}{suffix}"
        (self.out / "images").mkdir(exist_ok=True)
        bgr = cv2.cvtColor(result.pixels, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(self.out / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise InputError(f"could not write {self.out / name}; check the folder is writable")
        self.faces += len(result.regions)
        return {
            "file": name,
            "action": options.mode,
            "faces": [[f.left, f.top, f.width, f.height, round(f.score, 3)] for f in result.faces],
            "changed": [list(r) for r in result.regions],
            "metadata": "removed (re-encoded)",
        }

    def _audio(self, source: Path, number: int) -> dict[str, Any]:
        soundfile = require("soundfile")
        voice = self.options.audio
        if voice is None:
            return {"file": _copy(source, self.out, "audio", number), "action": "keep"}
        samples, rate = load_audio(source, limits=self.options.limits)
        samples = anonymize_voice(samples, rate, voice)
        name = f"audio/{number:06d}.wav"
        (self.out / "audio").mkdir(exist_ok=True)
        soundfile.write(str(self.out / name), np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16")
        return {
            "file": name,
            "action": f"mcadams alpha={voice.alpha}",
            "channels": "mixed to mono",
            "seconds": round(samples.size / rate, 3),
            "sample_rate": rate,
        }


def _copy(source: Path, out: Path, folder: str, number: int) -> str:
    """`source` copied byte for byte (its metadata too) as folder/NUMBER.suffix; the new name, relative to out."""
    name = f"{folder}/{number:06d}{source.suffix.lower()}"
    (out / folder).mkdir(exist_ok=True)
    shutil.copyfile(source, out / name)
    return name


def _jsonable(value: Any) -> Any:
    """asdict() output with tuples as lists (JSON has no tuples)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
