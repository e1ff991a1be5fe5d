"""Image decoding with guards, square padding, patchify / unpatchify, and per-patch HOG.

Product photos are padded to a square on white (not cropped: the whole product matters),
resized, and cut into ``patch_size`` x ``patch_size`` patches of raw pixels.
"""

from __future__ import annotations

import io
import math
import os
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

    text = os.fspath(value).strip()
    if not text:
        raise ImageError("image path is empty")
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
        base = Path(root or Path.cwd()).resolve()
        path = (base / path).resolve()
        if not path.is_relative_to(base):
            raise ImageError(f"image path {text!r} escapes the image root {base}")
    return path


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
        path = location
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        if size > limits.max_bytes:
            raise ImageError(f"image file is {size:,} bytes, over the {limits.max_bytes:,}-byte cap")
        return path.read_bytes()
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
    """Decode ``value`` (bytes, path or PIL image) to an RGB PIL image, or raise ImageError.

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
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None


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
