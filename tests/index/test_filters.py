"""index/filters.py: the safe filter language, its exact mask, its Milvus text, and FAISS filtered search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from item_embed.cli import main
from item_embed.index.filters import FilterError, parse_filter
from item_embed.index.product_index import ProductIndex


def unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def frame(n: int = 400, seed: int = 1) -> pd.DataFrame:
    """Metadata with every kind of column and missing values in each."""
    rng = np.random.default_rng(seed)
    price = rng.uniform(0, 100, n).round(2)
    price[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({
        "category": pd.Series(rng.choice(["bag", "shoe", "hat", 'say "hi"', "ünï\\code"], n), dtype=object)
        .where(rng.random(n) > 0.1, None),
        "price": price,
        "stock": rng.integers(-5, 50, n),
        "rating": pd.array(np.where(rng.random(n) < 0.15, None, rng.integers(1, 6, n)), dtype="Int64"),
        "on_sale": pd.Series(rng.random(n) < 0.4, dtype=object).where(rng.random(n) > 0.1, None),
        "has_image": rng.random(n) < 0.8,
    })


# ---------------------------------------------------------------- a row-by-row reference


def _ref_cell(cell, op: str, value) -> bool:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell is pd.NA:
        return False
    return {"==": cell == value, "!=": cell != value, "<": cell < value, "<=": cell <= value,
            ">": cell > value, ">=": cell >= value}[op]


def reference(expr: str, meta: pd.DataFrame) -> np.ndarray:
    """Python semantics on the records, with a missing value failing every comparison (3-valued logic:
    a comparison on a missing cell is unknown, and only true passes)."""
    import ast

    def ev(node, row):  # -> True / False / None (unknown)
        if isinstance(node, ast.BoolOp):
            vals = [ev(v, row) for v in node.values]
            if isinstance(node.op, ast.And):
                return False if False in vals else (None if None in vals else True)
            return True if True in vals else (None if None in vals else False)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand, row)
            return None if v is None else not v
        left = node.left
        out = True
        for op, right in zip(node.ops, node.comparators):
            col, lit, sym = (left.id, ast.literal_eval(right), op) if isinstance(left, ast.Name) else \
                (right.id, ast.literal_eval(left), op)
            cell = row[col]
            missing = cell is None or cell is pd.NA or (isinstance(cell, float) and math.isnan(cell))
            if isinstance(op, (ast.In, ast.NotIn)):
                r = None if missing else ((cell in lit) == isinstance(op, ast.In))
            else:
                name = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}[type(sym)]
                if not isinstance(left, ast.Name):
                    name = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(name, name)
                r = None if missing else _ref_cell(cell, name, lit)
            out = False if (out is False or r is False) else (None if (out is None or r is None) else True)
            left = right
        return out

    tree = ast.parse(expr, mode="eval").body
    return np.array([ev(tree, row) is True for row in meta.to_dict("records")])


EXPRESSIONS = [
    'category == "bag"',
    'category != "bag"',
    'not (category == "bag")',
    'category in ["bag", "hat"]',
    'category not in ["bag", "hat"]',
    'category == \'say "hi"\'',
    'category == "ünï\\\\code"',
    "price < 30",
    "price >= 30",
    "not (price < 30)",
    "10 <= price < 40",
    "stock > -2 and stock <= 10",
    "rating in [4, 5]",
    "rating != 3",
    "on_sale == True",
    "on_sale != True",
    "has_image == False",
    '(category == "shoe" or price > 90) and not (stock < 0 or rating == 1)',
    'not (category in ["bag"] and price < 50)',
]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_mask_matches_a_row_by_row_reference(expr):
    meta = frame()
    got = parse_filter(expr, meta).mask(meta)
    np.testing.assert_array_equal(got, reference(expr, meta))


def test_missing_values_never_pass_and_is_none_finds_them():
    meta = pd.DataFrame({"price": [1.0, np.nan, 20.0], "c": ["a", None, "b"]})
    assert parse_filter("price < 10", meta).mask(meta).tolist() == [True, False, False]
    assert parse_filter("price >= 10", meta).mask(meta).tolist() == [False, False, True]
    assert parse_filter("not (price < 10)", meta).mask(meta).tolist() == [False, False, True]
    assert parse_filter('c != "a"', meta).mask(meta).tolist() == [False, False, True]
    assert parse_filter('c not in ["a"]', meta).mask(meta).tolist() == [False, False, True]
    assert parse_filter("c is None", meta).mask(meta).tolist() == [False, True, False]
    assert parse_filter("price is not null", meta).mask(meta).tolist() == [True, False, True]
    assert parse_filter("not (c is None)", meta).mask(meta).tolist() == [True, False, True]


def test_float32_columns_compare_as_the_doubles_they_hold():
    meta = pd.DataFrame({"w": np.array([0.1, 0.5], dtype=np.float32)})
    # float32(0.1) is 0.10000000149..., not 0.1: as Milvus (a DOUBLE field) sees it.
    assert parse_filter("w == 0.1", meta).mask(meta).tolist() == [False, False]
    assert parse_filter("w > 0.1", meta).mask(meta).tolist() == [True, True]


@pytest.mark.parametrize("expr, message", [
    ("colour == 'red'", "unknown column 'colour'; the columns are: category, price, stock, rating, on_sale, has_image"),
    ("__import__('os').system('x')", "Call is not allowed"),
    ("category.upper() == 'BAG'", "Call is not allowed"),
    ("price + 1 < 3", "BinOp is not allowed"),
    ("category[0] == 'b'", "Subscript is not allowed"),
    ("(lambda: 1)() == 1", "Call is not allowed"),
    ("price", "a bare column (price) is not a condition"),
    ("category == 3", "column 'category' holds text, not int"),
    ("price == 'x'", "column 'price' holds numbers, not str"),
    ("has_image < True", "compare it with == or !="),
    ("category in []", "an empty list matches nothing"),
    ("category in 'bag'", "needs a list of literals"),
    ("category in [other]", "expected a list item"),
    ("price == price", "not with another column"),
    ("stock == 2.5", "holds whole numbers"),
    ("price == None", "is None"),
    ("price < 1e999", "finite"),
    ("stock == 99999999999999999999", "64-bit"),
    ("category == ", "not valid syntax"),
    ("", "empty"),
    ("x" * 20000, "longer than"),
])
def test_refusals_name_the_problem(expr, message):
    with pytest.raises(FilterError, match=None) as e:
        parse_filter(expr, frame(5))
    assert message in str(e.value)


def test_deep_nesting_is_refused_not_crashing():
    expr = "not " * 3000 + "price < 1"
    with pytest.raises(FilterError):
        parse_filter(expr, frame(5))


def test_whole_number_columns_get_whole_number_bounds():
    meta = frame(50)
    for expr, milvus in [("stock > 2.5", "(stock > 2)"), ("stock >= 2.5", "(stock > 2)"),
                         ("stock < 2.5", "(stock < 3)"), ("stock <= 2.5", "(stock < 3)"), ("stock == 3.0", "(stock == 3)")]:
        f = parse_filter(expr, meta)
        assert f.to_milvus() == milvus
        np.testing.assert_array_equal(f.mask(meta), reference(expr, meta))


def test_milvus_text():
    meta = frame(5)
    f = parse_filter('category == \'say "hi"\\n\' and not (price < 10 or stock in [1, 2]) or on_sale == true', meta)
    assert f.to_milvus() == ('(((category == "say \\"hi\\"\\n") and (price >= 10) and '
                             '(stock is not null and stock not in [1, 2])) or (on_sale == true))')
    assert parse_filter("price <= 1e-05", meta).to_milvus() == "(price <= 1e-05)"
    assert parse_filter("-3 < stock", meta).to_milvus() == "(stock > -3)"
    assert parse_filter('category is None', meta).to_milvus({"category": "c0_category"}) == "(c0_category is null)"
    assert parse_filter('category != "x"', meta).to_milvus() == '(category is not null and category != "x")'
    assert parse_filter("rating in [1, 1, 2]", meta).columns == {"rating"}


def test_columns_by_name_only_take_any_literal():
    f = parse_filter("a == 1 and b == 'x'", ["a", "b"])
    assert f.to_milvus() == '((a == 1) and (b == "x"))'


# ---------------------------------------------------------------- FAISS: exact filtered search


def brute_force_filtered(index: ProductIndex, x_by_id: dict, q: np.ndarray, expr: str, k: int,
                         exclude: set[str] = frozenset()) -> list[list[str]]:
    meta = index.metadata
    keep = [pid for pid, ok in zip(index.ids, parse_filter(expr, meta).mask(meta)) if ok and pid not in exclude]
    if not keep:
        return [[] for _ in q]
    sims = q @ np.stack([x_by_id[p] for p in keep]).T
    return [[keep[j] for j in np.argsort(-s, kind="stable")[:k]] for s in sims]


@pytest.mark.parametrize("kind, options", [("flat", {}), ("hnsw", {}), ("ivf", {"nlist": 8, "nprobe": 1})])
def test_filtered_search_is_exact_for_every_kind(kind, options):
    n = 600
    x, meta = unit(n), frame(n)
    ids = [f"p{i}" for i in range(n)]
    index = ProductIndex.build(x, ids, meta, "model-a", "cfg", kind, **options)
    index.remove(ids[:7])
    x_by_id = dict(zip(ids, x))
    q = unit(25, seed=9)
    for expr in EXPRESSIONS:
        got = [[h.id for h in hits] for hits in index.search(q, 10, filter=expr)]
        assert got == brute_force_filtered(index, x_by_id, q, expr, 10), expr
    # A filter object, search_id with a filter, and a filter nothing passes.
    f = parse_filter('category == "hat"', index.metadata)
    hits = index.search_id("p100", 5, filter=f)
    assert [h.id for h in hits] == brute_force_filtered(index, x_by_id, x[100:101], 'category == "hat"', 5,
                                                        {"p100"})[0]
    assert all(index.metadata.loc[h.row, "category"] == "hat" for h in hits)
    assert index.search(q[:2], 5, filter="price > 1000") == [[], []]
    # Filtering across many chunks of the exact scan gives the same answer.
    if kind == "hnsw":
        import item_embed.index.product_index as pi

        old, pi.FILTER_SCAN_CHUNK = pi.FILTER_SCAN_CHUNK, 37
        try:
            got = [[h.id for h in hits] for hits in index.search(q, 10, filter="price < 50")]
        finally:
            pi.FILTER_SCAN_CHUNK = old
        assert got == brute_force_filtered(index, x_by_id, q, "price < 50", 10)


def test_filtered_search_refuses_unknown_columns():
    index = ProductIndex.build(unit(20), [f"p{i}" for i in range(20)], frame(20), "m", "c")
    with pytest.raises(FilterError, match="unknown column 'colour'"):
        index.search(unit(1), 3, filter="colour == 'red'")


def _embedding_file(path: Path, emb: np.ndarray, meta: pd.DataFrame, ids: list[str], model_id: str = "model-a") -> Path:
    table = pa.Table.from_pandas(meta.assign(id=ids)[["id", *meta.columns]], preserve_index=False)
    flat = pa.array(emb.astype(np.float32).reshape(-1), type=pa.float32())
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))
    meta_kv = {b"item_embed.model_id": model_id.encode(), b"item_embed.config_hash": b"cfg",
               b"item_embed.dim": str(emb.shape[1]).encode()}
    pq.write_table(table.replace_schema_metadata(meta_kv), path)
    return path


def test_cli_search_with_filter(tmp_path, capsys):
    n = 200
    x, meta = unit(n), frame(n)
    ids = [f"p{i}" for i in range(n)]
    emb = _embedding_file(tmp_path / "emb.parquet", x, meta, ids)
    assert main(["index", str(emb), "--out", str(tmp_path / "ix"), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows_indexed"] == n
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "ix"), "--id", "p3", "-k", "5", "--json",
                 "--filter", 'category in ["bag", "shoe"] and price < 60']) == 0
    got = json.loads(capsys.readouterr().out)
    index = ProductIndex.load(tmp_path / "ix")
    want = brute_force_filtered(index, dict(zip(ids, x)), x[3:4], 'category in ["bag", "shoe"] and price < 60', 5,
                                {"p3"})[0]
    assert [r["id"] for r in got["results"]] == want
    assert all(r["category"] in ("bag", "shoe") and r["price"] < 60 for r in got["results"])
    assert got["query"]["filter"] == 'category in ["bag", "shoe"] and price < 60'
    assert main(["search", "--index", str(tmp_path / "ix"), "--id", "p3", "--filter", "colour == 1"]) == 2
    assert "unknown column 'colour'; the columns are:" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "ix"), "--id", "p3", "--uri", "x.db"]) == 2
    assert "add --backend milvus" in capsys.readouterr().err
