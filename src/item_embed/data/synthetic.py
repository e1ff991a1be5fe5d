"""Deterministic synthetic product catalog for demos and tests.

Every product is a unique combination of category, colour, pattern, brand,
material and size.  Each product is listed 2-4 times; listings of the same
product share a ``group`` and differ the way real duplicate listings do:
the photo is shifted, scaled, rotated, re-lit, shot on a slightly tinted
background and re-encoded, and the title is reworded from the same
attributes.  Some title templates leave out the colour or the pattern, so a
model has to look at the image to tell those products apart.

Everything is drawn with Pillow from ``numpy.random.default_rng``-family
generators seeded by ``seed``, so the same arguments give byte-identical
output on any machine with the same library versions and nothing is
downloaded.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = [
    "BRANDS",
    "CATEGORIES",
    "CATEGORY_NOUNS",
    "COLOURS",
    "PATTERNS",
    "generate_catalog",
    "max_products",
    "write_catalog",
]

# --------------------------------------------------------------------------
# Attribute vocabularies
# --------------------------------------------------------------------------

#: Category -> nouns a seller may use for it; the first one is canonical.
CATEGORY_NOUNS: dict[str, tuple[str, ...]] = {
    "mug": ("mug", "coffee mug", "cup"),
    "t-shirt": ("t-shirt", "tee", "T shirt"),
    "cap": ("cap", "baseball cap", "hat"),
    "pillow": ("pillow", "cushion", "throw pillow"),
    "lamp": ("lamp", "table lamp", "desk light"),
    "sock": ("socks", "sock", "crew socks"),
    "bag": ("bag", "tote bag", "tote"),
    "vase": ("vase", "flower vase", "bud vase"),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_NOUNS)

#: Colour name -> RGB.  Kept far apart so colours stay recognisable after
#: brightness jitter and JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (206, 32, 41),
    "orange": (245, 130, 32),
    "yellow": (250, 210, 40),
    "green": (46, 150, 60),
    "teal": (0, 140, 140),
    "blue": (35, 85, 200),
    "purple": (120, 50, 160),
    "pink": (240, 120, 170),
    "black": (30, 30, 30),
    "white": (245, 245, 245),
}

# Occasional synonyms make the text side less trivially aligned.
_COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("scarlet",),
    "orange": ("tangerine",),
    "yellow": ("mustard",),
    "green": ("emerald",),
    "teal": ("turquoise",),
    "blue": ("cobalt",),
    "purple": ("violet",),
    "pink": ("rose",),
    "black": ("jet black",),
    "white": ("ivory",),
}

PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks", "zigzag", "diagonal")

# Pattern -> (adjectives, nouns).  An empty string means "not mentioned",
# which is how sellers usually describe plain items.
_PATTERN_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "solid": (("", "", "plain", "solid"), ("",)),
    "stripes": (("striped", "stripe"), ("stripes", "stripe pattern")),
    "dots": (("polka dot", "dotted", "spotted"), ("dots", "polka dots")),
    "checks": (("checked", "check", "gingham"), ("checks", "check pattern")),
    "zigzag": (("zigzag", "chevron"), ("zigzag", "chevrons")),
    "diagonal": (("diagonal striped", "bias stripe"), ("diagonal stripes",)),
}

#: Made-up brand names (no real trademarks).
BRANDS: tuple[str, ...] = (
    "Acme", "Zorvo", "Lumina", "Kestrel", "Novalu", "Brindle", "Quillo", "Tovana",
    "Marlo", "Vexa", "Pebblo", "Orrin", "Saffra", "Keko", "Dunmore", "Velt",
)

_MATERIALS: dict[str, tuple[str, ...]] = {
    "mug": ("ceramic", "porcelain", "stoneware", "enamel"),
    "t-shirt": ("cotton", "organic cotton", "linen", "jersey"),
    "cap": ("cotton", "wool", "canvas", "twill"),
    "pillow": ("velvet", "linen", "cotton", "satin"),
    "lamp": ("metal", "ceramic", "brass", "wooden"),
    "sock": ("cotton", "wool", "bamboo", "merino"),
    "bag": ("canvas", "leather", "jute", "nylon"),
    "vase": ("glass", "ceramic", "porcelain", "stoneware"),
}

_SIZES: dict[str, tuple[str, ...]] = {
    "mug": ("small", "large", "12 oz"),
    "t-shirt": ("size S", "size M", "size L", "size XL"),
    "cap": ("one size", "adjustable"),
    "pillow": ("small", "large", "40x40 cm"),
    "lamp": ("small", "medium", "tall"),
    "sock": ("size 39-42", "size 43-46"),
    "bag": ("small", "medium", "large"),
    "vase": ("small", "medium", "tall"),
}

_EXTRA_PREFIXES: tuple[str, ...] = ("New", "NEW!", "Sale:", "Hot deal -")
_EXTRA_SUFFIXES: tuple[str, ...] = (
    "- free shipping", "(new)", "| sale", "- gift idea", "best seller",
)

# --------------------------------------------------------------------------
# Title templates
# --------------------------------------------------------------------------
# A template is a list of (separator, keys) segments.  Empty words are
# dropped, and a segment left empty is dropped together with its separator,
# so templates never produce dangling punctuation ("Red /", "with ()").
# Key casing picks the word casing: "brand" as stored, "Brand" first letter
# upper, "BRAND" all upper; "=word" is a literal.
_Template = tuple[tuple[str, tuple[str, ...]], ...]

_TEMPLATES: tuple[_Template, ...] = (
    # "Acme red striped ceramic mug"
    (("", ("brand", "colour", "pat_adj", "material", "noun")),),
    # "Mug, ceramic - Red stripes | ACME"
    (("", ("Noun",)), (", ", ("material",)), (" - ", ("Colour", "pat_noun")), (" | ", ("BRAND",))),
    # "Acme mug in red" -- no pattern: only the image shows it.
    (("", ("brand", "noun", "=in", "colour")),),
    # "Striped ceramic mug by Acme" -- no colour: only the image shows it.
    (("", ("pat_adj", "material", "noun", "=by", "Brand")),),
    # "ACME - large red mug" -- no pattern.
    (("", ("BRAND",)), (" - ", ("size", "colour", "noun"))),
    # "Red mug with stripes - Acme"
    (("", ("colour", "noun", "with_pat")), (" - ", ("brand",))),
    # "Acme Ceramic Mug / Striped / Red"
    (("", ("Brand", "Material", "Noun")), (" / ", ("Pat_adj",)), (" / ", ("Colour",))),
    # "Large striped mug, red" -- no brand.
    (("", ("size", "pat_adj", "noun")), (", ", ("colour",))),
    # "Mug: Acme, red stripes, large"
    (("", ("Noun",)), (": ", ("Brand",)), (", ", ("colour", "pat_noun")), (", ", ("size",))),
    # "Striped mug | ceramic | Acme" -- no colour.
    (("", ("pat_adj", "noun")), (" | ", ("material",)), (" | ", ("Brand",))),
)
# Lazy sellers: these templates come out all lower case.
_LOWERCASE_TEMPLATES: frozenset[int] = frozenset({5})


def max_products() -> int:
    """Largest ``n_products`` for which every product is a unique combination.

    Each (category, colour, pattern) look is reused at most once per brand.
    """
    return len(CATEGORIES) * len(COLOURS) * len(PATTERNS) * len(BRANDS)


# --------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Product:
    """Attributes of one product; all its listings are rendered from these."""

    group: str
    category: str
    colour: str
    pattern: str
    brand: str
    material: str
    size: str
    rgb: tuple[int, int, int]


def _product_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per product.

    Spawned from the seed so product ``i`` is the same whatever
    ``n_products`` is: a small catalog is a prefix of a bigger one.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    """Uniformly pick one string (``rng.choice`` would return ``np.str_``)."""
    return options[int(rng.integers(len(options)))]


def _assign_looks(n_products: int, seed: int) -> list[tuple[str, str, str, str]]:
    """Choose (category, colour, pattern, brand) for each product, all unique.

    All visual looks are used once before any repeats, so small catalogs have
    visually distinct products; a repeated look gets a different brand.
    """
    looks = [(c, k, p) for c in CATEGORIES for k in COLOURS for p in PATTERNS]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(looks))
    brand_offset = rng.integers(len(BRANDS), size=len(looks))
    out = []
    for i in range(n_products):
        look = int(order[i % len(looks)])
        repeat = i // len(looks)
        brand = BRANDS[(int(brand_offset[look]) + repeat) % len(BRANDS)]
        out.append((*looks[look], brand))
    return out


def _make_product(
    group: str, look: tuple[str, str, str, str], rng: np.random.Generator
) -> _Product:
    """Fill in the non-visual attributes and a slightly jittered base colour.

    The colour jitter keeps two products with the same look (only possible in
    catalogs bigger than the number of looks) from being pixel-identical.
    """
    category, colour, pattern, brand = look
    r, g, b = np.clip(np.array(COLOURS[colour]) + rng.integers(-10, 11, size=3), 0, 255)
    return _Product(
        group=group,
        category=category,
        colour=colour,
        pattern=pattern,
        brand=brand,
        material=_pick(rng, _MATERIALS[category]),
        size=_pick(rng, _SIZES[category]),
        rgb=(int(r), int(g), int(b)),
    )


# --------------------------------------------------------------------------
# Silhouettes: one drawing function per category, in unit coordinates
# --------------------------------------------------------------------------


def _scale(r: int, *coords: float) -> list[float]:
    """Unit-square coordinates -> pixel coordinates on an r x r canvas."""
    return [c * r for c in coords]


def _draw_mug(d: ImageDraw.ImageDraw, r: int) -> None:
    """Cylinder body with a ring handle on the right."""
    d.ellipse(_scale(r, 0.56, 0.36, 0.80, 0.68), outline=255, width=max(2, r // 18))
    d.rounded_rectangle(_scale(r, 0.22, 0.24, 0.64, 0.80), radius=r * 0.05, fill=255)


def _draw_tshirt(d: ImageDraw.ImageDraw, r: int) -> None:
    """Body, short sleeves and a scooped neckline."""
    pts = [
        (0.38, 0.18), (0.62, 0.18), (0.80, 0.24), (0.94, 0.44), (0.80, 0.51),
        (0.73, 0.43), (0.73, 0.86), (0.27, 0.86), (0.27, 0.43), (0.20, 0.51),
        (0.06, 0.44), (0.20, 0.24),
    ]
    d.polygon([(x * r, y * r) for x, y in pts], fill=255)
    d.ellipse(_scale(r, 0.40, 0.10, 0.60, 0.27), fill=0)


def _draw_cap(d: ImageDraw.ImageDraw, r: int) -> None:
    """Domed crown, a band and a brim sticking out to the right."""
    d.pieslice(_scale(r, 0.16, 0.26, 0.70, 0.84), 180, 360, fill=255)
    d.ellipse(_scale(r, 0.46, 0.49, 0.90, 0.63), fill=255)
    d.rectangle(_scale(r, 0.16, 0.54, 0.70, 0.62), fill=255)
    d.ellipse(_scale(r, 0.40, 0.22, 0.46, 0.28), fill=255)


def _draw_pillow(d: ImageDraw.ImageDraw, r: int) -> None:
    """Square cushion whose sides bow inwards, with pointy corners."""
    x0, y0, x1, y1, bow = 0.16, 0.22, 0.84, 0.78, 0.05
    t = np.linspace(0.0, 1.0, 12)
    dip = bow * np.sin(np.pi * t)  # inward bulge, zero at the corners
    top = [(x0 + (x1 - x0) * a, y0 + b) for a, b in zip(t, dip)]
    right = [(x1 - b, y0 + (y1 - y0) * a) for a, b in zip(t, dip)]
    bottom = [(x1 - (x1 - x0) * a, y1 - b) for a, b in zip(t, dip)]
    left = [(x0 + b, y1 - (y1 - y0) * a) for a, b in zip(t, dip)]
    d.polygon([(x * r, y * r) for x, y in top + right + bottom + left], fill=255)


def _draw_lamp(d: ImageDraw.ImageDraw, r: int) -> None:
    """Trapezoid shade on a thin stem and an oval base."""
    shade = [(0.32, 0.14), (0.68, 0.14), (0.80, 0.46), (0.20, 0.46)]
    d.polygon([(x * r, y * r) for x, y in shade], fill=255)
    d.rectangle(_scale(r, 0.47, 0.46, 0.53, 0.80), fill=255)
    d.ellipse(_scale(r, 0.30, 0.76, 0.70, 0.88), fill=255)


def _draw_sock(d: ImageDraw.ImageDraw, r: int) -> None:
    """Upright leg with the foot pointing right."""
    d.rectangle(_scale(r, 0.30, 0.10, 0.54, 0.66), fill=255)
    d.rounded_rectangle(_scale(r, 0.30, 0.56, 0.84, 0.82), radius=r * 0.13, fill=255)
    d.ellipse(_scale(r, 0.26, 0.52, 0.50, 0.82), fill=255)


def _draw_bag(d: ImageDraw.ImageDraw, r: int) -> None:
    """Tote: flared body with an arched handle."""
    d.arc(_scale(r, 0.34, 0.14, 0.66, 0.58), 180, 360, fill=255, width=max(2, r // 20))
    d.rectangle(_scale(r, 0.34, 0.36, 0.37, 0.42), fill=255)
    d.rectangle(_scale(r, 0.63, 0.36, 0.66, 0.42), fill=255)
    body = [(0.22, 0.40), (0.78, 0.40), (0.84, 0.86), (0.16, 0.86)]
    d.polygon([(x * r, y * r) for x, y in body], fill=255)


def _draw_vase(d: ImageDraw.ImageDraw, r: int) -> None:
    """Round belly, narrow neck and a flared lip."""
    d.ellipse(_scale(r, 0.26, 0.40, 0.74, 0.88), fill=255)
    d.rectangle(_scale(r, 0.42, 0.20, 0.58, 0.50), fill=255)
    d.ellipse(_scale(r, 0.35, 0.14, 0.65, 0.24), fill=255)


_SILHOUETTES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "mug": _draw_mug,
    "t-shirt": _draw_tshirt,
    "cap": _draw_cap,
    "pillow": _draw_pillow,
    "lamp": _draw_lamp,
    "sock": _draw_sock,
    "bag": _draw_bag,
    "vase": _draw_vase,
}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _pattern_mask(pattern: str, r: int) -> np.ndarray:
    """Boolean r x r mask: True where the pattern's secondary colour goes.

    Cached because it depends only on the pattern and the canvas size.
    """
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32)
    period = r / 7.0  # ~7 repeats across the canvas survive downscaling
    half = period / 2.0
    if pattern == "solid":
        return np.zeros((r, r), dtype=bool)
    if pattern == "stripes":
        return (yy // half) % 2 == 1
    if pattern == "dots":
        dx, dy = xx % period - half, yy % period - half
        return dx * dx + dy * dy < (0.3 * period) ** 2
    if pattern == "checks":
        return ((xx // half) + (yy // half)) % 2 == 1
    if pattern == "zigzag":
        tri = np.abs(xx % period - half)  # triangle wave bends the stripes
        return ((yy + tri) // half) % 2 == 1
    if pattern == "diagonal":
        return ((xx + yy) // (half * 1.4)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


@lru_cache(maxsize=8)
def _shading(r: int) -> np.ndarray:
    """Horizontal light falloff so flat silhouettes read as 3-D objects."""
    x = (np.arange(r, dtype=np.float32) - r / 2) / (r / 2)
    return np.broadcast_to((1.0 - 0.18 * x * x)[None, :, None], (r, r, 1))


def _secondary_and_outline(rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pattern colour and outline colour that contrast with the base colour.

    Light products get dark patterns and a grey outline (so white items are
    visible on a white background); dark ones get light patterns.
    """
    base = np.array(rgb, dtype=np.float32)
    luminance = float(base @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0
    if luminance > 0.6:
        return base * 0.45, np.full(3, 110.0, dtype=np.float32)
    return base * 0.35 + 255.0 * 0.65, base * 0.5


_BINARY_LUT = [0] + [255] * 255  # any coverage -> opaque


def _render_product(product: _Product, r: int) -> Image.Image:
    """Draw the product once as an RGBA layer on an r x r canvas.

    Listings are cheap transforms of this layer, which is what keeps the
    generator fast.
    """
    mask = Image.new("L", (r, r), 0)
    _SILHOUETTES[product.category](ImageDraw.Draw(mask), r)
    # Outline ~1 output pixel wide: a box blur is non-zero exactly where a
    # square dilation would be, and costs O(1) per pixel unlike MaxFilter.
    grown = mask.filter(ImageFilter.BoxBlur(max(1, r // 64))).point(_BINARY_LUT)
    ring = np.asarray(ImageChops.subtract(grown, mask)) > 0

    secondary, outline = _secondary_and_outline(product.rgb)
    pattern = _pattern_mask(product.pattern, r)[..., None]
    rgb = np.where(pattern, secondary, np.array(product.rgb, dtype=np.float32)) * _shading(r)
    # Transparent pixels get the outline colour too, so bilinear resampling
    # never bleeds a foreign colour into the edge.
    rgb[ring | ~(np.asarray(mask) > 0)] = outline
    rgba = np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), np.asarray(grown)])
    return Image.fromarray(rgba, "RGBA")


@dataclass(frozen=True)
class _Shot:
    """How one listing's photo differs from the product's reference drawing."""

    angle_deg: float
    scale: float
    shift: tuple[float, float]  # fraction of the canvas
    mirror: bool
    brightness: float
    background: tuple[int, int, int]
    jpeg_quality: int | None  # None -> PNG


def _draw_shot(rng: np.random.Generator) -> _Shot:
    """Random but small photo variations, drawn in a fixed order."""
    angle = float(rng.uniform(-8.0, 8.0))
    scale = float(rng.uniform(0.88, 1.10))
    shift = (float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.07, 0.07)))
    mirror = bool(rng.random() < 0.2)
    brightness = float(rng.uniform(0.92, 1.08))
    tint = 255 - rng.integers(0, 11, size=3)
    background = (int(tint[0]), int(tint[1]), int(tint[2]))
    use_jpeg = bool(rng.random() < 0.7)
    quality = int(rng.integers(70, 96))
    return _Shot(angle, scale, shift, mirror, brightness, background,
                 quality if use_jpeg else None)


def _affine_coeffs(r: int, shot: _Shot) -> tuple[float, ...]:
    """Output->input affine map for ``Image.transform``.

    The forward map rotates and scales about the canvas centre, then shifts;
    Pillow wants the inverse, i.e. where each output pixel samples from.
    """
    theta = np.deg2rad(shot.angle_deg)
    cos, sin = np.cos(theta) / shot.scale, np.sin(theta) / shot.scale
    c = r / 2.0
    ox, oy = c + shot.shift[0] * r, c + shot.shift[1] * r
    a, b, d, e = cos, sin, -sin, cos
    return (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy)


def _render_listing(layer: Image.Image, shot: _Shot, out_size: int) -> Image.Image:
    """Photograph the product layer: move it, light it, and downscale."""
    r = layer.width
    if shot.mirror:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    moved = layer.transform((r, r), Image.Transform.AFFINE, _affine_coeffs(r, shot),
                            resample=Image.Resampling.BILINEAR)
    photo = Image.new("RGB", (r, r), shot.background)
    photo.paste(moved, (0, 0), moved)
    # Drawing at 2x then box-reducing gives anti-aliased edges cheaply.
    photo = photo.reduce(r // out_size)
    # Exposure change of the whole photo; done after reducing (fewer pixels).
    lut = [min(255, int(i * shot.brightness + 0.5)) for i in range(256)] * 3
    return photo.point(lut)


def _encode(image: Image.Image, jpeg_quality: int | None) -> bytes:
    """Encode with every parameter pinned so output bytes are reproducible."""
    buf = io.BytesIO()
    if jpeg_quality is None:
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=2,
                   optimize=False, progressive=False)
    return buf.getvalue()


# --------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------


def _title_words(product: _Product, rng: np.random.Generator) -> dict[str, str]:
    """Choose this listing's wording for each attribute."""
    nouns = CATEGORY_NOUNS[product.category]
    noun = nouns[0] if rng.random() < 0.5 else _pick(rng, nouns[1:])
    colour = product.colour if rng.random() < 0.75 else _pick(rng, _COLOUR_SYNONYMS[product.colour])
    adjectives, pattern_nouns = _PATTERN_WORDS[product.pattern]
    pat_noun = _pick(rng, pattern_nouns)
    return {
        "brand": product.brand,
        "noun": noun,
        "colour": colour,
        "pat_adj": _pick(rng, adjectives),
        "pat_noun": pat_noun,
        "with_pat": f"with {pat_noun}" if pat_noun else "",
        "material": product.material,
        "size": product.size,
    }


def _resolve(key: str, words: dict[str, str]) -> str:
    """Look a template key up in ``words``, applying the key's casing."""
    if key.startswith("="):
        return key[1:]
    word = words[key.lower()]
    if key.isupper():
        return word.upper()
    if key[0].isupper():
        return word[:1].upper() + word[1:]
    return word


def _fill_template(template: _Template, words: dict[str, str]) -> str:
    """Join segments, skipping empty words and empty segments with their separator."""
    text = ""
    for sep, keys in template:
        segment = " ".join(w for w in (_resolve(k, words) for k in keys) if w)
        if segment:
            text = f"{text}{sep}{segment}" if text else segment
    return text


def _make_title(product: _Product, template_index: int, rng: np.random.Generator) -> str:
    """Compose one listing title, sometimes with marketing fluff around it."""
    words = _title_words(product, rng)
    title = _fill_template(_TEMPLATES[template_index], words)
    if template_index in _LOWERCASE_TEMPLATES:
        title = title.lower()
    else:
        title = title[:1].upper() + title[1:]
    extra = rng.random()
    if extra < 0.15:
        title = f"{_pick(rng, _EXTRA_PREFIXES)} {title}"
    elif extra < 0.3:
        title = f"{title} {_pick(rng, _EXTRA_SUFFIXES)}"
    return title


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

_COLUMNS = ["id", "title", "image", "group", "category", "colour", "pattern"]


def _check_args(n_products: int, image_size: int, min_listings: int, max_listings: int) -> None:
    """Fail early with a clear message instead of deep inside Pillow."""
    if not 0 <= n_products <= max_products():
        raise ValueError(f"n_products must be in [0, {max_products()}], got {n_products}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 1 <= min_listings <= max_listings:
        raise ValueError(
            f"need 1 <= min_listings <= max_listings, got {min_listings}, {max_listings}"
        )


def generate_catalog(
    n_products: int = 120,
    seed: int = 0,
    image_size: int = 64,
    min_listings: int = 2,
    max_listings: int = 4,
) -> pd.DataFrame:
    """Generate a synthetic catalog of product listings.

    Args:
        n_products: Number of distinct products (groups); at most
            :func:`max_products`.
        seed: Non-negative seed; the same arguments give byte-identical output.
        image_size: Side of the square RGB images, in pixels.
        min_listings: Fewest listings per product.
        max_listings: Most listings per product (inclusive).

    Returns:
        One row per listing, ordered by product then listing, with columns
        ``id`` (e.g. ``"p0007-2"``), ``title``, ``image`` (PNG or JPEG bytes),
        ``group`` (product id shared by its listings, e.g. ``"p0007"``),
        ``category``, ``colour`` and ``pattern``.  Product ``i`` does not
        depend on ``n_products``, so smaller catalogs are prefixes of larger
        ones (for equal seed, size and listing bounds).
    """
    _check_args(n_products, image_size, min_listings, max_listings)
    render_size = 2 * image_size  # supersampled, see _render_listing
    width = max(4, len(str(max(n_products - 1, 0))))
    rows: list[dict[str, object]] = []
    for index, look in enumerate(_assign_looks(n_products, seed)):
        rng = _product_rng(seed, index)
        group = f"p{index:0{width}d}"
        product = _make_product(group, look, rng)
        layer = _render_product(product, render_size)
        n_listings = int(rng.integers(min_listings, max_listings + 1))
        # Distinct templates per listing guarantee the titles are reworded.
        templates = rng.permutation(len(_TEMPLATES))
        for j in range(n_listings):
            title = _make_title(product, int(templates[j % len(_TEMPLATES)]), rng)
            shot = _draw_shot(rng)
            image = _encode(_render_listing(layer, shot, image_size), shot.jpeg_quality)
            rows.append({
                "id": f"{group}-{j}",
                "title": title,
                "image": image,
                "group": group,
                "category": product.category,
                "colour": product.colour,
                "pattern": product.pattern,
            })
    return pd.DataFrame(rows, columns=_COLUMNS)


def _image_suffix(data: bytes) -> str:
    """File extension matching the encoded bytes."""
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def _write_images(df: pd.DataFrame, out: Path) -> list[str]:
    """Write each image under ``out/images`` and return the relative paths."""
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for listing_id, data in zip(df["id"], df["image"]):
        rel = f"images/{listing_id}{_image_suffix(data)}"
        (out / rel).write_bytes(data)
        paths.append(rel)
    return paths


def write_catalog(
    out: str | Path,
    n_products: int = 120,
    seed: int = 0,
    image_size: int = 64,
    fmt: str = "csv",
    min_listings: int = 2,
    max_listings: int = 4,
) -> Path:
    """Generate a catalog and write it to the directory ``out`` (created if needed).

    Formats:
        ``"csv"``: ``out/catalog.csv``; ``image`` holds paths relative to
        ``out`` (``images/<id>.jpg`` or ``.png``), files under ``out/images``.
        ``"jsonl"``: ``out/catalog.jsonl``, one JSON object per line, image
        paths as for csv.
        ``"parquet"``: ``out/catalog.parquet`` with the image bytes inline.

    Returns:
        Path of the written catalog file.
    """
    if fmt not in ("csv", "jsonl", "parquet"):
        raise ValueError(f"fmt must be 'csv', 'jsonl' or 'parquet', got {fmt!r}")
    df = generate_catalog(n_products, seed, image_size, min_listings, max_listings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"catalog.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False)
        return path
    df = df.assign(image=_write_images(df, out))
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        # json.dumps per row keeps the file byte-stable and plain UTF-8.
        with path.open("w", encoding="utf-8") as fh:
            for record in df.to_dict(orient="records"):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
