import io

import numpy as np
import pytest
import soundfile

from polysense import AudioPreprocessor, InputError, LogMel, load_audio
from polysense.preprocess.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, resample


def _sine(frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_a_sine_keeps_frequency_and_level(rate):
    tone = _sine(440.0, rate)
    out = resample(tone, rate, SAMPLE_RATE)
    assert abs(out.size - SAMPLE_RATE) <= 1
    assert abs(_peak_hz(out, SAMPLE_RATE) - 440.0) <= 1.0
    middle = slice(1000, -1000)  # away from the filter's edge effects
    rms_in, rms_out = np.sqrt(np.mean(tone**2)), np.sqrt(np.mean(out[middle] ** 2))
    assert abs(20 * np.log10(rms_out / rms_in)) < 0.1  # level within 0.1 dB


def test_logmel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.standard_normal(SAMPLE_RATE) + _sine(700.0, SAMPLE_RATE)).astype(np.float32)
    ours = LogMel()(waveform, pad_tail=False)
    reference = librosa.feature.melspectrogram(
        y=waveform, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, center=False, n_mels=40, power=2.0
    )
    reference = np.log(reference.T + 1e-6)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-3)  # float32 FFT vs librosa's float64


def test_logmel_frame_count_and_tail_padding():
    logmel = LogMel()
    for n in (1, 399, 400, 401, 560, 16000):
        frames = logmel(np.ones(n, np.float32))
        assert frames.shape == (logmel.num_frames(n), 40)
        # The last frame starts before the end of the audio: no sample is dropped, no frame is all padding.
        assert (frames.shape[0] - 1) * HOP_LENGTH < n


def test_real_file_path_bytes_and_array_agree(fsdd_file):
    pre = AudioPreprocessor()
    samples, rate = soundfile.read(fsdd_file, dtype="int16")
    assert rate == 8000  # FSDD is 8 kHz, so this also exercises resampling
    from_path = pre(fsdd_file)
    np.testing.assert_array_equal(from_path, pre(fsdd_file.read_bytes()))
    np.testing.assert_allclose(from_path, pre(samples, sample_rate=rate), atol=1e-6)
    np.testing.assert_allclose(
        from_path, pre(samples.astype(np.float32) / 32768, sample_rate=rate), atol=1e-6
    )
    expected_frames = LogMel().num_frames(round(samples.size * SAMPLE_RATE / rate))
    assert abs(from_path.shape[0] - expected_frames) <= 1


def test_stereo_is_averaged_to_mono():
    left, right = _sine(300, 16000), _sine(500, 16000)
    mono, rate = load_audio(np.stack([left, right], axis=1), sample_rate=16000)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-7)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, right], axis=1), 16000, format="WAV", subtype="FLOAT")
    from_bytes, _ = load_audio(buffer.getvalue())
    np.testing.assert_allclose(from_bytes, mono, atol=1e-6)


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros(100, np.float32), None, "sample rate"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf], np.float32), 16000, "NaN or Inf"),
        (np.zeros(10, np.complex64), 16000, "dtype"),
        (np.zeros((2, 3, 4), np.float32), 16000, "dimensions"),
        (np.zeros((2, 1000), np.float32), 16000, "array.T"),
        (np.zeros(10, np.float32), 0, "positive"),
        (np.zeros(10, np.float32), -8000, "positive"),
        (np.zeros(10, np.float32), 8000.5, "whole number"),
        (b"RIFF....", None, "not WAV, FLAC or OGG"),
        (b"RIFF\x04\x00\x00\x00WAVE", None, "cannot decode"),
        (b"", None, "empty"),
    ],
)
def test_bad_audio_raises_clear_errors(audio, rate, message):
    with pytest.raises(InputError, match=message):
        AudioPreprocessor()(audio, sample_rate=rate)
