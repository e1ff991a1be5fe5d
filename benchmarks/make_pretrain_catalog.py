"""Write the pre-training catalog of the quality benchmarks: the images and titles (and H&M
descriptions) of both real catalogs, no labels, ids prefixed by their source.

    python benchmarks/make_pretrain_catalog.py OUT.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(out: str) -> None:
    parts = []
    for name, prefix in (("hm-dev", "hm:"), ("fashion-small", "fs:")):
        frame = pd.read_parquet(DATA / f"{name}.parquet")
        keep = pd.DataFrame({"id": prefix + frame["id"].astype(str), "title": frame["title"], "image": frame["image"]})
        keep["description"] = frame["description"] if "description" in frame else None
        parts.append(keep)
    combined = pd.concat(parts, ignore_index=True)
    combined.to_parquet(out)
    print(f"{len(combined)} products -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
