"""The edge bundle on one core, side by side with the full bundle.

    python benchmarks/edge.py --bundle runs/demo/bundle          (or: make bench-edge; about a minute)

For each bundle (the full one, and its edge bundle made here with `polysense edge`), a fresh process pinned to
core 0 (`taskset -c 0`, one onnxruntime intra-op thread) measures: cold start (import polysense, load, first
prediction), peak RSS, per-stage and end-to-end latency for every modality subset (median of 50), and live
audio in 100 ms chunks (10 s of audio: real-time factor = processing time / audio time, p50/p99 per chunk).
Results: benchmarks/results/edge.{json,md}, with the CPU's instruction sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/edge.py --bundle runs/demo/bundle"
RUNS = 50

MEASURE = """
import json, resource, statistics, sys, time
start = time.perf_counter()
import polysense
pipe = polysense.Pipeline.load(sys.argv[1], device="cpu", intra_op_threads=1)
sample = json.loads(sys.argv[2])
pipe.predict(**sample)
cold = time.perf_counter() - start
from itertools import combinations
subsets = {}
for r in range(1, len(pipe.modalities) + 1):
    for subset in combinations(pipe.modalities, r):
        inputs = {m: sample[m] for m in subset}
        stages, totals = {}, []
        for _ in range(RUNS):
            tick = time.perf_counter()
            prediction = pipe.predict(**inputs)
            totals.append((time.perf_counter() - tick) * 1000)
            for stage, ms in prediction.timings.items():
                stages.setdefault(stage, []).append(ms)
        subsets["+".join(subset)] = {
            "end_to_end_ms": statistics.median(totals),
            "stages_ms": {k: statistics.median(v) for k, v in stages.items() if k != "total"},
        }
stream_result = None
if "audio" in pipe.modalities:
    import numpy as np
    rate = 16000
    audio = np.random.default_rng(0).standard_normal(rate * 10).astype(np.float32) * 0.1
    stream = pipe.audio_stream()
    chunk = rate // 10
    per_chunk = []
    for begin in range(0, audio.size, chunk):
        tick = time.perf_counter()
        stream.accept_waveform(audio[begin : begin + chunk], rate)
        stream.result()
        per_chunk.append((time.perf_counter() - tick) * 1000)
    stream.input_finished()
    per_chunk.sort()
    stream_result = {
        "audio_seconds": 10.0,
        "chunk_ms": 100,
        "real_time_factor": sum(per_chunk) / 1000 / 10.0,
        "p50_ms": per_chunk[len(per_chunk) // 2],
        "p99_ms": per_chunk[int(0.99 * len(per_chunk))],
    }
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"cold_start_s": cold, "peak_rss_mb": peak, "subsets": subsets, "stream": stream_result,
                  "precisions": pipe.precisions}))
""".replace("RUNS", str(RUNS))


def measure(bundle: Path, sample: dict) -> dict:
    command = ["taskset", "-c", "0", sys.executable, "-c", MEASURE, str(bundle), json.dumps(sample)]
    if shutil.which("taskset") is None:
        command = command[3:]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundle"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    from polysense.tools.bench import machine
    from polysense.tools.edge import make_edge_bundle

    data = ROOT / "runs" / "demo" / "builtin_data"
    sample = {
        "image": str(sorted((data / "images").glob("*.jpg"))[0]),
        "audio": str(sorted((data / "audio").glob("*.wav"))[0]),
        "text": "a calm red square rising slowly",
    }
    report = {"command": COMMAND, "machine": machine(), "one_core": shutil.which("taskset") is not None}
    with tempfile.TemporaryDirectory() as folder:
        edge = make_edge_bundle(args.bundle, Path(folder) / "edge")
        report["bytes"] = {
            "full": edge.source_bytes,
            "edge": edge.bytes,
            "edge_share": edge.bytes / edge.source_bytes,
        }
        report["full"] = measure(Path(args.bundle), sample)
        report["edge"] = measure(edge.path, sample)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "edge.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    info, full, edge = report["machine"], report["full"], report["edge"]
    pinned = "core 0 (taskset)" if report["one_core"] else "not pinned (no taskset here)"
    lines = [
        "# Edge bundle on one core",
        "",
        f"Command: `{report['command']}`. Machine: {info['cpus']} CPUs, {'/'.join(info['isa'])}; each bundle in a "
        f"fresh process on {pinned}, one onnxruntime intra-op thread.",
        "",
        f"Bytes: edge {report['bytes']['edge'] / 1e6:.2f} MB, full {report['bytes']['full'] / 1e6:.2f} MB "
        f"({report['bytes']['edge_share']:.0%}).",
        "",
        "| | full bundle | edge bundle | target |",
        "|---|---|---|---|",
        f"| cold start (import, load, first prediction) | {full['cold_start_s']:.3f} s | {edge['cold_start_s']:.3f} s | <= 0.5 s |",
        f"| peak RSS | {full['peak_rss_mb']:.0f} MB | {edge['peak_rss_mb']:.0f} MB | <= 150 MB |",
    ]
    if full["stream"] and edge["stream"]:
        lines.append(
            f"| live audio, 100 ms chunks: real-time factor | {full['stream']['real_time_factor']:.4f} | "
            f"{edge['stream']['real_time_factor']:.4f} | <= 0.01 |"
        )
        lines.append(
            f"| per chunk p50 / p99 | {full['stream']['p50_ms']:.2f} / {full['stream']['p99_ms']:.2f} ms | "
            f"{edge['stream']['p50_ms']:.2f} / {edge['stream']['p99_ms']:.2f} ms | |"
        )
    lines += [
        "",
        "| subset | full: end to end ms | edge: end to end ms | edge stages (ms) |",
        "|---|---|---|---|",
    ]
    for subset, entry in edge["subsets"].items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in entry["stages_ms"].items())
        lines.append(
            f"| {subset} | {full['subsets'][subset]['end_to_end_ms']:.2f} | {entry['end_to_end_ms']:.2f} | {stages} |"
        )
    lines.append("")
    lines.append(f"Variants: {', '.join(f'{k} {v}' for k, v in edge['precisions'].items())} (both bundles).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
