"""The `minilm-l6` text encoder family: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) with its pretrained weights.

Written here as plain modules (post-norm BERT layers, exact GELU, additive attention mask) so the ONNX export
keeps batch and sequence length dynamic and int8 can quantize its MatMuls; the weights are read from the
registry package's model.safetensors, every tensor used and none missing. The sentence embedding is the masked
mean of the last layer (how all-MiniLM-L6-v2 was trained), projected to the model's embed_dim. Its tokenizer is
the package's tokenizer.json (uncased WordPiece, [CLS] ... [SEP]), which training copies into the run and the
bundle instead of learning one, so the runtime's text path is unchanged. A pruned MiniLM (`polysense prune`,
polysense.models.pruning) keeps fewer heads (of HEAD_DIM each) and feed-forward units per layer, as its run's
config records; the hidden width stays 384.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from polysense.errors import ConfigError
from polysense.models.blocks import masked_mean
from polysense.models.encoders.pretrained import MINILM, load_body, read_safetensors
from polysense.models.registry import register_encoder

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS, VOCAB = 384, 6, 12, 1536, 512, 30522
HEAD_DIM = HIDDEN // HEADS  # 32: a pruned layer keeps fewer heads of the same width
_MASKED = -1e9  # added to the attention logits of padding keys


def _attention(qkv: torch.Tensor, padding: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """Multi-head self-attention from the packed query/key/value projection of x, `heads` heads of HEAD_DIM
    each ([B, L, 3 * heads * HEAD_DIM]) -> [B, L, heads * HEAD_DIM]."""
    batch = qkv.shape[0]

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, H * C] -> [B, H, L, C], length kept dynamic
        return t.reshape(batch, -1, heads, HEAD_DIM).transpose(1, 2)

    q, k, v = (split(t) for t in qkv.chunk(3, dim=-1))
    logits = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5 + padding[:, None, None, :] * _MASKED
    weights = torch.softmax(logits, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, -1, heads * HEAD_DIM)


class _OnnxruntimeAttention(torch.autograd.Function):
    """The same attention in torch; exported as onnxruntime's fused com.microsoft.Attention node."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, heads):  # noqa: ANN001 - autograd.Function's signature
        return _attention(nn.functional.linear(x, weight, bias), padding, heads)

    @staticmethod
    def symbolic(g, x, weight, bias, padding, heads):  # noqa: ANN001
        # Attention takes the packed weight as [in, 3 * out] and a raw [B, L] mask of 1 (kept) and 0 (padding).
        one = g.op("Constant", value_t=torch.tensor(1.0))
        keep = g.op("Cast", g.op("Sub", one, padding), to_i=6)  # 6: int32
        packed = g.op("Transpose", weight, perm_i=[1, 0])
        # The projection may be narrower than x (a pruned layer: heads * HEAD_DIM); Attention allows that.
        attended = g.op("com.microsoft::Attention", x, packed, bias, keep, num_heads_i=heads)
        if heads == HEADS:  # same shape and dtype as x; the exporter cannot infer a contrib op's
            attended.setType(x.type())
        else:
            attended.setType(x.type().with_sizes([None, None, heads * HEAD_DIM]))
        return attended


class BertSelfAttention(nn.Module):
    # Set by onnxruntime_attention() while export writes the graph int8 quantizes.
    fused_for_onnxruntime = False

    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(HIDDEN, heads * HEAD_DIM) for _ in range(3))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # One [384 -> 1152] product instead of three: fewer kernel calls, and int8 quantizes x once, not three
            # times. Concatenated at every call so the three pretrained layers (and checkpoints) keep their names;
            # the export folds the concatenation into one weight.
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            if self.fused_for_onnxruntime:
                return _OnnxruntimeAttention.apply(x, weight, bias, padding, self.heads)
            return _attention(nn.functional.linear(x, weight, bias), padding, self.heads)
        # In torch (training, the reference), the three layers' own calls: per-row gradient hooks (opacus, under
        # --dp-epsilon) see each of them. The same values, three products instead of one.
        qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        return _attention(qkv, padding, self.heads)

    def keep_heads(self, kept: list[int]) -> None:
        """Keep only the heads numbered `kept` (structured pruning: the projections lose their other rows)."""
        rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept])
        for name in ("query", "key", "value"):
            setattr(self, name, _rows(getattr(self, name), rows))
        self.heads = len(kept)


@contextmanager
def onnxruntime_attention() -> Iterator[None]:
    """While active, exporting MiniLM writes each layer's attention as one com.microsoft.Attention node, which
    onnxruntime's dynamic int8 turns into QAttention. Only the int8 variant is written so (its graph is
    onnxruntime-specific anyway); the fp32 and fp16 graphs stay standard ONNX. Measured on the pretrained
    tri-modal bundle's text encoder at batch 1, 2 threads (docs/export.md, "Precision variants")."""
    before, BertSelfAttention.fused_for_onnxruntime = BertSelfAttention.fused_for_onnxruntime, True
    try:
        yield
    finally:
        BertSelfAttention.fused_for_onnxruntime = before


class BertLayer(nn.Module):
    """Post-norm: x = norm(x + attention(x)); x = norm(x + feed_forward(x)), as BERT was trained. A pruned layer
    has fewer heads (of HEAD_DIM each) and fewer feed-forward units; its input and output stay HIDDEN wide."""

    def __init__(self, dropout: float, heads: int = HEADS, units: int = INTERMEDIATE) -> None:
        super().__init__()
        self.attention = BertSelfAttention(heads)
        self.attention_out = nn.Linear(heads * HEAD_DIM, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.intermediate = nn.Linear(HIDDEN, units)
        self.output = nn.Linear(units, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention_out(self.attention(x, padding))))
        hidden = nn.functional.gelu(self.intermediate(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output_norm(x + self.dropout(self.output(hidden)))

    def group_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order importance of each head and each feed-forward unit: |sum of weight x gradient| over the
        parameters that exist only for it (the head's query/key/value rows and attention_out columns; the
        unit's intermediate row and output column), with the gradients accumulated in .grad."""
        heads = self.attention.heads

        def taylor(parameter: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
            if parameter.grad is None:
                raise ConfigError("pruning needs the loss's gradients in .grad; none were accumulated")
            product = (parameter * parameter.grad).detach().movedim(dim, 0)
            return product.reshape(groups, -1).sum(dim=1)

        head = sum(
            taylor(getattr(self.attention, name).weight, 0, heads)
            + taylor(getattr(self.attention, name).bias, 0, heads)
            for name in ("query", "key", "value")
        ) + taylor(self.attention_out.weight, 1, heads)
        units = self.intermediate.out_features
        unit = taylor(self.intermediate.weight, 0, units) + taylor(self.intermediate.bias, 0, units)
        unit = unit + taylor(self.output.weight, 1, units)
        return head.abs(), unit.abs()

    def keep(self, heads: list[int], units: list[int]) -> None:
        """Keep only these heads and feed-forward units (sorted indices), slicing the weights in place."""
        self.attention.keep_heads(heads)
        columns = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])
        self.attention_out = _columns(self.attention_out, columns)
        self.intermediate = _rows(self.intermediate, torch.tensor(units))
        self.output = _columns(self.output, torch.tensor(units))


def _rows(layer: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A Linear with only these output rows of `layer`'s weight and bias."""
    sliced = nn.Linear(layer.in_features, len(rows))
    sliced.weight.data, sliced.bias.data = layer.weight.data[rows].clone(), layer.bias.data[rows].clone()
    return sliced


def _columns(layer: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    """A Linear that reads only these input columns of `layer` (its bias is unchanged)."""
    sliced = nn.Linear(len(columns), layer.out_features)
    sliced.weight.data, sliced.bias.data = layer.weight.data[:, columns].clone(), layer.bias.data.clone()
    return sliced


class MiniLM(nn.Module):
    """Token ids [B, L] and mask [B, L] -> sentence embedding [B, embed_dim]."""

    # The graph that dynamic int8 quantizes is exported with onnxruntime's fused attention.
    int8_export = staticmethod(onnxruntime_attention)
    # Parameters of the pretrained body, trained with a lower learning rate when fine-tuning.
    pretrained_prefixes = ("words", "positions", "token_types", "embedding_norm", "layers")

    def __init__(self, embed_dim: int = 128, dropout: float = 0.1, pruned: dict | None = None) -> None:
        """pruned: {"heads": [...], "ffn": [...]}, the heads and feed-forward units each layer keeps (a pruned
        run's config, polysense.models.pruning); None: all of them."""
        super().__init__()
        heads, units = _structure(pruned)
        self.embed_dim, self.vocab_size = embed_dim, VOCAB
        self.words = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.token_types = nn.Embedding(2, HIDDEN)
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(dropout, h, u) for h, u in zip(heads, units))
        self.project = nn.Linear(HIDDEN, embed_dim)

    def sentence_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The 384-wide mean-pooled last layer (all-MiniLM-L6-v2's own sentence embedding, unnormalised)."""
        # Every lookup one per row and token (positions and segment 0 expanded to the batch), so that each
        # embedding table gets per-row gradients under differential privacy (opacus); the values are the same.
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.words(ids) + self.positions(positions) + self.token_types(torch.zeros_like(ids))
        x = self.dropout(self.embedding_norm(x))
        padding = (mask == 0).to(x.dtype)
        for layer in self.layers:
            x = layer(x, padding)
        return masked_mean(x, mask)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.project(self.sentence_embedding(ids, mask))

    def load_pretrained(self, folder: Path) -> None:
        """Every tensor of the package's model.safetensors into this module (strict: none missing or left)."""
        weights = read_safetensors(folder / "model.safetensors")
        weights.pop("embeddings.position_ids", None)  # a constant arange, not a weight
        # BERT's pooler (a dense layer on [CLS]) is not part of the sentence embedding, which mean-pools.
        weights = {name: tensor for name, tensor in weights.items() if not name.startswith("pooler.")}
        load_body(self, {_our_name(name): tensor for name, tensor in weights.items()}, "MiniLM")

    def structure(self) -> dict:
        """What each layer keeps, as a pruned run's config records it (MiniLM(pruned=...) rebuilds it)."""
        return {
            "heads": [layer.attention.heads for layer in self.layers],
            "ffn": [layer.intermediate.out_features for layer in self.layers],
        }

    def prune(self, amount: float, heads: int | None = None, ffn: int | None = None) -> dict:
        """Remove, in every layer, the least important heads and feed-forward units (BertLayer.group_scores:
        first-order Taylor importance from the gradients in .grad): `amount` of each, or keep `heads` heads and
        `ffn` units per layer where given. Unit counts are rounded up to a multiple of 8 (SIMD widths).
        Returns the new structure."""
        for layer in self.layers:
            head_scores, unit_scores = layer.group_scores()
            keep_heads = heads or max(1, round(len(head_scores) * (1 - amount)))
            keep_units = ffn or min(
                len(unit_scores), max(8, math.ceil(len(unit_scores) * (1 - amount) / 8) * 8)
            )
            for count, size, what in (
                (keep_heads, len(head_scores), "heads"),
                (keep_units, len(unit_scores), "units"),
            ):
                if not 1 <= count <= size:
                    raise ConfigError(
                        f"a MiniLM layer has {size} {what}: keep between 1 and {size}, not {count}"
                    )
            layer.keep(_top(head_scores, keep_heads), _top(unit_scores, keep_units))
        return self.structure()

    @staticmethod
    def tokenizer_file() -> Path:
        """The pretrained tokenizer.json: training copies it instead of learning a vocabulary."""
        return MINILM.path() / "tokenizer.json"


_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": "words.weight",
    "embeddings.position_embeddings.weight": "positions.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.LayerNorm.weight": "embedding_norm.weight",
    "embeddings.LayerNorm.bias": "embedding_norm.bias",
}
_LAYER = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention_out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, in their original order."""
    return sorted(scores.topk(count).indices.tolist())


def _structure(pruned: dict | None) -> tuple[list[int], list[int]]:
    """Heads and feed-forward units per layer from a pruned run's record, checked."""
    if pruned is None:
        return [HEADS] * LAYERS, [INTERMEDIATE] * LAYERS
    heads, units = pruned.get("heads"), pruned.get("ffn")
    valid = (
        isinstance(heads, list)
        and isinstance(units, list)
        and len(heads) == len(units) == LAYERS
        and all(isinstance(h, int) and 1 <= h <= HEADS for h in heads)
        and all(isinstance(u, int) and 1 <= u <= INTERMEDIATE for u in units)
    )
    if not valid or set(pruned) != {"heads", "ffn"}:
        raise ConfigError(
            f"the run's pruned MiniLM structure {pruned!r} is not {LAYERS} layers' heads (1-{HEADS}) and ffn "
            f"units (1-{INTERMEDIATE}); the run folder is damaged: prune the unpruned run again"
        )
    return heads, units


def _our_name(name: str) -> str:
    """Hugging Face BERT parameter name -> this module's (encoder.layer.3.output.dense.bias -> layers.3.output.bias)."""
    if name in _EMBEDDINGS:
        return _EMBEDDINGS[name]
    _, _, index, rest = name.split(".", 3)
    module, parameter = rest.rsplit(".", 1)
    return f"layers.{index}.{_LAYER[module]}.{parameter}"


@register_encoder("text", "minilm-l6")
def minilm_l6(embed_dim: int = 128, pretrained: bool = True, pruned: dict | None = None) -> MiniLM:
    """pruned: the structure a pruned run keeps; its weights then come from the run, not the package."""
    model = MiniLM(embed_dim, pruned=pruned)
    if pretrained and pruned is None:
        model.load_pretrained(MINILM.path())
    return model


minilm_l6.tokenizer_file = MiniLM.tokenizer_file
# A pretrained BERT fine-tunes in a few epochs at a small learning rate (the new layers keep --lr).
minilm_l6.defaults = {"epochs": 3, "pretrained_lr": 5e-5}
minilm_l6.prunable = True  # heads and feed-forward units (MiniLM.prune, polysense prune)
