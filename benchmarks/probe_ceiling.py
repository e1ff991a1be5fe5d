"""How far can a model trained *with the labels* go on a catalog's inputs? A ceiling for issue 7's probes.

Issue 7 asks a linear probe on ITEm's label-free embedding for hm-dev product_type >= 0.87 and
fashion-small article_type >= 0.980. This script asks whether the inputs allow it at all: on the
harness's train fold, with its labels, it trains

  text   all-MiniLM-L6-v2 fine-tuned on the text the baselines read (mean-pooled, softmax head),
  photo  a small CNN from scratch on the photo, padded and resized as ITEm reads it,
  both   the two together, their pooled features concatenated into one softmax head,

and prints test-fold accuracy after every epoch (the harness's split: the same test products as
every probe in RESULTS.md). A label-free embedding read by a linear probe seldom beats a model
trained end to end on the same inputs, data and labels; where "both" stays under a target, the
embedding's probe is not expected to reach it either (at these inputs and this image size). The
headline is the last epoch (epochs fixed beforehand); the best epoch is printed too, marked as
chosen on the test fold.

    python benchmarks/probe_ceiling.py CATALOG LABEL [--group COL] [--models text,photo,both]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from item_embed.config import TrainConfig
from item_embed.data.arrays import minilm_path
from item_embed.data.catalog import Catalog
from item_embed.data.images import pad_resize
from item_embed.evaluate.featurizers import RawProducts
from item_embed.evaluate.harness import split_keys
from item_embed.evaluate.metrics import split_test_mask
from item_embed.train.engine import lr_at


class SmallCNN(nn.Module):
    """Four stages of two 3x3 convolutions (the first of each with stride 2), BatchNorm, ReLU, mean pool."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers, c_in = [], 3
        for i in range(4):
            c = width * 2 ** i
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.dim = c_in

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 (b, h, w, 3) -> (b, dim)
        x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return self.body(x).mean((2, 3))


class TextEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(str(minilm_path()))
        self.dim = self.bert.config.hidden_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling, as sentence-transformers


class Classifier(nn.Module):
    def __init__(self, parts: str, n_classes: int) -> None:
        super().__init__()
        self.text = TextEncoder() if parts in ("text", "both") else None
        self.photo = SmallCNN() if parts in ("photo", "both") else None
        dim = (self.text.dim if self.text else 0) + (self.photo.dim if self.photo else 0)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, n_classes))

    def forward(self, ids, mask, images) -> torch.Tensor:
        feats = []
        if self.text is not None:
            feats.append(self.text(ids, mask))
        if self.photo is not None:
            feats.append(self.photo(images))
        return self.head(torch.cat(feats, 1).float())


def _batches(rows: np.ndarray, size: int, rng: np.random.Generator | None):
    order = rng.permutation(rows) if rng is not None else rows
    for start in range(0, len(order), size):
        yield order[start:start + size]


def train_and_test(parts: str, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, y: np.ndarray,
                   train: np.ndarray, test: np.ndarray, n_classes: int, epochs: int, batch: int,
                   seed: int) -> list[float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Classifier(parts, n_classes)
    # The pretrained text side at a fine-tuning lr, everything from scratch at 1e-3.
    groups = [{"params": model.head.parameters(), "lr": 1e-3}]
    if model.text is not None:
        groups.append({"params": model.text.parameters(), "lr": 5e-5})
    if model.photo is not None:
        groups.append({"params": model.photo.parameters(), "lr": 1e-3})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    total = epochs * math.ceil(len(train) / batch)
    base = [g["lr"] for g in opt.param_groups]
    schedule = TrainConfig(lr=1.0, warmup_ratio=0.05)  # item-embed's warm-up + cosine, as a factor
    yt = torch.as_tensor(y)
    step, accs = 0, []
    for epoch in range(epochs):
        model.train()
        t0, seen_loss = time.perf_counter(), []
        for rows in _batches(train, batch, rng):
            scale = lr_at(step, total, schedule)
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * scale
            r = torch.as_tensor(rows)
            im = images[r]
            flip = torch.as_tensor(rng.random(len(rows)) < 0.5)
            im = torch.where(flip[:, None, None, None], im.flip(2), im)  # horizontal flip
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids[r], mask[r], im)
            loss = F.cross_entropy(logits.float(), yt[r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen_loss.append(loss.item())
            step += 1
        accs.append(evaluate(model, ids, mask, images, y, test, batch))
        print(f"  {parts:5s} epoch {epoch + 1}/{epochs}: train loss {np.mean(seen_loss):.3f}  "
              f"test accuracy {accs[-1]:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return accs


@torch.inference_mode()
def evaluate(model: Classifier, ids, mask, images, y: np.ndarray, test: np.ndarray, batch: int) -> float:
    model.eval()
    preds = []
    for rows in _batches(test, batch * 2, None):
        r = torch.as_tensor(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            preds.append(model(ids[r], mask[r], images[r]).argmax(1))
    return float((torch.cat(preds).numpy() == y[test]).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("catalog")
    ap.add_argument("label")
    ap.add_argument("--group", help="group column of the split (hm-dev: group); default: split by id")
    ap.add_argument("--models", default="text,photo,both")
    ap.add_argument("--image-size", type=int, default=96, help="as ITEm's recipe reads the photo")
    ap.add_argument("--max-text-len", type=int, default=64)
    ap.add_argument("--epochs", default="text=3,photo=8,both=4", help="epochs per model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    products = RawProducts.from_catalog(Catalog.open(a.catalog))
    test_mask = split_test_mask(split_keys(products, a.group))
    labels = products.frame[a.label]
    known = labels.notna().to_numpy()
    train, test = np.flatnonzero(~test_mask & known), np.flatnonzero(test_mask & known)
    # Classes are the train fold's: a test label never seen in training counts as an error, as in
    # the harness's probe (LogisticRegression cannot predict it either).
    classes = {c: i for i, c in enumerate(sorted(labels[train].astype(str).unique()))}
    y = np.array([classes.get(str(v), -1) for v in labels], dtype=np.int64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    enc = tok(products.texts("joint", products.has_description), padding="max_length", truncation=True,
              max_length=a.max_text_len, return_tensors="pt")
    size = a.image_size
    blank = np.full((size, size, 3), 255, np.uint8)
    images = torch.from_numpy(np.stack(products.map_images(lambda im: blank if im is None else pad_resize(im, size))))
    # Trim the text to the longest real sequence (padding to 64 would only cost time).
    longest = int(enc["attention_mask"].sum(1).max())
    ids, mask = enc["input_ids"][:, :longest].contiguous(), enc["attention_mask"][:, :longest].contiguous()
    print(f"{len(products)} products ({len(train)} train, {len(test)} test, {len(classes)} classes) "
          f"read in {time.perf_counter() - t0:.0f} s; text up to {longest} tokens, photos {size} px", flush=True)
    epochs = {k: int(v) for k, v in (p.split("=") for p in a.epochs.split(","))}
    results = {}
    for parts in a.models.split(","):
        t1 = time.perf_counter()
        accs = train_and_test(parts, ids, mask, images, y, train, test, len(classes), epochs[parts],
                              a.batch_size, a.seed)
        results[parts] = (accs, time.perf_counter() - t1)
    print(f"\n{a.label} on {a.catalog}, test fold {len(test)} products, trained with the labels:")
    for parts, (accs, secs) in results.items():
        print(f"  {parts:5s} last epoch {accs[-1]:.4f}   best epoch {max(accs):.4f} (chosen on the test fold)"
              f"   {len(accs)} epochs, {secs:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
