"""Training objectives of FusionINN (Kumar et al., arXiv 2403.15769, §2) and the options around them.

Notation: a batch of B source pairs x = (x₁, x₂), each (B, 1, H, W) in normalized units (≈ [0, 1]);
the flow gives [u, z] = f(x), the fused image y = σ(u), and the decomposition
x̂ = f⁻¹(u, z′) with a *fresh* latent z′ drawn from the prior.

Fusion loss (paper eq. 3–5, weights as in the authors' code)::

    L_SSIM   = Σ_k w_k (1 − SSIM(y, x_k))
    L_ℓ2     = Σ_k v_k ‖y − x_k‖²  (mean over pixels, i.e. MSELoss)
    L_fusion = λ L_SSIM + (1 − λ) L_ℓ2                     w = v = (0.5, 0.5), λ = 0.8

Decomposition loss: the same mix between x̂_k and x_k (weights fixed at the modality weights; the
adaptive MMIF-AMIN weights only apply to fusion, because both sources must be recovered)::

    L_dec = λ Σ_k w_k (1 − SSIM(x̂_k, x_k)) + (1 − λ) Σ_k w_k ‖x̂_k − x_k‖²

Total: ``L = α (L_fusion + γ L_grad + δ L_P + β L_latent) + (1 − α) L_dec`` (α = 0.5; β = 1 is
the paper's, the training default is β = 0.1 with ``pixel_mmd``, chosen by measurement, see
``docs/training.md``; the edge and local-weight terms below are off by default, γ = δ = 0, and the
bundled model's values are in ``docs/models.md``).

SSIM is Wang et al. (2004) with an 11-tap Gaussian window (σ = 1.5), K₁ = 0.01, K₂ = 0.03 and
data range 1, computed per image by ``pytorch_msssim`` over the valid window positions.

Latent losses (what pushes q(z) towards the prior p(z)):

``reference_mmd``
    The authors' multi-scale inverse-multiquadric MMD between the batch of *flattened* latents
    {zᵢ ∈ ℝⁿ} and a batch of prior draws {ẑᵢ}::

        k(a, b) = Σ_{h ∈ {0.05, 0.2, 0.9}} h² / (h² + ‖a − b‖²)
        MMD²    = mean_ij k(zᵢ, zⱼ) + mean_ij k(ẑᵢ, ẑⱼ) − 2 mean_ij k(zᵢ, ẑⱼ)   (biased, diagonals kept)

    With n = 57 600 pixels every off-diagonal ‖a − b‖² is ≈ 2n, so all off-diagonal kernel values
    are ≈ 1e-6 and MMD² ≈ 6/B whatever z is: the loss is numerically inert (gradient ~1e-10). Kept
    only to reproduce the reference.
``pixel_mmd`` (default)
    The same kernel, but on the distribution of *pixel values* (or of non-overlapping p×p patches
    as p²-vectors): m pixels are drawn from the batch's z and compared with m prior draws. Under
    p(z) = N(0, I) every pixel (and every patch) of z must be N(0, 1) (resp. N(0, I_{p²})), so this
    is a necessary condition of the prior that the kernel can actually see: distances are O(1),
    the kernel widths fit, and the gradient reaches z. See ``docs/training.md`` for its measured
    effect on sampled-z decomposition.
``moments``
    Moment matching of the per-image pixel statistics to the prior's:
    (mean_i(z) − μ)² + (std_i(z) − s)², averaged over images (μ, s = 0, 1 for N(0, I)).
``none``
    No latent term.

Gradient (edge) loss, ``gradient_loss``: SSIM and ℓ2 against both sources are minimised near their
average, which halves every edge that only one source has (a T1-Gd enhancing rim, a FLAIR oedema
border). The gradient term asks each fused finite difference to match the *stronger* of the two
sources' differences (max-abs selection, sign kept), the edge target of many learned fusion methods
(e.g. Zhang et al., IFCNN/PMGI/SDNet family)::

    g*_d = Δ_d x_{k*},  k* = argmax_k |Δ_d x_k|     (d = horizontal, vertical forward differences)
    L_grad = mean |Δ_d y − g*_d|                      (mean over both directions and all pixels)

It also penalises 2×2 checkerboards (which have large differences in both directions where the
sources are flat), the artefact of a flow built on 2×2 squeezes.

Local-weight term, ``piella_loss``: the fixed-weight SSIM term asks for the same similarity to both
sources in every window, whereas in a window where only one source has structure (an enhancing rim
in T1-Gd, oedema in FLAIR) that source is the one to keep. Piella & Heijmans' index (ICIP 2003, the
Q_P of ``metrics.q_p``) weights each window by the sources' local variances; as a loss::

    λ_w = σ²_{x₁,w} / (σ²_{x₁,w} + σ²_{x₂,w})        (0.5 in windows flat in both sources)
    L_P = 1 − mean_w [λ_w SSIM_w(y, x₁) + (1 − λ_w) SSIM_w(y, x₂)]

over all valid 11×11 Gaussian windows (σ = 1.5), the same windows and constants as ``per_image_ssim``.

MMIF-AMIN adaptive weights (Luo & Xu): instead of hand-set modality weights, per image pair
w_k = AG(x_k) / Σ_j AG(x_j) for the SSIM terms and v_k = EN(x_k) / Σ_j EN(x_j) for the ℓ2 terms,
where AG is the average gradient and EN the Shannon entropy (see the functions below). The weights
are computed from the sources only and carry no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _msssim_ssim

from .choices import DEFAULT_LATENT_LOSS, LATENT_LOSSES, PRIORS  # noqa: F401 - defined once, re-exported

REFERENCE_MMD_WIDTHS = (0.05, 0.2, 0.9)
SSIM_DATA_RANGE = 1.0
SSIM_WINDOW = (11, 1.5)  # Gaussian window (taps, σ) of pytorch_msssim's defaults, used by piella_loss too
# A window is flat in both sources below this total variance (data range 1): λ = 0.5 there, as
# metrics.q_p, because rounding noise over noise would make the weight arbitrary.
PIELLA_FLAT_VARIANCE = 1e-10
ENTROPY_BINS = 256

Weights = Union[Sequence[float], torch.Tensor]


@dataclass
class LossTerms:
    """Total of one fidelity loss and its two parts (each already a scalar tensor)."""

    total: torch.Tensor
    ssim: torch.Tensor
    l2: torch.Tensor


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_prior(prior: str) -> str:
    if prior not in PRIORS:
        raise ValueError(f"unknown latent prior {prior!r}; choose one of {', '.join(PRIORS)}")
    return prior


def check_latent_loss(name: str) -> str:
    if name not in LATENT_LOSSES:
        raise ValueError(f"unknown latent loss {name!r}; choose one of {', '.join(LATENT_LOSSES)}")
    return name


def per_image_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = SSIM_DATA_RANGE) -> torch.Tensor:
    """SSIM of each image pair, shape (B,), for single-channel (B, 1, H, W) images.

    H and W must be at least 11 (the Gaussian window). Computed in float32 even under autocast,
    because SSIM's variance terms lose all precision in float16.
    """
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"SSIM needs two (B, 1, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    return _msssim_ssim(a.float(), b.float(), data_range=data_range, size_average=False)


def _weights_tensor(weights: Weights, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Modality weights as a (B, 2) tensor from a pair of numbers or a (2,) / (B, 2) tensor."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=like.device)
    if w.ndim == 1:
        w = w.unsqueeze(0).expand(batch, -1)
    if w.shape != (batch, 2):
        raise ValueError(f"modality weights must have shape (2,) or ({batch}, 2), got {tuple(w.shape)}")
    return w


def fidelity_loss(estimate: torch.Tensor, targets: torch.Tensor, lam: float, ssim_weights: Weights,
                  l2_weights: Optional[Weights] = None) -> LossTerms:
    """λ Σ_k w_k (1 − SSIM(e_k, t_k)) + (1 − λ) Σ_k v_k mean((e_k − t_k)²), averaged over the batch.

    ``estimate`` is (B, 1, H, W) (the fused image, compared with both sources) or (B, 2, H, W)
    (a decomposition, channel k compared with source k); ``targets`` is (B, 2, H, W).
    ``l2_weights`` defaults to ``ssim_weights``.
    """
    lam = _check_fraction("lambda (SSIM share)", lam)
    if targets.ndim != 4 or targets.shape[1] != 2:
        raise ValueError(f"targets must be (B, 2, H, W), got {tuple(targets.shape)}")
    if estimate.shape[1] not in (1, 2) or estimate.shape[0] != targets.shape[0] or \
            estimate.shape[2:] != targets.shape[2:]:
        raise ValueError(f"estimate {tuple(estimate.shape)} does not match targets {tuple(targets.shape)}")
    batch = targets.shape[0]
    w = _weights_tensor(ssim_weights, batch, targets)
    v = w if l2_weights is None else _weights_tensor(l2_weights, batch, targets)
    ssim_terms = []
    l2_terms = []
    for k in range(2):
        e_k = estimate[:, :1] if estimate.shape[1] == 1 else estimate[:, k:k + 1]
        t_k = targets[:, k:k + 1]
        ssim_terms.append(1.0 - per_image_ssim(e_k, t_k))
        l2_terms.append((e_k.float() - t_k.float()).pow(2).mean(dim=(1, 2, 3)))
    ssim_loss = (w * torch.stack(ssim_terms, dim=1)).sum(dim=1).mean()
    l2_loss = (v * torch.stack(l2_terms, dim=1)).sum(dim=1).mean()
    return LossTerms(lam * ssim_loss + (1.0 - lam) * l2_loss, ssim_loss, l2_loss)


def fusion_loss(fused: torch.Tensor, sources: torch.Tensor, lam: float = 0.8,
                ssim_weights: Weights = (0.5, 0.5), l2_weights: Optional[Weights] = None) -> LossTerms:
    """L_fusion = λ L_SSIM + (1 − λ) L_ℓ2 between y (B, 1, H, W) and both sources (B, 2, H, W)."""
    if fused.ndim != 4 or fused.shape[1] != 1:
        raise ValueError(f"fused image must be (B, 1, H, W), got {tuple(fused.shape)}")
    return fidelity_loss(fused, sources, lam, ssim_weights, l2_weights)


def decomposition_loss(decomposed: torch.Tensor, sources: torch.Tensor, lam: float = 0.8,
                       weights: Weights = (0.5, 0.5)) -> LossTerms:
    """L_dec: the same SSIM/ℓ2 mix between x̂ = f⁻¹(u, z′) (B, 2, H, W) and x, channel by channel."""
    if decomposed.shape != sources.shape:
        raise ValueError(f"decomposition {tuple(decomposed.shape)} and sources {tuple(sources.shape)} differ")
    return fidelity_loss(decomposed, sources, lam, weights)


# -- latent prior --------------------------------------------------------------------------------
def sample_prior(prior: str, shape: Tuple[int, ...], generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw from the latent prior: normal N(0, 1), uniform U[0, 1), or the constants 0 / 1."""
    check_prior(prior)
    if prior == "zeros":
        return torch.zeros(shape, device=device, dtype=dtype)
    if prior == "ones":
        return torch.ones(shape, device=device, dtype=dtype)
    draw = torch.randn if prior == "normal" else torch.rand
    # A generator only draws on its own device; draw there and move (e.g. a CPU generator, CUDA z).
    source = generator.device if generator is not None else device
    return draw(shape, generator=generator, device=source, dtype=dtype).to(device)


def prior_moments(prior: str) -> Tuple[float, float]:
    """(mean, standard deviation) of one pixel under the prior."""
    check_prior(prior)
    return {"normal": (0.0, 1.0), "zeros": (0.0, 0.0), "ones": (1.0, 0.0),
            "uniform": (0.5, (1.0 / 12.0) ** 0.5)}[prior]


def inverse_multiquadric_mmd(samples: torch.Tensor, reference: torch.Tensor,
                             widths: Sequence[float] = REFERENCE_MMD_WIDTHS) -> torch.Tensor:
    """Biased MMD² (diagonals kept) between two sample sets (N, d) and (M, d) with the kernel
    k(a, b) = Σ_h h² / (h² + ‖a − b‖²) (Gretton et al. 2012; kernel as in the authors' code)."""
    # float64 for long vectors: for image-sized ones ‖p‖² ≈ 6e4, and float32 cancellation in the
    # expansion below would leave errors of ~1e-2 in distances that the narrowest kernel
    # (h² = 0.0025) resolves. Pixel or patch samples (d ≤ 16) are exact enough in float32.
    dtype = torch.float64 if samples.shape[1] > 16 else torch.float32
    a = samples.to(dtype)
    b = reference.to(dtype)

    def kernel_mean(p: torch.Tensor, q: torch.Tensor, same: bool) -> torch.Tensor:
        # ‖p‖² + ‖q‖² − 2 p·q rather than cdist(p, q)²: no square root, so no NaN gradient at the
        # zero distances of the diagonal, which is set exactly for a set against itself.
        distance = p.pow(2).sum(1, keepdim=True) + q.pow(2).sum(1).unsqueeze(0) - 2.0 * p @ q.t()
        if same:
            distance = distance * (1.0 - torch.eye(distance.shape[0], dtype=distance.dtype, device=distance.device))
        distance = distance.clamp_min(0.0)
        return sum((h * h / (h * h + distance)).mean() for h in widths)

    mmd = kernel_mean(a, a, True) + kernel_mean(b, b, True) - 2.0 * kernel_mean(a, b, False)
    return mmd.to(samples.dtype if samples.dtype.is_floating_point else torch.float32)


def reference_mmd(z: torch.Tensor, prior: str = "normal", generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """The authors' latent loss: MMD² between the flattened latents of the batch and as many prior
    draws. Numerically inert for image-sized z (see the module docstring)."""
    flat = z.reshape(z.shape[0], -1)
    target = sample_prior(prior, tuple(flat.shape), generator, flat.device)
    return inverse_multiquadric_mmd(flat, target)


def _patches(z: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping patch×patch blocks of z (B, 1, H, W) as rows of a (N, patch²) matrix."""
    if patch == 1:
        return z.reshape(-1, 1)
    batch, channels, height, width = z.shape
    h, w = height - height % patch, width - width % patch
    blocks = z[:, :, :h, :w].reshape(batch, channels, h // patch, patch, w // patch, patch)
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(-1, patch * patch)


def pixel_mmd(z: torch.Tensor, prior: str = "normal", generator: Optional[torch.Generator] = None,
              samples: int = 2048, patch: int = 1) -> torch.Tensor:
    """MMD² between ``samples`` random pixels (or patch×patch blocks) of z and prior draws.

    Cost O(samples²); the subset is redrawn every call, so over an epoch every pixel is seen.
    """
    if samples < 2:
        raise ValueError(f"pixel MMD needs at least 2 samples, got {samples}")
    rows = _patches(z, int(patch))
    count = min(int(samples), rows.shape[0])
    index = torch.randperm(rows.shape[0], generator=generator, device="cpu")[:count].to(rows.device)
    chosen = rows.index_select(0, index)
    target = sample_prior(prior, tuple(chosen.shape), generator, chosen.device)
    return inverse_multiquadric_mmd(chosen, target)


def moment_loss(z: torch.Tensor, prior: str = "normal") -> torch.Tensor:
    """mean over images of (mean(z_i) − μ)² + (std(z_i) − s)², with (μ, s) the prior's moments."""
    mean, std = prior_moments(prior)
    flat = z.float().reshape(z.shape[0], -1)
    return ((flat.mean(dim=1) - mean).pow(2) + (flat.std(dim=1) - std).pow(2)).mean()


def latent_loss(name: str, z: torch.Tensor, prior: str = "normal",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatch to the latent loss ``name`` (one of ``LATENT_LOSSES``)."""
    check_latent_loss(name)
    check_prior(prior)
    if name == "reference_mmd":
        return reference_mmd(z, prior, generator)
    if name == "pixel_mmd":
        return pixel_mmd(z, prior, generator)
    if name == "moments":
        return moment_loss(z, prior)
    return z.new_zeros(())


# -- edge preservation -----------------------------------------------------------------------------
def _differences(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward differences (B, C, H, W - 1) horizontally and (B, C, H - 1, W) vertically."""
    return images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]


def max_abs_gradient_target(sources: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and direction, the finite difference of the source whose difference is larger in
    magnitude (sign kept): the edge target of ``gradient_loss``. ``sources`` is (B, 2, H, W)."""
    targets = []
    for diff in _differences(sources.float()):
        pick_second = diff[:, 1:2].abs() > diff[:, 0:1].abs()
        targets.append(torch.where(pick_second, diff[:, 1:2], diff[:, 0:1]))
    return targets[0], targets[1]


def gradient_loss(fused: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """L_grad = mean |Δ_d y − g*_d| over both directions d: ℓ1 distance between the fused image's
    forward differences and the max-abs differences of the two sources (see the module docstring)."""
    if fused.ndim != 4 or fused.shape[1] != 1 or sources.ndim != 4 or sources.shape[1] != 2:
        raise ValueError(f"need fused (B, 1, H, W) and sources (B, 2, H, W), got {tuple(fused.shape)} "
                         f"and {tuple(sources.shape)}")
    with torch.no_grad():
        target_x, target_y = max_abs_gradient_target(sources)
    fused_x, fused_y = _differences(fused.float())
    return 0.5 * ((fused_x - target_x).abs().mean() + (fused_y - target_y).abs().mean())


def piella_loss(fused: torch.Tensor, sources: torch.Tensor, data_range: float = SSIM_DATA_RANGE) -> torch.Tensor:
    """L_P = 1 − Q_P(y; x₁, x₂), averaged over the batch: Piella & Heijmans' variance-weighted local
    SSIM (see the module docstring); ``1 − piella_loss`` equals ``metrics.q_p`` on one image pair.
    ``fused`` is (B, 1, H, W) and ``sources`` (B, 2, H, W), both at least 11×11. Float32 always (the
    variances lose all precision in float16)."""
    if fused.ndim != 4 or fused.shape[1] != 1 or sources.ndim != 4 or sources.shape[1] != 2 \
            or fused.shape[2:] != sources.shape[2:]:
        raise ValueError(f"need fused (B, 1, H, W) and sources (B, 2, H, W) of one size, got "
                         f"{tuple(fused.shape)} and {tuple(sources.shape)}")
    size, sigma = SSIM_WINDOW
    if min(fused.shape[-2:]) < size:
        raise ValueError(f"Q_P needs images of at least {size}x{size} pixels, got {tuple(fused.shape[-2:])}")
    a, b, f = sources[:, :1].float(), sources[:, 1:].float(), fused.float()
    stack = torch.cat([a, b, f, a * a, b * b, f * f, a * f, b * f], dim=1)
    # pytorch_msssim's window (its public API returns only the mean SSIM, not the local maps):
    # normalised 1-D Gaussian, applied along rows and columns over the valid positions only
    taps = torch.arange(size, dtype=torch.float32, device=stack.device) - size // 2
    gauss = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    gauss = (gauss / gauss.sum()).repeat(stack.shape[1], 1, 1, 1)  # (C, 1, 1, size)
    local = F.conv2d(F.conv2d(stack, gauss, groups=stack.shape[1]), gauss.transpose(2, 3), groups=stack.shape[1])
    mu_a, mu_b, mu_f, aa, bb, ff, af, bf = local.unbind(dim=1)
    var_a, var_b, var_f = [(m2 - m * m).clamp_min(0.0) for m2, m in ((aa, mu_a), (bb, mu_b), (ff, mu_f))]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def ssim_map(mu_s: torch.Tensor, var_s: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        return ((2 * mu_f * mu_s + c1) * (2 * cov + c2)) / ((mu_f * mu_f + mu_s * mu_s + c1) * (var_f + var_s + c2))

    total = var_a + var_b
    flat = total < PIELLA_FLAT_VARIANCE * data_range * data_range
    weight_a = torch.where(flat, torch.full_like(total, 0.5), var_a / torch.where(flat, torch.ones_like(total), total))
    q = weight_a * ssim_map(mu_a, var_a, af - mu_a * mu_f) + (1 - weight_a) * ssim_map(mu_b, var_b, bf - mu_b * mu_f)
    return 1.0 - q.mean()


# -- MMIF-AMIN adaptive modality weights -----------------------------------------------------------
def average_gradient(images: torch.Tensor) -> torch.Tensor:
    """Average gradient per image, shape (B,): AG = mean_{i,j} √((Δ_x² + Δ_y²) / 2) with forward
    differences on the common (H − 1) × (W − 1) grid (a sharpness measure used by MMIF-AMIN)."""
    flat = images.float().reshape(images.shape[0], *images.shape[-2:])
    dx = flat[:, :-1, 1:] - flat[:, :-1, :-1]
    dy = flat[:, 1:, :-1] - flat[:, :-1, :-1]
    return torch.sqrt((dx.pow(2) + dy.pow(2)) / 2.0).mean(dim=(1, 2))


def image_entropy(images: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """Shannon entropy (bits) of each image's grey-level histogram, shape (B,): EN = −Σ_l p_l log₂ p_l,
    with ``bins`` levels over [0, 1] (values outside are clamped to the end bins)."""
    flat = images.float().reshape(images.shape[0], -1)
    levels = (flat.clamp(0.0, 1.0) * (bins - 1)).round().long()
    counts = torch.zeros(flat.shape[0], bins, device=flat.device)
    counts.scatter_add_(1, levels, torch.ones_like(flat))
    p = counts / flat.shape[1]
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def adaptive_weights(sources: torch.Tensor, eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """MMIF-AMIN weights for (B, 2, H, W) sources: (SSIM weights from AG, ℓ2 weights from EN), each
    (B, 2) summing to 1 per row; an image pair with AG (or EN) 0 for both gets (0.5, 0.5)."""
    with torch.no_grad():
        ag = torch.stack([average_gradient(sources[:, k]) for k in range(2)], dim=1)
        en = torch.stack([image_entropy(sources[:, k]) for k in range(2)], dim=1)

        def normalise(values: torch.Tensor) -> torch.Tensor:
            total = values.sum(dim=1, keepdim=True)
            even = torch.full_like(values, 0.5)
            return torch.where(total > eps, values / total.clamp_min(eps), even)

        return normalise(ag), normalise(en)
