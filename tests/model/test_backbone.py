"""Pretrained vision backbones as ITEm's image stem: the real loading path, on small random models of each
family saved with ``save_pretrained`` (there is no hub here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from item_embed.cli import main
from item_embed.config import model_config_for
from item_embed.model.backbone import describe_backbone
from item_embed.model.encoder import ItemModel, build_model

FAMILIES = {
    "vit": ("ViTConfig", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64), 16),
    "dinov2": ("Dinov2Config", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, mlp_ratio=2), 16),
    "clip-vision": ("CLIPVisionConfig", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64), 16),
    "siglip-vision": ("SiglipVisionConfig", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64), 16),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]), 1),
    "resnet": ("ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]), 1),
}


def _save(family: str, folder) -> str:
    import transformers

    config_class, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(1)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    return str(folder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_becomes_image_tokens_loads_its_weights_and_round_trips(family, tmp_path):
    from item_embed.checkpoint import save_model
    from item_embed.data.arrays import load_tokenizer
    from item_embed.encode import ItemEncoder

    folder = _save(family, tmp_path / family)
    settings = describe_backbone(folder, 32)
    assert settings["patch_size"] * int(FAMILIES[family][2] ** 0.5) == 32 and settings["image_std"] == [0.25] * 3
    cfg = model_config_for("tiny", **settings)
    model = build_model(cfg)
    assert model.cfg.num_patches == FAMILIES[family][2]
    # The backbone's pretrained weights were loaded, not left random.
    pretrained = {k: v for k, v in load_file(f"{folder}/model.safetensors").items()}
    mine = {k.split("backbone_stem.backbone.", 1)[1]: v for k, v in model.state_dict().items()
            if "backbone_stem.backbone." in k}
    shared = [k for k in pretrained if k.split("vision_model.", 1)[-1] in mine or k in mine]
    assert shared, "no backbone weight found in the model"
    for k in shared:
        assert torch.equal(pretrained[k], mine.get(k, mine.get(k.split("vision_model.", 1)[-1])))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert model.project_patches(images, None).shape == (2, cfg.num_patches, cfg.hidden_size)
    # Saved with ITEm's config alone (the backbone's own folder not needed) and rebuilt identically.
    save_model(tmp_path / "run", model.eval(), load_tokenizer())
    again = ItemEncoder.from_pretrained(tmp_path / "run", device="cpu", precision="fp32")
    before = ItemEncoder(model, load_tokenizer(), device="cpu", precision="fp32")
    recs = [{"title": "blue mug", "image": np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)}]
    from PIL import Image

    recs = [{"title": r["title"], "image": Image.fromarray(r["image"])} for r in recs]
    assert np.abs(again.encode(recs) - before.encode(recs)).max() < 1e-6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["image_backbone"] == folder


def test_a_masked_patch_reaches_no_backbone_token():
    """MIM cannot be solved by peeking: a masked patch's pixels are blanked before the backbone."""
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    settings = {"image_backbone": "x", "backbone_config": config.to_dict(), "image_mean": [0.5] * 3,
                "image_std": [0.25] * 3, "patch_size": 32}
    model = ItemModel(model_config_for("tiny", image_size=64, **settings)).eval()
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    changed = images.clone()
    changed[:, :32, :32] = 255 - changed[:, :32, :32]  # patch 0 of the 2x2 grid
    masked = torch.zeros(1, 4, dtype=torch.bool)
    masked[0, 0] = True
    with torch.no_grad():
        a, b = model.project_patches(images, masked), model.project_patches(changed, masked)
    assert torch.equal(a, b)


def test_train_cli_takes_a_backbone_and_learns_with_it(tiny_catalog, tmp_path):
    folder = _save("vit", tmp_path / "vit")
    run = tmp_path / "run"
    assert main(["train", str(tiny_catalog), "--out", str(run), "--preset", "tiny", "--image-backbone", folder,
                 "--image-size", "32", "--steps", "2", "--batch-size", "8", "--no-progress",
                 "--precision", "fp32"]) == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["image_backbone"] == folder and config["patch_size"] == 8
    weights = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("backbone_stem.backbone.") for k in weights)
    assert main(["train", str(tiny_catalog), "--out", str(tmp_path / "x"), "--preset", "tiny", "--image-backbone",
                 str(tmp_path / "nowhere"), "--steps", "1", "--no-progress"]) == 2
