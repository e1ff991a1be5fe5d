"""Category prediction from product embeddings.

Two ways to get a :class:`Classifier`:

- :func:`fit_linear`: logistic regression on frozen embeddings of a trained encoder (fast; the
  classifier is tied to that encoder's ``model_id``);
- :func:`fit_finetune`: the whole ITEm model trained with a linear head on the pooled ``[CLS]``
  embedding (the paper's leaf-category setting); the classifier carries its own encoder.

Either way the head is one linear map applied to the L2-normalised product embedding,
``softmax(x @ W.T + b)``, so serving needs numpy only. A classifier is a folder of safetensors
and JSON (no pickle): ``head.safetensors``, ``classifier.json`` (labels, model identity, metrics,
options, SHA-256 of every file) and, when fine-tuned, the encoder as written by
``checkpoint.save_model`` (so ``ItemEncoder.from_pretrained(folder)`` works on it too).

Held-out numbers use the project's reference split (``evaluate.metrics.split_test_mask``: 80/20 by a
stable hash of the group, or the id), so listings of one product never sit on both sides.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file

from .atomic_files import remove_stale, replace_folder, temp_folder
from .checkpoint import CheckpointError, fsync_path, save_model, sha256_file, write_json_atomic
from .config import TrainConfig
from .data.arrays import ProductArrays
from .data.catalog import Product
from .encode import ItemEncoder
from .evaluate.metrics import split_test_mask
from .runtime import autocast, resolve_precision
from .train.finetune import FineTuning, finetune

FORMAT = "item-embed-classifier/1"
HEAD_FILE = "head.safetensors"
META_FILE = "classifier.json"
MAX_LISTED = 20  # labels named in a message before "... and N more"


class ModelMismatchError(ValueError):
    """Embeddings from another encoder than the one the classifier was trained on."""


def _listing(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def clean_label(value: Any) -> str | None:
    """A label as a string, None when missing (None, NaN, NA, blank)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)  # integer labels in a column that also has nulls arrive as floats
    text = " ".join(str(value).split())
    return text or None


@dataclass
class LabelReport:
    """What the label column held: rows skipped for a missing label, examples per class."""

    rows_in: int = 0
    missing: int = 0
    classes: dict[str, int] = field(default_factory=dict)  # label -> examples, most frequent first

    @property
    def used(self) -> int:
        return self.rows_in - self.missing

    @property
    def too_few(self) -> list[str]:
        """Classes with a single example: trained on, but they cannot be evaluated."""
        return [c for c, n in self.classes.items() if n < 2]

    def messages(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{self.missing} of {self.rows_in} rows have no label: skipped")
        if self.too_few:
            out.append(
                f"{len(self.too_few)} classes have a single example: kept for training, but they cannot be "
                f"evaluated (too few examples): {_listing(self.too_few)}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "missing": self.missing, "used": self.used,
                "classes": dict(self.classes), "too_few": self.too_few}


def prepare_labels(labels: Iterable[Any]) -> tuple[np.ndarray, list[str], LabelReport]:
    """Labels -> (codes (n,) int64 with -1 for a missing label, class names, report).

    Raises ValueError when fewer than 2 classes remain: there is nothing to choose between.
    """
    cleaned = [clean_label(v) for v in labels]
    counts = Counter(c for c in cleaned if c is not None)
    report = LabelReport(rows_in=len(cleaned), missing=sum(c is None for c in cleaned),
                         classes=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    if len(counts) < 2:
        found = f"only {next(iter(counts))!r}" if counts else "none"
        raise ValueError(
            f"need at least 2 classes to train a classifier, found {found} "
            f"({report.used} labelled rows of {report.rows_in}, {report.missing} without a label)"
        )
    names = sorted(counts)
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([index[c] if c is not None else -1 for c in cleaned], dtype=np.int64)
    return codes, names, report


def heldout_mask(keys: Iterable[Any]) -> np.ndarray:
    """(n,) bool, True for the test fold: ``evaluate.split_test_mask`` on group (or id) keys."""
    return split_test_mask(list(keys))


def _folds(codes: np.ndarray, keys, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train rows, scored test rows, unscored test rows, classes absent from the train fold)."""
    if len(keys) != len(codes):
        raise ValueError(f"{len(keys)} split keys for {len(codes)} labels")
    test = heldout_mask(keys)
    known = codes >= 0
    train_rows = np.flatnonzero(~test & known)
    seen = np.zeros(len(names), dtype=bool)
    seen[codes[train_rows]] = True
    test_rows = np.flatnonzero(test & known)
    scorable = seen[codes[test_rows]]
    return train_rows, test_rows[scorable], test_rows[~scorable], [n for n, s in zip(names, seen) if not s]


def heldout_metrics(truth: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes that occur in truth or predictions)."""
    from sklearn.metrics import f1_score

    truth, pred = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    if len(truth) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    return {"accuracy": float((truth == pred).mean()),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0))}


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


def _normalise(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim == 1:
        emb = emb[None, :]
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {emb.shape}")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class Classifier:
    """Label names + a linear head on L2-normalised embeddings (+ optionally its own encoder).

    weight: (C, d), bias: (C,); standardisation is folded into them. ``model_id`` names the
    encoder whose embeddings the head expects; ``encoder`` is set for a fine-tuned classifier.
    """

    def __init__(self, labels: Sequence[str], weight: np.ndarray, bias: np.ndarray, model_id: str,
                 label_column: str | None = None, metrics: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None, encoder: ItemEncoder | None = None) -> None:
        self.labels = [str(x) for x in labels]
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.labels) or self.bias.shape != (len(self.labels),):
            raise ValueError(f"head shapes {self.weight.shape}, {self.bias.shape} do not fit {len(self.labels)} labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("duplicate label names")
        self.model_id = model_id
        self.label_column = label_column
        self.metrics = metrics or {}
        self.options = options or {}
        self.encoder = encoder

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def finetuned(self) -> bool:
        return self.encoder is not None

    def check_model(self, model_id: str) -> None:
        """Raise ModelMismatchError unless embeddings of ``model_id`` fit this classifier."""
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"the classifier was trained on embeddings of model {self.model_id}, not {model_id}: "
                "use the model it was trained with" + (" (its own fine-tuned encoder)" if self.finetuned else "")
            )

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """(n, d) embeddings (normalised here if they are not) -> (n, C) float32 probabilities."""
        x = _normalise(emb)
        if x.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the classifier expects {self.dim}")
        logits = x @ self.weight.T.astype(np.float64) + self.bias  # (n, C)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, emb: np.ndarray) -> list[str]:
        """The most probable label of each of the (n, d) embeddings."""
        return [self.labels[i] for i in self.predict_proba(emb).argmax(axis=1)]

    def top_k(self, emb: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per embedding, the ``k`` most probable (label, probability), best first (k capped at C)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        p = self.predict_proba(emb)
        order = np.argsort(-p, axis=1, kind="stable")[:, :k]  # (n, k)
        return [[(self.labels[j], float(row[j])) for j in idx] for row, idx in zip(p, order)]

    def classify(self, records: Iterable[Mapping[str, Any] | Product], k: int = 5,
                 encoder: ItemEncoder | None = None, batch_size: int = 64,
                 image_root: str | Path | None = None) -> list[list[tuple[str, float]]]:
        """Records (dicts with image and/or title) -> top-k labels, with the right encoder.

        Uses the classifier's own encoder when fine-tuned, else ``encoder`` (checked against
        ``model_id``).
        """
        enc = self.encoder or encoder
        if enc is None:
            raise ValueError(f"this classifier needs embeddings of model {self.model_id}: pass its encoder")
        if encoder is not None:
            self.check_model(encoder.model_id)
        return self.top_k(enc.encode(records, batch_size=batch_size, image_root=image_root), k)

    # ----------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the classifier folder atomically (temporary folder, then rename)."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / META_FILE).is_file())):
            raise ValueError(f"{folder} exists and is not a classifier folder: refusing to overwrite it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(folder.parent, folder.name)
        tmp = temp_folder(folder)
        save_file({"weight": np.ascontiguousarray(self.weight), "bias": np.ascontiguousarray(self.bias)},
                  str(tmp / HEAD_FILE))
        if self.encoder is not None:
            save_model(tmp, self.encoder.model, self.encoder.tokenizer,
                       {"classifier": {"label_column": self.label_column, **self.options}})
            # The fine-tuned weights get their identity once written: config hash + weights checksum.
            self.encoder.config = json.loads((tmp / "config.json").read_text())
            self.model_id = self.encoder.model_id
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "format": FORMAT, "labels": self.labels, "model_id": self.model_id, "label_column": self.label_column,
            "dim": self.dim, "finetuned": self.finetuned, "metrics": self.metrics, "options": self.options,
            "sha256": sums,
        }
        write_json_atomic(tmp / META_FILE, meta)
        fsync_path(tmp)
        replace_folder(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, precision: str = "auto") -> "Classifier":
        """Read a classifier folder, refusing files that are missing or fail their checksum."""
        folder = Path(folder)
        path = folder / META_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a classifier folder (no {META_FILE})")
        try:
            meta = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable: {e}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
        for name, expected in meta["sha256"].items():
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"{folder}: {name} is missing")
            if sha256_file(f) != expected:
                raise CheckpointError(f"{folder}: {name} fails its checksum (truncated, corrupted or replaced)")
        head = load_file(str(folder / HEAD_FILE))
        encoder = None
        if meta["finetuned"]:
            encoder = ItemEncoder.from_pretrained(folder, device=device, precision=precision)
            if encoder.model_id != meta["model_id"]:
                raise CheckpointError(f"{folder}: encoder identity {encoder.model_id} != recorded {meta['model_id']}")
        return cls(meta["labels"], head["weight"], head["bias"], meta["model_id"], meta.get("label_column"),
                   meta.get("metrics"), meta.get("options"), encoder)


# --------------------------------------------------------------------------------------------
# Linear head on frozen embeddings
# --------------------------------------------------------------------------------------------


def _logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, log: Callable[[str], None]):
    """Standardise, fit LogisticRegression; return (W (C', d), b (C',), class codes) with the
    standardisation folded in: W_s ((x - mu) / sd) + b_s == (W_s / sd) x + (b_s - W_s mu / sd)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-12] = 1.0
    lr = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr.fit((x - mu) / sd, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log(f"warning: logistic regression did not converge in {max_iter} iterations")
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])[1]
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    w = coef / sd
    b = intercept - w @ mu
    return w, b, lr.classes_


def fit_linear(emb: np.ndarray, labels: Sequence[Any], keys: Sequence[Any], *, model_id: str,
               label_column: str | None = None, refit_all: bool = True, C: float = 1.0, max_iter: int = 2000,
               log: Callable[[str], None] = print) -> Classifier:
    """Logistic regression on frozen embeddings, scored on the held-out fold.

    emb: (n, d) embeddings of ``model_id`` (normalised here); labels: (n,) class of each row,
    missing ones skipped; keys: (n,) group (or id) of each row for the 80/20 split. Fits on the
    train fold and reports accuracy and macro-F1 on the test fold (rows whose class has no train
    example are counted, not scored); with ``refit_all`` the saved head is refitted on every
    labelled row. Returns the Classifier, its metrics under ``.metrics``.
    """
    x = _normalise(emb)
    codes, names, report = prepare_labels(labels)
    if len(codes) != len(x):
        raise ValueError(f"{len(codes)} labels for {len(x)} embeddings")
    messages = report.messages()
    train, scored, unscored, _ = _folds(codes, list(keys), names)
    heldout: dict[str, Any] = {"train_rows": int(len(train)), "test_rows": int(len(scored) + len(unscored)),
                               "scored_rows": int(len(scored)), "unscored_rows": int(len(unscored))}
    fold_head = None
    if len(np.unique(codes[train])) < 2:
        messages.append("the train fold holds fewer than 2 classes: no held-out evaluation")
        heldout.update(accuracy=float("nan"), macro_f1=float("nan"))
    else:
        fold_head = _logistic(x[train], codes[train], C, max_iter, log)
        w, b, cls = fold_head
        pred = cls[np.argmax(x[scored] @ w.T + b, axis=1)] if len(scored) else np.zeros(0, dtype=np.int64)
        heldout.update(heldout_metrics([names[c] for c in codes[scored]], [names[c] for c in pred]))
        heldout["classes_scored"] = int(len(np.unique(codes[scored])))
    if unscored.size:
        messages.append(f"{len(unscored)} held-out rows belong to classes with no train-fold example "
                        f"(not scored): {_listing(sorted({names[c] for c in codes[unscored]}))}")
    for m in messages:
        log(m)
    if refit_all:
        rows = np.flatnonzero(codes >= 0)
        w, b, cls = _logistic(x[rows], codes[rows], C, max_iter, log)
    elif fold_head is None:
        raise ValueError("cannot fit on the train fold alone: it holds fewer than 2 classes (use refit on all rows)")
    else:
        w, b, cls = fold_head
    metrics = {"heldout": heldout, "labels": report.to_dict(), "messages": messages,
               "trained_on": "all labelled rows" if refit_all else "train fold"}
    options = {"method": "linear", "C": C, "max_iter": max_iter, "refit_all": refit_all}
    return Classifier([names[c] for c in cls], w, b, model_id, label_column, metrics, options)


# --------------------------------------------------------------------------------------------
# Fine-tuning the whole model with a linear head on [CLS]
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def _predict_rows(task: FineTuning, rows: np.ndarray, batch_size: int, precision: str) -> np.ndarray:
    """(len(rows), d) pooled, L2-normalised embeddings of ``rows`` of the task's data, in eval mode."""
    model = task.model.eval()
    dev = next(model.parameters()).device
    out = [np.zeros((0, model.cfg.hidden_size), dtype=np.float32)]
    for start in range(0, len(rows), batch_size):
        b = task.data.batch(rows[start : start + batch_size]).to(dev)
        with autocast(precision, dev):
            h = model(b.input_ids, b.text_mask, b.images, b.has_image)
        out.append(model.pool(h).float().cpu().numpy())
    return np.concatenate(out)


def fit_finetune(data: ProductArrays | Sequence[Product], labels: Sequence[Any], keys: Sequence[Any],
                 encoder: ItemEncoder, *, label_column: str | None = None, epochs: float = 3.0,
                 batch_size: int = 32, lr: float = 5e-5, head_lr: float = 1e-3, weight_decay: float = 0.01,
                 precision: str = "auto", seed: int = 0, device: str | None = None, progress: bool = False,
                 run_dir: str | Path | None = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> Classifier:
    """Fine-tune a copy of ``encoder``'s model with a linear head on its pooled [CLS] embedding.

    data: products (or their arrays) in the order of ``labels`` and ``keys``. Trains on the train
    fold only, through the shared engine (AdamW, ``lr`` for the encoder and ``head_lr`` for the head,
    10% warm-up then cosine decay, cross-entropy); with ``run_dir`` it logs and checkpoints there and
    ``resume`` continues a killed run exactly. Reports accuracy and macro-F1 on the test fold. The
    returned Classifier carries the fine-tuned encoder; it is not refitted on the test fold.
    """
    if not isinstance(data, ProductArrays):
        cfg = encoder.cfg
        data = ProductArrays.build(list(data), encoder.tokenizer, cfg.max_text_len, cfg.image_size)
    codes, names, report = prepare_labels(labels)
    if len(codes) != len(data):
        raise ValueError(f"{len(codes)} labels for {len(data)} products")
    messages = report.messages()
    train, scored, unscored, absent = _folds(codes, list(keys), names)
    learnt = sorted(set(codes[train].tolist()))
    if len(learnt) < 2:
        raise ValueError(f"the train fold holds {len(learnt)} class(es): fine-tuning needs at least 2 "
                         f"({report.used} labelled rows)")
    if absent:
        messages.append(f"{len(absent)} classes only occur in the held-out fold and are not learnt: {_listing(absent)}")
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[learnt] = np.arange(len(learnt))
    model = copy.deepcopy(encoder.model)
    if model.shape is not None:
        # The head learns on [CLS]; the tuned encoder's embeddings must be what the head reads.
        model.cfg = replace(model.cfg, shape_dims=0)
        model.shape = None
    torch.manual_seed(seed)
    task = FineTuning(model, len(learnt), data, train, remap[np.maximum(codes, 0)])
    bs = max(2, min(batch_size, len(train)))
    cfg = TrainConfig(epochs=epochs, batch_size=bs, lr=lr, new_lr_scale=head_lr / lr, weight_decay=weight_decay,
                      warmup_ratio=0.1, precision=precision, seed=seed)
    meta = {"finetune": {"finetuned_from": encoder.model_id, "labels": [names[c] for c in learnt]}}
    result = finetune(task, cfg, Path(run_dir) if run_dir is not None else None, resume=resume, meta=meta,
                      device=device, progress=progress, log=log)
    dev = next(model.parameters()).device
    precision = resolve_precision(precision, dev)

    weight = (task.head.weight.detach().float().cpu().numpy() * task.scale).astype(np.float32)
    bias = task.head.bias.detach().float().cpu().numpy()
    emb = _predict_rows(task, scored, bs, precision)
    tuned = ItemEncoder(model, encoder.tokenizer, {"weights_sha256": "unsaved"}, str(dev), encoder.precision)
    options = {"method": "finetune", "finetuned_from": encoder.model_id, "epochs": epochs, "steps": result.steps,
               "batch_size": bs, "lr": lr, "head_lr": head_lr, "weight_decay": weight_decay,
               "precision": precision, "seed": seed}
    clf = Classifier([names[c] for c in learnt], weight, bias, tuned.model_id, label_column, None, options, tuned)
    heldout = {"train_rows": int(len(train)), "test_rows": int(len(scored) + len(unscored)),
               "scored_rows": int(len(scored)), "unscored_rows": int(len(unscored)),
               "final_train_loss": result.last.get("loss", float("nan")),
               **heldout_metrics([names[c] for c in codes[scored]], clf.predict(emb) if len(scored) else []),
               "classes_scored": int(len(np.unique(codes[scored])))}
    if unscored.size:
        messages.append(f"{len(unscored)} held-out rows belong to classes with no train-fold example (not scored)")
    for m in messages:
        log(m)
    clf.metrics = {"heldout": heldout, "labels": report.to_dict(), "messages": messages, "trained_on": "train fold"}
    return clf


# --------------------------------------------------------------------------------------------
# Scoring predictions against a label column
# --------------------------------------------------------------------------------------------


def score_predictions(top: Sequence[Sequence[tuple[str, float]]], truth: Sequence[Any],
                      known: Sequence[str]) -> dict[str, Any]:
    """Top-1 and top-k accuracy of ``top`` (from ``Classifier.top_k``) against ``truth``.

    Rows with a missing label are not scored; rows whose label the classifier never saw are
    scored (always wrong) and counted under ``unseen_rows`` / ``unseen_labels``.
    """
    known_set = set(known)
    labelled = hit1 = hitk = 0
    unseen: Counter[str] = Counter()
    k = max((len(t) for t in top), default=0)
    for t, value in zip(top, truth):
        label = clean_label(value)
        if label is None:
            continue
        labelled += 1
        if label not in known_set:
            unseen[label] += 1
            continue
        hit1 += bool(t) and t[0][0] == label
        hitk += any(name == label for name, _ in t)
    nan = float("nan")
    return {"labelled": labelled, "missing": len(truth) - labelled, "k": k,
            "accuracy": hit1 / labelled if labelled else nan, "top_k_accuracy": hitk / labelled if labelled else nan,
            "unseen_rows": sum(unseen.values()), "unseen_labels": dict(unseen.most_common())}
