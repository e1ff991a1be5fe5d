"""ONNX export (``item-embed export-onnx``) and the onnxruntime backend (``from_pretrained(DIR, backend="onnx")``):
the graphs reproduce the torch fp32 embeddings, photo-only and title-only products included, at any batch
size and text length; the folder is refused when a file is missing or altered."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from item_embed.checkpoint import CheckpointError  # noqa: E402
from item_embed.cli import main  # noqa: E402
from item_embed.encode import ItemEncoder  # noqa: E402
from item_embed.onnx_export import (  # noqa: E402
    JOINT_GRAPH,
    ONNX_FORMAT,
    TEXT_GRAPH,
    WEIGHTS_FILE,
    OnnxExportError,
    OnnxItemEncoder,
    probe_batches,
    row_cosines,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def onnx_dir(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported through the CLI (the export checks parity itself before writing)."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    assert main(["export-onnx", str(tiny_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def encoders(onnx_dir, tiny_run) -> tuple[ItemEncoder, ItemEncoder]:
    """(torch fp32, onnxruntime) encoders of the same model."""
    return (ItemEncoder.from_pretrained(tiny_run, device="cpu", precision="fp32"),
            ItemEncoder.from_pretrained(onnx_dir, device="cpu", backend="onnx"))


@pytest.fixture(scope="module")
def catalog_products(tiny_catalog, encoders):
    from item_embed.data.catalog import Catalog

    return Catalog.open(tiny_catalog).load_all(encoders[0].cfg.image_size)


def _assert_parity(want: np.ndarray, got: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == np.float32
    cos = row_cosines(want, got)
    assert cos.min() >= MIN_COSINE, f"rows {np.flatnonzero(cos < MIN_COSINE).tolist()} off: min cosine {cos.min()}"
    return float(cos.min())


def test_cli_export_writes_graphs_tokenizer_config_and_manifest(onnx_dir, tiny_run):
    import onnx

    names = {p.name for p in onnx_dir.iterdir()}
    assert {JOINT_GRAPH, TEXT_GRAPH, WEIGHTS_FILE, "config.json", "manifest.json", "tokenizer.json"} <= names
    config = json.loads((onnx_dir / "config.json").read_text())
    source = json.loads((tiny_run / "config.json").read_text())
    assert config["format"] == ONNX_FORMAT
    # The preprocessing and identity records travel unchanged, so the model id is the source's.
    for key in ("model", "config_hash", "weights_sha256", "files_sha256"):
        assert config[key] == source[key]
    record = config["onnx"]
    assert record["model_id"] == ItemEncoder.from_pretrained(tiny_run).model_id
    assert record["opset"] >= 17 and record["parity"]["min_cosine"] >= MIN_COSINE
    assert len(record["parity"]["batch_sizes"]) >= 2 and len(record["parity"]["text_lengths"]) >= 2
    for name in source["files_sha256"]:  # tokenizer files byte for byte
        assert (onnx_dir / name).read_bytes() == (tiny_run / name).read_bytes()
    manifest = json.loads((onnx_dir / "manifest.json").read_text())["sha256"]
    assert set(manifest) == names - {"manifest.json"}
    for graph, inputs in ((JOINT_GRAPH, ["input_ids", "text_mask", "images", "has_image", "has_text"]),
                          (TEXT_GRAPH, ["input_ids", "text_mask", "has_text"])):
        onnx.checker.check_model(str(onnx_dir / graph))
        proto = onnx.load(str(onnx_dir / graph), load_external_data=False)
        assert [i.name for i in proto.graph.input] == inputs
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # batch, text
        assert all(d[0] == dims["input_ids"][0] for d in dims.values())
        assert any(op.domain in ("", "ai.onnx") and op.version >= 17 for op in proto.opset_import)
    # Both graphs read the one weights file: the text graph adds no copy of the transformer.
    weights = (onnx_dir / WEIGHTS_FILE).stat().st_size
    params = sum(np.prod(v.shape) for v in ItemEncoder.from_pretrained(tiny_run).model.state_dict().values())
    assert weights < 1.1 * 4 * params


def test_parity_on_the_tiny_catalog_whole_photo_only_title_only_and_mixed(encoders, catalog_products):
    from item_embed.data.catalog import Product

    torch_enc, onnx_enc = encoders
    products = [p for p in catalog_products if p.image is not None and p.text is not None]
    assert len(products) >= 40
    photo_only = [Product(p.row, p.id, None, p.image) for p in products]
    title_only = [Product(p.row, p.id, p.text, None, p.title) for p in products]
    mixed = [[p, q, r][i % 3] for i, (p, q, r) in enumerate(zip(products, photo_only, title_only))]
    worst = 1.0
    for name, group in (("whole", products), ("photo-only", photo_only), ("title-only", title_only),
                        ("mixed", mixed)):
        want = torch_enc.encode_batched(group, batch_size=16)
        got = onnx_enc.encode_batched(group, batch_size=16)
        worst = min(worst, _assert_parity(want, got))
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5), name
    # The shape slice is in the graph: a photo-only row is not its [CLS] (dropped once fitted).
    d = torch_enc.cfg.hidden_size
    got = onnx_enc.encode_batched(photo_only[:4])
    assert np.abs(got[:, :d]).max() < 1e-6 and np.abs(got[:, d:]).max() > 0.01
    print(f"tiny catalog: min cosine {worst:.7f}")


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("title", ["tee", "slim fit stretch denim jeans with five pockets " * 6])
def test_dynamic_batch_and_text_length(encoders, catalog_products, batch_size, title):
    from item_embed.data.arrays import make_batch
    from item_embed.data.catalog import Product

    torch_enc, onnx_enc = encoders
    rows = [Product(i, str(i), f"{title} {i}" if i % 3 != 1 else None,
                    catalog_products[i].image if i % 3 != 2 else None) for i in range(batch_size)]
    length = make_batch(rows, torch_enc.tokenizer, torch_enc.cfg.max_text_len, 32).input_ids.shape[1]
    assert length == torch_enc.cfg.max_text_len if len(title) > 100 else length < 8
    got, want = onnx_enc.encode_products(rows), torch_enc.encode_products(rows)
    assert got.shape == (batch_size, torch_enc.dim)
    _assert_parity(want, got)
    # One batch of titles only runs the text graph, at this batch size and length too.
    text_rows = [Product(i, str(i), f"{title} {i}", None) for i in range(batch_size)]
    _assert_parity(torch_enc.encode_products(text_rows), onnx_enc.encode_products(text_rows))


def test_from_pretrained_onnx_keeps_the_encoder_interface(encoders, onnx_dir, tiny_run, tiny_catalog):
    import torch

    torch_enc, onnx_enc = encoders
    assert isinstance(onnx_enc, OnnxItemEncoder) and isinstance(onnx_enc, ItemEncoder)
    assert onnx_enc.model_id == torch_enc.model_id and onnx_enc.dim == torch_enc.dim
    assert onnx_enc.precision == "fp32" and onnx_enc.device == torch.device("cpu")
    image = next(p for p in (tiny_catalog.parent / "images").iterdir())
    records = ["red shirt", image, {"title": "blue jeans", "image": str(image)}]
    got, want = onnx_enc.encode(records), torch_enc.encode(records)
    assert got.shape == (3, torch_enc.dim)
    _assert_parity(want, got)
    assert onnx_enc.encode("red shirt").shape == (torch_enc.dim,)
    assert onnx_enc.encode([]).shape == (0, torch_enc.dim)
    assert isinstance(onnx_enc.encode(records, convert_to_tensor=True), torch.Tensor)
    assert np.array_equal(onnx_enc.encode(records, precision="ubinary"), torch_enc.encode(records, precision="ubinary"))
    with pytest.raises(ValueError, match="fp32"):
        ItemEncoder.from_pretrained(onnx_dir, backend="onnx", precision="bf16")
    with pytest.raises(ValueError, match="shape slice"):
        ItemEncoder.from_pretrained(onnx_dir, backend="onnx", shape_slice=False)
    with pytest.raises(ValueError, match="backend"):
        ItemEncoder.from_pretrained(onnx_dir, backend="tensorflow")
    with pytest.raises(CheckpointError, match="backend='onnx'"):
        ItemEncoder.from_pretrained(onnx_dir)  # the torch loader names the way to load it
    with pytest.raises(CheckpointError, match="torch model folder"):
        ItemEncoder.from_pretrained(tiny_run, backend="onnx")


@pytest.mark.parametrize("damage", ["missing model.onnx", "tampered model.onnx", "tampered weights",
                                    "missing weights", "tampered tokenizer", "edited config", "no manifest"])
def test_a_missing_or_tampered_file_is_refused(onnx_dir, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(onnx_dir, folder)
    ItemEncoder.from_pretrained(folder, backend="onnx")  # the intact copy loads
    what, name = damage.split(" ", 1)
    name = {"weights": WEIGHTS_FILE, "tokenizer": "tokenizer.json", "config": "config.json",
            "manifest": "manifest.json"}.get(name, name)
    path = folder / name
    if what in ("missing", "no"):
        path.unlink()
    elif name == "config.json":
        config = json.loads(path.read_text())
        config["model"]["shape_weight"] = 0.5
        path.write_text(json.dumps(config))
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        ItemEncoder.from_pretrained(folder, backend="onnx")
    assert ("missing" if what == "missing" else "manifest" if what == "no" else "checksum") in str(e.value)


def test_the_parity_check_fails_a_graph_that_does_not_match(onnx_dir, tiny_run):
    """What the export does before writing: a graph whose numbers differ from torch fp32 is an error."""
    import torch

    from item_embed.onnx_export import _check_parity

    reference = ItemEncoder.from_pretrained(tiny_run, device="cpu", precision="fp32")
    batches = probe_batches(reference.cfg, reference.tokenizer)
    assert _check_parity(onnx_dir, reference, batches, MIN_COSINE)["min_cosine"] >= MIN_COSINE
    with torch.no_grad():
        reference.model.shape.proj.neg_()  # the photo's shape part, in torch only
    with pytest.raises(OnnxExportError, match="does not reproduce torch fp32"):
        _check_parity(onnx_dir, reference, batches, MIN_COSINE)


def test_without_the_extra_the_message_names_it(monkeypatch, tiny_run, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"item-embed\[onnx\]"):
        ItemEncoder.from_pretrained(tiny_run, backend="onnx")
    assert main(["export-onnx", str(tiny_run), "--out", str(tmp_path / "x")]) == 2
    assert "item-embed[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_dual_encoder_folder_is_refused(tmp_path, tiny_run):
    folder = tmp_path / "dual"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("checkpoints", "warmstart"))
    config = json.loads((folder / "config.json").read_text())
    config["format"] = "item-embed-dual/1"
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["export-onnx", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 200 real products


def _real_model(tiny_run) -> Path:
    """ITEM_EMBED_ONNX_MODEL (a trained run folder) when set, else the tiny run (real photos and titles
    through a small model)."""
    return Path(os.environ.get("ITEM_EMBED_ONNX_MODEL") or tiny_run)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "hm-dev.parquet").is_file(), reason="../shared/data/hm-dev.parquet absent")
def test_parity_on_200_real_products(tiny_run, tmp_path):
    """200 hm-dev products, each whole, photo-only and title-only: cosine >= 0.9999 vs torch fp32."""
    from item_embed.data.catalog import Catalog, Product
    from item_embed.onnx_export import export_onnx

    run = _real_model(tiny_run)
    export_onnx(run, tmp_path / "onnx", log=lambda s: None)
    torch_enc = ItemEncoder.from_pretrained(run, device="cpu", precision="fp32")
    onnx_enc = ItemEncoder.from_pretrained(tmp_path / "onnx", device="cpu", backend="onnx")
    assert onnx_enc.model_id == torch_enc.model_id
    catalog = Catalog.open(SHARED_DATA / "hm-dev.parquet")
    products = []
    for chunk in catalog.iter_chunks(torch_enc.cfg.image_size, use_description=torch_enc.cfg.use_description):
        products += [p for p in chunk if p.image is not None and p.text is not None]
        if len(products) >= 200:
            break
    products = products[:200]
    assert len(products) == 200
    groups = {"whole": products,
              "photo-only": [Product(p.row, p.id, None, p.image) for p in products],
              "title-only": [Product(p.row, p.id, p.title or p.text, None, p.title) for p in products]}
    report = {}
    for name, group in groups.items():
        want, got = torch_enc.encode_batched(group), onnx_enc.encode_batched(group)
        report[name] = _assert_parity(want, got)
    print(f"200 hm-dev products, {run}: min cosine " + ", ".join(f"{k} {v:.7f}" for k, v in report.items()))


# ------------------------------------------------------------------ pretrained vision backbones (--image-backbone)

BACKBONES = {  # small random models of two families (tests/model/test_backbone.py has all six)
    "vit": ("ViTConfig", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64)),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_a_model_with_a_pretrained_backbone_exports(family, tmp_path):
    """A transformers vision tower as the image stem is in the graph too (all six families of
    test_backbone.py export with parity; two are checked here)."""
    import torch
    import transformers

    from item_embed.checkpoint import save_model
    from item_embed.config import model_config_for
    from item_embed.data.arrays import load_tokenizer
    from item_embed.model.backbone import describe_backbone
    from item_embed.model.encoder import build_model
    from item_embed.onnx_export import export_onnx

    config_class, kwargs = BACKBONES[family]
    torch.manual_seed(1)
    transformers.AutoModel.from_config(getattr(transformers, config_class)(**kwargs)).save_pretrained(tmp_path / family)
    model = build_model(model_config_for("tiny", **describe_backbone(str(tmp_path / family), 32)))
    save_model(tmp_path / "run", model, load_tokenizer())
    record = export_onnx(tmp_path / "run", tmp_path / "onnx", log=lambda s: None)
    assert record["parity"]["min_cosine"] >= MIN_COSINE
    torch_enc = ItemEncoder.from_pretrained(tmp_path / "run", device="cpu", precision="fp32")
    onnx_enc = ItemEncoder.from_pretrained(tmp_path / "onnx", device="cpu", backend="onnx")
    rng = np.random.default_rng(0)
    from PIL import Image

    photos = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(5)]
    records = [{"title": f"shirt {i}", "image": photos[i]} for i in range(5)] + photos[:2] + ["a title"]
    _assert_parity(torch_enc.encode(records), onnx_enc.encode(records))


def test_export_never_replaces_a_folder_that_is_not_an_export(tiny_run, tmp_path):
    """--out pointed at a folder of other files, or at the folder holding the run, is refused untouched."""
    from item_embed.onnx_export import export_onnx

    other = tmp_path / "models"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not an ONNX export"):
        export_onnx(tiny_run, other, log=lambda s: None)
    assert (other / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="holds it"):
        export_onnx(tiny_run, tiny_run.parent, log=lambda s: None)
    assert (tiny_run / "model.safetensors").is_file()
