"""The structure walk behind :func:`.images.probe`: every JPEG marker segment, every WebP chunk, nothing decoded.

:func:`jpeg_size` walks a JPEG from SOI to EOI: Python work happens once per marker segment (bounded by
:data:`MAX_JPEG_SEGMENTS`), while fill bytes and the entropy-coded data of each scan are skipped with compiled
regular expressions (C speed, O(n)); a stuffed ``FF 00`` and the restart markers ``FF D0``-``FF D7`` inside a scan
are data, any other ``FF xx`` ends it. :func:`webp_size` walks the RIFF chunks (at most :data:`MAX_WEBP_CHUNKS`).
Structure no real encoder writes but a decoder would pay for raises :class:`~streamdiff.errors.HostileImage`
(``hostile_image``); a broken structure :class:`~streamdiff.errors.ImageError` (``bad_image``); a well-formed
file in a variant Pillow does not decode :class:`~streamdiff.errors.UnsupportedImageFormat`, decided only after
the whole walk succeeded (so a JPEG signature followed by garbage is ``bad_image``). Pure functions.
"""

from __future__ import annotations

import re
import struct

from ..errors import HostileImage, ImageError, UnsupportedImageFormat

__all__ = ["MAX_JPEG_FILL_BYTES", "MAX_JPEG_METADATA_SEGMENTS", "MAX_JPEG_SCANS", "MAX_JPEG_SEGMENTS",
           "MAX_WEBP_CHUNKS", "jpeg_size", "truncated", "webp_size"]

#: Scans (SOS) per JPEG at most. libjpeg's and mozjpeg's progressive scripts write 10 and 9-12; baseline writes 1
#: (3 non-interleaved). A repeated refinement scan is legal and costs a pass over every block of the image: 83,000
#: of them in 1 MB cost minutes of CPU.
MAX_JPEG_SCANS = 32
#: Marker segments per JPEG at most (every marker but SOI/EOI and the RSTn inside scans). A progressive file from
#: libjpeg has about 30 (a DHT per scan), with Exif, ICC and XMP about 40.
MAX_JPEG_SEGMENTS = 128
#: APPn and COM segments at most (JFIF, Exif, XMP, a multi-segment ICC profile, Adobe: rarely over 10).
MAX_JPEG_METADATA_SEGMENTS = 32
#: 0xFF fill bytes before markers at most, in the whole file. Encoders write none; they are legal padding.
MAX_JPEG_FILL_BYTES = 64
#: RIFF chunks per WebP at most. A still image has at most 6 (VP8X, ICCP, ALPH, VP8, EXIF, XMP).
MAX_WEBP_CHUNKS = 16

# JPEG start-of-frame markers Pillow/libjpeg decode: baseline, extended sequential, progressive (Huffman coding).
_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
# Other SOF markers: lossless, hierarchical, arithmetic coding.
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


# -- JPEG ------------------------------------------------------------------------------------------------------

_FILL = re.compile(rb"\xff{1,%d}" % (MAX_JPEG_FILL_BYTES + 2))  # a longer run is over the limit anyway
# In entropy-coded data a real marker is 0xFF followed by anything but a stuffed zero or a restart marker RSTn.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height of a JPEG starting with SOI, after walking every marker of the file up to EOI."""
    size, pos = len(data), 2  # after SOI
    frame: tuple[int, int, int, int] | None = None  # SOF marker, precision, width, height
    segments = metadata = scans = fill = 0
    while True:
        if pos >= size:
            where = "before its frame header (SOF)" if frame is None else "before its end (EOI)"
            raise ImageError(truncated("jpeg", data, where))
        if data[pos] != 0xFF:
            raise ImageError(f"jpeg marker expected at byte {pos}, found 0x{data[pos]:02x}")
        end = _FILL.match(data, pos).end()  # type: ignore[union-attr]  # data[pos] is 0xFF
        fill += end - pos - 1
        if fill > MAX_JPEG_FILL_BYTES:
            raise HostileImage(f"jpeg has more than {MAX_JPEG_FILL_BYTES} 0xFF fill bytes between segments",
                               value=fill, allowed=f"at most {MAX_JPEG_FILL_BYTES} fill bytes")
        if end >= size:
            raise ImageError(truncated("jpeg", data, "inside a marker"))
        marker, pos = data[end], end + 1
        if marker == 0xD9:  # EOI: anything after it is never read by the decoder
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise HostileImage(f"jpeg has more than {MAX_JPEG_SEGMENTS} marker segments", value=segments,
                               allowed=f"at most {MAX_JPEG_SEGMENTS} segments")
        if marker in _STANDALONE:
            continue
        if marker in (0x00, 0xD8):
            what = "a stuffed zero" if marker == 0x00 else "a second SOI"
            raise ImageError(f"jpeg has {what} at byte {end - 1} outside entropy-coded data")
        if pos + 2 > size:
            raise ImageError(truncated("jpeg", data, "inside a segment length"))
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageError(f"jpeg segment 0x{marker:02x} at byte {end - 1} has invalid length {length}")
        if pos + length > size:
            raise ImageError(truncated("jpeg", data, f"inside segment 0x{marker:02x} at byte {end - 1}"))
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += 1
            if metadata > MAX_JPEG_METADATA_SEGMENTS:
                raise HostileImage(f"jpeg has more than {MAX_JPEG_METADATA_SEGMENTS} APPn/COM metadata segments",
                                   value=metadata, allowed=f"at most {MAX_JPEG_METADATA_SEGMENTS} segments")
        elif marker in _SOF_SUPPORTED or marker in _SOF_OTHER:
            if frame is not None:
                raise ImageError(f"jpeg has a second frame header (SOF 0x{marker:02x}) at byte {end - 1}")
            frame = _jpeg_frame_header(data, pos, marker, length)
        elif marker == 0xDA:
            if frame is None:
                raise ImageError("jpeg has SOS before its frame header (SOF)")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise HostileImage(f"jpeg has more than {MAX_JPEG_SCANS} scans (SOS); real progressive files have "
                                   "about 10", value=scans, allowed=f"at most {MAX_JPEG_SCANS} scans")
            found = _NEXT_MARKER.search(data, pos + length)
            if found is None:
                raise ImageError(truncated("jpeg", data, f"inside the data of scan {scans}"))
            pos = found.start()
            continue
        pos += length
    if frame is None:
        raise ImageError("jpeg has EOI before its frame header (SOF)")
    if scans == 0:
        raise ImageError("jpeg has no scan (SOS) before its EOI")
    return _jpeg_support(*frame)


def _jpeg_frame_header(data: bytes, pos: int, marker: int, length: int) -> tuple[int, int, int, int]:
    if length < 8:
        raise ImageError(f"jpeg frame header (SOF) has length {length}, less than 8")
    precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
    if length != 8 + 3 * components:
        raise ImageError(f"jpeg frame header (SOF) has length {length}, but {components} components need "
                         f"{8 + 3 * components}")
    if components not in (1, 3, 4):
        raise ImageError(f"jpeg declares {components} colour components; expected 1, 3 or 4")
    if precision not in (8, 12, 16) or (precision == 16 and marker in _SOF_SUPPORTED):
        raise ImageError(f"jpeg declares {precision}-bit samples, not a valid JPEG sample precision")
    if width == 0 or height == 0:
        raise ImageError(f"jpeg declares an empty or deferred (DNL) size {width}x{height}")
    return marker, precision, width, height


def _jpeg_support(marker: int, precision: int, width: int, height: int) -> tuple[int, int]:
    """The probe's answer for a well-formed file: its size, or what about it is not supported."""
    if marker in _SOF_OTHER:
        raise UnsupportedImageFormat(
            f"jpeg with SOF marker 0x{marker:02x} (lossless, hierarchical or arithmetic-coded) is not supported; "
            "send a baseline or progressive JPEG", value=f"SOF 0x{marker:02x}", allowed="baseline, progressive",
        )
    if precision != 8:
        raise UnsupportedImageFormat(f"jpeg with {precision}-bit samples is not supported; send 8-bit JPEG",
                                     value=precision, allowed="8")
    return width, height


# -- WebP (RIFF container, https://developers.google.com/speed/webp/docs/riff_container) -----------------------


def webp_size(data: bytes) -> tuple[int, int]:
    """Width and height of a RIFF/WEBP file, after checking every chunk header lies inside it."""
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 > len(data):
        raise ImageError(f"webp is truncated: its RIFF header declares {riff_size + 8} bytes, got {len(data)}")
    if len(data) < 30:
        raise ImageError(truncated("webp", data, "inside its first chunk"))
    _walk_webp_chunks(data, riff_size + 8)
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: frame tag (3), start code 9d 01 2a, 14-bit width and height
        if data[20] & 1:
            raise ImageError("webp VP8 bitstream does not start with a key frame")
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("webp VP8 bitstream has no start code 9d 01 2a")
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    elif chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1, 14-bit height-1, alpha, 3-bit version
        if data[20] != 0x2F:
            raise ImageError("webp VP8L bitstream has no signature byte 0x2f")
        (bits,) = struct.unpack_from("<I", data, 21)
        if bits >> 29:
            raise ImageError(f"webp VP8L version {bits >> 29} is not 0")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":  # extended: flags, 3 reserved bytes, 24-bit canvas width-1 and height-1
        if data[20] & 0x02:
            raise UnsupportedImageFormat("animated webp is not accepted; send one still frame",
                                         value="animated webp", allowed="jpeg, webp (still)")
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        raise ImageError(f"webp first chunk {chunk!r} is not 'VP8 ', 'VP8L' or 'VP8X'")
    if width == 0 or height == 0:
        raise ImageError(f"webp declares an empty size {width}x{height}")
    return width, height


def _walk_webp_chunks(data: bytes, end: int) -> None:
    """Check every chunk header of the RIFF body lies inside the file; at most MAX_WEBP_CHUNKS of them."""
    pos, chunks = 12, 0
    while pos < end:
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise HostileImage(f"webp has more than {MAX_WEBP_CHUNKS} chunks; a still image needs at most 6",
                               value=chunks, allowed=f"at most {MAX_WEBP_CHUNKS} chunks")
        if pos + 8 > end:
            raise ImageError(truncated("webp", data, f"inside the header of chunk {chunks}"))
        (chunk_size,) = struct.unpack_from("<I", data, pos + 4)
        if pos + 8 + chunk_size > end:
            raise ImageError(f"webp chunk {data[pos:pos + 4].decode('latin-1')!r} declares {chunk_size} bytes, "
                             "more than the file")
        pos += 8 + chunk_size + (chunk_size & 1)


def truncated(name: str, data: bytes, where: str) -> str:
    return f"{name} is truncated {where} ({len(data)} bytes)"
