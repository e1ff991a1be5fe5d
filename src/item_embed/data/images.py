"""Image decoding with guards, square padding, patchify / unpatchify, and per-patch HOG.

Product photos are padded to a square on white (not cropped: the whole product matters),
resized, and cut into ``patch_size`` x ``patch_size`` patches of raw pixels.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Decoding is bounded by our own pixel cap (checked on the header, before any decoding).
DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 4  # below this an image carries no product information
MAX_ASPECT = 25.0  # a 25:1 banner padded to a square is a line: reject rather than embed noise
MAX_FILE_BYTES = 64 * 1024 * 1024
ORIENTATION = 0x0112  # the EXIF orientation tag


class ImageError(ValueError):
    """An image that cannot be used; the message says why (the caller adds the row)."""


@dataclass
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = MIN_SIDE
    max_aspect: float = MAX_ASPECT
    max_bytes: int = MAX_FILE_BYTES


def resolve_location(value: str | os.PathLike, root: Path | str | None) -> Path | str:
    """Where an image given as a path or URI lives: a local Path, or a remote URI (str).

    A relative path resolves against ``root`` (a folder or a URI) and must stay inside it (no
    ``../../etc/passwd``); absolute paths and URIs are taken as given (the catalog's author chose them).
    """
    from . import remote

    text = os.fspath(value)
    if isinstance(text, bytes):
        raise ImageError("image path given as bytes: expected text")
    text = text.strip()
    if not text:
        raise ImageError("image path is empty")
    if "\0" in text:  # no file system can hold it; open() would raise ValueError
        raise ImageError(f"image path: contains a NUL byte: {_show(text)}")
    if remote.is_uri(text):
        return text if remote.is_remote(text) else Path(remote.local_path(text))
    root = remote.unmangle(root) if root is not None else None
    if isinstance(root, str) and remote.is_remote(root):
        if Path(text).is_absolute():
            return Path(text)
        return remote.join(root, text)
    if isinstance(root, str) and remote.is_uri(root):
        root = remote.local_path(root)
    path = Path(text)
    if not path.is_absolute():
        try:
            base = Path(root or Path.cwd()).resolve()
            path = (base / path).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # 3.11 reports a symlink loop as RuntimeError
            raise path_error(e, Path(root or ".") / text) from None
        if not path.is_relative_to(base):
            raise ImageError(f"image path {text!r} escapes the image root {base}")
    return path


# Longer paths in messages are cut in the middle: a 4 kB name would drown the report.
_SHOWN_CHARS = 160


def _show(path: Any) -> str:
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    # Shown escaped: a NUL, or a lone surrogate from a non-UTF-8 name, would break a printed report.
    text = text.replace("\0", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > _SHOWN_CHARS:
        text = f"{text[:100]}...{text[-50:]} ({len(text)} characters)"
    return text


def _longest_name(path: Any) -> int:
    """Bytes in the longest component of ``path`` (what NAME_MAX, 255 on most file systems, limits)."""
    try:
        return max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    except (UnicodeError, ValueError):
        return 0


def path_error(e: BaseException, path: Any) -> ImageError:
    """The ImageError for an OS refusal to look up or open ``path``: the reason in words, path shown."""
    shown = _show(path)
    code = getattr(e, "errno", None)
    if isinstance(e, RuntimeError) or code == errno.ELOOP:
        return ImageError(f"image path: symlink loop: {shown}")
    if isinstance(e, ValueError):  # an embedded NUL, or a name the file system encoding cannot hold
        if "\0" in str(os.fspath(path) if isinstance(path, os.PathLike) else path) or "null" in str(e):
            return ImageError(f"image path: contains a NUL byte: {shown}")
        return ImageError(f"image path: not a valid file name ({e}): {shown}")
    if code == errno.ENAMETOOLONG:
        longest = _longest_name(path)
        what = f"a name of {longest} bytes, over the file system's 255" if longest > 255 else "the whole path"
        return ImageError(f"image path: file name too long ({what}): {shown}")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return ImageError(f"image file not found: {shown}")
    if code == errno.EISDIR:
        return ImageError(f"image path is a directory, not a regular file: {shown}")
    if code in (errno.EACCES, errno.EPERM):
        return ImageError(f"image file not readable (permission denied): {shown}")
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return ImageError(f"image file unreadable ({reason}): {shown}")


def _not_regular(mode: int, path: Any) -> ImageError | None:
    """Why a file of ``mode`` is no image file (None for a regular file). Reading a FIFO would block
    until a writer comes; a device such as /dev/zero never ends."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        what = "a directory"
    elif stat.S_ISFIFO(mode):
        what = "a FIFO (named pipe)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "a special file"
    return ImageError(f"image path is {what}, not a regular file: {_show(path)}")


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a local image file, or an ImageError saying why not: missing, a directory, FIFO or
    device (refused before it is opened, and again on the open file should it have been swapped in
    between; opened non-blocking, so a FIFO never stalls the reader), unreadable, empty or over
    ``max_bytes``."""
    try:
        info = os.stat(path)
    except (OSError, ValueError) as e:
        raise path_error(e, path) from None
    if (refused := _not_regular(info.st_mode, path)) is not None:
        raise refused
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as e:
        raise path_error(e, path) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if (refused := _not_regular(info.st_mode, path)) is not None:
            raise refused
        if info.st_size > max_bytes:
            raise ImageError(f"image file is {info.st_size:,} bytes, over the {max_bytes:,}-byte cap")
        try:
            data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
        except OSError as e:
            raise path_error(e, path) from None
    if not data:
        raise ImageError(f"image file is empty (0 bytes): {_show(path)}")
    if len(data) > max_bytes:
        raise ImageError(f"image file is over the {max_bytes:,}-byte cap")
    return data


def _read_source(value: Any, root: Path | str | None, limits: ImageLimits,
                 fetch: Any = None) -> bytes | Image.Image:
    """Bytes of an image given as bytes, a path (relative to ``root``), a URI or a PIL image.

    ``fetch``: the :class:`~item_embed.data.remote.FetchOptions` for remote images (default ones if None).
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError("image bytes are empty")
        return data
    if isinstance(value, (str, os.PathLike)):
        location = resolve_location(value, root)
        if isinstance(location, str):
            from .remote import fetch_bytes

            return fetch_bytes(location, limits.max_bytes, fetch)
        return read_image_file(location, limits.max_bytes)
    raise ImageError(f"unsupported image value of type {type(value).__name__}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Plain 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the real range to 8 bits (convert("L") would clip).
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(canvas, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_image(
    value: Any, root: Path | str | None = None, limits: ImageLimits | None = None, draft_size: int | None = None,
    fetch: Any = None,
) -> Image.Image:
    """Decode ``value`` (bytes, path or PIL image) to an upright (EXIF orientation applied) RGB PIL
    image, or raise ImageError.

    ``draft_size`` lets JPEG decoding skip resolution we would throw away (much faster for
    large photos that end up at e.g. 96 px).
    """
    limits = limits or ImageLimits()
    src = _read_source(value, root, limits, fetch)
    try:
        with warnings.catch_warnings():
            # Our own cap (checked below from the header) decides; Pillow's warning would not
            # respect a raised cap. Pillow still refuses outright above twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageError(
                    f"image claims {w}x{h} px, over the {limits.max_pixels:,}-pixel cap "
                    "(possible decompression bomb)"
                )
            if min(w, h) < limits.min_side:
                raise ImageError(f"image is {w}x{h} px, smaller than {limits.min_side} px on a side")
            if max(w, h) / min(w, h) > limits.max_aspect:
                raise ImageError(f"image is {w}x{h} px: aspect ratio over {limits.max_aspect:g}:1")
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            return _to_rgb(_upright(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 -- a decoder tripping over hostile bytes (struct.error, IndexError, ...)
        raise ImageError(f"corrupt image: the decoder failed ({type(e).__name__}: {e})") from None


# EXIF orientation -> the transposition that shows the photo upright (the table ImageOps.exif_transpose uses).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned the way its EXIF orientation says it is seen (phone photos are stored sideways,
    orientation 6 or 8), as ``ImageOps.exif_transpose`` turns it. Only the pixels are turned: that
    function also rewrites the EXIF block, which raises on many malformed blocks (struct.error,
    ValueError, TypeError) where the orientation itself reads fine. EXIF that cannot be read at all
    leaves the image as stored rather than losing it."""
    try:
        method = _UPRIGHT.get(im.getexif().get(ORIENTATION))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 -- unreadable EXIF, or an unhashable orientation value: pixels as stored
        return im
    return im if method is None else im.transpose(method)


def pad_resize(im: Image.Image, size: int) -> np.ndarray:
    """Resize the longest side to ``size`` and pad to a white square. Returns uint8 (size, size, 3)."""
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def load_image_array(
    value: Any, size: int, root: Path | str | None = None, limits: ImageLimits | None = None, fetch: Any = None
) -> np.ndarray:
    """Decode and prepare one image: uint8 (size, size, 3), or raise ImageError."""
    return pad_resize(decode_image(value, root, limits, draft_size=size, fetch=fetch), size)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, S, S, C) channels-last images -> (B, N, p*p*C) patches, row-major over the grid."""
    b, s, s2, c = images.shape
    assert s == s2 and s % patch_size == 0, f"image {s}x{s2} not a multiple of patch {patch_size}"
    g = s // patch_size
    x = images.reshape(b, g, patch_size, g, patch_size, c)  # (B, gh, p, gw, p, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
    return x.reshape(b, g * g, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, S, S, C)."""
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    assert g * g == n, f"{n} patches do not form a square grid"
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gh, p, gw, p, C)
    return x.reshape(b, g * patch_size, g * patch_size, channels)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(..., 3) channels-last RGB -> (...) BT.601 luminance."""
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


HOG_BINS = 9  # unsigned orientations, 20 degrees each (Dalal & Triggs)
HOG_CELLS = 2  # cells per patch side: a 16-px patch is 2x2 cells of 8 px


def patch_hog(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, S, S, 3) pixel values in [0, 255] (uint8, or float as the HOG stems pass with masked patches
    blanked) -> (B, N, HOG_CELLS**2 * HOG_BINS): per patch, the gradient-magnitude
    histograms of its cells over unsigned orientations, computed on luminance, L2-normalised per patch
    and scaled so each entry has mean square 1 like the pixel target.

    Why (MaskFeat, Wei et al. 2022): pixel targets spend the image side on colour and exact intensity;
    edges and their directions are what a colour variant shares with its siblings (on hm-dev this HOG of
    the 96-px photo, the ``hog`` baseline, finds the same garment image-to-image at R@1 0.43, the RGB
    16x16 thumbnail at 0.13).
    A patch with no edges (flat background) gets a near-zero target instead of amplified noise.
    """
    b, s, _, _ = images.shape
    assert patch_size % HOG_CELLS == 0, f"patch {patch_size} does not split into {HOG_CELLS} cells"
    x = images.float() / 255.0
    lum = luminance(x).unsqueeze(1)  # (B, 1, S, S)
    lum = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    gx = lum[:, :, 1:-1, 2:] - lum[:, :, 1:-1, :-2]
    gy = lum[:, :, 2:, 1:-1] - lum[:, :, :-2, 1:-1]
    mag = torch.sqrt(gx * gx + gy * gy)  # (B, 1, S, S)
    angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # [0, pi)
    bins = (angle * (HOG_BINS / math.pi)).long().clamp_(max=HOG_BINS - 1)
    hist = torch.zeros(b, HOG_BINS, s, s, dtype=mag.dtype, device=mag.device).scatter_(1, bins, mag)
    cell = patch_size // HOG_CELLS
    hist = F.avg_pool2d(hist, cell) * (cell * cell)  # (B, bins, S/cell, S/cell): sums per cell
    g = s // patch_size
    hist = hist.reshape(b, HOG_BINS, g, HOG_CELLS, g, HOG_CELLS).permute(0, 2, 4, 3, 5, 1)
    hist = hist.reshape(b, g * g, HOG_CELLS * HOG_CELLS * HOG_BINS)  # (B, N, D), row-major like patchify
    # eps ~ one faint edge (0.1 intensity step along a cell side), so flat patches stay near zero.
    norm = hist.norm(dim=-1, keepdim=True) + 0.1 * cell
    return hist / norm * math.sqrt(hist.shape[-1])
