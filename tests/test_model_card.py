"""The run folder's model card (README.md): written by train, completed by evaluate --model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from item_embed.model_card import CARD, EVALUATION, final_losses, render_model_card, write_model_card


def _split(card: str) -> tuple[dict, str]:
    """(front matter, Markdown body) of a card in the Hugging Face layout."""
    yaml = pytest.importorskip("yaml")
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _row(body: str, label: str) -> str:
    """The value cell of the two-column table row ``| label | value |``."""
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no row {label!r} in the card")


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """The tiny run without its checkpoints and evaluations (a copy this test may write into; other tests
    evaluate the shared run)."""
    return Path(shutil.copytree(run, tmp_path / "my-run",
                                ignore=shutil.ignore_patterns("checkpoints", "warmstart", EVALUATION)))


def test_train_writes_a_model_card_in_the_hugging_face_layout(tiny_run, tiny_catalog):
    """Front matter, then what data (row counts, the catalog's sha256), the recipe, the budget and the
    final losses, each equal to what the run folder records."""
    meta, body = _split((tiny_run / CARD).read_text())
    assert meta["library_name"] == "item-embed" and "item-embed" in meta["tags"]
    assert meta["pipeline_tag"] == "feature-extraction"
    for section in ("## Model description", "## Training data", "## Training procedure", "### Recipe",
                    "### Budget", "## Results", "## Evaluation", "## How to use", "## Limitations"):
        assert f"\n{section}\n" in body, section
    report = json.loads((tiny_run / "catalog_report.json").read_text())
    assert int(_row(body, "rows read")) == report["rows_in"]
    assert int(_row(body, "rows used")) == report["rows_used"]
    assert int(_row(body, "title only")) == report["text_only"]
    assert int(_row(body, "photo only")) == report["image_only"]
    assert _row(body, "catalog sha256") == f"`{hashlib.sha256(tiny_catalog.read_bytes()).hexdigest()}`"
    config = json.loads((tiny_run / "config.json").read_text())
    assert _row(body, "weights sha256") == f"`{config['weights_sha256']}`"
    assert int(_row(body, "trained steps")) == config["trained_steps"] == 6
    assert _row(body, "asked") == "steps=6" and int(_row(body, "products seen")) == 6 * 8
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    losses = final_losses(tiny_run)
    assert losses and set(losses) == set(last) - {"step", "lr", "grad_norm", "elapsed"}
    section = body.split("### Final training losses")[1].split("## Evaluation")[0]
    for key in losses:
        assert float(_row(section, key)) == pytest.approx(last[key], rel=1e-5), key


def test_card_is_no_part_of_the_checksummed_model(tiny_run, tmp_path):
    """A card (even an edited one) changes no checksum: the folder loads with the same model id."""
    from item_embed.encode import ItemEncoder

    config = json.loads((tiny_run / "config.json").read_text())
    assert CARD not in (config.get("files_sha256") or {})
    run = _copy_run(tiny_run, tmp_path)
    before = ItemEncoder.from_pretrained(run, device="cpu").model_id
    (run / CARD).write_text("edited by hand\n")
    assert ItemEncoder.from_pretrained(run, device="cpu").model_id == before
    write_model_card(run)
    assert not list(run.glob(f".{CARD}.*"))  # no temporary file left behind


def test_evaluate_model_records_its_tables_in_the_run_card(tiny_run, tiny_catalog, tmp_path):
    """evaluate --model RUN keeps its results in RUN/evaluation.json and the card shows the same tables
    as the evaluate report (and its own numbers in model-index); a second evaluation of the same catalog
    replaces the first; evaluations of other weights are left out of the card."""
    from item_embed.cli import main
    from item_embed.evaluate.harness import results_tables

    run = _copy_run(tiny_run, tmp_path)
    out = tmp_path / "results.json"
    argv = ["evaluate", str(tiny_catalog), "--model", str(run), "--group", "group", "--labels", "category",
            "--modes", "joint,title", "--precision", "fp32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    meta, body = _split((run / CARD).read_text())
    tables = {title: rows for title, _, rows in results_tables(results)}
    for title in ("Same-product retrieval", "Category prediction (test fold)"):
        assert f"#### {title}" in body
        for row in tables[title]:
            assert "| " + " | ".join(row) + " |" in body, row
    assert "Not evaluated yet" not in body and "Wall time" not in body
    index = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    item = results["features"]["item"]
    assert index["joint R@1"] == item["retrieval"]["joint"]["R@1"]
    assert index["title MAP@R"] == item["retrieval"]["title"]["MAP@R"]
    assert index["knn accuracy"] == item["probe"]["category"]["knn"]["accuracy"]

    assert main(argv) == 0  # the same catalog again: one entry
    assert len(json.loads((run / EVALUATION).read_text())["evaluations"]) == 1

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "weights_sha256": "0" * 64}))  # as if trained further
    _, body = _split(render_model_card(run))
    assert "Not evaluated yet" in body and "1 evaluation(s) of earlier weights" in body


def test_card_of_a_sparse_model_folder(tiny_run, tmp_path):
    """A folder without metrics.jsonl or a row report (e.g. fit-shape's output) still gets a card."""
    run = _copy_run(tiny_run, tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "catalog_report.json").unlink()
    meta, body = _split(render_model_card(run))
    assert meta["library_name"] == "item-embed" and "No `metrics.jsonl`" in body
    assert "model-index" not in meta and "Not evaluated yet" in body
    with pytest.raises(ValueError, match="config.json"):
        render_model_card(tmp_path)
