"""FuseVis-style explanations of a FusionINN fusion: guidance maps and Jacobian images, exact and fast.

What is differentiated
    The fused image the user sees, y = sigmoid(u) with ``(u, z) = model(x)``, with respect to each
    *normalized* input x_1, x_2 (the values the network receives). ``target="logit"`` gives the
    derivatives of u instead; they differ by the factor sigma'(u) = y (1 - y), which makes
    saturated fused voxels (y near 0 or 1) insensitive to their inputs. A model with the background
    rule (``FusionINNConfig.clear_background``) has a constant y, so zero derivatives, where both
    inputs are background. The function is exactly the
    one :class:`~FusionINNLib.core.engine.SliceEngine` evaluates, *including* its edge padding of the
    slice at the high end to the squeezes' multiple, so on the last row/column of an odd-sized slice
    the derivative also counts the padded replicas of that pixel (the chain rule through
    ``np.pad(mode="edge")``). With ``normalization="volume"`` a derivative in source units is the
    map divided by the volume's scale (``hi - lo``); for ``"slice"`` the per-slice min-max itself
    depends on the image and is held fixed.

Jacobian image and guidance (Kumar & Gumhold, FuseVis, 2020)
    The Jacobian image of fused pixel p is J_k(p, .) = dy(p)/dx_k(.) for input k; the guidance image
    is its diagonal G_k(p) = dy(p)/dx_k(p) for every p. FuseVis computes G with one backward pass
    per pixel (H*W passes). Here:

Exact lattice probing
    The network is local. Every coupling subnet is two 3x3 convolutions, squeezes group 2x2 pixels
    and everything else is per pixel, so y(p) depends on x only inside a box p + [-R, R]^2. R is
    derived from the modules themselves (:func:`fused_receptive_radius`): walking the graph
    backwards from the fused channel, a block at squeeze level L whose subnet path has conv radius
    r widens a dependency interval [lo, hi] (in pixels) to
    [2^L (floor(lo / 2^L) - r), 2^L (floor(hi / 2^L) + r) + 2^L - 1]; R is the largest distance
    over all positions modulo the squeeze multiple. The fused channel is the first half of the last
    GLOW coupling, y_1 = exp(s(x_2)) x_1 + t(x_2), so that block contributes only one subnet
    (radius 2). Reference architecture: R = 4 + 9 + 2 = 15, less than ``config.receptive_radius``
    (17, the bound for the latent too). Measured on random and perturbed weights it is 15 as well
    (:func:`measure_receptive_radius`), i.e. the bound is attained.

    One reverse-mode pass with the cotangent set to 1 on a lattice L of fused pixels returns
    g(q) = sum_{s in L} dy(s)/dx(q). If lattice points are at least R + 1 apart (Chebyshev
    distance), no other seed s' has q = s inside its box, so g(s) = dy(s)/dx(s) *exactly* for every
    seed s, for both inputs at once. The s^2 shifted lattices with spacing s = R + 1 = 16 cover every
    pixel: 256 reverse passes instead of H*W (225 times fewer on 240 x 240). 256 is also the minimum
    for any reverse- or forward-mode probing scheme: all 256 pixels of a 16 x 16 block lie in each
    other's boxes, so the probes restricted to that block must have rank 256. The forward pass is
    run once per slice and the shifted lattices are pushed back together
    (``torch.func.vjp`` + ``torch.vmap``, batched convolution backward). A spacing below R + 1 is
    the approximate mode: the error is the sum of the Jacobian entries at lattice distances that
    fall inside the box (measured in ``docs/explain.md``).

Jacobian at a pixel on a crop
    dy(p)/dx is zero outside p's box, and every intermediate value that y(p) needs depends on x only
    inside that box. Running the network on a crop that contains the box, with its start rounded
    down and its end rounded up to the squeeze multiple (so that the 2 x 2 grouping stays aligned
    with the full slice's), gives the same numbers as the full slice: about 32 x 32 pixels instead
    of the whole slice.

Volumes
    Guidance is computed slice by slice for a range of slices; voxels outside that range are 0 in
    every output (same grid as input 1, so overlays need no resampling). Jacobian volumes are one
    slice thick and carry the crop's physical position in their origin.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from ..core.engine import CancelCheck, Cancelled, ProgressCallback, padded_size, select_device, tune_cpu_allocator
from ..core.errors import OptionError
from ..core.model import FusionFlow
from ..core.normalization import normalize_volume
from ..core.slices import parse_slice_range
from ..io.checkpoint import LoadedModel, resolve_model
from ..io.volume import OutputSet, Volume, VolumeError

TARGETS = ("fused", "logit")
# Spacing of the approximate mode: 144 instead of 256 lattices (1.8x faster). Measured on the
# reference architecture (docs/explain.md): largest error 0.03 % of the largest guidance.
APPROXIMATE_SPACING = 12
DEFAULT_NEIGHBOURHOOD_RADIUS = 5
FLOAT_ONLY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Pixels (lattices x slices x H x W) pushed back per vmapped reverse pass: 16 full 240 x 240
# lattices, about 0.6 GB of peak memory in float32 (measured).
DEFAULT_PROBE_BATCH = 16
# Channels-last convolutions: 1.7x faster lattice probing on the CPU than NCHW (measured, 1 and 2
# threads), as for the forward pass (spec section 4).
MEMORY_FORMAT = torch.channels_last
Log = Callable[[str], None]
ModelLike = Union[FusionFlow, LoadedModel]


# -- receptive field ------------------------------------------------------------------------------
def _conv_radius(subnet: nn.Module) -> int:
    """How far (in the block's own pixels) a subnet's output sees: sum of its convs' half-widths."""
    radius = 0
    for module in subnet.modules():
        if isinstance(module, nn.Conv2d):
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
            if tuple(stride) != (1, 1):
                raise ValueError("receptive-field bound: strided convolutions in a subnet are not supported")
            radius += max((k - 1) // 2 * d for k, d in zip(kernel, dilation))
        elif not isinstance(module, (nn.Sequential, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Tanh, nn.Sigmoid)):
            raise ValueError(f"receptive-field bound: unsupported subnet layer {type(module).__name__}")
    return radius


def _dependency_steps(model: FusionFlow) -> List[Tuple[int, int]]:
    """(squeeze level, conv radius) of every coupling block, from the fused output backwards.

    The fused output is channel 0 of the last coupling (``Split`` sections [1, 1]), which is the
    first half y_1 = exp(s_2(x_2)) x_1 + t_2(x_2): it sees one subnet (subnet2). Every earlier block
    is followed by a channel permutation, so all its outputs matter: y_2 = f(subnet1(y_1)) adds the
    second subnet.
    """
    import FrEIA.modules as fm

    steps: List[Tuple[int, int, int, int]] = []  # (level, subnet2 radius, subnet1 radius, module index)
    level = 0
    last_channel_mixer = -1
    for index, module in enumerate(model.graph.module_list):
        # Upsampling subclasses Downsampling in FrEIA 0.2: test it first.
        if isinstance(module, fm.IRevNetUpsampling):
            level -= 1
        elif isinstance(module, fm.IRevNetDownsampling):
            level += 1
        elif isinstance(module, fm.GLOWCouplingBlock):
            steps.append((level, _conv_radius(module.subnet2), _conv_radius(module.subnet1), index))
            last_channel_mixer = index
        elif isinstance(module, fm.PermuteRandom):
            last_channel_mixer = index
        elif not isinstance(module, (fm.ActNorm, fm.Split)):
            raise ValueError(f"receptive-field bound: unsupported flow module {type(module).__name__}")
    if not steps:
        raise ValueError("the model has no coupling blocks")
    result: List[Tuple[int, int]] = []
    for position, (block_level, radius2, radius1, index) in enumerate(reversed(steps)):
        last_block = position == 0
        first_half_only = last_block and index == last_channel_mixer and block_level == 0
        result.append((block_level, radius2 if first_half_only else radius2 + radius1))
    return result


def _dependency_interval(steps: Sequence[Tuple[int, int]], position: int) -> Tuple[int, int]:
    """Input pixels [lo, hi] (one axis) that fused pixel ``position`` can depend on."""
    lo = hi = position
    for level, radius in steps:
        cell = 2**level
        lo = cell * (lo // cell - radius)
        hi = cell * (hi // cell + radius) + cell - 1
    return lo, hi


def fused_receptive_radius(model: ModelLike) -> int:
    """Structural bound R: dy(p)/dx(q) = 0 whenever max(|p_r - q_r|, |p_c - q_c|) > R."""
    flow = _flow(model)
    steps = _dependency_steps(flow)
    period = flow.pad_multiple
    radius = 0
    for position in range(period, 2 * period):  # every residue modulo the squeeze grid
        lo, hi = _dependency_interval(steps, position)
        radius = max(radius, position - lo, hi - position)
    return radius


def exact_spacing(model: ModelLike) -> int:
    """Smallest lattice spacing whose probing is exact: R + 1."""
    return fused_receptive_radius(model) + 1


def measure_receptive_radius(model: ModelLike, size: int = 64, seed: int = 0, device: str = "cpu") -> int:
    """Largest Chebyshev distance of a non-zero dy(p)/dx entry, on a random image (a lower bound).

    Checks one pixel of every residue class modulo the squeeze multiple, near the centre of a
    ``size`` x ``size`` uniform-noise image. Random weights can leave some paths dead, so this can
    be below :func:`fused_receptive_radius`, never above it.
    """
    flow = _flow(model)
    generator = np.random.default_rng(seed)
    x1, x2 = generator.random((size, size)), generator.random((size, size))
    period = flow.pad_multiple
    centre = size // 2 // period * period
    radius = 0
    for dr in range(period):
        for dc in range(period):
            row, col = centre + dr, centre + dc
            j1, j2, _ = jacobian_at(flow, x1, x2, row, col, crop=False, device=device)
            support = (j1 != 0) | (j2 != 0)
            rows, cols = np.nonzero(support)
            if rows.size:
                radius = max(radius, int(np.max(np.maximum(np.abs(rows - row), np.abs(cols - col)))))
    return radius


# -- shared helpers -------------------------------------------------------------------------------
def _flow(model: ModelLike) -> FusionFlow:
    if isinstance(model, LoadedModel):
        return model.model
    if isinstance(model, FusionFlow):
        return model
    raise TypeError(f"expected a FusionFlow or LoadedModel, got {type(model).__name__}")


def _prepare(model: ModelLike, device: Union[str, torch.device]) -> Tuple[FusionFlow, torch.device,
                                                                          torch.dtype, torch.memory_format]:
    """Model on ``device`` in eval mode; its parameter dtype is the computation dtype.

    Like :class:`~FusionINNLib.core.engine.SliceEngine` this moves the model in place (device and
    channels-last layout, see ``MEMORY_FORMAT``).
    """
    flow = _flow(model)
    target = select_device(device) if isinstance(device, str) else device
    if target.type == "cpu":
        tune_cpu_allocator()
    memory_format = MEMORY_FORMAT
    flow.to(target, memory_format=memory_format)  # no copy when already there
    flow.eval()
    return flow, target, next(flow.parameters()).dtype, memory_format


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


def _as_stack(array: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(array)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"{name}: expected slices of shape (S, H, W) or one (H, W) slice, got {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: contains NaN/Inf values")
    return data


def _fused_function(flow: FusionFlow, height: int, width: int, padded_height: int, padded_width: int,
                    target: str, memory_format: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, 2, height, width) -> y (B, height, width), padding at the high end as the engine does.

    The padding is inside the differentiated function so that derivatives w.r.t. a border pixel
    include its replicas, i.e. they are derivatives of exactly what the engine computes.
    """
    pad_bottom, pad_right = padded_height - height, padded_width - width

    def fused(x: torch.Tensor) -> torch.Tensor:
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate")
        u, _ = flow(x.contiguous(memory_format=memory_format))
        # the fused image as the engine makes it (background rule included: 0 derivative there)
        out = flow.fused_image(u, x) if target == "fused" else u
        return out[:, 0, :height, :width]

    return fused


def _aligned_crop(steps: Sequence[Tuple[int, int]], first: int, last: int, size: int, multiple: int
                  ) -> Tuple[int, int]:
    """[start, stop) of input pixels needed by fused pixels first..last, aligned to ``multiple``.

    The start is rounded down and the stop up to the squeeze multiple so the crop's 2x2 grouping
    coincides with the full slice's; the stop never exceeds the padded slice.
    """
    # Both interval ends are non-decreasing in the position (floor is monotone).
    lo, hi = _dependency_interval(steps, first)[0], _dependency_interval(steps, last)[1]
    start = max(0, lo // multiple * multiple)
    stop = min(padded_size(size, multiple), padded_size(hi + 1, multiple))
    return start, stop


# -- guidance maps (arrays) ----------------------------------------------------------------------
@dataclass
class GuidanceArrays:
    guidance1: np.ndarray  # (S, H, W) dy(p)/dx1(p)
    guidance2: np.ndarray  # (S, H, W) dy(p)/dx2(p)
    fused: np.ndarray  # (S, H, W) y, computed by the same forward pass (0 outside ``window``)
    spacing: int
    exact: bool
    receptive_radius: int
    probes: int  # reverse passes per slice (lattices)


def compute_guidance(model: ModelLike, x1: np.ndarray, x2: np.ndarray, *, spacing: Optional[int] = None,
                     window: Optional[Tuple[int, int, int, int]] = None, target: str = "fused",
                     device: Union[str, torch.device] = "auto", batch_size: int = DEFAULT_PROBE_BATCH,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None
                     ) -> GuidanceArrays:
    """Guidance maps, fused image and bookkeeping; see :func:`guidance_maps` for the arguments."""
    _check_target(target)
    s1, s2 = _as_stack(x1, "input 1"), _as_stack(x2, "input 2")
    if s1.shape != s2.shape:
        raise ValueError(f"input shapes differ: {s1.shape} vs {s2.shape}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    flow, device_, dtype, memory_format = _prepare(model, device)
    radius = fused_receptive_radius(flow)
    spacing = radius + 1 if spacing is None else int(spacing)
    if spacing < 1:
        raise ValueError(f"lattice spacing must be at least 1, got {spacing}")
    count, height, width = s1.shape
    row0, row1, col0, col1 = (0, height, 0, width) if window is None else (int(v) for v in window)
    if not (0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width):
        raise ValueError(f"window {window} is empty or outside the slice of size {height} x {width}")

    # Only the crop that the window's fused pixels depend on is run through the network.
    steps = _dependency_steps(flow)
    multiple = flow.pad_multiple
    crop_r = _aligned_crop(steps, row0, row1 - 1, height, multiple)
    crop_c = _aligned_crop(steps, col0, col1 - 1, width, multiple)
    real_h, real_w = min(crop_r[1], height) - crop_r[0], min(crop_c[1], width) - crop_c[0]
    fused_fn = _fused_function(flow, real_h, real_w, crop_r[1] - crop_r[0], crop_c[1] - crop_c[0], target,
                               memory_format)
    # window in crop coordinates
    wr0, wr1, wc0, wc1 = row0 - crop_r[0], row1 - crop_r[0], col0 - crop_c[0], col1 - crop_c[0]
    offsets = [(a, b) for a in range(min(spacing, wr1 - wr0)) for b in range(min(spacing, wc1 - wc0))]
    lattices_per_call = min(len(offsets), batch_size)
    slices_per_call = max(1, batch_size // lattices_per_call)

    out1 = np.zeros((count, height, width), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    out2 = np.zeros_like(out1)
    fused_out = np.zeros_like(out1)
    total = count * len(offsets)
    done = 0
    for start in range(0, count, slices_per_call):
        stop = min(count, start + slices_per_call)
        pair = np.stack([s1[start:stop, crop_r[0]:crop_r[0] + real_h, crop_c[0]:crop_c[0] + real_w],
                         s2[start:stop, crop_r[0]:crop_r[0] + real_h, crop_c[0]:crop_c[0] + real_w]], axis=1)
        x = torch.from_numpy(np.ascontiguousarray(pair)).to(device=device_, dtype=dtype)
        # torch.func transforms ignore an outer no_grad: only dy/dx is built, never parameter grads.
        with torch.no_grad():
            y, pullback = torch.func.vjp(fused_fn, x)
            fused_crop = flow.fused_image(y.unsqueeze(1), x)[:, 0] if target == "logit" else y
            fused_out[start:stop, row0:row1, col0:col1] = fused_crop[:, wr0:wr1, wc0:wc1].cpu().numpy()
            batched_pullback = torch.vmap(pullback)
            for first in range(0, len(offsets), lattices_per_call):
                if cancel is not None and cancel():
                    raise Cancelled("cancelled by the user")
                chunk = offsets[first:first + lattices_per_call]
                cotangent = torch.zeros((len(chunk),) + tuple(y.shape), dtype=dtype, device=device_)
                for index, (a, b) in enumerate(chunk):
                    cotangent[index, :, wr0 + a:wr1:spacing, wc0 + b:wc1:spacing] = 1
                (grads,) = batched_pullback(cotangent)  # (lattices, slices, 2, h, w)
                grads = grads.cpu().numpy()
                for index, (a, b) in enumerate(chunk):
                    rows = slice(wr0 + a, wr1, spacing)
                    cols = slice(wc0 + b, wc1, spacing)
                    target_rows = slice(row0 + a, row1, spacing)
                    target_cols = slice(col0 + b, col1, spacing)
                    out1[start:stop, target_rows, target_cols] = grads[index, :, 0, rows, cols]
                    out2[start:stop, target_rows, target_cols] = grads[index, :, 1, rows, cols]
                done += len(chunk) * (stop - start)
                if progress is not None:
                    progress(done / total)
    return GuidanceArrays(out1, out2, fused_out, spacing, spacing > radius, radius, len(offsets))


def guidance_maps(model: ModelLike, x1: np.ndarray, x2: np.ndarray, *, spacing: Optional[int] = None,
                  window: Optional[Tuple[int, int, int, int]] = None, target: str = "fused",
                  device: Union[str, torch.device] = "auto", batch_size: int = DEFAULT_PROBE_BATCH,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Guidance maps G_k(p) = dy(p)/dx_k(p) of normalized slices ``x1``, ``x2`` of shape (S, H, W).

    ``spacing`` None (default) is exact: R + 1 (:func:`exact_spacing`); smaller is the approximate
    mode (see module docstring). ``window=(row0, row1, col0, col1)`` computes only those pixels
    (others are 0), running the network on the window plus its receptive field only. ``batch_size``
    is the number of (lattice, slice) reverse passes vectorised together. Computation runs in the
    model's parameter dtype (call ``model.double()`` for float64). A 2-D input gives 2-D outputs.
    """
    result = compute_guidance(model, x1, x2, spacing=spacing, window=window, target=target, device=device,
                              batch_size=batch_size, progress=progress, cancel=cancel)
    if np.asarray(x1).ndim == 2:
        return result.guidance1[0], result.guidance2[0]
    return result.guidance1, result.guidance2


def guidance_brute_force(model: ModelLike, x1: np.ndarray, x2: np.ndarray,
                         pixels: Optional[Sequence[Tuple[int, int]]] = None, target: str = "fused",
                         device: Union[str, torch.device] = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """FuseVis' method, for reference: one forward, then one backward pass per fused pixel.

    ``x1``, ``x2`` are one (H, W) slice; ``pixels`` (row, col) limits the work (others are NaN).
    """
    _check_target(target)
    flow, device_, dtype, memory_format = _prepare(model, device)
    a1, a2 = _as_stack(x1, "input 1")[0], _as_stack(x2, "input 2")[0]
    height, width = a1.shape
    multiple = flow.pad_multiple
    fused_fn = _fused_function(flow, height, width, padded_size(height, multiple), padded_size(width, multiple),
                               target, memory_format)
    x = torch.from_numpy(np.stack([a1, a2])[None].copy()).to(device=device_, dtype=dtype).requires_grad_(True)
    y = fused_fn(x)
    if pixels is None:
        pixels = [(r, c) for r in range(height) for c in range(width)]
    out1 = np.full((height, width), np.nan)
    out2 = np.full((height, width), np.nan)
    for number, (row, col) in enumerate(pixels):
        (grad,) = torch.autograd.grad(y[0, row, col], x, retain_graph=number < len(pixels) - 1)
        out1[row, col] = float(grad[0, 0, row, col])
        out2[row, col] = float(grad[0, 1, row, col])
    return out1, out2


# -- Jacobian at a pixel --------------------------------------------------------------------------
# Crops up to this many pixels run on one CPU thread: on a ~32 x 32 crop OpenMP's fork/join costs
# more than it saves, and on a busy machine it stalls (measured 5-10 ms on one thread vs 14-350 ms
# on two while other processes ran).
SINGLE_THREAD_PIXELS = 96 * 96


@contextmanager
def _single_thread(enabled: bool) -> Iterator[None]:
    """Temporarily one intra-op thread (torch's setting is process-wide: restored on exit)."""
    if not enabled or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def jacobian_crop_bounds(model: ModelLike, row: int, col: int, height: int, width: int
                         ) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Rows [r0, r1) and columns [c0, c1) of the aligned crop holding fused pixel (row, col)'s box.

    r1/c1 may extend into the engine's padding (beyond ``height``/``width``).
    """
    flow = _flow(model)
    steps = _dependency_steps(flow)
    multiple = flow.pad_multiple
    return (_aligned_crop(steps, row, row, height, multiple), _aligned_crop(steps, col, col, width, multiple))


def jacobian_at(model: ModelLike, x1_slice: np.ndarray, x2_slice: np.ndarray, row: int, col: int, *,
                crop: bool = True, target: str = "fused", device: Union[str, torch.device] = "auto"
                ) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int]]:
    """Jacobian images J_k = dy(row, col)/dx_k of one fused pixel, for both inputs.

    Returns (J1, J2, (row0, col0)): J arrays cover image rows row0.. and columns col0.. of the
    receptive-field crop (about 32 x 32; entries outside it are exactly zero). ``crop=False``
    runs the full slice instead and returns full-size arrays with (0, 0), for checking.
    """
    _check_target(target)
    a1, a2 = np.asarray(x1_slice), np.asarray(x2_slice)
    if a1.ndim != 2 or a1.shape != a2.shape:
        raise ValueError(f"expected two slices of the same 2-D shape, got {a1.shape} and {a2.shape}")
    height, width = a1.shape
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"pixel (row {row}, column {col}) is outside the slice of size {height} x {width}")
    flow, device_, dtype, memory_format = _prepare(model, device)
    multiple = flow.pad_multiple
    if crop:
        (r0, r1), (c0, c1) = jacobian_crop_bounds(flow, row, col, height, width)
    else:
        r0, r1, c0, c1 = 0, padded_size(height, multiple), 0, padded_size(width, multiple)
    real_h, real_w = min(r1, height) - r0, min(c1, width) - c0
    pair = np.stack([a1[r0:r0 + real_h, c0:c0 + real_w], a2[r0:r0 + real_h, c0:c0 + real_w]])[None]
    if not np.isfinite(pair).all():
        raise ValueError("the inputs contain NaN/Inf values")
    x = torch.from_numpy(np.ascontiguousarray(pair)).to(device=device_, dtype=dtype)
    fused_fn = _fused_function(flow, real_h, real_w, r1 - r0, c1 - c0, target, memory_format)
    small = device_.type == "cpu" and (r1 - r0) * (c1 - c0) <= SINGLE_THREAD_PIXELS
    with _single_thread(small), torch.no_grad():
        y, pullback = torch.func.vjp(fused_fn, x)
        cotangent = torch.zeros_like(y)
        cotangent[0, row - r0, col - c0] = 1
        (grad,) = pullback(cotangent)
    grad = grad[0].cpu().numpy()
    return grad[0], grad[1], (r0, c0)


# -- display helpers ------------------------------------------------------------------------------
def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0 (FuseVis uses 0.1 to 2), got {gamma}")
    return gamma


def display_normalize(values: np.ndarray, gamma: float = 1.0, lo: Optional[float] = None,
                      hi: Optional[float] = None) -> np.ndarray:
    """FuseVis display mapping: v = ((|g| - lo) / (hi - lo))^gamma in [0, 1] (float32).

    lo/hi default to the min and max of |g|; gamma < 1 brightens weak responses, > 1 darkens them.
    A constant map becomes 0.
    """
    gamma = _check_gamma(gamma)
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    lo = float(magnitude.min()) if lo is None else float(lo)
    hi = float(magnitude.max()) if hi is None else float(hi)
    if not hi > lo:
        return np.zeros(magnitude.shape, dtype=np.float32)
    scaled = np.clip((magnitude - lo) / (hi - lo), 0.0, 1.0)
    return (scaled**gamma).astype(np.float32)


def guidance_rgb(g1: np.ndarray, g2: np.ndarray, fused: np.ndarray, gamma: float = 1.0,
                 common_scale: bool = False) -> np.ndarray:
    """FuseVis guidance RGB (uint8, shape (..., 3)): R = |G_1|, G = |G_2| display-normalized, B = y.

    Each guidance is min-max normalized on its own, as in FuseVis; ``common_scale=True`` uses one
    range for both so that red and green intensities compare the two inputs' influence directly.
    The fused image (already in [0, 1]) is clipped, not rescaled.
    """
    g1, g2, fused = np.asarray(g1), np.asarray(g2), np.asarray(fused)
    if not (g1.shape == g2.shape == fused.shape):
        raise ValueError(f"shapes differ: guidance {g1.shape}, {g2.shape}, fused {fused.shape}")
    if common_scale:
        both = np.abs(np.concatenate([g1.ravel(), g2.ravel()]))
        lo, hi = float(both.min()), float(both.max())
        red, green = display_normalize(g1, gamma, lo, hi), display_normalize(g2, gamma, lo, hi)
    else:
        red, green = display_normalize(g1, gamma), display_normalize(g2, gamma)
    blue = np.clip(np.nan_to_num(fused.astype(np.float64)), 0.0, 1.0)
    rgb = np.stack([red, green, blue], axis=-1)
    return np.rint(rgb * 255.0).astype(np.uint8)


def scatter_table(g1: np.ndarray, g2: np.ndarray, point: Optional[Sequence[int]] = None,
                  radius: int = DEFAULT_NEIGHBOURHOOD_RADIUS, mask: Optional[np.ndarray] = None,
                  axis: int = 0) -> Dict[str, np.ndarray]:
    """Columns for FuseVis' scatterplot of guidance 1 against guidance 2, one row per voxel.

    2-D maps give columns ``j`` (row), ``i`` (column); 3-D maps (a Volume's (k, j, i) array) give
    ``k``, ``j``, ``i``. ``point`` is an index in the same array order; ``neighbourhood`` is 1 for
    voxels in the same slice (along ``axis``) within Chebyshev distance ``radius`` of it in-plane,
    else 0. ``mask`` (same shape, bool) keeps only those voxels.
    """
    g1, g2 = np.asarray(g1), np.asarray(g2)
    if g1.shape != g2.shape or g1.ndim not in (2, 3):
        raise ValueError(f"guidance maps must be two 2-D or 3-D arrays of one shape, got {g1.shape}, {g2.shape}")
    if radius < 0:
        raise ValueError(f"neighbourhood radius must be >= 0, got {radius}")
    names = ("j", "i") if g1.ndim == 2 else ("k", "j", "i")
    keep = np.ones(g1.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != g1.shape:
        raise ValueError(f"mask shape {keep.shape} differs from the guidance shape {g1.shape}")
    index = np.nonzero(keep)
    flag = np.zeros(index[0].shape, dtype=np.int8)
    if point is not None:
        point = tuple(int(v) for v in point)
        if len(point) != g1.ndim or any(not 0 <= p < s for p, s in zip(point, g1.shape)):
            raise ValueError(f"point {point} is outside the guidance maps of shape {g1.shape}")
        near = np.ones(flag.shape, dtype=bool)
        for dim, (coordinate, centre) in enumerate(zip(index, point)):
            limit = 0 if (g1.ndim == 3 and dim == axis) else radius
            near &= np.abs(coordinate - centre) <= limit
        flag[near] = 1
    table: Dict[str, np.ndarray] = {name: coordinate.astype(np.int64) for name, coordinate in zip(names, index)}
    table["guidance1"] = g1[index]
    table["guidance2"] = g2[index]
    table["neighbourhood"] = flag
    return table


def table_to_tsv(table: Dict[str, np.ndarray]) -> str:
    """Tab-separated text with a header row; floats with 9 significant digits."""
    names = list(table)
    columns = []
    for name in names:
        column = np.asarray(table[name])
        if np.issubdtype(column.dtype, np.floating):
            columns.append([f"{v:.9g}" for v in column.tolist()])
        else:
            columns.append([str(v) for v in column.tolist()])
    lines = ["\t".join(names)]
    lines.extend("\t".join(row) for row in zip(*columns))
    return "\n".join(lines) + "\n"


# -- volumes --------------------------------------------------------------------------------------
@dataclass
class ExplainOutput:
    guidance1: Volume  # dy/dx1 (normalized units) on input 1's grid; 0 outside ``slices``
    guidance2: Volume
    rgb: np.ndarray  # (k, j, i, 3) uint8 guidance RGB (R = |G1|, G = |G2|, B = fused); 0 outside
    fused: Volume  # y in [0, 1]; 0 outside ``slices``
    notes: List[str] = field(default_factory=list)
    slices: Tuple[int, int] = (0, 0)  # [start, stop) along ``axis``
    axis: int = 0
    spacing: int = 0
    exact: bool = True
    receptive_radius: int = 0
    gamma: float = 1.0
    target: str = "fused"  # derivative of y = sigmoid(u) ("fused") or of u ("logit")

    def description(self) -> Dict[str, Any]:
        numerator = "sigmoid(u)" if self.target == "fused" else "u"
        return {"slices": list(self.slices), "axis": self.axis, "spacing": self.spacing, "exact": self.exact,
                "receptive_radius": self.receptive_radius, "gamma": self.gamma,
                "derivative": f"d {numerator} / d normalized input", "notes": list(self.notes)}


def _slice_range(slices: Any, count: int) -> Tuple[int, int]:
    if slices is None:
        return 0, count
    if isinstance(slices, range):
        if slices.step != 1:
            raise ValueError(f"slice range step must be 1, got {slices.step}")
        start, stop = slices.start, slices.stop
    elif isinstance(slices, slice):
        start, stop, step = slices.indices(count)
        if step != 1:
            raise ValueError(f"slice range step must be 1, got {step}")
    else:
        start, stop = (int(v) for v in slices)
    if not 0 <= start < stop <= count:
        raise ValueError(f"slice range {start}:{stop} is empty or outside 0:{count}")
    return int(start), int(stop)


def parse_slices(text: str, count: int) -> Tuple[int, int]:
    """``"a:b"`` (half-open, Python-style, either bound optional) or ``"a"`` (one slice); one parser
    for every front end (:func:`FusionINNLib.core.slices.parse_slice_range`, the torch-free one the
    Slicer module uses before a job starts)."""
    return parse_slice_range(text, count)


class VolumeExplainer:
    """Normalized inputs kept in memory, so that repeated queries (a moving crosshair) are fast.

    ``volume2`` is resampled onto ``volume1``'s grid when needed and both are normalized exactly as
    :func:`FusionINNLib.jobs.pipeline.fuse_volumes` does; slices are taken along ``axis`` (numpy order).
    """

    def __init__(self, volume1: Volume, volume2: Volume, model: Optional[ModelLike] = None, *, axis: int = 0,
                 normalization: str = "volume", device: Union[str, torch.device] = "auto",
                 log: Log = lambda message: None):
        from .pipeline import prepare_inputs

        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (numpy k, j, i order), got {axis}")
        self.model = _flow(model if model is not None else resolve_model())
        self.reference = volume1
        self.axis = axis
        self.device = device
        volume2, notes = prepare_inputs(volume1, volume2, log)
        x1, params1 = normalize_volume(volume1.array, normalization, axis)
        x2, params2 = normalize_volume(volume2.array, normalization, axis)
        for name, params in (("input 1", params1), ("input 2", params2)):
            if params.nonfinite:
                notes.append(f"{name}: {params.nonfinite} NaN/Inf voxels replaced by the background value")
                log(notes[-1])
        self.notes = notes
        self.scales = (params1.scale, params2.scale)
        # slices first: (S, H, W) views
        self.x1 = np.moveaxis(x1, axis, 0)
        self.x2 = np.moveaxis(x2, axis, 0)

    @property
    def slice_count(self) -> int:
        return self.x1.shape[0]

    def guidance(self, slices: Any = None, *, spacing: Optional[int] = None, approximate: bool = False,
                 gamma: float = 1.0, target: str = "fused", batch_size: int = DEFAULT_PROBE_BATCH,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None) -> ExplainOutput:
        gamma = _check_gamma(gamma)
        start, stop = _slice_range(slices, self.slice_count)
        if approximate and spacing is None:
            spacing = APPROXIMATE_SPACING
        result = compute_guidance(self.model, self.x1[start:stop], self.x2[start:stop], spacing=spacing,
                                  target=target, device=self.device, batch_size=batch_size, progress=progress,
                                  cancel=cancel)
        shape = self.x1.shape
        full = [np.zeros(shape, dtype=np.float32) for _ in range(3)]
        for array, part in zip(full, (result.guidance1, result.guidance2, result.fused)):
            array[start:stop] = part
        rgb = np.zeros(shape + (3,), dtype=np.uint8)
        rgb[start:stop] = guidance_rgb(result.guidance1, result.guidance2, result.fused, gamma)
        back = [np.ascontiguousarray(np.moveaxis(array, 0, self.axis)) for array in full]
        rgb = np.ascontiguousarray(np.moveaxis(rgb, 0, self.axis))
        notes = list(self.notes)
        notes.append(f"guidance of slices {start}:{stop} along axis {self.axis}; other slices are 0")
        if not result.exact:
            notes.append(f"approximate guidance: lattice spacing {result.spacing} "
                         f"< exact {result.receptive_radius + 1}")
        return ExplainOutput(self.reference.with_array(back[0]), self.reference.with_array(back[1]), rgb,
                             self.reference.with_array(back[2]), notes, (start, stop), self.axis, result.spacing,
                             result.exact, result.receptive_radius, gamma, target)

    def numpy_index(self, point_ijk: Sequence[int]) -> Tuple[int, int, int]:
        """(k, j, i) array index of an ITK/Slicer (i, j, k) voxel index, checked against the size."""
        values = tuple(int(v) for v in point_ijk)
        if len(values) != 3:
            raise ValueError(f"point must be an IJK index with three values, got {point_ijk!r}")
        size_ijk = tuple(reversed(self.reference.shape))
        if any(not 0 <= v < s for v, s in zip(values, size_ijk)):
            raise ValueError(f"point (i, j, k) = {values} is outside the image of size (i, j, k) = {size_ijk}")
        return values[2], values[1], values[0]

    def jacobian(self, point_ijk: Sequence[int], target: str = "fused") -> Tuple[Volume, Volume]:
        """Jacobian images of fused voxel ``point_ijk`` as one-slice volumes placed in physical space."""
        kji = self.numpy_index(point_ijk)
        in_plane = [d for d in range(3) if d != self.axis]
        slice_index, row, col = kji[self.axis], kji[in_plane[0]], kji[in_plane[1]]
        j1, j2, (row0, col0) = jacobian_at(self.model, self.x1[slice_index], self.x2[slice_index], row, col,
                                           target=target, device=self.device)
        start = [0, 0, 0]
        start[self.axis], start[in_plane[0]], start[in_plane[1]] = slice_index, row0, col0
        origin = _physical_point(self.reference, start)
        volumes = []
        for jac in (j1, j2):
            array = np.ascontiguousarray(np.expand_dims(jac.astype(np.float32), self.axis))
            volumes.append(Volume(array, self.reference.spacing, origin, self.reference.direction,
                                  self.reference.is_2d and self.axis == 0))
        return volumes[0], volumes[1]


def _physical_point(reference: Volume, index_kji: Sequence[int]) -> Tuple[float, float, float]:
    """ITK's index-to-physical map: origin + D diag(spacing) (i, j, k)."""
    index_ijk = np.asarray(list(reversed(list(index_kji))), dtype=np.float64)
    direction = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    point = np.asarray(reference.origin, dtype=np.float64) + direction @ (np.asarray(reference.spacing) * index_ijk)
    return tuple(float(v) for v in point)  # type: ignore[return-value]


def explain_volumes(volume1: Volume, volume2: Volume, model: Optional[ModelLike] = None, *, slices: Any = None,
                    axis: int = 0, normalization: str = "volume", spacing: Optional[int] = None,
                    approximate: bool = False, gamma: float = 1.0, target: str = "fused",
                    device: Union[str, torch.device] = "auto", batch_size: int = DEFAULT_PROBE_BATCH,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                    log: Log = lambda message: None) -> ExplainOutput:
    """Guidance maps, guidance RGB and fused image of two volumes, for slices [a, b) along ``axis``.

    ``slices``: None (all), (start, stop), a ``range`` or a ``slice``. Outputs keep input 1's grid;
    voxels outside the slice range are 0. Exact unless ``spacing`` < R + 1 or ``approximate``.
    """
    explainer = VolumeExplainer(volume1, volume2, model, axis=axis, normalization=normalization, device=device,
                                log=log)
    return explainer.guidance(slices, spacing=spacing, approximate=approximate, gamma=gamma, target=target,
                              batch_size=batch_size, progress=progress, cancel=cancel)


def jacobian_volumes(volume1: Volume, volume2: Volume, point_ijk: Sequence[int], model: Optional[ModelLike] = None,
                     *, axis: int = 0, normalization: str = "volume", target: str = "fused",
                     device: Union[str, torch.device] = "auto", log: Log = lambda message: None
                     ) -> Tuple[Volume, Volume]:
    """dy(p)/dx1 and dy(p)/dx2 for the fused voxel p = ``point_ijk`` (ITK/Slicer (i, j, k) of input 1).

    Each is a one-slice volume covering p's receptive-field crop, with spacing and direction of
    input 1 and an origin at the crop's first voxel, so it overlays the inputs in physical space.
    For repeated points use :class:`VolumeExplainer` (normalizes once).
    """
    explainer = VolumeExplainer(volume1, volume2, model, axis=axis, normalization=normalization, device=device,
                                log=log)
    return explainer.jacobian(point_ijk, target=target)


# -- files ----------------------------------------------------------------------------------------
def rgb_image(rgb: np.ndarray, reference: Volume) -> sitk.Image:
    """A (k, j, i, 3) uint8 array as an RGB image with ``reference``'s geometry (2-D if it is)."""
    if reference.is_2d:
        image = sitk.GetImageFromArray(np.ascontiguousarray(rgb[0]), isVector=True)
        image.SetSpacing(reference.spacing[:2])
        image.SetOrigin(reference.origin[:2])
        d = reference.direction
        image.SetDirection((d[0], d[1], d[3], d[4]))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True)
        image.SetSpacing(reference.spacing)
        image.SetOrigin(reference.origin)
        image.SetDirection(reference.direction)
    return image


def _check_float_output(path: Optional[Any], what: str) -> None:
    if path is not None and str(path).lower().endswith(FLOAT_ONLY_SUFFIXES):
        raise VolumeError(f"{path}: {what} holds signed real values; use a float format (.nrrd, .mha, .nii.gz)")


@dataclass
class ExplainFilesResult:
    output: ExplainOutput
    jacobians: Optional[Tuple[Volume, Volume]] = None
    written: List[str] = field(default_factory=list)


def explain_files(input1: Any, input2: Any, guidance1: Any, guidance2: Any, *, rgb: Any = None,
                  point_ijk: Optional[Sequence[int]] = None, jacobian1: Any = None, jacobian2: Any = None,
                  scatter: Any = None, slices: Optional[str] = None, model: Any = None, axis: int = 0,
                  normalization: str = "volume", spacing: Optional[int] = None, approximate: bool = False,
                  gamma: float = 1.0, scatter_radius: int = DEFAULT_NEIGHBOURHOOD_RADIUS,
                  device: str = "auto", batch_size: int = DEFAULT_PROBE_BATCH,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                  log: Log = lambda message: None) -> ExplainFilesResult:
    """Read two images, explain, and write every requested output all-or-nothing."""
    import json

    from ..io.volume import read_volume
    from .pipeline import check_outputs

    if (jacobian1 is None) != (jacobian2 is None):
        raise OptionError(rule="both", options=("jacobian1", "jacobian2"))
    if jacobian1 is not None and point_ijk is None:
        raise OptionError(rule="needs", options=("jacobian1", "point_ijk"))
    if spacing is not None and approximate:
        raise OptionError(rule="one_of", options=("spacing", "approximate"))
    for path, what in ((guidance1, "a guidance map"), (guidance2, "a guidance map"),
                       (jacobian1, "a Jacobian image"), (jacobian2, "a Jacobian image")):
        _check_float_output(path, what)
    inputs = [Path(input1), Path(input2)]
    outputs = [guidance1, guidance2, rgb, jacobian1, jacobian2, scatter]
    check_outputs(inputs, outputs)
    loaded = model if isinstance(model, LoadedModel) else resolve_model(model)
    volume1, volume2 = read_volume(inputs[0]), read_volume(inputs[1])
    explainer = VolumeExplainer(volume1, volume2, loaded, axis=axis, normalization=normalization, device=device,
                                log=log)
    point_kji = explainer.numpy_index(point_ijk) if point_ijk is not None else None
    slice_range = parse_slices(slices, explainer.slice_count) if slices else None
    result = explainer.guidance(slice_range, spacing=spacing, approximate=approximate, gamma=gamma,
                                batch_size=batch_size, progress=progress, cancel=cancel)
    jacobians = explainer.jacobian(point_ijk) if jacobian1 is not None else None
    description = dict(result.description(), model=loaded.describe()["path"], inputs=[str(p) for p in inputs])
    metadata = {"FusionINN_explain": json.dumps(description)}
    written: List[str] = []
    with OutputSet() as files:
        files.add_volume(result.guidance1, guidance1, metadata)
        files.add_volume(result.guidance2, guidance2, metadata)
        written += [str(guidance1), str(guidance2)]
        if rgb is not None:
            files.add_image(rgb_image(result.rgb, result.guidance1), rgb)
            written.append(str(rgb))
        if jacobians is not None:
            point_meta = {"FusionINN_explain": json.dumps(dict(description, point_ijk=list(point_ijk)))}
            files.add_volume(jacobians[0], jacobian1, point_meta)
            files.add_volume(jacobians[1], jacobian2, point_meta)
            written += [str(jacobian1), str(jacobian2)]
        if scatter is not None:
            start, stop = result.slices
            mask = np.zeros(volume1.shape, dtype=bool)
            index = [slice(None)] * 3
            index[axis] = slice(start, stop)
            mask[tuple(index)] = True
            table = scatter_table(result.guidance1.array, result.guidance2.array, point_kji, scatter_radius,
                                  mask=mask, axis=axis)
            files.add_text(table_to_tsv(table), scatter)
            written.append(str(scatter))
    return ExplainFilesResult(result, jacobians, written)
