"""The machine a measurement was made on: benchmarks and `polysense tune` record it with their numbers."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict:
    """CPU count, platform, the x86 vector instruction sets int8 and fp32 kernels depend on, and the CPU's model
    name: two CPUs with the same instruction sets can still differ (an AMD EPYC and an earlier machine whose
    model was not recorded, both with AVX-512 VNNI and no AMX, gave 2.67x and 2.92x in the same PyTorch
    comparison)."""
    fields = _cpuinfo_fields(("flags", "model name"))
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {
        "cpus": os.cpu_count(),
        "platform": sys.platform,
        "isa": [f for f in wanted if f in flags],
        "model": fields.get("model name") or platform.machine(),  # not platform.processor(): it runs uname
    }


def describe(info: dict) -> str:
    """One line for a report: "AMD EPYC, 2 CPUs, avx2/fma/avx512f/avx512_vnni"."""
    isa = "/".join(info["isa"]) or "no AVX2" if "isa" in info else "instruction sets not recorded"
    return f"{info.get('model', 'CPU model not recorded')}, {info.get('cpus', '?')} CPUs, {isa}"


def _cpuinfo_fields(names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each named field of /proc/cpuinfo (nothing where it cannot be read)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() in names:
                    found.setdefault(name.strip(), value.strip())
                if len(found) == len(names):
                    break
    except OSError:
        pass
    return found


def same_kind(earlier: dict, here: dict) -> bool:
    """Whether two machine() records describe the same kind of machine. The CPU model counts where both
    recorded it (results written before it was recorded are compared on the rest)."""
    keys = {"cpus", "platform", "isa"} | ({"model"} if "model" in earlier and "model" in here else set())
    return all(earlier.get(key) == here.get(key) for key in keys)


def results_from_this_machine(path: os.PathLike | str) -> dict:
    """Earlier benchmark results (JSON with a "machine" entry) for a run that adds to them: only those measured on
    this kind of machine, whose timings and training numerics they share. Anything else stops the benchmark with
    the fix in its message."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
    previous = json.loads(path.read_text())
    if not isinstance(previous.get("machine"), dict) or not same_kind(previous["machine"], machine()):
        raise SystemExit(
            f"--merge: {path} was measured on another kind of machine ({previous.get('machine')}); "
            "run everything again without --merge"
        )
    return previous
