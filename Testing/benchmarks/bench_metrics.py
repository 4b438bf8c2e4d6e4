"""Benchmark of FusionINNLib.metrics against straightforward per-window reference implementations.

Run from the repository root:

    python Testing/benchmarks/bench_metrics.py [--size 240] [--repeat 5] [--seed 0]

It scores one synthetic textured triple (every 3×3 window textured: the worst case for Q_FMI, no
background windows to skip) with the vectorised metrics, in both modes, and with the reference
implementations below in the same run, then prints a table of times, the speed-up ratios and the
largest difference between the two implementations. The goal of issue 4 is all metrics of one
240×240 triple in at most 0.5 s.

The reference functions follow the text of the specification (``metrics.md``) window by window,
with plain Python loops and, where possible, formulas that differ from the vectorised code (e.g. the
copula cell masses as interval overlaps, the 2-D Gaussian window built directly), so that
``Testing/test_metrics.py`` can also use them as an independent check on small images.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from itertools import accumulate
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "FusionINN") not in sys.path:
    sys.path.insert(0, str(REPO / "FusionINN"))

from FusionINNLib import metrics  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Reference implementations (per window, straight from the specification)
# ------------------------------------------------------------------------------------------------


def _reference_normalise(window: np.ndarray) -> Tuple[np.ndarray, bool]:
    lo, hi = window.min(), window.max()
    if hi == lo:
        return np.ones_like(window), True
    return (window - lo) / (hi - lo), False


def _reference_entropy(values) -> float:
    return -sum(v * math.log2(abs(v)) for v in values if v != 0)


def reference_fmi_pair(s: np.ndarray, f: np.ndarray, paper: bool) -> Tuple[float, np.ndarray]:
    """Score of one 3×3 source window s against fused window f (spec section 1, step 3), and f as
    left for the next pass (normalised unless the identity shortcut fired)."""
    if np.array_equal(s, f):
        return 1.0, f
    s_norm, s_flat = _reference_normalise(s)
    f_norm, f_flat = _reference_normalise(f)
    if not paper:
        if s_flat and f_flat:
            return 1.0, f_norm
        if s_flat or f_flat:
            return 0.0, f_norm
    sv = s_norm.flatten(order="F").tolist()  # column-major
    fv = f_norm.flatten(order="F").tolist()
    total_s, total_f = sum(sv), sum(fv)  # Python's sum adds left to right, as Octave does
    p_s = [v / total_s for v in sv]
    p_f = [v / total_f for v in fv]
    mean_s, mean_f = sum(p_s) / 9, sum(p_f) / 9
    d_s = [v - mean_s for v in p_s]
    d_f = [v - mean_f for v in p_f]
    numerator = sum(x * y for x, y in zip(d_s, d_f))
    if numerator == 0:
        corr = 0.0
    else:
        corr = numerator / math.sqrt(sum(x * x for x in d_s) * sum(y * y for y in d_f))
    positions = range(1, 10)

    def sd(p):
        second_moment = sum(k * k * q for k, q in zip(positions, p))
        mean = sum(k * q for k, q in zip(positions, p))
        return math.sqrt(max(second_moment - mean ** 2, 0.0))

    sd_s, sd_f = sd(p_s), sd(p_f)
    cdf_s = [0.0] + list(accumulate(p_s))
    cdf_f = [0.0] + list(accumulate(p_f))
    # Cell masses of the Fréchet copulas as overlaps of the CDF intervals (comonotone coupling for
    # c ≥ 0: [P_f(i−1), P_f(i)] ∩ [P_s(j−1), P_s(j)]; countermonotone for c < 0:
    # [P_f(i−1), P_f(i)] ∩ [1 − P_s(j), 1 − P_s(j−1)]).
    coupling = np.zeros((9, 9))
    for i in range(9):
        for j in range(9):
            if corr >= 0:
                lo, hi = max(cdf_f[i], cdf_s[j]), min(cdf_f[i + 1], cdf_s[j + 1])
            else:
                lo, hi = max(cdf_f[i], 1 - cdf_s[j + 1]), min(cdf_f[i + 1], 1 - cdf_s[j])
            coupling[i, j] = max(0.0, hi - lo)
    independent = np.outer(p_f, p_s)
    if corr == 0 or sd_s == 0 or sd_f == 0:
        weight = 0.0
    else:
        positions_arr = np.arange(1, 10)
        covariance = float(positions_arr @ coupling @ positions_arr) - (
            sum(k * q for k, q in zip(positions, p_f)) * sum(k * q for k, q in zip(positions, p_s)))
        weight = corr / (covariance / (sd_f * sd_s))
    joint = weight * coupling + (1 - weight) * independent
    h_joint = _reference_entropy(joint.ravel().tolist())
    h_s, h_f = _reference_entropy(p_s), _reference_entropy(p_f)
    mutual = h_s + h_f - h_joint
    score = 0.0 if mutual == 0 else 2 * mutual / (h_s + h_f)
    return score, f_norm


def reference_q_fmi(a: np.ndarray, b: np.ndarray, f: np.ndarray, paper: bool = False,
                    rgb3: bool = False) -> float:
    """Q_FMI with a Python loop over all 3×3 windows; rgb3 builds the H×3W image [X X X] literally."""
    a, b, f = (np.asarray(x, dtype=np.float64) for x in (a, b, f))
    if rgb3:
        a, b, f = (np.hstack([x, x, x]) for x in (a, b, f))
    height, width = f.shape
    scores: List[float] = []
    for r in range(1, height - 1):
        for c in range(1, width - 1):
            window = (slice(r - 1, r + 2), slice(c - 1, c + 2))
            score_af, f_left = reference_fmi_pair(a[window], f[window], paper)
            score_bf, _ = reference_fmi_pair(b[window], f_left if paper else f[window], paper)
            scores.append((score_af + score_bf) / 2)
    return sum(scores) / len(scores)


def _reference_gaussian_window() -> np.ndarray:
    u = np.arange(-5, 6)
    window = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * 1.5 ** 2))
    return window / window.sum()


def reference_ssim_and_piella(a: np.ndarray, b: np.ndarray, f: np.ndarray, data_range: float,
                              flat_tolerance: float = 1e-10) -> Tuple[float, float]:
    """(Q_SSIM, default-mode Q_P) with a Python loop over all 'valid' 11×11 windows."""
    window = _reference_gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    height, width = f.shape
    ssim_sum = piella_sum = 0.0
    count = 0

    def ssim(mx, my, vx, vy, cxy):
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))

    for r in range(height - 10):
        for c in range(width - 10):
            pa, pb, pf = (x[r:r + 11, c:c + 11] for x in (a, b, f))
            mu_a, mu_b, mu_f = (float(np.sum(window * p)) for p in (pa, pb, pf))
            # two-pass (centred) local statistics: no cancellation
            var_a = float(np.sum(window * (pa - mu_a) ** 2))
            var_b = float(np.sum(window * (pb - mu_b) ** 2))
            var_f = float(np.sum(window * (pf - mu_f) ** 2))
            cov_fa = float(np.sum(window * (pf - mu_f) * (pa - mu_a)))
            cov_fb = float(np.sum(window * (pf - mu_f) * (pb - mu_b)))
            s_fa = ssim(mu_f, mu_a, var_f, var_a, cov_fa)
            s_fb = ssim(mu_f, mu_b, var_f, var_b, cov_fb)
            ssim_sum += (s_fa + s_fb) / 2
            if var_a + var_b < flat_tolerance * data_range ** 2:
                weight = 0.5
            else:
                weight = var_a / (var_a + var_b)
            piella_sum += weight * s_fa + (1 - weight) * s_fb
            count += 1
    return ssim_sum / count, piella_sum / count


def reference_q_xy(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Full-image Q^AB/F (spec section 3 on the whole map, zero padding) with a loop over pixels."""
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    ky = kx.T
    padded = [np.pad(np.asarray(x, dtype=np.float64), 1) for x in (a, b, f)]
    height, width = f.shape
    total = 0.0
    for r in range(height):
        for c in range(width):
            strength, angle = [], []
            for p in padded:
                patch = p[r:r + 3, c:c + 3]
                gx, gy = float(np.sum(kx * patch)), float(np.sum(ky * patch))
                strength.append(math.hypot(gx, gy))
                angle.append(math.atan(gy / (gx if gx != 0 else 1e-5)))
            g_a, g_b, g_fused = strength
            q, w = [], []
            for g_s, a_s in ((g_a, angle[0]), (g_b, angle[1])):
                # spec steps 2-3 in their order: compare with the magnitudes as they are, then
                # replace zeros by 1e-5 (the fused one stays adjusted for the second source)
                stronger = g_s > g_fused
                g_s = g_s if g_s != 0 else 1e-5
                ratio_1 = g_fused / g_s
                g_fused = g_fused if g_fused != 0 else 1e-5
                ratio_2 = g_s / g_fused
                ratio = ratio_1 if stronger else ratio_2
                orient = abs(abs(a_s - angle[2]) - math.pi / 2) * 2 / math.pi
                q_strength = 1 / (1 + math.exp(-10 * (ratio - 0.5)))
                q_orient = 1 / (1 + math.exp(-20 * (orient - 0.75)))
                q.append(q_strength * q_orient)
                w.append(g_s)
            total += (q[0] * w[0] + q[1] * w[1]) / (w[0] + w[1])
    return total / (height * width)


def _fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    """MATLAB fspecial('gaussian', size, sigma): 2-D, tiny values zeroed, normalised."""
    half = (size - 1) / 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(float).eps * kernel.max()] = 0
    return kernel / kernel.sum()


def reference_viff(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """VIFF of Han et al. (2013) on 0..255 data, step by step with 2-D 'valid' correlations."""
    from scipy.signal import correlate2d

    noise_var = 0.005 * 255 * 255
    weights = [1, 0, 0.15, 1]

    def scale_maps(ref, dist):
        out = []
        for scale in range(1, 5):
            size = 2 ** (4 - scale + 1) + 1
            kernel = _fspecial_gaussian(size, size / 5)
            if scale > 1:
                ref = correlate2d(ref, kernel, mode="valid")[::2, ::2]
                dist = correlate2d(dist, kernel, mode="valid")[::2, ::2]
            mu1, mu2 = correlate2d(ref, kernel, mode="valid"), correlate2d(dist, kernel, mode="valid")
            s1 = np.maximum(correlate2d(ref * ref, kernel, mode="valid") - mu1 * mu1, 0)
            s2 = np.maximum(correlate2d(dist * dist, kernel, mode="valid") - mu2 * mu2, 0)
            s12 = correlate2d(ref * dist, kernel, mode="valid") - mu1 * mu2
            g = s12 / (s1 + 1e-10)
            sv = s2 - g * s12
            g[s1 < 1e-10] = 0
            sv[s1 < 1e-10] = s2[s1 < 1e-10]
            s1[s1 < 1e-10] = 0
            g[s2 < 1e-10] = 0
            sv[s2 < 1e-10] = 0
            sv[g < 0] = s2[g < 0]
            g[g < 0] = 0
            sv[sv <= 1e-10] = 1e-10
            out.append((np.log10(1 + g * g * s1 / (sv + noise_var)), np.log10(1 + s1 / noise_var), g))
        return out

    total = 0.0
    for weight, (vid_a, vind_a, g_a), (vid_b, vind_b, g_b) in zip(weights, scale_maps(a, f), scale_maps(b, f)):
        take_a = g_a < g_b
        vid = np.where(take_a, vid_a, vid_b)
        vind = np.where(take_a, vind_a, vind_b)
        total += weight / 2.15 * np.sum(vid + 1e-7) / np.sum(vind + 1e-7)
    return float(total)


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------


def synthetic_triple(size: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured float triple in [0, 1]: smooth noise plus an ellipse, F = pixel-wise mean."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ellipse = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.45) / 0.4) ** 2 < 1
    a = ndimage.gaussian_filter(rng.random((size, size)), 2) + 0.3 * ellipse
    b = ndimage.gaussian_filter(rng.random((size, size)), 3) + 0.2 * (xx > 0.6)
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    return a, b, (a + b) / 2


def _time_once(function: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _median_time(function: Callable[[], object], repeat: int) -> Tuple[float, object]:
    result = function()  # warm-up (imports, caches)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(size: int, repeat: int, seed: int) -> Dict[str, float]:
    a, b, f = synthetic_triple(size, seed)
    data_range = 1.0
    rows = []
    suite_default, result_default = _median_time(lambda: metrics.fusion_metrics(a, b, f), repeat)
    suite_paper, _ = _median_time(lambda: metrics.fusion_metrics(a, b, f, paper_compatible=True), repeat)

    fast_fmi, value_fmi = _median_time(lambda: metrics.q_fmi(a, b, f, data_range=data_range), repeat)
    ref_fmi, ref_value_fmi = _time_once(lambda: reference_q_fmi(a, b, f))
    rows.append(("Q_FMI (default)", fast_fmi, ref_fmi, abs(value_fmi - ref_value_fmi)))

    fast_ssim, value_ssim = _median_time(lambda: metrics.q_ssim(a, b, f, data_range=data_range), repeat)
    fast_qp, value_qp = _median_time(lambda: metrics.q_p(a, b, f, data_range=data_range), repeat)
    ref_sp, (ref_ssim, ref_qp) = _time_once(lambda: reference_ssim_and_piella(a, b, f, data_range))
    rows.append(("Q_SSIM + Q_P", fast_ssim + fast_qp, ref_sp,
                 max(abs(value_ssim - ref_ssim), abs(value_qp - ref_qp))))

    fast_xy, value_xy = _median_time(lambda: metrics.q_xy(a, b, f, data_range=data_range), repeat)
    ref_xy, ref_value_xy = _time_once(lambda: reference_q_xy(a * 255, b * 255, f * 255))
    rows.append(("Q_XY (full image)", fast_xy, ref_xy, abs(value_xy - ref_value_xy)))

    print(f"FusionINNLib.metrics benchmark: one {size}x{size} float64 triple, median of {repeat} runs "
          f"(references: 1 run), numpy {np.__version__}")
    print()
    print(f"| {'what':28s} | {'vectorised [ms]':>15s} | {'reference [ms]':>14s} | {'speed-up':>8s} "
          f"| {'max |diff|':>10s} |")
    print(f"|{'-' * 30}|{'-' * 17}|{'-' * 16}|{'-' * 10}|{'-' * 12}|")
    for name, fast, ref, diff in rows:
        print(f"| {name:28s} | {fast * 1e3:15.1f} | {ref * 1e3:14.0f} | {ref / fast:7.0f}x | {diff:10.1e} |")
    print(f"| {'all 14 metrics, default mode':28s} | {suite_default * 1e3:15.1f} | {'':>14s} | {'':>8s} | {'':>10s} |")
    print(f"| {'all 14 metrics, paper mode':28s} | {suite_paper * 1e3:15.1f} | {'':>14s} | {'':>8s} | {'':>10s} |")
    print()
    goal = 0.5
    worst = max(suite_default, suite_paper)
    if size == 240:
        print(f"goal: all metrics of one 240x240 triple <= {goal:.1f} s -> {'met' if worst <= goal else 'NOT met'} "
              f"({worst:.3f} s, slower mode)")
    else:
        print(f"all metrics of one {size}x{size} triple: {worst:.3f} s (slower mode); the goal is stated for 240x240")
    print("summary (default mode):", {k: round(v, 6) for k, v in result_default["summary"].items()})
    return {"suite_default": suite_default, "suite_paper": suite_paper, "fmi_speedup": ref_fmi / fast_fmi}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=240, help="image side in pixels (default 240)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of the vectorised code (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic triple")
    args = parser.parse_args(argv)
    if args.size < 41:
        parser.error("--size must be at least 41 (VIFF needs 41x41)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    run(args.size, args.repeat, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
