"""What the subcommands share: the help format, catalog and precision options, opening a catalog,
the row report, and training data from a catalog or a preprocessing cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import PRECISIONS, PRESETS, model_config_for
from ..data.catalog import Catalog, CatalogReport, Columns
from ..data.remote import FetchOptions
from ..runtime import is_main_process


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return sub.add_parser(name, help=help, description=kwargs.pop("description", help),
                          formatter_class=HelpFormatter, **kwargs)


CATALOG_HELP = ("catalog: a .csv, .tsv, .jsonl or .parquet file (a path, or a URI: s3://, gs://, https://, file://), "
                "or WebDataset .tar shards (brace patterns: 'shard-{000000..000099}.tar'); one product per row")


def add_catalog_args(p: argparse.ArgumentParser, what: str = CATALOG_HELP) -> None:
    p.add_argument("catalog", help=what)
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("catalog columns")
    g.add_argument("--image-root", help="folder or URI that relative image paths start from (default: the catalog's "
                                        "folder)")
    g.add_argument("--id-column", default="id", help="column of the unique product id")
    g.add_argument("--title-column", default="title", help="column of the title")
    g.add_argument("--image-column", default="image", help="column of the image (path or encoded bytes)")
    g.add_argument("--description-column", default="description",
                   help="column of the description (read when the model is trained with --use-description)")
    r = p.add_argument_group("remote images (http(s)://, s3://, gs:// in the image column or under a remote root; "
                             "credentials come from the environment and the standard config files)")
    r.add_argument("--fetch-workers", type=int, default=FetchOptions.workers, help="images fetched at once")
    r.add_argument("--fetch-timeout", type=float, default=FetchOptions.timeout, help="seconds for one try of one image")
    r.add_argument("--fetch-retries", type=int, default=FetchOptions.retries,
                   help="further tries after a timeout, a dropped connection or HTTP 408/429/5xx (with backoff)")


def add_precision_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--precision``: one meaning in every verb (``runtime.resolve_precision``)."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the hardware multiplies bf16 natively (AMX / AVX512-BF16 CPUs, bf16 "
                        "GPUs), else fp32; the choice made is recorded in the output")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def open_catalog(a: argparse.Namespace) -> Catalog:
    cols = Columns(id=a.id_column, title=a.title_column, image=a.image_column, description=a.description_column)
    if a.fetch_workers < 1 or a.fetch_retries < 0 or a.fetch_timeout <= 0:
        raise ValueError("--fetch-workers must be >= 1, --fetch-retries >= 0 and --fetch-timeout > 0")
    fetch = FetchOptions(workers=a.fetch_workers, timeout=a.fetch_timeout, retries=a.fetch_retries)
    return Catalog.open(a.catalog, cols, a.image_root, fetch=fetch)


def catalog_label(location: str) -> str:
    """How a run records where its catalog was: an absolute path, or a URI without credentials."""
    from ..data.remote import is_uri, redact

    return redact(location) if is_uri(location) else str(Path(location).resolve())


def finish_report(report: CatalogReport, out_dir: Path, name: str) -> None:
    """Check that every row is accounted for, write the row report and print its summary."""
    report.check_accounting()
    path = report.write(out_dir / name)
    print(report.summary())
    print(f"row report: {path}")


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation, one column per metric."""
    lines = []
    for name, metrics in results.items():
        cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        lines.append(f"{name:<24} " + "  ".join(cells))
    return "\n".join(lines)


def model_config(a: argparse.Namespace, cache_meta: dict | None = None):
    """The model config from --preset and the shape options (a cache's preprocessing fills gaps)."""
    from ..model.encoder import minilm_model_config

    shape_dims = getattr(a, "shape_dims", None)
    shape = dict(image_size=a.image_size, patch_size=getattr(a, "patch_size", None), max_text_len=a.max_text_len,
                 use_description=a.use_description or None, image_stem=getattr(a, "image_stem", None),
                 shape_dims=PRESETS[a.preset].get("shape_dims", 0) if shape_dims is None else shape_dims,
                 shape_weight=getattr(a, "shape_weight", None))
    backbone = getattr(a, "image_backbone", None)
    if backbone:
        from ..model.backbone import describe_backbone

        size = shape["image_size"] or (cache_meta or {}).get("image_size") or 224
        shape.update(describe_backbone(backbone, size), image_size=size, image_stem=None)
    if cache_meta:
        for key in ("image_size", "max_text_len", "use_description"):
            if shape[key] is not None and shape[key] != cache_meta[key]:
                raise ValueError(f"the cache was prepared with {key}={cache_meta[key]}, not {shape[key]}: "
                                 "run `item-embed prepare` again with that setting")
            shape[key] = cache_meta[key]
    if a.preset == "minilm":
        return minilm_model_config(**{k: v for k, v in shape.items() if v is not None})
    return model_config_for(a.preset, **shape)


def load_training_data(a: argparse.Namespace, tokenizer):
    """(ProductArrays, ModelConfig, row report or None) from a preprocessing cache or a catalog file."""
    from ..data.arrays import ProductArrays
    from ..data.cache import is_cache, load_cache

    t0 = time.perf_counter()
    if is_cache(a.catalog):
        data, meta = load_cache(a.catalog)
        if is_main_process():
            print(f"using the preprocessing cache {a.catalog}: {len(data)} products "
                  f"(its row report: {Path(a.catalog) / 'catalog_report.json'})")
        return data, model_config(a, meta), None
    cfg = model_config(a)
    report = CatalogReport()
    products = open_catalog(a).load_all(cfg.image_size, use_description=cfg.use_description,
                                        strict=a.strict, report=report)
    data = ProductArrays.build(products, tokenizer, cfg.max_text_len, cfg.image_size)
    if is_main_process():
        print(f"prepared {len(data)} products in {time.perf_counter() - t0:.1f}s")
    return data, cfg, report
