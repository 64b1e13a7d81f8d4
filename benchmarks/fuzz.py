"""The long fuzz run: 100,000+ seeded inputs in worker processes that also catch crashes, hangs and memory.

    python benchmarks/fuzz.py --bundle runs/demo/bundle --inputs 100000      (or: make fuzz)

The inputs are those of benchmarks/fuzzing.py (mutated images and audio, random text, arrays, data manifests, bundle
descriptions). A worker runs a slice of them and reports each outcome on a line; a worker that dies is a crash
(the input it was on is recorded, and a new worker goes on after it), one silent for --hang-seconds is a hang.
Memory: for each input, the worker's peak RSS during it above its RSS before it (the peak is reset before each
input through /proc/self/clear_refs); the largest is reported with the input it came from. Results go to benchmarks/results/fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/fuzz.py --bundle runs/demo/bundle --inputs 100000"


def worker(bundle: Path, seed: int, start: int, stop: int) -> None:
    from polysense.tools.bench import peak_rss_mb, reset_peak_rss, rss_mb

    if __package__:  # imported as benchmarks.fuzz
        from .fuzzing import KINDS, Fuzzer
    else:  # run as a file (the workers are): its own folder is on the import path
        from fuzzing import KINDS, Fuzzer

    with tempfile.TemporaryDirectory() as folder:
        fuzzer = Fuzzer(bundle, Path(folder), seed=seed)
        fuzzer.seed = seed + 1  # warm up with inputs of another seed, then take the baseline
        for index in range(len(KINDS)):
            fuzzer.run_one(index)
        fuzzer.seed = seed
        print("ready", flush=True)
        for index in range(start, stop):
            reset_peak_rss()
            before = rss_mb()
            tick = time.perf_counter()
            kind, outcome = fuzzer.run_one(index)
            seconds = time.perf_counter() - tick
            print(json.dumps([index, kind, outcome, seconds, peak_rss_mb() - before]), flush=True)


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter = collections.Counter()
        self.failures: list[dict] = []
        self.crashes: list[int] = []
        self.hangs: list[int] = []
        self.slowest: dict[str, tuple[float, int]] = {}
        self.over_2s = 0
        self.peak_extra_mb = 0.0
        self.peak_input = -1

    def add(self, index: int, kind: str, outcome: str, seconds: float) -> None:
        self.outcomes[kind, outcome.split(":")[0]] += 1
        if outcome.startswith("failure"):
            self.failures.append({"index": index, "kind": kind, "outcome": outcome})
        if seconds > self.slowest.get(kind, (0.0, -1))[0]:
            self.slowest[kind] = (seconds, index)
        self.over_2s += seconds > 2.0


def supervise(bundle: Path, seed: int, inputs: int, per_worker: int, hang_seconds: float) -> Tally:
    tally, index = Tally(), 0
    while index < inputs:
        stop = min(index + per_worker, inputs)
        command = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--seed", str(seed)]
        process = subprocess.Popen(
            [*command, "--start", str(index), "--stop", str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # decoders print warnings about corrupt data
            text=True,
        )
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            if not selector.select(timeout=hang_seconds):
                process.kill()
                process.wait()
                tally.hangs.append(index)
                index += 1
                break
            line = process.stdout.readline()
            if not line:
                code = process.wait()
                if index < stop:  # died before finishing its slice
                    tally.crashes.append(index)
                    print(f"crash at input {index} (exit {code})", file=sys.stderr)
                    index += 1
                break
            if line.startswith("ready"):
                continue
            number, kind, outcome, seconds, extra_mb = json.loads(line)
            tally.add(number, kind, outcome, seconds)
            if extra_mb > tally.peak_extra_mb:
                tally.peak_extra_mb, tally.peak_input = extra_mb, number
            index = number + 1
        selector.close()
        print(f"{index:,}/{inputs:,} inputs", file=sys.stderr, flush=True)
    return tally


def report(tally: Tally, inputs: int, seed: int, seconds: float) -> dict:
    from polysense.tools.bench import machine

    kinds = sorted({kind for kind, _ in tally.outcomes})
    return {
        "command": COMMAND,
        "machine": machine(),
        "seed": seed,
        "inputs": inputs,
        "wall_seconds": round(seconds, 1),
        "by_kind": {k: {o: tally.outcomes[k, o] for o in ("ok", "refused", "failure")} for k in kinds},
        "non_polysense_exceptions": len(tally.failures),
        "crashes": tally.crashes,
        "hangs": tally.hangs,
        "failures": tally.failures[:50],
        "slowest_seconds": {k: {"seconds": round(s, 3), "input": i} for k, (s, i) in tally.slowest.items()},
        "inputs_over_2s": tally.over_2s,
        "peak_extra_memory_mb": round(tally.peak_extra_mb, 1),
        "peak_extra_memory_input": tally.peak_input,
    }


def markdown(result: dict) -> str:
    lines = [
        "# Fuzzing: every input ends in success or a PolysenseError",
        "",
        f"`{result['command']}` — {result['inputs']:,} inputs, seed {result['seed']}, "
        f"{result['wall_seconds']:.0f} s on {result['machine']['cpus']} CPUs "
        f"({', '.join(result['machine']['isa'])}).",
        "",
        f"- non-polysense exceptions: **{result['non_polysense_exceptions']}**",
        f"- crashes: **{len(result['crashes'])}**, hangs: **{len(result['hangs'])}**",
        f"- peak extra memory of any input: **{result['peak_extra_memory_mb']} MB** "
        f"(input {result['peak_extra_memory_input']})",
        f"- inputs over 2 s: **{result['inputs_over_2s']}**",
        "",
        "| kind | ok | refused (PolysenseError) | failure | slowest s |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, counts in result["by_kind"].items():
        slowest = result["slowest_seconds"][kind]["seconds"]
        lines.append(f"| {kind} | {counts['ok']} | {counts['refused']} | {counts['failure']} | {slowest} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "demo" / "bundle")
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--per-worker", type=int, default=10_000, help="inputs before a fresh worker")
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.bundle, args.seed, args.start, args.stop)
        return 0
    if not (args.bundle / "bundle.json").is_file():
        raise SystemExit(f"{args.bundle} is not a bundle; run `make demo` first (or pass --bundle)")
    started = time.perf_counter()
    tally = supervise(args.bundle, args.seed, args.inputs, args.per_worker, args.hang_seconds)
    result = report(tally, args.inputs, args.seed, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fuzz.md").write_text(markdown(result))
    print(markdown(result))
    clean = not (result["non_polysense_exceptions"] or result["crashes"] or result["hangs"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
