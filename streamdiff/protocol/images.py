"""Safe handling of the encoded images clients send: walk the structure, check limits, then decode within a budget.

No client byte reaches a decoder unchecked. :func:`probe` walks the whole file without decoding — every JPEG marker
segment up to EOI (the entropy-coded data between them is skipped with C-speed regular-expression scans, so the
walk is O(n) with Python work only per segment), every WebP RIFF chunk — and returns the format and the declared
width and height. It refuses what no real encoder writes but a decoder would pay for (``hostile_image``): more
than :data:`MAX_JPEG_SCANS` scans, :data:`MAX_JPEG_SEGMENTS` segments, :data:`MAX_JPEG_METADATA_SEGMENTS`
APPn/COM segments, :data:`MAX_JPEG_FILL_BYTES` fill bytes or :data:`MAX_WEBP_CHUNKS` chunks. :func:`decode`
probes, refuses disallowed formats and images declaring too many pixels, then lets Pillow decode only that format,
feeding a JPEG decoder :data:`DECODE_CHUNK_BYTES` at a time and stopping once the thread's CPU time passes
``limits.max_decode_ms`` (``decode_too_slow``; libwebp decodes in one call, bounded by its pixels, and is checked
after it); the decoded size must equal the declared one.
:class:`DecodeBudget` is one client's decode CPU time over a sliding window. Every failure is an
:class:`~streamdiff.errors.ImageError` with a stable ``code`` (``bad_image``, ``unsupported_format``,
``image_too_large``, ``hostile_image``, ``decode_too_slow``). The functions are pure and safe in worker threads.

Next: the server calls :func:`decode` on each frame in a worker thread (never on the event loop) and :func:`encode`
on the engine's output, in another pool.
"""

from __future__ import annotations

import collections
import enum
import io
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DecodeTooSlow, FrameError, ImageError, ImageTooLarge, UnsupportedImageFormat
from .image_structure import (
    MAX_JPEG_FILL_BYTES,
    MAX_JPEG_METADATA_SEGMENTS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_WEBP_CHUNKS,
    jpeg_size,
    webp_size,
)

if TYPE_CHECKING:
    from .limits import ServerLimits

__all__ = ["DECODE_CHUNK_BYTES", "MAX_JPEG_FILL_BYTES", "MAX_JPEG_METADATA_SEGMENTS", "MAX_JPEG_SCANS",
           "MAX_JPEG_SEGMENTS", "MAX_WEBP_CHUNKS", "DecodeBudget", "ImageFormat", "ImageInfo", "check", "decode",
           "encode", "probe"]

#: Bytes fed to the JPEG decoder at a time: the CPU-time limit is checked between chunks (a 1 MB frame: 256 checks).
DECODE_CHUNK_BYTES = 4096


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

def probe(body: bytes | bytearray | memoryview) -> ImageInfo:
    """Format and declared size of an encoded image, from its magic bytes and header only.

    Raises :class:`UnsupportedImageFormat` for anything but JPEG (baseline, extended, progressive) and still WebP
    (lossy, lossless, extended), and :class:`ImageError` for a truncated or inconsistent header.
    """
    data = body if isinstance(body, bytes) else bytes(body)
    if data.startswith(b"\xff\xd8\xff"):
        return ImageInfo(ImageFormat.JPEG, *jpeg_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageInfo(ImageFormat.WEBP, *webp_size(data))
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


def decode(body: bytes | bytearray | memoryview, limits: ServerLimits,
           cancelled: Callable[[], bool] | None = None) -> np.ndarray:
    """Decode a client's JPEG or WebP into uint8 RGB ``[H, W, 3]`` after checking it against ``limits``.

    Uses ``limits.allowed_input_formats``, ``limits.max_frame_pixels`` and ``limits.max_decode_ms`` (CPU time of
    the calling thread, checked between chunks of input: a slow decode is stopped there with
    :class:`DecodeTooSlow`). Pillow is asked to open only the probed format, and its declared size is compared with
    the probe's before any pixel is decoded. ``cancelled()`` true (the client left) stops the decode likewise.
    """
    info = probe(body)
    check(info, limits.max_frame_pixels, limits.allowed_input_formats)
    from PIL import Image

    reader = _MeteredReader(bytes(body), limits.max_decode_ms, cancelled)
    try:
        with Image.open(reader, formats=[info.format.value.upper()]) as image:
            if image.size != (info.width, info.height):
                raise ImageError(f"{info.format.value} header declares {info.width}x{info.height} but the decoder "
                                 f"reads {image.size[0]}x{image.size[1]}")
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise UnsupportedImageFormat(f"images with {frames} frames (animated or multi-picture) are not "
                                             "accepted; send one still frame", value=frames, allowed="1 frame")
            image.decodermaxblock = DECODE_CHUNK_BYTES
            image.load()
            rgb = image.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, struct.error) as exc:
        raise ImageError(f"{info.format.value} image could not be decoded: {_first_line(exc)}") from None
    reader.check()  # the last chunk's work, and the conversion
    frame = np.array(rgb, dtype=np.uint8)  # writable (torch.from_numpy warns on read-only arrays)
    if frame.shape != (info.height, info.width, 3):
        raise ImageError(f"decoded image has shape {frame.shape}, expected ({info.height}, {info.width}, 3)")
    return frame


class _MeteredReader(io.BytesIO):
    """The body as a file whose every read first checks the decoding thread's CPU time and ``cancelled``."""

    def __init__(self, data: bytes, max_ms: float, cancelled: Callable[[], bool] | None) -> None:
        super().__init__(data)
        self._start, self._max_ms, self._cancelled = time.thread_time(), max_ms, cancelled

    def check(self) -> None:
        used_ms = (time.thread_time() - self._start) * 1000
        if used_ms > self._max_ms:
            raise DecodeTooSlow(f"decoding this image used {used_ms:.0f} ms of CPU time, more than the limit of "
                                f"{self._max_ms:g} ms per frame; it was stopped", value=round(used_ms),
                                allowed=f"at most {self._max_ms:g} ms")
        if self._cancelled is not None and self._cancelled():
            raise ImageError("decoding was cancelled: the stream ended")

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(size)


class DecodeBudget:
    """One client's decode CPU time over the last ``window_s`` seconds, at most ``share`` of one core.

    Pure bookkeeping on an injected clock: :meth:`check` before a decode (raises :class:`DecodeTooSlow` while the
    window's total is over ``share * window_s``), :meth:`spend` after it. Entries older than the window are
    forgotten; the deque holds at most one entry per decoded frame of the window.
    """

    def __init__(self, share: float, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.window_s, self._clock = share, window_s, clock
        self._spent: collections.deque[tuple[float, float]] = collections.deque()
        self._total_ms = 0.0

    @property
    def allowed_ms(self) -> float:
        return self.share * self.window_s * 1000

    def used_ms(self) -> float:
        """Decode CPU milliseconds spent within the window ending now."""
        horizon = self._clock() - self.window_s
        while self._spent and self._spent[0][0] <= horizon:
            self._total_ms -= self._spent.popleft()[1]
        if not self._spent:
            self._total_ms = 0.0  # no drift from float sums
        return self._total_ms

    def check(self) -> None:
        used = self.used_ms()
        if used > self.allowed_ms:
            raise DecodeTooSlow(
                f"this client's decodes used {used:.0f} ms of CPU time in the last {self.window_s:g} s, more than "
                f"its share of {self.share:g} core ({self.allowed_ms:.0f} ms); frames are refused until it drops",
                value=round(used), allowed=f"at most {self.allowed_ms:.0f} ms per {self.window_s:g} s")

    def spend(self, ms: float) -> None:
        self._spent.append((self._clock(), ms))
        self._total_ms += ms


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
