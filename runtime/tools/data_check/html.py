"""The check as one small self-contained HTML page: the terminal report, class balance as bars, and the near
duplicate images side by side (thumbnails inlined, 48 pixels a side), so a reviewer sees what was paired."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from polysense.errors import InputError
from polysense.optional import require
from polysense.preprocess.image import decode_image
from polysense.tools.data_check.report import CheckReport, format_report
from polysense.tools.manifest import read_manifest

THUMB = 48  # pixels a side
SHOWN_GROUPS = 12  # near-duplicate image groups drawn


def _thumbnail(path: str) -> str:
    """A data: URL of a small JPEG of the image at `path`, or "" when it cannot be read."""
    cv2 = require("cv2")
    try:
        rgb = decode_image(path)
    except InputError:
        return ""
    small = cv2.resize(rgb, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii") if ok else ""


def _balance(report: CheckReport) -> list[str]:
    out = ["<h2>Rows per label</h2><table>"]
    largest = max((n for counts in report.balance.values() for n in counts.values()), default=1) or 1
    for split, counts in report.balance.items():
        for label, n in counts.items():
            width = round(200 * n / largest)
            out.append(
                f"<tr><td>{html.escape(split)}</td><td>{html.escape(label)}</td>"
                f'<td><span class="bar" style="width:{width}px"></span> {n}</td></tr>'
            )
    return [*out, "</table>"]


def _near_images(report: CheckReport) -> list[str]:
    found = report.modalities.get("image")
    if found is None or not (found.near or found.exact):
        return []
    paths = {row.line: row.image for row in read_manifest(report.manifest).rows}
    groups = sorted(found.near + found.exact, key=lambda g: (not g.cross_split, g.kind, g.lines))
    out = ["<h2>Duplicate images (cross-split first)</h2>"]
    for group in groups[:SHOWN_GROUPS]:
        cells = "".join(
            f'<figure><img src="{_thumbnail(paths[line] or "")}" alt=""><figcaption>line {line}<br>'
            f"{html.escape(split or '-')}, {html.escape(label)}</figcaption></figure>"
            for line, split, label in zip(group.lines, group.splits, group.labels)
            if paths.get(line)
        )
        out.append(f"<div class=group><b>{group.kind}</b>{cells}</div>")
    return out


def write_html(report: CheckReport, path: str | os.PathLike) -> None:
    """Write the page (tens of KB: the report, bars, at most SHOWN_GROUPS groups of thumbnails)."""
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}pre{white-space:pre-wrap;background:#f4f4f4;"
        "padding:1em}.bar{display:inline-block;height:.8em;background:#4a7}figure{display:inline-block;"
        "margin:.3em;font-size:.75em;text-align:center}.group{border-bottom:1px solid #ddd}td{padding:0 .5em}"
    )
    body = [
        f"<h1>Data check: {html.escape(Path(report.manifest).name)}</h1>",
        f"<pre>{html.escape(format_report(report))}</pre>",
        *_balance(report),
        *_near_images(report),
    ]
    page = (
        f"<!doctype html><meta charset=utf-8><title>data check</title><style>{style}</style>{''.join(body)}\n"
    )
    Path(path).write_text(page, encoding="utf-8")
