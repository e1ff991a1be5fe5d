"""Bounded image decoding for the service, and the allocator settings that let its memory go back.

An image's compressed size says nothing about what decoding it takes: a 0.3 MB PNG of one colour
can claim 40 Mpx of 16-bit RGBA and need 320 MB decoded, and each conversion towards RGB at full
size takes another copy. So every decode the service runs (uploads and catalog thumbnails) goes
through :func:`decode_bounded`:

1. the header is read without decoding (Pillow opens lazily): size, mode, format;
2. JPEGs are decoded reduced (``draft``) when the model needs fewer pixels;
3. what the decode will hold is estimated from the pixel count and the bytes per pixel of the
   decoded mode and of its conversions (:func:`decode_cost`);
4. that many bytes are reserved from one :class:`DecodeBudget` shared by the process (waiting while
   other decodes hold it), and an upload that needs more than the whole budget is refused;
5. a large image is reduced (box average) right after decoding, before any conversion, so only
   the decoded image itself (plus a premultiplied copy for alpha) is ever full size.

glibc keeps freed memory in per-thread arenas, and since its mmap threshold grows with the largest
block freed, Pillow's 16 MB image blocks end up there instead of being unmapped on free: eight
clients uploading large images left 5+ GB resident. :func:`tune_allocator` fixes the mmap threshold
(large blocks are mapped and returned on free) and caps the number of arenas; :func:`trim` hands
free heap pages back after a large decode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from PIL import Image

from ..data.images import ImageError, ImageLimits, decode_image

logger = logging.getLogger(__name__)

DEFAULT_DECODE_MEMORY_MB = 512
DEFAULT_UPLOAD_MAX_PIXELS = 16_000_000  # a 16 MP photo (4608 x 3456); 12 MP phones are 4032 x 3024
MIB = 2**20
BASE_COST = 1 * MIB  # decoder state, the reduced copy, Python objects: small but never zero
TRIM_AFTER_BYTES = 64 * MIB  # decodes this large are followed by malloc_trim
REDUCING_GAP = 3.0  # as data.images.pad_resize: reduce by whole factors while >= 3x the target remains

# Bytes per pixel of Pillow's storage for each mode (everything else: 4).
_STORED_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Modes that are box-reduced after decoding when large (averaging is right for these; not for
# palette indices, nor for 16/32-bit grey whose scaling to 8 bits looks at the maximum).
_SHRINKABLE = {"RGB", "RGBA", "L", "LA", "CMYK"}
# Extra bytes per pixel, at full size, of the conversion to 8-bit RGB when the image is not reduced
# first (data.images._to_rgb): alpha is composited on a white canvas (copy, canvas, result, RGB),
# 16/32-bit grey goes through float64 arrays.
_CONVERT_BPP = {"RGB": 0, "L": 4, "CMYK": 4, "1": 4, "RGBA": 16, "LA": 16, "P": 16, "PA": 16,
                "I;16": 24, "I;16L": 24, "I;16B": 24, "I;16N": 24, "I": 28, "F": 28}


class DecodeRefused(ImageError):
    """An image whose header already says it is too large to decode (the service answers 413)."""


class DecodeBudget:
    """Bytes that image decodes may hold at once, shared by every request of the process.

    ``reserve(n)`` waits until ``n`` bytes are free and holds them for the ``with`` block. A
    reservation larger than the whole budget is clamped to it (the decode then runs alone): callers
    that must refuse such images check :attr:`total` first.
    """

    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError(f"the decode memory budget must be positive, not {total_bytes}")
        self.total = int(total_bytes)
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes reserved at once so far (for tests and logs)."""
        return self._peak

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        n = max(0, min(int(nbytes), self.total))
        with self._cond:
            while self._used + n > self.total:
                self._cond.wait()
            self._used += n
            self._peak = max(self._peak, self._used)
        try:
            yield n
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


def _stored_bpp(mode: str) -> int:
    return _STORED_BPP.get(mode, 4)


def _reduce_factors(size: tuple[int, int], target: int) -> tuple[int, int]:
    """The whole factors pad_resize's own resize would reduce by first (Pillow's ``reducing_gap``)."""
    w, h = size
    scale = target / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return max(1, int(w / nw / REDUCING_GAP)), max(1, int(h / nh / REDUCING_GAP))


def decode_cost(im: Image.Image, target: int | None, header_size: tuple[int, int] | None = None) -> int:
    """Bytes a decode of the lazily opened ``im`` will hold at its peak, from the header alone.

    ``im.size`` / ``im.mode`` are what the decoder will produce (after a JPEG ``draft``);
    ``header_size``: the image's own size (a progressive JPEG keeps full-size coefficients);
    ``target``: the side the image ends up at (None: it is not reduced).
    """
    w, h = im.size
    px = w * h
    mode = im.mode
    stored = _stored_bpp(mode)
    shrunk = target is not None and mode in _SHRINKABLE and max(_reduce_factors(im.size, target)) > 1
    if shrunk:
        extra = 4 if mode in ("RGBA", "LA") else 0  # reduce() averages alpha images premultiplied: one copy
    else:
        extra = _CONVERT_BPP.get(mode, 28)
    decoder = 0
    fmt = (im.format or "").upper()
    if fmt == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
        fw, fh = header_size or im.size
        decoder = fw * fh * 2 * len(im.getbands())  # libjpeg's whole-image coefficient buffers (int16)
    elif fmt in ("WEBP", "TIFF", "GIF"):
        decoder = px * 4  # decoded into a buffer of its own, then copied
    return BASE_COST + px * (stored + extra) + decoder


def _shrink(im: Image.Image, target: int) -> Image.Image:
    """``im`` (decoded) box-reduced while at least ``REDUCING_GAP`` x ``target`` remains, as
    pad_resize's resize would do itself; unchanged when small or of a mode that must not be averaged."""
    if im.mode not in _SHRINKABLE:
        return im
    factors = _reduce_factors(im.size, target)
    if max(factors) == 1:
        return im
    return im.reduce(factors)


def decode_bounded(data: bytes, target: int, limits: ImageLimits, budget: DecodeBudget, *,
                   refuse_over_budget: bool = True) -> Image.Image:
    """``data`` decoded to an RGB image of at least ``REDUCING_GAP`` x ``target`` px on its long side
    (or its own size), holding at most its estimated cost of ``budget`` while it decodes.

    Raises DecodeRefused for a header over ``limits.max_pixels`` or a decode that needs more than the
    whole budget (when ``refuse_over_budget``; otherwise such a decode waits to run alone), and
    ImageError as ``data.images.decode_image`` does for everything else (same messages).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeRefused(f"decompression bomb refused ({e})") from None
    except Exception:  # not an image (or a header Pillow cannot read): decode_image says why
        return decode_image(data, None, limits, draft_size=target)
    w, h = im.size
    if w * h > limits.max_pixels:
        raise DecodeRefused(f"image claims {w}x{h} px, over the {limits.max_pixels:,}-pixel cap")
    if min(w, h) < limits.min_side or max(w, h) / max(1, min(w, h)) > limits.max_aspect:
        return decode_image(data, None, limits, draft_size=target)  # refused from the header, its message
    if im.format == "JPEG":
        im.draft("RGB", (target, target))  # as decode_image does: decode at 1/2, 1/4 or 1/8 when enough
    cost = decode_cost(im, target, (w, h))
    if cost > budget.total and refuse_over_budget:
        raise DecodeRefused(f"a {w}x{h} px {im.mode} image needs about {math.ceil(cost / MIB):,} MiB to decode, "
                            f"over the {budget.total // MIB:,} MiB decode budget")
    with budget.reserve(cost):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
                small = _shrink(im, target)
        except MemoryError:
            raise
        except Exception:  # damaged data: decode_image fails on it the same way, with the usual message
            del im
            return decode_image(data, None, limits, draft_size=target)
        if small is not im:
            del im  # the full-size image goes now, before the conversions
            # Checked on the full-size header above; the reduced image may round a side below them.
            limits = replace(limits, min_side=1, max_aspect=math.inf)
        try:
            return decode_image(small, None, limits)  # orientation, alpha on white, 8-bit RGB
        finally:
            del small
            if cost >= TRIM_AFTER_BYTES:
                trim()


# ------------------------------------------------------------------------------ the allocator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
DEFAULT_ARENA_MAX = 2
DEFAULT_MMAP_THRESHOLD = 4 * MIB


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no arenas to tune)
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator(arena_max: int = DEFAULT_ARENA_MAX, mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Make glibc return large freed blocks to the system and cap its arenas (False: not glibc).

    M_MMAP_THRESHOLD fixed at ``mmap_threshold``: blocks at least that large (Pillow allocates images
    in 16 MB blocks) are mapped on their own and unmapped on free; left alone, glibc raises the
    threshold to the largest block freed and keeps such blocks in its heaps. M_ARENA_MAX: threads
    share ``arena_max`` heaps instead of 8 per core, each keeping its own free memory. Call it early,
    before the worker threads start: arenas made before keep existing.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_ARENA_MAX, int(arena_max))) & bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    if not ok:
        logger.warning("mallopt refused the allocator settings: freed image memory may stay resident")
    return ok


def trim() -> None:
    """Give free heap memory back to the system (glibc malloc_trim; nothing elsewhere)."""
    libc = _glibc_cached()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC: list[ctypes.CDLL | None] = []


def _glibc_cached() -> ctypes.CDLL | None:
    if not _LIBC:
        _LIBC.append(_glibc())
    return _LIBC[0]
