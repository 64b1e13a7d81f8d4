"""Differential privacy in training (`--dp-epsilon`): DP-SGD as opacus implements it.

Each step takes a Poisson sample of the training rows (every row in independently with probability q = 1 /
steps per epoch), computes every row's own gradient (opacus's GradSampleModule hooks), clips each to
`--dp-max-grad-norm`, sums them, adds Gaussian noise of standard deviation noise_multiplier x max_grad_norm and
divides by the expected batch size; AdamW then takes that gradient. The noise multiplier is the smallest that
keeps the privacy spent after every planned step within (`--dp-epsilon`, `--dp-delta`), as opacus's
`make_private_with_epsilon` chooses it (`get_noise_multiplier`); the accountant (opacus's PRV or RDP) adds each
step as it is taken, and each epoch's record carries the epsilon spent so far.

Opacus's PrivacyEngine wants a DataLoader; polysense's loop draws its own batches (per-sample generators,
modality dropout, one process repeating many), so this module uses the engine's parts directly: the same
noise calibration, the same Poisson sampling, GradSampleModule, DPOptimizer and the accountant's optimizer hook.
The batches and the noise are drawn from a secret generator (PrivateTraining), not from --seed.

What a row's gradient must be for the clipping to bound its influence: the losses divide by counts over the
whole batch (losses.BatchShare), which would let one row rescale the others' gradients; under DP every term is
divided by the batch's rows instead (PerSampleShare), so the loss is the mean of per-row losses.

Families are supported as they are (layers opacus has per-sample gradients for: Linear, Conv, Embedding,
LayerNorm, GroupNorm; torch's GRU trains as opacus's DPGRU, whose weights have the same names), fixed
(BatchNorm, which mixes the rows of a batch, becomes GroupNorm: ModelConfig.group_norm, so export builds the
same network) or refused with the alternative (`family_problems`).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polysense.errors import ConfigError, DependencyError
from polysense.models.training.losses import BatchShare

if TYPE_CHECKING:
    from polysense.models.training.options import TrainOptions

ACCOUNTANTS = ("prv", "rdp")
DEFAULT_DELTA = 1e-5  # or 1 / (10 x training rows) when that is smaller (a delta well below 1 / rows)
EPSILON_TOLERANCE = 0.01  # how far below the target the noise calibration may land (opacus's default)

# Families refused under DP, per modality: why, and what to train instead.
_REFUSED = {
    ("image", "efficientnet-lite0"): (
        "its pretrained weights were trained with BatchNorm, which mixes the rows of a batch and has no "
        "per-sample gradient; replacing it discards what the weights learned; use --image-encoder cnn "
        "(its BatchNorm becomes GroupNorm under DP)"
    ),
    ("audio", "efficientnet-lite0"): (
        "its pretrained weights were trained with BatchNorm, which mixes the rows of a batch; use "
        "--audio-encoder causal or causal-shape"
    ),
    ("audio", "speech-embedding"): (
        "its training set holds every recording three times (at 0.9x, 1x and 1.1x speed), so one recording "
        "would count as three rows of the privacy accounting; use --audio-encoder causal or causal-shape"
    ),
    ("text", "gru"): (
        "its vocabulary is learned from the training texts and ships in the run and the bundle (every word of "
        "every training row, which differential privacy does not cover); use --text-encoder minilm-l6 (a fixed "
        "pretrained vocabulary) or onnx:PATH with its own tokenizer.json, or leave text out with --modalities"
    ),
}
_REFUSED[("text", "transformer")] = _REFUSED[("text", "gru")]


def family_problems(options: TrainOptions, modalities: Iterable[str]) -> list[str]:
    """Why the families of `modalities` cannot train under --dp-epsilon (none when DP is off). Checked by data
    preparation once the data has decided the modalities, before the tokenizer learns a word."""
    if not options.dp_epsilon:
        return []
    families = {m: options.encoder(m) for m in modalities}
    return [
        f"--{m}-encoder {family} cannot train under --dp-epsilon: {_REFUSED[(m, family)]}"
        for m, family in families.items()
        if (m, family) in _REFUSED
    ]


# Warnings that say nothing to a user of DP here: torch's, when opacus's backward hooks sit on a first layer
# (whose input needs no gradient), and the RDP analysis's, when the PRV accountant bounds its domain with it.
_QUIET = (
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    "Optimal order is the largest alpha",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _opacus() -> Any:
    try:
        import opacus
    except ImportError as error:
        raise DependencyError(f"--dp-epsilon needs opacus ({error}): pip install 'polysense[dp]'") from error
    return opacus


@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanism of a DP run, settled before its first step: recorded in metrics.json and the bundle."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str  # prv | rdp
    train_rows: int
    sample_rate: float  # q: each row's chance to be in a step's batch
    steps_per_epoch: int
    epochs: int  # every epoch of every phase: the noise is set for all of them
    noise_multiplier: float  # noise std / max_grad_norm

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.train_rows * self.sample_rate))

    def to_dict(self) -> dict:
        return asdict(self)


def plan_privacy(options: TrainOptions, train_rows: int, epochs: int) -> PrivacyPlan:
    """The noise that spends at most --dp-epsilon over `epochs` epochs of `train_rows` rows (opacus's
    calibration, as make_private_with_epsilon does it: a step per batch_size rows, q = 1 / steps)."""
    get_noise_multiplier = _opacus().accountants.utils.get_noise_multiplier
    steps = math.ceil(train_rows / options.batch_size)
    delta = options.dp_delta if options.dp_delta is not None else default_delta(train_rows)
    sample_rate = 1 / steps
    with quiet():
        noise = get_noise_multiplier(
            target_epsilon=options.dp_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps * epochs,
            accountant=options.dp_accountant,
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
    return PrivacyPlan(
        options.dp_epsilon,
        delta,
        options.dp_max_grad_norm,
        options.dp_accountant,
        train_rows,
        sample_rate,
        steps,
        epochs,
        float(noise),
    )


def default_delta(train_rows: int) -> float:
    return min(DEFAULT_DELTA, 1 / (10 * train_rows))


class Accountant:
    """The privacy spent so far: opacus's accountant, its history (steps at each noise and rate) as plain
    lists for the checkpoint, so a resumed run goes on counting from where it stopped."""

    def __init__(self, plan: PrivacyPlan, history: list | None = None) -> None:
        self.plan = plan
        self._accountant = _opacus().accountants.create_accountant(plan.accountant)
        self._accountant.history = [tuple(entry) for entry in history or []]

    @property
    def steps(self) -> int:
        return sum(int(entry[2]) for entry in self._accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta (0 before the first step)."""
        if not self._accountant.history:
            return 0.0
        with quiet():
            return float(self._accountant.get_epsilon(delta=self.plan.delta))

    def attach(self, optimizer: Any) -> None:
        """Count every step the DPOptimizer takes (opacus's own hook)."""
        optimizer.attach_step_hook(self._accountant.get_optimizer_hook_fn(sample_rate=self.plan.sample_rate))

    def to_dict(self) -> dict:
        return {"history": [list(entry) for entry in self._accountant.history]}

    def spent(self) -> dict:
        """What metrics.json and the bundle record."""
        return {"epsilon": self.epsilon(), "steps": self.steps, **self.plan.to_dict()}


@dataclass(frozen=True)
class PerSampleShare(BatchShare):
    """Every loss term divided by the batch's rows, whatever the modality counts, and every encoder run on every
    batch (the rows without its modality masked out): the loss is then a mean of per-row losses, so clipping a
    row's gradient bounds all it changes. With counts, or with encoders run only where some row has their
    modality (the auxiliary losses are averaged over the encoders run), one row could rescale the others'
    gradients."""

    def has(self, index: int) -> bool:
        return True

    def mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        return total / max(self.rows, 1)


def poisson_batches(rows: int, plan: PrivacyPlan, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches: steps_per_epoch Poisson samples of the rows (each row in each with probability
    sample_rate)."""
    draws = torch.rand((plan.steps_per_epoch, rows), generator=generator)
    return [torch.nonzero(step < plan.sample_rate).flatten().tolist() for step in draws]


def private_layers(model: nn.Module) -> None:
    """Replace, in place, every torch GRU by opacus's DPGRU with the same weights (its state dict has the GRU's
    names, so checkpoints and export see a torch GRU's weights), and turn in-place activations off. BatchNorm
    is already GroupNorm (ModelConfig.group_norm)."""
    dp_gru = _opacus().layers.DPGRU
    for module in model.modules():  # an in-place activation would overwrite what opacus's hooks saw
        if getattr(module, "inplace", False):
            module.inplace = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GRU:
                if child.num_layers != 1 or child.bidirectional:
                    raise ConfigError(f"{name}: only single-layer, one-way GRUs are replaced for DP")
                replacement = dp_gru(
                    child.input_size, child.hidden_size, bias=child.bias, batch_first=child.batch_first
                )
                replacement.load_state_dict(child.state_dict())
                replacement._state_dict_hooks.clear()  # opacus's filter, which _torch_gru_names replaces
                replacement._register_state_dict_hook(_torch_gru_names)
                replacement._register_load_state_dict_pre_hook(_internal_gru_names, with_module=True)
                setattr(parent, name, replacement.to(next(child.parameters()).device))


def _torch_gru_names(module: nn.Module, state: dict, prefix: str, _metadata: Any) -> dict:
    """A DPGRU's state dict with only torch GRU's names, removed from the very dict its parent saves into.
    Opacus's own filter (1.6) compares its internal names (`l0.ih.weight`) with keys that carry the module's
    prefix, and returns a new dict that a parent module never sees: inside a model the internal names stayed,
    and the state dict would not load into the torch GRU that export builds."""
    for internal in getattr(module, "old_to_new", {}):
        state.pop(prefix + internal, None)
    return state


def _internal_gru_names(module: nn.Module, state: dict, prefix: str, *_: Any) -> None:
    """Loading torch GRU names into a DPGRU inside a model: its internal names too (the same tensors), which
    opacus's own load_state_dict adds only when called on the DPGRU itself, not through a parent."""
    for internal, name in getattr(module, "old_to_new", {}).items():
        if prefix + name in state:
            state[prefix + internal] = state[prefix + name]


class PrivateTraining:
    """What a phase of a DP run trains with: the objective under opacus's per-sample hooks and the optimizer
    that clips, adds noise and counts each step."""

    def __init__(self, plan: PrivacyPlan, accountant: Accountant) -> None:
        self.plan, self.accountant = plan, accountant
        # The batches and the noise come from a generator seeded from the OS's entropy, not from --seed: an
        # adversary who knows the seed (config.json has it) could repeat a seeded draw, subtract the noise and
        # know which rows each step used, and the guarantee would be gone. So a DP run is not repeatable bit
        # for bit (the accounting is). Not a cryptographic generator: opacus's secure_mode needs torchcsprng.
        self._secret = torch.Generator().manual_seed(secrets.randbits(63))

    def engine(self, objective: nn.Module) -> nn.Module:
        """The objective with per-sample gradients; `close(engine)` removes the hooks at the phase's end."""
        return _opacus().GradSampleModule(objective, batch_first=True, loss_reduction="mean", strict=True)

    @staticmethod
    def close(engine: nn.Module) -> None:
        engine._close()

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`optimizer` wrapped: per-sample clipping, noise, the mean over the expected batch, and accounting."""
        private = _opacus().optimizers.DPOptimizer(
            optimizer,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm,
            expected_batch_size=self.plan.expected_batch_size,
            loss_reduction="mean",
            generator=self._noise_generator(optimizer),
        )
        self.accountant.attach(private)
        return private

    def _noise_generator(self, optimizer: torch.optim.Optimizer) -> torch.Generator:
        """The secret generator, or one seeded from it on the parameters' device (CUDA noise)."""
        device = optimizer.param_groups[0]["params"][0].device
        if device.type == "cpu":
            return self._secret
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(1 << 62, (), generator=self._secret)))
        return generator

    def batches(self, rows: int) -> list[list[int]]:
        """One epoch's Poisson batches, drawn from the secret generator."""
        return poisson_batches(rows, self.plan, self._secret)

    @staticmethod
    def fill_unused(optimizer: torch.optim.Optimizer, rows: int) -> None:
        """Trainable parameters the step left without per-sample gradients (a modality no row of a Poisson
        batch has, an empty batch) get zeros for every row: the step still adds its noise to them, as the
        accounting assumes, instead of skipping a step whose skipping would depend on the data."""
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.requires_grad and getattr(parameter, "grad_sample", None) is None:
                    if parameter.grad is not None and parameter.grad.any():
                        # Used, yet no per-row gradient: a layer whose weight a function reads directly,
                        # bypassing the module call opacus hooks. Zeros would train it on noise alone.
                        raise RuntimeError(
                            f"a parameter of shape {tuple(parameter.shape)} got a gradient but no per-row "
                            "gradients: its layer is used outside its module call, which DP cannot clip"
                        )
                    parameter.grad_sample = parameter.new_zeros((rows, *parameter.shape))
