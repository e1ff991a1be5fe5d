"""Tests for image decoding guards, white square padding and patchify / unpatchify.

Every image is generated in memory (or under ``tmp_path``) with Pillow / numpy; nothing is committed.
"""

from __future__ import annotations

import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from item_embed.data.images import (
    ImageError,
    ImageLimits,
    decode_image,
    load_image_array,
    pad_resize,
    patchify,
    unpatchify,
)

S = 32  # output size; most test images are S x S so no resampling blurs exact checks
WHITE = np.array([255, 255, 255], dtype=np.uint8)


# --------------------------------------------------------------------------- image factories


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb_png(w: int = S, h: int = S, color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (w, h), color))


def rgba_png() -> bytes:
    """Left half opaque red, right half fully transparent (stored as transparent black)."""
    arr = np.zeros((S, S, 4), dtype=np.uint8)
    arr[:, : S // 2] = (255, 0, 0, 255)
    return encode(Image.fromarray(arr, mode="RGBA"))


def palette_png() -> bytes:
    """Palette image: index 0 (black) is transparent, index 1 is blue on the left half."""
    im = Image.new("P", (S, S), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, S // 2, S))
    return encode(im, transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (S, S), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def gray16_png() -> bytes:
    """16-bit grayscale: left half 32768 (mid-grey), right half 16384 (quarter grey)."""
    arr = np.full((S, S), 16384, dtype=np.uint16)
    arr[:, : S // 2] = 32768
    return encode(Image.fromarray(arr))


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    return data[: len(data) // 2]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(w: int, h: int) -> bytes:
    """A ~60-byte PNG whose IHDR claims ``w`` x ``h`` 1-bit pixels (the pixel data is absent).

    Decoding it would either allocate w*h bytes or fail as truncated; a guard that reads only
    the header refuses it with a size reason instead.
    """
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def reason(value, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image_array(value, S, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- odd but usable images


def test_rgb_png_shape_and_dtype() -> None:
    arr = load_image_array(rgb_png(), S)
    assert arr.shape == (S, S, 3) and arr.dtype == np.uint8
    assert (arr == (200, 30, 30)).all()


def test_png_alpha_composited_on_white() -> None:
    arr = load_image_array(rgba_png(), S)
    assert arr.shape == (S, S, 3)
    assert (arr[:, : S // 2] == (255, 0, 0)).all()
    assert (arr[:, S // 2 :] == WHITE).all(), "transparent area must become white, not black"


def test_palette_png_with_transparency() -> None:
    assert Image.open(io.BytesIO(palette_png())).mode == "P"
    arr = load_image_array(palette_png(), S)
    assert (arr[:, : S // 2] == (0, 0, 255)).all()
    assert (arr[:, S // 2 :] == WHITE).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = cmyk_jpeg()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert decode_image(data).mode == "RGB"
    arr = load_image_array(data, S)
    assert arr.shape == (S, S, 3)
    r, g, b = arr[S // 2, S // 2].astype(int)
    assert r > 200 and g < 60 and b < 60  # still red


def test_16bit_grayscale_scaled_not_clipped() -> None:
    data = gray16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = load_image_array(data, S).astype(int)
    # 32768/65535*255 = 127.5 and 16384 -> 63.75; a clipping convert("L") would give 255.
    assert np.abs(arr[:, : S // 2] - 128).max() <= 1
    assert np.abs(arr[:, S // 2 :] - 64).max() <= 1


def test_grayscale_and_la_modes() -> None:
    assert (load_image_array(encode(Image.new("L", (S, S), 77)), S) == 77).all()
    la = Image.new("LA", (S, S), (0, 0))  # fully transparent black
    assert (load_image_array(encode(la), S) == 255).all()


def test_pil_image_value_accepted() -> None:
    arr = load_image_array(Image.new("RGB", (S, S), (1, 2, 3)), S)
    assert (arr == (1, 2, 3)).all()


def test_limits_boundaries_are_inclusive() -> None:
    # 4 px is the minimum side and 25:1 the maximum aspect: both exactly at the limit pass.
    assert load_image_array(rgb_png(4, 4), S).shape == (S, S, 3)
    assert load_image_array(rgb_png(100, 4), S).shape == (S, S, 3)


def test_large_jpeg_uses_draft_and_still_squares() -> None:
    data = encode(Image.new("RGB", (400, 200), (10, 200, 10)), "JPEG", quality=90)
    arr = load_image_array(data, S)
    assert arr.shape == (S, S, 3)
    assert (arr[0] == WHITE).all() and (arr[-1] == WHITE).all()
    assert np.abs(arr[S // 2, S // 2].astype(int) - (10, 200, 10)).max() <= 6


# --------------------------------------------------------------------------- EXIF orientation

ORIENTATION = 0x0112


def quadrants(w: int = 64, h: int = 48) -> Image.Image:
    """An upright photo whose every flip or turn looks different: four coloured quadrants."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (220, 30, 30)
    arr[: h // 2, w // 2 :] = (30, 200, 40)
    arr[h // 2 :, : w // 2] = (30, 40, 220)
    arr[h // 2 :, w // 2 :] = (240, 230, 20)
    return Image.fromarray(arr)


def with_orientation(stored: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(stored, "JPEG", quality=95, subsampling=0, exif=exif)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# orientation -> how a camera stores the upright scene under it (the inverse of what the tag says to do)
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # a phone held upright: the sensor's rows run down the scene
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    upright = quadrants()
    (tmp_path / "upright.jpg").write_bytes(encode(upright, "JPEG", quality=95, subsampling=0))
    (tmp_path / "phone.jpg").write_bytes(with_orientation(upright.transpose(STORED[orientation]), orientation))
    want = load_image_array("upright.jpg", S, root=tmp_path)
    got = load_image_array("phone.jpg", S, root=tmp_path)
    # The test can fail: the pixels as stored are far from the upright photo.
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert mean_diff(pad_resize(raw.convert("RGB"), S), want) > 40
    assert mean_diff(got, want) < 3, f"orientation {orientation} not applied"
    assert decode_image((tmp_path / "phone.jpg").read_bytes()).size == upright.size  # bytes (uploads) too


def test_exif_orientation_6_phone_photo() -> None:
    """The issue's case: a portrait phone photo stored sideways with orientation 6."""
    upright = quadrants(48, 64)
    phone = with_orientation(upright.rotate(90, expand=True), 6)
    assert Image.open(io.BytesIO(phone)).size == (64, 48)  # stored sideways
    assert decode_image(phone).size == (48, 64)
    want = load_image_array(encode(upright, "JPEG", quality=95, subsampling=0), S)
    assert mean_diff(load_image_array(phone, S), want) < 3


def test_exif_orientation_applied_to_draft_decoded_large_jpeg() -> None:
    upright = quadrants(640, 480)
    phone = with_orientation(upright.transpose(Image.Transpose.ROTATE_90), 6)
    want = load_image_array(encode(upright, "JPEG", quality=95, subsampling=0), S)
    assert mean_diff(load_image_array(phone, S), want) < 3


def _broken_exif_orientation_6() -> bytes:
    """A big-endian EXIF block: orientation 6 (readable), and a LONG ResolutionUnit too large for the
    SHORT it is written back as, so ImageOps.exif_transpose raises struct.error rewriting the block."""
    entries = [(ORIENTATION, 3, 1, b"\x00\x06\x00\x00"), (0x0128, 4, 1, struct.pack(">I", 0x7BFC0343))]
    ifd = b"MM\x00*" + struct.pack(">IH", 8, len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(">HHI", tag, kind, count) + value
    return b"Exif\x00\x00" + ifd + struct.pack(">I", 0)


def test_malformed_exif_still_loads_and_is_upright() -> None:
    from PIL import ImageOps

    upright = quadrants()
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, subsampling=0,
                  exif=_broken_exif_orientation_6())
    with Image.open(io.BytesIO(data)) as im, pytest.raises(struct.error):
        ImageOps.exif_transpose(im)  # what a plain exif_transpose would have done with the row
    assert decode_image(data).size == upright.size
    want = load_image_array(encode(upright, "JPEG", quality=95, subsampling=0), S)
    assert mean_diff(load_image_array(data, S), want) < 3


@pytest.mark.parametrize("payload", [b"Exif\x00\x00not a TIFF header at all", b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"])
def test_garbage_exif_loads_as_stored(payload: bytes) -> None:
    data = encode(quadrants(), "JPEG", quality=95, subsampling=0, exif=payload)
    assert decode_image(data).size == (64, 48)


def test_unreadable_exif_loads_as_stored(monkeypatch) -> None:
    """EXIF that Pillow cannot parse at all (older Pillow raises on many such blocks): the image as stored."""
    data = with_orientation(quadrants(), 6)

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert decode_image(data).size == (64, 48)
    assert load_image_array(data, S).shape == (S, S, 3)


# --------------------------------------------------------------------------- unusable images


def test_truncated_jpeg() -> None:
    assert "corrupt or truncated" in reason(truncated_jpeg())


def test_truncated_png() -> None:
    assert "corrupt or truncated" in reason(truncated_png())


def test_empty_bytes() -> None:
    assert "empty" in reason(b"")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    msg = reason("empty.png", root=tmp_path)
    assert "empty" in msg and "0 bytes" in msg


def test_non_image_bytes() -> None:
    assert "not a recognised image format" in reason(b"id,title\nthis is a CSV, not a photo\n")


def test_non_image_file(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("definitely not a PNG")
    assert "not a recognised image format" in reason("notes.png", root=tmp_path)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.parametrize(
    "w, h, expect",
    [
        (100_000, 100_000, "bomb"),  # 10 Gpx: far over Pillow's own hard limit too
        (8_000, 8_000, "pixel cap"),  # 64 Mpx: over our 40 Mpx cap, under Pillow's warning
        (10_000, 10_000, "bomb"),  # 100 Mpx: over both
        (2_000_000, 40, "pixel cap"),  # 80 Mpx and absurd aspect: size is checked first
    ],
)
def test_decompression_bomb_refused_from_header(w: int, h: int, expect: str) -> None:
    data = bomb_png(w, h)
    assert len(data) < 100
    before = _maxrss_mib()
    msg = reason(data)
    assert expect in msg and "bomb" in msg
    # Refused on the header: a decode attempt of this empty IDAT would say "truncated".
    assert "truncated" not in msg
    assert _maxrss_mib() - before < 64, "the guard must not allocate the claimed pixels"


def test_pixel_cap_is_configurable_on_real_image() -> None:
    msg = reason(rgb_png(64, 64), limits=ImageLimits(max_pixels=1000))
    assert "64x64" in msg and "pixel cap" in msg


def test_raised_pixel_cap_is_honoured() -> None:
    # The header passes a 200 Mpx cap; the (absent) pixel data must then fail as truncated.
    msg = reason(bomb_png(10_000, 10_000), limits=ImageLimits(max_pixels=200_000_000))
    assert "corrupt or truncated" in msg


@pytest.mark.parametrize("w, h", [(1, 1), (3, 3), (40, 2)])
def test_too_small(w: int, h: int) -> None:
    msg = reason(rgb_png(w, h))
    assert f"{w}x{h}" in msg and "smaller than 4 px" in msg


@pytest.mark.parametrize("w, h", [(400, 4), (4, 400), (104, 4)])
def test_extreme_aspect_ratio(w: int, h: int) -> None:
    msg = reason(rgb_png(w, h))
    assert "aspect ratio" in msg and f"{w}x{h}" in msg


def test_missing_file_names_path(tmp_path: Path) -> None:
    msg = reason("photos/nope.jpg", root=tmp_path)
    assert "not found" in msg and str(tmp_path / "photos" / "nope.jpg") in msg


def test_relative_path_escaping_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(rgb_png())  # exists: refused for escaping, not missing
    msg = reason("../outside.png", root=root)
    assert "escapes" in msg and "../outside.png" in msg


def test_symlink_escaping_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(rgb_png())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert "escapes" in reason("link.png", root=root)


def test_relative_path_inside_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "p.png").write_bytes(rgb_png())
    assert load_image_array("a/../a/p.png", S, root=tmp_path).shape == (S, S, 3)


def test_file_over_byte_cap(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(rgb_png())
    assert "byte cap" in reason("big.png", root=tmp_path, limits=ImageLimits(max_bytes=10))


@pytest.mark.parametrize("value", ["", "   ", 12345])
def test_empty_path_or_unsupported_value(value) -> None:
    reason(value)


# --------------------------------------------------------------------------- square padding


def test_pad_resize_wide_image_centred_on_white() -> None:
    arr = pad_resize(Image.new("RGB", (64, 32), (255, 0, 0)), S)  # -> 32x16 at rows 8..23
    assert arr.shape == (S, S, 3) and arr.dtype == np.uint8
    assert (arr[:8] == WHITE).all() and (arr[24:] == WHITE).all()
    assert (arr[8:24] == (255, 0, 0)).all()


def test_pad_resize_tall_image_centred_on_white() -> None:
    arr = pad_resize(Image.new("RGB", (20, 40), (0, 0, 255)), S)  # -> 16x32 at cols 8..23
    assert (arr[:, :8] == WHITE).all() and (arr[:, 24:] == WHITE).all()
    assert (arr[:, 8:24] == (0, 0, 255)).all()


def test_pad_resize_odd_padding_is_centred_within_a_pixel() -> None:
    arr = pad_resize(Image.new("RGB", (30, 20), (0, 0, 0)), S)  # -> 32x21: 11 px of padding
    content_rows = np.where((arr != 255).any(axis=(1, 2)))[0]
    top, bottom = content_rows[0], S - 1 - content_rows[-1]
    assert len(content_rows) == 21 and abs(top - bottom) <= 1


def test_load_image_array_squares_non_square_photo() -> None:
    arr = load_image_array(encode(Image.new("RGB", (64, 32), (0, 128, 0))), S)
    assert (arr[:8] == WHITE).all() and (arr[24:] == WHITE).all()
    assert (arr[8:24] == (0, 128, 0)).all()


def test_pad_resize_upscales_small_image() -> None:
    arr = pad_resize(Image.new("RGB", (8, 4), (9, 9, 9)), S)  # -> 32x16
    assert (arr[8:24] == 9).all() and (arr[:8] == 255).all()


# --------------------------------------------------------------------------- patchify


@pytest.mark.parametrize("b, s, p, c", [(2, 8, 4, 3), (3, 12, 3, 1), (1, 16, 16, 3), (2, 6, 1, 2)])
def test_patchify_round_trip_exact(b: int, s: int, p: int, c: int) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, s, s, c, generator=g)
    patches = patchify(images, p)
    assert patches.shape == (b, (s // p) ** 2, p * p * c)
    assert torch.equal(unpatchify(patches, p, channels=c), images)


def test_patchify_uint8_round_trip_exact() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(unpatchify(patchify(images, 8), 8), images)


def test_patch_order_is_row_major_from_top_left() -> None:
    b, s, p, c = 2, 8, 4, 3
    images = torch.arange(b * s * s * c, dtype=torch.float32).reshape(b, s, s, c)
    patches = patchify(images, p)
    assert torch.equal(patches[:, 0], images[:, :p, :p, :].reshape(b, -1))  # top-left
    assert torch.equal(patches[:, 1], images[:, :p, p:, :].reshape(b, -1))  # top-right
    assert torch.equal(patches[:, 2], images[:, p:, :p, :].reshape(b, -1))  # bottom-left
    # Within a patch: pixels row-major, channels last.
    assert torch.equal(patches[0, 0, :c], images[0, 0, 0])
    assert torch.equal(patches[0, 0, c : 2 * c], images[0, 0, 1])
    assert torch.equal(patches[0, 0, p * c : p * c + c], images[0, 1, 0])


def test_patchify_rejects_bad_sizes() -> None:
    with pytest.raises(AssertionError):
        patchify(torch.zeros(1, 10, 10, 3), 4)
    with pytest.raises(AssertionError):
        patchify(torch.zeros(1, 8, 16, 3), 4)
    with pytest.raises(AssertionError):
        unpatchify(torch.zeros(1, 3, 48), 4)
