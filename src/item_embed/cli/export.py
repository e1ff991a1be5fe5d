"""Subcommand ``export-onnx``: a trained model as ONNX graphs with its preprocessing, for onnxruntime
(``ItemEncoder.from_pretrained(DIR, backend="onnx")``)."""

from __future__ import annotations

import argparse
import sys

from .common import add_command

# onnx_export.OPSET and PARITY_MIN_COSINE (not imported here: building the parser stays light).
OPSET, PARITY_MIN_COSINE = 18, 0.9999


def cmd_export_onnx(a: argparse.Namespace) -> int:
    from ..onnx_export import export_onnx

    try:
        record = export_onnx(a.model, a.out, opset=a.opset, min_cosine=a.min_cosine)
    except ImportError as e:
        print(f"item-embed export-onnx: error: {e}", file=sys.stderr)
        return 2
    print(f"model id {record['model_id']} (the source's: its indexes and embedding files accept this export's "
          f"embeddings); load it with ItemEncoder.from_pretrained({str(a.out)!r}, backend='onnx')")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = add_command(sub, "export-onnx", "export a trained model to ONNX (onnxruntime inference)",
                    description="Export a trained model to ONNX: the whole product embedding (text and image "
                                "inputs, dynamic batch and text length) with its tokenizer and preprocessing "
                                "config, checked against torch fp32 before the folder is written. Needs the "
                                "onnx extra: pip install 'item-embed[onnx]'.")
    e.add_argument("model", help="run folder of a trained model (config.json, model.safetensors, tokenizer)")
    e.add_argument("--out", required=True, help="folder to write (replaced in one step if it exists)")
    e.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (17 or later)")
    e.add_argument("--min-cosine", type=float, default=PARITY_MIN_COSINE,
                   help="fail unless every probe embedding matches torch fp32 at least this closely")
    e.set_defaults(func=cmd_export_onnx)
