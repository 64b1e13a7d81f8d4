"""The `minilm-l6` text encoder family: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) with its pretrained weights.

Written here as plain modules (post-norm BERT layers, exact GELU, additive attention mask) so the ONNX export
keeps batch and sequence length dynamic and int8 can quantize its MatMuls; the weights are read from the
registry package's model.safetensors, every tensor used and none missing. The sentence embedding is the masked
mean of the last layer (how all-MiniLM-L6-v2 was trained), projected to the model's embed_dim. Its tokenizer is
the package's tokenizer.json (uncased WordPiece, [CLS] ... [SEP]), which training copies into the run and the
bundle instead of learning one, so the runtime's text path is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from polysense.models.blocks import masked_mean
from polysense.models.encoders.pretrained import MINILM, load_body, read_safetensors
from polysense.models.registry import register_encoder

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS, VOCAB = 384, 6, 12, 1536, 512, 30522
_MASKED = -1e9  # added to the attention logits of padding keys


def _attention(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: torch.Tensor
) -> torch.Tensor:
    """Multi-head self-attention of x [B, L, HIDDEN] given the packed query/key/value projection."""
    batch, head_dim = x.shape[0], HIDDEN // HEADS

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, H, L, C / H], length kept dynamic
        return t.reshape(batch, -1, HEADS, head_dim).transpose(1, 2)

    q, k, v = (heads(t) for t in nn.functional.linear(x, weight, bias).chunk(3, dim=-1))
    logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + padding[:, None, None, :] * _MASKED
    weights = torch.softmax(logits, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, -1, HIDDEN)


class _OnnxruntimeAttention(torch.autograd.Function):
    """The same attention in torch; exported as onnxruntime's fused com.microsoft.Attention node."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # noqa: ANN001 - autograd.Function's signature
        return _attention(x, weight, bias, padding)

    @staticmethod
    def symbolic(g, x, weight, bias, padding):  # noqa: ANN001
        # Attention takes the packed weight as [in, 3 * out] and a raw [B, L] mask of 1 (kept) and 0 (padding).
        one = g.op("Constant", value_t=torch.tensor(1.0))
        keep = g.op("Cast", g.op("Sub", one, padding), to_i=6)  # 6: int32
        packed = g.op("Transpose", weight, perm_i=[1, 0])
        attended = g.op("com.microsoft::Attention", x, packed, bias, keep, num_heads_i=HEADS)
        attended.setType(x.type())  # same shape and dtype as x; the exporter cannot infer a contrib op's
        return attended


class BertSelfAttention(nn.Module):
    # Set by onnxruntime_attention() while export writes the graph int8 quantizes.
    fused_for_onnxruntime = False

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        # One [384 -> 1152] product instead of three: fewer kernel calls, and int8 quantizes x once, not three times.
        # Concatenated at every call so the three pretrained layers (and checkpoints) keep their names; the export
        # folds the concatenation into one weight.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        if self.fused_for_onnxruntime and torch.onnx.is_in_onnx_export():
            return _OnnxruntimeAttention.apply(x, weight, bias, padding)
        return _attention(x, weight, bias, padding)


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
    """Post-norm: x = norm(x + attention(x)); x = norm(x + feed_forward(x)), as BERT was trained."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attention = BertSelfAttention()
        self.attention_out = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.intermediate = nn.Linear(HIDDEN, INTERMEDIATE)
        self.output = nn.Linear(INTERMEDIATE, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention_out(self.attention(x, padding))))
        hidden = nn.functional.gelu(self.intermediate(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output_norm(x + self.dropout(self.output(hidden)))


class MiniLM(nn.Module):
    """Token ids [B, L] and mask [B, L] -> sentence embedding [B, embed_dim]."""

    # The graph that dynamic int8 quantizes is exported with onnxruntime's fused attention.
    int8_export = staticmethod(onnxruntime_attention)
    # Parameters of the pretrained body, trained with a lower learning rate when fine-tuning.
    pretrained_prefixes = ("words", "positions", "token_types", "embedding_norm", "layers")

    def __init__(self, embed_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size = embed_dim, VOCAB
        self.words = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.token_types = nn.Embedding(2, HIDDEN)
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(dropout) for _ in range(LAYERS))
        self.project = nn.Linear(HIDDEN, embed_dim)

    def sentence_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The 384-wide mean-pooled last layer (all-MiniLM-L6-v2's own sentence embedding, unnormalised)."""
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.words(ids) + self.positions(positions) + self.token_types.weight[0]
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


def _our_name(name: str) -> str:
    """Hugging Face BERT parameter name -> this module's (encoder.layer.3.output.dense.bias -> layers.3.output.bias)."""
    if name in _EMBEDDINGS:
        return _EMBEDDINGS[name]
    _, _, index, rest = name.split(".", 3)
    module, parameter = rest.rsplit(".", 1)
    return f"layers.{index}.{_LAYER[module]}.{parameter}"


@register_encoder("text", "minilm-l6")
def minilm_l6(embed_dim: int = 128, pretrained: bool = True) -> MiniLM:
    model = MiniLM(embed_dim)
    if pretrained:
        model.load_pretrained(MINILM.path())
    return model


minilm_l6.tokenizer_file = MiniLM.tokenizer_file
# A pretrained BERT fine-tunes in a few epochs at a small learning rate (the new layers keep --lr).
minilm_l6.defaults = {"epochs": 3, "pretrained_lr": 5e-5}
