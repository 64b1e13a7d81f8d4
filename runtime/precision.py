"""Which precision (fp32, int8, fp16) each component runs at: chosen from what export measured and kept."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from polysense.bundle import Bundle
from polysense.errors import ConfigError
from polysense.sessions import CUDA, import_onnxruntime

PRECISIONS = ("fp32", "int8", "fp16")


def target_device(device: str) -> str:
    """cpu or cuda: what `device` means with the installed onnxruntime."""
    if device == "auto":
        return "cuda" if CUDA in import_onnxruntime().get_available_providers() else "cpu"
    return device


def _fastest_for(bundle: Bundle, name: str, device: str) -> str:
    kept = bundle.component(name)["precisions"]
    if device == "cuda":
        return "fp16" if "fp16" in kept else "fp32"
    usable = {p: e for p, e in kept.items() if e.get("device", "any") in ("cpu", "any")}
    # fp32 first, so without latency figures (an fp32-only bundle) fp32 is the choice.
    return min(usable, key=lambda p: (usable[p].get("latency_ms", float("inf")), p != "fp32"))


def choose_precisions(
    bundle: Bundle, names: Sequence[str], device: str, requested: str | dict[str, str]
) -> dict[str, str]:
    """component -> precision. Never returns a variant the bundle does not hold (rejected ones are not kept)."""
    device = target_device(device)
    if isinstance(requested, dict):
        unknown = [n for n in requested if n not in names]
        if unknown:
            raise ConfigError(f"unknown component {unknown[0]!r}; this bundle has {', '.join(names)}")
        chosen = {n: _fastest_for(bundle, n, device) for n in names}
        for name, precision in requested.items():
            if precision not in bundle.precisions(name):
                raise ConfigError(
                    f"{name} has no {precision} variant in this bundle (it has {', '.join(bundle.precisions(name))})"
                )
            chosen[name] = precision
        return chosen
    if requested == "auto":
        return {n: _fastest_for(bundle, n, device) for n in names}
    if requested not in PRECISIONS:
        raise ConfigError(f"precision {requested!r} is unknown; choose auto, {', '.join(PRECISIONS)}")
    having = [n for n in names if requested in bundle.precisions(n)]
    if not having:
        raise ConfigError(
            f"this bundle has no {requested} variant of any component (export keeps a variant only where it was "
            "accurate and fast enough); use precision='auto' or 'fp32'"
        )
    lacking = [n for n in names if n not in having]
    if lacking:
        warnings.warn(
            f"no {requested} variant of {', '.join(lacking)} in this bundle; they run fp32", stacklevel=3
        )
    return {n: requested if n in having else "fp32" for n in names}
