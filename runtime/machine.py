"""The machine a measurement was made on: benchmarks and `polysense tune` record it with their numbers."""

from __future__ import annotations

import os
import sys


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
