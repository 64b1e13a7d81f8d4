"""GPU benchmark in one call: the runtime on CUDA (IO binding, fp32 and fp16 variants) against CPU.

    python benchmarks/gpu.py --bundle runs/demo/bundle --out benchmarks/results

Needs onnxruntime-gpu instead of onnxruntime (pip uninstall -y onnxruntime && pip install onnxruntime-gpu)
and a CUDA device. It refuses to report CUDA numbers if the sessions fell back to CPU. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from polysense.inference.pipeline import Pipeline
from polysense.tools.bench import BenchOptions, format_report, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CUDA fallback warning must stop the benchmark
        probe = Pipeline.load(args.bundle, device="cuda", precision="fp32")
    if any(provider != "CUDAExecutionProvider" for provider in probe.providers.values()):
        raise SystemExit(f"not every component runs on CUDA: {probe.providers}")
    reports = {}
    for device, precision in (("cpu", "auto"), ("cuda", "fp32"), ("cuda", "auto")):
        report = run_bench(args.bundle, BenchOptions(device=device, precision=precision), progress=True)
        reports[f"{device}_{precision}"] = report
        print(f"\n== {device} {precision}\n{format_report(report)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
