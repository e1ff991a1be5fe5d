"""Product embeddings from a trained run: ``ItemEncoder.from_pretrained(run).encode(products)``."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import files_digest, load_model, load_model_tokenizer
from .data.arrays import Batch, ProductArrays, make_batch
from .data.catalog import Product
from .data.images import ImageError, ImageLimits, load_image_array
from .model.encoder import ItemModel
from .runtime import autocast, pick_device, resolve_precision


def _bf16_copy(model: ItemModel) -> ItemModel:
    """A bfloat16 copy of ``model`` for inference; its shape slice (if any) is ``model``'s own float32
    one (the whitening needs fp32 and has no weights worth copying)."""
    if not hasattr(model, "shape"):  # the dual encoder has no slice
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    shape, model.shape = model.shape, None
    try:
        runner = copy.deepcopy(model).to(torch.bfloat16).eval()
    finally:
        model.shape = shape
    runner.shape = shape
    return runner


class ItemEncoder:
    """A trained ITEm encoder with its tokenizer and preprocessing.

    ``encode`` takes what ``SentenceTransformer.encode`` takes, for products: titles (str), photos
    (PIL image, pathlib.Path, bytes), records (dicts with an ``image`` and/or a ``title``) or lists of
    them, and returns L2-normalised float32 embeddings ((d,) for one input, (n, d) for a list).

    ``precision="auto"`` (the default) picks bf16 where the device has native bf16 matrix units (on
    the 2-core AMX CPU of benchmarks/RESULTS.md 2.4x the fp32 speed, hm-dev joint R@1 0.9958 vs
    0.9963) and fp32 elsewhere; ``precision`` holds the choice made. bf16 encodes with a bfloat16 copy of
    ``model`` made here (``runner``; the shape slice stays float32) under autocast: autocast alone
    re-casts every fp32 weight on each batch, ~15% of the encode time on CPU
    (benchmarks/bench_encode.py). ``model`` itself stays as given (what ``save_model`` writes and
    fine-tuning copies); change its weights and the copy is stale, so build a new encoder.
    """

    def __init__(self, model: ItemModel, tokenizer, config: dict | None = None, device: str | None = None,
                 precision: str = "auto") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or {}
        self.cfg = model.cfg
        self.device = pick_device(device)
        self.model.to(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.runner = self.model if self.precision == "fp32" else _bf16_copy(self.model)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None, precision: str = "auto",
                        shape_slice: bool = True, backend: str = "torch") -> "ItemEncoder":
        """The model of ``run_dir``; ``shape_slice=False`` embeds with its [CLS] alone (the transformer's
        own embedding, without the hand-made HOG part; another model id). ``backend="onnx"``: the folder
        ``item-embed export-onnx`` wrote, run by onnxruntime (``onnx_export.OnnxItemEncoder``, fp32)."""
        from .onnx_export import OnnxItemEncoder, refuse_onnx_folder

        if backend == "onnx":
            return OnnxItemEncoder.from_pretrained(run_dir, device, precision, shape_slice)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")
        refuse_onnx_folder(run_dir)
        model, config = load_model(Path(run_dir))
        tokenizer = load_model_tokenizer(run_dir, config, model.cfg.vocab_size)
        if not shape_slice and model.shape is not None:
            model.cfg, model.shape = dataclasses.replace(model.cfg, shape_dims=0), None
        return cls(model, tokenizer, config, device, precision)

    @property
    def dim(self) -> int:
        return self.cfg.embedding_dim

    @property
    def model_id(self) -> str:
        """Identity of the model: config hash + weights checksum prefix, + a digest of the tokenizer files
        for folders that record their checksums (``checkpoint.files_digest``; folders saved before keep
        their two-part id, so their indexes and embedding files stay valid)."""
        base = f"{self.cfg.config_hash()}-{str(self.config.get('weights_sha256', ''))[:16]}"
        tokenizer = files_digest(self.config)
        return f"{base}-{tokenizer}" if tokenizer else base

    def to_product(self, record: Mapping[str, Any] | Product, index: int = 0, image_root: Path | None = None,
                   limits: ImageLimits | None = None) -> Product:
        """A record -> Product with a prepared image; raises ValueError naming the record."""
        if isinstance(record, Product):
            return record
        title = record.get("title")
        desc = record.get("description") if self.cfg.use_description else None
        text = ". ".join(" ".join(str(t).split()) for t in (title, desc) if t and str(t).strip()) or None
        image = None
        if record.get("image") is not None:
            try:
                image = load_image_array(record["image"], self.cfg.image_size, image_root, limits)
            except ImageError as e:
                raise ImageError(f"record {record.get('id', index)!r}: {e}") from None
        if image is None and text is None:
            raise ValueError(f"record {record.get('id', index)!r} has neither an image nor a title")
        return Product(index, str(record.get("id", index)), text, image)

    def encode_products(self, products: Sequence[Product]) -> np.ndarray:
        """Embed already validated products in one batch: float32 (n, d)."""
        if not products:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode_batch(make_batch(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size))

    def encode_batched(self, products: Sequence[Product], batch_size: int = 64) -> np.ndarray:
        """Embed already validated products in batches of titles of similar length: float32 (n, d),
        rows in the order given.

        A batch is padded to its longest title; grouping by length trims that padding (hm-dev titles
        in batches of 64 in catalog order: 11.1 tokens padded vs 7 on average). A product's embedding
        does not depend on the rest of its batch (padding is masked)."""
        out = np.zeros((len(products), self.dim), dtype=np.float32)
        if not products:
            return out
        arrays = ProductArrays.build(products, self.tokenizer, self.cfg.max_text_len, self.cfg.image_size)
        order = np.argsort(arrays.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch(arrays.batch(idx))
        return out

    @torch.inference_mode()
    def _encode_batch(self, batch: Batch) -> np.ndarray:
        dev = self.device
        images = None if batch.images is None else batch.images.to(dev)
        has_image = batch.has_image.to(dev)
        with autocast(self.precision, dev):
            out = self.runner(batch.input_ids.to(dev), batch.text_mask.to(dev), images, has_image)
            emb = self.runner.product_embedding(out, images, batch.has_text.to(dev), has_image)
        return emb.cpu().numpy().astype(np.float32)

    def encode(self, inputs: Any, batch_size: int = 64, *, show_progress_bar: bool | None = None,
               normalize_embeddings: bool = True, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device: str | torch.device | None = None, precision: str = "float32",
               image_root: str | Path | None = None, show_progress: bool | None = None) -> Any:
        """Embed products the way ``SentenceTransformer.encode`` embeds sentences.

        ``inputs``: one input or a list (any iterable) of them. An input is
          - ``str``: a **title** (never a path or URI: give images as below, so a title such as
            ``"photo.jpg frame"`` stays text);
          - ``PIL.Image.Image``, ``pathlib.Path`` or ``bytes``: a **photo** (photo-only product; a
            relative Path starts from ``image_root``);
          - ``dict``: a record with ``title`` (or ``text``), ``image`` (path, URI such as
            ``s3://...`` or ``https://...``, bytes or PIL image), optional ``description`` and ``id``
            (named in errors);
          - a :class:`~item_embed.data.catalog.Product` (from ``Catalog.iter_chunks``).

        One input gives a vector (d,), a list gives (n, d) rows in input order ((0, d) for none).
        ``batch_size``: products per forward pass. ``show_progress_bar``: a tqdm bar (None: off;
        ``show_progress`` is its old name). ``normalize_embeddings``: rows are unit length (True, the
        default); ITEm's product embedding is L2-normalised inside the model, so this only repairs a
        row that is not (False returns the rows as the model gives them, the same for ITEm).
        ``convert_to_tensor``: one torch tensor on the encoder's device (wins over
        ``convert_to_numpy``); ``convert_to_numpy`` (default): float32 numpy; both False: a list of
        tensors. ``device``: move the encoder there (``"cpu"``, ``"cuda"``, ``"cuda:1"``) and
        embed there; it stays. ``precision``: the output's, as in sentence-transformers:
        ``float32``, or ``ubinary`` / ``binary`` (sign bits packed 8 per byte: uint8 / int8 of d/8
        columns). The compute precision is the encoder's own (``from_pretrained(run, precision=...)``:
        auto, bf16, fp32).

        Anything else raises a one-line error: an unknown keyword a TypeError naming it, an input of
        another type a TypeError naming its index, an unusable record (no title and no image, bad
        image) a ValueError naming its id or index.
        """
        if show_progress_bar is None:
            show_progress_bar = bool(show_progress)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if precision not in OUTPUT_PRECISIONS:
            hint = (" (that is a compute precision: give it to ItemEncoder.from_pretrained(run, precision=...))"
                    if precision in COMPUTE_PRECISIONS else "")
            raise ValueError(f"precision must be one of {', '.join(OUTPUT_PRECISIONS)}, not {precision!r}{hint}")
        if device is not None:
            self.to(device)
        single, items = _as_inputs(inputs)
        root = Path(image_root) if image_root is not None else None
        chunks = []
        chunk = batch_size * 4  # sorted by title length within a chunk (encode_batched)
        with tqdm(total=len(items), disable=not show_progress_bar, desc="embed") as bar:
            for start in range(0, len(items), chunk):
                part = [self.to_product(_as_record(r, start + i), start + i, root)
                        for i, r in enumerate(items[start : start + chunk])]
                chunks.append(self.encode_batched(part, batch_size))
                bar.update(len(part))
        emb = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)
        if normalize_embeddings:
            emb = _unit_rows(emb)
        if precision != "float32":
            emb = _quantize(emb, precision)
        if convert_to_tensor:
            out = torch.from_numpy(emb).to(self.device)
        elif convert_to_numpy:
            out = emb
        else:
            out = list(torch.from_numpy(emb).to(self.device))
        return out[0] if single else out

    def to(self, device: str | torch.device) -> "ItemEncoder":
        """Move the encoder (its model and bf16 copy) to ``device``; returns it."""
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', not {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here")
        if dev != self.device:
            self.model.to(dev)
            if self.runner is not self.model:
                self.runner.to(dev)
            self.device = dev
        return self

    def as_sentence_transformer(self) -> "SentenceTransformerAdapter":
        """This encoder in the shape sentence-transformers' evaluators expect (see
        :class:`SentenceTransformerAdapter`)."""
        return SentenceTransformerAdapter(self)


# ------------------------------------------------------------------ encode's inputs and outputs

OUTPUT_PRECISIONS = ("float32", "ubinary", "binary")
COMPUTE_PRECISIONS = ("auto", "bf16", "fp32", "bfloat16", "float16", "fp16")
_RECORD_KEYS = ("title", "text", "image", "description")


def _is_single(x: Any) -> bool:
    import os

    from PIL import Image

    return isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, Mapping, Product))


def _as_inputs(inputs: Any) -> tuple[bool, list]:
    """(whether ``inputs`` is one input, the inputs as a list)."""
    if _is_single(inputs):
        return True, [inputs]
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind not in "OUS":
        raise TypeError("encode: got a numpy array of numbers; give a photo as a PIL image "
                        "(PIL.Image.fromarray(a)) and titles as strings")
    if hasattr(inputs, "columns") and hasattr(inputs, "iterrows"):
        raise TypeError("encode: got a DataFrame; give frame.to_dict('records'), or open it with Catalog")
    try:
        return False, list(inputs)
    except TypeError:
        raise TypeError(f"encode: expected a title (str), a photo (PIL image, pathlib.Path, bytes), a record "
                        f"dict or a list of them, not {type(inputs).__name__}") from None


def _as_record(item: Any, index: int) -> Mapping[str, Any] | Product:
    """One input of ``encode`` as a record for ``to_product``."""
    if isinstance(item, (Product, Mapping)):
        if isinstance(item, Mapping):
            if not any(k in item for k in _RECORD_KEYS):
                keys = ", ".join(repr(k) for k in list(item)[:8]) or "none"
                raise ValueError(f"record {item.get('id', index)!r} has none of the keys 'title', 'image' "
                                 f"(or 'text', 'description'); its keys: {keys}")
            if item.get("title") is None and item.get("text") is not None:
                item = {**item, "title": item["text"]}
        return item
    if isinstance(item, str):
        return {"title": item}
    if _is_single(item):  # a photo: PIL image, path or bytes
        return {"image": item}
    extra = "; give a photo as a PIL image" if isinstance(item, (np.ndarray, torch.Tensor)) else ""
    raise TypeError(f"encode: input {index} is of type {type(item).__name__}; expected a title (str), a photo "
                    f"(PIL image, pathlib.Path, bytes), a record dict or a Product{extra}")


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    """``emb`` with every non-zero row of unit length; rows that already are stay bit for bit."""
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    off = (np.abs(norm - 1.0) > 1e-4) & (norm > 0)
    if off.any():
        emb = np.where(off, emb / np.where(norm > 0, norm, 1.0), emb).astype(np.float32)
    return emb


def _quantize(emb: np.ndarray, precision: str) -> np.ndarray:
    """Sign bits of ``emb`` packed 8 per byte: ``ubinary`` uint8, ``binary`` int8 (sentence-transformers'
    layout: the packed byte minus 128)."""
    packed = np.packbits(emb > 0, axis=-1)
    if precision == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)


class SentenceTransformerAdapter:
    """ITEm where sentence-transformers expects a ``SentenceTransformer``.

    ``sentence_transformers.util.semantic_search`` needs no adapter: give it
    ``encoder.encode(..., convert_to_tensor=True)``. Evaluators such as
    ``InformationRetrievalEvaluator`` call ``model.encode_query`` / ``encode_document`` with prompt
    and ``truncate_dim`` keywords, score with ``model.similarity`` and record metrics in
    ``model.model_card_data``: this adapter supplies those around :meth:`ItemEncoder.encode` (queries
    and corpus entries may be titles, photos or record dicts). ITEm has no prompts and is not trained
    for truncation: a prompt or a ``truncate_dim`` raises ValueError.
    """

    similarity_fn_name = "cosine"

    def __init__(self, encoder: ItemEncoder) -> None:
        self.encoder = encoder
        self.model_card_data = _EvaluationLog()

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder.dim

    def encode(self, inputs: Any, prompt_name: str | None = None, prompt: str | None = None,
               truncate_dim: int | None = None, **kwargs) -> Any:
        if prompt_name or prompt:
            raise ValueError("item-embed has no prompts: leave prompt and prompt_name unset")
        if truncate_dim is not None and truncate_dim != self.encoder.dim:
            raise ValueError(f"item-embed embeddings are not trained for truncation: truncate_dim must be None, "
                             f"not {truncate_dim!r}")
        return self.encoder.encode(inputs, **kwargs)

    encode_query = encode
    encode_document = encode

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Cosine similarities (len(a), len(b)) as a float32 tensor."""
        a, b = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float() for x in (a, b))
        a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
        b = b.to(a.device)
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


class _EvaluationLog:
    """Where sentence-transformers evaluators record their metrics (``model.model_card_data``)."""

    def __init__(self) -> None:
        self.eval_results: list[dict[str, Any]] = []

    def set_evaluation_metrics(self, evaluator: Any, metrics: dict[str, Any], epoch: int = 0, step: int = 0) -> None:
        self.eval_results.append({"evaluator": type(evaluator).__name__, "metrics": dict(metrics),
                                  "epoch": epoch, "step": step})
