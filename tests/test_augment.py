"""Training-time perturbations (polysense.models.training.augment) and the audio encoder's running normalisation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polysense.bundle.settings import AudioSettings, Preprocessing  # noqa: E402
from polysense.models.encoders.audio_causal import CausalAudioEncoder  # noqa: E402
from polysense.models.training import augment  # noqa: E402

pytestmark = pytest.mark.slow  # torch

SETTINGS = AudioSettings(sample_rate=16000, n_fft=400, hop_length=160, n_mels=40)


def _generators(rows: int, seed: int) -> list:
    return [torch.Generator().manual_seed(seed * 1000 + row) for row in range(rows)]


def _audio_batch(lengths: list[int]) -> dict:
    generator = torch.Generator().manual_seed(3)
    frames = torch.zeros(len(lengths), max(lengths), 40)
    mask = torch.zeros(len(lengths), max(lengths))
    for row, length in enumerate(lengths):
        frames[row, :length] = torch.randn(length, 40, generator=generator) * 3 - 8
        mask[row, :length] = 1
    return {"audio": frames, "audio_mask": mask, "labels": torch.arange(len(lengths))}


def test_audio_perturbation_keeps_labels_masks_and_absent_rows():
    batch = _audio_batch([50, 80, 0, 30])  # row 2 lacks audio
    out = augment.augment_batch(batch, Preprocessing(audio=SETTINGS), _generators(4, 0))
    assert out["labels"] is batch["labels"]
    lengths = out["audio_mask"].sum(1).tolist()
    assert lengths[2] == 0
    for before, after in zip([50, 80, 30], [lengths[0], lengths[1], lengths[3]]):
        assert before / augment.TEMPO[1] - 1 <= after <= before / augment.TEMPO[0] + 1  # tempo changes length
    for row, length in enumerate(lengths):  # real frames first, zeros after, as the collate makes them
        assert out["audio_mask"][row, : int(length)].eq(1).all()
        assert out["audio"][row, int(length) :].eq(0).all()
    assert torch.isfinite(out["audio"]).all()
    assert not torch.equal(out["audio"][0, :10], batch["audio"][0, :10])


def test_perturbations_repeat_for_the_same_generator_seed():
    batch = {**_audio_batch([40, 60]), "image": torch.randn(2, 3, 32, 32)}
    runs = [augment.augment_batch(batch, Preprocessing(audio=SETTINGS), _generators(2, 7)) for _ in range(2)]
    for key in ("audio", "audio_mask", "image"):
        assert torch.equal(runs[0][key], runs[1][key])


def test_vocal_tract_warp_of_one_is_the_identity_and_moves_energy_otherwise():
    clip = torch.full((5, 40), -10.0)
    clip[:, 10] = 0.0  # one loud band
    assert torch.allclose(augment._warp_frequencies(clip, 1.0, SETTINGS), clip, atol=1e-6)
    longer_tract = augment._warp_frequencies(clip, 0.88, SETTINGS)  # formants move down
    assert int(longer_tract[0].argmax()) < 10


def test_image_perturbation_keeps_shape_and_stays_finite():
    images = torch.randn(4, 3, 48, 48)
    out = augment.augment_images(images, _generators(4, 1))
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, images)


def test_input_std_has_a_floor_for_bands_the_training_audio_never_reaches():
    encoder = CausalAudioEncoder(n_mels=4)
    clips = [
        np.stack([np.random.default_rng(i).normal(0, 3, 50), np.full(50, -13.8)] * 2, 1) for i in range(3)
    ]
    encoder.fit_input_stats([c.astype(np.float32) for c in clips])
    assert encoder.input_std[1] == 1.0 and encoder.input_std[0] > 2


def test_running_normalisation_removes_a_constant_offset_as_frames_accumulate():
    encoder = CausalAudioEncoder(n_mels=4, norm_frames=10)
    constant = torch.full((1, 200, 4), 2.0)
    normalised, _ = encoder._remove_running_mean(constant, torch.zeros(1, 4), torch.zeros(1, 1))
    expected = 2.0 * 10 / (10 + torch.arange(1, 201, dtype=torch.float32))  # z_t - t z / (10 + t)
    torch.testing.assert_close(normalised[0, :, 0], expected)
    assert float(normalised[0, -1].abs().max()) < 0.11


def test_rows_without_an_image_stay_zeros_and_silence_stays_at_the_floor():
    images = torch.randn(3, 3, 16, 16)
    images[1] = 0  # this sample has no image
    frames = torch.full((1, 30, 40), float(np.log(1e-6)))  # silence: the runtime's log floor
    batch = {"image": images, "audio": frames, "audio_mask": torch.ones(1, 30)}
    out = augment.augment_batch(batch, Preprocessing(audio=SETTINGS), _generators(3, 0), noise="none")
    assert out["image"][1].eq(0).all() and not out["image"][0].eq(images[0]).all()
    torch.testing.assert_close(out["audio"], torch.full_like(out["audio"], float(np.log(1e-6))))


def test_noise_levels_draw_alike_and_strong_noise_buries_more_of_the_quiet_bands():
    from polysense.models.training.options import AUDIO_NOISE

    assert set(augment.NOISE_LEVELS) == set(AUDIO_NOISE)  # the flag's choices are the levels
    batch = _audio_batch([60, 60, 60, 60, 60, 60, 60, 60])
    out = {
        level: augment.augment_batch(batch, Preprocessing(audio=SETTINGS), _generators(8, 5), noise=level)
        for level in AUDIO_NOISE
    }
    # Tempo (hence each clip's length), warp and gain are drawn before the noise, alike at every level.
    assert all(torch.equal(out[level]["audio_mask"], out["none"]["audio_mask"]) for level in AUDIO_NOISE)
    # Noise lifts the quietest frames of each clip: strong noise lifts them further, and more often.
    quietest = {level: out[level]["audio"][:, :50].amin(dim=(1, 2)) for level in AUDIO_NOISE}
    assert (quietest["light"] >= quietest["none"]).all() and (quietest["strong"] >= quietest["none"]).all()
    lifted = {level: int((quietest[level] > quietest["none"] + 1).sum()) for level in ("light", "strong")}
    assert lifted["strong"] > lifted["light"] and float(quietest["strong"].mean()) > float(
        quietest["light"].mean()
    )
