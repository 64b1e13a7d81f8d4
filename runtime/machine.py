"""The machine a measurement was made on: benchmarks and `polysense tune` record it with their numbers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def machine() -> dict:
    """CPU count, platform and the x86 vector instruction sets int8 and fp32 kernels depend on."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(
                (set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set()
            )
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpus": os.cpu_count(), "platform": sys.platform, "isa": [f for f in wanted if f in flags]}


def results_from_this_machine(path: os.PathLike | str) -> dict:
    """Earlier benchmark results (JSON with a "machine" entry) for a run that adds to them: only those measured on
    this kind of machine, whose timings and training numerics they share. Anything else stops the benchmark with
    the fix in its message."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
    previous = json.loads(path.read_text())
    if previous.get("machine") != machine():
        raise SystemExit(
            f"--merge: {path} was measured on another kind of machine ({previous.get('machine')}); "
            "run everything again without --merge"
        )
    return previous
