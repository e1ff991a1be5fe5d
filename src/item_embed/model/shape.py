"""The shape slice: a colour-free photo descriptor appended to ITEm's ``[CLS]`` embedding.

A product's embedding is ``normalise([cls, w * shape])``: ``cls`` the unit ``[CLS]`` state
(ITEm's embedding), ``shape`` a unit, whitened descriptor of the photo's gradients, ``w`` small
(``ModelConfig.shape_weight``). A photo-only input (no title, no description) keeps only its
shape part; a text-only input only its ``[CLS]`` part.

Why (docs/ablations.md): trained from scratch on a CPU budget, the image side of
the transformer never learns a photo embedding that finds a product's colour variants (best
image-only query R@1 on hm-dev 0.18, at a joint R@1 of 0.42), and the photo-only ``[CLS]`` of the
default recipe has collapsed to one vector for every photo. The histograms of oriented gradients
of the 96-px photo find them at 0.43 (the ``hog`` baseline), 0.46 square-rooted and whitened
(0.425 in the model, whose photos are padded to a square before resizing).
Because a photo query's ``[CLS]`` part is zero and every gallery product has the same norm,
photo queries rank by the shape slice alone for any ``w`` > 0; a small ``w`` keeps the
product-to-product and title-query rankings those of ``[CLS]``.

The whitening (mean and the top principal directions, each scaled to unit variance) is fitted
without labels on the training catalog's photos at the end of ``train``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import HOG_BINS, HOG_CELLS, patch_hog

# Eigenvalue floor, as a fraction of the largest standard deviation: the weakest directions are
# mostly noise and would dominate the whitened descriptor (0.01 measured best of 0, 0.01, 0.1).
WHITEN_EPS = 0.01
# Photos the whitening is fitted on at most (evenly spaced over the catalog): 1,296 dimensions
# need a few tens of thousands of samples, not a whole large catalog.
FIT_MAX_PHOTOS = 100_000
FIT_BATCH = 512


def descriptor_dim(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2 * HOG_CELLS * HOG_CELLS * HOG_BINS


def shape_descriptor(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, D): every patch's luminance HOG (``images.patch_hog``),
    square-rooted (the Hellinger map of RootSIFT: a few strong edges no longer outweigh the rest)."""
    return patch_hog(images, patch_size).flatten(1).clamp_min(0).sqrt()


class ShapeSlice(nn.Module):
    """Whitened shape descriptor of a photo: (B, S, S, 3) uint8 -> (B, dims) unit rows.

    Buffers (saved with the weights): ``mean`` (D,), ``proj`` (D, dims) and ``photos``, the number of
    photos it was fitted on (0 = not fitted: every output row is zero)."""

    def __init__(self, image_size: int, patch_size: int, dims: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        d = descriptor_dim(image_size, patch_size)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("proj", torch.zeros(d, dims))
        self.register_buffer("photos", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return int(self.photos) > 0

    def forward(self, images: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # whitening needs fp32
            x = (shape_descriptor(images, self.patch_size) - self.mean) @ self.proj
            x = F.normalize(x, dim=-1)
        if has_image is not None:
            x = x * has_image.to(x.dtype).unsqueeze(1)
        return x

    @torch.no_grad()
    def fit(self, images, rows: np.ndarray | None = None, max_photos: int = FIT_MAX_PHOTOS) -> int:
        """Fit mean and whitening on ``images[rows]`` (an indexable of uint8 (S, S, 3) arrays, e.g.
        ``ProductArrays.images``; rows: those with a photo), at most ``max_photos`` of them evenly
        spaced. Returns the number of photos used, 0 (and stays unfitted) when they all have the same
        descriptor."""
        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        if len(rows) > max_photos:
            rows = rows[np.linspace(0, len(rows) - 1, max_photos).round().astype(np.int64)]
        return self.fit_batches(np.ascontiguousarray(images[rows[start : start + FIT_BATCH]])
                                for start in range(0, len(rows), FIT_BATCH))

    @torch.no_grad()
    def fit_batches(self, batches: Iterable[np.ndarray | torch.Tensor]) -> int:
        """Fit on a stream of uint8 (B, S, S, 3) photo batches in one pass, holding one batch at a time
        (a catalog too large for memory streams through here). Returns as :meth:`fit`.

        With fewer photos than dimensions the directions past the sample's rank get zero columns (a
        tiny catalog cannot estimate them), so the embedding keeps its size."""
        d, dims = self.proj.shape
        total = torch.zeros(d, dtype=torch.float64)
        outer = torch.zeros(d, d, dtype=torch.float64)
        n = 0
        for batch in batches:
            if len(batch) == 0:
                continue
            x = shape_descriptor(torch.as_tensor(batch), self.patch_size).double()
            total += x.sum(0)
            outer += x.T @ x
            n += len(x)
        if n < 2:
            raise ValueError(f"the shape slice needs at least 2 photos to fit, got {n}")
        mean = total / n
        cov = outer / n - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        # Directions with (numerically) no variance are left out: nothing to whiten there.
        keep = min(dims, n - 1, d, int((evals > 1e-10 * evals[0]).sum()))
        if keep == 0:  # every photo has the same descriptor: nothing to tell photos apart by
            return 0
        std = evals[:keep].sqrt()
        proj = torch.zeros(d, dims, dtype=torch.float64)
        proj[:, :keep] = evecs[:, :keep] / (std + WHITEN_EPS * std[0])
        self.mean.copy_(mean.float())
        self.proj.copy_(proj.float())
        self.photos.fill_(n)
        return n
