"""What the frozen speech_embedding features allow on the five FSDD speakers here: a calibration for the
speech-embedding family's leave-one-speaker-out score.

    python benchmarks/avdigits/speech_calibration.py     (about 1 minute on 2 cores; needs scikit-learn)

Each recording's window embeddings come from the runtime's front end (polysense.preprocess.speech, as training
computes them); pooled over the windows (mean, std, max: the features the trained head reads), standardised,
and classified by a logistic regression (scikit-learn, L2, C = 0.1 and 1.0) trained on four speakers and tested
on the fifth. The issue's calibration (0.970 mean, worst 0.930) was measured over six FSDD speakers; the shared
data has five, so each model hears one voice fewer. Writes results/speech/calibration.{json,md}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from polysense.machine import describe, machine
from polysense.models.encoders.speech_embedding import package_graphs
from polysense.preprocess.speech import SpeechGraphs, SpeechPreprocessor

FSDD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd" / "recordings"
OUT = Path(__file__).resolve().parent / "results" / "speech"
REGULARISATION = (0.1, 1.0)  # scikit-learn's C: the inverse L2 strength


def pooled_features() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, 288], digits [n], speakers [n]) of every FSDD recording."""
    graphs = package_graphs()
    front_end = SpeechPreprocessor(SpeechGraphs(graphs["mel"].read_bytes(), graphs["embedding"].read_bytes()))
    rows = []
    for path in sorted(FSDD.glob("*.wav")):
        digit, speaker, _ = path.stem.split("_")
        windows = front_end(str(path))
        rows.append((np.concatenate([windows.mean(0), windows.std(0), windows.max(0)]), int(digit), speaker))
    features, digits, speakers = zip(*rows)
    return np.stack(features), np.array(digits), np.array(speakers)


def leave_one_speaker_out(features: np.ndarray, digits: np.ndarray, speakers: np.ndarray, c: float) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scores = {}
    for speaker in sorted(set(speakers)):
        train, test = speakers != speaker, speakers == speaker
        scaler = StandardScaler().fit(features[train])
        model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(features[train]), digits[train])
        scores[speaker] = float((model.predict(scaler.transform(features[test])) == digits[test]).mean())
    return scores


def main() -> None:
    features, digits, speakers = pooled_features()
    results = {
        "machine": machine(),
        "command": "python benchmarks/avdigits/speech_calibration.py",
        "speakers": sorted(set(speakers.tolist())),
        "recordings": len(digits),
        "logistic_regression": {},
    }
    lines = [
        "# Frozen speech_embedding features + logistic regression, leave-one-speaker-out (FSDD, 5 speakers)",
        "",
        f"Command: `{results['command']}`. Machine: {describe(results['machine'])}.",
        "",
        "| C | mean | " + " | ".join(results["speakers"]) + " |",
        "|---|---:|" + "---:|" * len(results["speakers"]),
    ]
    for c in REGULARISATION:
        scores = leave_one_speaker_out(features, digits, speakers, c)
        mean = float(np.mean(list(scores.values())))
        results["logistic_regression"][str(c)] = {"mean": mean, "per_speaker": scores}
        lines.append(
            f"| {c} | {mean:.3f} | " + " | ".join(f"{scores[s]:.3f}" for s in results["speakers"]) + " |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
