"""Audio alone on voices never heard in training: one model against an ensemble of several seeds' models.

    python benchmarks/avdigits/loso_ensemble.py        (about 25 minutes on 2 cores; with --reuse of finished runs: 5)

Each of the five FSDD speakers is held out in turn (all 500 of his recordings are tested), and the
configuration `--config` of loso_audio.py (default `causal-shape-voice-25-noise`: the causal spectral-shape
encoder with --voice-norm, 25 epochs, strong noise) is trained at every seed of `--seeds` and exported. Then,
through the runtime alone (polysense.Pipeline, polysense.Ensemble), with the held-out speaker's voice profile:
  - each seed's model alone, and the ensemble of all seeds (the mean of their probabilities), each with the
    profile of all his recordings (no label used; as `polysense eval` and the training metrics hear him);
  - the ensemble of every pair of seeds (the mean of the two models' probabilities above);
  - the ensemble with a profile from only 10 of his recordings (the other 490 tested), and with an adaptive
    voice learnt while he talks (sessions of 20, as in loso_audio.py).
Writes results/loso_ensemble/loso_ensemble.json and .md. `--reuse` takes a run already in --work (what
loso_audio.py trains, in the same folders) when its config.json asks for the same training and its bundle is
there, instead of training it again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

import polysense
from polysense.bundle.schema import DESCRIPTION_FILE
from polysense.machine import describe, machine
from polysense.tools.manifest import read_manifest

if __package__:  # imported as benchmarks.avdigits.loso_ensemble (python -m, the tests)
    from .loso_audio import CONFIGS, ENROLLED, adaptive_sessions
    from .run import SPEAKERS, build, export, fit
else:  # run as a file: its own folder is on the import path
    from loso_audio import CONFIGS, ENROLLED, adaptive_sessions
    from run import SPEAKERS, build, export, fit

log = logging.getLogger("polysense")
DEFAULT_CONFIG = "causal-shape-voice-25-noise"
BATCH = 32


def run(
    work: Path,
    speakers: tuple[str, ...],
    config_name: str,
    seeds: tuple[int, ...],
    reuse: bool,
    out: Path,
    command: str,
) -> dict:
    config = {c.name: c for c in CONFIGS}[config_name]
    results: dict = {
        "config": {"name": config.name, **config.options, "epochs": config.epochs},
        "seeds": list(seeds),
        "speakers": {},
        "machine": machine(),  # training numerics differ between CPU instruction sets
        "command": command,
    }
    for speaker in speakers:
        manifest = build(work, speaker)
        bundles, train_seconds = [], {}
        for seed in seeds:
            folder = work / (f"loso_audio_{config.name}_{speaker}" + ("" if seed == 0 else f"_seed{seed}"))
            started = time.perf_counter()
            if not (reuse and _finished(folder, manifest, config, seed)):
                log.warning("%s, %s held out, seed %d: training", config.name, speaker, seed)
                fit(manifest, folder, config.epochs, ("audio",), seed=seed, **config.options)
                export(folder, variants=False)
                train_seconds[str(seed)] = round(time.perf_counter() - started, 1)
            bundles.append(folder / "bundle")
        log.warning("%s held out: the runtime on his recordings", speaker)
        entry = score(bundles, manifest, speaker, seeds)
        entry["train_seconds"] = train_seconds  # seed -> seconds, for the models this run trained
        results["speakers"][speaker] = entry
        log.warning("  single %s, ensemble %.4f", entry["single"], entry["ensemble"])
        write(results, out)  # after every speaker, so an interrupted run keeps what it measured
    return results


def _finished(folder: Path, manifest: Path, config, seed: int) -> bool:
    """Whether `folder` holds a finished, exported run of this configuration and seed on `manifest`."""
    try:
        options = json.loads((folder / "config.json").read_text())["options"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = {**config.options, "epochs": config.epochs, "seed": seed, "data": str(manifest)}
    same = all(options.get(key) == value for key, value in wanted.items())
    return same and (folder / "metrics.json").exists() and (folder / "bundle" / DESCRIPTION_FILE).exists()


def score(bundles: list[Path], manifest: Path, speaker: str, seeds: tuple[int, ...]) -> dict:
    """Runtime accuracies on the held-out speaker's recordings (see the module's docstring)."""
    members = [polysense.Pipeline.load(b, device="cpu", precision="fp32") for b in bundles]
    ensemble = polysense.Ensemble(members)
    rows = [r for r in read_manifest(manifest).rows if r.speaker == speaker]
    truth = np.array([ensemble.labels.index(r.label) for r in rows])
    everything = ensemble.voice_profile([r.audio for r in rows])
    samples = [{"audio": r.audio, "voice": everything} for r in rows]
    probabilities = [_probabilities(member, samples) for member in members]
    pairs = {
        f"{a}+{b}": _accuracy((probabilities[i] + probabilities[j]) / 2, truth)
        for (i, a), (j, b) in itertools.combinations(enumerate(seeds), 2)
    }
    # Enrolment: a profile from a seeded choice of his recordings, the others tested (as loso_audio.py).
    chosen = set(np.random.default_rng(0).choice(len(rows), size=ENROLLED, replace=False).tolist())
    enrolled = ensemble.voice_profile([rows[i].audio for i in sorted(chosen)])
    tested = [r for i, r in enumerate(rows) if i not in chosen]
    few = _probabilities(ensemble, [{"audio": r.audio, "voice": enrolled} for r in tested])
    return {
        "single": {str(s): _accuracy(p, truth) for s, p in zip(seeds, probabilities)},
        "ensemble": _accuracy(_probabilities(ensemble, samples), truth),
        "pairs": pairs if len(seeds) > 2 else {},
        f"ensemble_{ENROLLED}_clips": _accuracy(
            few, np.array([ensemble.labels.index(r.label) for r in tested])
        ),
        **{k.replace("accuracy", "ensemble"): v for k, v in adaptive_sessions(ensemble, tested).items()},
        "count": len(rows),
    }


def _probabilities(model, samples: list[dict]) -> np.ndarray:
    """[N, classes] in the order of model.labels, predicted in batches."""
    out = []
    for start in range(0, len(samples), BATCH):
        for prediction in model.predict_batch(samples[start : start + BATCH]):
            out.append([prediction.probabilities[label] for label in model.labels])
    return np.array(out)


def _accuracy(probabilities: np.ndarray, truth: np.ndarray) -> float:
    return round(float((probabilities.argmax(1) == truth).mean()), 4)


def markdown(results: dict) -> str:
    seeds = [str(s) for s in results["seeds"]]
    speakers = {s: results["speakers"][s] for s in SPEAKERS if s in results["speakers"]}
    pairs = list(next(iter(speakers.values()))["pairs"]) if speakers else []
    enrolled = f"ensemble_{ENROLLED}_clips"
    columns = (
        [(f"seed {s}", lambda e, s=s: e["single"][s]) for s in seeds]
        + [("mean of the seeds", lambda e: sum(e["single"].values()) / len(e["single"]))]
        + [(f"seeds {p}", lambda e, p=p: e["pairs"][p]) for p in pairs]
        + [(f"ensemble of {len(seeds)}", lambda e: e["ensemble"])]
        + [(f"ensemble, {ENROLLED} recordings", lambda e: e[enrolled])]
        + [("ensemble, adaptive", lambda e: e["ensemble_adaptive"])]
    )
    config = results["config"]
    lines = [
        "# AV-digits: audio alone on a speaker never heard in training, one model against an ensemble",
        "",
        f"Command: `{results['command']}`. Configuration `{config['name']}` of loso_audio.py, trained at "
        f"seeds {', '.join(seeds)}; every number through the runtime (fp32). Each held-out speaker's 500 "
        "recordings are tested with his voice profile from all of them, except the last two columns: a profile "
        f"from {ENROLLED} of them (the other 490 tested), and an adaptive voice (the same 490 in sessions of 20, "
        "each starting from the average voice). A pair's or the ensemble's probabilities are the mean of its "
        "models'.",
        "",
        f"Machine: {describe(results.get('machine', {}))}.",
        "",
        "| held-out speaker | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for speaker, entry in speakers.items():
        lines.append(f"| {speaker} | " + " | ".join(f"{cell(entry):.4f}" for _, cell in columns) + " |")
    if len(speakers) == len(SPEAKERS):
        means = [sum(cell(e) for e in speakers.values()) / len(speakers) for _, cell in columns]
        lines.append("| mean | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    seconds = [s for e in speakers.values() for s in e.get("train_seconds", {}).values()]
    reused = len(speakers) * len(seeds) - len(seconds)
    lines.append("")
    if seconds:
        lines.append(
            f"Training time per model: {sum(seconds) / len(seconds):.0f} s (mean over the {len(seconds)} "
            "models this run trained)."
        )
    if reused:
        lines.append(
            f"{reused} models were finished runs of the same training in the work folder, reused (`--reuse`; "
            "loso_audio.py trains them in the same folders)."
        )
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso_ensemble.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "loso_ensemble.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "runs" / "avdigits"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loso_ensemble"))
    parser.add_argument(
        "--speakers", default=",".join(SPEAKERS), help="speakers to hold out, comma-separated"
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a configuration of loso_audio.py")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the members, comma-separated")
    parser.add_argument(
        "--reuse", action="store_true", help="take finished runs of the same training in --work"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    known = [c.name for c in CONFIGS]
    if args.config not in known:
        parser.error(f"unknown configuration {args.config!r}; choose from {', '.join(known)}")
    if not CONFIGS[known.index(args.config)].options.get("voice_norm"):
        parser.error(f"{args.config} is trained without --voice-norm; choose one with voice in its name")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, got {args.seeds!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        parser.error("--seeds takes two or more different seeds")
    speakers = tuple(s for s in args.speakers.split(",") if s)
    unknown = [s for s in speakers if s not in SPEAKERS]
    if unknown:
        parser.error(f"unknown speaker {unknown[0]!r}; choose from {', '.join(SPEAKERS)}")
    command = " ".join(["python", "benchmarks/avdigits/loso_ensemble.py", *sys.argv[1:]])
    results = run(Path(args.work), speakers, args.config, seeds, args.reuse, Path(args.out), command)
    print(markdown(results))


if __name__ == "__main__":
    main()
