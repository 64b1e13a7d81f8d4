import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polysense.modalities import SPECS  # noqa: E402
from polysense.models import ENCODERS, create_encoder  # noqa: E402
from polysense.models.flops import count_macs  # noqa: E402
from polysense.preprocess.text import PAD_ID  # noqa: E402

pytestmark = pytest.mark.slow  # torch

EMBED = 32
VOCAB = 50
N_MELS = 40


def _make(modality, name, **extra):
    torch.manual_seed(0)  # every family is offered every option and takes those it names
    options = {"embed_dim": EMBED, "vocab_size": VOCAB, "n_mels": N_MELS, **extra}
    return create_encoder(modality, name, **options).eval()


# Every streaming audio family: the causal encoder without and with its running normalisation (which adds a
# state tensor), the same on spectral shape (causal-shape: a per-frame reduction inside the graph), and the
# windowed EfficientNet-Lite0 (random weights: streaming is about the graph, not them).
AUDIO_VARIANTS = {
    "causal": {"audio_norm_frames": 0},
    "causal-norm20": {"audio_norm_frames": 20},
    "causal-shape-norm20": {"audio_norm_frames": 20},
    "efficientnet-lite0": {"pretrained": False},
    "speech-embedding": {},  # its frames are the frozen front end's window vectors (96 values each)
}
AUDIO = pytest.mark.parametrize("variant", sorted(AUDIO_VARIANTS))


def _audio(variant):
    return _make("audio", variant.split("-norm")[0], **AUDIO_VARIANTS[variant])


def test_every_audio_family_is_checked_for_streaming():
    assert set(ENCODERS["audio"]) == {v.split("-norm")[0] for v in AUDIO_VARIANTS}


def _text_batch(lengths, max_length=None):
    max_length = max_length or max(lengths)
    ids = torch.full((len(lengths), max_length), PAD_ID)
    mask = torch.zeros(len(lengths), max_length, dtype=torch.long)
    generator = torch.Generator().manual_seed(1)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(2, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


ALL = [(m, n) for m, names in ENCODERS.items() for n in names]


# One random preprocessed input per modality, as the runtime's preprocessors make them.
_FEATURES = {
    "image": lambda rng, i: rng.standard_normal((3, 64, 64)).astype(np.float32),
    "text": lambda rng, i: rng.integers(2, 50, 3 + 2 * i).astype(np.int64),
    "audio": lambda rng, i, n_mels=N_MELS: rng.standard_normal((23 + i, n_mels)).astype(np.float32),
}


@pytest.mark.parametrize("modality, name", ALL)
@pytest.mark.parametrize("batch", [1, 3])
def test_embedding_shapes(modality, name, batch):
    """Every family takes its modality's collated training batch (SPECS[m].batch_keys) and embeds it."""
    encoder = _make(modality, name)
    rng = np.random.default_rng(batch)
    width = {"n_mels": encoder.n_mels} if modality == "audio" else {}  # values per audio frame
    rows = [_FEATURES[modality](rng, i, **width) for i in range(batch)]
    inputs = [torch.from_numpy(a) for a in SPECS[modality].codec.collate(rows)]
    assert len(inputs) == len(SPECS[modality].batch_keys)
    with torch.no_grad():
        out = encoder(*inputs)
    assert out.shape == (batch, EMBED) and torch.isfinite(out).all()
    assert encoder.embed_dim == EMBED


@pytest.mark.parametrize("batch", [1, 3])
@AUDIO
def test_audio_step_state_has_the_declared_layout(batch, variant):
    encoder = _audio(variant)
    with torch.no_grad():
        _, state = encoder.step(torch.randn(batch, 23, encoder.n_mels))
    layout = encoder.state_layout()
    assert len(state) == len(layout)
    for (name, (shape, axis)), tensor in zip(layout.items(), state):
        assert shape[axis] == 1, name
        assert tensor.shape == shape[:axis] + (batch,) + shape[axis + 1 :], name


@pytest.mark.parametrize("name", sorted(ENCODERS["text"]))
def test_text_encoders_ignore_padding(name):
    encoder = _make("text", name)
    ids, mask = _text_batch([6, 3, 9])
    with torch.no_grad():
        batched = encoder(ids, mask)
        padded_more = encoder(*(torch.nn.functional.pad(t, (0, 5)) for t in (ids, mask)))
        for row, length in enumerate([6, 3, 9]):
            alone = encoder(ids[row : row + 1, :length], mask[row : row + 1, :length])
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, padded_more, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@AUDIO
def test_audio_chunked_with_state_equals_one_pass(seed, variant):
    encoder = _audio(variant)
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(2, 157, encoder.n_mels, generator=generator)  # longer than the windowed family sees
    with torch.no_grad():
        whole, whole_state = encoder.step(frames)
        cuts = sorted(
            torch.randint(
                1, 157, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator
            ).tolist()
        )
        state, start = None, 0
        for end in [*cuts, 157]:
            embedding, state = encoder.step(frames[:, start:end], state)
            start = end
    torch.testing.assert_close(embedding, whole, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(encoder.state_layout(), state, whole_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@AUDIO
def test_audio_frame_mask_pools_only_real_frames(variant):
    """A padded training batch embeds each row as the row alone, which is what a stream gives at its end."""
    encoder = _audio(variant)
    frames = torch.randn(2, 30, encoder.n_mels)
    mask = torch.ones(2, 30)
    mask[1, 12:] = 0
    with torch.no_grad():
        batched = encoder(frames, frame_mask=mask)
        short = encoder(frames[1:, :12])
        streamed, _ = encoder.step(frames[1:, :12])
    torch.testing.assert_close(batched[1:], short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed, short, atol=1e-5, rtol=1e-5)


@AUDIO
def test_audio_empty_chunk_changes_nothing(variant):
    encoder = _audio(variant)
    with torch.no_grad():
        embedding, state = encoder.step(torch.randn(1, 10, encoder.n_mels))
        again, same_state = encoder.step(torch.zeros(1, 0, encoder.n_mels), state)
    torch.testing.assert_close(again, embedding)
    for a, b in zip(state, same_state, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_causal_shape_ignores_how_loud_each_frame_is():
    """Adding any constant to all bands of a frame (its loudness, in log units) leaves the spectral-shape
    encoder's embedding unchanged, with input statistics fitted as training fits them; not so the plain one."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 30, N_MELS, generator=generator)
    louder = frames + 4 * torch.randn(2, 30, 1, generator=generator)
    clips = [torch.randn(25, N_MELS, generator=generator).numpy() * 2 + 1 for _ in range(4)]
    shape, plain = _make("audio", "causal-shape", audio_norm_frames=20), _make("audio", "causal")
    for encoder in (shape, plain):
        encoder.fit_input_stats(clips)
    torch.testing.assert_close(shape(frames), shape(louder), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(frames), plain(louder), atol=1e-3)


def test_default_image_cnn_flops_within_budget():
    from polysense.models.encoders.image_cnn import ImageCNN

    macs = count_macs(ImageCNN().eval(), torch.zeros(1, 3, 64, 64))
    assert 2 * macs <= 400e6  # the budget; docs/training.md states the measured number
    assert 2 * macs == pytest.approx(43.8e6, rel=0.01)


def test_unknown_encoder_names_the_choices():
    from polysense.errors import ConfigError

    with pytest.raises(ConfigError, match="choose from gru, minilm-l6, transformer"):
        create_encoder("text", "lstm", vocab_size=10)


def test_windowed_audio_training_moves_whole_words_within_the_window():
    """In training the windowed family places each recording at a random point of its window, whole."""
    from polysense.models.encoders.audio_window import SILENCE, WINDOW

    encoder = _make("audio", "efficientnet-lite0", pretrained=False).train()
    windows = []
    encoder._embed = lambda window: windows.append(window) or torch.zeros(window.shape[0], EMBED)
    frames = torch.rand(2, 40, N_MELS) - 5.0
    mask = torch.ones(2, 40)
    mask[1, 25:] = 0
    torch.manual_seed(3)
    for _ in range(20):
        encoder(frames, frame_mask=mask)
    ends = set()
    for window in windows:
        for row, length in enumerate((40, 25)):
            heard = window[row].abs().sum(dim=1).nonzero().flatten()
            assert len(heard) == length  # the whole recording, and padding reads as silence
            torch.testing.assert_close(window[row, heard], frames[row, :length] - SILENCE)
            ends.add(int(heard[-1]))
    assert len(ends) > 10 and max(ends) < WINDOW


@pytest.mark.parametrize("family", ["efficientnet-lite0"])
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_channels_last_training_layout_changes_no_values(modality, family):
    """The families that train in channels-last layout (the EfficientNet-based ones) give the same embeddings
    and gradients as in the default layout, and their state dicts load into a model in the default layout
    (what export and evaluation build). In eval mode: in training mode BatchNorm divides by the batch's own
    spread, which for a few random-weight channels of 4 samples is near 0 and magnifies the last float bits."""
    from polysense.models.model import ModelConfig, MultimodalClassifier

    config = ModelConfig(
        (modality,), 3, embed_dim=EMBED, n_mels=N_MELS, pretrained=False, **{f"{modality}_family": family}
    )
    torch.manual_seed(0)
    default = MultimodalClassifier(config).eval()
    fast = MultimodalClassifier(config).eval()
    fast.load_state_dict(default.state_dict())
    fast.use_channels_last()
    assert fast.encoders[modality].channels_last
    weights = [p for p in fast.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    rng = np.random.default_rng(0)
    rows = [_FEATURES[modality](rng, i) for i in range(4)]
    batch = dict(
        zip(SPECS[modality].batch_keys, (torch.from_numpy(a) for a in SPECS[modality].codec.collate(rows)))
    )
    seen = []
    fast.encoders[modality].register_forward_pre_hook(lambda module, args: seen.extend(args))
    outputs = [model.encode(modality, batch) for model in (default, fast)]
    images = [tensor for tensor in seen if tensor.dim() == 4]  # the audio family builds its images inside
    assert all(image.is_contiguous(memory_format=torch.channels_last) for image in images)
    assert images or modality == "audio"
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    for (name, a), b in zip(default.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
    reloaded = MultimodalClassifier(config)
    reloaded.load_state_dict(fast.state_dict())
    assert all(p.is_contiguous() for p in reloaded.parameters())
