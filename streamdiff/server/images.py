"""Safe handling of the encoded images clients send: probe the header, check limits, then decode.

No client byte reaches a decoder unchecked. :func:`probe` reads the format from the magic bytes and the declared
width and height from the header (JPEG SOF segment; WebP ``VP8 ``/``VP8L``/``VP8X`` chunk) without decoding;
:func:`decode` probes, refuses disallowed formats and images declaring too many pixels, then lets Pillow decode only
that format and checks the decoded size equals the declared one. Every failure is an
:class:`~streamdiff.errors.ImageError` with a stable ``code`` (``bad_image``, ``unsupported_format``,
``image_too_large``). All functions are pure and safe to call from worker threads.

Next: the server calls :func:`probe` on each frame as it arrives (cheap), :func:`decode` in a worker thread, and
:func:`encode` on the engine's output.
"""

from __future__ import annotations

import enum
import io
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FrameError, ImageError, ImageTooLarge, UnsupportedImageFormat

if TYPE_CHECKING:
    from .limits import ServerLimits

__all__ = ["MAX_JPEG_SEGMENTS", "ImageFormat", "ImageInfo", "check", "decode", "encode", "probe"]

#: JPEG segments read before the frame header (SOF) at most; real files have fewer than ~20.
MAX_JPEG_SEGMENTS = 64


class ImageFormat(str, enum.Enum):
    """The encodings streamdiff accepts and produces on the wire."""

    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"


@dataclass(frozen=True)
class ImageInfo:
    """What an encoded image's header declares (nothing decoded)."""

    format: ImageFormat
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# Formats recognised only to name them in the error: (magic prefix, offset, name).
_OTHER_FORMATS: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"BM", 0, "BMP"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"qoif", 0, "QOI"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
)

# JPEG start-of-frame markers Pillow/libjpeg decode: baseline, extended sequential, progressive (Huffman coding).
_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
# Other SOF markers: lossless, hierarchical, arithmetic coding.
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def probe(body: bytes | bytearray | memoryview) -> ImageInfo:
    """Format and declared size of an encoded image, from its magic bytes and header only.

    Raises :class:`UnsupportedImageFormat` for anything but JPEG (baseline, extended, progressive) and still WebP
    (lossy, lossless, extended), and :class:`ImageError` for a truncated or inconsistent header.
    """
    data = body if isinstance(body, bytes) else bytes(body)
    if data.startswith(b"\xff\xd8\xff"):
        return _probe_jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _probe_webp(data)
    if data.startswith(b"\xff\xd8") or (data[:4] == b"RIFF" and len(data) < 12) or len(data) < 4:
        raise ImageError(f"{_describe(data)}; send JPEG or WebP")
    name = _other_format(data)
    if name is not None:
        raise UnsupportedImageFormat(f"{name} images are not accepted; send JPEG or WebP", value=name,
                                     allowed="jpeg, webp")
    raise UnsupportedImageFormat(f"{_describe(data)}; send JPEG or WebP", allowed="jpeg, webp")


def check(info: ImageInfo, max_pixels: int, formats: Collection[ImageFormat] = tuple(ImageFormat)) -> None:
    """Raise unless ``info`` is in an allowed format and declares at most ``max_pixels`` pixels."""
    if info.format not in formats:
        allowed = ", ".join(f.value for f in formats)
        raise UnsupportedImageFormat(f"{info.format.value} images are not accepted here; allowed: {allowed}",
                                     value=info.format.value, allowed=allowed)
    if info.pixels > max_pixels:
        raise ImageTooLarge(
            f"image declares {info.width}x{info.height} = {info.pixels} pixels, more than the limit of {max_pixels}",
            value=f"{info.width}x{info.height}", allowed=f"at most {max_pixels} pixels",
        )


def decode(body: bytes | bytearray | memoryview, limits: ServerLimits) -> np.ndarray:
    """Decode a client's JPEG or WebP into uint8 RGB ``[H, W, 3]`` after checking it against ``limits``.

    Uses ``limits.allowed_input_formats`` and ``limits.max_frame_pixels``. Pillow is asked to open only the probed
    format, and its declared size is compared with the probe's before any pixel is decoded.
    """
    info = probe(body)
    check(info, limits.max_frame_pixels, limits.allowed_input_formats)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(body)), formats=[info.format.value.upper()]) as image:
            if image.size != (info.width, info.height):
                raise ImageError(f"{info.format.value} header declares {info.width}x{info.height} but the decoder "
                                 f"reads {image.size[0]}x{image.size[1]}")
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise UnsupportedImageFormat(f"images with {frames} frames (animated or multi-picture) are not "
                                             "accepted; send one still frame", value=frames, allowed="1 frame")
            image.load()
            rgb = image.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, struct.error) as exc:
        raise ImageError(f"{info.format.value} image could not be decoded: {_first_line(exc)}") from None
    frame = np.array(rgb, dtype=np.uint8)  # writable (torch.from_numpy warns on read-only arrays)
    if frame.shape != (info.height, info.width, 3):
        raise ImageError(f"decoded image has shape {frame.shape}, expected ({info.height}, {info.width}, 3)")
    return frame


def encode(frame: np.ndarray, format: ImageFormat | str = ImageFormat.JPEG, quality: int = 80) -> bytes:
    """Encode a uint8 RGB ``[H, W, 3]`` frame as JPEG or WebP (``quality`` in [1, 100]); tuned for speed.

    WebP at quality 100 is **lossless** (``VP8L``): it decodes to exactly ``frame`` (a bit-exact path end to end).
    """
    from PIL import Image

    from ..config import to_enum

    fmt = to_enum(ImageFormat, format, "format")
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape, dtype = getattr(frame, "shape", None), getattr(frame, "dtype", None)
        raise FrameError(f"frame {type(frame).__name__} of shape {shape} and dtype {dtype} is not a uint8 RGB "
                         "[H, W, 3] array")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise FrameError(f"quality={quality!r} is outside [1, 100]")
    out = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(frame))
    if fmt is ImageFormat.JPEG:
        image.save(out, "JPEG", quality=quality)
    elif quality == 100:
        image.save(out, "WEBP", lossless=True, quality=100, method=0)
    else:
        image.save(out, "WEBP", quality=quality, method=0)
    return out.getvalue()


# -- JPEG ------------------------------------------------------------------------------------------------------


def _probe_jpeg(data: bytes) -> ImageInfo:
    pos = 2  # after SOI
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos >= len(data):
            raise ImageError(_truncated("jpeg", data, "before its frame header (SOF)"))
        if data[pos] != 0xFF:
            raise ImageError(f"jpeg marker expected at byte {pos}, found 0x{data[pos]:02x}")
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= len(data):
            raise ImageError(_truncated("jpeg", data, "inside a marker"))
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            name = {0x00: "a stuffed zero", 0xD8: "a second SOI", 0xD9: "EOI", 0xDA: "SOS"}[marker]
            raise ImageError(f"jpeg has {name} before its frame header (SOF)")
        if pos + 2 > len(data):
            raise ImageError(_truncated("jpeg", data, "inside a segment length"))
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageError(f"jpeg segment 0x{marker:02x} at byte {pos - 2} has invalid length {length}")
        if marker in _SOF_SUPPORTED or marker in _SOF_OTHER:
            return _jpeg_frame_header(data, pos, marker, length)
        pos += length
    raise ImageError(f"jpeg has more than {MAX_JPEG_SEGMENTS} segments before its frame header (SOF)")


def _jpeg_frame_header(data: bytes, pos: int, marker: int, length: int) -> ImageInfo:
    if marker in _SOF_OTHER:
        raise UnsupportedImageFormat(
            f"jpeg with SOF marker 0x{marker:02x} (lossless, hierarchical or arithmetic-coded) is not supported; "
            "send a baseline or progressive JPEG", value=f"SOF 0x{marker:02x}", allowed="baseline, progressive",
        )
    if length < 8 or pos + 8 > len(data):
        raise ImageError(_truncated("jpeg", data, "inside its frame header (SOF)"))
    precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
    if precision != 8:
        raise UnsupportedImageFormat(f"jpeg with {precision}-bit samples is not supported; send 8-bit JPEG",
                                     value=precision, allowed="8")
    if components not in (1, 3, 4):
        raise ImageError(f"jpeg declares {components} colour components; expected 1, 3 or 4")
    if width == 0 or height == 0:
        raise ImageError(f"jpeg declares an empty or deferred (DNL) size {width}x{height}")
    return ImageInfo(ImageFormat.JPEG, width, height)


# -- WebP (RIFF container, https://developers.google.com/speed/webp/docs/riff_container) -----------------------


def _probe_webp(data: bytes) -> ImageInfo:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 > len(data):
        raise ImageError(f"webp is truncated: its RIFF header declares {riff_size + 8} bytes, got {len(data)}")
    if len(data) < 30:
        raise ImageError(_truncated("webp", data, "inside its first chunk"))
    chunk = data[12:16]
    (chunk_size,) = struct.unpack_from("<I", data, 16)
    if chunk_size + 20 > len(data):
        raise ImageError(f"webp chunk {chunk.decode('latin-1')!r} declares {chunk_size} bytes, more than the file")
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
    return ImageInfo(ImageFormat.WEBP, width, height)


# -- messages ---------------------------------------------------------------------------------------------------


def _other_format(data: bytes) -> str | None:
    for magic, offset, name in _OTHER_FORMATS:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def _describe(data: bytes) -> str:
    if not data:
        return "the image body is empty"
    if data.startswith(b"\xff\xd8"):
        return "the body starts like a JPEG but is truncated"
    if data.startswith(b"RIFF"):
        return "the body is a RIFF file but not a WebP image" if len(data) >= 12 else "the RIFF header is truncated"
    if len(data) < 4:
        return f"the image body is only {len(data)} bytes"
    return f"the body is not a known image format (starts with {data[:8].hex(' ')})"


def _truncated(name: str, data: bytes, where: str) -> str:
    return f"{name} is truncated {where} ({len(data)} bytes)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
