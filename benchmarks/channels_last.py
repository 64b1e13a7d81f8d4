"""Training step time of the convolutional encoders in the default and the channels-last layout, side by side.

    python benchmarks/channels_last.py          (or: make bench-channels-last; about 3 minutes on 2 cores)

One training step (forward, backward, AdamW) of a one-modality MultimodalClassifier's encoder on a random
batch of 64 (the training default), random weights, in train mode: once in the default layout, once with the
encoder's weights (and image inputs) channels-last, which is how training runs a family that asks for it
(`channels_last = True`: the EfficientNet-based ones; `use_channels_last()` and `encode()`). Every family is
timed both ways; the windowed audio family builds its spectrogram image inside, so only its weights move.
The two layouts alternate for several rounds after one warm-up step each; the median is reported. Results:
benchmarks/results/channels_last.{json,md}, with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from polysense.machine import machine
from polysense.models.model import ModelConfig, MultimodalClassifier

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "python benchmarks/channels_last.py"
# (modality, family, size): pixels for images, frames of 40 mel bands for audio.
CASES = (
    ("image", "efficientnet-lite0", 128),
    ("image", "efficientnet-lite0", 192),
    ("image", "efficientnet-lite0", 224),
    ("image", "cnn", 64),
    ("audio", "efficientnet-lite0", 100),
)
BATCH = 64


def step_seconds(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = forward().square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _inputs(modality: str, size: int) -> list[torch.Tensor]:
    if modality == "image":
        return [torch.randn(BATCH, 3, size, size)]
    return [torch.randn(BATCH, size, 40), torch.ones(BATCH, size)]  # the audio family builds its image inside


def measure(modality: str, family: str, size: int, rounds: int) -> dict:
    config = ModelConfig((modality,), 10, **{f"{modality}_family": family}, pretrained=False)
    torch.manual_seed(0)
    models = {"default": MultimodalClassifier(config).train(), "channels_last": MultimodalClassifier(config)}
    models["channels_last"].load_state_dict(models["default"].state_dict())
    models["channels_last"].train()
    # Both layouts for every family, whether or not training uses channels-last for it (what use_channels_last()
    # and encode() do for those that ask), so the table shows what the choice gains or would gain.
    encoders = {name: model.encoders[modality] for name, model in models.items()}
    encoders["channels_last"].to(memory_format=torch.channels_last)
    inputs = _inputs(modality, size)
    laid_out = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
    forwards = {
        "default": lambda: encoders["default"](*inputs),
        "channels_last": lambda: encoders["channels_last"](*laid_out),
    }
    optimizers = {name: torch.optim.AdamW(model.parameters(), 1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name in models:
            seconds = step_seconds(forwards[name], optimizers[name])
            if round_index:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "modality": modality,
        "family": family,
        "size": size,
        "trains_channels_last": bool(getattr(encoders["default"], "channels_last", False)),
        "default_s": median["default"],
        "channels_last_s": median["channels_last"],
        "speedup": median["default"] / median["channels_last"],
    }


def markdown(report: dict) -> str:
    lines = [
        "# Training step time: default vs channels-last layout",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}, {report['threads']} torch threads.",
        f"One step (forward, backward, AdamW) at batch {report['batch']}, random weights, median of "
        f"{report['rounds']} alternating rounds.",
        "",
        "| family | size (pixels; audio: frames) | trains channels-last | default s/step | channels-last s/step "
        "| speed-up |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['modality']} {r['family']} | {r['size']} | {'yes' if r['trains_channels_last'] else 'no'} | "
            f"{r['default_s']:.3f} | {r['channels_last_s']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per layout and case")
    args = parser.parse_args()
    results = []
    for modality, family, size in CASES:
        results.append(measure(modality, family, size, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "command": COMMAND,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "rounds": args.rounds,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "channels_last.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "channels_last.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
