"""Run folders: a corrupted, incomplete or tampered model folder is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from item_embed.checkpoint import CheckpointError, load_model, save_model, sha256_file
from item_embed.encode import ItemEncoder


def _copy(run, dest, *drop: str):
    """The model folder ``run`` (without its checkpoints) copied to ``dest``, less the files ``drop``."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", *drop))
    return dest


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_corrupted_model_is_refused(tiny_run, tmp_path):
    run = tmp_path / "bad"
    shutil.copytree(tiny_run, run)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(run)


def test_saved_folder_records_its_tokenizer_files(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    files = config["files_sha256"]
    assert "tokenizer.json" in files or "vocab.txt" in files
    assert all(sha256_file(tiny_run / name) == sha for name, sha in files.items())


def test_folder_with_config_and_weights_alone_is_refused_naming_the_tokenizer(tiny_run, tmp_path):
    # What the loader's own message once asked for: config.json + model.safetensors. The tokenizer then
    # loaded with 5 tokens and every word became [UNK], under an unchanged model id.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, bare / name)
    for load in (load_model, ItemEncoder.from_pretrained):
        with pytest.raises(CheckpointError, match=r"tokenizer file \S+ is missing.*copy the whole run folder") as e:
            load(bare)
        assert str(bare) in str(e.value) and "\n" not in str(e.value)
    # A folder saved before the checksums were recorded still needs its tokenizer.
    _edit_config(bare, lambda c: c.pop("files_sha256"))
    with pytest.raises(CheckpointError, match=r"no tokenizer \(tokenizer.json or vocab.txt\).*\[UNK\]"):
        ItemEncoder.from_pretrained(bare)


def test_one_missing_tokenizer_file_is_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run", "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="tokenizer file tokenizer_config.json is missing"):
        ItemEncoder.from_pretrained(run)


def test_altered_tokenizer_file_is_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    name = "tokenizer.json" if (run / "tokenizer.json").is_file() else "vocab.txt"
    text = (run / name).read_text()
    assert '"shoes"' in text or "\nshoes\n" in text
    (run / name).write_text(text.replace('"shoes"', '"shoez"', 1).replace("\nshoes\n", "\nshoez\n", 1))
    with pytest.raises(CheckpointError, match=f"tokenizer file {name} fails its checksum"):
        ItemEncoder.from_pretrained(run)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_model(run)


def test_tokenizer_of_another_size_is_refused_in_a_folder_saved_before_the_checksums(tiny_run, tmp_path):
    from item_embed.data.arrays import load_tokenizer

    run = _copy(tiny_run, tmp_path / "run")
    _edit_config(run, lambda c: c.pop("files_sha256"))
    ItemEncoder.from_pretrained(run, device="cpu")  # complete: loads
    tok = load_tokenizer()
    tok.add_tokens(["zzzqqq"])
    tok.save_pretrained(str(run))
    with pytest.raises(CheckpointError, match="tokenizer has 30523 tokens.*30522"):
        ItemEncoder.from_pretrained(run)


@pytest.mark.parametrize("edit, match", [
    (dict(hidden_size=10**7), r"hidden_size=10000000 is out of range"),
    (dict(num_layers=-1), r"num_layers=-1 is out of range"),
    (dict(num_heads=0), r"num_heads=0 is out of range"),
    (dict(patch_size=0), r"patch_size=0 is out of range"),
    (dict(vocab_size=10**12), r"vocab_size=1000000000000 is out of range"),
    (dict(hidden_size=16_384, intermediate_size=65_536, num_layers=64),  # each within bounds, not together
     r"about [\d,]+ parameters, over the limit"),
    (dict(image_size=4096, patch_size=8), r"patches .* exceed"),
    (dict(hidden_size="64"), r"hidden_size must be an integer"),
    (dict(hidden_size=65), r"hidden_size 65 not divisible by 2 heads"),
    (dict(max_text_len=20), r"does not match its config_hash"),  # in bounds, but not the model that was saved
])
def test_tampered_model_config_is_refused_naming_config_json_before_allocation(tiny_run, tmp_path, monkeypatch,
                                                                                edit, match):
    from item_embed.model.encoder import ItemModel

    def never(*_a, **_k):
        raise AssertionError("a model was built from a config that should have been refused")

    monkeypatch.setattr(ItemModel, "__init__", never)
    run = _copy(tiny_run, tmp_path / "run")
    _edit_config(run, lambda c: c["model"].update(edit))
    with pytest.raises(CheckpointError, match=match) as e:
        ItemEncoder.from_pretrained(run)
    assert str(run / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_unreadable_config_json_is_refused_naming_it(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    (run / "config.json").write_text('{"format": "item-embed/1", "model": {')
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        load_model(run)


def test_dual_folder_needs_its_tokenizer_too(tmp_path):
    from item_embed.config import model_config_for
    from item_embed.data.arrays import load_tokenizer
    from item_embed.evaluate.dual import DualEncoder
    from item_embed.model.dual import DUAL_FORMAT, DualConfig, DualModel

    run = tmp_path / "dual"
    save_model(run, DualModel(model_config_for("tiny")), load_tokenizer(),
               {"format": DUAL_FORMAT, "dual": DualConfig().to_dict()})
    enc = DualEncoder.from_pretrained(run, device="cpu")
    assert enc.model_id.startswith("dual-") and len(enc.model_id.split("-")) == 4  # the tokenizer's digest last
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, bare / name)
    with pytest.raises(CheckpointError, match="tokenizer file .* is missing"):
        DualEncoder.from_pretrained(bare)
    _edit_config(run, lambda c: c["dual"].update(embed_dim=10**9))
    with pytest.raises(CheckpointError, match=r"config.json: bad dual config .*embed_dim"):
        DualEncoder.from_pretrained(run)
