"""Random photo views for the image-view contrastive term."""

from __future__ import annotations

import pytest
import torch

from item_embed.augment import ViewPolicy, random_views

IDENTITY = ViewPolicy(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=0.0, jitter=0.0, grey=0.0)


def _photos(b: int = 4, s: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g)


def test_views_keep_shape_and_dtype_and_differ():
    x = _photos()
    v = random_views(x, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.dtype == torch.uint8
    assert not torch.equal(v, x)


def test_views_are_reproducible_from_the_generator():
    x = _photos()
    a = random_views(x, torch.Generator().manual_seed(3))
    b = random_views(x, torch.Generator().manual_seed(3))
    c = random_views(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_policy_that_changes_nothing_returns_the_photo():
    x = _photos()
    v = random_views(x, torch.Generator().manual_seed(0), IDENTITY)
    assert (v.int() - x.int()).abs().max() <= 1  # one bilinear resample at the same grid, rounding only


def test_flip_mirrors_the_photo():
    x = _photos()
    policy = ViewPolicy(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=1.0, jitter=0.0, grey=0.0)
    v = random_views(x, torch.Generator().manual_seed(0), policy)
    assert (v.int() - x.flip(2).int()).abs().max() <= 1


def test_crop_zooms_into_the_photo():
    """Stripes 2 px wide change 15 times across a 32-px row; a quarter-area crop shows half the row
    stretched to the whole view, so about half as many changes, and keeps the stripes vertical."""
    x = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    x[:, :, (torch.arange(32) // 2) % 2 == 1] = 255
    policy = ViewPolicy(crop_area=(0.25, 0.25), crop_aspect=(1.0, 1.0), flip=0.0, jitter=0.0, grey=0.0)
    v = random_views(x, torch.Generator().manual_seed(0), policy)

    def changes(row: torch.Tensor) -> int:
        bright = row > 127
        return int((bright[1:] != bright[:-1]).sum())

    assert changes(x[0, 16, :, 0]) == 15
    assert 6 <= changes(v[0, 16, :, 0]) <= 9
    assert torch.equal(v[0, :, :, 0], v[0, :1, :, 0].expand(32, 32))


def test_greyscale_views_have_equal_channels():
    x = _photos(b=8)
    policy = ViewPolicy(crop_area=(1.0, 1.0), jitter=0.0, flip=0.0, grey=1.0)
    v = random_views(x, torch.Generator().manual_seed(0), policy)
    assert (v[..., 0].int() - v[..., 1].int()).abs().max() <= 1
    assert (v[..., 1].int() - v[..., 2].int()).abs().max() <= 1


def test_hue_rotation_changes_colour_but_keeps_luminance():
    """Full-circle hue: a red square can come out green or blue, its brightness (luma) unchanged."""
    x = torch.zeros(64, 16, 16, 3, dtype=torch.uint8)
    x[..., 0] = 180
    x[..., 1] = 60
    x[..., 2] = 60
    policy = ViewPolicy(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip=0.0, jitter=1.0, brightness=0.0,
                        contrast=0.0, saturation=0.0, hue=0.5, grey=0.0)
    v = random_views(x, torch.Generator().manual_seed(0), policy).float()
    luma = lambda t: 0.299 * t[..., 0] + 0.587 * t[..., 1] + 0.114 * t[..., 2]  # noqa: E731
    # Clipping to [0, 255] can move luma where a rotated colour leaves the RGB cube; most stay close.
    close = (luma(v) - luma(x.float())).abs().amax(dim=(1, 2)) < 4
    assert close.float().mean() > 0.5
    dominant = v[:, 8, 8].argmax(-1)
    assert set(dominant.tolist()) >= {0, 1, 2}, "hue never moved the dominant channel off red"


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        random_views(torch.zeros(2, 8, 8, 3), torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        random_views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.Generator())
