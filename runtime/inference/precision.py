"""Which precision (fp32, int8, fp16) each component runs at: chosen from what export measured and kept."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from polysense.bundle.schema import DESCRIPTION_FILE, PRECISIONS, BundleDescription, ComponentSpec
from polysense.errors import ConfigError

log = logging.getLogger("polysense")
TUNING_FILE = (
    "tuning.json"  # what `polysense tune` chose on a device (polysense.tools.tune), beside bundle.json
)


def _fastest_for(component: ComponentSpec, device: str) -> str:
    kept = component.variants
    if len(kept) == 1:  # an edge bundle: its one variant was chosen for its device when it was made
        return next(iter(kept))
    if device == "cuda":
        # Only a CUDA measurement says fp16 pays there; export records one (latency_ms) only when it had CUDA.
        fp16 = kept.get("fp16")
        return "fp16" if fp16 is not None and fp16.latency_ms is not None else "fp32"
    usable = {p: v for p, v in kept.items() if p == "fp32" or v.device in ("cpu", "any")}
    # fp32 first, so without latency figures (an fp32-only bundle) fp32 is the choice.
    latency = {p: float("inf") if v.latency_ms is None else v.latency_ms for p, v in usable.items()}
    return min(usable, key=lambda p: (latency[p], p != "fp32"))


def choose_precisions(
    description: BundleDescription, names: Sequence[str], device: str, requested: str | dict[str, str]
) -> dict[str, str]:
    """component -> precision for `device` ("cpu" or "cuda", as sessions.runnable resolved it). Never returns a
    variant the bundle does not hold (rejected ones are not kept)."""
    components = {n: description.component(n) for n in names}
    if isinstance(requested, dict):
        unknown = [n for n in requested if n not in names]
        if unknown:
            raise ConfigError(f"unknown component {unknown[0]!r}; this bundle has {', '.join(names)}")
        chosen = {n: _fastest_for(c, device) for n, c in components.items()}
        for name, precision in requested.items():
            if precision not in components[name].variants:
                raise ConfigError(
                    f"{name} has no {precision} variant in this bundle "
                    f"(it has {', '.join(components[name].precisions)})"
                )
            chosen[name] = precision
        return chosen
    if requested == "auto":
        return {n: _fastest_for(c, device) for n, c in components.items()}
    if requested not in PRECISIONS:
        raise ConfigError(f"precision {requested!r} is unknown; choose auto, {', '.join(PRECISIONS)}")
    having = [n for n, c in components.items() if requested in c.variants]
    lacking = [n for n in names if n not in having]
    unfit = [n for n in lacking if "fp32" not in components[n].variants]  # an edge bundle's int8 or fp16 only
    if unfit:
        raise ConfigError(_edge_lacks(requested, components, unfit))
    if not having:
        raise ConfigError(
            f"this bundle has no {requested} variant of any component (export keeps a variant only where it was "
            "accurate and fast enough); use --precision auto or fp32"
        )
    if lacking:
        warnings.warn(
            f"no {requested} variant of {', '.join(lacking)} in this bundle; they run fp32", stacklevel=3
        )
    return {n: requested if n in having else "fp32" for n in names}


def _edge_lacks(requested: str, components: dict[str, ComponentSpec], unfit: list[str]) -> str:
    """Why an edge bundle cannot run `requested` everywhere, and what to do: it holds one variant per component,
    so a component without `requested` may have no fp32 to fall back on."""
    kept = ", ".join(f"{name} {component.precisions[0]}" for name, component in components.items())
    return (
        f"this edge bundle keeps one variant per component ({kept}): {', '.join(unfit)} has no {requested} and "
        "no fp32 to fall back on; "
        f"--precision auto runs them, or make an edge bundle of {requested} variants from the full bundle: "
        f"polysense edge FULL_BUNDLE --out DIR --precision {requested}"
    )


def tuned_choices(folder: Path, device: str) -> dict[str, str] | None:
    """The precisions `polysense tune` chose for this bundle on `device`, if it did (else None)."""
    path = folder / TUNING_FILE
    if not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        record = json.loads(path.read_text())
        choices = record["choices"]
        made_on = dict(record["machine"])
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        log.warning("%s cannot be read; precision auto uses export's measurements", path)
        return None
    if record.get("device") != device or record.get("bundle_sha256") != description_hash(folder):
        return None
    from polysense.machine import machine, same_kind

    if not same_kind(made_on, machine()):
        log.warning("%s was measured on another machine; run polysense tune here to use it", path)
        return None
    return (
        choices if isinstance(choices, dict) and all(isinstance(v, str) for v in choices.values()) else None
    )


def description_hash(folder: Path) -> str:
    return hashlib.sha256((folder / DESCRIPTION_FILE).read_bytes()).hexdigest()
