"""Subcommands that make models: ``train`` (ITEm), ``prepare`` (the preprocessing cache),
``train-dual`` (the CLIP-style peer at the same budget) and ``fit-shape`` (a model's shape slice)."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import (IMAGE_STEMS, PRESETS, RECIPE_IMAGE_STEM, RECIPE_SHAPE_DIMS, ObjectiveConfig, TrainConfig,
                      parse_loss_weights, warm_start_config)
from ..runtime import is_main_process
from .common import (add_catalog_args, add_command, add_device_arg, add_precision_arg, catalog_label,
                     finish_report, load_training_data, model_config, open_catalog)


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=a.steps, epochs=a.epochs, max_seconds=a.max_seconds, batch_size=a.batch_size, lr=a.lr,
                       seed=a.seed, precision=a.precision, save_every=a.save_every, warmup_ratio=a.warmup_ratio,
                       grad_accum=getattr(a, "grad_accum", 1), new_lr_scale=a.new_lr_scale)


def _print_result(result, out: Path, what: str, report) -> None:
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.samples_per_second:.1f} samples/s); "
          "last: " + ", ".join(f"{k}={v:.4f}" for k, v in result.last.items()))
    print(f"{what}: {out}")
    if report is not None:
        finish_report(report, out, "catalog_report.json")


def _data_record(a: argparse.Namespace, data) -> dict:
    """What config.json records of the training data beside its location: the catalog file's sha256
    (a local file; not for URIs or caches) and a hash of the used rows' ids (any source)."""
    from ..checkpoint import sha256_file
    from ..data.remote import is_uri
    from ..train.engine import fingerprint

    record = {"catalog": catalog_label(a.catalog), "data_id": fingerprint(list(data.ids))}
    if not is_uri(a.catalog) and Path(a.catalog).is_file():
        record["catalog_sha256"] = sha256_file(Path(a.catalog))
    return record


def _write_card(out: Path) -> None:
    """The run's model card (README.md); a failure to write it does not fail the training."""
    from ..model_card import write_model_card

    try:
        print(f"model card: {write_model_card(out)}")
    except Exception as e:  # noqa: BLE001 - the card is a by-product
        print(f"warning: no model card written ({type(e).__name__}: {e})")


def cmd_train(a: argparse.Namespace) -> int:
    from ..data.arrays import load_tokenizer
    from ..train.pretrain import train

    weights = parse_loss_weights(a.loss_weights) if a.loss_weights else {}
    warm = None
    if a.warm_start_epochs > 0:
        warm = warm_start_config(a.warm_start_epochs, a.warm_start_batch_size, a.warm_start_lr, a.seed, a.precision,
                                 a.save_every)
    objectives = ObjectiveConfig(**weights, mlm_prob=a.mlm_prob, mim_ratio=a.mim_ratio,
                                 itm_negative_ratio=a.itm_negatives, itm_hard=a.itm_hard)
    tokenizer = load_tokenizer()
    data, cfg, report = load_training_data(a, tokenizer)
    result = train(data, tokenizer, a.out, cfg, _train_config(a), objectives, warm=warm, heldout=a.heldout,
                   resume=a.resume, progress=not a.no_progress, device=a.device, extra=_data_record(a, data))
    if is_main_process():
        _print_result(result, Path(a.out), "model", report)
        _write_card(Path(a.out))
    return 0


def cmd_train_dual(a: argparse.Namespace) -> int:
    from ..data.arrays import load_tokenizer
    from ..model.dual import DualConfig
    from ..train.dual import train_dual

    tokenizer = load_tokenizer()
    data, cfg, report = load_training_data(a, tokenizer)
    result = train_dual(data, tokenizer, a.out, cfg, _train_config(a), DualConfig(embed_dim=a.embed_dim),
                        resume=a.resume, progress=not a.no_progress, device=a.device, extra=_data_record(a, data))
    _print_result(result, Path(a.out), "dual encoder", report)
    _write_card(Path(a.out))
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from ..data.arrays import load_tokenizer
    from ..data.cache import write_cache
    from ..data.catalog import CatalogReport

    cfg = model_config(a)
    report = CatalogReport()
    t0 = time.perf_counter()
    chunks = open_catalog(a).iter_chunks(cfg.image_size, use_description=cfg.use_description, strict=a.strict,
                                         report=report)
    n = write_cache(chunks, a.out, load_tokenizer(), cfg.image_size, cfg.max_text_len,
                    extra={"use_description": cfg.use_description, "catalog": catalog_label(a.catalog)})
    print(f"cached {n} products at {cfg.image_size}px, {cfg.max_text_len} tokens in "
          f"{time.perf_counter() - t0:.1f}s -> {a.out}")
    finish_report(report, Path(a.out), "catalog_report.json")
    return 0


def _shape_photo_batches(a: argparse.Namespace, size: int, report):
    """Photos of ``a.catalog`` in batches for ``ShapeSlice.fit_batches``: every k-th photo, so at most
    ``FIT_MAX_PHOTOS`` evenly spread ones, one batch in memory at a time (every row is still read and
    checked, so the report accounts for all of them)."""
    from ..model.shape import FIT_BATCH, FIT_MAX_PHOTOS

    catalog = open_catalog(a)
    step = max(1, math.ceil(len(catalog) / FIT_MAX_PHOTOS))
    pending, seen = [], 0
    for chunk in catalog.iter_chunks(size, strict=a.strict, report=report):
        for p in chunk:
            if p.image is None:
                continue
            if seen % step == 0:
                pending.append(p.image)
            seen += 1
            if len(pending) == FIT_BATCH:
                yield np.stack(pending)
                pending = []
    if pending:
        yield np.stack(pending)


def cmd_fit_shape(a: argparse.Namespace) -> int:
    """Fit a (new) shape slice for a trained model, leaving its transformer weights as they are."""
    from ..checkpoint import load_model, save_model
    from ..data.arrays import load_tokenizer
    from ..data.cache import is_cache, load_cache
    from ..data.catalog import CatalogReport
    from ..model.encoder import ItemModel

    src, out = Path(a.model), Path(a.out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must be a new folder: the model with a slice has another id than the one without")
    if (out / "model.safetensors").exists():
        raise ValueError(f"{out} already holds a model; choose a new folder")
    old, config = load_model(src)
    cfg = replace(old.cfg, shape_dims=a.shape_dims or old.cfg.shape_dims or RECIPE_SHAPE_DIMS,
                  shape_weight=a.shape_weight if a.shape_weight is not None else old.cfg.shape_weight)
    model = ItemModel(cfg)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in old.state_dict().items() if not k.startswith("shape.")}, strict=False)
    if unexpected or any(not k.startswith("shape.") for k in missing):
        raise RuntimeError(f"{src}: weights do not fit (missing {missing}, unexpected {unexpected})")
    t0, report = time.perf_counter(), None
    try:
        if is_cache(a.catalog):
            data, meta = load_cache(a.catalog)
            if meta["image_size"] != cfg.image_size:
                raise ValueError(f"the cache was prepared at {meta['image_size']} px, the model reads "
                                 f"{cfg.image_size} px")
            photos = model.shape.fit(data.images, np.flatnonzero(data.has_image))
        else:
            report = CatalogReport()
            photos = model.shape.fit_batches(_shape_photo_batches(a, cfg.image_size, report))
    except ValueError as e:  # too few photos (a bad row under --strict raises CatalogError, naming it)
        raise ValueError(f"{a.catalog}: {e}") from None
    if not photos:
        raise ValueError(f"{a.catalog}: every photo has the same shape descriptor; nothing to fit")
    kept = {k: v for k, v in config.items() if k not in ("format", "model", "config_hash", "weights_sha256")}
    save_model(out, model.eval(), load_tokenizer(src),
               {**kept, "shape_slice": {"from_model": str(src), "catalog": catalog_label(a.catalog), "photos": photos}})
    print(f"shape slice of {cfg.shape_dims} dims (weight {cfg.shape_weight:g}) fitted on {photos} photos in "
          f"{time.perf_counter() - t0:.1f}s; embeddings have {cfg.embedding_dim} dims")
    print(f"model: {out}")
    if report is not None:
        finish_report(report, out, "shape_catalog_report.json")
    return 0


def _add_budget_args(t: argparse.ArgumentParser, what: str) -> None:
    t.add_argument("--preset", default="minilm", choices=sorted(PRESETS),
                   help="minilm: text side from all-MiniLM-L6-v2 (shipped offline); tiny: a small random model "
                        "for smoke tests")
    t.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, help=f"passes over the {what} (default 1, unless --max-seconds alone "
                                                 "sets the budget)")
    t.add_argument("--max-seconds", type=float, help="training-time budget; the lr schedule follows the clock "
                                                     "(with --steps or --epochs: whichever ends first)")
    t.add_argument("--batch-size", type=int, default=32, help="products per optimiser step")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine decay)")
    t.add_argument("--image-size", type=int, help="side the photo is padded and resized to (default 96; tiny 32)")
    t.add_argument("--use-description", action="store_true", help="append the description to the title")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order, masks, dropout")
    add_precision_arg(t)
    t.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in --out")
    add_device_arg(t)


def _add_advanced_args(g: argparse._ArgumentGroup, new_lr_default: str) -> None:
    g.add_argument("--patch-size", type=int, help="side of an image patch in pixels (default 16; tiny 8)")
    g.add_argument("--max-text-len", type=int, help="tokens of title (+ description) kept (default 40; tiny 24)")
    g.add_argument("--new-lr-scale", type=float,
                   help=f"lr multiplier for what starts from scratch (the MiniLM encoder keeps --lr; default "
                        f"{new_lr_default})")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="share of the steps spent warming the lr up")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")


def register(sub: argparse._SubParsersAction) -> None:
    t = add_command(sub, "train", "pre-train ITEm on a catalog (or a cache from `item-embed prepare`)")
    add_catalog_args(t, "catalog file (.csv, .tsv, .jsonl, .parquet) or a cache folder from `item-embed prepare`")
    t.add_argument("--out", required=True, help="run folder (model, checkpoints, metrics.jsonl)")
    _add_budget_args(t, "catalog")
    t.add_argument("--image-stem", choices=IMAGE_STEMS, default=RECIPE_IMAGE_STEM,
                   help="how pixels become patch vectors: small convolutions with per-pixel channel norm "
                        "(conv_channelnorm) or ITEm's linear projection of the raw patch (linear)")
    t.add_argument("--image-backbone", metavar="NAME_OR_DIR",
                   help="a pretrained transformers vision model (ViT, DINOv2, CLIP/SigLIP vision, ConvNeXt, ResNet: "
                        "a folder, or a hub name already in the local cache) whose patch or grid features become "
                        "the image tokens, in place of --image-stem: the first choice when you have one")
    t.add_argument("--shape-dims", type=int,
                   help=f"whitened HOG coordinates of the photo appended to [CLS], fitted on the catalog's photos "
                        f"after training: what answers photo-only queries (default {RECIPE_SHAPE_DIMS}; tiny 32; "
                        "0 = none)")
    adv = t.add_argument_group("advanced")
    _add_advanced_args(adv, "10")
    adv.add_argument("--loss-weights", help="objective weights, e.g. itm=1,mlm=1,mim=1,global_mlm=0.25,"
                                            "global_mim=0.25,align=1 (the defaults; align: the whole product and its "
                                            "title alone pulled towards MiniLM's embedding of its text and title; 0 "
                                            "turns one off; unnamed ones keep theirs)")
    adv.add_argument("--mlm-prob", type=float, default=ObjectiveConfig.mlm_prob, help="share of title tokens masked")
    adv.add_argument("--mim-ratio", type=float, default=ObjectiveConfig.mim_ratio, help="share of patches masked")
    adv.add_argument("--itm-negatives", type=float, default=ObjectiveConfig.itm_negative_ratio,
                     help="share of the batch whose photo is swapped for another product's (image-text matching)")
    adv.add_argument("--shape-weight", type=float, default=0.1,
                     help="weight of the shape coordinates beside the unit [CLS] (small: products and title "
                          "queries rank by [CLS]; photo queries rank by shape at any weight)")
    adv.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (less memory)")
    adv.add_argument("--itm-hard", type=float, default=ObjectiveConfig.itm_hard,
                     help="share of ITM's swapped photos taken from hard negatives mined by the warm start (needs "
                          "--warm-start-epochs; 0.5 was measured)")
    adv.add_argument("--heldout", type=int, default=-1,
                     help="products kept out of training, on which image-text matching is measured at every "
                          "checkpoint (heldout_itm_acc in metrics.jsonl; default -1: 2%% of them, at most 1,000; "
                          "0: none)")
    warm = t.add_argument_group("image warm start (the stem alone, before ITEm)")
    measured = warm_start_config()
    warm.add_argument("--warm-start-epochs", type=float, default=0.0,
                      help=f"epochs of the image stem aligned alone with the MiniLM embedding of each photo's text, "
                           f"before ITEm (cached in OUT/warmstart; 0 = none; {measured.epochs:g} was measured: the "
                           f"model's own photo-only [CLS] learns more, the default embedding does not change)")
    warm.add_argument("--warm-start-batch-size", type=int, default=measured.batch_size, help="photos per warm-start step")
    warm.add_argument("--warm-start-lr", type=float, default=measured.lr, help="peak learning rate of the warm start")
    t.set_defaults(func=cmd_train)

    d = add_command(sub, "train-dual", "train the CLIP-style dual encoder (the peer ITEm is measured against)")
    add_catalog_args(d, "catalog file or a cache folder from `item-embed prepare`")
    d.add_argument("--out", required=True, help="run folder (model, checkpoints, metrics.jsonl)")
    _add_budget_args(d, "image+title pairs")
    d.add_argument("--image-stem", choices=IMAGE_STEMS, default="linear", help="the image tower's patch stem")
    d.add_argument("--image-backbone", metavar="NAME_OR_DIR",
                   help="a pretrained transformers vision model as the image tower's stem (as in train)")
    d.add_argument("--embed-dim", type=int, default=256, help="size of the shared embedding space")
    _add_advanced_args(d.add_argument_group("advanced"), "1: at 10 the 6-layer image tower diverged in our runs")
    d.set_defaults(func=cmd_train_dual)

    c = add_command(sub, "prepare", "decode, pad and resize every image once into a training cache")
    add_catalog_args(c)
    c.add_argument("--out", required=True, help="cache folder (give it to `train` in place of the catalog)")
    c.add_argument("--preset", default="minilm", choices=sorted(PRESETS), help="for the default sizes")
    c.add_argument("--image-size", type=int, help="side the photo is padded and resized to (default 96; tiny 32)")
    c.add_argument("--max-text-len", type=int, help="tokens of title (+ description) kept (default 40; tiny 24)")
    c.add_argument("--use-description", action="store_true", help="append the description to the title")
    c.set_defaults(func=cmd_prepare)

    f = add_command(sub, "fit-shape", "fit a model's shape slice (photo queries) on a catalog's photos, without "
                                      "training it again")
    add_catalog_args(f, "catalog file or a cache folder from `item-embed prepare`")
    f.add_argument("--model", required=True, help="trained model folder (left unchanged)")
    f.add_argument("--out", required=True, help="new model folder: the same weights and a fitted slice")
    f.add_argument("--shape-dims", type=int, help=f"slice size (default: the model's own, else {RECIPE_SHAPE_DIMS})")
    f.add_argument("--shape-weight", type=float, help="weight beside [CLS] (default: the model's own)")
    f.set_defaults(func=cmd_fit_shape)
