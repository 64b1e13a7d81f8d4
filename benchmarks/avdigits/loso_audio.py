"""Audio alone on voices never heard in training: leave-one-speaker-out per audio encoder family.

    python benchmarks/avdigits/loso_audio.py        (or: make bench-avdigits-audio; about 100 minutes on 2 cores)

Each of the five FSDD speakers is held out in turn (all 500 of their recordings are the test split; the other
four speakers train and validate), and an audio-only model is trained with the ordinary training code for each
configuration, side by side in one run:
  - `efficientnet-lite0`: the ImageNet EfficientNet-Lite0 over a 1.28 s log-mel window (its defaults);
  - `efficientnet-lite0-from-scratch`: the same network and defaults from random weights (what the transfer
    itself brings);
  - `causal`: the default causal conv + GRU encoder at the AV-digits benchmark's 15 epochs;
  - `causal-smoothed`: the same with `--label-smoothing 0.1`;
  - `causal-shape-smoothed`: `--audio-encoder causal-shape` (each frame's spectral shape, twice as wide) with
    `--label-smoothing 0.1`, at the same 15 epochs;
  - `causal-shape-voice`: the same with `--voice-norm` (each speaker's voice profile removed; polysense.preprocess.voice).
    Its main score hears the held-out speaker with the profile of all his recordings (no label used, as
    `polysense eval` does); the model is also exported and scored through the runtime with a profile from only
    10 of his recordings (the other 490 tested), with none (the bundle's average voice), and with an adaptive
    voice learnt while he talks (`Pipeline.adaptive_voice`: the 490 in a random order, in sessions of 20 that
    each start from the average voice; each recording heard with what the session learnt before it);
  - `causal-shape-voice-25`: the same with `--epochs 25` (a longer schedule; early stopping still ends it);
  - `causal-shape-voice-25-noise`: the same with `--audio-noise strong` (0-30 dB SNR on 80 % of the clips);
  - `speech-embedding`: Google's speech_embedding network, frozen, under a trained head (its defaults;
    results/speech/, `--configs speech-embedding --out benchmarks/avdigits/results/speech`).
Writes results/loso_audio.json and .md: accuracy, macro F1 and training time per held-out speaker.
`--seed N` trains every model with seed N (default 0). `--merge` keeps the results already in the JSON for the
speakers and configurations not run again (a long run can be finished in parts on the same kind of machine, at
the same seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from polysense.machine import describe, machine, results_from_this_machine

if __package__:  # imported as benchmarks.avdigits.loso_audio (python -m, the tests)
    from .run import SPEAKERS, build, export, fit, recorded_commands, summary
else:  # run as a file: its own folder is on the import path
    from run import SPEAKERS, build, export, fit, recorded_commands, summary


@dataclass(frozen=True)
class Config:
    name: str
    options: dict = field(default_factory=dict)  # TrainOptions fields besides the held-out data
    epochs: int = 0  # 0: what the family asks for


CONFIGS = (
    Config("efficientnet-lite0", {"audio_encoder": "efficientnet-lite0"}),
    Config("causal", {"audio_encoder": "causal"}, epochs=15),
    Config("causal-smoothed", {"audio_encoder": "causal", "label_smoothing": 0.1}, epochs=15),
    Config("causal-shape-smoothed", {"audio_encoder": "causal-shape", "label_smoothing": 0.1}, epochs=15),
    Config(
        "causal-shape-voice",
        {"audio_encoder": "causal-shape", "label_smoothing": 0.1, "voice_norm": True},
        epochs=15,
    ),
    Config(
        "causal-shape-voice-25",
        {"audio_encoder": "causal-shape", "label_smoothing": 0.1, "voice_norm": True},
        epochs=25,
    ),
    Config(
        "causal-shape-voice-25-noise",
        {
            "audio_encoder": "causal-shape",
            "label_smoothing": 0.1,
            "voice_norm": True,
            "audio_noise": "strong",
        },
        epochs=25,
    ),
    Config("efficientnet-lite0-from-scratch", {"audio_encoder": "efficientnet-lite0", "from_scratch": True}),
    Config("speech-embedding", {"audio_encoder": "speech-embedding"}),
)

log = logging.getLogger("polysense")
ENROLLED = 10  # recordings of the held-out speaker a voice profile is built from, in the runtime check
SESSION = 20  # recordings an adaptive voice hears before it is reset, in the runtime check
# Positions within a session scored apart (1-based, inclusive): how fast the adaptive voice learns.
POSITIONS = ((1, 1), (2, 5), (6, 20))


def run(
    work: Path,
    speakers: tuple[str, ...],
    configs: tuple[Config, ...],
    out: Path,
    previous: dict | None = None,
    command: str = "make bench-avdigits-audio",
    seed: int = 0,
) -> dict:
    """Train and test every configuration on every held-out speaker with training seed `seed`; `previous`
    (results of an earlier run on this kind of machine, at the same seed) supplies what is not run again."""
    results: dict = {
        "seed": seed,
        "configs": {c.name: {**c.options, "epochs": c.epochs} for c in configs},
        "speakers": {},
        "machine": machine(),  # training numerics differ between CPU instruction sets
        "command": command,
    }
    if previous is not None:
        if previous.get("seed", 0) != seed:
            raise SystemExit(f"--merge: the results there are for seed {previous.get('seed', 0)}, not {seed}")
        # A merged run is reproduced by the earlier commands, then this one.
        results["commands"] = [*recorded_commands(previous, "make bench-avdigits-audio"), command]
        results["configs"] = {**previous["configs"], **results["configs"]}
        results["speakers"] = {s: dict(e) for s, e in previous["speakers"].items()}
    manifests = {speaker: build(work, speaker) for speaker in speakers}
    for config in configs:
        for speaker in speakers:
            log.warning("%s, %s held out", config.name, speaker)
            started = time.perf_counter()
            folder = work / (f"loso_audio_{config.name}_{speaker}" + ("" if seed == 0 else f"_seed{seed}"))
            metrics = fit(manifests[speaker], folder, config.epochs, ("audio",), seed=seed, **config.options)
            entry = {**summary(metrics), "train_seconds": round(time.perf_counter() - started, 1)}
            if config.options.get("voice_norm"):
                entry.update(runtime_voices(folder, speaker))
            results["speakers"].setdefault(speaker, {})[config.name] = entry
            log.warning("  accuracy %.4f in %.0f s", entry["accuracy"], entry["train_seconds"])
            write(results, out)  # after every model, so an interrupted run keeps what it measured
    return results


def runtime_voices(run_folder: Path, speaker: str, enrolled: int = ENROLLED) -> dict:
    """The exported model through the runtime on the held-out speaker: accuracy with a profile from `enrolled`
    of his recordings (seeded choice; the rest tested) and with no profile (the bundle's average voice)."""
    import numpy as np

    import polysense
    from polysense.tools.manifest import read_manifest

    pipeline = polysense.Pipeline.load(export(run_folder, variants=False), device="cpu", precision="fp32")
    rows = [r for r in read_manifest(run_folder / "manifest.csv").rows if r.speaker == speaker]
    chosen = set(np.random.default_rng(0).choice(len(rows), size=enrolled, replace=False).tolist())
    voice = pipeline.voice_profile([rows[i].audio for i in sorted(chosen)])
    tested = [r for i, r in enumerate(rows) if i not in chosen]

    def accuracy(samples: list[dict]) -> float:
        correct = 0
        for start in range(0, len(samples), 32):
            predictions = pipeline.predict_batch(samples[start : start + 32])
            correct += sum(p.label == r.label for p, r in zip(predictions, tested[start : start + 32]))
        return round(correct / len(samples), 4)

    return {
        f"accuracy_{enrolled}_clips": accuracy([{"audio": r.audio, "voice": voice} for r in tested]),
        "accuracy_no_profile": accuracy([{"audio": r.audio} for r in tested]),
        **adaptive_sessions(pipeline, tested),
    }


def adaptive_sessions(pipeline, rows: list, session: int = SESSION) -> dict:
    """Accuracy with an adaptive voice: `rows` in a seeded random order, in sessions of `session` recordings
    that each start from the bundle's average voice; also per position within the sessions (POSITIONS)."""
    import numpy as np

    order = np.random.default_rng(1).permutation(len(rows))
    correct = np.zeros(len(rows), bool)
    positions = np.arange(len(rows)) % session + 1
    for start in range(0, len(rows), session):
        voice = pipeline.adaptive_voice()  # one batch is heard in order, recording after recording
        chosen = [rows[i] for i in order[start : start + session]]
        predictions = pipeline.predict_batch([{"audio": r.audio, "voice": voice} for r in chosen])
        correct[start : start + len(chosen)] = [p.label == r.label for p, r in zip(predictions, chosen)]
    scores = {"accuracy_adaptive": round(float(correct.mean()), 4)}
    for first, last in POSITIONS:
        within = (positions >= first) & (positions <= last)
        scores[f"accuracy_adaptive_{first}_{last}"] = round(float(correct[within].mean()), 4)
    return scores


def markdown(results: dict) -> str:
    names = list(results["configs"])
    machine_info = results.get("machine", {})
    lines = [
        "# AV-digits: audio alone on a speaker never heard in training",
        "",
        f"Command: {_commands(results)}. Training seed {results.get('seed', 0)}. Each held-out "
        "speaker's 500 recordings are the test split; PyTorch test metrics of each run.",
        "",
        f"Machine: {describe(machine_info)}.",
        "",
        "| held-out speaker | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    # In the dataset's order, whatever order a run (or a --merge run) added them in.
    speakers = {s: results["speakers"][s] for s in SPEAKERS if s in results["speakers"]}
    for speaker, entries in speakers.items():
        cells = [f"{entries[n]['accuracy']:.4f}" if n in entries else "-" for n in names]
        lines.append(f"| {speaker} | " + " | ".join(cells) + " |")
    means = []
    for name in names:
        scores = [e[name]["accuracy"] for e in speakers.values() if name in e]
        means.append(f"{sum(scores) / len(scores):.4f}" if len(scores) == len(speakers) else "-")
    label = "mean" if len(speakers) == len(SPEAKERS) else f"mean of these {len(speakers)} (a partial run)"
    lines.append(f"| {label} | " + " | ".join(means) + " |")
    lines += _voice_lines(results, speakers)
    lines += ["", "Training time per model, seconds (mean over speakers):", ""]
    for name in names:
        seconds = [e[name]["train_seconds"] for e in speakers.values() if name in e]
        if seconds:
            options = results["configs"][name]
            epochs = options["epochs"] or "family default"
            lines.append(f"- {name} (epochs: {epochs}): {sum(seconds) / len(seconds):.0f} s")
    return "\n".join(lines) + "\n"


def _voice_lines(results: dict, speakers: dict) -> list[str]:
    """The --voice-norm configurations through the runtime: own profile from all recordings, from a few, none."""
    lines = []
    for name in (n for n, options in results["configs"].items() if options.get("voice_norm")):
        entries = {s: e[name] for s, e in speakers.items() if name in e and "accuracy_no_profile" in e[name]}
        if not entries:
            continue
        few = next(k for k in next(iter(entries.values())) if k.endswith("_clips"))
        enrolled = few.split("_")[1]
        columns = ["accuracy", few, "accuracy_no_profile"]
        header = ["all recordings", f"{enrolled} recordings", "no profile"]
        intro = (
            f"`{name}`: the held-out speaker's voice profile from all his recordings (PyTorch, as above), from "
            f"{enrolled} of them (runtime, the others tested), and none (runtime, the bundle's average voice)"
        )
        # Results from before adaptive voices have no such scores: their table keeps its three columns.
        if all("accuracy_adaptive" in e for e in entries.values()):
            intro += (
                f"; an adaptive voice (runtime, the same recordings in sessions of {SESSION}, each starting from "
                "the average voice), over whole sessions and by position within them"
            )
            columns += ["accuracy_adaptive", *(f"accuracy_adaptive_{a}_{b}" for a, b in POSITIONS)]
            header += [
                "adaptive",
                *(f"recording {a}" if a == b else f"recordings {a}-{b}" for a, b in POSITIONS),
            ]
        lines += ["", intro + ":", ""]
        lines += ["| held-out speaker | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
        for speaker, entry in entries.items():
            lines.append(f"| {speaker} | " + " | ".join(f"{entry[c]:.4f}" for c in columns) + " |")
        means = [sum(e[c] for e in entries.values()) / len(entries) for c in columns]
        lines.append("| mean | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return lines


def _commands(results: dict) -> str:
    return ", then ".join(f"`{c}`" for c in recorded_commands(results, "make bench-avdigits-audio"))


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso_audio.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "loso_audio.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "runs" / "avdigits"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--speakers", default=",".join(SPEAKERS), help="speakers to hold out, comma-separated"
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help="configurations to compare, comma-separated",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the results in --out for speakers and configurations not run again",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    wanted = [name for name in args.configs.split(",") if name]
    known = {c.name: c for c in CONFIGS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(known)}")
    out = Path(args.out)
    speakers = tuple(s for s in args.speakers.split(",") if s)
    previous = results_from_this_machine(out / "loso_audio.json") if args.merge else None
    # What reproduces these results, written beside them.
    command = " ".join(["python", "benchmarks/avdigits/loso_audio.py", *sys.argv[1:]])
    configs = tuple(known[n] for n in wanted)
    results = run(Path(args.work), speakers, configs, out, previous, command, args.seed)
    print(markdown(results))


if __name__ == "__main__":
    main()
