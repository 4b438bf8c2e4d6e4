"""Training losses: fidelity terms, latent losses (the inert reference MMD and the working ones),
MMIF-AMIN adaptive weights, prior sampling."""
from __future__ import annotations

import math

import pytest
import torch

from FusionINNLib.core import losses as L


def _smooth_images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 2, size // 4, size // 4, generator=generator)
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def test_fusion_loss_is_zero_for_a_perfect_fusion_and_follows_lambda_and_weights():
    x = _smooth_images(3)
    same = torch.cat([x[:, :1], x[:, :1]], dim=1)
    terms = L.fusion_loss(x[:, :1], same)
    assert float(terms.total) == pytest.approx(0.0, abs=1e-6)

    # With all weight on source 1, fusing exactly source 1 costs nothing whatever source 2 is.
    only_first = L.fusion_loss(x[:, :1], x, lam=0.8, ssim_weights=(1.0, 0.0))
    assert float(only_first.total) == pytest.approx(0.0, abs=1e-6)

    y = x.mean(dim=1, keepdim=True)
    terms = L.fusion_loss(y, x, lam=0.8)
    assert float(terms.ssim) > 0 and float(terms.l2) > 0
    assert float(terms.total) == pytest.approx(0.8 * float(terms.ssim) + 0.2 * float(terms.l2), rel=1e-6)
    # l2 is the weighted mean squared error: 0.5 * mse(y, x1) + 0.5 * mse(y, x2)
    expected_l2 = 0.5 * float(((y - x[:, :1]) ** 2).mean()) + 0.5 * float(((y - x[:, 1:]) ** 2).mean())
    assert float(terms.l2) == pytest.approx(expected_l2, rel=1e-5)
    assert float(L.fusion_loss(y, x, lam=1.0).total) == pytest.approx(float(terms.ssim), rel=1e-6)


def test_decomposition_loss_compares_channel_by_channel():
    x = _smooth_images(2)
    assert float(L.decomposition_loss(x.clone(), x).total) == pytest.approx(0.0, abs=1e-6)
    swapped = x.flip(1)
    assert float(L.decomposition_loss(swapped, x).total) > 0.05


def test_fidelity_losses_reject_bad_shapes_and_settings():
    x = _smooth_images(2)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        L.fusion_loss(x, x)
    with pytest.raises(ValueError, match="differ"):
        L.decomposition_loss(x[:, :1], x)
    with pytest.raises(ValueError, match="lambda"):
        L.fusion_loss(x[:, :1], x, lam=1.5)
    with pytest.raises(ValueError, match="at least 11"):
        L.fusion_loss(x[:, :1, :8, :8], x[:, :, :8, :8])
    with pytest.raises(ValueError, match="modality weights"):
        L.fusion_loss(x[:, :1], x, ssim_weights=(1.0, 0.0, 0.0))


def test_reference_mmd_on_image_sized_latents_is_inert():
    """The authors' MMD on flattened z stays ~6/B with a vanishing gradient, whatever z is."""
    batch = 4
    z = torch.randn(batch, 1, 96, 96, requires_grad=True)
    value = L.reference_mmd(z, generator=torch.Generator().manual_seed(0))
    value.backward()
    assert float(value.detach()) == pytest.approx(6.0 / batch, rel=1e-3)
    assert float(z.grad.abs().max()) < 1e-7
    far_from_prior = (torch.randn(batch, 1, 96, 96) * 5 + 3)
    assert float(L.reference_mmd(far_from_prior)) == pytest.approx(6.0 / batch, rel=1e-3)


def test_pixel_mmd_sees_the_distribution_and_its_gradient_moves_z_to_the_prior():
    generator = torch.Generator().manual_seed(1)
    good = torch.randn(4, 1, 32, 32, generator=generator)
    bad = good * 3 + 1
    assert float(L.pixel_mmd(good, generator=generator)) < 0.02
    assert float(L.pixel_mmd(bad, generator=generator)) > 0.1

    scale = torch.tensor(3.0, requires_grad=True)
    shift = torch.tensor(1.0, requires_grad=True)
    optimizer = torch.optim.Adam([scale, shift], lr=0.05)
    for _ in range(120):
        z = torch.randn(1, 1, 16, 16, generator=generator) * scale + shift
        optimizer.zero_grad()
        L.pixel_mmd(z, generator=generator, samples=256).backward()
        optimizer.step()
    assert abs(scale.item()) == pytest.approx(1.0, abs=0.25)
    assert shift.item() == pytest.approx(0.0, abs=0.25)


def test_patch_mmd_sees_spatial_correlation_that_pixel_mmd_cannot():
    generator = torch.Generator().manual_seed(2)
    white = torch.randn(8, 1, 32, 32, generator=generator)
    # Every pixel repeated 2x2: the same N(0, 1) marginal, but perfectly correlated neighbours.
    blocky = torch.nn.functional.interpolate(torch.randn(8, 1, 16, 16, generator=generator), scale_factor=2)
    assert float(L.pixel_mmd(blocky, generator=generator, patch=1)) < 0.02
    assert float(L.pixel_mmd(blocky, generator=generator, patch=2)) > 5 * float(
        L.pixel_mmd(white, generator=generator, patch=2))


def test_moment_loss_values():
    constant = torch.full((2, 1, 16, 16), 2.0)
    assert float(L.moment_loss(constant)) == pytest.approx(2.0**2 + 1.0)
    assert float(L.moment_loss(constant, prior="ones")) == pytest.approx(1.0)
    uniform = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    assert float(L.moment_loss(uniform, prior="uniform")) < 1e-3


def test_latent_loss_dispatch_and_errors():
    z = torch.randn(2, 1, 16, 16)
    assert float(L.latent_loss("none", z)) == 0.0
    assert float(L.latent_loss("moments", z)) == pytest.approx(float(L.moment_loss(z)))
    with pytest.raises(ValueError, match="unknown latent loss"):
        L.latent_loss("kl", z)
    with pytest.raises(ValueError, match="unknown latent prior"):
        L.latent_loss("moments", z, prior="laplace")


def test_sample_prior_distributions():
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(L.sample_prior("zeros", (2, 3)), torch.zeros(2, 3))
    assert torch.equal(L.sample_prior("ones", (2, 3)), torch.ones(2, 3))
    uniform = L.sample_prior("uniform", (10000,), generator)
    assert float(uniform.min()) >= 0.0 and float(uniform.max()) < 1.0
    normal = L.sample_prior("normal", (10000,), generator)
    assert float(normal.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(normal.std()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError):
        L.sample_prior("cauchy", (2,))


def test_average_gradient_and_entropy_definitions():
    ramp = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None] * 0.01  # slope 0.01 along x
    assert float(L.average_gradient(ramp)) == pytest.approx(0.01 / math.sqrt(2), rel=1e-4)
    levels = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 255.0
    assert float(L.image_entropy(levels)) == pytest.approx(8.0, abs=1e-4)
    assert float(L.image_entropy(torch.full((1, 1, 16, 16), 0.3))) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_weights_favour_the_sharper_and_richer_source():
    x = _smooth_images(3, size=64)
    x[:, 1] = 0.5 + 0.1 * (x[:, 1] - 0.5)  # source 2: same layout, a tenth of the contrast
    ssim_w, l2_w = L.adaptive_weights(x)
    assert ssim_w.shape == (3, 2) and l2_w.shape == (3, 2)
    assert torch.allclose(ssim_w.sum(dim=1), torch.ones(3))
    assert torch.all(ssim_w[:, 0] > 0.8)
    assert torch.all(l2_w[:, 0] > l2_w[:, 1])
    flat = torch.full((2, 2, 16, 16), 0.5)
    ssim_flat, _ = L.adaptive_weights(flat)
    assert torch.allclose(ssim_flat, torch.full((2, 2), 0.5))


def test_piella_loss_is_one_minus_the_q_p_metric_and_follows_the_source_with_structure():
    import numpy as np
    from scipy import ndimage

    from FusionINNLib import metrics

    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.random((48, 64)), 2).astype(np.float32)
    b = ndimage.gaussian_filter(rng.random((48, 64)), 1).astype(np.float32)
    a[:16] = 0.0  # flat in source 1 only: there source 2 carries the structure
    b[:, :8] = 0.0
    sources = torch.from_numpy(np.stack([a, b]))[None]
    for f in (0.6 * a + 0.4 * b, np.maximum(a, b), a):
        fused = torch.from_numpy(f.astype(np.float32))[None, None]
        loss = L.piella_loss(fused, sources)
        assert math.isclose(1.0 - loss.item(), metrics.q_p(a, b, f, data_range=1.0), abs_tol=2e-5)
    # with two equal sources it is plain SSIM: pytorch-msssim's window, constants and valid positions
    from pytorch_msssim import ssim

    twin = torch.from_numpy(np.stack([a, a]))[None]
    fused = torch.from_numpy((0.7 * a + 0.3 * b).astype(np.float32))[None, None]
    assert math.isclose(1.0 - L.piella_loss(fused, twin).item(), ssim(fused, twin[:, :1], data_range=1.0).item(),
                        abs_tol=1e-5)
    # The local weights follow the structure: a fused image that keeps source 2 where source 1 is
    # flat beats one that keeps source 1 everywhere.
    keep = torch.from_numpy(np.where(a == 0, b, a))[None, None]
    assert L.piella_loss(keep, sources) < L.piella_loss(sources[:, :1], sources)
    # differentiable in the fused image
    fused = torch.from_numpy(0.5 * (a + b))[None, None].requires_grad_(True)
    L.piella_loss(fused, sources).backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="11x11"):
        L.piella_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="need fused"):
        L.piella_loss(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16))
