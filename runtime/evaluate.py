"""Evaluate a bundle on a data manifest with the runtime alone: the same keys as training's metrics.json."""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from polysense.data import SPLITS, check_labels, preprocess_rows, read_manifest, report_skipped
from polysense.errors import ConfigError, ManifestError
from polysense.metrics import classification_metrics
from polysense.modalities import nonempty_subsets, subset_key
from polysense.pipeline import Pipeline
from polysense.sessions import to_numpy

BATCH = 32


def evaluate_bundle(
    pipeline: Pipeline, manifest: str | os.PathLike, split: str | None = None, progress: bool = True
) -> dict:
    """accuracy, macro precision/recall/F1, confusion matrix, and `subsets`: each sample is evaluated on every
    non-empty subset of the bundle's modalities that it has (encoders run once per sample)."""
    data = read_manifest(manifest)
    rows, skipped = data.usable_rows()
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
    preprocessors = {m: (lambda value, m=m: pipeline.preprocess(m, value)) for m in pipeline.modalities}
    total = len(rows) + len({p.line for p in skipped})
    features, unreadable = preprocess_rows(rows, preprocessors, progress=progress)
    skipped += unreadable
    report_skipped(skipped, total, str(manifest))
    bad = {p.line for p in unreadable}
    keep = [i for i, r in enumerate(rows) if r.line not in bad]
    rows = [rows[i] for i in keep]
    features = {m: [values[i] for i in keep] for m, values in features.items()}
    if not rows:
        raise ConfigError(
            f"{manifest}: no rows{f' in split {split}' if split else ''} with "
            f"{' or '.join(pipeline.modalities)} to evaluate"
        )
    label_index = {label: i for i, label in enumerate(pipeline.labels)}
    subsets = nonempty_subsets(pipeline.modalities)
    truth: dict[str | None, list[int]] = {key: [] for key in [None, *map(subset_key, subsets)]}
    guess: dict[str | None, list[int]] = {key: [] for key in truth}
    for start in tqdm(
        range(0, len(rows), BATCH), desc="evaluating", unit="batch", disable=not progress, leave=False
    ):
        batch = rows[start : start + BATCH]
        chunk = {m: values[start : start + BATCH] for m, values in features.items()}
        embeddings, mask, _ = pipeline.embed_features(chunk, len(batch))
        labels = np.array([label_index[r.label] for r in batch])
        truth[None].extend(labels)
        guess[None].extend(pipeline.fuse(embeddings, mask).argmax(1))
        for subset in subsets:
            selector = np.array([m in subset for m in pipeline.modalities], dtype=np.float32)
            has_all = (mask * selector).sum(1) == selector.sum()
            if has_all.any():
                rows_mask = np.broadcast_to(selector, (int(has_all.sum()), len(selector))).copy()
                chosen = {m: to_numpy(e)[has_all] for m, e in embeddings.items()}
                truth[subset_key(subset)].extend(labels[has_all])
                guess[subset_key(subset)].extend(pipeline.fuse(chosen, rows_mask).argmax(1))
    classes = len(pipeline.labels)
    metrics = classification_metrics(truth[None], guess[None], classes)
    metrics["subsets"] = {
        key: classification_metrics(truth[key], guess[key], classes) for key in truth if key and truth[key]
    }
    metrics.update(split=split, labels=pipeline.labels, skipped=[str(p) for p in skipped])
    return metrics
