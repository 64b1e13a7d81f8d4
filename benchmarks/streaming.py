"""Streaming benchmark: per-chunk latency, real-time factor, and a 60 s stream against offline encoding.

    python benchmarks/streaming.py --bundle runs/demo/bundle      (or: make bench-streaming)

`make bench-streaming-window` measures the windowed `efficientnet-lite0` audio family the same way (results
streaming_window.{json,md}): it runs the whole network over its 128-frame window at every chunk, where the
causal encoder only encodes the new frames. Latency does not depend on the weights, so its bundle is a one-epoch
model of the built-in data.

Input: real speech, the FSDD recordings from ../shared/data joined end to end into one 60 s signal at their
own 8 kHz (so the stateful resampler to 16 kHz is part of the cost, as with a phone-quality microphone).
Everything is measured side by side in this one process; timings are wall clock on this machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile

import polysense
from polysense.inference.preprocessors import build_preprocessors
from polysense.machine import describe
from polysense.tools.bench import machine

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
CHUNKS_MS = (20, 100, 500)


def speech_signal(seconds: float) -> tuple[np.ndarray, int]:
    """Real recordings joined in a fixed order until `seconds` long (int16, 8 kHz)."""
    if not FSDD.is_dir():
        raise SystemExit(f"{FSDD} is missing: the benchmark reads real speech from ../shared/data")
    parts, total, rate = [], 0, 8000
    for path in sorted(FSDD.glob("*.wav")):
        samples, rate = soundfile.read(path, dtype="int16")
        parts.append(samples)
        total += samples.size
        if total >= seconds * rate:
            break
    return np.concatenate(parts)[: int(seconds * rate)], rate


def stream_once(pipeline: polysense.Pipeline, signal: np.ndarray, rate: int, chunk_ms: int) -> dict:
    """Feed the signal chunk by chunk; per-call latency in ms and frames per call."""
    step = rate * chunk_ms // 1000
    stream = pipeline.audio_stream()
    latencies, frames = [], []
    start = time.perf_counter()
    for offset in range(0, signal.size, step):
        tick = time.perf_counter()
        frames.append(stream.accept_waveform(signal[offset : offset + step], rate))
        latencies.append((time.perf_counter() - tick) * 1000)
    frames.append(stream.input_finished())
    stream.result()
    total = (time.perf_counter() - start) * 1000
    return {"latencies_ms": latencies, "frames": frames, "total_ms": total, "embedding": stream.embedding}


def offline_once(pipeline: polysense.Pipeline, signal: np.ndarray, rate: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    prediction = pipeline.predict(audio=signal, sample_rate=rate)
    return (time.perf_counter() - start) * 1000, prediction.embeddings["audio"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(bundle: Path, seconds: float, repeats: int, threads: int) -> dict:
    pipeline = polysense.Pipeline.load(bundle, device="cpu", intra_op_threads=threads)
    signal, rate = speech_signal(seconds)
    duration = signal.size / rate
    audio = build_preprocessors(pipeline.description.preprocessing, ["audio"], bundle)["audio"]
    offline_frames = audio(signal, rate).shape[0]
    stream_once(pipeline, signal[: rate * 2], rate, 100)  # warm-up
    offline_once(pipeline, signal[: rate * 2], rate)
    offline_ms = statistics.median(offline_once(pipeline, signal, rate)[0] for _ in range(3 * repeats))
    component = pipeline.description.components["audio_encoder"]
    result = {
        "chunks": {},
        "seconds": duration,
        "input_rate": rate,
        "intra_op_threads": threads,
        # Which audio family this is (its streaming state) and the precision `auto` runs it at.
        "audio_encoder": {
            "inputs": [tensor.name for tensor in component.inputs],
            "precision": pipeline.precisions["audio_encoder"],
        },
    }
    for chunk_ms in CHUNKS_MS:
        latencies, totals = [], []
        for _ in range(repeats):
            run_ = stream_once(pipeline, signal, rate, chunk_ms)
            latencies += run_["latencies_ms"]
            totals.append(run_["total_ms"])
            assert sum(run_["frames"]) == offline_frames  # every frame encoded exactly once
        result["chunks"][chunk_ms] = {
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "mean_ms": statistics.fmean(latencies),
            "calls": len(latencies) // repeats,
            "real_time_factor": statistics.median(totals) / 1000 / duration,
            "versus_offline": statistics.median(totals) / offline_ms,
        }
    # Streaming in 100 ms chunks against offline encoding of the same audio, alternating, same process.
    stream_totals, offline_totals = [], []
    for _ in range(repeats):
        streamed = stream_once(pipeline, signal, rate, 100)
        stream_totals.append(streamed["total_ms"])
        elapsed, offline_embedding = offline_once(pipeline, signal, rate)
        offline_totals.append(elapsed)
    result["versus_offline"] = {
        "stream_total_ms": statistics.median(stream_totals),
        "offline_total_ms": statistics.median(offline_totals),
        "ratio": statistics.median(stream_totals) / statistics.median(offline_totals),
        "max_abs_embedding_difference": float(np.abs(streamed["embedding"] - offline_embedding).max()),
        "frames": offline_frames,
    }
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Streaming benchmark ({meta['seconds']:.0f} s of real 8 kHz speech, {meta['machine']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Audio encoder inputs: {', '.join(results[0]['audio_encoder']['inputs'])}; runs at "
        f"{results[0]['audio_encoder']['precision']} (`auto`).",
        "",
        "| threads | chunk | calls | p50 ms | p99 ms | mean ms | real-time factor | total vs offline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for chunk_ms, row in result["chunks"].items():
            lines.append(
                f"| {result['intra_op_threads'] or 'auto'} | {chunk_ms} ms | {row['calls']} | {row['p50_ms']:.3f} | "
                f"{row['p99_ms']:.3f} | {row['mean_ms']:.3f} | {row['real_time_factor']:.4f} | {row['versus_offline']:.2f}x |"
            )
    lines += [
        "",
        "| threads | 60 s streamed in 100 ms chunks | offline, one call | ratio | max abs embedding diff |",
        "|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        v = result["versus_offline"]
        lines.append(
            f"| {result['intra_op_threads'] or 'auto'} | {v['stream_total_ms']:.1f} ms | {v['offline_total_ms']:.1f} ms "
            f"| {v['ratio']:.2f}x | {v['max_abs_embedding_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "bundle"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="streaming", help="results file names: NAME.json and NAME.md")
    parser.add_argument(
        "--command", default="make bench-streaming", help="the command recorded in the results"
    )
    args = parser.parse_args()
    results = [run(Path(args.bundle), args.seconds, args.repeats, threads) for threads in (1, 0)]
    meta = {
        "seconds": args.seconds,
        "machine": describe(machine()),
        "command": args.command,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
