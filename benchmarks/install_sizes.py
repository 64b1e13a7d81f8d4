"""Installed size of the runtime per modality, and where it goes.

    python benchmarks/install_sizes.py          (or: make bench-install-sizes; needs the package registry)

Each install is `pip install --target DIR '.[EXTRAS]'` of this checkout into an empty folder (no bytecode
compiled, no cache), sized file by file from each distribution's RECORD. Results:
benchmarks/results/install_sizes.{json,md}.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/install_sizes.py"
INSTALLS = {
    "image only: polysense[ort,image]": "ort,image",
    "audio only: polysense[ort,audio]": "ort,audio",
    "text only: polysense[ort,text]": "ort,text",
    "everything: polysense[cpu]": "cpu",
}
MODALITY_PACKAGES = ("opencv-python-headless", "soundfile", "soxr", "tokenizers")


def install(extras: str, target: Path) -> dict[str, int]:
    """distribution name -> installed bytes."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--no-cache-dir"]
    subprocess.run([*command, "--target", str(target), f"{ROOT}[{extras}]"], check=True)
    sizes = {}
    for record in target.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0].lower().replace("_", "-")
        total = 0
        with record.open() as handle:
            for row in csv.reader(handle):
                file = target / row[0]
                if row and file.is_file():
                    total += file.stat().st_size
        sizes[name] = total
    return sizes


def main() -> None:
    report = {"command": COMMAND, "installs": {}}
    for label, extras in INSTALLS.items():
        with tempfile.TemporaryDirectory() as folder:
            sizes = install(extras, Path(folder) / "site")
        report["installs"][label] = {
            "extras": extras,
            "total_mb": sum(sizes.values()) / 1e6,
            "packages_mb": {k: v / 1e6 for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])},
            "modality_packages": [p for p in MODALITY_PACKAGES if p in sizes],
        }
        print(f"{label}: {sum(sizes.values()) / 1e6:.0f} MB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "install_sizes.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "install_sizes.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Installed size of the runtime",
        "",
        f"Command: `{report['command']}` (pip install --target, no bytecode; sizes from each package's RECORD).",
        "",
        "| install | total MB | modality packages in it | largest packages (MB) |",
        "|---|---|---|---|",
    ]
    for label, entry in report["installs"].items():
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(entry["packages_mb"].items())[:5])
        modality = ", ".join(entry["modality_packages"]) or "none"
        lines.append(f"| {label} | {entry['total_mb']:.1f} | {modality} | {top} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
