"""Artefact measures (FusionINNLib.metrics.artefacts) and the gradient loss (losses.gradient_loss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from FusionINNLib.core.losses import gradient_loss, max_abs_gradient_target
from FusionINNLib.metrics.artefacts import (
    background_mask,
    checkerboard_ratio,
    diagonal_detail_share,
    haar_details,
    hot_background_fraction,
)


def smooth_image(seed: int, shape=(64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 3.0)


def test_haar_details_of_known_blocks():
    block = np.array([[1.0, 2.0], [3.0, 4.0]])
    h, v, d = haar_details(block)
    assert h[0, 0, 0] == pytest.approx((1 + 2 - 3 - 4) / 2)
    assert v[0, 0, 0] == pytest.approx((1 - 2 + 3 - 4) / 2)
    assert d[0, 0, 0] == pytest.approx((1 - 2 - 3 + 4) / 2)
    # orthonormal: detail energy + approximation energy = image energy
    approx = block.sum() / 2
    assert approx**2 + h[0, 0, 0] ** 2 + v[0, 0, 0] ** 2 + d[0, 0, 0] ** 2 == pytest.approx((block**2).sum())


def test_diagonal_share_of_pure_checkerboard_noise_and_smooth_image():
    rows, cols = np.indices((32, 32))
    checker = ((rows + cols) % 2).astype(float)
    assert diagonal_detail_share(checker) == pytest.approx(1.0)
    noise = np.random.default_rng(0).standard_normal((256, 256))
    assert diagonal_detail_share(noise) == pytest.approx(1 / 3, abs=0.02)
    assert diagonal_detail_share(smooth_image(1)) < 0.05


def test_checkerboard_ratio_detects_added_pattern_and_respects_mask():
    s1, s2 = smooth_image(2), smooth_image(3)
    mean = (s1 + s2) / 2
    assert checkerboard_ratio(s1, s2, mean) == pytest.approx(1.0, abs=0.15)
    rows, cols = np.indices(s1.shape)
    pattern = 0.01 * (((rows + cols) % 2) * 2 - 1)
    checkered = mean + pattern
    assert checkerboard_ratio(s1, s2, checkered) > 3.0
    # the pattern only outside the mask is not counted
    mask = np.zeros(s1.shape, bool)
    mask[:, :32] = True
    outside_only = mean + np.where(mask, 0.0, pattern)
    assert checkerboard_ratio(s1, s2, outside_only, mask=mask) == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ValueError, match="shapes differ"):
        checkerboard_ratio(s1, s2, mean[:10])


def test_hot_background_fraction_and_background_mask():
    v1 = np.zeros((2, 10, 10))
    v2 = np.zeros((2, 10, 10))
    v1[:, 3:7, 3:7] = 5.0
    v2[:, 4:8, 4:8] = 2.0
    background = background_mask(v1, v2)
    assert background.sum() == 2 * (100 - 16 - 16 + 9)
    fused = np.zeros_like(v1)
    fused[0, 0, 0] = 0.5  # one hot background voxel
    fused[0, 5, 5] = 0.9  # brain: not counted
    assert hot_background_fraction(fused, background) == pytest.approx(1 / background.sum())
    assert np.isnan(hot_background_fraction(fused, np.zeros_like(background)))


def test_gradient_loss_prefers_the_stronger_edge_of_each_source():
    # source 1 and source 2 each have a bright quadrant (disjoint edges): the mean halves every
    # edge, the fused image x1 + x2 keeps both at full strength and has zero gradient loss.
    x1 = torch.zeros(1, 1, 16, 16)
    x1[..., :8, 8:] = 1.0
    x2 = torch.zeros(1, 1, 16, 16)
    x2[..., 8:, :8] = 1.0
    sources = torch.cat([x1, x2], dim=1)
    target_x, target_y = max_abs_gradient_target(sources)
    assert float(target_x.abs().sum()) == 16 and float(target_y.abs().sum()) == 16
    assert float(gradient_loss(x1 + x2, sources)) == 0.0
    assert float(gradient_loss(sources.mean(1, keepdim=True), sources)) > 0.01
    # where both sources have an edge the larger one wins, with its sign
    strong, weak = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    strong[..., :, 2:] = -1.0
    weak[..., :, 2:] = 0.5
    target_x, _ = max_abs_gradient_target(torch.cat([weak, strong], dim=1))
    assert float(target_x[0, 0, 0, 1]) == -1.0
    assert float(gradient_loss(x1, torch.cat([x1, x1], dim=1))) == 0.0
    # a checkerboard on a flat region costs
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = 0.01 * ((rows + cols) % 2).float()[None, None]
    flat = torch.full((1, 2, 16, 16), 0.5)
    assert float(gradient_loss(0.5 + checker, flat)) == pytest.approx(0.01)
    # gradients reach the fused image
    fused = sources.mean(1, keepdim=True).requires_grad_(True)
    gradient_loss(fused, sources).backward()
    assert fused.grad is not None and float(fused.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        gradient_loss(sources, sources)


def test_block_boundary_ratio_sees_a_2x2_block_pattern():
    from FusionINNLib.metrics.artefacts import block_boundary_ratio

    s1, s2 = smooth_image(4), smooth_image(5)
    mean = (s1 + s2) / 2
    assert block_boundary_ratio(s1, s2, mean) == pytest.approx(1.0, abs=0.1)
    # nearest-neighbour upsampling of a half-resolution image: constant 2x2 blocks, all change at
    # block boundaries
    blocky = np.repeat(np.repeat(mean[::2, ::2], 2, axis=0), 2, axis=1)
    assert block_boundary_ratio(s1, s2, blocky) > 10
    # shifting by one pixel moves the blocks off the squeeze grid: the ratio falls below 1
    assert block_boundary_ratio(s1, s2, np.roll(blocky, 1, axis=(0, 1))) < 0.2
