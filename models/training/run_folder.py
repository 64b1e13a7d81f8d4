"""The run folder: every file a training run writes, and reading a finished run back.

    config.json            options, model config, labels, preprocessing (written before the first epoch)
    manifest.csv           the manifest as used, split column filled (written by data preparation)
    tokenizer.json         when the model reads text (written by data preparation)
    checkpoints/epoch_NNN.pt (one per epoch, the newest KEEP_CHECKPOINTS kept), checkpoints/best.pt
    model.pt, metrics.json written last: a run without metrics.json did not finish

All files are written to a temporary name and renamed, so an interrupted run never leaves a file that looks
complete but is not. Everything saved is plain data (tensors, numbers, strings, lists, dicts), loadable with
torch.load(weights_only=True): nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from polysense.errors import ConfigError
from polysense.models.model import ModelConfig, MultimodalClassifier
from polysense.models.training.options import TrainOptions
from polysense.models.training.train_state import TrainState

CHECKPOINT_FORMAT = 1
# Newest epoch checkpoints kept; older ones are deleted once a newer one is safely written.
KEEP_CHECKPOINTS = 2
CONFIG_FILE = "config.json"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
BEST_FILE = "best.pt"  # inside CHECKPOINT_DIR: the weights of the best monitored epoch so far
# Leftovers of a preparation that failed (bad manifest, say) that a fresh start may reuse.
# The tokenizer is written before the rows are decoded; it is rebuilt identically from the same texts.
_REUSABLE_LEFTOVERS = {"builtin_data", CHECKPOINT_DIR, "tokenizer.json"}
# Options a resumed run may change: how long to train, where, how to show it, and how to split each batch
# into micro-batches (the batch itself stays). The rest are the stored ones.
RESUME_MAY_CHANGE = ("epochs", "patience", "progress", "device", "accumulate")
# What a run stored before these options existed did, for resuming it as it was trained.
OPTIONS_BEFORE_THEY_EXISTED = {"augment": False, "audio_norm_frames": 0, "keep": "best", "solo_epochs": 0}


@dataclass(frozen=True)
class Checkpoint:
    """What the end of an epoch saves: enough to continue exactly where the run stopped."""

    model: dict  # the classifier's state dict
    heads: dict  # state dict of the per-modality linear heads (staged pre-training, auxiliary losses)
    optimizer: dict  # AdamW's state dict, reused when resuming inside the same phase
    scheduler: dict  # the learning-rate schedule's state dict, likewise
    state: TrainState  # epoch, best model, early stopping, history
    privacy: dict | None = None  # --dp-epsilon: the accountant's history (privacy.Accountant.to_dict)

    def to_dict(self) -> dict:
        values = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model,
            "heads": self.heads,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "state": self.state.to_dict(),
        }
        return values if self.privacy is None else {**values, "privacy": self.privacy}

    @classmethod
    def from_dict(cls, values: dict, path: Path) -> Checkpoint:
        if values.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{path} is checkpoint format {values.get('format')!r}, this version reads "
                f"{CHECKPOINT_FORMAT}; resume with the polysense version that wrote it, or start a new --out"
            )
        parts = {k: values[k] for k in ("model", "heads", "optimizer", "scheduler")}
        return cls(**parts, state=TrainState.from_dict(values["state"]), privacy=values.get("privacy"))


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("epoch_*.pt"))
    return found[-1] if found else None


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run or anything else a new run could be confused with."""
    if not run_dir.exists():
        return
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out"
        )
    checkpoints = run_dir / CHECKPOINT_DIR
    unknown = [p.name for p in run_dir.iterdir() if p.name not in _REUSABLE_LEFTOVERS]
    if unknown or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        raise ConfigError(
            f"{run_dir} already exists and is not empty ({', '.join(unknown) or CHECKPOINT_DIR}); "
            "choose a new --out, or remove the folder"
        )


def resumed_options(
    options: TrainOptions, run_dir: Path, changed: Collection[str] = RESUME_MAY_CHANGE
) -> TrainOptions:
    """The options stored in the run, with those of RESUME_MAY_CHANGE that are in `changed` taken from `options`
    (the CLI names the flags actually given, so an absent --epochs keeps the stored count).

    A finished run (metrics.json written) is extended only when `changed` asks for more epochs than it has.
    """
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run (no {CONFIG_FILE}); start without --resume")
    stored_values = json.loads(config_path.read_text())["options"]
    # Runs made before an option existed trained without it: their value is "off", not today's default.
    stored = TrainOptions.from_dict({**OPTIONS_BEFORE_THEY_EXISTED, **stored_values})
    changes = {name: getattr(options, name) for name in RESUME_MAY_CHANGE if name in changed}
    resumed = TrainOptions.from_dict({**stored.to_dict(), **changes})
    if stored.dp_epsilon and resumed.epochs != stored.epochs:
        raise ConfigError(
            f"--resume: {run_dir} trains with --dp-epsilon {stored.dp_epsilon}, its noise set to spend that over "
            f"its {stored.epochs} epochs; other --epochs would spend another epsilon: resume without --epochs, "
            "or start a new --out with the epochs and --dp-epsilon you want"
        )
    if (run_dir / METRICS_FILE).is_file() and resumed.epochs <= stored.epochs:
        raise ConfigError(
            f"--resume: {run_dir} already finished its {stored.epochs} epochs"
            + (f" (after {stored.solo_epochs} solo epochs)" if stored.solo_epochs else "")
            + "; to train it further pass "
            f"--epochs with more than {stored.epochs} (it continues from its last checkpoint)"
        )
    return resumed


@contextlib.contextmanager
def run_dir_for(run_dir: Path) -> Iterator[None]:
    """The run folder, made for what runs inside (preparing the data); should that fail, a folder made here
    that is still empty goes again, so a mistake leaves nothing that looks like a run. checkpoints/ is made
    only once it succeeded."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if made and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)


def run_config(
    options: TrainOptions, model_config: ModelConfig, labels: list[str], preprocessing: dict
) -> dict:
    """What config.json holds, and model.pt beside the weights: all a runtime or an export needs."""
    return {
        "options": options.to_dict(),
        "model": model_config.to_dict(),
        "labels": labels,
        "preprocessing": preprocessing,
    }


def stored_pruned(run_dir: Path) -> dict:
    """The pruned structure stored in a run's config.json ({} for an unpruned run or one made before pruning):
    no option says it, so a resumed pruned run keeps it from here."""
    stored = json.loads((run_dir / CONFIG_FILE).read_text())
    return dict(stored["model"].get("pruned", {}))


def write_config(run_dir: Path, config: dict, resume: bool) -> None:
    """Write config.json; when resuming, first check the data still gives the stored model and labels."""
    config_path = run_dir / CONFIG_FILE
    if resume:
        stored = json.loads(config_path.read_text())
        stored_model = ModelConfig.from_dict(stored["model"]).to_dict()  # older runs: older key names
        if stored["labels"] != config["labels"] or stored_model != config["model"]:
            raise ConfigError(f"--resume: the data no longer gives the model stored in {config_path}")
    atomic_write_json(config, config_path)


def load_latest_checkpoint(run_dir: Path, device: torch.device) -> Checkpoint | None:
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    return Checkpoint.from_dict(torch.load(path, map_location=device, weights_only=True), path)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the epoch's checkpoint, then delete all but the newest KEEP_CHECKPOINTS."""
    folder = run_dir / CHECKPOINT_DIR
    atomic_save(checkpoint.to_dict(), folder / f"epoch_{checkpoint.state.epoch:03d}.pt")
    for stale in sorted(folder.glob("epoch_*.pt"))[:-KEEP_CHECKPOINTS]:
        stale.unlink()


def save_best(run_dir: Path, model: MultimodalClassifier) -> None:
    atomic_save(model.state_dict(), run_dir / CHECKPOINT_DIR / BEST_FILE)


def load_best(run_dir: Path, model: MultimodalClassifier, device: torch.device) -> None:
    """Load the best epoch's weights into `model`, if a monitored epoch saved any."""
    path = run_dir / CHECKPOINT_DIR / BEST_FILE
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def write_result(run_dir: Path, config: dict, model: MultimodalClassifier, metrics: dict) -> None:
    """model.pt (config + weights), then metrics.json: its presence marks the run finished."""
    saved = {"format": CHECKPOINT_FORMAT, "config": config, "model": model.cpu().state_dict()}
    atomic_save(saved, run_dir / MODEL_FILE)
    atomic_write_json(metrics, run_dir / METRICS_FILE)


def load_trained(run_dir: str | os.PathLike) -> tuple[MultimodalClassifier, dict]:
    """The best model of a finished run (in eval mode) and its config (options, model, labels,
    preprocessing)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} holds no finished run (no {MODEL_FILE}); train it, or finish it with --resume"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = MultimodalClassifier(ModelConfig.from_dict(saved["config"]["model"]), load_pretrained=False)
    model.load_state_dict(saved["model"])
    return model.eval(), saved["config"]
