"""ItemEncoder: modalities, batching, precision, bad records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from item_embed.config import model_config_for
from item_embed.data.arrays import load_tokenizer
from item_embed.encode import ItemEncoder
from item_embed.model.encoder import ItemModel

TITLES = ["Red striped ceramic mug", "Acme cotton t-shirt, navy blue, size M", "Ünïcödé 靴 👟 running shoes"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny"))
    return ItemEncoder(model, load_tokenizer(), device="cpu", precision="fp32")  # exact: bf16 rounds per batch


def _img(seed: int, size: int = 40) -> np.ndarray:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def test_encode_image_only_text_only_and_both(encoder):
    recs = [{"title": "blue mug", "image": _img(0)}, {"title": "blue mug"}, {"image": _img(0)}]
    emb = encoder.encode(recs)
    assert emb.shape == (3, encoder.dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1]) and not np.allclose(emb[0], emb[2])


def test_embedding_does_not_depend_on_batch_companions(encoder):
    """Padding and missing modalities are masked: a product embeds the same alone or in a mixed batch."""
    recs = [{"title": "a very long title " * 3, "image": _img(1)}, {"title": "cap"}, {"image": _img(2)},
            {"title": "green sock", "image": _img(3)}]
    together = encoder.encode(recs, batch_size=4)
    alone = np.concatenate([encoder.encode([r]) for r in recs])
    assert np.abs(together - alone).max() < 1e-5


def test_encode_batched_groups_titles_by_length_and_keeps_the_order_given(encoder):
    """Batches are cut from products sorted by title length (less padding); rows come back in input
    order, each the embedding the product gets alone."""
    recs = [{"id": str(i), "title": None if i in (2, 5) else "word " * (i * 7 % 11 + 1), "image": _img(i) if i % 3 else None}
            for i in range(1, 10)]
    products = [encoder.to_product(r, i) for i, r in enumerate(recs)]
    batched = encoder.encode_batched(products, batch_size=2)
    alone = np.concatenate([encoder.encode_products([p]) for p in products])
    assert batched.shape == (9, encoder.dim) and np.abs(batched - alone).max() < 1e-5
    assert encoder.encode_batched([], batch_size=2).shape == (0, encoder.dim)


def test_bf16_encoder_runs_a_bf16_copy_and_leaves_the_model_fp32():
    """bf16 encodes with its own bfloat16 copy (shape slice shared, fp32): the model it was given keeps its
    fp32 weights (what gets saved and fine-tuned), and the embeddings stay those of fp32 within bf16's rounding."""
    torch.manual_seed(0)
    model = ItemModel(model_config_for("tiny", image_stem="conv_channelnorm")).eval()
    rng = np.random.default_rng(0)
    model.shape.fit(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    tok = load_tokenizer()
    fp32 = ItemEncoder(model, tok, device="cpu", precision="fp32")
    bf16 = ItemEncoder(model, tok, device="cpu", precision="bf16")
    assert fp32.runner is model and bf16.runner is not model and bf16.runner.shape is model.shape
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.runner.parameters())
    assert model.shape.proj.dtype == torch.float32
    recs = [{"title": f"green sock {i}", "image": _img(i)} for i in range(6)] + [{"title": "cap"}, {"image": _img(9)}]
    a, b = fp32.encode(recs), bf16.encode(recs)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # bf16 did run, and stayed close


def test_encode_rejects_empty_record_naming_it(encoder):
    with pytest.raises(ValueError, match="'x9'"):
        encoder.encode([{"id": "x9", "title": "  "}])


def test_complete_folder_loads_with_an_id_covering_its_tokenizer_and_older_folders_keep_theirs(tiny_run, tmp_path):
    import json
    import shutil

    from item_embed.checkpoint import files_digest

    config = json.loads((tiny_run / "config.json").read_text())
    old_id = f"{config['config_hash']}-{config['weights_sha256'][:16]}"  # what every folder had before
    new = ItemEncoder.from_pretrained(tiny_run, device="cpu", precision="fp32")
    assert len(new.tokenizer) == new.cfg.vocab_size == 30522
    assert new.model_id == f"{old_id}-{files_digest(config)}" and len(files_digest(config)) == 8
    # A folder saved before the tokenizer checksums were recorded: same weights, same tokenizer, its old id
    # (indexes and embedding files built from it stay valid), same embeddings.
    older = tmp_path / "older"
    shutil.copytree(tiny_run, older, ignore=shutil.ignore_patterns("checkpoints"))
    del config["files_sha256"]
    (older / "config.json").write_text(json.dumps(config))
    old = ItemEncoder.from_pretrained(older, device="cpu", precision="fp32")
    assert old.model_id == old_id
    rows = [{"title": t} for t in TITLES]
    np.testing.assert_array_equal(old.encode(rows), new.encode(rows))


# ------------------------------------------------------------------ encode as sentence-transformers has it


def test_encode_takes_titles_photos_paths_and_records_one_or_many(encoder, tmp_path):
    """str = a title; PIL image, pathlib.Path or bytes = a photo; dict = a record ('text' = 'title'); one
    input gives (d,), a list (n, d), each row the embedding of the same product as a record."""
    from pathlib import Path

    photo = _img(5)
    path = tmp_path / "p.png"
    photo.save(path)
    as_records = encoder.encode([{"title": "pink pillow"}, {"image": photo}, {"image": path},
                                 {"title": "red mug", "image": photo}])
    one = encoder.encode("pink pillow")
    assert one.shape == (encoder.dim,) and one.dtype == np.float32
    np.testing.assert_allclose(one, as_records[0], atol=1e-6)  # alone or in a batch: equal to rounding
    many = encoder.encode(["pink pillow", photo, Path(path), path.read_bytes(), {"text": "red mug", "image": photo}])
    assert many.shape == (5, encoder.dim)
    np.testing.assert_allclose(many[:3], as_records[[0, 1, 2]], atol=1e-6)
    np.testing.assert_allclose(many[3], as_records[2], atol=1e-6)  # the same file's bytes
    np.testing.assert_allclose(many[4], as_records[3], atol=1e-6)
    np.testing.assert_allclose(encoder.encode(Path("p.png"), image_root=tmp_path), as_records[2], atol=1e-6)
    np.testing.assert_array_equal(encoder.encode(t for t in ["pink pillow"]), one[None])  # any iterable
    assert encoder.encode([]).shape == (0, encoder.dim)
    # a str is never read as a path: a title that looks like one stays a title
    assert not np.allclose(encoder.encode(str(path)), as_records[2])


def test_encode_output_options(encoder):
    """convert_to_tensor / convert_to_numpy / normalize_embeddings / precision / device, as in
    SentenceTransformer.encode; the default output is the float32 unit rows of before."""
    titles = ["pink pillow", "red mug", "blue sock"]
    ref = encoder.encode(titles)
    assert np.allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    t = encoder.encode(titles, convert_to_tensor=True, convert_to_numpy=True)  # the tensor wins
    assert isinstance(t, torch.Tensor) and t.device == encoder.device and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), ref)
    assert isinstance(encoder.encode("pink pillow", convert_to_tensor=True), torch.Tensor)
    rows = encoder.encode(titles, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and all(isinstance(r, torch.Tensor) for r in rows)
    np.testing.assert_array_equal(encoder.encode(titles, normalize_embeddings=False), ref)  # already unit rows
    np.testing.assert_allclose(encoder.encode(titles, batch_size=1, show_progress_bar=True), ref, atol=1e-6)
    ubin = encoder.encode(titles, precision="ubinary")
    assert ubin.dtype == np.uint8 and ubin.shape == (3, -(-encoder.dim // 8))
    np.testing.assert_array_equal(np.unpackbits(ubin, axis=1)[:, :encoder.dim], (ref > 0).astype(np.uint8))
    binary = encoder.encode(titles, precision="binary")
    assert binary.dtype == np.int8
    np.testing.assert_array_equal(binary.astype(np.int16) + 128, ubin)
    np.testing.assert_array_equal(encoder.encode(titles, device="cpu"), ref)
    assert encoder.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_device_moves_the_encoder_to_the_gpu_and_back():
    torch.manual_seed(0)
    enc = ItemEncoder(ItemModel(model_config_for("tiny")), load_tokenizer(), device="cpu", precision="fp32")
    cpu = enc.encode(TITLES)
    gpu = enc.encode(TITLES, device="cuda", convert_to_tensor=True)
    assert gpu.device.type == "cuda" and enc.device.type == "cuda"
    assert np.abs(gpu.cpu().numpy() - cpu).max() < 1e-4
    np.testing.assert_allclose(enc.encode(TITLES, device="cpu"), cpu, atol=1e-6)


@pytest.mark.parametrize("call, error, names", [
    (lambda e: e.encode(["pink pillow", 3]), TypeError, "input 1"),
    (lambda e: e.encode(7), TypeError, "int"),
    (lambda e: e.encode(["pink pillow"], normalise=True), TypeError, "normalise"),
    (lambda e: e.encode(["pink pillow"], prompt="query: "), TypeError, "prompt"),
    (lambda e: e.encode(["pink pillow"], precision="bf16"), ValueError, "from_pretrained"),
    (lambda e: e.encode(["pink pillow"], precision="int8"), ValueError, "int8"),
    (lambda e: e.encode(["pink pillow"], batch_size=0), ValueError, "batch_size"),
    (lambda e: e.encode(["pink pillow"], device="gpu7"), ValueError, "gpu7"),
    (lambda e: e.encode(["a", {"name": "pink pillow"}]), ValueError, "'name'"),
    (lambda e: e.encode(["a", {"id": "x7", "title": ""}]), ValueError, "'x7'"),
    (lambda e: e.encode([np.zeros((4, 4, 3), dtype=np.uint8)]), TypeError, "PIL"),
    (lambda e: e.encode(__import__("pandas").DataFrame({"title": ["a"]})), TypeError, "to_dict"),
])
def test_encode_errors_are_one_line_and_name_the_culprit(encoder, call, error, names):
    with pytest.raises(error) as info:
        call(encoder)
    assert names in str(info.value) and "\n" not in str(info.value)


def test_sentence_transformers_semantic_search_and_ir_evaluator_use_the_encoder(encoder, tmp_path):
    """util.semantic_search takes encode(..., convert_to_tensor=True) as it is; the IR evaluator takes the
    adapter, with titles as queries and records (title + photo) as the corpus, and scores what our own
    cosine ranking gives."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    titles = [f"{c} {k}" for c in ("red", "navy", "green", "pink") for k in ("mug", "sock", "pillow")]
    corpus = [{"title": t, "image": _img(i)} for i, t in enumerate(titles)]
    q = encoder.encode(titles, convert_to_tensor=True)
    c = encoder.encode(corpus, convert_to_tensor=True)
    hits = st.util.semantic_search(q, c, top_k=3)
    scores = q.numpy() @ c.numpy().T
    assert [h[0]["corpus_id"] for h in hits] == scores.argmax(axis=1).tolist()
    assert hits[0][0]["score"] == pytest.approx(scores[0].max(), abs=1e-5)

    ids = [f"p{i}" for i in range(len(titles))]
    evaluator = InformationRetrievalEvaluator(dict(zip(ids, titles)), dict(zip(ids, corpus)),
                                              {i: {i} for i in ids}, name="toy", write_csv=False, batch_size=5)
    adapter = encoder.as_sentence_transformer()
    metrics = evaluator(adapter, output_path=str(tmp_path))
    top1 = float(np.mean(scores.argmax(axis=1) == np.arange(len(titles))))
    assert metrics["toy_cosine_accuracy@1"] == pytest.approx(top1)
    assert adapter.model_card_data.eval_results[-1]["metrics"] == metrics
    assert adapter.similarity(q[:2], c).shape == (2, len(titles))
    with pytest.raises(ValueError, match="prompts"):
        adapter.encode_query(titles, prompt="query: ")


def test_dual_encoder_encode_embeds_joint():
    """The dual encoder's inherited encode takes the same inputs and gives its joint embedding."""
    from item_embed.evaluate.dual import DualEncoder
    from item_embed.model.dual import DualModel

    torch.manual_seed(0)
    enc = DualEncoder(DualModel(model_config_for("tiny")), load_tokenizer(), device="cpu", precision="fp32")
    recs = [{"title": "red mug", "image": _img(0)}, {"title": "navy sock"}, {"image": _img(1)}]
    emb = enc.encode(recs)
    assert emb.shape == (3, enc.dim)
    np.testing.assert_allclose(emb, enc.embed([enc.to_product(r, i) for i, r in enumerate(recs)], "joint"), atol=1e-6)
    np.testing.assert_allclose(enc.encode("navy sock"), emb[1], atol=1e-6)
