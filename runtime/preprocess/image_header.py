"""Image format and size from the first bytes of an encoded image, before any pixel is decoded.

Decoding allocates what the header declares, so a 2.5 KB JPEG whose header claims 60000 x 60000 pixels would
cost gigabytes; reading the header first lets polysense refuse it for nothing. Only the formats parsed here are
decoded at all (JPEG, PNG, BMP, WebP): OpenCV could also open TIFF, JPEG 2000, AVIF, GIF, HDR, PFM, PNM and Sun
raster files, but every extra decoder is attack surface, and an image model's inputs are photos and screenshots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from polysense.errors import InputError

FORMATS = ("JPEG", "PNG", "BMP", "WebP")
_CONVERT = "convert it to PNG or JPEG"
# Recognised only to name them in the refusal.
_OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    b"#?RADIANCE": "HDR",
    b"\x59\xa6\x6a\x95": "Sun raster",
}
# JPEG frame headers (SOF0-15 without DHT, JPG and DAC); each is followed by precision, height, width.
_JPEG_FRAMES = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM and RST0-7 carry no length field


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, source: str) -> ImageHeader:
    """The format and declared size of encoded image `data`, or an InputError for anything not decodable here."""
    if data[:3] == b"\xff\xd8\xff":
        header = _jpeg(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        header = _png(data)
    elif data[:2] == b"BM":
        header = _bmp(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        header = _webp(data)
    else:
        header = None
        other = next((name for sig, name in _OTHER_SIGNATURES.items() if data.startswith(sig)), None)
        if other is None and data[4:8] == b"ftyp":
            other = "HEIF/AVIF"
        if other is not None:
            raise InputError(f"{source}: {other} images are not decoded; {_CONVERT}")
    if header is None:
        raise InputError(
            f"{source}: cannot decode image data (not a {'/'.join(FORMATS)} image, or corrupted)"
        )
    if header.width < 1 or header.height < 1:
        raise InputError(
            f"{source}: the {header.format} header declares {header.width}x{header.height} pixels"
        )
    return header


def _unpack(layout: str, data: bytes, offset: int) -> tuple:
    try:
        return struct.unpack_from(layout, data, offset)
    except struct.error:
        return ()


def _jpeg(data: bytes) -> ImageHeader | None:
    """Walk the marker segments to the first frame header (libjpeg decodes that one frame and no other)."""
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            offset += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = _unpack(">H", data, offset + 2) or (0,)
        if marker in _JPEG_FRAMES:
            size = _unpack(">HH", data, offset + 5)
            return ImageHeader("JPEG", size[1], size[0]) if size else None
        if length < 2:
            return None
        offset += 2 + length
    return None


def _png(data: bytes) -> ImageHeader | None:
    """The IHDR size, once every chunk is seen to fit in the data: OpenCV's PNG reader allocates what a chunk
    length claims (a 4 KB file claiming a 4 GB chunk cost 4 GB and 4 s)."""
    if data[12:16] != b"IHDR":
        return None
    size = _unpack(">II", data, 16)
    offset = 8
    while offset < len(data):
        (length,) = _unpack(">I", data, offset) or (None,)
        if length is None or offset + 12 + length > len(data):
            return None
        if data[offset + 4 : offset + 8] == b"IEND":
            break
        offset += 12 + length  # length, type, data, CRC
    return ImageHeader("PNG", *size) if size else None


def _bmp(data: bytes) -> ImageHeader | None:
    (dib_size,) = _unpack("<I", data, 14) or (0,)
    size = _unpack("<HH" if dib_size == 12 else "<ii", data, 18)  # 12: OS/2 BITMAPCOREHEADER, 16-bit sizes
    # A negative height means the rows are stored top-down; the size is its absolute value.
    return ImageHeader("BMP", abs(size[0]), abs(size[1])) if size else None


def _webp(data: bytes) -> ImageHeader | None:
    """The largest size any VP8X canvas, VP8 or VP8L frame in the file declares."""
    widest: ImageHeader | None = None
    offset = 12
    while offset + 8 <= len(data):
        kind, length = data[offset : offset + 4], (_unpack("<I", data, offset + 4) or (0,))[0]
        body = offset + 8
        size = None
        if kind == b"VP8X" and body + 10 <= len(data):
            width = int.from_bytes(data[body + 4 : body + 7], "little") + 1
            size = (width, int.from_bytes(data[body + 7 : body + 10], "little") + 1)
        elif kind == b"VP8 " and data[body + 3 : body + 6] == b"\x9d\x01\x2a":
            raw = _unpack("<HH", data, body + 6)
            size = (raw[0] & 0x3FFF, raw[1] & 0x3FFF) if raw else None
        elif kind == b"VP8L" and data[body : body + 1] == b"\x2f":
            (bits,) = _unpack("<I", data, body + 1) or (0,)
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        if size is not None and (widest is None or size[0] * size[1] > widest.pixels):
            widest = ImageHeader("WebP", *size)
        if body + length > len(data):  # a chunk claiming more than the file holds
            return None
        offset = body + length + (length & 1)  # chunks are padded to an even length
    return widest
