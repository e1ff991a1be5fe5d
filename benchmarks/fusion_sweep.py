"""How much image can one embedding hold before it loses the title's precision? A sweep of late fusion.

``[minilm(text), w * image]`` (L2-normalised; image = the ``hog`` or ``pixels16`` baseline, each
unit-length) on hm-dev for several weights w: joint R@1, image-only query R@1 (blank text beside the
photo, as BENCHMARKS.md's protocol; and, for comparison, with the text part of the query left at zero)
and the product_type linear probe. It shows the shape the issue-7
targets ask of an embedding (a title part and a colour-free shape part) and what the weight costs;
``--baselines fusion_hog`` in ``item-embed evaluate`` is the w = 0.5 point. Needs ../shared/data.

    python benchmarks/fusion_sweep.py [--weights 0.2,0.3,0.5,0.7,1.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from item_embed.baselines import make_baselines  # noqa: E402
from item_embed.evaluate import RawProducts, l2_normalise, linear_probe, retrieval_metrics, split_test_mask  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="0.2,0.3,0.5,0.7,1.0")
    a = ap.parse_args()
    path = C.SHARED_DATA / "hm-dev.parquet"
    if not path.exists():
        print(f"skipped: {path} not found")
        return 0
    frame = pd.read_parquet(path)
    products = RawProducts.from_frame(frame)
    feats = {f.name: f for f in make_baselines(["minilm", "pixels16", "hog"])}
    for f in feats.values():
        if hasattr(f, "fit"):
            f.fit(products)
    groups, labels = frame["group"].values, frame["product_type"].values
    test = split_test_mask(groups)
    text = {m: feats["minilm"].embed(products, m) for m in ("joint", "image")}
    rows = []
    for image in ("hog", "pixels16"):
        pic = {m: feats[image].embed(products, m) for m in ("joint", "image")}
        for w in (float(x) for x in a.weights.split(",")):
            joint = l2_normalise(np.hstack([text["joint"], w * pic["joint"]]))
            photo = l2_normalise(np.hstack([text["image"], w * pic["image"]]))
            photo_zero = l2_normalise(np.hstack([np.zeros_like(text["image"]), w * pic["image"]]))
            rows.append([f"minilm + {w:g} x {image}", f"{retrieval_metrics(joint, joint, groups)['R@1']:.3f}",
                         f"{retrieval_metrics(photo, joint, groups)['R@1']:.3f}",
                         f"{retrieval_metrics(photo_zero, joint, groups)['R@1']:.3f}",
                         f"{linear_probe(joint, labels, test)['accuracy']:.3f}"])
    print(C.markdown_table(["features (hm-dev)", "joint R@1", "image-only R@1 (blank text)",
                            "image-only R@1 (zero text part)", "product_type linear"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
