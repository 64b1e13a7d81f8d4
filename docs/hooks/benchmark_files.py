"""mkdocs hook: the committed benchmark results (benchmarks/**/results/*.md and *.png) become part of the site at
their repository paths (site/benchmarks/results/vs_pytorch.md, ...), so the docs link to the very files the
benchmarks write, and mkdocs --strict checks those links like any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
KINDS = (".md", ".png")


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((ROOT / "benchmarks").rglob("*")):
        if path.suffix in KINDS and "results" in path.relative_to(ROOT).parts:
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
