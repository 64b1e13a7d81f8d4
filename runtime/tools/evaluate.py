"""Evaluate a bundle on a data manifest with the runtime alone: the same keys as training's metrics.json.

Uses only the public API that a Pipeline and an Ensemble share (polysense.Predictor): each batch is embedded
once (`embed`), then classified with all its modalities and under every subset of them (`predict_batch` on
narrowed embeddings), so either is evaluated the same way. A bundle
trained with --voice-norm, on a manifest with a speaker column, hears each speaker with their own voice
profile, built from all their recordings in the manifest (every split; no label used), as training did.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polysense.errors import ConfigError, InputError, ManifestError
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import EmbeddingsT, Predictor, PreparedT
from polysense.modalities import nonempty_subsets, subset_key
from polysense.preprocess.voice import VoiceProfile
from polysense.tools.batch_predict import GROUPED, PredictionWriter
from polysense.tools.manifest import SPLITS, Problem, Row, check_labels, read_manifest, report_skipped
from polysense.tools.metrics import classification_metrics

BATCH = 32
log = logging.getLogger("polysense")


def _rows_to_evaluate(
    pipeline: Predictor[PreparedT, EmbeddingsT], manifest: str | os.PathLike, split: str | None
) -> tuple[list[Row], list[Problem], list[Row]]:
    """The rows to evaluate, the problems of the rows skipped, and every usable row (for voice profiles)."""
    data = read_manifest(manifest)
    usable, skipped = data.usable_rows()
    rows = usable
    if split is not None:
        if split not in SPLITS:
            raise ConfigError(f"--split {split!r} is unknown; use one of {', '.join(SPLITS)}")
        if not data.has_split:
            raise ConfigError(f"{manifest} has no split column, so --split {split} selects nothing")
        rows = [r for r in rows if r.split == split]
        in_split = {r.line for r in data.rows if r.split == split}
        skipped = [p for p in skipped if p.line in in_split]
    rows = [r for r in rows if any(getattr(r, m) is not None for m in pipeline.modalities)]
    problems = check_labels(rows, pipeline.labels, "the bundle's model does not know it")
    if problems:
        raise ManifestError(str(manifest), problems)
    return rows, skipped, usable


def _speaker_voices(pipeline: Predictor[PreparedT, EmbeddingsT], rows: list[Row]) -> dict[str, VoiceProfile]:
    """speaker -> voice profile from their recordings in `rows`, every split's (empty unless the bundle takes
    profiles)."""
    audio = pipeline.description.preprocessing.audio  # an ensemble's: its members share the front end
    if audio is None or audio.voice is None:
        return {}
    by_speaker: dict[str, list[str]] = {}
    for row in rows:
        if row.speaker is not None and row.audio is not None:
            by_speaker.setdefault(row.speaker, []).append(row.audio)
    unnamed = sum(row.audio is not None and row.speaker is None for row in rows)
    if unnamed:
        log.warning(
            "%d recordings have no speaker: this bundle was trained with --voice-norm, so they are heard with "
            "the training speakers' average voice, which suits a new voice less; add a speaker column",
            unnamed,
        )
    voices: dict[str, VoiceProfile] = {}
    for speaker, recordings in sorted(by_speaker.items()):
        try:
            voices[speaker] = pipeline.voice_profile(recordings)
        except InputError as error:
            log.warning(
                "speaker %r: no voice profile (%s); the bundle's average voice stands in", speaker, error
            )
    return voices


def _sample(row: Row, modalities: tuple[str, ...], voices: dict[str, VoiceProfile]) -> dict:
    sample = {m: getattr(row, m) for m in modalities if getattr(row, m) is not None}
    if "audio" in sample and row.speaker in voices:
        sample["voice"] = voices[row.speaker]
    return sample


def _embed_rows(
    pipeline: Predictor[PreparedT, EmbeddingsT], rows: list[Row], voices: dict[str, VoiceProfile]
) -> tuple[list[Row], EmbeddingsT | None, list[Problem]]:
    """Embeddings of the rows that could be read; a batch that fails is retried row by row, so an unreadable
    file costs only its own row (reported as a Problem)."""
    samples = [_sample(r, pipeline.modalities, voices) for r in rows]
    try:
        return rows, pipeline.embed(samples), []
    except InputError:
        pass
    kept: list[Row] = []
    problems: list[Problem] = []
    for row, sample in zip(rows, samples):
        try:
            pipeline.embed([sample])
            kept.append(row)
        except InputError as error:
            problems.append(Problem(row.line, str(error), skippable=True))
    if not kept:
        return [], None, problems
    return kept, pipeline.embed([_sample(r, pipeline.modalities, voices) for r in kept]), problems


def _predicted(pipeline: Predictor[PreparedT, EmbeddingsT], embeddings: EmbeddingsT) -> list[int]:
    return _indices(pipeline, pipeline.predict_batch(embeddings))


def _indices(pipeline: Predictor[PreparedT, EmbeddingsT], predictions: Sequence[Prediction]) -> list[int]:
    index = {label: i for i, label in enumerate(pipeline.labels)}
    return [index[p.label] for p in predictions]


def evaluate_bundle(
    pipeline: Predictor[PreparedT, EmbeddingsT],
    manifest: str | os.PathLike,
    split: str | None = None,
    progress: bool = True,
    predictions: str | os.PathLike | None = None,
) -> dict:
    """accuracy, macro precision/recall/F1, confusion matrix, and `subsets`: each sample is evaluated on every
    non-empty subset of the bundle's modalities that it has (encoders run once per sample). `predictions`: also
    write each sample's prediction (all its modalities) and true label there (.jsonl or .csv)."""
    writer: contextlib.AbstractContextManager[PredictionWriter | None] = contextlib.nullcontext(None)
    if predictions is not None:
        writer = PredictionWriter(predictions, pipeline.labels, extra=("true_label",))
    with writer as written:
        return _evaluate(pipeline, manifest, split, progress, written)


def _evaluate(
    pipeline: Predictor[PreparedT, EmbeddingsT],
    manifest: str | os.PathLike,
    split: str | None,
    progress: bool,
    writer: PredictionWriter | None,
) -> dict:
    rows, skipped, usable = _rows_to_evaluate(pipeline, manifest, split)
    voices = _speaker_voices(pipeline, usable)
    total = len(rows) + len({p.line for p in skipped})
    # Keyed like Row.label (None in unlabelled manifests, which _rows_to_evaluate refuses here).
    label_index: dict[str | None, int] = {label: i for i, label in enumerate(pipeline.labels)}
    subsets = nonempty_subsets(pipeline.modalities)
    truth: dict[str | None, list[int]] = {key: [] for key in [None, *map(subset_key, subsets)]}
    guess: dict[str | None, list[int]] = {key: [] for key in truth}
    unreadable: list[Problem] = []
    with tqdm(total=len(rows), desc="evaluating", unit="row", disable=not progress, leave=False) as bar:
        for group in (rows[start : start + GROUPED] for start in range(0, len(rows), GROUPED)):
            written: dict[int, tuple[Row, Prediction]] = {}
            # Run in order of text length: a batch pads its texts to its longest (batch_predict.GROUPED).
            ordered = sorted(group, key=lambda row: len(row.text or ""))
            for batch_rows in (ordered[i : i + BATCH] for i in range(0, len(ordered), BATCH)):
                bar.update(len(batch_rows))
                batch, embeddings, problems = _embed_rows(pipeline, batch_rows, voices)
                unreadable += problems
                if embeddings is None:
                    continue
                labels = np.array([label_index[r.label] for r in batch])
                truth[None].extend(labels)
                predicted = pipeline.predict_batch(embeddings)
                guess[None].extend(_indices(pipeline, predicted))
                written.update((row.line, (row, p)) for row, p in zip(batch, predicted))
                for subset in subsets:
                    selector = np.array([m in subset for m in pipeline.modalities], dtype=np.float32)
                    has_all = (embeddings.mask * selector).sum(1) == selector.sum()
                    if has_all.any():
                        truth[subset_key(subset)].extend(labels[has_all])
                        guess[subset_key(subset)].extend(
                            _predicted(pipeline, embeddings.select(has_all, subset))
                        )
            if writer is not None:
                for line in sorted(written):  # the manifest's order
                    row, prediction = written[line]
                    writer.write(f"{Path(manifest).name}:{line}", prediction, true_label=row.label)
    report_skipped(skipped + unreadable, total, str(manifest))
    if not truth[None]:
        raise ConfigError(
            f"{manifest}: no rows{f' in split {split}' if split else ''} with "
            f"{' or '.join(pipeline.modalities)} to evaluate"
        )
    classes = len(pipeline.labels)
    metrics = classification_metrics(truth[None], guess[None], classes)
    metrics["subsets"] = {
        key: classification_metrics(truth[key], guess[key], classes) for key in truth if key and truth[key]
    }
    skipped_all = skipped + unreadable
    metrics.update(split=split, labels=list(pipeline.labels), skipped=[str(p) for p in skipped_all])
    return metrics
