import numpy as np
import pytest

from polysense import InputError, TextPreprocessor, train_tokenizer
from polysense.preprocess.text import PAD_ID

TEXTS = ["a calm morning at the harbour", "the market was loud and busy", "quiet evening in the park"]


def test_truncation_padding_and_mask():
    pre = TextPreprocessor(train_tokenizer(TEXTS), max_length=4)
    ids, mask = pre.batch(["calm morning", "the market was loud and busy today"])
    assert ids.shape == (2, 4) and ids.dtype == np.int64
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])  # second text truncated to 4 tokens
    assert (ids[0, 2:] == PAD_ID).all()


def test_unknown_words_and_case():
    pre = TextPreprocessor(train_tokenizer(TEXTS))
    np.testing.assert_array_equal(pre("CALM Morning"), pre("calm morning"))
    assert pre("zzzz qqqq").size >= 1  # unknown words map to [UNK] / word pieces, never to nothing


def test_saved_tokenizer_gives_the_same_ids(tmp_path):
    tokenizer = train_tokenizer(TEXTS)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    a, b = TextPreprocessor(tokenizer), TextPreprocessor(tmp_path / "tokenizer.json")
    for text in TEXTS:
        np.testing.assert_array_equal(a(text), b(text))


def test_training_is_deterministic():
    assert train_tokenizer(TEXTS).to_str() == train_tokenizer(TEXTS).to_str()


@pytest.mark.parametrize("bad, message", [("", "empty"), ("   ", "empty"), (3, "must be a str")])
def test_bad_text(bad, message):
    with pytest.raises(InputError, match=message):
        TextPreprocessor(train_tokenizer(TEXTS))(bad)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid tokenizer"):
        TextPreprocessor(tmp_path / "t.json")
    with pytest.raises(InputError, match="not found"):
        TextPreprocessor(tmp_path / "missing.json")


def test_invalid_code_points_and_huge_texts_are_handled():
    from polysense.preprocess.text import CHARS_PER_TOKEN

    pre = TextPreprocessor(train_tokenizer(["a calm day", "a busy street"]), max_length=8)
    assert pre("a calm \ud800 day").size > 0  # a lone surrogate: replaced, not a TypeError from tokenizers
    huge = "a calm day " * 1_000_000  # 11 MB: cut before tokenizing, same tokens as its beginning
    np.testing.assert_array_equal(pre(huge), pre(huge[: 8 * CHARS_PER_TOKEN]))
    assert pre(huge).size == 8
