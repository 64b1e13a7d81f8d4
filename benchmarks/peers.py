"""polysense `auto` against peer engines on the same graphs, weights and inputs, in ONE process (issue 42).

    make bench-peers        (installs the `peers` extra, trains runs/pretrained once, then runs this)
    python benchmarks/peers.py --run runs/pretrained [--quick]

The pretrained tri-modal model (EfficientNet-Lite0, MiniLM-L6, causal audio): each encoder and the fusion head
alone, and the encoders + fusion of one call, at batch 1 and 32, on one thread and on every core. Engines:

- polysense_auto: the runtime at precision "auto". Per component, the sessions its factory makes for the
  variants auto picks (polysense.inference.sessions.Session, the options the Pipeline uses); encoders + fusion,
  Pipeline.predict_batch on the prepared samples (what an application calls, stacking and softmax included).
- onnxruntime_fp32: the bundle's fp32 graphs in plain `onnxruntime.InferenceSession(path)`, default options
  but the thread count.
- openvino_default / openvino_f32 / openvino_int8_nncf: OpenVINO's CPU plugin on the bundle's fp32 ONNX graphs
  (OpenVINO cannot read polysense's int8 graphs: com.microsoft.QAttention), at its default inference precision,
  at f32 (INFERENCE_PRECISION_HINT), and quantized by OpenVINO's own quantizer NNCF (nncf.quantize, calibrated
  on preprocessed validation samples of the run).
- pytorch_eager / torch_compile: the trained model of the run folder, each component the module export traced
  (polysense.export.components), eager and under torch.compile (inductor, a graph per input shape).

Every engine gets the same preprocessed test-split samples: the graphs' inputs are built once. Audio clips are
cut to the shortest clip's frame count, so that 32 of them batch (the runtime runs clips of unequal length
apart, since padding would enter the causal state). Parity: each engine's outputs against onnxruntime_fp32's on
the batch of 32, and how often the logits' argmax agrees. Writes results/peers/peers.{json,md}; the report
(fastest peer, ratios, targets) is benchmarks/peers_report.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import polysense
from benchmarks.peers_report import ARGMAX, POLYSENSE, REFERENCE, WHOLE, markdown
from polysense.bundle.reader import Bundle, open_bundle
from polysense.bundle.schema import FUSION, BundleDescription
from polysense.export.components import components
from polysense.inference.fusion import Prepared
from polysense.inference.sessions import Session, SessionSettings, import_onnxruntime
from polysense.machine import describe
from polysense.modalities import SPECS
from polysense.models.training.run_folder import load_trained
from polysense.tools.bench import BenchOptions, machine, measure
from polysense.tools.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 32)
CALIBRATION = 100  # validation samples NNCF calibrates on (--quick: 8)
# measure()'s windows per batch size: a batch of 32 takes 10-100x a sample's time.
OPTIONS = {
    1: BenchOptions(warmup_runs=10, window_runs=30, max_windows=6),
    32: BenchOptions(warmup_runs=3, window_runs=8, max_windows=6),
}
PEERS_EXTRA = "pip install 'polysense[peers]' (or: make bench-peers)"

Feeds = dict[str, np.ndarray]  # one graph's inputs by name
Run = Callable[[str, Feeds], list[np.ndarray]]  # component, its inputs -> its outputs


@dataclass(frozen=True)
class Inputs:
    """One batch, as every engine gets it: the runtime's prepared samples and each graph's inputs."""

    prepared: list[Prepared]
    feeds: dict[str, Feeds]  # per component; the fusion head's embeddings are onnxruntime fp32's


@dataclass
class Engine:
    name: str
    label: str  # what runs, in words
    run: Run
    precisions: dict[str, str]  # per component
    whole: Callable[[Inputs], object] | None = None  # one call of the whole model, where not run() in turn


# -- inputs --------------------------------------------------------------------------------------------------


def prepared_samples(pipeline: polysense.Pipeline, run_dir: Path, split: str, count: int) -> list[Prepared]:
    """The first `count` samples of a split of the run's manifest, checked and preprocessed by the runtime."""
    rows = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == split][:count]
    return [pipeline.prepare({m: getattr(row, m) for m in pipeline.modalities}) for row in rows]


def same_length(prepared: list[Prepared]) -> list[Prepared]:
    """The samples with their audio frames cut to the shortest clip's count, so that the clips batch."""
    if not prepared or "audio" not in prepared[0].features:
        return prepared
    frames = min(p.features["audio"].shape[0] for p in prepared)
    return [replace(p, features={**p.features, "audio": p.features["audio"][:frames]}) for p in prepared]


def encoder_feeds(description: BundleDescription, prepared: list[Prepared]) -> dict[str, Feeds]:
    """Each encoder graph's inputs for a batch of prepared samples, built as the runtime builds them (a
    streaming encoder starts from its zero state)."""
    feeds = {}
    for modality in description.modalities:
        spec = SPECS[modality]
        features = [p.features[modality] for p in prepared]
        names = spec.encoder_inputs(description.preprocessing.of(modality))
        feeds[spec.component] = dict(zip(names, spec.codec.feeds(features)))
        if spec.streaming:
            # The description's check(): a streaming encoder has its state described.
            assert description.streaming is not None
            for tensor in description.streaming.state:
                shape = [
                    len(prepared) if axis == tensor.batch_axis else n for axis, n in enumerate(tensor.shape)
                ]
                feeds[spec.component][tensor.name] = np.zeros(shape, np.float32)
    return feeds


def fusion_feeds(description: BundleDescription, embeddings: dict[str, np.ndarray]) -> Feeds:
    """The fusion head's inputs: one embedding per encoder component (every modality present) and the mask."""
    *embedding_inputs, mask_input = (tensor.name for tensor in description.component(FUSION).inputs)
    encoders = [SPECS[m].component for m in description.modalities]
    feeds = {name: embeddings[component] for name, component in zip(embedding_inputs, encoders)}
    batch = len(next(iter(embeddings.values())))
    feeds[mask_input] = np.ones((batch, len(encoders)), np.float32)
    return feeds


def logits(engine: Engine, description: BundleDescription, feeds: dict[str, Feeds]) -> np.ndarray:
    """The whole model through one engine: every encoder on its inputs, then the fusion head on their outputs."""
    embeddings = {c: engine.run(c, f)[0] for c, f in feeds.items() if c != FUSION}
    return engine.run(FUSION, fusion_feeds(description, embeddings))[0]


def batch_inputs(reference: Engine, description: BundleDescription, prepared: list[Prepared]) -> Inputs:
    feeds = encoder_feeds(description, prepared)
    embeddings = {c: reference.run(c, f)[0] for c, f in feeds.items()}
    return Inputs(prepared, {**feeds, FUSION: fusion_feeds(description, embeddings)})


# -- engines -------------------------------------------------------------------------------------------------


def polysense_engine(bundle: Bundle, threads: int) -> Engine:
    """The runtime at precision auto: its own session factory on the variants auto picks, and the Pipeline."""
    pipeline = polysense.Pipeline.load(bundle.path, device="cpu", intra_op_threads=threads)
    settings = SessionSettings(device="cpu", intra_op_threads=threads)
    sessions = {
        name: Session(bundle.read(spec.variant(pipeline.precisions[name]).file), settings, name)
        for name, spec in bundle.description.components.items()
    }
    return Engine(
        POLYSENSE,
        "polysense Session per component; Pipeline.predict_batch for encoders + fusion",
        lambda component, feeds: sessions[component].run(feeds),
        dict(pipeline.precisions),
        whole=lambda inputs: pipeline.predict_batch(inputs.prepared),
    )


def onnxruntime_engine(bundle: Bundle, threads: int) -> Engine:
    """Plain onnxruntime on the fp32 graphs: default SessionOptions but the thread count."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {
        name: ort.InferenceSession(str(bundle.path / spec.variant("fp32").file), options)
        for name, spec in bundle.description.components.items()
    }
    return Engine(
        REFERENCE,
        f"onnxruntime {ort.__version__} InferenceSession(path), fp32 graphs",
        lambda component, feeds: sessions[component].run(None, feeds),
        {name: "fp32" for name in sessions},
    )


def openvino_models(bundle: Bundle, calibration: dict[str, list[Feeds]]) -> tuple[dict, dict, dict[str, str]]:
    """OpenVINO's models of the bundle's fp32 graphs, NNCF's int8 models of them, and why a component has no
    int8 model (where NNCF failed on it)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    models = {
        name: core.read_model(bundle.path / spec.variant("fp32").file)
        for name, spec in bundle.description.components.items()
    }
    quantized, failed = {}, {}
    for name, model in models.items():
        attention = any(op.get_type_name() == "Softmax" for op in model.get_ops())
        try:
            quantized[name] = nncf.quantize(
                model,
                nncf.Dataset(calibration[name]),
                subset_size=len(calibration[name]),
                model_type=nncf.ModelType.TRANSFORMER if attention else None,
            )
        except Exception as error:  # NNCF raises its own types; the component is then left out of int8
            failed[name] = f"NNCF failed: {type(error).__name__}: {error}"[:300]
    return models, quantized, failed


def _openvino_run(compiled: dict) -> Run:
    def run(component: str, feeds: Feeds) -> list[np.ndarray]:
        return list(compiled[component](feeds, share_inputs=True).to_tuple())

    return run


def openvino_engines(models: dict, quantized: dict, threads: int) -> list[Engine]:
    """OpenVINO's CPU plugin at its default precision, at f32, and on NNCF's int8 models."""
    import openvino as ov

    core = ov.Core()
    threads_config = {"INFERENCE_NUM_THREADS": threads}
    engines = []
    for name, source, config, label in (
        ("openvino_default", models, {}, "default precision"),
        ("openvino_f32", models, {"INFERENCE_PRECISION_HINT": "f32"}, "INFERENCE_PRECISION_HINT f32"),
        ("openvino_int8_nncf", quantized, {}, "NNCF int8 models, default precision"),
    ):
        compiled = {c: core.compile_model(m, "CPU", {**threads_config, **config}) for c, m in source.items()}
        precisions = {c: m.get_property("INFERENCE_PRECISION_HINT").to_string() for c, m in compiled.items()}
        if source is quantized:
            precisions = {c: f"int8 + {p}" for c, p in precisions.items()}
        engines.append(
            Engine(
                name,
                f"OpenVINO {importlib.metadata.version('openvino')} CPU plugin, fp32 ONNX graphs, {label}",
                _openvino_run(compiled),
                precisions,
            )
        )
    return engines


def _torch_run(graphs: dict[str, tuple[Callable, list[str]]]) -> Run:
    def run(component: str, feeds: Feeds) -> list[np.ndarray]:
        module, names = graphs[component]
        with torch.inference_mode():
            out = module(*(torch.from_numpy(feeds[n]) for n in names))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def torch_engines(run_dir: Path, image_size: int, threads: int) -> list[Engine]:
    """The trained model, each component as the module export traced, eager and under torch.compile (compiled
    again per thread count: inductor's kernels keep the thread count they were made with)."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    model, _ = load_trained(run_dir)
    graphs = {c.name: (c.module, c.inputs) for c in components(model, image_size)}
    compiled = {name: (torch.compile(m, dynamic=False), n) for name, (m, n) in graphs.items()}
    fp32 = {name: "fp32" for name in graphs}
    return [
        Engine(
            "pytorch_eager", f"PyTorch {torch.__version__} eager, inference_mode", _torch_run(graphs), fp32
        ),
        Engine(
            "torch_compile",
            "torch.compile (inductor, dynamic=False: one graph per input shape)",
            _torch_run(compiled),
            fp32,
        ),
    ]


# -- measurement ---------------------------------------------------------------------------------------------


def _call(engine: Engine, component: str, inputs: Inputs, description: BundleDescription) -> Callable:
    """One timed call of a component, or of the whole model (the engine's own call where it has one)."""
    if component != WHOLE:
        return lambda: engine.run(component, inputs.feeds[component])
    if engine.whole is not None:
        whole = engine.whole
        return lambda: whole(inputs)
    encoders = {c: f for c, f in inputs.feeds.items() if c != FUSION}
    return lambda: logits(engine, description, encoders)


def measure_setting(
    engines: list[Engine], inputs: Inputs, description: BundleDescription, options: BenchOptions
) -> tuple[dict, dict]:
    """Every engine on every component and the whole model, engines in turn per component (so that the
    machine's drift meets them alike): measure() statistics, and the error of each call that failed."""
    latency: dict[str, dict] = {e.name: {} for e in engines}
    errors: dict[str, dict] = {}
    for component in [*description.components, WHOLE]:
        for engine in engines:
            try:
                latency[engine.name][component] = measure(
                    _call(engine, component, inputs, description), options
                )
            except Exception as error:  # a peer that cannot run a graph is reported, not fatal
                errors.setdefault(engine.name, {})[component] = f"{type(error).__name__}: {error}"[:300]
            print(f"  {engine.name:<20} {component:<18} {_shown(latency[engine.name].get(component))}")
    return latency, errors


def _shown(stats: dict | None) -> str:
    return "failed" if stats is None else f"{stats['p50_ms']:.3f} ms"


def parity(engines: list[Engine], inputs: Inputs, description: BundleDescription) -> dict[str, dict]:
    """Per engine: the largest absolute difference of each component's first output (embedding, logits) and of
    the whole model's logits from onnxruntime fp32's, and the share of samples whose argmax agrees."""
    reference = next(e for e in engines if e.name == REFERENCE)
    encoders = {c: f for c, f in inputs.feeds.items() if c != FUSION}
    expected = {c: reference.run(c, f)[0] for c, f in inputs.feeds.items()}
    expected_logits = logits(reference, description, encoders)
    found: dict[str, dict] = {}
    for engine in engines:
        entry: dict[str, float] = {}
        try:
            for component, feeds in inputs.feeds.items():
                entry[component] = float(np.abs(engine.run(component, feeds)[0] - expected[component]).max())
            got = logits(engine, description, encoders)
            entry[WHOLE] = float(np.abs(got - expected_logits).max())
            entry[ARGMAX] = float((got.argmax(1) == expected_logits.argmax(1)).mean())
        except Exception as error:  # the timing tables say which call failed and why
            print(f"  parity of {engine.name} stopped: {type(error).__name__}: {error}", file=sys.stderr)
        found[engine.name] = entry
    return found


# -- the run -------------------------------------------------------------------------------------------------


def calibration_feeds(reference: Engine, description: BundleDescription, prepared: list[Prepared]) -> dict:
    """Per component, one batch-1 input dict per calibration sample (the fusion head's from fp32 embeddings)."""
    per_sample = [batch_inputs(reference, description, [p]).feeds for p in prepared]
    return {c: [feeds[c] for feeds in per_sample] for c in description.components}


def engines_for(bundle: Bundle, run_dir: Path, threads: int, openvino: tuple | None) -> list[Engine]:
    """Every engine at one thread count, polysense first and the reference second."""
    engines = [polysense_engine(bundle, threads), onnxruntime_engine(bundle, threads)]
    if openvino is not None:
        engines += openvino_engines(openvino[0], openvino[1], threads)
    image_size = bundle.description.preprocessing.of("image").size
    return engines + torch_engines(run_dir, image_size, threads)


def _openvino(bundle: Bundle, reference: Engine, validation: list[Prepared]) -> tuple[tuple | None, dict]:
    """OpenVINO's and NNCF's models (calibrated on the `validation` samples), or None and why they are not
    measured."""
    # NNCF sends usage events to Google Analytics unless a consent file says no; NNCF_CI is its own switch
    # that replaces the sender with a stub (it changes nothing else in NNCF 3.x).
    if not os.environ.get("POLYSENSE_ALLOW_TELEMETRY"):
        os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as error:
        reason = f"{error.name} is not installed: {PEERS_EXTRA}"
        return None, {name: reason for name in ("openvino_default", "openvino_f32", "openvino_int8_nncf")}
    models, quantized, failed = openvino_models(
        bundle, calibration_feeds(reference, bundle.description, validation)
    )
    return (models, quantized), {f"openvino_int8_nncf ({c})": r for c, r in failed.items()}


def run(run_dir: Path, bundle_dir: Path, threads: tuple[int, ...], quick: bool) -> dict:
    bundle = open_bundle(bundle_dir)
    description = bundle.description
    preparer = polysense.Pipeline.load(bundle.path, device="cpu", precision="fp32")
    test = same_length(prepared_samples(preparer, run_dir, "test", max(BATCHES)))
    reference = onnxruntime_engine(bundle, 0)
    validation = prepared_samples(preparer, run_dir, "val", 8 if quick else CALIBRATION)
    openvino, unavailable = _openvino(bundle, reference, validation)
    inputs = {batch: batch_inputs(reference, description, test[:batch]) for batch in BATCHES}
    results: dict = {"engines": {}, "unavailable": unavailable, "settings": [], "parity": {}}
    for count in threads:
        engines = engines_for(bundle, run_dir, count, openvino)
        results["engines"] = {e.name: {"label": e.label, "precisions": e.precisions} for e in engines}
        for batch in BATCHES:
            load = os.getloadavg()[0]  # this process's own threads count in it, besides any other work
            print(f"batch {batch}, {count} thread(s), load average {load:.2f}")
            options = BenchOptions.quick() if quick else OPTIONS[batch]
            latency, errors = measure_setting(engines, inputs[batch], description, options)
            setting = {"threads": count, "batch": batch, "load_average": load}
            results["settings"].append({**setting, "latency": latency, "errors": errors})
        if count == max(threads):  # parity on the largest batch, every core
            results["parity"] = parity(engines, inputs[max(BATCHES)], description)
    return results


def _versions() -> dict[str, str]:
    found = {"polysense": polysense.__version__}
    for name in ("onnxruntime", "openvino", "nncf", "torch", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _openvino_cpu() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU can do (its default precision follows it: BF16 means bf16)."""
    try:
        import openvino as ov
    except ImportError:
        return []
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default=str(ROOT / "runs" / "pretrained"), help="finished training run")
    parser.add_argument("--bundle", help="its bundle (default RUN/bundle)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers"))
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="few runs: a smoke test, not a measurement")
    parser.add_argument("--command", default="make bench-peers", help="the command to record in the results")
    args = parser.parse_args()
    threads = tuple(sorted({int(t) for t in args.threads.split(",")}))
    load_before = os.getloadavg()[0]
    results = run(Path(args.run), Path(args.bundle or Path(args.run) / "bundle"), threads, args.quick)
    meta = {
        "machine": describe(machine()),
        "machine_info": machine(),
        "command": args.command,
        "bundle": str(args.bundle or Path(args.run) / "bundle"),
        "versions": _versions(),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "openvino_cpu": _openvino_cpu(),
        "quick": args.quick,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "peers.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
