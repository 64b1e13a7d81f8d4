"""Text preprocessing with a Hugging Face `tokenizers` tokenizer trained on the training texts.

Texts longer than `max_length` tokens are truncated (the first `max_length` tokens are kept); batches are
padded with PAD_ID to their longest member, and the attention mask marks real tokens with 1.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from polysense.errors import InputError
from polysense.optional import require

if TYPE_CHECKING:  # the text modality's package, imported when a text is first tokenized
    from tokenizers import Tokenizer

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID = 0  # PAD_TOKEN is the first special token, so it gets id 0
MAX_LENGTH = 64  # tokens kept per text by default
VOCAB_SIZE = 4000  # upper bound; a small corpus yields fewer
# Characters kept per token of max_length before tokenizing: a word-piece token covers at most 100 characters
# (longer words become one [UNK]); only text that is mostly whitespace could need more.
CHARS_PER_TOKEN = 100
# A run of Unicode White_Space, what the pre-tokenizers split words on and drop (Python's \s would also match
# \x1c-\x1f, which they keep as punctuation).
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile(f"[^{_WHITESPACE}]+")


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A lower-casing WordPiece tokenizer whose vocabulary is learned from `texts`, deterministically.

    The vocabulary is the special tokens, every character seen (alone and as a "##" continuation, so an
    unseen word still splits into known pieces instead of becoming [UNK]) and then the most frequent words,
    ties broken alphabetically. (The `tokenizers` trainers iterate hash maps, so the same texts can give
    different ids from one process to the next; a seeded training run must not.)
    """
    tokenizers = require("tokenizers")
    normalizers, pre_tokenizers = tokenizers.normalizers, tokenizers.pre_tokenizers
    normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    characters = sorted({c for word in counts for c in word})
    vocab = [PAD_TOKEN, UNK_TOKEN, *characters, *(f"##{c}" for c in characters)]
    known = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=UNK_TOKEN)
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    return tokenizer


def tokenizer_from_bytes(data: bytes, source: str) -> Tokenizer:
    """A tokenizer from the bytes of a tokenizer.json (as read, and verified, from a bundle)."""
    tokenizer_class = require("tokenizers").Tokenizer
    try:
        return tokenizer_class.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
        raise InputError(f"{source}: not a valid tokenizer.json ({str(error)[:200]})") from error


class TextPreprocessor:
    """Text -> token ids (truncated to `max_length`); batches -> padded ids and attention mask."""

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike[str], max_length: int = MAX_LENGTH) -> None:
        if max_length < 1:
            raise InputError(f"max_length must be at least 1, got {max_length}")
        tokenizer_class: type[Tokenizer] = require("tokenizers").Tokenizer
        if not isinstance(tokenizer, tokenizer_class):
            path = Path(tokenizer)
            if not path.is_file():
                raise InputError(f"tokenizer file not found: {path}")
            tokenizer = tokenizer_from_bytes(path.read_bytes(), str(path))
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)

    def __call__(self, text: str) -> np.ndarray:
        """Token ids [n] int64 with 1 <= n <= max_length."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        for text in texts:
            if not isinstance(text, str):
                raise InputError(f"text must be a str, got {type(text).__name__}")
            if not text.strip():
                raise InputError("text is empty; pass some words, or leave the text modality out")
        encodings = self.tokenizer.encode_batch([self._clean(text) for text in texts])
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        for text, row in zip(texts, ids):
            if row.size == 0:
                raise InputError(f"text {text[:40]!r} has no tokens after normalisation; pass some words")
        return ids

    def _clean(self, text: str) -> str:
        """The first CHARS_PER_TOKEN characters per kept token, whitespace not counted, before tokenizing (10 MB of
        text would otherwise cost seconds and gigabytes for max_length tokens), and code points that are not valid
        Unicode text (lone surrogates) replaced with "?", which the tokenizer would otherwise reject.

        Words are joined by one space: the pre-tokenizers drop whitespace, so the tokens are the same, while 6,500
        spaces before a sentence no longer use up the characters kept (they left no token at all)."""
        budget = self.max_length * CHARS_PER_TOKEN
        words: list[str] = []
        for match in _WORD.finditer(text):  # lazily: stops at the budget, however long the text
            words.append(match.group()[:budget])
            budget -= len(words[-1])
            if budget <= 0:
                break
        return " ".join(words).encode("utf-8", errors="replace").decode("utf-8")

    def batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids [B, L] int64 and attention mask [B, L] int64, L the longest text (<= max_length)."""
        return pad_token_ids(self.encode_many(texts))

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(str(path))


def pad_token_ids(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id rows with PAD_ID to the longest; mask is 1 on real tokens."""
    length = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
