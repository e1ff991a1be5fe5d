"""The HTML report: pure pieces by hand, then the whole file on the tiny catalog and run."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from item_embed.evaluate.report import (
    Example,
    Hit,
    build_report,
    choose_queries,
    comparison_section,
    embedding_map,
    examples_html,
    primary_feature,
    retrieval_examples,
)

RESULTS = {
    "catalog": "tiny.csv", "model": "runs/item", "n_products": 120,
    "features": {
        "item": {"retrieval": {"joint": {"R@1": 0.7123, "R@10": 0.9, "MAP@R": 0.55, "queries": 100},
                               "image": {"R@1": 0.4321, "R@10": 0.8, "MAP@R": 0.3, "queries": 100}},
                 "probe": {"category": {"linear": {"accuracy": 0.8766, "macro_f1": 0.8, "test": 24},
                                        "knn": {"accuracy": 0.7, "macro_f1": 0.6, "test": 24}}}},
        "tfidf": {"retrieval": {"joint": {"R@1": 0.8123, "R@10": 0.95, "MAP@R": 0.7, "queries": 100},
                                "image": {"R@1": 0.0111, "R@10": 0.05, "MAP@R": 0.01, "queries": 100}},
                  "probe": {"category": {"linear": {"accuracy": 0.5556, "macro_f1": 0.5, "test": 24},
                                         "knn": {"accuracy": 0.5, "macro_f1": 0.4, "test": 24}}}},
    },
    "diagnostics": {"cls_attention_image": 0.2468, "cls_attention_text": 0.7532, "cos_joint_image": 0.4,
                    "cos_joint_title": 0.9},
    "commands": ["item-embed evaluate tiny.csv --model runs/item"], "seconds": {"item": 3.5, "tfidf": 0.4},
}


def data_uris(html: str) -> list[tuple[str, bytes]]:
    return [(mime, base64.b64decode(b64)) for mime, b64 in re.findall(r'src="data:(image/\w+);base64,([^"]+)"', html)
            + re.findall(r"src='data:(image/\w+);base64,([^']+)'", html)]


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_catalog, tiny_run, tmp_path_factory) -> Path:
    from item_embed.cli import main

    out = tmp_path_factory.mktemp("emb") / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    return out


def test_retrieval_examples_by_hand():
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    groups = ["a", "b", "a", "b"]
    [ex] = retrieval_examples(gallery[[0]], gallery, groups, np.array([0]), k=3)
    assert [h.row for h in ex.hits] == [1, 2, 3]  # itself excluded
    assert [h.same_group for h in ex.hits] == [False, True, False]
    assert [round(h.score, 3) for h in ex.hits] == [0.8, 0.6, 0.0]


def test_examples_agree_with_the_benchmark_r_at_1():
    from item_embed.evaluate.metrics import retrieval_metrics

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 3).astype(str)
    emb = rng.normal(size=(90, 8)).astype(np.float32) + np.repeat(rng.normal(size=(30, 8)), 3, axis=0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = choose_queries(groups, 1000)
    assert len(rows) == 90
    examples = retrieval_examples(emb[rows], emb, groups, rows, k=10)
    r1 = np.mean([ex.hits[0].same_group for ex in examples])
    r10 = np.mean([any(h.same_group for h in ex.hits) for ex in examples])
    expected = retrieval_metrics(emb, emb, groups)
    assert r1 == pytest.approx(expected["R@1"]) and r10 == pytest.approx(expected["R@10"])
    assert 0.05 < r1 < 1.0  # a case where hits and misses both occur


def test_choose_queries_only_picks_groups_with_two_members():
    groups = ["a", "a", "b", "c", "c", "d"]
    assert choose_queries(groups, 10).tolist() == [0, 1, 3, 4]
    assert choose_queries(groups, 10, eligible=np.array([1, 0, 1, 1, 1, 1], bool)).tolist() == [0, 3, 4]
    picked = choose_queries(groups, 2, seed=3)
    assert len(picked) == 2 and set(picked) <= {0, 1, 3, 4}


def test_embedding_map_samples_and_is_finite():
    emb = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
    rows, xy = embedding_map(emb, sample=25, seed=1)
    assert rows.shape == (25,) and len(set(rows.tolist())) == 25 and np.all(np.diff(rows) > 0)
    assert xy.shape == (25, 2) and np.isfinite(xy).all() and xy.std() > 0


def test_comparison_shows_deltas_against_the_primary():
    assert primary_feature(RESULTS) == "item"
    html = comparison_section(RESULTS, "item")
    assert 'class="delta down">item -0.100</span>' in html  # tfidf's joint R@1 is 0.1 higher
    assert 'class="delta up">item +0.421</span>' in html  # image queries: ITEm far ahead
    assert 'class="delta up">item +0.321</span>' in html  # linear probe
    assert '<td class="best">0.812' in html and '<td class="best">0.712' not in html
    with pytest.raises(ValueError, match="nope"):
        primary_feature(RESULTS, "nope")


def test_titles_are_escaped():
    frame = pd.DataFrame({"id": ["x", "y"], "title": ["<script>alert(1)</script>", "ok & fine"], "group": ["g", "g"]})
    ex = Example(0, "joint", [Hit(1, 0.5, True)])
    html = examples_html([ex], frame, {}, "group", 1)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "ok &amp; fine" in html
    assert 'data-hits="1"' in html and "same product" in html


def test_report_is_one_self_contained_file(tiny_embeddings, tiny_catalog, tmp_path):
    out = build_report(RESULTS, tiny_embeddings, tmp_path / "r" / "report.html", catalog=tiny_catalog,
                       color_by="category", examples=3, log=lambda _m: None)
    html = out.read_text()
    assert list(out.parent.iterdir()) == [out]  # nothing written beside it
    uris = data_uris(html)
    kinds = [mime for mime, _ in uris]
    assert kinds.count("image/png") == 2  # baseline bars + map
    assert kinds.count("image/jpeg") >= 3 * 6 - 3  # queries + top 5 (a few may repeat)
    for mime, blob in uris:
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == mime.split("/")[1].upper()
            im.load()
    assert not re.findall(r'src=["\'](?!data:)', html)  # no external references
    assert html.count('class="example"') == 3
    for text in ("0.712", "0.432", "0.877", "0.556", "0.247", "tfidf", "Baseline comparison", "Embedding map",
                 "Same-product retrieval", "Category prediction", "coloured by category",
                 "item-embed evaluate tiny.csv --model runs/item"):
        assert text in html, text


def test_report_cli_with_the_harness_and_the_model(tiny_embeddings, tiny_catalog, tiny_run, tmp_path):
    from item_embed.cli import main
    from item_embed.data.catalog import Catalog
    from item_embed.evaluate.baselines import TfidfBaseline
    from item_embed.evaluate.featurizers import EncoderFeaturizer, RawProducts
    from item_embed.evaluate.harness import evaluate_all

    products = RawProducts.from_catalog(Catalog.open(tiny_catalog))
    results = evaluate_all(products, [EncoderFeaturizer.from_pretrained(tiny_run, name="item"), TfidfBaseline()],
                           group="group", labels=["category", "colour"], diagnostics_of="item")
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report.html"
    rc = main(["report", str(tmp_path / "results.json"), "--embeddings", str(tiny_embeddings), "--catalog",
               str(tiny_catalog), "--model", str(tiny_run), "--out", str(out), "--examples", "2",
               "--color-by", "colour"])
    assert rc == 0
    html = out.read_text()
    for mode in ("joint", "image", "title"):
        assert f"query · {dict(joint='image + title', image='image only', title='title only')[mode]}" in html
    assert html.count('class="example"') == 6
    item_r1 = results["features"]["item"]["retrieval"]["image"]["R@1"]
    assert f"{item_r1:.3f}" in html and "coloured by colour" in html
    assert main(["report", str(tmp_path / "results.json"), "--embeddings", str(tiny_embeddings), "--out",
                 str(out), "--color-by", "no_such_column"]) == 2


def test_report_refuses_a_model_that_did_not_write_the_embeddings(tiny_embeddings, tiny_run, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_embeddings)
    meta = dict(table.schema.metadata)
    meta[b"item_embed.model_id"] = b"someone-else"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="give the run that wrote the embeddings"):
        build_report(RESULTS, tmp_path / "other.parquet", tmp_path / "r.html", model=tiny_run, log=lambda _m: None)
    assert not (tmp_path / "r.html").exists()
