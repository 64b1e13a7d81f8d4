"""Limits are checked before the expensive work: headers are read first, and lying headers cost nothing."""

import io
import struct

import cv2
import numpy as np
import pytest
import soundfile

import polysense
from polysense import ConfigError, ImagePreprocessor, InputError, Limits, decode_image
from polysense.preprocess.image_header import read_header


def _encoded(extension: str, height: int = 30, width: int = 50, params=()) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    ok, data = cv2.imencode(extension, pixels, list(params))
    assert ok
    return data.tobytes()


FORMATS = {
    "JPEG": _encoded(".jpg"),
    "progressive JPEG": _encoded(".jpg", params=(cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    "PNG": _encoded(".png"),
    "BMP": _encoded(".bmp"),
    "lossy WebP": _encoded(".webp", params=(cv2.IMWRITE_WEBP_QUALITY, 80)),
    "lossless WebP": _encoded(".webp", params=(cv2.IMWRITE_WEBP_QUALITY, 101)),
}


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    """The same image with a header that declares width x height (the pixel data stays as it was)."""
    header = read_header(data, "test")
    data = bytearray(data)
    if header.format == "JPEG":
        sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
        struct.pack_into(">HH", data, sof + 5, height, width)
    elif header.format == "PNG":
        struct.pack_into(">II", data, 16, width, height)
    elif header.format == "BMP":
        struct.pack_into("<ii", data, 18, width, height)
    else:  # WebP: VP8X canvas, so the frame inside still declares the small size
        canvas = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
        canvas += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        data = data[:12] + canvas + data[12:]
        struct.pack_into("<I", data, 4, len(data) - 8)
    return bytes(data)


@pytest.mark.parametrize("name", FORMATS)
def test_headers_are_read_right(name):
    header = read_header(FORMATS[name], name)
    assert (header.width, header.height) == (50, 30)
    assert decode_image(FORMATS[name]).shape == (30, 50, 3)


@pytest.mark.parametrize("name", FORMATS)
def test_a_header_claiming_huge_size_is_refused_before_decoding(name, monkeypatch):
    lying = _claim_size(FORMATS[name], 60_000, 60_000)
    monkeypatch.setattr(
        cv2, "imdecode", lambda *a: pytest.fail("decoded although the header is over the limit")
    )
    with pytest.raises(
        InputError, match=r"60000x60000.*max_image_pixels=25,000,000.*Limits\(max_image_pixels"
    ):
        decode_image(lying)


@pytest.mark.parametrize(
    "data, name",
    [
        (_encoded(".tiff"), "TIFF"),
        (_encoded(".ppm"), "not a JPEG/PNG/BMP/WebP"),
        (b"GIF89a" + b"\x00" * 20, "GIF"),
        (_encoded(".jp2", 64, 64), "JPEG 2000"),
        (_encoded(".hdr"), "HDR"),
        (b"\xff\xd8\xff\xe0\x00\x02", "not a JPEG/PNG/BMP/WebP"),  # a JPEG that ends before any frame header
    ],
)
def test_other_formats_are_refused_with_the_fix(data, name):
    with pytest.raises(InputError, match=name):
        decode_image(data)


def test_limits_are_per_pipeline_and_raisable(bundle, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_encoded(".png", 200, 300))
    small = polysense.Pipeline.load(bundle, limits=Limits(max_image_pixels=10_000))
    with pytest.raises(InputError, match="max_image_pixels=10,000"):
        small.predict(image=photo)
    assert small.limits.max_image_pixels == 10_000
    assert polysense.Pipeline.load(bundle).predict(image=photo).label in small.labels
    with pytest.raises(InputError, match="max_input_bytes"):
        ImagePreprocessor(limits=Limits(max_input_bytes=100))(photo)


def test_bad_limits_are_config_errors(bundle):
    with pytest.raises(ConfigError, match="max_image_pixels"):
        Limits(max_image_pixels=0)
    with pytest.raises(ConfigError, match="min_sample_rate"):
        Limits(min_sample_rate=50_000, max_sample_rate=48_000)
    with pytest.raises(ConfigError, match="polysense.Limits"):
        polysense.Pipeline.load(bundle, limits={"max_image_pixels": 1})


def _wav(seconds: float, rate: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((int(seconds * rate), channels), np.float32), rate, format="WAV")
    return buffer.getvalue()


def _with_wav_rate(data: bytes, rate: int) -> bytes:
    data = bytearray(data)
    struct.pack_into("<I", data, 24, rate)  # the fmt chunk's sample rate
    return bytes(data)


@pytest.mark.parametrize(
    "audio, limits, message",
    [
        (_with_wav_rate(_wav(0.5, 16000), 2_000_000_000), Limits(), "max_sample_rate"),
        (_with_wav_rate(_wav(0.5, 16000), 8), Limits(), "min_sample_rate"),
        (_wav(2.0, 8000), Limits(max_audio_seconds=1.5), "lasts 2.0 s.*max_audio_seconds"),
        (_wav(1.0, 8000, channels=4), Limits(max_audio_channels=2), "4 channels.*max_audio_channels"),
        (_wav(1.0, 8000, channels=2), Limits(max_audio_samples=10_000), "16,000 samples.*max_audio_samples"),
        (_wav(1.0, 8000), Limits(max_input_bytes=1000), "max_input_bytes"),
    ],
)
def test_audio_files_over_a_limit_are_refused_from_the_header(audio, limits, message, monkeypatch):
    def no_read(*args, **kwargs):
        pytest.fail("samples were decoded although the header is over a limit")

    monkeypatch.setattr(soundfile.SoundFile, "read", no_read)
    with pytest.raises(InputError, match=message):
        polysense.AudioPreprocessor(limits=limits)(audio)


def test_audio_arrays_are_checked_before_resampling():
    preprocess = polysense.AudioPreprocessor(limits=Limits(max_audio_seconds=1.0))
    with pytest.raises(InputError, match="min_sample_rate"):
        preprocess(np.zeros(100, np.float32), sample_rate=2)
    with pytest.raises(InputError, match="max_audio_seconds"):
        preprocess(np.zeros(32_000, np.float32), sample_rate=16_000)
    assert preprocess(np.zeros(16_000, np.float32), sample_rate=16_000).shape[0] == 99


def test_stream_rates_outside_the_range_are_refused(bundle):
    stream = polysense.Pipeline.load(bundle).audio_stream()
    with pytest.raises(InputError, match="min_sample_rate"):
        stream.accept_waveform(np.zeros(100, np.float32), 10)
    with pytest.raises(InputError, match="max_sample_rate"):
        stream.accept_waveform(np.zeros(100, np.float32), 10_000_000)
    assert stream.accept_waveform(np.zeros(1600, np.float32), 16_000) > 0


def test_long_audio_is_framed_in_blocks_with_the_same_result():
    logmel = polysense.LogMel()
    waveform = np.random.default_rng(0).standard_normal(16_000 * 50).astype(np.float32)  # > 4096 frames
    blocked = logmel(waveform)
    pieces = [logmel(waveform[: 160 * 3000 + 240], pad_tail=False), logmel(waveform[160 * 3000 :])]
    np.testing.assert_allclose(blocked, np.concatenate(pieces), rtol=1e-5, atol=1e-5)


def test_manifest_lines_too_long_or_nested_too_deeply_are_row_problems(tmp_path):
    from polysense.tools.manifest import MAX_LINE_CHARS, read_manifest

    manifest = tmp_path / "m.jsonl"
    rows = [
        '{"text": "fine", "label": "a"}',
        '{"text": "' + "x" * (MAX_LINE_CHARS + 10) + '", "label": "a"}',
        "[" * 100_000 + "]" * 100_000,
        '{"text": "also fine", "label": "b"}',
    ]
    manifest.write_text("\n".join(rows) + "\n")
    found = read_manifest(manifest)
    assert [r.line for r in found.rows] == [1, 4]
    assert [(p.line, p.reason.split(" ")[0]) for p in found.problems] == [(2, "line"), (3, "JSON")]


def test_an_oversized_bundle_description_is_refused(copied_bundle):
    description = copied_bundle / "bundle.json"
    description.write_text(" " * (5 << 20) + description.read_text())
    with pytest.raises(polysense.BundleError, match="a bundle description is a few KB"):
        polysense.Pipeline.load(copied_bundle)


def test_a_video_with_frames_over_the_pixel_limit_is_refused(bundle, tmp_path):
    path = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (320, 240))
    for _ in range(3):
        writer.write(np.zeros((240, 320, 3), np.uint8))
    writer.release()
    small = polysense.Pipeline.load(bundle, limits=Limits(max_image_pixels=320 * 240 - 1))
    with pytest.raises(InputError, match="320x240 frames.*max_image_pixels"):
        list(small.video_stream(str(path)).run())
    assert len(list(polysense.Pipeline.load(bundle).video_stream(str(path), fps=5).run())) == 3
