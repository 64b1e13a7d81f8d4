import struct

import cv2
import numpy as np
import pytest

from polysense import ImagePreprocessor, InputError, decode_image


def _jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes carrying an EXIF APP1 segment with the given orientation tag."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    # TIFF header (big-endian), one IFD with one entry: tag 0x0112 Orientation, SHORT, count 1.
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = encoded.tobytes()
    return data[:2] + app1 + data[2:]


def _test_pattern() -> np.ndarray:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:20, :30] = (255, 0, 0)  # red top-left quadrant
    rgb[20:, 30:] = (0, 0, 255)  # blue bottom-right quadrant
    return rgb


def test_exif_orientation_is_applied():
    rgb = _test_pattern()
    upright = decode_image(_jpeg_with_orientation(rgb, 1))
    rotated = decode_image(_jpeg_with_orientation(rgb, 6))  # 6: the viewer must rotate 90 degrees clockwise
    assert upright.shape == (40, 60, 3)
    assert rotated.shape == (60, 40, 3)
    expected = np.rot90(upright, k=-1)  # clockwise
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 3


def test_path_bytes_and_array_agree(tmp_path):
    rgb = (np.random.default_rng(0).uniform(0, 255, (50, 70, 3))).astype(np.uint8)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    pre = ImagePreprocessor(size=32)
    from_path, from_bytes, from_array = pre(path), pre(path.read_bytes()), pre(rgb)
    assert from_path.shape == (3, 32, 32) and from_path.dtype == np.float32
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_array)  # PNG is lossless


def test_real_photo_path_bytes_agree(sign_photo):
    pre = ImagePreprocessor(size=64)
    np.testing.assert_array_equal(pre(sign_photo), pre(sign_photo.read_bytes()))


def test_resize_and_center_crop_keeps_the_middle():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, 50:150] = 255  # a white middle square
    out = ImagePreprocessor(size=20, mean=(0, 0, 0), std=(1, 1, 1))(rgb)
    assert out.shape == (3, 20, 20)
    assert np.allclose(out, 1.0)


def test_grey_and_rgba_arrays_become_rgb():
    pre = ImagePreprocessor(size=16)
    grey = np.full((16, 16), 128, np.uint8)
    rgba = np.dstack([np.full((16, 16, 3), 128, np.uint8), np.zeros((16, 16), np.uint8)])
    np.testing.assert_array_equal(pre(grey), pre(rgba))


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"not an image", "cannot decode"),
        (b"", "empty"),
        (np.zeros((8, 8, 3), np.float32), "dtype"),
        (np.zeros((8, 8, 3, 1), np.uint8), "shape"),
        (np.zeros((8, 8, 2), np.uint8), "shape"),
        (12, "unsupported"),
    ],
)
def test_bad_images_raise_clear_errors(bad, message):
    with pytest.raises(InputError, match=message):
        ImagePreprocessor()(bad)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ImagePreprocessor()(tmp_path / "nope.jpg")
