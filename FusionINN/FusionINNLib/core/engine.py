"""Slice-wise fusion and decomposition of normalized volumes with a :class:`FusionFlow`.

Works on float32 numpy arrays already normalized to about [0, 1]; :mod:`FusionINNLib.jobs.pipeline`
adds files, geometry and intensity units. Slices are taken along ``axis``, padded at the high end
(edge values) to what the 2x2 squeezes need, batched, and cropped back.

Exact inverse. ``fuse`` returns y = sigmoid(u) (flat where both inputs are background for a model
with the background rule, ``FusionFlow.fused_image``) and, when asked, a *kept latent* of two channels on
the padded grid: z and r = u - g(y'), where y' is y set to 0.5 in the padding and g is
``FusionFlow.inverse_input`` (logit with y clamped away from 0 and 1; a constant where the
background rule cleared y). Decomposition recomputes u = g(y') + r, so it is exact even where the
sigmoid saturates in float32 (u > 16.6 rounds y to 1.0), over a cleared background and in the
padding, whose y is not stored.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .choices import DEVICES, PRIORS  # defined once, re-exported
from .errors import DeviceUnavailableError, OutOfMemoryError
from .model import FusionFlow
from .process import process_tuning_allowed

# On the CPU one forward pass holds at most this many (padded) pixels: batch 8 of 256x256 slices.
# The activations of a batch (32 channels at full resolution, several alive at once) grow with
# batch x height x width; capping their product keeps a 512x512x400 volume within its memory budget
# (docs/robustness.md) and costs no speed, since 2 slices of 512x512 are as many pixels as 8 of 256x256.
CPU_BATCH_PIXELS = 8 * 256 * 256
ProgressCallback = Callable[[float], None]
CancelCheck = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised when the cancel check returns True; nothing is written by the callers."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then the CPU; an unavailable explicit choice fails."""
    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    mps_available = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(device="cuda")
    if name == "mps" and not mps_available:
        raise DeviceUnavailableError(device="mps")
    return torch.device(name)


def describe_devices() -> str:
    """One line for the user: what was found."""
    parts = ["cpu"]
    if torch.cuda.is_available():
        parts += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        parts.append("mps")
    return ", ".join(parts)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep glibc from mmap/munmap-ing every large activation (measured 3x on batched CPU runs).

    Tensors above glibc's mmap threshold are mapped and unmapped on every op; each page fault is
    expensive in a VM. Serving them from the heap and not trimming it makes glibc reuse memory.
    Harmless elsewhere; returns False where glibc's ``mallopt`` is unavailable (macOS, Windows)
    and when the process did not call :func:`FusionINNLib.core.process.allow_process_tuning` (then
    nothing is changed: the library may be running inside 3D Slicer's process).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not process_tuning_allowed():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # glibc caps M_MMAP_THRESHOLD at 32 MiB, below one batch's activations, so switch mmap off
    # for malloc altogether (M_MMAP_MAX = 0) and never give freed heap back (huge trim threshold).
    ok = mallopt(m_mmap_max, 0) == 1
    ok = mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok
    _ALLOCATOR_TUNED = ok
    return ok


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def padded_size(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple)


def _slices_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def _slice_seed(seed: int, slice_index: int, sample: int) -> int:
    # One seed per (slice, sample): results do not depend on batch size or OOM retries.
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, slice_index, sample]).generate_state(1)[0])


def fill_cleared_background(model: FusionFlow, fused: np.ndarray, estimates: Sequence[np.ndarray],
                            stds: Sequence[Optional[np.ndarray]], values: Sequence[Optional[float]]) -> None:
    """The sampled decomposition's background rule (``FusionINNConfig.clear_background``), in
    place: where the fused image says "both sources are background", estimate k is ``values[k]``
    (source k's background value, in the estimates' units; None leaves it) with no uncertainty."""
    background = model.cleared_background(fused)
    if background is None or not background.any():
        return
    for estimate, std, value in zip(estimates, stds, values):
        if value is not None:
            estimate[background] = value
            if std is not None:
                std[background] = 0.0


@dataclass
class FuseArrays:
    fused: np.ndarray  # y, input shape, float32 in [0, 1]
    latent: Optional[np.ndarray]  # (2, *padded shape) [z, r] or None


class SliceEngine:
    """Runs a model over the slices of a volume in batches, with device, AMP and OOM handling."""

    def __init__(self, model: FusionFlow, device: str = "auto", batch_size: int = 8, amp: bool = False,
                 channels_last: bool = True, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelCheck] = None, log: Optional[Callable[[str], None]] = None,
                 batch_pixels: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.device = select_device(device) if isinstance(device, str) else device
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.batch_size = int(batch_size)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.progress = progress
        self.cancel = cancel
        self.log = log or (lambda message: None)
        # GPU memory is governed by the out-of-memory halving; host memory by this cap.
        self.batch_pixels = batch_pixels if batch_pixels is not None else (
            CPU_BATCH_PIXELS if self.device.type == "cpu" else None)

    # -- batching ---------------------------------------------------------------------------
    def batch_limit(self, slice_pixels: int) -> int:
        """Slices per forward pass: ``batch_size``, capped at ``batch_pixels`` padded pixels."""
        if self.batch_pixels is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.batch_pixels // max(1, slice_pixels)))

    def _batches(self, count: int, work: Callable[[int, int], None], slice_pixels: int = 1,
                 done_offset: float = 0.0, weight: float = 1.0) -> None:
        """Call ``work(start, stop)`` over [0, count) in batches; halve the batch on OOM."""
        start = 0
        while start < count:
            if self.cancel is not None and self.cancel():
                raise Cancelled("cancelled by the user")
            size = self.batch_limit(slice_pixels)
            stop = min(start + size, count)
            try:
                work(start, stop)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM we can handle
                if not is_out_of_memory(error):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if size == 1:
                    raise OutOfMemoryError(device=str(self.device)) from None
                self.batch_size = max(1, size // 2)
                self.log(f"out of memory on {self.device}: retrying with batch size {self.batch_size}")
                continue
            start = stop
            if self.progress is not None:
                self.progress(done_offset + weight * start / count)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        return tensor.contiguous(memory_format=self.memory_format) if tensor.ndim == 4 else tensor

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _pad(self, stack: np.ndarray) -> np.ndarray:
        """Edge-pad (S, H, W) slices at the high end to the squeezes' multiple."""
        multiple = self.model.pad_multiple
        _, height, width = stack.shape
        pad_h = padded_size(height, multiple) - height
        pad_w = padded_size(width, multiple) - width
        if pad_h == 0 and pad_w == 0:
            return stack
        return np.pad(stack, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")

    # -- fusion -----------------------------------------------------------------------------
    def fuse(self, x1: np.ndarray, x2: np.ndarray, axis: int = 0, keep_latent: bool = False) -> FuseArrays:
        if x1.shape != x2.shape:
            raise ValueError(f"input shapes differ: {x1.shape} vs {x2.shape}")
        s1, s2 = _slices_first(x1, axis), _slices_first(x2, axis)
        count, height, width = s1.shape
        fused = np.empty((count, height, width), dtype=np.float32)
        multiple = self.model.pad_multiple
        hp, wp = padded_size(height, multiple), padded_size(width, multiple)
        latent = np.empty((2, count, hp, wp), dtype=np.float32) if keep_latent else None

        def work(start: int, stop: int) -> None:
            pair = self._to_device(np.stack([self._pad(s1[start:stop]), self._pad(s2[start:stop])], axis=1))
            with torch.inference_mode(), self._autocast():
                u, z = self.model(pair)
            u, z = u.float(), z.float()
            y = self.model.fused_image(u, pair)
            fused[start:stop] = y[:, 0, :height, :width].cpu().numpy()
            if latent is not None:
                y_kept = torch.full_like(y, 0.5)
                y_kept[:, :, :height, :width] = y[:, :, :height, :width]
                latent[0, start:stop] = z[:, 0].cpu().numpy()
                # float64 so that u = g(y') + r round-trips to u's own float32 precision
                residual = u.double() - self.model.inverse_input(y_kept.double())
                latent[1, start:stop] = residual[:, 0].float().cpu().numpy()

        self._batches(count, work, hp * wp)
        if latent is not None:
            latent = np.moveaxis(latent, 1, axis + 1) if axis != 0 else latent
        return FuseArrays(np.moveaxis(fused, 0, axis), latent)

    # -- decomposition ----------------------------------------------------------------------
    def _reverse(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.model.inverse(u.contiguous(memory_format=self.memory_format),
                               z.contiguous(memory_format=self.memory_format))
        if self.model.config.reverse_input == "sigmoid":
            x = torch.sigmoid(x)
        return x

    def _reverse_input(self, y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        if residual is None or self.model.config.reverse_input == "sigmoid":
            return self.model.inverse_input(y)
        return (self.model.inverse_input(y.double()) + residual.double()).float()

    def decompose_exact(self, fused: np.ndarray, latent: np.ndarray, axis: int = 0
                        ) -> Tuple[np.ndarray, np.ndarray]:
        """Invert with the kept latent [z, r]; exact up to float32 rounding."""
        sy = _slices_first(fused, axis)
        sl = np.moveaxis(latent, axis + 1, 1) if axis != 0 else latent
        count, height, width = sy.shape
        multiple = self.model.pad_multiple
        expected = (2, count, padded_size(height, multiple), padded_size(width, multiple))
        if sl.shape != expected:
            raise ValueError(f"latent volume shape {tuple(sl.shape)} does not match the fused volume "
                             f"(expected {expected}); was it written for this fused volume and model?")
        out1 = np.empty_like(sy)
        out2 = np.empty_like(sy)

        def work(start: int, stop: int) -> None:
            y = np.full((stop - start, 1) + expected[2:], 0.5, dtype=np.float32)
            y[:, 0, :height, :width] = sy[start:stop]
            with torch.inference_mode():
                u = self._reverse_input(self._to_device(y), self._to_device(sl[1, start:stop, None]))
                x = self._reverse(u, self._to_device(sl[0, start:stop, None]))
            x = x[:, :, :height, :width].float().cpu().numpy()
            out1[start:stop], out2[start:stop] = x[:, 0], x[:, 1]

        self._batches(count, work, expected[2] * expected[3])
        return np.moveaxis(out1, 0, axis), np.moveaxis(out2, 0, axis)

    def decompose_sampled(self, fused: np.ndarray, axis: int = 0, samples: int = 1, seed: int = 0,
                          temperature: float = 1.0, prior: str = "normal"
                          ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """Mean (and, for samples > 1, per-voxel std) of f^-1(y, z') over fresh latents z'."""
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        sy = _slices_first(fused, axis)
        count, height, width = sy.shape
        mean = np.empty((2, count, height, width), dtype=np.float32)
        std = np.empty((2, count, height, width), dtype=np.float32) if samples > 1 else None

        def work(start: int, stop: int) -> None:
            y = self._to_device(self._pad(sy[start:stop])[:, None])
            with torch.inference_mode():
                u = self._reverse_input(y, None)
                running_mean = torch.zeros((stop - start, 2) + tuple(y.shape[2:]), device=self.device,
                                           dtype=torch.float64)
                running_m2 = torch.zeros_like(running_mean)
                for sample in range(samples):
                    z = self._latent_sample(tuple(y.shape[1:]), range(start, stop), sample, seed,
                                            temperature, prior)
                    x = self._reverse(u, z).double()
                    # Welford's update: stable mean and variance in one pass over the samples.
                    delta = x - running_mean
                    running_mean += delta / (sample + 1)
                    running_m2 += delta * (x - running_mean)
            mean[:, start:stop] = running_mean[:, :, :height, :width].float().cpu().numpy().transpose(1, 0, 2, 3)
            if std is not None:
                variance = (running_m2 / (samples - 1)).clamp_min(0.0)
                std[:, start:stop] = variance.sqrt()[:, :, :height, :width].float().cpu().numpy().transpose(
                    1, 0, 2, 3)

        multiple = self.model.pad_multiple
        self._batches(count, work, padded_size(height, multiple) * padded_size(width, multiple))
        def back(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
            return None if array is None else np.moveaxis(array, 0, axis)

        stds = (None, None) if std is None else (std[0], std[1])
        return back(mean[0]), back(mean[1]), back(stds[0]), back(stds[1])

    def _latent_sample(self, shape: Tuple[int, ...], slice_indices: Iterator[int], sample: int,
                       seed: int, temperature: float, prior: str) -> torch.Tensor:
        slices: List[torch.Tensor] = []
        for index in slice_indices:
            if prior == "zeros":
                z = torch.zeros(shape)
            elif prior == "ones":
                z = torch.ones(shape)
            else:
                generator = torch.Generator().manual_seed(_slice_seed(seed, index, sample))
                draw = torch.randn if prior == "normal" else torch.rand
                z = draw(shape, generator=generator) * temperature
            slices.append(z)
        return torch.stack(slices).to(self.device).contiguous(memory_format=self.memory_format)
