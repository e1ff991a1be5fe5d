"""ONNX export of a trained ITEm encoder, and an onnxruntime backend for :class:`~item_embed.encode.ItemEncoder`.

``export_onnx(run, out)`` (``item-embed export-onnx RUN --out DIR``) writes a folder that
``ItemEncoder.from_pretrained(DIR, backend="onnx")`` runs with onnxruntime:

- ``model.onnx``: the whole product embedding, as ``ItemEncoder`` computes it in torch: inputs
  ``input_ids`` int64 (B, T), ``text_mask`` bool (B, T), ``images`` uint8 (B, S, S, 3),
  ``has_image`` bool (B,), ``has_text`` bool (B,); output ``product_embedding`` float32 (B, D),
  L2-normalised. B and T are dynamic. In the graph: the text embeddings, the image stem, the
  transformer, the [CLS] pooling and, for models with one, the shape slice (HOG of the photo, its
  whitening, the title-less rows' [CLS] dropped, the final normalisation).
- ``model_text.onnx``: the same for batches without any photo (``input_ids``, ``text_mask``,
  ``has_text``): the torch path gives such a batch no image tokens at all, so neither does this
  graph (the joint graph would spend most of a title query's time on masked-out patches).
- ``model.data``: the weights of both graphs, each stored once (ONNX external data).
- ``config.json`` (format ``item-embed-onnx/1``): the source's config (model config with its
  preprocessing: image size, text length, description use) and its identity records
  (``config_hash``, ``weights_sha256``, ``files_sha256``), plus an ``onnx`` record: the source
  model id, opset, exporter and the parity measured at export.
- the tokenizer files, copied byte for byte from the source folder.
- ``manifest.json``: the SHA-256 of every other file; the loader refuses a folder where one is
  missing or altered.

Outside the graphs, shared with the torch path (``ItemEncoder``): decoding and resizing photos,
tokenising, batching and padding, and ``encode``'s output options.

The ONNX encoder's ``model_id`` is the source model's, so indexes and embedding files made with the
torch model accept its queries. That holds because the export refuses to finish unless every probe
embedding matches torch fp32 at cosine >= ``PARITY_MIN_COSINE`` (tests/test_onnx.py checks real
products too). The graphs are fp32; ``precision`` must be ``auto`` or ``fp32``.

onnx, onnxscript and onnxruntime are an optional extra (``pip install item-embed[onnx]``): they are
imported here only, when exporting or loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic_files import remove_stale, replace_folder, temp_folder
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    fsync_path,
    load_model,
    load_model_tokenizer,
    sha256_file,
    verify_folder,
    write_json_atomic,
)
from .data.arrays import Batch, ProductArrays
from .data.catalog import Product
from .encode import ItemEncoder

ONNX_FORMAT = "item-embed-onnx/1"
JOINT_GRAPH, TEXT_GRAPH, WEIGHTS_FILE = "model.onnx", "model_text.onnx", "model.data"
OPSET = 18
PARITY_MIN_COSINE = 0.9999
JOINT_INPUTS = ("input_ids", "text_mask", "images", "has_image", "has_text")
TEXT_INPUTS = ("input_ids", "text_mask", "has_text")
OUTPUT = "product_embedding"
# Tokenizer files copied from a folder saved before config.json recorded them (files_sha256).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")
EXTRA_HINT = "pip install 'item-embed[onnx]' (onnx, onnxscript and onnxruntime)"
# Initializers smaller than this stay inside the graph files.
_INLINE_BYTES = 1024


class OnnxExportError(ValueError):
    """The export failed, or its graphs do not reproduce the torch embeddings."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise ImportError naming the extra that provides them."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"the ONNX path needs {', '.join(missing)}: {EXTRA_HINT}")


def is_onnx_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an ONNX export (it has config.json of format ``item-embed-onnx/1``)."""
    path = Path(folder) / "config.json"
    if not path.is_file() or not (Path(folder) / JOINT_GRAPH).exists():
        return False
    try:
        return json.loads(path.read_text()).get("format") == ONNX_FORMAT
    except (ValueError, AttributeError, OSError):
        return False


def refuse_onnx_folder(folder: str | Path) -> None:
    """Raise CheckpointError when ``folder`` is an ONNX export (the torch loader's first check)."""
    if is_onnx_folder(folder):
        raise CheckpointError(f"{folder} is an ONNX export (item-embed export-onnx): load it with "
                              "ItemEncoder.from_pretrained(folder, backend='onnx')")


# ------------------------------------------------------------------ the graphs


class _FrozenShape(nn.Module):
    """The shape slice with ``fitted`` read once (the buffer read is data-dependent for torch.export)."""

    def __init__(self, shape: nn.Module) -> None:
        super().__init__()
        self.inner = shape
        self.fitted = shape.fitted

    def forward(self, images: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(images, has_image)


class _JointGraph(nn.Module):
    """What ``ItemEncoder._encode_batch`` computes for a batch with photos, as one module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, text_mask, images, has_image, has_text):
        out = self.model(input_ids, text_mask, images, has_image)
        return self.model.product_embedding(out, images, has_text, has_image)


class _TextGraph(nn.Module):
    """What ``ItemEncoder._encode_batch`` computes for a batch without photos (no image tokens)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, text_mask, has_text):
        out = self.model(input_ids, text_mask, None, None)
        return self.model.product_embedding(out, None, has_text, torch.zeros_like(has_text))


@contextlib.contextmanager
def _export_ready(model: nn.Module):
    """``model`` with its shape slice's ``fitted`` frozen, restored afterwards."""
    shape = getattr(model, "shape", None)
    if shape is not None:
        model.shape = _FrozenShape(shape)
    try:
        yield model
    finally:
        if shape is not None:
            model.shape = shape


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, warnings and log noise (torchvision absent) kept off the console."""
    import io

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_graph(module: nn.Module, args: tuple, names: tuple[str, ...], max_text_len: int, opset: int):
    """``module`` as an ONNX ModelProto with a dynamic batch (every input) and text length."""
    from torch.export import Dim

    batch, text = Dim("batch", min=1), Dim("text", min=2, max=max(max_text_len, 3))
    dims = {"input_ids": {0: batch, 1: text}, "text_mask": {0: batch, 1: text}, "images": {0: batch},
            "has_image": {0: batch}, "has_text": {0: batch}}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes={n: dims[n] for n in names},
                                        opset_version=opset, input_names=list(names), output_names=[OUTPUT],
                                        verbose=False)
    except Exception as e:  # the exporter raises many kinds; the first line says which step failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OnnxExportError(f"torch.onnx.export failed ({type(e).__name__}: {first})") from e
    return program.model_proto


def _externalise(protos: list, folder: Path) -> None:
    """Move the initializers of ``protos`` (ModelProtos) into ``folder/WEIGHTS_FILE``, each distinct tensor
    once: graphs exported from the same module share their weights' bytes."""
    from onnx import TensorProto, numpy_helper

    stored: dict[tuple, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for proto in protos:
            for tensor in proto.graph.initializer:
                data = numpy_helper.to_array(tensor).tobytes()
                if len(data) < _INLINE_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key not in stored:
                    offset = -(-f.tell() // 64) * 64
                    f.write(b"\0" * (offset - f.tell()))
                    f.write(data)
                    stored[key] = (offset, len(data))
                offset, length = stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "string_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v


# ------------------------------------------------------------------ sessions


def _providers(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"device {str(device)!r}: this onnxruntime has no CUDA provider "
                             f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    raise ValueError(f"the ONNX backend runs on cpu or cuda, not {str(device)!r}")


def _session(path: Path, device: torch.device, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=_providers(device))


def _feeds(batch: Batch, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    values = {"input_ids": batch.input_ids, "text_mask": batch.text_mask, "images": batch.images,
              "has_image": batch.has_image, "has_text": batch.has_text}
    return {n: np.ascontiguousarray(values[n].cpu().numpy()) for n in names}


# ------------------------------------------------------------------ the encoder


class OnnxItemEncoder(ItemEncoder):
    """An exported ITEm encoder run by onnxruntime, with ``ItemEncoder``'s interface (``encode``,
    ``encode_batched``, ``encode_products``, ``model_id``, ...): preprocessing and batching are
    ``ItemEncoder``'s own; only the forward pass (``_encode_batch``) runs the ONNX graphs.

    fp32 only. ``threads``: onnxruntime's intra-op threads (default: torch's, so ``OMP_NUM_THREADS`` /
    ``torch.set_num_threads`` set both backends alike). There is no torch model: ``model`` and
    ``runner`` are None (fine-tuning and attention hooks need the torch folder)."""

    backend = "onnx"

    def __init__(self, folder: Path, tokenizer, config: dict, device: str | torch.device | None = None,
                 threads: int | None = None) -> None:
        from .config import ModelConfig

        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.config = config
        self.cfg = ModelConfig.from_dict(config["model"])
        self.model = self.runner = None
        self.precision = "fp32"
        self.threads = int(threads or torch.get_num_threads())
        if device is None:
            import onnxruntime as ort

            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        self.device = None
        self.to(device)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None, precision: str = "auto",
                        shape_slice: bool = True, threads: int | None = None) -> OnnxItemEncoder:
        """The ONNX export in ``run_dir``, verified against its manifest (every file present and unaltered)."""
        require("onnxruntime")
        folder = Path(run_dir)
        if precision not in ("auto", "fp32"):
            raise ValueError(f"the ONNX backend runs in fp32: precision must be auto or fp32, not {precision!r}")
        config = read_onnx_folder(folder)
        if not shape_slice and config["model"].get("shape_dims"):
            raise ValueError("the ONNX graphs include the shape slice: for the [CLS]-only embedding load the torch "
                             "model with shape_slice=False")
        tokenizer = load_model_tokenizer(folder, config, config["model"]["vocab_size"])
        encoder = cls(folder, tokenizer, config, device, threads)
        if encoder.model_id != config.get("onnx", {}).get("model_id"):
            raise CheckpointError(f"{folder / 'config.json'}: the model id {encoder.model_id} is not the exported "
                                  f"{config.get('onnx', {}).get('model_id')!r} (edited?); export the model again")
        return encoder

    def to(self, device: str | torch.device) -> OnnxItemEncoder:
        """Run the graphs on ``device`` (cpu, or cuda with onnxruntime-gpu); returns the encoder."""
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', not {device!r}") from None
        if dev != self.device:
            self.session = _session(self.folder / JOINT_GRAPH, dev, self.threads)
            self.text_session = _session(self.folder / TEXT_GRAPH, dev, self.threads)
            self.device = dev
        return self

    def _encode_batch(self, batch: Batch) -> np.ndarray:
        if batch.images is None:
            out = self.text_session.run([OUTPUT], _feeds(batch, TEXT_INPUTS))[0]
        else:
            out = self.session.run([OUTPUT], _feeds(batch, JOINT_INPUTS))[0]
        return np.asarray(out, dtype=np.float32)


def read_onnx_folder(folder: Path) -> dict[str, Any]:
    """config.json of an ONNX export, after checking every file against ``manifest.json``."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is not an item-embed ONNX folder (no config.json); write one with "
                              "`item-embed export-onnx RUN --out DIR`")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e}); export the model again") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt != ONNX_FORMAT:
        hint = (": it is a torch model folder; load it without backend='onnx', or export it with "
                "`item-embed export-onnx`") if (folder / "model.safetensors").is_file() else ""
        raise CheckpointError(f"{folder} holds format {fmt!r}, not {ONNX_FORMAT!r}{hint}")
    try:
        verify_folder(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; copy the whole ONNX folder or export the model again") from None
    from .config import ModelConfig

    try:
        cfg = ModelConfig.from_dict(config.get("model"), source=cfg_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if config.get("config_hash") != cfg.config_hash():
        raise CheckpointError(f"{cfg_path}: the model config does not match its config_hash")
    return config


# ------------------------------------------------------------------ export


PROBE_TITLES = ("red cotton t-shirt", "slim fit blue denim jeans with five pockets and a zip fly, stretch cotton",
                "wool scarf", "black leather ankle boots with a block heel and side zip, lined",
                "striped linen shirt", "a very long title " + "with many repeated words " * 12, "sneakers")


def probe_batches(cfg, tokenizer, seed: int = 0) -> list[Batch]:
    """Batches the export checks its graphs on: 2 and 7 products (short and long titles, photo-only,
    title-only and both), and 1 and 3 title-only products (the text graph)."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size

    def photo() -> np.ndarray:  # smooth shapes on white, plus a little noise: edges for the shape slice
        img = np.full((s, s, 3), 255, dtype=np.float32)
        y0, x0 = rng.integers(0, s // 2, 2)
        img[y0 : y0 + s // 2, x0 : x0 + s // 3] = rng.integers(0, 200, 3)
        return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)

    def products(n: int, titles: list[str | None], photos: list[bool]) -> list[Product]:
        return [Product(i, f"probe-{i}", titles[i], photo() if photos[i] else None, titles[i]) for i in range(n)]

    specs = [
        products(2, [PROBE_TITLES[0], PROBE_TITLES[2]], [True, True]),
        products(7, [PROBE_TITLES[1], None, PROBE_TITLES[3], PROBE_TITLES[4], PROBE_TITLES[5], None, PROBE_TITLES[6]],
                 [True, True, False, True, True, True, False]),
        products(1, [PROBE_TITLES[6]], [False]),
        products(3, [PROBE_TITLES[0], PROBE_TITLES[5], PROBE_TITLES[3]], [False, False, False]),
    ]
    return [ProductArrays.build(p, tokenizer, cfg.max_text_len, cfg.image_size).batch(np.arange(len(p)))
            for p in specs]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (1 for two zero rows)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def _tokenizer_files(run_dir: Path, config: dict) -> list[str]:
    recorded = config.get("files_sha256")
    if recorded:
        return sorted(recorded)
    return [name for name in TOKENIZER_FILES if (run_dir / name).is_file()]


def export_onnx(run_dir: str | Path, out_dir: str | Path, *, opset: int = OPSET,
                min_cosine: float = PARITY_MIN_COSINE, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Export the model of ``run_dir`` (a torch model folder) to the ONNX folder ``out_dir`` (replaced in one
    step when it exists). Checks both graphs with ``onnx.checker`` and against torch fp32 in onnxruntime on
    ``probe_batches`` (two batch sizes and text lengths each); raises OnnxExportError, leaving ``out_dir``
    as it was, unless every probe embedding's cosine is >= ``min_cosine``. Returns the ``onnx`` record
    written to config.json."""
    require("onnx", "onnxscript", "onnxruntime")
    import onnx

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents:
        raise ValueError("--out must be another folder than the model's, and not one that holds it")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_onnx_folder(out_dir))):
        raise ValueError(f"refusing to replace {out_dir}: it exists and is not an ONNX export")
    if opset < 17:
        raise ValueError(f"opset must be 17 or later (LayerNormalization), not {opset}")
    try:
        model, config = load_model(run_dir)
    except CheckpointError as e:
        if "format" in str(e):
            raise OnnxExportError(f"{e}: ONNX export supports ITEm models (item-embed/1) only") from None
        raise
    model = model.float().eval()
    tokenizer = load_model_tokenizer(run_dir, config, model.cfg.vocab_size)
    reference = ItemEncoder(model, tokenizer, config, device="cpu", precision="fp32")
    cfg = model.cfg
    batches = probe_batches(cfg, tokenizer)
    stem = f"backbone {cfg.image_backbone}" if cfg.image_backbone else f"{cfg.image_stem} stem"
    log(f"exporting {run_dir} (model id {reference.model_id}, {stem}) to ONNX opset {opset}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir.parent, out_dir.name)
    tmp = temp_folder(out_dir)
    os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the export is meant to be shipped
    try:
        example = batches[1]  # 7 rows: no dimension of size 1 for torch.export to specialise
        with torch.no_grad(), _export_ready(model):
            joint = _export_graph(_JointGraph(model).eval(), tuple(_batch_tensor(example, n) for n in JOINT_INPUTS),
                                  JOINT_INPUTS, cfg.max_text_len, opset)
            text_example = batches[3]
            text = _export_graph(_TextGraph(model).eval(), tuple(_batch_tensor(text_example, n) for n in TEXT_INPUTS),
                                 TEXT_INPUTS, cfg.max_text_len, opset)
        _externalise([joint, text], tmp)
        for proto, name in ((joint, JOINT_GRAPH), (text, TEXT_GRAPH)):
            proto.producer_name, proto.doc_string = "item-embed", f"ITEm product embedding of {reference.model_id}"
            onnx.save_model(proto, str(tmp / name))
            try:
                onnx.checker.check_model(str(tmp / name))
            except onnx.checker.ValidationError as e:
                raise OnnxExportError(f"{name} fails onnx.checker: {str(e).splitlines()[0]}") from None
        parity = _check_parity(tmp, reference, batches, min_cosine)
        for name in _tokenizer_files(run_dir, config):
            shutil.copyfile(run_dir / name, tmp / name)
        record = {"model_id": reference.model_id, "source": str(run_dir.resolve()), "source_format": config["format"],
                  "opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
                  "onnx": onnx.__version__, "precision": "fp32",
                  "graphs": {"joint": {"file": JOINT_GRAPH, "inputs": list(JOINT_INPUTS)},
                             "text": {"file": TEXT_GRAPH, "inputs": list(TEXT_INPUTS)}},
                  "output": OUTPUT, "weights": WEIGHTS_FILE, "dynamic": ["batch", "text length"],
                  "parity": parity}
        out_config = {**config, "format": ONNX_FORMAT, "onnx": record}
        write_json_atomic(tmp / "config.json", out_config)
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        write_json_atomic(tmp / MANIFEST, {"format": ONNX_FORMAT, "sha256": sums})
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_path(tmp)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: parity vs torch fp32 min cosine {parity['min_cosine']:.7f} over {parity['products']} "
        f"probe products (batches {parity['batch_sizes']}, text lengths {parity['text_lengths']})")
    return record


def _batch_tensor(batch: Batch, name: str) -> torch.Tensor:
    return {"input_ids": batch.input_ids, "text_mask": batch.text_mask, "images": batch.images,
            "has_image": batch.has_image, "has_text": batch.has_text}[name]


def _check_parity(folder: Path, reference: ItemEncoder, batches: list[Batch], min_cosine: float) -> dict[str, Any]:
    """Run the graphs in ``folder`` on ``batches`` and compare with ``reference`` (torch fp32)."""
    device, threads = torch.device("cpu"), torch.get_num_threads()
    try:
        sessions = {True: _session(folder / JOINT_GRAPH, device, threads),
                    False: _session(folder / TEXT_GRAPH, device, threads)}
    except Exception as e:
        raise OnnxExportError(f"onnxruntime cannot load the exported graphs ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    worst, worst_abs = 1.0, 0.0
    for batch in batches:
        joint = batch.images is not None
        try:
            got = sessions[joint].run([OUTPUT], _feeds(batch, JOINT_INPUTS if joint else TEXT_INPUTS))[0]
        except Exception as e:
            raise OnnxExportError(f"onnxruntime fails on a batch of {len(batch)} x {batch.input_ids.shape[1]} tokens "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        want = reference._encode_batch(batch)
        if got.shape != want.shape:
            raise OnnxExportError(f"the {'joint' if joint else 'text'} graph gives {got.shape}, torch {want.shape}")
        cos = row_cosines(want, got)
        worst, worst_abs = min(worst, float(cos.min())), max(worst_abs, float(np.abs(want - got).max()))
        if not np.all(cos >= min_cosine):
            raise OnnxExportError(f"the {'joint' if joint else 'text'} graph does not reproduce torch fp32: cosine "
                                  f"{float(cos.min()):.6f} < {min_cosine} on a batch of {len(batch)} x "
                                  f"{batch.input_ids.shape[1]} tokens")
    return {"min_cosine": worst, "max_abs_diff": worst_abs, "threshold": min_cosine,
            "products": sum(len(b) for b in batches), "batch_sizes": sorted({len(b) for b in batches}),
            "text_lengths": sorted({int(b.input_ids.shape[1]) for b in batches})}
