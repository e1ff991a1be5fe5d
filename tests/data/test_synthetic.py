"""Tests for the deterministic synthetic catalog generator."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from item_embed.data import synthetic
from item_embed.data.synthetic import CATEGORY_NOUNS, generate_catalog, write_catalog

# Small images and few products keep the whole file well under a second.
N_PRODUCTS = 30
IMAGE_SIZE = 32
COLUMNS = ["id", "title", "image", "group", "category", "colour", "pattern"]


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    """One shared catalog; tests must not mutate it."""
    return generate_catalog(n_products=N_PRODUCTS, seed=3, image_size=IMAGE_SIZE)


def _decode(data: bytes) -> Image.Image:
    """Decode image bytes fully (``load`` catches truncated data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_columns_and_types(catalog: pd.DataFrame) -> None:
    assert list(catalog.columns) == COLUMNS
    assert catalog["group"].nunique() == N_PRODUCTS
    assert all(isinstance(b, bytes) for b in catalog["image"])
    for col in ("id", "title", "group", "category", "colour", "pattern"):
        assert all(isinstance(v, str) and v for v in catalog[col])


def test_same_arguments_give_identical_output(catalog: pd.DataFrame) -> None:
    again = generate_catalog(n_products=N_PRODUCTS, seed=3, image_size=IMAGE_SIZE)
    assert again.drop(columns="image").equals(catalog.drop(columns="image"))
    assert list(again["image"]) == list(catalog["image"])  # byte-identical


def test_different_seeds_differ(catalog: pd.DataFrame) -> None:
    other = generate_catalog(n_products=N_PRODUCTS, seed=4, image_size=IMAGE_SIZE)
    assert list(other["title"]) != list(catalog["title"])
    assert set(other["image"]).isdisjoint(catalog["image"])


def test_smaller_catalog_is_a_prefix() -> None:
    small = generate_catalog(n_products=4, seed=1, image_size=16)
    big = generate_catalog(n_products=9, seed=1, image_size=16)
    head = big[big["group"].isin(small["group"])].reset_index(drop=True)
    assert head.drop(columns="image").equals(small.drop(columns="image"))
    assert list(head["image"]) == list(small["image"])


def test_ids_unique_and_named_after_group(catalog: pd.DataFrame) -> None:
    assert catalog["id"].is_unique
    assert all(i.startswith(g + "-") for i, g in zip(catalog["id"], catalog["group"]))


def test_rows_are_grouped_in_order(catalog: pd.DataFrame) -> None:
    groups = list(dict.fromkeys(catalog["group"]))
    assert groups == sorted(groups)
    assert list(catalog["group"]) == sorted(catalog["group"])


@pytest.mark.parametrize(("lo", "hi"), [(2, 4), (3, 3), (1, 5)])
def test_listings_per_group_within_bounds(lo: int, hi: int) -> None:
    df = generate_catalog(n_products=20, seed=0, image_size=16, min_listings=lo, max_listings=hi)
    sizes = df.groupby("group").size()
    assert sizes.min() >= lo and sizes.max() <= hi


def test_products_are_unique_combinations(catalog: pd.DataFrame) -> None:
    per_group = catalog.groupby("group")[["category", "colour", "pattern"]].nunique()
    assert (per_group == 1).all().all()  # attributes constant within a group
    looks = catalog.drop_duplicates("group")[["category", "colour", "pattern"]]
    assert not looks.duplicated().any()  # small catalogs: every look distinct
    assert set(catalog["category"]) <= set(synthetic.CATEGORIES)
    assert set(catalog["colour"]) <= set(synthetic.COLOURS)
    assert set(catalog["pattern"]) <= set(synthetic.PATTERNS)


def test_every_image_decodes_to_rgb_of_requested_size(catalog: pd.DataFrame) -> None:
    formats = set()
    for data in catalog["image"]:
        image = _decode(data)
        formats.add(image.format)
        assert image.mode == "RGB"
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert formats == {"JPEG", "PNG"}


def test_listing_images_differ_within_group(catalog: pd.DataFrame) -> None:
    for _, images in catalog.groupby("group")["image"]:
        assert images.nunique() == len(images)


def test_product_is_centred_on_light_background(catalog: pd.DataFrame) -> None:
    for data in catalog["image"][:20]:
        pixels = _decode(data).convert("L").load()
        corners = [pixels[0, 0], pixels[IMAGE_SIZE - 1, 0], pixels[0, IMAGE_SIZE - 1]]
        assert min(corners) > 200  # near-white, slightly tinted background
        centre = _decode(data).getpixel((IMAGE_SIZE // 2, IMAGE_SIZE // 2))
        assert centre != _decode(data).getpixel((0, 0))  # something drawn there


def test_titles_reworded_but_name_the_category(catalog: pd.DataFrame) -> None:
    for _, rows in catalog.groupby("group"):
        titles = list(rows["title"])
        assert len(set(titles)) > 1, titles
        nouns = [n.lower() for n in CATEGORY_NOUNS[rows["category"].iloc[0]]]
        for title in titles:
            assert any(n in title.lower() for n in nouns), (title, nouns)


def test_some_titles_leave_out_the_colour() -> None:
    """Some titles omit the colour, so only the image can tell it."""
    df = generate_catalog(n_products=40, seed=0, image_size=8)
    words = {c: (c, *synthetic._COLOUR_SYNONYMS[c]) for c in synthetic.COLOURS}
    missing = [
        t for t, c in zip(df["title"], df["colour"]) if not any(w in t.lower() for w in words[c])
    ]
    assert missing


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_write_catalog_with_image_files(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "nested" / "cat"
    path = write_catalog(out, n_products=6, seed=2, image_size=IMAGE_SIZE, fmt=fmt)
    assert path == out / f"catalog.{fmt}" and path.is_file()
    if fmt == "csv":
        back = pd.read_csv(path)
    else:
        back = pd.read_json(path, lines=True, dtype=False)
    expected = generate_catalog(n_products=6, seed=2, image_size=IMAGE_SIZE)
    assert list(back.columns) == COLUMNS
    assert list(back["id"]) == list(expected["id"])
    assert list(back["title"]) == list(expected["title"])
    for rel, listing_id, data in zip(back["image"], expected["id"], expected["image"]):
        assert rel.startswith("images/" + listing_id) and rel.endswith((".jpg", ".png"))
        file = out / rel
        assert file.read_bytes() == data
        assert _decode(file.read_bytes()).format == ("PNG" if rel.endswith(".png") else "JPEG")


def test_write_catalog_parquet_inlines_bytes(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, n_products=6, seed=2, image_size=IMAGE_SIZE, fmt="parquet")
    assert path == tmp_path / "catalog.parquet"
    back = pd.read_parquet(path)
    expected = generate_catalog(n_products=6, seed=2, image_size=IMAGE_SIZE)
    assert list(back.columns) == COLUMNS
    assert list(back["image"]) == list(expected["image"])
    assert list(back["title"]) == list(expected["title"])
    assert not (tmp_path / "images").exists()


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_catalog(n_products=synthetic.max_products() + 1)
    with pytest.raises(ValueError):
        generate_catalog(n_products=2, min_listings=3, max_listings=2)
    with pytest.raises(ValueError):
        generate_catalog(n_products=2, image_size=4)
    with pytest.raises(ValueError):
        write_catalog(tmp_path, n_products=2, fmt="xml")


def test_empty_catalog_has_columns() -> None:
    df = generate_catalog(n_products=0)
    assert df.empty and list(df.columns) == COLUMNS


def test_module_imports_no_heavy_dependencies() -> None:
    """The generator must run anywhere: numpy, pandas, pyarrow, Pillow only."""
    tree = ast.parse(Path(synthetic.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    allowed = {"__future__", "io", "json", "dataclasses", "functools", "pathlib", "typing",
               "numpy", "pandas", "pyarrow", "PIL"}
    assert roots <= allowed, roots - allowed
