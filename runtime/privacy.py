"""Nothing leaves the device and nothing is written behind the user's back.

The onnxruntime wheels record telemetry on Linux as soon as the library is imported: a persistent device id and
events (process, OS, interpreter path, model file names, execution providers) under
~/.cache/Microsoft/DeveloperTools/.onnxruntime/, uploaded when a network is reachable. Setting
ORT_DISABLE_TELEMETRY before onnxruntime is first imported stops it (onnxruntime.disable_telemetry_events()
alone still records an event), so `import polysense` sets it, for every entry point: library, CLI, export and
benchmarks all import polysense first.

Opt in with POLYSENSE_ALLOW_TELEMETRY=1. An application that imports onnxruntime itself before polysense must
set ORT_DISABLE_TELEMETRY=1 itself; `telemetry_disabled()` tells whether it took effect.
"""

from __future__ import annotations

import os
import sys
import warnings

ALLOW_VARIABLE = "POLYSENSE_ALLOW_TELEMETRY"
ORT_VARIABLE = "ORT_DISABLE_TELEMETRY"


def disable_onnxruntime_telemetry() -> None:
    """Set ORT_DISABLE_TELEMETRY=1 unless the user opted in (or chose a value for it already)."""
    if _truthy(os.environ.get(ALLOW_VARIABLE)):
        return
    os.environ.setdefault(ORT_VARIABLE, "1")


def telemetry_disabled() -> bool:
    """Whether onnxruntime in this process runs without telemetry (the variable was set before its import)."""
    if _ONNXRUNTIME_IMPORTED_FIRST:
        return _truthy(_VALUE_BEFORE_US)
    return _truthy(os.environ.get(ORT_VARIABLE))


def _truthy(value: str | None) -> bool:
    return value not in (None, "", "0")


_ONNXRUNTIME_IMPORTED_FIRST = "onnxruntime" in sys.modules
_VALUE_BEFORE_US = os.environ.get(ORT_VARIABLE)
disable_onnxruntime_telemetry()
if _ONNXRUNTIME_IMPORTED_FIRST and not telemetry_disabled() and not _truthy(os.environ.get(ALLOW_VARIABLE)):
    warnings.warn(
        "onnxruntime was imported before polysense, so its telemetry (a device id and events under "
        "~/.cache/Microsoft/DeveloperTools) is on; import polysense first or set ORT_DISABLE_TELEMETRY=1",
        stacklevel=2,
    )
