"""Typed configuration: checks, and checkpoints written before the pruning."""

from __future__ import annotations

import pytest

from item_embed.config import ObjectiveConfig, TrainConfig, parse_loss_weights


def test_checkpoints_from_before_the_pruning_resume_unless_they_used_a_retired_option():
    old_train = {**TrainConfig(steps=3, precision="bf16", new_lr_scale=10.0).to_dict(), "itm_first": 0, "compile": False,
                 "objectives": {"itm": 1.0}}
    del old_train["max_seconds"]
    assert TrainConfig.from_saved(old_train) == TrainConfig(steps=3, precision="bf16", new_lr_scale=10.0)
    with pytest.raises(ValueError, match="--itm-first was retired.*ablations-2026-11"):
        TrainConfig.from_saved({**old_train, "itm_first": 500})
    old_objectives = {**ObjectiveConfig().to_dict(), "mim_target": "pixels", "title_dropout": 0.0,
                      "title_dropout_mim": False, "contrastive": 0.0, "contrastive_views": "image",
                      "contrastive_stop_grad": True, "contrastive_dims": 0, "image_contrastive": 0.0,
                      "image_contrastive_proj": 0}
    del old_objectives["align"], old_objectives["itm_hard"]  # added after the pruning
    assert ObjectiveConfig.from_saved(old_objectives) == ObjectiveConfig(align=0.0)  # as those runs trained
    for key, value in (("mim_target", "hog"), ("title_dropout", 0.2), ("contrastive", 1.0)):
        with pytest.raises(ValueError, match=f"{key}.*retired"):
            ObjectiveConfig.from_saved({**old_objectives, key: value})


def test_loss_weights_parse_and_retired_terms_are_named():
    assert parse_loss_weights("itm=2, global-mim=0") == {"itm": 2.0, "global_mim": 0.0}
    for bad, match in (("contrastive=1", "retired"), ("image_contrastive=1", "retired"), ("itm", "NAME=VALUE"),
                       ("itm=x", "not a number"), ("foo=1", "NAME=VALUE")):
        with pytest.raises(ValueError, match=match):
            parse_loss_weights(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="fp16"), "precision"), (dict(batch_size=1), "batch_size"), (dict(steps=0), "steps"),
    (dict(max_seconds=0), "max_seconds"), (dict(epochs=-1), "epochs"), (dict(grad_accum=0), "grad_accum"),
    (dict(new_lr_scale=-1), "new_lr_scale"), (dict(save_every=0), "save_every"),
])
def test_train_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("edit, match", [
    (dict(hidden_size=10**7), "hidden_size=10000000 is out of range"), (dict(num_layers=-1), "num_layers=-1"),
    (dict(num_heads=0), "num_heads=0"), (dict(patch_size=0), "patch_size=0"), (dict(image_size=-32), "image_size=-32"),
    (dict(max_text_len=0), "max_text_len=0"), (dict(vocab_size=True), "vocab_size must be an integer"),
    (dict(hidden_size=64.0), "hidden_size must be an integer"), (dict(dropout=1.5), "dropout"),
    (dict(layer_norm_eps=0), "layer_norm_eps"), (dict(shape_dims=-1), "shape_dims=-1"),
    (dict(hidden_size=16_384, intermediate_size=65_536, num_layers=64), "parameters, over the limit"),
])
def test_saved_model_config_is_validated_before_anything_is_built_naming_its_file(edit, match):
    from item_embed.config import ModelConfig, ModelConfigError, model_config_for

    saved = {**model_config_for("tiny").to_dict(), **edit}
    with pytest.raises(ModelConfigError, match=f"^run/config.json: .*{match}"):
        ModelConfig.from_dict(saved, source="run/config.json")
    with pytest.raises(ValueError, match=match):  # ModelConfigError is a ValueError; no file named without a source
        ModelConfig.from_dict(saved)


def test_parameter_estimate_is_close_to_the_real_count():
    from item_embed.config import model_config_for
    from item_embed.model.encoder import ItemModel

    cfg = model_config_for("tiny")
    real = sum(t.numel() for t in ItemModel(cfg).state_dict().values())
    assert abs(cfg.estimated_parameters() - real) < 0.01 * real
    assert model_config_for("minilm").estimated_parameters() < 30_000_000  # the recipe is far from the limit
