"""`make check-data`: `polysense data check` on the built-in set (3,000 samples), AV-digits and SST-2 (train, val
from train, dev as test), the JSON report of each and one table (benchmarks/results/data_check.{json,md}).

The datasets are written into a temporary folder from ../shared/data (nothing is downloaded); timings are of this
machine (its CPU is recorded), with the label model on one thread."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from polysense.tools.data_check import CheckOptions, check_manifest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
POLYSENSE = [sys.executable, "-m", "polysense"]


def _datasets(folder: Path) -> dict[str, list[str]]:
    return {
        "builtin": ["builtin", "--out", str(folder / "builtin"), "--n", "3000", "--no-progress"],
        "avdigits": [
            "avdigits",
            "--fsdd",
            str(DATA / "fsdd"),
            "--images",
            str(DATA / "sign_digits"),
            "--out",
            str(folder / "avdigits"),
        ],
        "sst2": ["sst2", "--dir", str(DATA / "sst2"), "--out", str(folder / "sst2")],
    }


def _row(name: str, report: dict) -> str:
    leak = report["leakage"]
    modalities = report["modalities"]
    exact = sum(sum(len(g["lines"]) - 1 for g in m["exact"]) for m in modalities.values())
    near = sum(len(m["near"]) for m in modalities.values())
    cross = sum(sum(len(set(g["splits"])) > 1 for g in m["exact"] + m["near"]) for m in modalities.values())
    bad = sum(len(m["not_found"]) + len(m["unreadable"]) for m in modalities.values())
    labels = report["label_issues"]
    audio = report["audio"] or {}
    return (
        f"| {name} | {report['rows']} | {bad} | {exact} | {near} | {cross} | {leak['val_in_train']}/"
        f"{leak['val_rows']} | {leak['test_in_train']}/{leak['test_rows']} | "
        f"{len(audio.get('clipped', []))} / {len(audio.get('silent', []))} | "
        f"{len(labels['issues'])} ({labels['cv_accuracy']:.3f}) | {report['seconds']['total']:.1f} |"
    )


def shortened(report: dict, keep: int = 20) -> dict:
    """The report with its long lists cut to their first `keep` items, each list's full length beside it
    (`polysense data check --json` writes them whole)."""
    for found in report["modalities"].values():
        for key in ("exact", "near", "unreadable"):
            found[f"{key}_count"] = len(found[key])
            found[key] = found[key][:keep]
    report["label_issues"]["issues_count"] = len(report["label_issues"]["issues"])
    report["label_issues"]["issues"] = report["label_issues"]["issues"][:keep]
    return report


def main() -> None:
    results, table = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in _datasets(Path(tmp)).items():
            subprocess.run([*POLYSENSE, "data", *args], check=True, stdout=subprocess.DEVNULL)
            report = check_manifest(Path(tmp) / name / "manifest.csv", CheckOptions(label_errors=True), False)
            full = json.loads(json.dumps(report.to_dict()))
            table.append(_row(name, full))  # counted before the lists are cut
            results[name] = shortened(full)
            results[name]["manifest"] = f"polysense data {' '.join(args[:1])} (temporary folder)"
    (RESULTS / "data_check.json").write_text(json.dumps(results, indent=1) + "\n")
    machine = next(iter(results.values()))["machine"]
    lines = [
        "# polysense data check on the built-in set, AV-digits and SST-2",
        "",
        "`make check-data` (benchmarks/data_check.py). Cells not found or unreadable; extra exact copies (rows "
        "beyond the first of each group, every modality); near-duplicate groups; groups crossing splits; whole "
        "samples of val and test repeating a training sample; clipped / silent recordings; likely label errors "
        "(the quick model's out-of-sample accuracy); seconds in all.",
        "",
        f"Machine: {machine.get('model')}, {machine.get('cpus')} cores ({', '.join(machine.get('isa', []))}), "
        "shared with other work while measured.",
        "",
        "| data | rows | unreadable | exact copies | near groups | cross-split groups | val leaked | test leaked "
        "| clipped / silent | label issues (model accuracy) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *table,
    ]
    (RESULTS / "data_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
