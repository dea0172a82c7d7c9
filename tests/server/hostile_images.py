"""Hostile-but-legal images for the image-limit tests: each is a real file Pillow decodes, built in a few lines."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image
from server_helpers import pattern, save


def progressive(width: int = 64, height: int = 64, quality: int = 90, flat: bool = False) -> bytes:
    """A progressive JPEG from Pillow (libjpeg's default script: about 10 scans); ``flat``: one grey, so every AC
    scan is a few bytes (an end-of-band run over all blocks) that still costs a pass over every block."""
    image = np.full((height, width, 3), 128, np.uint8) if flat else pattern(width, height)
    return save(image, "JPEG", quality=quality, progressive=True)


def repeated_last_scan(times: int, width: int = 64, height: int = 64, flat: bool = False) -> bytes:
    """A progressive JPEG whose last scan (an AC refinement scan: legal to repeat) is there ``times`` times more."""
    data = progressive(width, height, flat=flat)
    start, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[start:end] * times + data[end:]


def after_soi(jpeg: bytes, insert: bytes) -> bytes:
    """``jpeg`` with ``insert`` placed right after its SOI marker."""
    return jpeg[:2] + insert + jpeg[2:]


def after_frame_header(jpeg: bytes, insert: bytes) -> bytes:
    """``jpeg`` with ``insert`` placed right after its frame header (SOF0/SOF2 segment)."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            end = at + 2 + struct.unpack_from(">H", jpeg, at + 2)[0]
            return jpeg[:end] + insert + jpeg[end:]
    raise ValueError("no SOF0/SOF2 segment")


def fill_bytes(jpeg: bytes, count: int) -> bytes:
    """``count`` legal 0xFF fill bytes before the frame header's marker."""
    at = jpeg.find(b"\xff\xc0") if b"\xff\xc0" in jpeg else jpeg.find(b"\xff\xc2")
    return jpeg[:at] + b"\xff" * count + jpeg[at:]


def comments(count: int, text: bytes = b"") -> bytes:
    """``count`` COM segments (each ``text``, empty by default)."""
    return (b"\xff\xfe" + struct.pack(">H", 2 + len(text)) + text) * count


def app_segments(count: int) -> bytes:
    """``count`` small APP15 segments."""
    return (b"\xff\xef\x00\x04hi") * count


def webp_with_chunks(webp: bytes, count: int) -> bytes:
    """``webp`` (a simple-format file) turned into an extended one (VP8X) followed by ``count`` unknown chunks."""
    assert webp[12:16] in (b"VP8 ", b"VP8L"), webp[12:16]
    with Image.open(io.BytesIO(webp)) as image:
        width, height = image.size
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    junk = (b"JUNK" + struct.pack("<I", 2) + b"ab") * count
    body = b"WEBP" + vp8x + webp[12:] + junk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def random_bytes(count: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()


def scans_to_fill(size: int, width: int, height: int) -> bytes:
    """A flat progressive JPEG of ``width`` x ``height`` grown to about ``size`` bytes by repeating its last scan."""
    data = progressive(width, height, flat=True)
    scan = data.rindex(b"\xff\xd9") - data.rindex(b"\xff\xda")
    return repeated_last_scan((size - len(data)) // scan, width, height, flat=True)
