"""Opening a training run: the options (a resumed run's are in its folder), the processes, the data, the
model and the checkpoint to continue from. Rank 0 checks the folder, prepares the data and writes the config;
the other processes of a distributed run wait for it, receive its options and prepare the same data without
writing anything."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polysense.errors import ConfigError
from polysense.models.model import ModelConfig, MultimodalClassifier
from polysense.models.training import privacy, run_folder
from polysense.models.training.data_prep import PreparedData, prepare_data
from polysense.models.training.dataset import FeatureSet
from polysense.models.training.distributed.processes import World, from_main, join
from polysense.models.training.distributed.sharded_layers import StepContext, shard_layers
from polysense.models.training.distributed.sharding import check_split
from polysense.models.training.options import TrainOptions
from polysense.models.training.privacy import PrivateTraining
from polysense.models.training.run_folder import Checkpoint
from polysense.models.training.train_state import TrainState
from polysense.preprocess.audio import N_MELS

log = logging.getLogger("polysense")


@dataclass
class Run:
    """Everything one training run works on."""

    options: TrainOptions
    run_dir: Path
    data: PreparedData
    config: dict  # options, model config, labels, preprocessing: config.json, and inside model.pt
    model: MultimodalClassifier
    heads: nn.ModuleDict  # per-modality linear heads of staged pre-training and the auxiliary losses
    device: torch.device
    state: TrainState
    checkpoint: Checkpoint | None  # the checkpoint resumed from (its optimizer and schedule are reused)
    world: World
    context: StepContext  # where this process's rows sit in the current batch (sharded_layers)
    privacy: PrivateTraining | None = None  # --dp-epsilon: the mechanism and the privacy spent (train.py)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def size_inputs(model: MultimodalClassifier, train: FeatureSet) -> None:
    """Encoders whose first layer takes the width of their input (`fit_input_width`: a frozen graph's vectors,
    a property of the graph, not of the rows) get it here, with or without differential privacy."""
    for modality, encoder in model.encoders.items():
        if hasattr(encoder, "fit_input_width"):
            encoder.fit_input_width(next(x for x in train.features[modality] if x is not None).shape[-1])


def fit_input_statistics(model: MultimodalClassifier, train: FeatureSet) -> None:
    """Encoders that normalise their input with training statistics (`fit_input_stats`) get them here."""
    for modality, encoder in model.encoders.items():
        if hasattr(encoder, "fit_input_stats"):
            encoder.fit_input_stats([x for x in train.features[modality] if x is not None])


def _model_config(options: TrainOptions, data: PreparedData, pruned: dict) -> ModelConfig:
    return ModelConfig(
        modalities=data.modalities,
        num_classes=len(data.labels),
        embed_dim=options.embed_dim,
        image_family=options.image_encoder,
        image_width=options.image_width,
        text_family=options.text_encoder,
        audio_family=options.audio_encoder,
        # Recorded only where the audio family uses it, so a config does not claim a normalisation it lacks.
        audio_norm_frames=0
        if options.family_ignores("audio", "audio_norm_frames")
        else options.audio_norm_frames,
        vocab_size=data.vocab_size,
        # Values per audio frame: mel bands, or the width of a frozen front end's window vectors.
        n_mels=data.preprocessing.audio.n_mels if data.preprocessing.audio is not None else N_MELS,
        max_text_length=options.max_text_length,
        fusion=options.fusion,
        pretrained=not options.from_scratch,
        group_norm=options.dp_epsilon > 0,  # BatchNorm mixes a batch's rows: no per-row gradient
        pruned=pruned,  # a pruned run's structure (polysense prune), which no option says
    )


def open_run(options: TrainOptions, resume: bool, changed: Collection[str], world: World) -> Run:
    """Rank 0 checks the folder, prepares the data and writes the config. It settles the options (a resumed
    run's are in its folder) and sends them once it has written what the others read (the built-in set, the
    tokenizer); they then preprocess the same data alongside it, without writing anything."""
    run_dir = Path(options.out)
    device = join(world, pick_device(options.device))
    if world.is_main:
        options, data, config = _prepare_run(options, resume, changed, run_dir, world)
    else:
        options = from_main(world, options)
        data = prepare_data(options, run_dir, writes=False)
        options = options.for_data_modalities(data.modalities)  # as rank 0 settled them
        config = _run_config(options, data, run_folder.stored_pruned(run_dir) if resume else {})

    torch.manual_seed(options.seed)
    model = MultimodalClassifier(ModelConfig.from_dict(config["model"]))
    size_inputs(model, data.splits["train"])
    if options.dp_epsilon:
        # Input statistics of the training rows would ship in the bundle outside the privacy accounting: under
        # DP the encoders keep their defaults (mean 0, std 1), and torch GRUs train as opacus's DPGRU.
        privacy.private_layers(model)
    else:
        fit_input_statistics(model, data.splits["train"])
    heads = nn.ModuleDict({m: nn.Linear(options.embed_dim, len(data.labels)) for m in data.modalities})
    context = StepContext(synchronise=world.distributed)
    shard_layers(model, context)
    model.to(device)
    model.use_channels_last()
    heads.to(device)
    state, checkpoint = TrainState(), None
    if resume:
        checkpoint = run_folder.load_latest_checkpoint(run_dir, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        heads.load_state_dict(checkpoint.heads)
        state = checkpoint.state
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
    return Run(options, run_dir, data, config, model, heads, device, state, checkpoint, world, context)


def _prepare_run(
    options: TrainOptions, resume: bool, changed: Collection[str], run_dir: Path, world: World
) -> tuple[TrainOptions, PreparedData, dict]:
    """Rank 0's part of opening a run: the options, the data and config.json, written to the run folder."""
    if resume:
        options = run_folder.resumed_options(options, run_dir, changed)
        check_split(options.batch_size, world.size, options.accumulate)
        # A finished run trained further is unfinished again until its new metrics are written, so that
        # --resume can continue it should this extension stop too.
        (run_dir / run_folder.METRICS_FILE).unlink(missing_ok=True)
    else:
        run_folder.check_fresh_run_dir(run_dir)
        check_split(options.batch_size, world.size, options.accumulate)
    with run_folder.run_dir_for(run_dir):
        data = prepare_data(options, run_dir, written=lambda: from_main(world, options))
    options = options.for_data_modalities(data.modalities)
    config = _run_config(options, data, run_folder.stored_pruned(run_dir) if resume else {})
    run_folder.write_config(run_dir, config, resume)
    return options, data, config


def _run_config(options: TrainOptions, data: PreparedData, pruned: dict) -> dict:
    """config.json's content, the same in every process for the same options and data (and, resuming a pruned
    run, its stored structure)."""
    return run_folder.run_config(
        options, _model_config(options, data, pruned), data.labels, data.preprocessing.to_dict()
    )
