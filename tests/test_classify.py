"""Category prediction: linear head on frozen embeddings, fine-tuning, saving, predicting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from item_embed.checkpoint import CheckpointError
from item_embed.classify import (
    Classifier,
    ModelMismatchError,
    fit_linear,
    heldout_mask,
    prepare_labels,
    score_predictions,
)
from item_embed.cli import main
from item_embed.encode import ItemEncoder

QUIET = ["--no-progress"]


def _clusters(n_per: int = 40, classes: int = 4, d: int = 16, noise: float = 0.05, seed: int = 0):
    """Well separated clusters on the unit sphere: (embeddings, labels, ids)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:classes]  # orthonormal directions
    emb = np.concatenate([c + noise * rng.normal(size=(n_per, d)) for c in centres])
    labels = np.repeat([f"class-{i}" for i in range(classes)], n_per)
    ids = [f"item-{i}" for i in range(len(emb))]
    return emb.astype(np.float32), labels, ids


def _silent(_msg: str) -> None:
    pass


def _assert_safetensors_and_json_only(folder) -> None:
    """Every file parses as safetensors or JSON: nothing pickled (torch.save, joblib) in the folder."""
    from safetensors.numpy import load_file

    for p in folder.iterdir():
        if p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())
        else:
            pytest.fail(f"unexpected file {p.name} in a classifier folder")


@pytest.fixture(scope="module")
def linear_clf(tiny_catalog, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "linear"
    assert main(["classify", "fit", str(tiny_catalog), "--model", str(tiny_run), "--label", "category",
                 "--out", str(out), *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned_clf(tiny_catalog, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "finetuned"
    assert main(["classify", "fit", str(tiny_catalog), "--model", str(tiny_run), "--label", "category",
                 "--out", str(out), "--finetune", "--epochs", "1", "--batch-size", "16", *QUIET]) == 0
    return out


# ---- library ------------------------------------------------------------------------------


def test_separable_clusters_are_classified_perfectly():
    emb, labels, ids = _clusters()
    clf = fit_linear(emb, labels, ids, model_id="m", log=_silent)
    h = clf.metrics["heldout"]
    assert h["scored_rows"] > 0 and h["train_rows"] + h["scored_rows"] == len(emb)
    assert h["accuracy"] == 1.0 and h["macro_f1"] == 1.0
    assert clf.predict(emb) == list(labels)
    assert clf.labels == sorted(set(labels)) and clf.weight.shape == (4, 16) and clf.bias.shape == (4,)


def test_exported_head_matches_sklearn_pipeline():
    """Standardisation folded into (W, b) gives sklearn's own probabilities (multiclass and binary)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for classes in (3, 2):
        emb, labels, ids = _clusters(n_per=30, classes=classes, d=8, noise=0.6, seed=classes)
        clf = fit_linear(emb, labels, ids, model_id="m", log=_silent)
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x, labels)
        assert list(ref.classes_) == clf.labels
        np.testing.assert_allclose(clf.predict_proba(emb), ref.predict_proba(x), atol=1e-5)


def test_top_k_is_sorted_and_capped():
    emb, labels, ids = _clusters(classes=3)
    clf = fit_linear(emb, labels, ids, model_id="m", log=_silent)
    top = clf.top_k(emb[:5], k=10)
    assert all(len(t) == 3 for t in top)
    for t, p in zip(top, clf.predict_proba(emb[:5])):
        probs = [q for _, q in t]
        assert probs == sorted(probs, reverse=True) and probs[0] == pytest.approx(p.max())
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert top[0][0][0] == labels[0]
    with pytest.raises(ValueError, match="dimension"):
        clf.predict_proba(np.ones((1, 5)))


def test_heldout_split_keeps_groups_together(tiny_catalog):
    frame = pd.read_csv(tiny_catalog)
    test = heldout_mask(frame["group"])
    per_group = pd.Series(test).groupby(frame["group"].to_numpy()).nunique()
    assert (per_group == 1).all(), "a group has listings on both sides of the split"
    assert 0 < test.sum() < len(frame)
    # fit_linear scores exactly the rows of that test fold.
    rng = np.random.default_rng(0)
    clf = fit_linear(rng.normal(size=(len(frame), 8)), frame["category"], frame["group"], model_id="m", log=_silent)
    h = clf.metrics["heldout"]
    assert h["test_rows"] == int(test.sum()) and h["train_rows"] == int((~test).sum())


def test_missing_labels_skipped_and_counted():
    codes, names, report = prepare_labels(["a", None, "b", float("nan"), "  ", "a", pd.NA])
    assert report.missing == 4 and report.used == 3 and names == ["a", "b"]
    assert list(codes) == [0, -1, 1, -1, -1, 0, -1]
    assert any("4 of 7 rows have no label" in m for m in report.messages())


def test_single_example_class_is_kept_and_reported():
    emb, labels, ids = _clusters(classes=3)
    labels = labels.astype(object)
    labels[5] = "rare"
    messages: list[str] = []
    clf = fit_linear(emb, labels, ids, model_id="m", log=messages.append)
    assert "rare" in clf.labels, "a single-example class must still be trained on"
    assert clf.metrics["labels"]["too_few"] == ["rare"]
    assert any("single example" in m and "cannot be evaluated" in m and "'rare'" in m for m in messages)


def test_fewer_than_two_classes_is_a_clear_error():
    emb, _, ids = _clusters(classes=2)
    with pytest.raises(ValueError, match="need at least 2 classes to train a classifier, found only .shoe."):
        fit_linear(emb, ["shoe"] * (len(emb) - 1) + [None], ids, model_id="m", log=_silent)
    with pytest.raises(ValueError, match="at least 2 classes.*none"):
        prepare_labels([None, float("nan")])


def test_score_predictions_counts_unseen_labels():
    top = [[("a", 0.9), ("b", 0.1)], [("b", 0.6), ("a", 0.4)], [("a", 0.7), ("b", 0.3)], [("a", 0.5), ("b", 0.5)]]
    s = score_predictions(top, ["a", "a", "zebra", None], ["a", "b"])
    assert s["labelled"] == 3 and s["missing"] == 1
    assert s["accuracy"] == pytest.approx(1 / 3) and s["top_k_accuracy"] == pytest.approx(2 / 3)
    assert s["unseen_rows"] == 1 and s["unseen_labels"] == {"zebra": 1}


def test_save_round_trip_without_pickle(tmp_path):
    emb, labels, ids = _clusters(classes=3, noise=0.5)
    clf = fit_linear(emb, labels, ids, model_id="model-x", label_column="category", log=_silent)
    folder = clf.save(tmp_path / "clf")
    names = {p.name for p in folder.iterdir()}
    assert names == {"head.safetensors", "classifier.json"}
    _assert_safetensors_and_json_only(folder)
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["model_id"] == "model-x" and meta["label_column"] == "category" and "head.safetensors" in meta["sha256"]
    back = Classifier.load(folder)
    assert back.labels == clf.labels and back.model_id == "model-x" and back.encoder is None
    np.testing.assert_array_equal(back.predict_proba(emb), clf.predict_proba(emb))
    assert back.metrics["heldout"]["accuracy"] == clf.metrics["heldout"]["accuracy"]
    # A damaged head is refused, not silently used.
    head = folder / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        Classifier.load(folder)


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    emb, labels, ids = _clusters(classes=2)
    clf = fit_linear(emb, labels, ids, model_id="m", log=_silent)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a classifier folder"):
        clf.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_check_model_refuses_other_embeddings():
    emb, labels, ids = _clusters(classes=2)
    clf = fit_linear(emb, labels, ids, model_id="model-a", log=_silent)
    clf.check_model("model-a")
    with pytest.raises(ModelMismatchError, match="model-a"):
        clf.check_model("model-b")


# ---- end to end on the built-in catalog -----------------------------------------------------


def test_fit_linear_cli(linear_clf, tiny_run, tiny_catalog, capsys):
    meta = json.loads((linear_clf / "classifier.json").read_text())
    assert meta["finetuned"] is False and meta["label_column"] == "category"
    assert meta["model_id"] == ItemEncoder.from_pretrained(tiny_run, device="cpu").model_id
    assert meta["labels"] == sorted(pd.read_csv(tiny_catalog)["category"].unique())
    h = meta["metrics"]["heldout"]
    assert 0.0 <= h["accuracy"] <= 1.0 and 0.0 <= h["macro_f1"] <= 1.0 and h["scored_rows"] > 0
    report = json.loads((linear_clf / "catalog_report.json").read_text())
    assert report["rows_in"] == report["rows_used"] + report["rows_reported"]


def test_predict_cli(linear_clf, tiny_run, tiny_catalog, tmp_path, capsys):
    out = tmp_path / "pred.parquet"
    # fp32 on both sides, so the numbers below can match to 1e-5 (`auto` may pick bf16).
    assert main(["classify", "predict", str(tiny_catalog), "--classifier", str(linear_clf), "--model", str(tiny_run),
                 "--out", str(out), "-k", "3", "--precision", "fp32", *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "accuracy=" in printed and "never saw" not in printed
    pred = pd.read_parquet(out)
    catalog = pd.read_csv(tiny_catalog)
    assert list(pred.columns[:7]) == ["id", "label_1", "label_2", "label_3", "prob_1", "prob_2", "prob_3"]
    assert {"title", "group", "category"} <= set(pred.columns) and "image" not in pred.columns
    assert list(pred["id"]) == list(catalog["id"])
    assert (pred["prob_1"] >= pred["prob_2"]).all() and (pred["prob_2"] >= pred["prob_3"]).all()
    # Same numbers as the library on the same embeddings.
    clf = Classifier.load(linear_clf)
    enc = ItemEncoder.from_pretrained(tiny_run, device="cpu", precision="fp32")
    top = clf.top_k(enc.encode(catalog.head(4).to_dict("records"), image_root=tiny_catalog.parent), k=3)
    assert [t[0][0] for t in top] == list(pred["label_1"][:4])
    np.testing.assert_allclose([t[0][1] for t in top], pred["prob_1"][:4], atol=1e-5)


def test_predict_reports_unseen_labels(linear_clf, tiny_run, tiny_catalog, tmp_path, capsys):
    frame = pd.read_csv(tiny_catalog)
    frame.loc[[0, 1, 2], "category"] = "spaceship"
    frame.loc[3, "category"] = "submarine"
    edited = tiny_catalog.parent / "unseen.csv"  # same folder: relative image paths still resolve
    frame.to_csv(edited, index=False)
    out = tmp_path / "pred.parquet"
    assert main(["classify", "predict", str(edited), "--classifier", str(linear_clf), "--model", str(tiny_run),
                 "--out", str(out), *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "4 rows carry 2 labels the classifier never saw" in printed
    assert "'spaceship'" in printed and "'submarine'" in printed
    assert len(pd.read_parquet(out)) == len(frame)


def test_fewer_than_two_classes_cli(tiny_run, tiny_catalog, tmp_path, capsys):
    frame = pd.read_csv(tiny_catalog)
    frame["category"] = "mug"
    one = tiny_catalog.parent / "one_class.csv"
    frame.to_csv(one, index=False)
    assert main(["classify", "fit", str(one), "--model", str(tiny_run), "--label", "category",
                 "--out", str(tmp_path / "c"), *QUIET]) == 2
    assert "need at least 2 classes to train a classifier, found only 'mug'" in capsys.readouterr().err
    assert main(["classify", "fit", str(tiny_catalog), "--model", str(tiny_run), "--label", "brand_new",
                 "--out", str(tmp_path / "c"), *QUIET]) == 2
    assert "no label column 'brand_new'" in capsys.readouterr().err


def test_finetune_cli(finetuned_clf, tiny_run, tiny_catalog, tmp_path, capsys):
    meta = json.loads((finetuned_clf / "classifier.json").read_text())
    assert meta["finetuned"] is True and meta["options"]["method"] == "finetune"
    base = ItemEncoder.from_pretrained(tiny_run, device="cpu")
    tuned = ItemEncoder.from_pretrained(finetuned_clf, device="cpu")  # a model folder in its own right
    assert meta["options"]["finetuned_from"] == base.model_id
    assert tuned.model_id == meta["model_id"] != base.model_id
    # The head reads [CLS]: the tuned encoder drops the base model's shape slice.
    assert base.model.shape is not None and tuned.model.shape is None and tuned.dim == base.cfg.hidden_size
    changed = [k for k, v in tuned.model.state_dict().items() if not np.array_equal(v, base.model.state_dict()[k])]
    assert changed, "fine-tuning left the encoder untouched"
    h = meta["metrics"]["heldout"]
    assert 0.0 <= h["accuracy"] <= 1.0 and h["scored_rows"] > 0 and np.isfinite(h["final_train_loss"])
    assert {"model.safetensors", "config.json", "head.safetensors"} <= set(meta["sha256"])
    _assert_safetensors_and_json_only(finetuned_clf)
    # The shared engine logged the fine-tuning and checkpointed it beside the classifier (for --resume).
    run = finetuned_clf.with_name(finetuned_clf.name + ".run")
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == meta["options"]["steps"] and (run / "checkpoints").is_dir()
    # Predict with its own encoder (no --model needed); probabilities survive the round trip.
    out = tmp_path / "pred.parquet"
    assert main(["classify", "predict", str(tiny_catalog), "--classifier", str(finetuned_clf),
                 "--out", str(out), "-k", "2", "--precision", "fp32", *QUIET]) == 0
    pred = pd.read_parquet(out)
    clf = Classifier.load(finetuned_clf, device="cpu", precision="fp32")
    rows = pd.read_csv(tiny_catalog).head(3).to_dict("records")
    top = clf.classify(rows, k=2, image_root=tiny_catalog.parent)
    np.testing.assert_allclose([t[0][1] for t in top], pred["prob_1"][:3], atol=1e-5)


def test_model_mismatch_is_refused(linear_clf, finetuned_clf, tiny_run, tiny_catalog, tmp_path, capsys):
    out = tmp_path / "pred.parquet"
    # The fine-tuned classifier folder is a valid model folder, but not the model of the linear head.
    assert main(["classify", "predict", str(tiny_catalog), "--classifier", str(linear_clf),
                 "--model", str(finetuned_clf), "--out", str(out), *QUIET]) == 2
    assert "trained on embeddings of model" in capsys.readouterr().err
    assert main(["classify", "predict", str(tiny_catalog), "--classifier", str(finetuned_clf),
                 "--model", str(tiny_run), "--out", str(out), *QUIET]) == 2
    assert "trained on embeddings of model" in capsys.readouterr().err
    assert not out.exists()
    # A linear head without any model to embed with: a clear error too.
    assert main(["classify", "predict", str(tiny_catalog), "--classifier", str(linear_clf),
                 "--out", str(out), *QUIET]) == 2
    assert "--model" in capsys.readouterr().err
