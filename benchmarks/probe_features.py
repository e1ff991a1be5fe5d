"""What carries a catalog's categories? Linear probes on pooled features of one trained ITEm run.

Runs the model once over a catalog (joint inputs, bf16) and keeps several readings of the same
forward pass: the product embedding, the final ``[CLS]``, the mean of the text positions, the mean of
the patch positions, the shape slice; plus the MiniLM (text) and HOG (photo) baselines. Then the
harness's linear probe (``evaluate.linear_probe``: standardise, LogisticRegression C=1, same split)
on each feature and on concatenations, and the label pairs the product embedding confuses most.
Issue 7's probe targets (hm-dev product_type >= 0.87, fashion-small article_type >= 0.980) are
read here for "is the information there at all?", not to pick a new embedding.

    python benchmarks/probe_features.py RUN CATALOG LABEL [--group COL] [--features a+b,c ...]
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from item_embed.baselines import make_baselines
from item_embed.catalog import Catalog
from item_embed.data import make_batch
from item_embed.encode import ItemEncoder
from item_embed.evaluate import RawProducts, linear_probe, split_keys, split_test_mask

DEFAULT_SETS = ("emb", "cls", "cls+shape", "cls+text_mean", "cls+img_mean", "cls+text_mean+img_mean",
                "text_mean", "minilm", "minilm+shape", "minilm+cls", "minilm+hog", "cls+hog")


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


@torch.inference_mode()
def model_features(enc: ItemEncoder, products: RawProducts, batch_size: int = 64) -> dict[str, np.ndarray]:
    m, records = enc.runner, products.records("joint")
    feats: dict[str, list] = collections.defaultdict(list)
    for start in range(0, len(records), batch_size):
        part = [enc.to_product(r, start + i, products.image_root) for i, r in enumerate(records[start:start + batch_size])]
        b = make_batch(part, enc.tokenizer, enc.cfg.max_text_len, enc.cfg.image_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(b.input_ids, b.text_mask, b.images, b.has_image)
            feats["emb"].append(m.product_embedding(out, b.images, b.has_text, b.has_image))
        h, t = out.hidden.float(), out.text_len
        feats["cls"].append(h[:, 0])
        feats["text_mean"].append(_masked_mean(h[:, :t], out.attention_mask[:, :t]))
        feats["img_mean"].append(_masked_mean(h[:, t:], out.attention_mask[:, t:]))
        if m.shape is not None and b.images is not None:
            feats["shape"].append(m.shape(b.images, b.has_image))
    return {k: torch.cat(v).float().numpy() for k, v in feats.items()}


def confusions(x: np.ndarray, labels: np.ndarray, test: np.ndarray, top: int = 10) -> list[tuple[int, str, str]]:
    """The label pairs a linear probe (the harness's) mixes up most on the test fold, either way round."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    keep = np.array([v is not None and v == v for v in labels])
    train, tst = ~test & keep, test & keep
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x[train]), labels[train].astype(str))
    pred = clf.predict(scaler.transform(x[tst]))
    pairs = collections.Counter(tuple(sorted((a, b))) for a, b in zip(labels[tst].astype(str), pred) if a != b)
    return [(n, a, b) for (a, b), n in pairs.most_common(top)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("catalog")
    ap.add_argument("label")
    ap.add_argument("--group", help="group column of the split (hm-dev: group); default: split by id")
    ap.add_argument("--features", default=",".join(DEFAULT_SETS),
                    help="comma-separated feature sets, '+' joins features (default: %(default)s)")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    products = RawProducts.from_catalog(Catalog.open(a.catalog))
    enc = ItemEncoder.from_pretrained(a.run, device="cpu", precision="bf16")
    feats = model_features(enc, products)
    wanted = {f for s in a.features.split(",") for f in s.split("+")}
    for name in ("minilm", "hog"):
        if name in wanted:
            base = make_baselines([name])[0]
            if hasattr(base, "fit"):
                base.fit(products)
            feats[name] = base.embed(products, "joint")
    print(f"features of {len(products)} products in {time.perf_counter() - t0:.0f} s")
    test = split_test_mask(split_keys(products, a.group))
    labels = products.frame[a.label].to_numpy()
    print(f"\n{a.label}, test fold {int(test.sum())} products; linear probe accuracy:")
    for s in a.features.split(","):
        x = np.concatenate([feats[f] for f in s.split("+")], axis=1)
        print(f"  {s:28s} {x.shape[1]:5d} dims  {linear_probe(x, labels, test)['accuracy']:.4f}", flush=True)
    print("\nmost confused label pairs (product embedding):")
    for n, u, v in confusions(feats["emb"], labels, test):
        print(f"  {n:4d}  {u} <-> {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
