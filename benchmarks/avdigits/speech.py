"""AV-digits with the speech-embedding audio family: fused leave-one-speaker-out, one modality removed, noise.

    python benchmarks/avdigits/speech.py      (or: make bench-avdigits-speech; about 30 minutes on 2 cores)

Every model is trained with the default options but `--audio-encoder speech-embedding` (the image family is the
default `cnn`), through the ordinary training code; accuracies are the runs' own test metrics (PyTorch), the
noise curves go through the exported bundles and the runtime:
  - leave-one-speaker-out, fused (image + audio): each FSDD speaker's 500 recordings are the test split;
  - one modality removed: the fused model on the standard split with its audio removed against an image-only
    model, and with its image removed against an audio-only model (same data, seed 0);
  - white noise on the audio (SNR 30 -> 0 dB), audio alone: speech-embedding against the causal family.
Writes results/speech/avdigits_speech.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import soundfile

import polysense
from polysense.machine import describe, machine
from polysense.tools.manifest import read_manifest
from polysense.tools.metrics import classification_metrics

if __package__:
    from .run import SNR_DB, SPEAKERS, build, corrupt_audio, export, fit
else:
    from run import SNR_DB, SPEAKERS, build, corrupt_audio, export, fit

SPEECH = {"audio_encoder": "speech-embedding"}
log = logging.getLogger("polysense")


def noise_curve(bundles: dict[str, Path], rows: list) -> list[dict]:
    """Accuracy of each audio-only bundle on the test recordings with white noise at each SNR (runtime, fp32)."""
    pipelines = {n: polysense.Pipeline.load(b, device="cpu", precision="fp32") for n, b in bundles.items()}
    labels = next(iter(pipelines.values())).labels
    truth = [labels.index(r.label) for r in rows]
    clips = [soundfile.read(r.audio, dtype="float32") for r in rows]
    curve = []
    for snr in SNR_DB:
        rng = np.random.default_rng(0)
        samples = [{"audio": corrupt_audio(x, snr, rng), "sample_rate": rate} for x, rate in clips]
        point: dict = {"snr_db": "clean" if snr is None else snr}
        for name, pipeline in pipelines.items():
            predicted = [labels.index(p.label) for p in pipeline.predict_batch(samples)]
            point[name] = classification_metrics(truth, predicted, len(labels))["accuracy"]
        curve.append(point)
    return curve


def run(work: Path, speakers: tuple[str, ...]) -> dict:
    manifest = build(work)
    results: dict = {"machine": machine(), "command": "make bench-avdigits-speech", "loso_fused": {}}
    for speaker in speakers:
        log.warning("fused, %s held out", speaker)
        metrics = fit(build(work, speaker), work / f"speech_loso_{speaker}", None, **SPEECH)
        results["loso_fused"][speaker] = {
            "fused": metrics["accuracy"],
            "audio_alone": metrics["subsets"]["audio"]["accuracy"],
            "image_alone": metrics["subsets"]["image"]["accuracy"],
        }
    log.warning("one modality removed")
    fused = fit(manifest, work / "speech_fused", None, **SPEECH)
    image = fit(manifest, work / "speech_image_only", None, ("image",))
    audio = fit(manifest, work / "speech_audio_only", None, ("audio",), **SPEECH)
    causal = fit(manifest, work / "causal_audio_only", None, ("audio",))
    results["modality_removed"] = {
        "fused": fused["accuracy"],
        "fused_without_audio": fused["subsets"]["image"]["accuracy"],
        "image_only": image["accuracy"],
        "fused_without_image": fused["subsets"]["audio"]["accuracy"],
        "audio_only": audio["accuracy"],
    }
    rows = [r for r in read_manifest(work / "speech_audio_only" / "manifest.csv").rows if r.split == "test"]
    bundles = {
        "speech-embedding": export(work / "speech_audio_only", variants=False),
        "causal": export(work / "causal_audio_only", variants=False),
    }
    results["noise"] = noise_curve(bundles, rows)
    results["causal_audio_only"] = causal["accuracy"]
    return results


def markdown(results: dict) -> str:
    loso = results["loso_fused"]
    removed = results["modality_removed"]
    lines = [
        "# AV-digits with the speech-embedding audio family",
        "",
        f"Command: `{results['command']}`. Machine: {describe(results['machine'])}. Default options but "
        "`--audio-encoder speech-embedding` (image: the default `cnn`); training seed 0; the runs' own test "
        "metrics, noise through the runtime (fp32).",
        "",
        "## Leave one speaker out, fused (image + audio)",
        "",
        "| held-out speaker | fused | audio alone (same model) | image alone (same model) |",
        "|---|---:|---:|---:|",
    ]
    for speaker, entry in loso.items():
        lines.append(
            f"| {speaker} | {entry['fused']:.4f} | {entry['audio_alone']:.4f} | {entry['image_alone']:.4f} |"
        )
    if loso:
        worst = min(e["fused"] for e in loso.values())
        lines += ["", f"Worst speaker fused: {worst:.4f} (target: >= 0.995 for every speaker)."]
    lines += [
        "",
        "## One modality removed (standard split)",
        "",
        "| model | accuracy |",
        "|---|---:|",
        f"| fused, both | {removed['fused']:.4f} |",
        f"| fused, audio removed | {removed['fused_without_audio']:.4f} |",
        f"| image-only model | {removed['image_only']:.4f} |",
        f"| fused, image removed | {removed['fused_without_image']:.4f} |",
        f"| audio-only model | {removed['audio_only']:.4f} |",
        "",
        "Target: each removal at most 1.0 point below the matching unimodal model. Fused minus unimodal: audio "
        f"removed {100 * (removed['fused_without_audio'] - removed['image_only']):+.1f} points, image removed "
        f"{100 * (removed['fused_without_image'] - removed['audio_only']):+.1f} points.",
        "",
        "## White noise on the audio, audio alone (test split)",
        "",
        "| SNR dB | speech-embedding | causal |",
        "|---|---:|---:|",
    ]
    for point in results["noise"]:
        lines.append(f"| {point['snr_db']} | {point['speech-embedding']:.4f} | {point['causal']:.4f} |")
    return "\n".join(lines) + "\n"


def render(out: Path) -> None:
    """Write the markdown again from the JSON (after a change to the report's wording; nothing is measured)."""
    results = json.loads((out / "avdigits_speech.json").read_text())
    (out / "avdigits_speech.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "runs" / "avdigits"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speech"))
    parser.add_argument(
        "--speakers", default=",".join(SPEAKERS), help="speakers to hold out, comma-separated"
    )
    parser.add_argument("--render", action="store_true", help="only write the markdown again from the JSON")
    args = parser.parse_args()
    if args.render:
        render(Path(args.out))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    results = run(Path(args.work), tuple(s for s in args.speakers.split(",") if s))
    results["command"] = " ".join(["python", "benchmarks/avdigits/speech.py", *sys.argv[1:]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "avdigits_speech.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "avdigits_speech.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
