"""From a manifest to in-memory feature sets per split, with every bad row reported before training."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from polysense.bundle.settings import AudioSettings, ImageSettings, Preprocessing, TextSettings
from polysense.datasets.builtin import BuiltinSpec, ensure_builtin
from polysense.errors import ConfigError, ManifestError
from polysense.inference.preprocessors import build_preprocessors
from polysense.modalities import MODALITIES, Preprocess
from polysense.models.registry import (
    family_defaults,
    family_front_end,
    family_tokenizer,
    family_train_speeds,
    is_frozen,
)
from polysense.models.training import privacy
from polysense.models.training.dataset import FeatureSet
from polysense.models.training.options import TrainOptions, flag
from polysense.preprocess.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from polysense.preprocess.image import IMAGENET_MEAN, IMAGENET_STD
from polysense.preprocess.text import train_tokenizer
from polysense.preprocess.voice import VoiceProfile, speaker_profiles
from polysense.tools.data_check.quick import quick_check
from polysense.tools.manifest import (
    SPLITS,
    Manifest,
    Problem,
    Row,
    check_labels,
    preprocess_rows,
    read_manifest,
    report_skipped,
    stratified_split,
    write_manifest,
)

log = logging.getLogger("polysense")

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PreparedData:
    modalities: tuple[str, ...]
    labels: list[str]
    splits: dict[str, FeatureSet]
    preprocessing: Preprocessing  # each modality's preprocessing settings, for the run config
    vocab_size: int


def resolve_manifest(options: TrainOptions, run_dir: Path, writes: bool = True) -> Path:
    if options.data == "builtin" and not writes:
        return run_dir / "builtin_data" / "manifest.csv"  # the run's preparation generated it
    if options.data == "builtin":
        spec = BuiltinSpec(n=options.builtin_n, seed=options.seed)
        return ensure_builtin(run_dir / "builtin_data", spec, progress=options.progress)
    return Path(options.data)


def choose_modalities(manifest: Manifest, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    available = manifest.modalities()
    if requested is None:
        return available
    missing = [m for m in requested if m not in available]
    if missing:
        raise ConfigError(
            f"--modalities asks for {', '.join(missing)} but {manifest.path} has no {missing[0]} data; "
            f"it has {', '.join(available) or 'none'}"
        )
    return requested


def prepare_data(
    options: TrainOptions, run_dir: Path, writes: bool = True, written: Callable[[], object] | None = None
) -> PreparedData:
    """Read, split and check the manifest, train the tokenizer, preprocess every sample once.

    writes=False: read what a preparation of the same run wrote (the built-in set, the tokenizer) and write
    nothing: the other processes of a distributed run. `written` is called once those files are written,
    before the long preprocessing (rank 0 lets the others start theirs).
    Raises ManifestError listing every bad row (structure, files, labels, undecodable files).
    """
    _check_frozen_sources(options)  # before the built-in set is generated: a typo fails in a second
    manifest = read_manifest(resolve_manifest(options, run_dir, writes))
    usable, skipped = manifest.usable_rows()
    modalities = choose_modalities(manifest, options.modalities)
    refused = privacy.family_problems(options, modalities)  # before the tokenizer learns the training words
    if refused:
        raise ConfigError("; ".join(refused))
    by_split = _split_rows(manifest, usable, modalities, options.seed)
    if writes:
        _check_leakage(options, [r for s in SPLITS for r in by_split[s]], modalities)
    labels = sorted({r.label for r in by_split["train"]})
    problems = check_labels(by_split["val"] + by_split["test"], labels, "it never occurs in the train split")
    problems += _check_speakers(options, modalities, [r for s in SPLITS for r in by_split[s]])
    if problems:
        raise ManifestError(str(manifest.path), problems)
    # The tokenizer is written now (the preprocessors read it); the rest of the run only once every row passed.
    preprocessing, vocab_size = _preprocessing(modalities, by_split["train"], options, run_dir, writes)
    if written is not None:
        written()
    preprocessors = build_preprocessors(preprocessing, modalities, run_dir)

    ordered = [r for s in SPLITS for r in by_split[s]]
    features, decode_problems = preprocess_rows(ordered, preprocessors, progress=options.progress and writes)
    report_skipped(skipped + decode_problems, len(manifest.rows), str(manifest.path))
    if decode_problems:  # drop the rows whose files could not be decoded
        bad = {p.line for p in decode_problems}
        keep = [i for i, r in enumerate(ordered) if r.line not in bad]
        ordered = [ordered[i] for i in keep]
        features = {m: [values[i] for i in keep] for m, values in features.items()}
    if options.voice_norm:
        features["audio"], preprocessing = _remove_voices(ordered, features["audio"], preprocessing)
    # Written only once every row passed, so a failed preparation leaves nothing that looks like a run.
    if writes:
        write_manifest(ordered, run_dir / "manifest.csv")

    splits = _feature_sets(modalities, labels, ordered, features)
    speeds = family_train_speeds(options.audio_encoder) if "audio" in modalities else ()
    if speeds:
        train_rows = [r for r in ordered if r.split == "train"]
        splits["train"] = _at_speeds(splits["train"], train_rows, preprocessors["audio"], speeds, options)
    sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
    log.info(
        "data: %s; modalities %s; %d labels; %s", manifest.path, "+".join(modalities), len(labels), sizes
    )
    return PreparedData(modalities, labels, splits, preprocessing, vocab_size)


def _check_leakage(options: TrainOptions, rows: list[Row], modalities: tuple[str, ...]) -> None:
    """The data check's cheap part: one summary line, and a refusal of obvious leakage unless allowed."""
    check = quick_check(rows, modalities)
    log.info("%s", check.summary())
    refusal = check.refusal()
    if refusal is not None and not options.allow_leakage:
        raise ConfigError(f"{refusal}, or train anyway with {flag('allow_leakage')}")
    if refusal is not None:
        log.warning("%s (--allow-leakage: training anyway)", refusal)


def _check_speakers(options: TrainOptions, modalities: tuple[str, ...], rows: list[Row]) -> list[Problem]:
    """--voice-norm needs audio, and who speaks in every recording."""
    if not options.voice_norm:
        return []
    if "audio" not in modalities:
        raise ConfigError(
            f"--voice-norm removes speakers' voices from audio, but this run trains {'+'.join(modalities)}"
        )
    return [
        Problem(
            r.line, "speaker is empty; --voice-norm needs who speaks in every recording (a speaker column)"
        )
        for r in rows
        if r.audio is not None and r.speaker is None
    ]


def _remove_voices(
    rows: list[Row], audio: list[np.ndarray | None], preprocessing: Preprocessing
) -> tuple[list[np.ndarray | None], Preprocessing]:
    """Each recording with its speaker's profile removed, and the settings with the training speakers' average
    voice (what the runtime removes for a speaker without a profile). A speaker's profile comes from all their
    recordings in the manifest, test ones included: no label is used, as `polysense eval` does.

    Removed from the features before augmentation, so the augmented gain, noise and warps act on what the
    encoder sees from every speaker alike."""
    profiles = speaker_profiles((r.speaker, f) for r, f in zip(rows, audio) if f is not None)
    trained = sorted({r.speaker for r, f in zip(rows, audio) if f is not None and r.split == "train"})
    default = VoiceProfile.average(profiles[s] for s in trained)
    log.info("voice normalisation: %d speakers (%d in training)", len(profiles), len(trained))
    normalised = [None if f is None else profiles[r.speaker].normalise(f) for r, f in zip(rows, audio)]
    return normalised, replace(preprocessing, audio=replace(preprocessing.audio, voice=default))


def _split_rows(
    manifest: Manifest, usable: list[Row], modalities: tuple[str, ...], seed: int
) -> dict[str, list[Row]]:
    """The usable rows that have one of `modalities` (other cells cleared), by split; every split non-empty."""
    rows = [r for r in usable if any(getattr(r, m) is not None for m in modalities)]
    if len(rows) < len(usable):
        log.warning("%d rows have none of %s and are left out", len(usable) - len(rows), "+".join(modalities))
    # Drop cells of modalities the model does not use, so they are neither read nor required.
    rows = [replace(r, **{m: None for m in MODALITIES if m not in modalities}) for r in rows]
    _check_label_count(manifest, rows)
    if not manifest.has_split:
        rows = stratified_split(rows, seed)
    by_split = {s: [r for r in rows if r.split == s] for s in SPLITS}
    empty = [s for s in SPLITS if not by_split[s]]
    if empty and not manifest.has_split:
        raise ConfigError(_too_few_to_split(manifest, rows, empty))
    if empty:
        raise ConfigError(
            f"{manifest.path}: the {' and '.join(empty)} split is empty; "
            "give it rows in the split column, or drop the column for an automatic 80/10/10 split"
        )
    return by_split


def _check_label_count(manifest: Manifest, rows: list[Row]) -> None:
    """A classifier needs two labels: with one, training reaches loss 0 and accuracy 1.0 and learns nothing."""
    labels = sorted({str(r.label) for r in rows})
    if len(labels) == 1:
        raise ConfigError(
            f"{manifest.path}: every usable row has the label {labels[0]!r}; a classifier needs rows of at "
            "least two labels"
        )


def _too_few_to_split(manifest: Manifest, rows: list[Row], empty: list[str]) -> str:
    """Why the automatic split (per label, 10% to val and 10% to test) left a split empty: too few rows a label."""
    per_label = Counter(r.label for r in rows)
    # The smallest label size that gives val and test one row each (round(0.1 * n) >= 1).
    needed = next(n for n in range(1, 1000) if round(0.1 * n) >= 1)
    return (
        f"{manifest.path}: {len(rows)} usable rows are too few for the automatic split (10% of each label's "
        f"rows to val, 10% to test): the {' and '.join(empty)} split is empty, as the largest label has "
        f"{max(per_label.values())} rows; give each label at least {needed} rows (dozens to learn from), or add "
        "a split column (train, val, test) to choose the rows yourself"
    )


def _image_settings(
    options: TrainOptions, train_rows: list[Row], run_dir: Path, writes: bool = True
) -> ImageSettings:
    """The image family's own input scale (EfficientNet-Lite: [-1, 1]), else ImageNet's mean and std."""
    front_end = family_front_end("image", options.image_encoder)
    if front_end is not None:  # a frozen encoder the user brought (onnx:PATH)
        return front_end(run_dir, writes, options.image_encoder, *_front_end_options(options)["image"])
    family = family_defaults("image", options.image_encoder)
    mean, std = family.get("image_mean", IMAGENET_MEAN), family.get("image_std", IMAGENET_STD)
    return ImageSettings(options.image_size, tuple(mean), tuple(std))


def _text_settings(
    options: TrainOptions, train_rows: list[Row], run_dir: Path, writes: bool = True
) -> TextSettings:
    """The text family's own tokenizer (a pretrained one, or the one beside a frozen graph) or one trained on the
    train split's texts, saved in the run folder."""
    train_texts = [r.text for r in train_rows if r.text is not None]
    if not train_texts:
        raise ConfigError("the train split has no text; add texts or leave text out with --modalities")
    front_end = family_front_end("text", options.text_encoder)
    if front_end is not None:  # a frozen encoder the user brought (onnx:PATH), with its tokenizer
        return front_end(run_dir, writes, options.text_encoder, *_front_end_options(options)["text"])
    pretrained = family_tokenizer(options.text_encoder)
    if writes and pretrained is not None:
        shutil.copyfile(pretrained, run_dir / TOKENIZER_FILE)
    elif writes:
        # Deterministic for the same texts, so a resumed run rebuilds the very same tokenizer.
        train_tokenizer(train_texts).save(str(run_dir / TOKENIZER_FILE))
    return TextSettings(TOKENIZER_FILE, options.max_text_length)


def _audio_settings(
    options: TrainOptions, train_rows: list[Row], run_dir: Path, writes: bool = True
) -> AudioSettings:
    """The log-mel front end, or the one the audio family brings (speech-embedding: its frozen graphs, copied
    into the run folder)."""
    front_end = family_front_end("audio", options.audio_encoder)
    if front_end is None:
        return AudioSettings(SAMPLE_RATE, N_FFT, HOP_LENGTH, N_MELS)
    if options.voice_norm:
        raise ConfigError(
            f"--voice-norm removes voices from log-mel frames; --audio-encoder {options.audio_encoder} reads "
            "its own front end: drop --voice-norm"
        )
    return front_end(run_dir, writes, options.audio_encoder, *_front_end_options(options)["audio"])


# How a training run chooses each modality's preprocessing settings (recorded in config.json, then the bundle).
_SETTINGS = {"image": _image_settings, "text": _text_settings, "audio": _audio_settings}


def _preprocessing(
    modalities: tuple[str, ...], train_rows: list[Row], options: TrainOptions, run_dir: Path, writes: bool
) -> tuple[Preprocessing, int]:
    """The run's preprocessing settings and the text vocabulary size (0 without text)."""
    settings = Preprocessing(**{m: _SETTINGS[m](options, train_rows, run_dir, writes) for m in modalities})
    vocab_size = 0
    if settings.text is not None:
        vocab_size = Tokenizer.from_file(str(run_dir / settings.text.tokenizer)).get_vocab_size()
    return settings, vocab_size


def _check_frozen_sources(options: TrainOptions) -> None:
    """Every onnx:PATH encoder names a graph that keeps its modality's contract (read here, not copied), so a
    wrong one is refused before any data is generated."""
    for modality in MODALITIES:
        name = options.encoder(modality)
        if is_frozen(name):
            front_end = family_front_end(modality, name)
            front_end(Path(options.out), False, name, *_front_end_options(options)[modality])


def _front_end_options(options: TrainOptions) -> dict[str, tuple]:
    """What each modality's front end takes beyond (folder, copy, family name)."""
    return {"image": (options.image_size,), "text": (options.max_text_length,), "audio": ()}


def _at_speeds(
    train: FeatureSet, rows: list[Row], audio: Preprocess, speeds: tuple[float, ...], options: TrainOptions
) -> FeatureSet:
    """The train split with each recording also played at `speeds` (tempo and pitch together, as Kaldi's speed
    perturbation): rows of the same label and other modalities, computed once here like every feature. For a
    frozen front end the only augmentation there is (speech-embedding: docs/training.md)."""
    present = [i for i, x in enumerate(train.features["audio"]) if x is not None]
    extra = [
        (i, audio.at_speed(rows[i].audio, speed))  # type: ignore[attr-defined]  # a front end's preprocessor
        for speed in speeds
        for i in tqdm(
            present, desc=f"audio at {speed:g}x", unit="clip", disable=not options.progress, leave=False
        )
    ]
    features = {m: values + [values[i] for i, _ in extra] for m, values in train.features.items()}
    features["audio"] = train.features["audio"] + [x for _, x in extra]
    labels = np.concatenate([train.labels, train.labels[[i for i, _ in extra]]])
    log.info(
        "train split: %d recordings also at %s x speed", len(present), ", ".join(f"{s:g}" for s in speeds)
    )
    return FeatureSet(train.modalities, features, labels.astype(np.int64))


def _feature_sets(
    modalities: tuple[str, ...], labels: list[str], ordered: list[Row], features: dict[str, list]
) -> dict[str, FeatureSet]:
    """One FeatureSet per split from the rows in split order and their features (same order)."""
    label_index = {label: i for i, label in enumerate(labels)}
    splits, start = {}, 0
    for split in SPLITS:
        rows = [r for r in ordered if r.split == split]
        split_features = {m: features[m][start : start + len(rows)] for m in modalities}
        split_labels = np.array([label_index[r.label] for r in rows], dtype=np.int64)
        splits[split] = FeatureSet(modalities, split_features, split_labels)
        start += len(rows)
    return splits
