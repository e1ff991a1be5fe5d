"""Catalog validation on a corpus of bad and odd rows, as Parquet (image bytes) and CSV (image paths).

Every row must end up either used (with the right modalities) or reported with its reason:
rows in = rows used + rows reported. The corpus is generated under ``tmp_path``; nothing is committed.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from item_embed.data.catalog import (
    Catalog,
    CatalogError,
    CatalogReport,
    Columns,
    Problem,
    Product,
    read_table,
)

S = 32  # image_size; corpus images are S x S so pixel checks are exact
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- image factories


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb_png(w: int = S, h: int = S, color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (w, h), color))


def rgba_png() -> bytes:
    arr = np.zeros((S, S, 4), dtype=np.uint8)
    arr[:, : S // 2] = (255, 0, 0, 255)  # right half: transparent black
    return encode(Image.fromarray(arr, mode="RGBA"))


def palette_png() -> bytes:
    im = Image.new("P", (S, S), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, S // 2, S))
    return encode(im, transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (S, S), (0, 255, 255, 0)), "JPEG", quality=95)


def gray16_png() -> bytes:
    return encode(Image.fromarray(np.full((S, S), 32768, dtype=np.uint16)))


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims ``w`` x ``h`` 1-bit pixels, with no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    id: str | None
    title: str | None
    image: bytes | str | None  # bytes: image content; str: a raw path (CSV only); None: no image
    skip: list[str] = field(default_factory=list)  # substrings the reason must contain; [] = used
    modality: str = "both"  # when used: "both", "text" (text_only) or "image" (image_only)
    check: Callable[[np.ndarray], None] | None = None
    csv_only: bool = False

    @property
    def used(self) -> bool:
        return not self.skip

    @property
    def text(self) -> str | None:
        return " ".join(self.title.split()) or None if self.title is not None else None


def _check_alpha(a: np.ndarray) -> None:
    assert (a[:, : S // 2] == (255, 0, 0)).all()
    assert (a[:, S // 2 :] == WHITE).all(), "transparent area must be white"


def _check_palette(a: np.ndarray) -> None:
    assert (a[:, : S // 2] == (0, 0, 255)).all()
    assert (a[:, S // 2 :] == WHITE).all()


def _check_red(a: np.ndarray) -> None:
    r, g, b = a[S // 2, S // 2].astype(int)
    assert r > 200 and g < 60 and b < 60


def _check_mid_grey(a: np.ndarray) -> None:
    assert np.abs(a.astype(int) - 128).max() <= 1, "16-bit 32768 must scale to ~128, not clip to 255"


LONG_TITLE = "a" * 10_000
EMOJI_TITLE = "👟 Laufschuh – 跑步鞋 🏃‍♀️ size 42"
CJK_TITLE = "綿100％ Ｔシャツ（白） 무지 티셔츠"

# Rows keep the same index in both formats: CSV-only rows come last.
CASES: list[Case] = [
    Case("good-1", "Red running shoe", rgb_png()),
    Case("dup-1", "First of a duplicated id", rgb_png()),
    Case("trunc-jpeg", "Truncated photo", truncated_jpeg(), skip=["bad image", "corrupt or truncated"]),
    Case("zero-byte", "Empty image", b"", skip=["bad image", "empty"]),
    Case("not-image", "Text posing as a photo", b"GIF? no. just text\n" * 8,
         skip=["bad image", "not a recognised image format"]),
    Case("rgba", "Transparent PNG", rgba_png(), check=_check_alpha),
    Case("cmyk", "CMYK JPEG", cmyk_jpeg(), check=_check_red),
    Case("gray16", "16-bit grey PNG", gray16_png(), check=_check_mid_grey),
    Case("palette", "Palette PNG with transparency", palette_png(), check=_check_palette),
    Case("bomb", "Decompression bomb", bomb_png(100_000, 100_000), skip=["bad image", "bomb"]),
    Case("bomb-cap", "Over our pixel cap", bomb_png(8_000, 8_000), skip=["bad image", "pixel cap", "bomb"]),
    Case("tiny", "One pixel", rgb_png(1, 1), skip=["bad image", "1x1", "smaller than"]),
    Case("banner", "Banner", rgb_png(400, 4), skip=["bad image", "400x4", "aspect ratio"]),
    Case("img-only-empty", "", rgb_png(), modality="image"),
    Case("img-only-blank", "  \t  ", rgb_png(), modality="image"),
    Case("long-title", LONG_TITLE, rgb_png()),
    Case("emoji", EMOJI_TITLE, None, modality="text"),
    Case("cjk", CJK_TITLE, rgb_png()),
    Case("ws-title", "  Blue \n  mug\t ", rgb_png()),
    Case("title-na", "NA", None, modality="text"),  # the string "NA" is a title, not missing
    Case("dup-1", "Second of a duplicated id", rgb_png(), skip=["duplicate id", "first seen at row 1"]),
    Case(None, "Row without an id", rgb_png(), skip=["missing id"]),
    Case("   ", "Row with a blank id", rgb_png(), skip=["missing id"]),
    Case("nothing", None, None, skip=["no usable image and no title"]),
    Case("nothing-blank", "   ", None, skip=["no usable image and no title"]),
    Case("text-only", "Plain text product", None, modality="text"),
    Case("good-2", "Green mug", rgb_png(color=(0, 160, 0))),
    # image paths: CSV only
    Case("missing-file", "Missing photo", "images/nope.png", skip=["bad image", "not found", "nope.png"],
         csv_only=True),
    Case("escape", "Escaping path", "../outside.png", skip=["bad image", "escapes", "../outside.png"],
         csv_only=True),
    Case("dotdot-escape", "Escaping via ..", "images/../../outside.png", skip=["escapes"], csv_only=True),
]


def cases_for(fmt: str) -> list[Case]:
    return [c for c in CASES if fmt == "csv" or not c.csv_only]


def write_parquet(tmp_path: Path) -> Path:
    cases = cases_for("parquet")
    frame = pd.DataFrame(
        {
            "id": [c.id for c in cases],
            "title": [c.title for c in cases],
            "image": [c.image for c in cases],
            "brand": ["acme"] * len(cases),
        }
    )
    path = tmp_path / "catalog.parquet"
    frame.to_parquet(path)
    return path


def write_csv(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    (folder / "images").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(rgb_png())  # exists, but outside the image root
    path = folder / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "title", "image", "brand"])
        for row, c in enumerate(cases_for("csv")):
            if isinstance(c.image, bytes):
                rel = f"images/row{row:02d}.img"
                (folder / rel).write_bytes(c.image)
                image = rel
            else:
                image = c.image or ""
            out.writerow([c.id or "", c.title or "", image, "acme"])
    return path


WRITERS = {"parquet": write_parquet, "csv": write_csv}


@pytest.fixture(params=["parquet", "csv"])
def fmt(request) -> str:
    return request.param


@pytest.fixture
def corpus(fmt: str, tmp_path: Path) -> tuple[Catalog, list[Case]]:
    return Catalog.open(WRITERS[fmt](tmp_path)), cases_for(fmt)


def run(catalog: Catalog, **kwargs) -> tuple[list[list[Product]], CatalogReport]:
    report = CatalogReport()
    chunks = list(catalog.iter_chunks(S, report=report, **kwargs))
    return chunks, report


# --------------------------------------------------------------------------- the corpus, row by row


@pytest.mark.parametrize("chunk_size", [4, 512])
def test_every_row_used_or_reported(corpus, chunk_size: int) -> None:
    catalog, cases = corpus
    chunks, report = run(catalog, chunk_size=chunk_size)
    products = {p.row: p for chunk in chunks for p in chunk}
    problems = {p.row: p for p in report.problems}

    assert len(chunks) == -(-len(cases) // chunk_size)
    assert set(products) | set(problems) == set(range(len(cases)))
    assert not set(products) & set(problems)

    for row, case in enumerate(cases):
        if case.used:
            assert row in products, f"row {row} ({case.id!r}) should be used, got {problems.get(row)}"
            p = products[row]
            assert p.id == case.id
            assert p.text == case.text
            if case.modality == "text":
                assert p.image is None
            else:
                assert p.image is not None
                assert p.image.shape == (S, S, 3) and p.image.dtype == np.uint8
                if case.check:
                    case.check(p.image)
            if case.modality == "image":
                assert p.text is None
        else:
            assert row in problems, f"row {row} ({case.id!r}) should be reported"
            problem = problems[row]
            for part in case.skip:
                assert part in problem.reason, f"row {row}: {part!r} not in {problem.reason!r}"
            expected_id = case.id.strip() or None if case.id is not None else None
            assert problem.id == expected_id


def test_accounting_identity(corpus) -> None:
    catalog, cases = corpus
    chunks, report = run(catalog, chunk_size=5)
    n_used = sum(len(c) for c in chunks)
    assert report.rows_in == len(cases) == len(catalog)
    assert report.used == n_used == sum(c.used for c in cases)
    assert report.reported == sum(not c.used for c in cases)
    assert report.rows_in == report.used + report.reported
    report.check_accounting()
    assert report.text_only == sum(c.used and c.modality == "text" for c in cases)
    assert report.image_only == sum(c.used and c.modality == "image" for c in cases)
    assert report.source == catalog.source


def test_specific_odd_rows(corpus) -> None:
    """Spot checks that read as the spec: each documented outcome by id."""
    catalog, _ = corpus
    products = {p.id: p for p in catalog.load_all(S)}
    assert len(products["long-title"].text) == 10_000
    assert products["emoji"].text == EMOJI_TITLE
    assert products["cjk"].text == CJK_TITLE
    assert products["ws-title"].text == "Blue mug"
    assert products["title-na"].text == "NA"
    assert products["img-only-empty"].text is None and products["img-only-blank"].text is None
    assert products["text-only"].image is None
    assert products["dup-1"].row == 1  # the first occurrence wins


def test_missing_file_reason_names_the_resolved_path(tmp_path: Path) -> None:
    catalog = Catalog.open(write_csv(tmp_path))
    _, report = run(catalog)
    by_id = {p.id: p.reason for p in report.problems}
    assert str(tmp_path / "shop" / "images" / "nope.png") in by_id["missing-file"]
    assert "escapes the image root" in by_id["escape"]


def test_explicit_image_root(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(rgb_png())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.png").write_bytes(rgb_png())  # next to the CSV, outside the root
    path = tmp_path / "data" / "c.csv"
    path.write_text("id,title,image\na,A,a.png\nb,B,../data/b.png\nc,C,../photos/a.png\n")
    chunks, report = run(Catalog.open(path, image_root=tmp_path / "photos"))
    assert [p.id for p in chunks[0]] == ["a", "c"]  # ../photos/a.png resolves inside the root
    assert [p.id for p in report.problems] == ["b"] and "escapes" in report.problems[0].reason


# --------------------------------------------------------------------------- strict mode


def test_strict_raises_on_first_bad_row(corpus) -> None:
    catalog, _ = corpus
    with pytest.raises(CatalogError) as info:
        run(catalog, strict=True)
    msg = str(info.value)
    assert "trunc-jpeg" in msg and "row 2" in msg and catalog.source in msg


BAD = [c for c in CASES if not c.used]


@pytest.mark.parametrize("case", BAD, ids=[f"{c.id}".strip() or "blank-id" for c in BAD])
def test_strict_names_the_bad_row(case: Case, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "outside.png").write_bytes(rgb_png())
    rows = [CASES[0], CASES[1], case]  # CASES[1] is the first "dup-1"
    frame = pd.DataFrame({"id": [c.id for c in rows], "title": [c.title for c in rows],
                          "image": [c.image for c in rows]})
    catalog = Catalog(frame, image_root=tmp_path / "images", source="mem")
    with pytest.raises(CatalogError) as info:
        run(catalog, strict=True)
    msg = str(info.value)
    assert "row 2" in msg
    assert (repr(case.id) if case.id and case.id.strip() else "no id") in msg
    assert case.skip[0] in msg
    # The same rows without strict: reported, not raised.
    _, report = run(catalog)
    assert [p.row for p in report.problems] == [2]
    report.check_accounting()


def test_strict_passes_clean_catalog(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["a", "b"], "title": ["A", None], "image": [None, rgb_png()]})
    chunks, report = run(Catalog(frame), strict=True)
    assert [p.id for p in chunks[0]] == ["a", "b"] and report.reported == 0


# --------------------------------------------------------------------------- titles as bytes, encodings


def test_parquet_bytes_titles(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["utf8", "bad-utf8", "latin1", "no-title", "blank-bytes"],
            "title": ["Café ☕".encode(), b"\xff\xfe", "caf\xe9".encode("latin-1"), None, b"  "],
            "image": [None, rgb_png(), None, rgb_png(), rgb_png()],
        }
    )
    path = tmp_path / "bytes.parquet"
    frame.to_parquet(path)
    catalog = Catalog.open(path)
    assert isinstance(catalog.frame["title"][0], bytes)  # really a binary column
    chunks, report = run(catalog)
    products = {p.id: p for p in chunks[0]}
    assert products["utf8"].text == "Café ☕"
    assert products["no-title"].text is None and products["blank-bytes"].text is None
    assert [(p.row, p.id, p.reason) for p in report.problems] == [
        (1, "bad-utf8", "title is not valid UTF-8"),
        (2, "latin1", "title is not valid UTF-8"),
    ]
    assert report.image_only == 2
    report.check_accounting()


@pytest.mark.parametrize(
    "raw, column",
    [(b"\xff\xfe", "title"), (b"caf\xe9", "title"), (b"\xff\xfe", "id")],
    ids=["title-fffe", "title-latin1", "id-fffe"],
)
def test_csv_non_utf8_row_reported(tmp_path: Path, raw: bytes, column: str) -> None:
    bad = b"bad-utf8," + raw if column == "title" else raw + b",Bad id"
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,title,image\nok-1,Fine,\n" + bad + b",\nok-2,Also fine,\n")
    chunks, report = run(Catalog.open(path))
    assert [p.id for p in chunks[0]] == ["ok-1", "ok-2"]
    [problem] = report.problems
    assert problem.row == 1 and "not valid UTF-8" in problem.reason
    assert problem.id == ("bad-utf8" if column == "title" else None)
    report.check_accounting()


def test_use_description(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["both", "desc-only", "bad-desc"],
            "title": ["Mug", None, "Plate"],
            "description": ["Blue  ceramic", "Only a description", b"\xff"],
            "image": [None, None, None],
        }
    )
    catalog = Catalog(frame)
    with_desc, report = run(catalog, use_description=True)
    assert [(p.id, p.text) for p in with_desc[0]] == [("both", "Mug. Blue ceramic"),
                                                     ("desc-only", "Only a description")]
    assert report.problems[0].id == "bad-desc"
    assert "description is not valid UTF-8" in report.problems[0].reason
    without, report = run(catalog)
    assert [(p.id, p.text) for p in without[0]] == [("both", "Mug"), ("bad-desc", "Plate")]
    assert "no usable image and no title" in report.problems[0].reason


# --------------------------------------------------------------------------- ids


def test_int_ids_without_nulls(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pd.DataFrame({"id": [101, 102], "title": ["a", "b"]}).to_parquet(path)
    assert [p.id for p in Catalog.open(path).load_all(S)] == ["101", "102"]


def test_csv_ids_keep_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "z.csv"
    path.write_text("id,title\n0012,a\n12,b\n")
    assert [p.id for p in Catalog.open(path).load_all(S)] == ["0012", "12"]


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_int_ids_with_a_null_keep_their_text(tmp_path: Path, suffix: str) -> None:
    rows = [{"id": 101, "title": "a"}, {"id": None, "title": "b"}, {"id": 103, "title": "c"}]
    path = tmp_path / f"ints.{suffix}"
    if suffix == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    products, report = run(Catalog.open(path))
    assert report.problems[0].reason == "missing id"
    assert [p.id for p in products[0]] == ["101", "103"]


def test_duplicates_across_chunks(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["a", "b", "c", "a", "b", "a"], "title": list("123456")})
    chunks, report = run(Catalog(frame), chunk_size=2)
    assert [[p.id for p in c] for c in chunks] == [["a", "b"], ["c"], []]
    assert [(p.row, p.reason) for p in report.problems] == [
        (3, "duplicate id: first seen at row 0"),
        (4, "duplicate id: first seen at row 1"),
        (5, "duplicate id: first seen at row 0"),
    ]
    report.check_accounting()


def test_id_of_a_rejected_row_is_not_taken(tmp_path: Path) -> None:
    """A row skipped for a bad image does not claim its id: a later good row with it is used."""
    frame = pd.DataFrame({"id": ["x", "x"], "title": ["T", "T"], "image": [b"junk", None]})
    chunks, report = run(Catalog(frame))
    assert [p.row for p in chunks[0]] == [1]
    assert "bad image" in report.problems[0].reason


# --------------------------------------------------------------------------- columns and formats


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_missing_id_column(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"c.{suffix}", pd.DataFrame({"sku": ["a"], "title": ["A"]}))
    with pytest.raises(CatalogError, match="no id column 'id'"):
        Catalog.open(path)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_neither_title_nor_image_column(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"c.{suffix}", pd.DataFrame({"id": ["a"], "brand": ["acme"]}))
    with pytest.raises(CatalogError, match="neither a title column"):
        Catalog.open(path)


def test_missing_column_in_frame() -> None:
    with pytest.raises(CatalogError):
        Catalog(pd.DataFrame({"title": ["A"]}))
    with pytest.raises(CatalogError):
        Catalog(pd.DataFrame({"id": ["a"]}))


def test_title_column_only_and_image_column_only() -> None:
    _, report = run(Catalog(pd.DataFrame({"id": ["a"], "title": ["A"]})))
    assert (report.used, report.text_only) == (1, 1)
    _, report = run(Catalog(pd.DataFrame({"id": ["a"], "image": [rgb_png()]})))
    assert (report.used, report.image_only) == (1, 1)


def test_column_mapping(tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(rgb_png())
    path = tmp_path / "c.csv"
    path.write_text("sku,name,photo\ns1,Shoe,p.png\n")
    with pytest.raises(CatalogError):
        Catalog.open(path)
    catalog = Catalog.open(path, Columns(id="sku", title="name", image="photo"))
    [p] = catalog.load_all(S)
    assert (p.id, p.text, p.image.shape) == ("s1", "Shoe", (S, S, 3))
    assert catalog.extra_columns == ["name"]


def _write(path: Path, frame: pd.DataFrame) -> Path:
    suffix = path.suffix
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_read_table_formats(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"id": ["a", "b"], "title": ["Tea, green", "咖啡 ☕"]})
    table = read_table(_write(tmp_path / f"c.{suffix}", frame))
    assert list(table["id"]) == ["a", "b"] and list(table["title"]) == ["Tea, green", "咖啡 ☕"]


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not found"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "c.xlsx").write_bytes(b"PK")
    with pytest.raises(CatalogError, match="unsupported catalog format"):
        read_table(tmp_path / "c.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        read_table(tmp_path / "bad.parquet")


# --------------------------------------------------------------------------- the report


def test_report_dict_summary_and_file(corpus, tmp_path: Path) -> None:
    catalog, cases = corpus
    _, report = run(catalog)
    d = report.to_dict()
    assert d["rows_in"] == len(cases) == d["rows_used"] + d["rows_reported"]
    by_reason = d["reported_by_reason"]
    assert by_reason["missing id"] == 2 and by_reason["duplicate id"] == 1
    assert by_reason["no usable image and no title"] == 2
    assert sum(by_reason.values()) == report.reported
    assert f"{report.rows_in} rows in, {report.used} used" in report.summary()
    assert "... and" in report.summary(max_lines=3)
    written = json.loads(report.write(tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(d))
    assert str(Problem(3, None, "missing id")) == "row 3 (no id): missing id"


# --------------------------------------------------------------------------- streaming


def _rows_of(catalog: Catalog, **kwargs) -> tuple[list[tuple], list[tuple]]:
    report = CatalogReport()
    used = [(p.row, p.id, p.text, None if p.image is None else p.image.tobytes())
            for chunk in catalog.iter_chunks(S, report=report, **kwargs) for p in chunk]
    return used, [(q.row, q.id, q.reason) for q in report.problems]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 512])
def test_file_streams_like_the_frame(fmt: str, tmp_path: Path, chunk_size: int) -> None:
    """Opened from a file, rows are read chunk by chunk (Parquet in several row groups), never whole,
    and every product and problem is the same as over the whole table in memory, shards included."""
    path = WRITERS[fmt](tmp_path)
    if fmt == "parquet":
        pd.read_parquet(path).to_parquet(path, row_group_size=5)
    streamed = Catalog.open(path)
    in_memory = Catalog(read_table(path), image_root=streamed.image_root, source=str(path))
    assert len(streamed) == len(in_memory) and streamed.extra_columns == in_memory.extra_columns
    assert _rows_of(streamed, chunk_size=chunk_size) == _rows_of(in_memory, chunk_size=chunk_size)
    for world in (2, 3):
        for rank in range(world):
            shard = dict(chunk_size=chunk_size, shard=(rank, world))
            assert _rows_of(streamed, **shard) == _rows_of(in_memory, **shard)
    assert streamed._frame is None, "iterating must not read the whole catalog"
    assert list(streamed.frame["id"]) == list(in_memory.frame["id"])  # .frame still reads it on demand


def test_embed_streams_carried_columns(tmp_path: Path) -> None:
    """iter_rows_and_products hands back each chunk's raw rows (indexed by row) for the carried columns."""
    path = write_parquet(tmp_path)
    pd.read_parquet(path).to_parquet(path, row_group_size=3)
    catalog = Catalog.open(path)
    for raw, products in catalog.iter_rows_and_products(S, chunk_size=4):
        for p in products:
            assert raw.loc[p.row, "id"] == p.id and raw.loc[p.row, "brand"] == "acme"


# --------------------------------------------------------------------------- exact ids

BIG = 2**53  # the first integer where float64 starts skipping: 2**53 + 1 has no float


def _big_int_parquet(path: Path, **write) -> tuple[Path, list[int | None]]:
    """An int64 id column with a null, written by pyarrow alone (no pandas metadata, as Spark or
    DuckDB write it): pyarrow's default conversion would make it float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids: list[int | None] = [BIG + i for i in range(30)]
    ids.insert(7, None)
    table = pa.table({"id": pa.array(ids, pa.int64()), "title": [f"product {i}" for i in range(len(ids))],
                      "sku": pa.array(ids, pa.int64())})
    pq.write_table(table, path, **write)
    return path, ids


@pytest.mark.parametrize("chunk_size", [4, 512])
def test_parquet_int64_ids_near_2_53_with_a_null_stay_exact(tmp_path: Path, chunk_size: int) -> None:
    path, ids = _big_int_parquet(tmp_path / "big.parquet", row_group_size=8)
    exact = [str(i) for i in ids if i is not None]
    catalog = Catalog.open(path)
    chunks, report = run(catalog, chunk_size=chunk_size)
    assert [p.id for c in chunks for p in c] == exact  # 9007199254740993 is not "9007199254740992"
    assert [(p.row, p.reason) for p in report.problems] == [(7, "missing id")]  # no false duplicates
    assert (report.rows_in, report.used) == (31, 30)
    report.check_accounting()
    # The whole table in memory, and a contiguous share (ids before it decided from the id column).
    assert [p.id for p in Catalog(read_table(path)).load_all(S)] == exact
    assert list(read_table(path)["sku"]) == ids
    assert _rows_of(catalog, shard=(1, 2)) == _rows_of(Catalog(read_table(path)), shard=(1, 2))
    assert catalog.first_rows_by_id(31) == {pid: row for row, pid in enumerate(map(str, ids)) if pid != "None"}


def test_jsonl_int_ids_past_float_and_int64_stay_exact(tmp_path: Path) -> None:
    ids = [BIG + 1, None, BIG + 3, 2**64 + 5, -(2**63), 12]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": i, "title": "t"}) + "\n" for i in ids))
    chunks, report = run(Catalog.open(path))
    assert [p.id for p in chunks[0]] == [str(i) for i in ids if i is not None]
    assert [(p.row, p.reason) for p in report.problems] == [(1, "missing id")]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a  b", "a  b"),  # inner spaces are kept as they are, not collapsed
        ("SKU-1/é", "SKU-1/é"),
        (np.int64(BIG + 1), str(BIG + 1)),
        (2**70, str(2**70)),
        (3.0, "3"),  # a whole float within 2**53: that integer
        (float(BIG), str(BIG)),
        ("Ünïcödé ✓".encode(), "Ünïcödé ✓"),
        (" pad", "id has leading or trailing whitespace"),
        ("pad ", "id has leading or trailing whitespace"),
        ("nb\u00a0sp\u00a0", "id has leading or trailing whitespace"),
        ("new\nline", "id contains a control character (U+000A)"),
        ("tail\n", "id contains a control character (U+000A)"),
        ("tab\tid", "id contains a control character (U+0009)"),
        ("nul\x00id", "id contains a control character (U+0000)"),
        ("line\u2028sep", "id contains a control character (U+2028)"),
        (1.5, "id is a fractional number (1.5)"),
        (float(BIG) * 4, "id is a float beyond 2**53"),
        (b"\xff", "id is not valid UTF-8"),
    ],
)
def test_id_policy(value, expected: str) -> None:
    """An id is kept exactly or its row refused with the reason; never rewritten."""
    frame = pd.DataFrame({"id": pd.Series([value, "other"], dtype=object), "title": ["T", "U"]})
    chunks, report = run(Catalog(frame))
    if not expected.startswith("id "):
        assert [p.id for p in chunks[0]] == [expected, "other"] and not report.problems
        return
    [problem] = report.problems
    assert problem.row == 0 and problem.reason.startswith(expected)
    shown = None if isinstance(value, bytes) else value if isinstance(value, str) else repr(value)
    assert problem.id == shown  # the refused id as it is (JSON escapes it in the report file)
    assert [p.id for p in chunks[0]] == ["other"]
    with pytest.raises(CatalogError, match="row 0"):
        run(Catalog(frame), strict=True)


def test_csv_ids_with_padding_or_newlines_are_refused_and_reported_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "title"], ["ok", "A"], [" padded ", "B"], ["two\nlines", "C"],
                                 ["a  b", "D"], ["ok2", "E"]])
    chunks, report = run(Catalog.open(path), chunk_size=2)
    assert [p.id for c in chunks for p in c] == ["ok", "a  b", "ok2"]
    written = json.loads(report.write(tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [(p["row"], p["id"], p["reason"]) for p in written["problems"]] == [
        (1, " padded ", "id has leading or trailing whitespace"),
        (2, "two\nlines", "id contains a control character (U+000A)"),
    ]


# --------------------------------------------------------------------------- malformed CSV lines

# Physical lines: 1 header, 2 good, 3 extra field, 4 good, 5 short, 6 blank, 7 a quote never closed
# that a later quote "closes" (the record swallows lines 8-9 and has too many fields), 8-9 good rows
# read again from line 8, 10 a legitimate quoted title over two lines (10-11), 12 good, 13 a quote
# never closed at all, 14 good (read again after the end is reached inside the quote).
BAD_CSV = (
    'id,title,brand\n'
    'a,Mug,acme\n'
    'b,Plate,acme,EXTRA\n'
    'c,Cup,acme\n'
    'd,Short\n'
    '\n'
    'e,"Bowl,acme\n'
    'f,Spoon,acme\n'
    'g,"Fork, steel",acme\n'
    'h,"Two\nline title",acme\n'
    'i,Knife,acme\n'
    'j,"Never closed,acme\n'
    'k,Glass,acme\n'
)
BAD_CSV_USED = ["a", "c", "f", "g", "h", "i", "k"]
BAD_CSV_REPORTED = [
    (1, "b", "bad {kind} line: line 3 has 4 fields, the header has 3"),
    (3, "d", "bad {kind} line: line 5 has 2 fields, the header has 3"),
    (4, "e", ("bad {kind} line: line 7 has 4 fields, the header has 3 (the record runs on to line 9: "
              "a quote that is never closed?)")),
    (9, "j", "bad {kind} line: line 13 opens a quote that is never closed"),
]


def _bad_delimited(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"bad.{suffix}"
    path.write_text(BAD_CSV if suffix == "csv" else BAD_CSV.replace(",", "\t"), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
@pytest.mark.parametrize("chunk_size", [1, 3, 512])
def test_malformed_csv_lines_are_bad_rows_and_reading_goes_on(tmp_path: Path, suffix: str, chunk_size: int) -> None:
    path = _bad_delimited(tmp_path, suffix)
    catalog = Catalog.open(path)
    used, problems = _rows_of(catalog, chunk_size=chunk_size)
    assert [pid for _, pid, _, _ in used] == BAD_CSV_USED
    assert problems == [(r, i, reason.format(kind=suffix.upper())) for r, i, reason in BAD_CSV_REPORTED]
    texts = {pid: text for _, pid, text, _ in used}
    assert texts["g"] == ("Fork, steel" if suffix == "csv" else "Fork steel")  # a quoted delimiter (TSV: a tab)
    assert texts["h"] == "Two line title"
    assert len(catalog) == len(used) + len(problems) == 11  # rows in = used + reported; blank lines are no rows
    # Row numbers agree between the stream, the table read whole, and the shares of a sharded run.
    in_memory = Catalog(read_table(path), source=str(path))
    assert _rows_of(in_memory, chunk_size=chunk_size) == (used, problems)
    for rank in range(3):
        assert _rows_of(catalog, chunk_size=chunk_size, shard=(rank, 3)) == \
            _rows_of(in_memory, chunk_size=chunk_size, shard=(rank, 3))
    assert catalog.extra_columns == ["title", "brand"]  # the problem marker is no carried column
    from item_embed.data import shards, tables

    assert tables.PROBLEM == shards.PROBLEM  # one marker for rows a reader could not build


def test_malformed_csv_line_under_strict_stops_with_its_line(tmp_path: Path) -> None:
    catalog = Catalog.open(_bad_delimited(tmp_path, "csv"))
    with pytest.raises(CatalogError) as info:
        run(catalog, strict=True)
    assert str(info.value) == f"{catalog.source}: row 1 (id 'b'): bad CSV line: line 3 has 4 fields, the header has 3"


def test_csv_quote_never_closed_on_the_last_line_and_header_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,title\r\na,A\r\nb,"B')  # no newline at the end either
    chunks, report = run(Catalog.open(path))
    assert [p.id for p in chunks[0]] == ["a"]
    assert [(p.row, p.id, p.reason) for p in report.problems] == [
        (1, "b", "bad CSV line: line 3 opens a quote that is never closed")]
    path.write_text('id,"title\na,A\n')
    with pytest.raises(CatalogError, match="bad CSV header: line 1 opens a quote that is never closed"):
        Catalog.open(path)
    path.write_text("")
    with pytest.raises(CatalogError, match="empty"):
        Catalog.open(path)


def test_csv_runaway_quote_is_bounded(tmp_path: Path) -> None:
    """A stray quote does not swallow the rest of a large file: past the csv module's field limit the
    record is one bad row and the following lines are read again."""
    rows = [f"p{i},{'x' * 200},acme" for i in range(1000)]
    path = tmp_path / "c.csv"
    path.write_text("id,title,brand\n" + 'stray,"oops,acme\n' + "\n".join(rows) + '\nlast,"quoted",acme\n')
    chunks, report = run(Catalog.open(path), chunk_size=64)
    assert len([p for c in chunks for p in c]) == 1001
    [problem] = report.problems
    assert (problem.row, problem.id) == (0, "stray") and problem.reason.startswith("bad CSV line: line 2")
    report.check_accounting()


def test_jsonl_bad_lines_are_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "title": "A"}\n{"id": "b", "title": \n\n[1, 2]\n{"id": "c", "title": "C\u2028D"}\n')
    chunks, report = run(Catalog.open(path))
    assert [(p.id, p.text) for p in chunks[0]] == [("a", "A"), ("c", "C D")]
    assert [(p.row, p.reason.split(":")[0]) for p in report.problems] == [(1, "bad JSON line"), (2, "bad JSON line")]
    assert "line 2" in report.problems[0].reason and "line 4 holds a JSON list" in report.problems[1].reason
    report.check_accounting()
