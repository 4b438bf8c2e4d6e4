"""Tests of FusionINNLib.metrics and FusionINNLib.metrics.baselines.

Three independent sources of truth:
* the reference values of ../shared/spec/metric-vectors (GNU Octave running the FusionINN authors'
  MATLAB files; skipped when ../shared is absent), compared to 1e-12 in float64 as the spec says;
* the per-window reference implementations in Testing/benchmarks/bench_metrics.py (plain loops,
  partly different formulas), on small generated images — these always run;
* mathematical identities (symmetry, F = A, constant images, masks, dtypes, 3-D slicing).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from FusionINNLib.metrics import MetricWarning, baselines
from FusionINNLib.metrics import quality as metrics  # the module itself: the tests reach its private helpers

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO.parent / "shared" / "spec" / "metric-vectors"
SPEC_TOLERANCE = 1e-12  # the spec's float64 agreement with the authors' code

_bench_spec = importlib.util.spec_from_file_location("bench_metrics", REPO / "Testing" / "benchmarks"
                                                     / "bench_metrics.py")
bench = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(bench)


# ------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ------------------------------------------------------------------------------------------------

def smooth_image(seed: int, size=32, sigma=1.5) -> np.ndarray:
    """Textured float image in [0, 1] (min 0, max 1 exactly)."""
    shape = (size, size) if np.isscalar(size) else size
    x = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return (x - x.min()) / (x.max() - x.min())


def triple(size=32):
    a, b = smooth_image(1, size), smooth_image(2, size)
    f = (a + b) / 2
    return a, b, (f - f.min()) / (f.max() - f.min())


def recorded(function, *args, **kwargs):
    """Call and return (result, list of MetricWarning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        result = function(*args, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, MetricWarning)]


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def metric_vectors():
    """The spec's test triples (uint8 arrays) and reference values; skips when ../shared is absent."""
    if not VECTORS.is_dir():
        pytest.skip("../shared/spec/metric-vectors is not present on this machine")
    import SimpleITK as sitk

    cases = {}
    for line in (VECTORS / "values.jsonl").read_text().splitlines():
        row = json.loads(line)
        images = {}
        for role in "ABF":
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(VECTORS / f"{role}_{row['id']}.png")))
            assert array.dtype == np.uint8 and array.shape == tuple(row["size"])
            assert hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest() == row["pix_md5"][role]
            images[role] = array
        cases[row["id"]] = (images["A"], images["B"], images["F"], row)
    return cases


VECTOR_IDS = ["avg", "fa", "max", "phantom", "phantom_bg1"]


# ------------------------------------------------------------------------------------------------
# Spec reference vectors (authors' code under Octave)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", VECTOR_IDS)
def test_vectors_paper_mode_per_metric(metric_vectors, case):
    a, b, f, ref = metric_vectors[case]
    assert metrics.q_fmi(a, b, f, paper_compatible=True, rgb3=False) == pytest.approx(ref["Q_FMI"], abs=SPEC_TOLERANCE)
    assert metrics.q_fmi(a, b, f, paper_compatible=True) == pytest.approx(ref["Q_FMI_rgb3"], abs=SPEC_TOLERANCE)
    assert metrics.q_ncie(a, b, f, paper_compatible=True) == pytest.approx(ref["Q_NCIE"], abs=SPEC_TOLERANCE)
    assert metrics.q_xy(a, b, f, paper_compatible=True) == pytest.approx(ref["Q_XY"], abs=SPEC_TOLERANCE)
    assert metrics.q_p(a, b, f, paper_compatible=True) == pytest.approx(ref["Q_P"], abs=SPEC_TOLERANCE)
    assert metrics.q_ssim(a, b, f, paper_compatible=True) == pytest.approx(ref["Q_SSIM"], abs=SPEC_TOLERANCE)


@pytest.mark.parametrize("case", VECTOR_IDS)
def test_vectors_paper_mode_suite(metric_vectors, case):
    a, b, f, ref = metric_vectors[case]
    result = metrics.fusion_metrics(a, b, f, paper_compatible=True)
    summary = result["summary"]
    assert list(summary) == list(metrics.FUSION_METRIC_NAMES)
    assert result["per_slice"] == {}
    expected = {"Q_FMI": ref["Q_FMI_rgb3"], "QABF": ref["Q_XY_liu"]}
    for name in ("Q_SSIM", "Q_NCIE", "Q_XY", "Q_P", "MI", "NMI", "EN", "AG", "PSNR"):
        expected[name] = ref[name]
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, abs=SPEC_TOLERANCE), name


@pytest.mark.parametrize("case", VECTOR_IDS)
def test_vectors_default_mode_is_the_intended_full_image_definition(metric_vectors, case):
    a, b, f, ref = metric_vectors[case]
    summary = metrics.fusion_metrics(a, b, f)["summary"]
    expected = {"Q_XY": ref["Q_XY_liu"], "QABF": ref["Q_XY_liu"], "Q_P": ref["Q_P_liu"],
                "Q_FMI": ref["Q_FMI"], "Q_SSIM": ref["SSIM_liu_ssim_index"]}
    for name in ("Q_NCIE", "MI", "NMI", "EN", "AG", "PSNR"):
        expected[name] = ref[name]
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, abs=SPEC_TOLERANCE), name
    assert summary["Q_SSIM"] == pytest.approx(ref["Q_SSIM"], abs=SPEC_TOLERANCE)


def test_vectors_phantom_bg1_depends_on_the_sequential_sum(metric_vectors):
    # The fused background is 1 over a 0 source background: both windows flat but not identical.
    # The authors' sequential sum makes them agree (score 1); a pairwise sum would give 0.
    a, b, f, ref = metric_vectors["phantom_bg1"]
    nine_ninths = np.full((9, 1), 1 / 9)
    assert metrics._sequential_sum(nine_ninths)[0] == 1.0000000000000002
    assert np.sum(nine_ninths) == 1.0
    windows = [metrics._fmi_windows(x.astype(np.float64)) for x in (a, b, f)]
    both_flat = (np.ptp(windows[0], axis=0) == 0) & (np.ptp(windows[2], axis=0) == 0) & np.any(
        windows[0] != windows[2], axis=0)
    assert both_flat.sum() > 0
    paper_scores = metrics._fmi_window_scores(*windows, True)
    assert np.allclose(paper_scores[both_flat & (np.ptp(windows[1], axis=0) == 0)], 1.0, atol=1e-12)
    assert metrics.q_fmi(a, b, f, paper_compatible=True, rgb3=False) == pytest.approx(ref["Q_FMI"], abs=SPEC_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# Vectorised code against the per-window reference implementations (always run)
# ------------------------------------------------------------------------------------------------

def structured_triple(seed: int, size=(10, 12)):
    """Small integer images with every FMI case: flat background at different levels, identical
    regions, point-mass (one bright pixel) windows, inverted (negatively correlated) patches."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size).astype(np.float64)
    b = rng.integers(0, 6, size).astype(np.float64)
    f = np.round((a + b) / 2)
    a[:3, :4] = 0
    b[:3, :4] = 0
    f[:3, :4] = 1  # flat against flat at another level
    a[5:8, 0:3] = 0
    a[6, 1] = 7
    f[5:8, 0:3] = 0
    f[6, 1] = 3  # same point mass at another height
    f[-3:, -4:] = a[-3:, -4:]  # F = A here
    f[:3, -3:] = 10 - b[:3, -3:]  # inverted B: negative correlation
    # uint8: paper mode scores 8-bit inputs as they are (other dtypes go through the PNG quantisation)
    return tuple(x.astype(np.uint8) for x in (a, b, f))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("paper", [False, True])
def test_q_fmi_matches_the_per_window_reference(seed, paper):
    a, b, f = structured_triple(seed)
    expected = bench.reference_q_fmi(a, b, f, paper=paper)
    assert metrics.q_fmi(a, b, f, paper_compatible=paper, rgb3=False) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_q_fmi_rgb3_matches_the_literal_side_by_side_image(seed):
    a, b, f = structured_triple(seed, size=(7, 9))
    expected = bench.reference_q_fmi(a, b, f, paper=True, rgb3=True)
    assert metrics.q_fmi(a, b, f, paper_compatible=True, rgb3=True) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(3, 6), st.integers(3, 6)), elements=st.integers(0, 3)),
       st.integers(0, 2**32 - 1), st.booleans())
def test_q_fmi_matches_the_reference_on_arbitrary_small_images(a, seed, paper):
    # few grey levels: many flat, identical, point-mass and tied windows
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 4, a.shape).astype(np.uint8)
    f = np.where(rng.random(a.shape) < 0.5, a, rng.integers(0, 4, a.shape)).astype(np.uint8)
    expected = bench.reference_q_fmi(a, b, f, paper=paper)
    value = quiet(metrics.q_fmi, a, b, f, paper_compatible=paper, rgb3=False)
    assert value == pytest.approx(expected, abs=1e-12)


def test_q_ssim_and_q_p_match_the_per_window_reference():
    a, b, f = triple(20)
    a[:, :6] = 0.25  # flat strip in both sources: λ = 0.5 there
    b[:, :6] = 0.75
    expected_ssim, expected_qp = bench.reference_ssim_and_piella(a, b, f, 1.0)
    assert metrics.q_ssim(a, b, f, data_range=1) == pytest.approx(expected_ssim, abs=1e-12)
    assert metrics.q_p(a, b, f, data_range=1) == pytest.approx(expected_qp, abs=1e-12)


def test_q_xy_matches_the_per_pixel_reference():
    a, b, f = (np.round(x * 20) for x in triple(14))
    a[:4, :4] = 0  # zero gradients in every combination
    f[:4, :2] = 0
    b[-4:, :] = 3
    expected = bench.reference_q_xy(a, b, f)
    assert metrics.q_xy(a, b, f, data_range=255) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("size", [48, 57])
def test_viff_matches_the_straightforward_reference(size):
    a, b, f = (np.round(x * 255) for x in triple(size))
    f[:10, :10] = 0  # flat corner: guards of the VIF model
    a[:12, :12] = 40
    expected = bench.reference_viff(a, b, f)
    assert metrics.viff(a, b, f, data_range=255) == pytest.approx(expected, abs=1e-12)
    assert metrics.viff(a / 255, b / 255, f / 255, data_range=1) == pytest.approx(expected, abs=1e-12)


def test_masked_q_xy_is_the_mean_of_the_map_over_the_mask():
    a, b, f = triple(24)
    mask = np.zeros(a.shape, bool)
    mask[3:15, 5:20] = True
    q_map = metrics._qxy_map(a * 255, b * 255, f * 255)
    assert metrics.q_xy(a, b, f, mask=mask) == pytest.approx(q_map[mask].mean(), abs=1e-14)


# ------------------------------------------------------------------------------------------------
# SSIM against pytorch-msssim
# ------------------------------------------------------------------------------------------------

def _pytorch_q_ssim(a, b, f, dtype):
    import torch
    from pytorch_msssim import ssim

    def tensor(x):
        return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype)[None, None]

    return 0.5 * (ssim(tensor(f), tensor(a), data_range=1).item() + ssim(tensor(f), tensor(b), data_range=1).item())


def test_q_ssim_equals_pytorch_msssim_on_float_inputs():
    import torch

    a, b, f = triple(40)
    ours = metrics.q_ssim(a, b, f)
    # pytorch-msssim builds its Gaussian window in float32 even for float64 images; that rounding
    # alone moves SSIM by ~5e-7 (the next test shows it is the only difference).
    assert ours == pytest.approx(_pytorch_q_ssim(a, b, f, torch.float64), abs=2e-6)
    # In float32 (as in the paper) the agreement is the spec's 1e-5.
    assert ours == pytest.approx(_pytorch_q_ssim(a, b, f, torch.float32), abs=1e-5)


def test_q_ssim_on_unstretched_floats_matches_pytorch_msssim_with_data_range_1():
    import torch

    a, b, f = triple(40)
    f_sigmoid = 0.05 + 0.9 * f  # inside [0, 1] without spanning it, like a sigmoid output
    expected = _pytorch_q_ssim(a, b, f_sigmoid, torch.float64)
    assert metrics.q_ssim(a, b, f_sigmoid, data_range=1) == pytest.approx(expected, abs=2e-6)
    assert metrics.q_ssim(a, b, f_sigmoid, paper_compatible=True) == pytest.approx(expected, abs=2e-6)
    assert metrics.q_ssim(a, b, f_sigmoid) != pytest.approx(expected, abs=1e-3)  # stretched by default


def test_q_ssim_with_pytorch_msssims_float32_window_is_bit_close(monkeypatch):
    import torch
    from pytorch_msssim.ssim import _fspecial_gauss_1d

    a, b, f = triple(40)
    window32 = _fspecial_gauss_1d(11, 1.5).flatten().to(torch.float64).numpy()  # float32 values
    assert np.abs(window32 - metrics._SSIM_WINDOW).max() > 1e-9  # the windows do differ
    monkeypatch.setattr(metrics, "_SSIM_WINDOW", window32)
    assert metrics.q_ssim(a, b, f) == pytest.approx(_pytorch_q_ssim(a, b, f, torch.float64), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Identities and properties
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", [False, True])
def test_all_metrics_are_symmetric_in_the_two_sources(paper):
    a, b, f = triple(48)
    forward = metrics.fusion_metrics(a, b, f, paper_compatible=paper)["summary"]
    swapped = metrics.fusion_metrics(b, a, f, paper_compatible=paper)["summary"]
    for name in metrics.FUSION_METRIC_NAMES:
        assert forward[name] == pytest.approx(swapped[name], abs=1e-12), name


def test_perfect_fusion_of_identical_images():
    a = smooth_image(4, 48)
    with pytest.warns(MetricWarning, match="PSNR is \\+inf"):
        result = metrics.fusion_metrics(a, a, a)
    s = result["summary"]
    for name in ("Q_SSIM", "Q_P", "Q_FMI"):
        assert s[name] == pytest.approx(1.0, abs=1e-12), name
    assert s["NMI"] == pytest.approx(2.0, abs=1e-12)
    assert s["Q_XY"] == pytest.approx(1 / (1 + math.exp(-5)) ** 2, abs=1e-12)  # the authors' sigmoids
    assert s["QABF"] == s["Q_XY"]
    assert s["VIFF"] == pytest.approx(1.0, abs=1e-9)
    assert s["PSNR"] == math.inf
    assert s["MI"] == pytest.approx(2 * s["EN"], abs=1e-12)  # MI(A, A) = H(A)
    assert any("PSNR" in note for note in result["notes"])


def test_fused_equal_to_one_source():
    a, b, _ = triple(48)
    s = metrics.fusion_metrics(a, b, a)["summary"]
    assert s["EN"] == pytest.approx(metrics.entropy(a), abs=1e-12)
    ssim_ab = metrics.decomposition_ssim(b, a)
    assert s["Q_SSIM"] == pytest.approx((1 + ssim_ab) / 2, abs=1e-12)
    mse = np.mean((a - b) ** 2) / 2
    assert s["PSNR"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-10)


def test_constant_images_give_defined_values_and_notes():
    zeros = np.zeros((48, 48))
    result, messages = recorded(metrics.fusion_metrics, zeros, zeros, zeros)
    assert sum("constant" in m for m in messages) == 3 and any("PSNR" in m for m in messages)
    s = result["summary"]
    assert s["Q_FMI"] == 1.0  # flat windows agree perfectly
    assert s["Q_SSIM"] == 1.0 and s["Q_P"] == 1.0
    assert s["EN"] == 0.0 and math.copysign(1, s["EN"]) == 1  # not -0.0
    assert s["MI"] == 0.0 and s["AG"] == 0.0 and s["SD"] == 0.0 and s["SF"] == 0.0
    assert s["NMI"] == 2.0  # 0/0 terms take the value of identical images
    assert s["VIFF"] == pytest.approx(1.0, abs=1e-12)
    assert s["Q_NCIE"] == pytest.approx(1 - math.log2(3) / 8, abs=1e-12)  # R = identity
    assert s["PSNR"] == math.inf
    assert sum("constant" in note for note in result["notes"]) == 3


def test_constant_fused_image_against_textured_sources():
    a, b, _ = triple(48)
    with pytest.warns(MetricWarning, match="fused is constant"):
        s = metrics.fusion_metrics(a, b, np.full(a.shape, 0.3))["summary"]
    assert all(math.isfinite(v) for v in s.values())
    assert s["Q_FMI"] == pytest.approx(0.0, abs=1e-12)  # flat against textured shares nothing
    assert s["MI"] == pytest.approx(0.0, abs=1e-12)
    assert s["EN"] == 0.0


def test_paper_mode_constant_nonzero_image_is_nan_for_ncie_and_nmi():
    a, b, _ = (np.round(x * 255).astype(np.uint8) for x in triple(48))
    constant = np.full(a.shape, 7, dtype=np.uint8)
    with pytest.warns(MetricWarning, match="normalize1"):
        result = metrics.fusion_metrics(a, b, constant, paper_compatible=True)
    assert math.isnan(result["summary"]["Q_NCIE"]) and math.isnan(result["summary"]["NMI"])
    default = quiet(metrics.fusion_metrics, a, b, constant)["summary"]
    assert math.isfinite(default["Q_NCIE"]) and math.isfinite(default["NMI"])


def test_ncie_negative_eigenvalue_gives_nan_with_a_warning(monkeypatch):
    # F very informative about A and B while A, B share nothing: R is not positive semidefinite.
    values = iter([0.0, 0.9, 0.9])  # NCC(A,B), NCC(A,F), NCC(B,F)
    monkeypatch.setattr(metrics, "_ncc", lambda x, y: next(values))
    levels = np.arange(256).reshape(16, 16)
    with pytest.warns(MetricWarning, match="negative eigenvalue"):
        value = metrics._core_q_ncie(levels, levels + 0, levels + 0, None, False)
    assert math.isnan(value)


def test_mask_covering_everything_equals_no_mask():
    a, b, f = triple(48)
    plain = metrics.fusion_metrics(a, b, f)["summary"]
    masked = metrics.fusion_metrics(a, b, f, mask=np.ones(a.shape, np.uint8))["summary"]
    assert plain == masked


def test_mask_restricts_histogram_and_intensity_metrics():
    a, b, f = triple(48)
    mask = np.zeros(a.shape, bool)
    mask[10:30, 5:40] = True
    s = metrics.fusion_metrics(a, b, f, mask=mask)["summary"]
    levels = np.floor(f[mask] * 255 + 0.5).astype(int)
    counts = np.bincount(levels, minlength=256)
    p = counts[counts > 0] / counts.sum()
    assert s["EN"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-12)
    assert s["SD"] == pytest.approx(f[mask].std(), abs=1e-12)
    mse = (np.mean((a[mask] - f[mask]) ** 2) + np.mean((b[mask] - f[mask]) ** 2)) / 2
    assert s["PSNR"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-10)
    assert s != metrics.fusion_metrics(a, b, f)["summary"]


def test_empty_mask_is_refused_not_a_table_of_nan():
    a, b, f = triple(48)
    with pytest.raises(ValueError, match="the mask is empty"):
        metrics.fusion_metrics(a, b, f, mask=np.zeros(a.shape, bool))
    with pytest.raises(ValueError, match="the mask is empty"):
        metrics.decomposition_metrics(a, f, mask=np.zeros(a.shape, bool))


def test_tiny_images_give_nan_for_windowed_metrics_only():
    a, b, f = triple(8)
    with pytest.warns(MetricWarning, match="smaller than"):
        s = metrics.fusion_metrics(a, b, f)["summary"]
    for name in ("Q_SSIM", "Q_P", "VIFF"):
        assert math.isnan(s[name]), name
    for name in ("Q_FMI", "Q_NCIE", "Q_XY", "EN", "AG", "SD", "SF", "MI", "NMI", "PSNR", "QABF"):
        assert math.isfinite(s[name]), name


# ------------------------------------------------------------------------------------------------
# Intensity scale and dtypes
# ------------------------------------------------------------------------------------------------

def uint8_triple(size=48):
    a, b, f = triple(size)
    return tuple(np.round(x * 255).astype(np.uint8) for x in (a, b, f))


def test_uint8_is_scored_on_0_255_and_floats_on_0_1():
    a8, b8, f8 = uint8_triple()  # each spans 0..255, so min-max of x/255 is x/255 itself
    eight_bit = metrics.fusion_metrics(a8, b8, f8)["summary"]
    floats = metrics.fusion_metrics(*(x / 255.0 for x in (a8, b8, f8)))["summary"]
    for name in ("Q_SSIM", "Q_FMI", "Q_NCIE", "Q_XY", "Q_P", "EN", "MI", "NMI", "PSNR", "VIFF", "QABF"):
        assert eight_bit[name] == pytest.approx(floats[name], abs=1e-12), name
    for name in ("AG", "SD", "SF"):  # scale-dependent: factor 255
        assert eight_bit[name] == pytest.approx(255 * floats[name], rel=1e-12), name


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.float32])
def test_other_dtypes_are_min_max_normalised(dtype):
    a8, b8, f8 = uint8_triple()
    converted = [x.astype(dtype) * 3 - (100 if dtype in (np.int16, np.int32) else 0) for x in (a8, b8, f8)]
    expected = metrics.fusion_metrics(*(x / 255.0 for x in (a8, b8, f8)))["summary"]
    got = metrics.fusion_metrics(*converted)["summary"]
    for name in metrics.FUSION_METRIC_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=1e-6 if dtype == np.float32 else 1e-12), name


def test_bool_images_are_accepted():
    a = np.zeros((48, 48), bool)
    a[10:30, 10:30] = True
    b = np.zeros((48, 48), bool)
    b[20:40, 5:25] = True
    s = metrics.fusion_metrics(a, b, a | b)["summary"]
    assert all(not math.isnan(v) for v in s.values())


def test_mixed_uint8_and_float_inputs_are_normalised_with_a_note():
    a8, b8, f8 = uint8_triple()
    with pytest.warns(MetricWarning, match="mix uint8"):
        result = metrics.fusion_metrics(a8, b8, f8 / 255.0)
    assert any("mix uint8" in note for note in result["notes"])


def test_data_range_uses_values_as_they_are():
    a, b, f = triple(48)
    f_dim = 0.2 + 0.5 * f  # not spanning [0, 1]: the default rule would stretch it
    stretched = metrics.fusion_metrics(a, b, f_dim)["summary"]
    raw = metrics.fusion_metrics(a, b, f_dim, data_range=1.0)["summary"]
    assert raw["SD"] == pytest.approx(f_dim.std(), abs=1e-12)
    assert stretched["SD"] == pytest.approx(f.std(), abs=1e-12)
    assert raw["Q_SSIM"] != pytest.approx(stretched["Q_SSIM"], abs=1e-3)
    # data_range scales like the data: the same images ×1000 with data_range 1000 score the same
    scaled = metrics.fusion_metrics(a * 1000, b * 1000, f_dim * 1000, data_range=1000.0)["summary"]
    for name in ("Q_SSIM", "Q_FMI", "Q_NCIE", "Q_XY", "Q_P", "PSNR", "VIFF", "MI", "NMI", "EN"):
        assert scaled[name] == pytest.approx(raw[name], abs=1e-9), name


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_invalid_data_range_raises(bad):
    a, b, f = triple(16)
    with pytest.raises(ValueError, match="data_range"):
        metrics.fusion_metrics(a, b, f, data_range=bad)


def test_paper_mode_quantises_float_inputs_like_the_authors_pngs():
    a, b, f = triple(48)
    f_unit = 0.1 + 0.8 * f  # a sigmoid-like output inside [0, 1]: imsave(vmin=0, vmax=1) keeps it
    a8 = metrics.quantise_like_matplotlib(a).astype(np.uint8)  # sources: autoscaled (already 0..1)
    b8 = metrics.quantise_like_matplotlib(b).astype(np.uint8)
    f8 = metrics.quantise_like_matplotlib(f_unit).astype(np.uint8)
    from_floats = metrics.fusion_metrics(a, b, f_unit, paper_compatible=True)["summary"]
    from_pngs = metrics.fusion_metrics(a8, b8, f8, paper_compatible=True)["summary"]
    for name in metrics.FUSION_METRIC_NAMES:
        if name != "Q_SSIM":
            assert from_floats[name] == pytest.approx(from_pngs[name], abs=1e-12), name
    # Q_SSIM: the paper scored the unquantised float tensors
    assert from_floats["Q_SSIM"] == pytest.approx(metrics.q_ssim(a, b, f_unit, data_range=1), abs=1e-12)


def test_matplotlib_quantisation_levels_of_the_spec():
    levels = metrics.quantise_like_matplotlib((np.arange(256) + 0.5) / 256)
    one_lower = {33, 37, 41, 45, 49, 53, 57, 61, 66, 74, 82, 90, 98, 106, 114, 122, 132, 148, 164, 180,
                 196, 212, 228, 244}
    expected = np.array([k - 1 if k in one_lower else k for k in range(256)])
    np.testing.assert_array_equal(levels, expected)
    assert set(metrics.quantise_like_matplotlib(np.array([-0.5, 0.0, 1.0, 1.5])).tolist()) == {0, 255}


# ------------------------------------------------------------------------------------------------
# 3-D volumes
# ------------------------------------------------------------------------------------------------

def volume_triple():
    a = np.zeros((5, 48, 48))
    b = np.zeros((5, 48, 48))
    for k in (1, 2, 3):
        a[k] = smooth_image(10 + k, 48)
        b[k] = smooth_image(20 + k, 48)
    return a, b, (a + b) / 2


def test_volume_metrics_are_per_slice_and_averaged_over_foreground():
    a, b, f = volume_triple()
    result = metrics.fusion_metrics(a, b, f, data_range=1.0)
    assert set(result["per_slice"]) == set(metrics.FUSION_METRIC_NAMES)
    for name in metrics.FUSION_METRIC_NAMES:
        values = result["per_slice"][name]
        assert len(values) == 5
        assert math.isnan(values[0]) and math.isnan(values[4])  # background slices
        for k in (1, 2, 3):
            expected = metrics.fusion_metrics(a[k], b[k], f[k], data_range=1.0)["summary"][name]
            assert values[k] == pytest.approx(expected, abs=1e-12), (name, k)
        assert result["summary"][name] == pytest.approx(np.mean(values[1:4]), abs=1e-12)
    assert "3 of 5 slices" in result["notes"][0]


def test_volume_axis_argument():
    a, b, f = volume_triple()
    along_0 = metrics.fusion_metrics(a, b, f, data_range=1.0)
    moved = [np.moveaxis(x, 0, 2) for x in (a, b, f)]
    along_2 = metrics.fusion_metrics(*moved, data_range=1.0, axis=2)
    along_last = metrics.fusion_metrics(*moved, data_range=1.0, axis=-1)
    assert along_0["summary"] == along_2["summary"] == along_last["summary"]
    with pytest.raises(ValueError, match="axis"):
        metrics.fusion_metrics(a, b, f, axis=3)
    with pytest.raises(ValueError, match="axis"):
        metrics.fusion_metrics(a, b, f, axis=-4, mask=np.zeros(a.shape))


def test_volume_default_mode_normalises_per_volume():
    a, b, f = volume_triple()
    result = metrics.fusion_metrics(a * 40 + 5, b * 40 + 5, f * 7)  # arbitrary units per volume
    reference = metrics.fusion_metrics(a, b, f / f.max(), data_range=1.0)
    for name in metrics.FUSION_METRIC_NAMES:
        assert result["summary"][name] == pytest.approx(reference["summary"][name], abs=1e-10), name


def test_volume_paper_mode_scores_each_slice_like_the_authors():
    a, b, f = volume_triple()
    result = metrics.fusion_metrics(a, b, f, paper_compatible=True)
    for k in (1, 2, 3):
        expected = metrics.fusion_metrics(a[k], b[k], f[k], paper_compatible=True)["summary"]
        for name in metrics.FUSION_METRIC_NAMES:
            assert result["per_slice"][name][k] == pytest.approx(expected[name], abs=1e-12), name


def test_volume_mask_selects_slices_and_pixels():
    a, b, f = volume_triple()
    mask = np.zeros(a.shape, bool)
    mask[2, 10:40, 10:40] = True
    result = metrics.fusion_metrics(a, b, f, mask=mask, data_range=1.0)
    expected = metrics.fusion_metrics(a[2], b[2], f[2], mask=mask[2], data_range=1.0)["summary"]
    assert result["summary"] == pytest.approx(expected, abs=1e-12)
    assert math.isnan(result["per_slice"]["Q_FMI"][1])


def test_volume_without_foreground():
    zeros = np.zeros((3, 16, 16))
    result, messages = recorded(metrics.fusion_metrics, zeros, zeros, zeros)
    assert any("no slice" in m for m in messages)
    assert all(math.isnan(v) for v in result["summary"].values())
    assert all(math.isnan(v) for values in result["per_slice"].values() for v in values)


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, message", [
    ((np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8))), "source2: shape"),
    ((np.zeros(8), np.zeros(8), np.zeros(8)), "2-D image or a 3-D volume"),
    ((np.zeros((8, 8)), np.full((8, 8), np.nan), np.zeros((8, 8))), "source2: contains NaN"),
    ((np.zeros((8, 8), complex), np.zeros((8, 8)), np.zeros((8, 8))), "complex"),
    ((np.array([["a"] * 8] * 8), np.zeros((8, 8)), np.zeros((8, 8))), "numeric"),
    ((np.zeros((0, 8)), np.zeros((0, 8)), np.zeros((0, 8))), "empty"),
])
def test_bad_inputs_raise_clear_errors(images, message):
    with pytest.raises(ValueError, match=message):
        metrics.fusion_metrics(*images)


def test_bad_mask_raises():
    a, b, f = triple(16)
    with pytest.raises(ValueError, match="mask: shape"):
        metrics.fusion_metrics(a, b, f, mask=np.ones((16, 15)))


def test_per_metric_functions_reject_volumes():
    a, b, f = volume_triple()
    with pytest.raises(ValueError, match="fusion_metrics"):
        metrics.q_fmi(a, b, f)


# ------------------------------------------------------------------------------------------------
# Decomposition metrics, descriptions
# ------------------------------------------------------------------------------------------------

def test_decomposition_metrics_identity_and_offset():
    x = smooth_image(7, 32)
    with pytest.warns(MetricWarning, match="PSNR is \\+inf"):
        same = metrics.decomposition_metrics(x, x)["summary"]
    assert same == {"SSIM": pytest.approx(1.0, abs=1e-12), "PSNR": math.inf, "MAE": 0.0}
    shifted = metrics.decomposition_metrics(x * 0.5, x * 0.5 + 0.1, data_range=1.0)["summary"]
    assert shifted["MAE"] == pytest.approx(0.1, abs=1e-12)
    assert shifted["PSNR"] == pytest.approx(20.0, abs=1e-9)  # MSE = 0.01
    assert shifted["SSIM"] < 1


def test_decomposition_metrics_on_volumes():
    a, _, f = volume_triple()
    result = metrics.decomposition_metrics(a, f, data_range=1.0)
    assert list(result["summary"]) == list(metrics.DECOMPOSITION_METRIC_NAMES)
    single = {"SSIM": metrics.decomposition_ssim, "PSNR": metrics.decomposition_psnr, "MAE": metrics.decomposition_mae}
    for k in (1, 2, 3):
        for name, function in single.items():
            expected = function(a[k], f[k], data_range=1.0)
            assert result["per_slice"][name][k] == pytest.approx(expected, abs=1e-12), (name, k)


def test_metric_descriptions_cover_every_reported_name():
    names = set(metrics.FUSION_METRIC_NAMES) | set(metrics.DECOMPOSITION_METRIC_NAMES)
    assert names <= set(metrics.METRIC_DESCRIPTIONS)
    assert all(isinstance(text, str) and text and "\n" not in text for text in metrics.METRIC_DESCRIPTIONS.values())


# ------------------------------------------------------------------------------------------------
# Classical fusion baselines
# ------------------------------------------------------------------------------------------------

def test_classical_fusion_values():
    x1 = np.array([[0.0, 1.0], [2.0, 3.0]])
    x2 = np.array([[0.0, 3.0], [2.0, 1.0]])
    np.testing.assert_allclose(baselines.classical_fusion(x1, x2, "mean"), [[0, 2], [2, 2]])
    np.testing.assert_allclose(baselines.classical_fusion(x1, x2, "max"), [[0, 3], [2, 3]])
    # (x1² + x2²)/(x1 + x2), 0 where both are 0
    np.testing.assert_allclose(baselines.classical_fusion(x1, x2, "weighted"), [[0, 2.5], [2, 2.5]])


def test_classical_fusion_dtypes_do_not_overflow():
    x = np.full((2, 2), 200, np.uint8)
    for method in baselines.CLASSICAL_FUSION_METHODS:
        fused = baselines.classical_fusion(x, x, method)
        assert fused.dtype == np.float32
        np.testing.assert_array_equal(fused, 200)
    assert baselines.classical_fusion(np.ones(3, np.int64), np.ones(3), "mean").dtype == np.float64


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, (4, 5), elements=st.floats(0, 1e3)),
       hnp.arrays(np.float64, (4, 5), elements=st.floats(0, 1e3)))
def test_weighted_fusion_lies_between_the_sources_and_is_symmetric(x1, x2):
    fused = baselines.classical_fusion(x1, x2, "weighted")
    assert np.all(fused >= np.minimum(x1, x2) - 1e-9 * (1 + np.maximum(x1, x2)))
    assert np.all(fused <= np.maximum(x1, x2) + 1e-9 * (1 + np.maximum(x1, x2)))
    np.testing.assert_array_equal(fused, baselines.classical_fusion(x2, x1, "weighted"))


@pytest.mark.parametrize("args, message", [
    ((np.ones(3), np.ones(3), "median"), "unknown fusion method"),
    ((np.ones(3), np.ones(4), "mean"), "same shape"),
    ((np.array([1.0, -1.0]), np.ones(2), "weighted"), "non-negative"),
    ((np.array([np.nan]), np.ones(1), "max"), "x1: contains NaN"),
])
def test_classical_fusion_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        baselines.classical_fusion(*args)


def test_classical_fusion_scores_as_expected():
    # F = mean of the sources: MI and Q_SSIM are symmetric, Q_FMI in 0..1
    a, b, _ = triple(48)
    s = metrics.fusion_metrics(a, b, baselines.classical_fusion(a, b, "mean"))["summary"]
    assert 0 < s["Q_FMI"] < 1 and 0 < s["Q_SSIM"] < 1


# ------------------------------------------------------------------------------------------------
# Real data (optional)
# ------------------------------------------------------------------------------------------------

def test_real_brats_slices_with_brain_mask(shared_data):
    import SimpleITK as sitk

    case = shared_data / "brats" / "deepmedic_brats_2013_pat0005_1"

    def read(name):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{name}.nii.gz")))[70:73]

    t1ce, flair, brain = read("T1c_subtrMeanDivStd"), read("Flair_subtrMeanDivStd"), read("brainmask") > 0
    x1 = (t1ce - t1ce.min()) / (t1ce.max() - t1ce.min())
    x2 = (flair - flair.min()) / (flair.max() - flair.min())
    fused = baselines.classical_fusion(x1, x2, "weighted")
    forward = metrics.fusion_metrics(t1ce, flair, fused, mask=brain)
    swapped = metrics.fusion_metrics(flair, t1ce, fused, mask=brain)
    for name, value in forward["summary"].items():
        assert math.isfinite(value), name
        assert value == pytest.approx(swapped["summary"][name], abs=1e-12), name
    assert 0 < forward["summary"]["Q_FMI"] < 1 and 0 < forward["summary"]["Q_SSIM"] < 1
    paper = metrics.fusion_metrics(t1ce, flair, fused, mask=brain, paper_compatible=True)["summary"]
    assert all(math.isfinite(v) for v in paper.values())
