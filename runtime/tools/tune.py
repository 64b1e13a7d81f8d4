"""Choose precisions on the device itself: `polysense tune BUNDLE`.

int8 kernels differ from CPU to CPU (VNNI or not, u8s8 saturation), so the variant export measured as fastest
and accurate may be neither on the device. The bundle carries a probe (probe.npz: the preprocessed inputs of a
few dozen validation samples and the labels fp32 gives them). Tuning times every kept variant of each component
on this device, against fp32, and checks that swapping it in leaves the probe's labels as fp32 gives them. A
variant is chosen only where it is no slower than fp32 and agrees on at least MIN_AGREEMENT of the labels.

The choice goes to tuning.json beside bundle.json: the hashed files are never touched. `precision="auto"` uses
it when it was made for this bundle (bundle.json's hash) and this device, and says so
(`Pipeline.precision_source`). The probe is plain arrays, read with numpy's pickle-free loader.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from polysense.bundle.schema import FUSION
from polysense.errors import BundleError, ConfigError
from polysense.inference.fusion import Prepared
from polysense.inference.precision import TUNING_FILE, description_hash

if TYPE_CHECKING:
    from polysense.inference.pipeline import Pipeline

log = logging.getLogger("polysense")

PROBE_FILE = "probe.npz"
PROBE_SAMPLES = 32
MIN_AGREEMENT = 0.99
MAX_PROBE_BYTES = 256 << 20

Measure = Callable[["Pipeline", str, Sequence[Prepared]], float]  # (pipeline, component, samples) -> ms


@dataclass(frozen=True)
class Probe:
    samples: list[Prepared]
    labels: np.ndarray  # the label index fp32 gave each sample where the probe was made


@dataclass(frozen=True)
class TuneResult:
    choices: dict[str, str]  # component -> precision
    measurements: dict[str, dict[str, dict]]  # component -> precision -> latency_ms, agreement
    path: Path  # tuning.json


def write_probe(pipeline_fp32: Pipeline, samples: Sequence[dict], folder: str | os.PathLike) -> int:
    """probe.npz in `folder`: `samples` preprocessed by `pipeline_fp32` (an fp32 Pipeline of that bundle) and
    the label it gives each, one sample at a time (no batch mates)."""
    arrays: dict[str, np.ndarray] = {}
    labels = []
    for index, sample in enumerate(samples[:PROBE_SAMPLES]):
        # Stored as float16, compressed (a 224x224 photo: 0.3 MB, not 0.6): tuning compares the variants with
        # fp32 on these same stored inputs, so the rounding cannot favour either side.
        features = {m: _compact(f) for m, f in pipeline_fp32.prepare(sample).features.items()}
        arrays.update({f"{index}.{m}": f for m, f in features.items()})
        labels.append(pipeline_fp32.labels.index(pipeline_fp32.predict_batch([_restored(features)])[0].label))
    # Numeric arrays only, so allow_pickle=False writes the same file (and names the keyword for type checkers).
    np.savez_compressed(
        Path(folder) / PROBE_FILE, allow_pickle=False, labels=np.array(labels, np.int64), **arrays
    )
    return len(labels)


def _compact(features: np.ndarray) -> np.ndarray:
    return features.astype(np.float16) if features.dtype == np.float32 else features


def _restored(features: dict[str, np.ndarray]) -> Prepared:
    return Prepared({m: f.astype(np.float32) if f.dtype == np.float16 else f for m, f in features.items()})


def read_probe(folder: str | os.PathLike) -> Probe:
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        raise ConfigError(
            f"{Path(folder)} has no {PROBE_FILE} (bundles exported before polysense tune existed); make one "
            "with polysense tune BUNDLE --data MANIFEST (a few dozen validation samples)"
        )
    if path.stat().st_size > MAX_PROBE_BYTES:
        raise BundleError(f"{path} is over {MAX_PROBE_BYTES >> 20} MB; a probe is a few dozen samples")
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = data["labels"]
            features: dict[int, dict[str, np.ndarray]] = {}
            for key in data.files:
                if key != "labels":
                    index, modality = key.split(".", 1)
                    features.setdefault(int(index), {})[modality] = data[key]
    except (ValueError, KeyError, OSError) as error:
        raise BundleError(
            f"{path} is not a probe polysense wrote ({error}); make it again with polysense tune --data"
        ) from error
    if sorted(features) != list(range(len(labels))):
        raise BundleError(
            f"{path}: samples and labels do not match; make it again with polysense tune --data"
        )
    return Probe([_restored(features[i]) for i in range(len(labels))], labels)


def component_latency(pipeline: Pipeline, component: str, samples: Sequence[Prepared]) -> float:
    """Median milliseconds of `component` at batch 1 over `samples` (each run twice: the first warms up)."""
    stage = "fusion" if component == FUSION else f"encode_{component.removesuffix('_encoder')}"
    times = []
    for sample in samples:
        if component != FUSION and component.removesuffix("_encoder") not in sample.features:
            continue
        pipeline.predict_batch([sample])
        times.append(pipeline.predict_batch([sample])[0].timings[stage])
    return statistics.median(times) if times else float("inf")


def _labels(pipeline: Pipeline, samples: Sequence[Prepared]) -> np.ndarray:
    """Label indices, one sample at a time (no batch mates)."""
    return np.array([pipeline.labels.index(pipeline.predict_batch([s])[0].label) for s in samples])


def tune_bundle(
    bundle: str | os.PathLike, device: str = "cpu", threads: int = 0, measure: Measure = component_latency
) -> TuneResult:
    """Measure every kept variant on this device and write tuning.json; `measure` times a component.

    The reference is fp32 on this device, on the probe's inputs; an edge bundle (one variant per component)
    has its variants measured and checked against the labels the probe was made with."""
    from polysense.inference.pipeline import Pipeline

    folder = Path(bundle)
    if folder.is_file():
        raise ConfigError(
            f"{folder} is an archive; unpack it (tar -xf) and tune the folder, which then serves"
        )
    if not folder.is_dir():  # before the probe: "no probe.npz" would send the user the wrong way
        raise BundleError(f"bundle not found: {folder}")
    probe = read_probe(folder)
    if not len(probe.labels):
        raise ConfigError(f"{folder / PROBE_FILE} holds no samples; make it again with polysense tune --data")

    def load(precision: str | dict[str, str]) -> Pipeline:
        return Pipeline.load(folder, device=device, precision=precision, intra_op_threads=threads)

    base = load("auto")
    if device == "cuda" and "CUDAExecutionProvider" not in base.providers.values():
        raise ConfigError(
            "--device cuda: this onnxruntime runs on the CPU here, so nothing would be measured on CUDA"
        )
    fp32 = {name: "fp32" for name in base.description.components}
    base = base if base.description.is_edge else load(fp32)
    reference = _labels(base, probe.samples)

    def load_only(component: str) -> Callable[[str], Pipeline]:
        """Loads `component` at a precision and every other component at fp32, so the labels change only by
        the variant tried."""
        return lambda precision: load({**fp32, component: precision})

    measurements: dict[str, dict[str, dict]] = {}
    for name in base.description.components:
        measurements[name] = _trials(base, name, probe, reference, load_only(name), measure)
    choices = {name: _choice(trials) for name, trials in measurements.items()}
    path = folder / TUNING_FILE
    record = {
        "device": device,
        "bundle_sha256": description_hash(folder),
        "probe_samples": len(probe.labels),
        "min_agreement": MIN_AGREEMENT,
        "choices": choices,
        "measurements": measurements,
        "machine": _machine(),
    }
    partial = path.with_name(f".{TUNING_FILE}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)
    return TuneResult(choices, measurements, path)


def _trials(
    base: Pipeline,
    name: str,
    probe: Probe,
    reference: np.ndarray,
    load: Callable[[str], Pipeline],
    measure: Measure,
) -> dict[str, dict]:
    """precision -> latency_ms and agreement with the reference labels, for each variant of component `name`
    usable on this device; the base pipeline's own variant first."""
    own = base.precisions[name]
    agreement = float(np.mean(reference == probe.labels)) if base.description.is_edge else 1.0
    trials = {own: {"latency_ms": measure(base, name, probe.samples), "agreement": agreement}}
    if trials[own]["latency_ms"] == float("inf"):
        return trials  # no probe sample has this modality: nothing to measure, so it keeps its variant
    device = "cuda" if "CUDAExecutionProvider" in base.providers.values() else "cpu"
    for precision, variant in base.description.component(name).variants.items():
        if precision == own or variant.device not in (device, "any"):
            continue
        trial = load(precision)
        agreement = float(np.mean(_labels(trial, probe.samples) == reference))
        trials[precision] = {"latency_ms": measure(trial, name, probe.samples), "agreement": agreement}
    return trials


def _choice(trials: dict[str, dict]) -> str:
    """The fastest variant that is no slower than the first (fp32, or an edge bundle's own) and gives its
    labels on nearly every probe sample."""
    best = next(iter(trials))
    for precision, trial in trials.items():
        if trial["agreement"] >= MIN_AGREEMENT and trial["latency_ms"] <= trials[best]["latency_ms"]:
            best = precision
    return best


def _machine() -> dict:
    from polysense.machine import machine

    return machine()
