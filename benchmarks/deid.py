"""De-identification: what it costs in accuracy, and how much it hides who is speaking.

    python benchmarks/deid.py        (or: make bench-deid; about 15 minutes on 2 cores)
    python benchmarks/deid.py --runs sst2_gru_original,sst2_gru_anonymized --merge   (some runs again)

Through the ordinary code (`polysense data avdigits` / `sst2`, `polysense data anonymize` with its defaults:
faces blurred, PII in text replaced, voices transformed with McAdams alpha 0.8, then training with each
family's default flags):
  - what anonymizing found and changed, and how long it took (faces in the sign-digit photos; PII in SST-2);
  - test accuracy trained and tested on the original data against trained and tested on the anonymized copy:
    AV-digits fused (image + audio) and audio alone (the photos are of hands: faces matter little there, the
    voice transformation a lot), SST-2 with the BiGRU text encoder trained from scratch (MiniLM fine-tuning
    takes 7 minutes a run here);
  - speaker recognition on FSDD's 2,500 recordings of 5 speakers: each recording's embedding is the mean and
    standard deviation over time of its log-mel frames (the runtime's LogMel at 16 kHz), standardised; a
    speaker's voice print is the mean embedding of their even-numbered recordings, and each odd-numbered one is
    given the nearest voice print (cosine). Three attackers, as in the VoicePrivacy challenges: none (original
    against original), ignorant (original voice prints, anonymized recordings) and lazy-informed (voice prints
    made from anonymized recordings too, as anyone who knows the public method can).
Results: results/deid.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np

from polysense.datasets.avdigits import AVDigitsSpec, write_avdigits
from polysense.datasets.sst2 import SST2Spec, write_sst2
from polysense.deid import VoiceOptions, anonymize_manifest, anonymize_voice
from polysense.machine import describe, machine, results_from_this_machine
from polysense.preprocess.audio import SAMPLE_RATE, LogMel, load_audio, resample
from polysense.tools.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COMMAND = "make bench-deid"
RECORDING = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav$")
# Speaker recognition at other McAdams coefficients too (recordings transformed in memory, not written).
ALPHAS = (0.6, 0.7, 0.8, 0.9)
# name -> (dataset, anonymized?, TrainOptions fields)
RUNS = {
    "avdigits_fused_original": ("avdigits", False, {}),
    "avdigits_fused_anonymized": ("avdigits", True, {}),
    "avdigits_audio_original": ("avdigits", False, {"modalities": ("audio",)}),
    "avdigits_audio_anonymized": ("avdigits", True, {"modalities": ("audio",)}),
    "sst2_gru_original": ("sst2", False, {"text_encoder": "gru"}),
    "sst2_gru_anonymized": ("sst2", True, {"text_encoder": "gru"}),
}


def prepare(work: Path) -> tuple[dict[str, dict[bool, Path]], dict]:
    """Each dataset's manifest, original and anonymized (written once into `work`), and what anonymizing did."""
    originals = {
        "avdigits": lambda out: write_avdigits(
            AVDigitsSpec(str(SHARED / "fsdd"), str(SHARED / "sign_digits")), out
        ),
        "sst2": lambda out: write_sst2(SST2Spec(str(SHARED / "sst2")), out),
    }
    manifests, done = {}, {}
    for name, write in originals.items():
        original = write(work / name / "original")
        anonymized = work / name / "anonymized"
        if anonymized.exists():
            shutil.rmtree(anonymized)
        started = time.perf_counter()
        result = anonymize_manifest(original, anonymized, progress=False)
        seconds = time.perf_counter() - started
        manifests[name] = {False: original, True: result.manifest}
        done[name] = {
            "rows": result.rows,
            "files": result.files,
            "faces": result.faces,
            "text_replaced": result.text_findings,
            "rows_with_text_changed": _rows_changed(result.report),
            "seconds": round(seconds, 1),
        }
    return manifests, done


def _rows_changed(report: Path) -> int:
    return sum(1 for row in json.loads(report.read_text())["rows"] if row.get("text", {}).get("replaced"))


def train_run(manifest: Path, out: Path, options: dict) -> dict:
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    result = train(TrainOptions(data=str(manifest), out=str(out), progress=False, **options))
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "test_accuracy": result.metrics["accuracy"],
        "test_macro_f1": result.metrics["macro_f1"],
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def embeddings(paths: list[str], alpha: float | None = None) -> np.ndarray:
    """Mean and standard deviation over time of each recording's log-mel frames, [recordings, 2 * mels]; with
    `alpha`, of the recording transformed with that McAdams coefficient first."""
    log_mel = LogMel()
    rows = []
    for path in paths:
        samples, rate = load_audio(path)
        if alpha is not None:
            samples = anonymize_voice(samples, rate, VoiceOptions(alpha=alpha))
        frames = log_mel(resample(samples, rate, SAMPLE_RATE))
        rows.append(np.concatenate([frames.mean(axis=0), frames.std(axis=0)]))
    return np.stack(rows)


def speaker_recognition(original: Path, anonymized: Path) -> dict:
    """Nearest-voice-print accuracy over FSDD's speakers for three attackers (see the module's docstring)."""
    pairs = list(zip(read_manifest(original).rows, read_manifest(anonymized).rows))  # same rows, same order
    speakers, enrol = [], []
    for row, _ in pairs:
        match = RECORDING.search(row.audio or "")
        assert match, f"not an FSDD recording: {row.audio}"
        speakers.append(match.group(2))
        enrol.append(int(match.group(3)) % 2 == 0)
    speakers_array, enrol_mask = np.array(speakers), np.array(enrol)
    embedded = {
        False: embeddings([row.audio for row, _ in pairs]),
        True: embeddings([anon.audio for _, anon in pairs]),
    }
    attackers = {"none": (False, False), "ignorant": (False, True), "lazy_informed": (True, True)}
    names = sorted(set(speakers))
    results: dict = {"speakers": len(names), "recordings": len(pairs), "chance": round(1 / len(names), 4)}
    for attacker, (prints_from, tested) in attackers.items():
        results[attacker] = nearest_print(embedded[prints_from], embedded[tested], speakers_array, enrol_mask)
    results["alphas"] = {}
    for alpha in ALPHAS:
        moved = embeddings([row.audio for row, _ in pairs], alpha)
        results["alphas"][str(alpha)] = {
            "ignorant": nearest_print(embedded[False], moved, speakers_array, enrol_mask),
            "lazy_informed": nearest_print(moved, moved, speakers_array, enrol_mask),
        }
    return results


def nearest_print(
    prints_from: np.ndarray, tested: np.ndarray, speakers: np.ndarray, enrol: np.ndarray
) -> float:
    """Accuracy of giving each recording not in `enrol` the speaker whose voice print (the mean standardised
    embedding of their `enrol` recordings) is nearest by cosine."""
    names = sorted(set(speakers))
    reference, probe = prints_from[enrol], tested[~enrol]
    mean, std = reference.mean(axis=0), reference.std(axis=0) + 1e-8
    prints = np.stack([((reference - mean) / std)[speakers[enrol] == s].mean(0) for s in names])
    scores = _unit((probe - mean) / std) @ _unit(prints).T
    guessed = np.array(names)[scores.argmax(axis=1)]
    return round(float(np.mean(guessed == speakers[~enrol])), 4)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def markdown(results: dict) -> str:
    lines = [
        "# De-identification: what it costs and what it hides",
        "",
        f"Command: `{COMMAND}` (`python benchmarks/deid.py`). Defaults of `polysense data anonymize`: faces "
        "blurred (CenterFace, threshold 0.5), PII in text replaced, voices transformed (McAdams, alpha 0.8).",
        "",
        f"Machine: {describe(results.get('machine', {}))}.",
        "",
        "| dataset | rows | images | faces found | recordings | text replaced | rows with text changed | time |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, done in results.get("anonymize", {}).items():
        replaced = ", ".join(f"{k} {n}" for k, n in sorted(done["text_replaced"].items())) or "none"
        lines.append(
            f"| {name} | {done['rows']} | {done['files']['image']} | {done['faces']} | {done['files']['audio']} "
            f"| {replaced} | {done['rows_with_text_changed']} | {done['seconds']} s |"
        )
    lines += ["", "| model | original | anonymized | change |", "|---|---:|---:|---:|"]
    runs = results.get("runs", {})
    for base in sorted({name.rsplit("_", 1)[0] for name in runs}):
        before, after = runs.get(f"{base}_original"), runs.get(f"{base}_anonymized")
        if before and after:
            change = (after["test_accuracy"] - before["test_accuracy"]) * 100
            lines.append(
                f"| {base} (test accuracy) | {before['test_accuracy']:.4f} | {after['test_accuracy']:.4f} "
                f"| {change:+.1f} points |"
            )
    speaker = results.get("speaker_recognition")
    if speaker:
        lines += [
            "",
            f"Speaker recognition on FSDD ({speaker['recordings']} recordings, {speaker['speakers']} speakers, "
            f"chance {speaker['chance']:.2f}): nearest voice print, log-mel mean and deviation.",
            "",
            "| attacker | voice prints from | tested on | accuracy |",
            "|---|---|---|---:|",
            f"| none | original | original | {speaker['none']:.4f} |",
            f"| ignorant | original | anonymized | {speaker['ignorant']:.4f} |",
            f"| lazy-informed | anonymized | anonymized | {speaker['lazy_informed']:.4f} |",
            "",
            "The same at other McAdams coefficients (recordings transformed in memory, not quantised to 16 bits):",
            "",
            "| alpha | ignorant | lazy-informed |",
            "|---:|---:|---:|",
        ]
        for alpha, got in speaker.get("alphas", {}).items():
            lines.append(f"| {alpha} | {got['ignorant']:.4f} | {got['lazy_informed']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default=str(ROOT / "runs" / "deid_bench"), help="data and runs (not committed)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--runs", default=",".join(RUNS), help="which training runs, comma-separated")
    parser.add_argument(
        "--merge", action="store_true", help="keep the results in --out of runs not run again"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    wanted = [n for n in args.runs.split(",") if n]
    if unknown := [n for n in wanted if n not in RUNS]:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = (
        results_from_this_machine(out / "deid.json") if args.merge else {"machine": machine(), "runs": {}}
    )
    results["command"] = COMMAND

    def save() -> None:
        (out / "deid.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "deid.md").write_text(markdown(results))

    manifests, results["anonymize"] = prepare(work)
    results["speaker_recognition"] = speaker_recognition(
        manifests["avdigits"][False], manifests["avdigits"][True]
    )
    save()
    for name in wanted:
        dataset, anonymized, options = RUNS[name]
        logging.warning("training %s", name)
        results["runs"][name] = train_run(manifests[dataset][anonymized], work / name, options)
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
