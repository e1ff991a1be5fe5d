"""Run directories and checkpoints: safetensors + JSON only, written atomically, checksummed.

A run directory holds the exported model (``model.safetensors``, ``config.json``, tokenizer
files) and ``checkpoints/step-NNNNNNNN/`` training states. Each checkpoint folder is written
under a temporary name, fsynced, then renamed, and carries a manifest of SHA-256 sums checked
on load, so a crash mid-write leaves the previous good checkpoint in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic_files import remove_stale, replace_folder, temp_folder

FORMAT = "item-embed/1"
MANIFEST = "manifest.json"
# A model folder's tokenizer: save_model records the checksum of each file the tokenizer writes
# (``files_sha256`` in config.json); one of VOCAB_FILES must be there, or every word reads as [UNK].
VOCAB_FILES = ("tokenizer.json", "vocab.txt")
WHOLE_FOLDER = ("copy the whole run folder (config.json, model.safetensors and the tokenizer files) "
                "or re-export the model")


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_folder_atomic(final: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Write ``{name}.safetensors`` for each entry of ``tensors`` plus ``state.json`` into ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp = temp_folder(final)
    for name, group in tensors.items():
        save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
        fault_point(f"mid-write:{final.name}")
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    sums = {}
    for p in sorted(tmp.iterdir()):
        _fsync_file(p)
        sums[p.name] = sha256_file(p)
    write_json_atomic(tmp / MANIFEST, {"format": FORMAT, "sha256": sums})
    fsync_path(tmp)
    replace_folder(tmp, final)
    return final


def fault_point(tag: str) -> None:
    """Crash tests: ITEM_EMBED_FAULT=<tag> kills this process here, as a power cut would."""
    if os.environ.get("ITEM_EMBED_FAULT") == tag:
        os.kill(os.getpid(), signal.SIGKILL)


def verify_folder(folder: Path) -> None:
    """Raise CheckpointError unless every file in the manifest exists with its checksum."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete write?)")
    try:
        sums = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: unreadable manifest: {e}") from None
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{folder}: {name} fails its checksum (truncated or corrupted)")


def load_folder(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    verify_folder(folder)
    tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    meta = json.loads((folder / "state.json").read_text())
    return tensors, meta


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def latest_good_checkpoint(run_dir: Path, warn=print) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that verifies; bad ones are reported and skipped."""
    for folder in checkpoint_dirs(run_dir):
        try:
            tensors, meta = load_folder(folder)
            return folder, tensors, meta
        except (CheckpointError, OSError, ValueError) as e:
            warn(f"warning: skipping checkpoint {folder.name}: {e}")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state for safetensors (tensors) and JSON (everything else)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_model(run_dir: Path, model, tokenizer, extra: dict[str, Any] | None = None) -> None:
    """Export the encoder: weights, config (model + preprocessing) and tokenizer into ``run_dir``.

    config.json, written last, records the checksum of the weights (``weights_sha256``) and of every
    tokenizer file (``files_sha256``): the loader refuses a folder where one is missing or altered."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = run_dir / "model.safetensors"
    tmp = run_dir / ".model.safetensors.tmp"
    save_file(_contiguous(model.state_dict()), str(tmp))
    _fsync_file(tmp)
    os.replace(tmp, weights)
    saved = tokenizer.save_pretrained(str(run_dir))
    files = {}
    for name in sorted({Path(f).name for f in saved or ()}):
        if (run_dir / name).is_file():
            _fsync_file(run_dir / name)
            files[name] = sha256_file(run_dir / name)
    if not set(files) & set(VOCAB_FILES):
        raise CheckpointError(f"{run_dir}: the tokenizer wrote none of {', '.join(VOCAB_FILES)} (wrote {sorted(files)})")
    config = {"format": FORMAT, "model": model.cfg.to_dict(), "config_hash": model.cfg.config_hash(),
              "weights_sha256": sha256_file(weights), **(extra or {}), "files_sha256": files}
    write_json_atomic(run_dir / "config.json", config)
    fsync_path(run_dir)


def files_digest(config: dict[str, Any]) -> str:
    """Short digest of the tokenizer files a model folder records ("" for folders saved before the
    record): model ids include it, so the id covers the tokenizer as well as the weights."""
    files = config.get("files_sha256")
    if not files:
        return ""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]


def verify_tokenizer_files(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Refuse a model folder whose tokenizer is missing or altered: every file in ``files_sha256``
    present with its checksum (folders saved before the record: a tokenizer file present at all)."""
    run_dir = Path(run_dir)
    recorded = config.get("files_sha256")
    if recorded is not None:
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            raise CheckpointError(f"{run_dir / 'config.json'}: files_sha256 is not a table of checksums; {WHOLE_FOLDER}")
        for name, expected in sorted(recorded.items()):
            path = run_dir / name
            if Path(name).name != name:
                raise CheckpointError(f"{run_dir / 'config.json'}: files_sha256 names {name!r}, not a file of the "
                                      f"folder; {WHOLE_FOLDER}")
            if not path.is_file():
                raise CheckpointError(f"{run_dir}: tokenizer file {name} is missing; {WHOLE_FOLDER}")
            if sha256_file(path) != expected:
                raise CheckpointError(f"{run_dir}: tokenizer file {name} fails its checksum (edited, corrupted or "
                                      f"from another model); {WHOLE_FOLDER}")
    if not any((run_dir / name).is_file() for name in VOCAB_FILES):
        raise CheckpointError(f"{run_dir}: no tokenizer ({' or '.join(VOCAB_FILES)}): without it every word reads "
                              f"as [UNK]; {WHOLE_FOLDER}")


def load_model_tokenizer(run_dir: str | Path, config: dict[str, Any], vocab_size: int):
    """The tokenizer of a model folder, verified (``verify_tokenizer_files``) and refused unless its
    vocabulary is the size of the model's embedding table (``vocab_size``)."""
    from .data.arrays import load_tokenizer

    verify_tokenizer_files(run_dir, config)
    try:
        tokenizer = load_tokenizer(run_dir)
    except Exception as e:  # a damaged file of a folder saved before the checksums
        raise CheckpointError(f"{run_dir}: the tokenizer does not load ({type(e).__name__}: {e}); "
                              f"{WHOLE_FOLDER}") from None
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"{run_dir}: the tokenizer has {len(tokenizer)} tokens, the model's embedding table "
                              f"{vocab_size} (vocab_size): they do not belong together; {WHOLE_FOLDER}")
    return tokenizer


def read_model_folder(run_dir: str | Path, fmt: str = FORMAT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, weights) of an exported model folder of format ``fmt``; refuses other folders, a
    model config that is out of bounds or does not match its ``config_hash`` (before anything is
    allocated), weights that fail their checksum and a missing or altered tokenizer."""
    from .config import ModelConfig

    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{run_dir} is not an item-embed model folder (needs config.json, model.safetensors "
                              f"and the tokenizer files: {WHOLE_FOLDER})")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e}); {WHOLE_FOLDER}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: not a model config; {WHOLE_FOLDER}")
    if config.get("format") != fmt:
        raise CheckpointError(f"{run_dir} holds format {config.get('format')!r}, not {fmt!r}")
    try:
        cfg = ModelConfig.from_dict(config.get("model"), source=cfg_path)
    except ValueError as e:
        raise CheckpointError(f"{e}; {WHOLE_FOLDER}") from None
    if "config_hash" in config and config["config_hash"] != cfg.config_hash():
        raise CheckpointError(f"{cfg_path}: the model config does not match its config_hash {config['config_hash']!r} "
                              f"(edited?); {WHOLE_FOLDER}")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise CheckpointError(f"{weights} fails its checksum (truncated, corrupted or replaced)")
    verify_tokenizer_files(run_dir, config)
    return config, load_file(str(weights))


def load_model(run_dir: str | Path):
    """Load an exported ITEm encoder and its config; refuses what ``read_model_folder`` refuses (a bad
    config before the model is built)."""
    from .config import ModelConfig
    from .model.encoder import ItemModel

    config, weights = read_model_folder(run_dir)
    model = ItemModel(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(weights)
    model.eval()
    return model, config
