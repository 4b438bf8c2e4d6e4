"""Guidance maps and Jacobian images (FusionINNLib.jobs.explain) against brute-force autograd.

The reference here is written independently of the library: its own edge padding (by index
clamping) and one ``torch.autograd.grad`` call per fused pixel, as FuseVis does.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FusionINNLib import cli
from FusionINNLib.core.engine import Cancelled
from FusionINNLib.core.model import FusionFlow, FusionINNConfig
from FusionINNLib.io.checkpoint import save_checkpoint
from FusionINNLib.io.volume import Volume
from FusionINNLib.jobs import explain

REPO = Path(__file__).resolve().parents[1]


def perturbed_flow(seed: int = 0, config: FusionINNConfig = None) -> FusionFlow:
    """A random reference flow whose ActNorm is not the identity (as after training)."""
    import FrEIA.modules as fm

    flow = FusionFlow(config or FusionINNConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for module in flow.graph.modules():
        if isinstance(module, fm.ActNorm):
            module.scale.data = torch.randn(module.scale.shape, generator=generator) * 0.3
            module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.3
    return flow.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The brute-force references are thousands of tiny backward passes: one thread is many times
    faster for them than two on a shared machine (OpenMP fork/join per op)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def flow32() -> FusionFlow:
    return perturbed_flow(0)


@pytest.fixture(scope="module")
def flow64(flow32) -> FusionFlow:
    return copy.deepcopy(flow32).double()


def smooth_pair(height: int, width: int, seed: int = 0):
    """Brain-like test images in [0, 1]: an ellipse with texture and noise, background 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = yy / max(height, 1), xx / max(width, 1)
    inside = ((yy - 0.5) ** 2 / 0.17 + (xx - 0.5) ** 2 / 0.14) < 1
    x1 = inside * (0.55 + 0.25 * np.sin(13 * xx + 2) * np.cos(9 * yy)) + 0.05 * rng.random((height, width))
    x2 = inside * (0.45 + 0.35 * np.cos(7 * yy + 5 * xx)) + 0.05 * rng.random((height, width))
    return x1, x2


def brute_force(flow: FusionFlow, x1: np.ndarray, x2: np.ndarray, pixels=None):
    """dy(p)/dx_k(p) with one backward pass per pixel; edge padding by index clamping."""
    dtype = next(flow.parameters()).dtype
    flow = flow.to(memory_format=torch.contiguous_format)
    height, width = x1.shape
    multiple = flow.pad_multiple
    padded_h = math.ceil(height / multiple) * multiple
    padded_w = math.ceil(width / multiple) * multiple
    rows = torch.clamp(torch.arange(padded_h), max=height - 1)
    cols = torch.clamp(torch.arange(padded_w), max=width - 1)
    x = torch.tensor(np.stack([x1, x2])[None], dtype=dtype, requires_grad=True)
    u, _ = flow(x[:, :, rows][:, :, :, cols])
    y = torch.sigmoid(u[0, 0, :height, :width])
    pixels = [(r, c) for r in range(height) for c in range(width)] if pixels is None else pixels
    g1 = np.full((height, width), np.nan)
    g2 = np.full((height, width), np.nan)
    for row, col in pixels:
        (grad,) = torch.autograd.grad(y[row, col], x, retain_graph=True)
        g1[row, col], g2[row, col] = float(grad[0, 0, row, col]), float(grad[0, 1, row, col])
    return g1, g2


# -- receptive field ----------------------------------------------------------------------------
def test_receptive_radius_of_reference_is_15_and_attained(flow64):
    assert explain.fused_receptive_radius(flow64) == 15
    assert explain.exact_spacing(flow64) == 16
    # the config's bound also covers the latent (two subnets in the last block)
    assert flow64.config.receptive_radius == 17
    assert explain.measure_receptive_radius(flow64, size=64) == 15


@pytest.mark.parametrize("blocks", [2, 4, 5])
def test_structural_bound_holds_for_other_depths(blocks):
    # without the subnets' final ReLU no random path is dead, so the bound is approached
    config = FusionINNConfig(blocks=blocks, hidden_channels=8, subnet_final_relu=False)
    flow = perturbed_flow(1, config).double()
    bound = explain.fused_receptive_radius(flow)
    assert bound <= flow.config.receptive_radius
    measured = explain.measure_receptive_radius(flow, size=2 * bound + 2 * flow.pad_multiple + 2)
    assert 0 < measured <= bound


# -- exact guidance -----------------------------------------------------------------------------
def test_exact_guidance_equals_brute_force_32x32_float64(flow64):
    x1, x2 = smooth_pair(32, 32, seed=1)
    g1, g2 = explain.guidance_maps(flow64, x1, x2, device="cpu")
    b1, b2 = brute_force(flow64, x1, x2)
    assert g1.shape == (32, 32) and g1.dtype == np.float64
    assert np.abs(b1).max() > 1e-3 and np.abs(b2).max() > 1e-3  # non-trivial derivatives
    assert np.abs(g1 - b1).max() <= 1e-5
    assert np.abs(g2 - b2).max() <= 1e-5
    # in float64 the lattice is not an approximation at all
    assert np.abs(g1 - b1).max() <= 1e-12 and np.abs(g2 - b2).max() <= 1e-12


def test_exact_guidance_equals_brute_force_float32_and_odd_size(flow32, flow64):
    x1, x2 = smooth_pair(32, 32, seed=2)
    g1, g2 = explain.guidance_maps(flow32, x1.astype(np.float32), x2.astype(np.float32), device="cpu")
    b1, b2 = brute_force(flow32, x1.astype(np.float32), x2.astype(np.float32))
    assert g1.dtype == np.float32
    assert np.abs(g1 - b1).max() <= 1e-5 and np.abs(g2 - b2).max() <= 1e-5
    # odd size: the engine's edge padding is inside the differentiated function
    x1, x2 = smooth_pair(17, 23, seed=3)
    g1, g2 = explain.guidance_maps(flow64, x1, x2, device="cpu")
    b1, b2 = brute_force(flow64, x1, x2)
    assert np.abs(g1 - b1).max() <= 1e-12 and np.abs(g2 - b2).max() <= 1e-12


def test_exact_guidance_on_crop_of_real_sized_slice(flow32):
    x1, x2 = smooth_pair(240, 240, seed=4)
    x1, x2 = x1.astype(np.float32), x2.astype(np.float32)
    window = (100, 140, 200, 240)  # 40 x 40 pixels touching the right border: all 256 lattices
    result = explain.compute_guidance(flow32, x1, x2, window=window, device="cpu")
    assert result.exact and result.probes == 256
    g1, g2 = result.guidance1[0], result.guidance2[0]
    outside = np.ones(g1.shape, bool)
    outside[100:140, 200:240] = False
    assert not g1[outside].any() and not g2[outside].any()
    rng = np.random.default_rng(0)
    pixels = [(100, 200), (139, 239), (100, 239), (139, 200)]
    pixels += [(int(r), int(c)) for r, c in zip(rng.integers(100, 140, 32), rng.integers(200, 240, 32))]
    b1, b2 = brute_force(flow32, x1, x2, pixels)  # on the full 240 x 240 slice
    for row, col in pixels:
        assert abs(g1[row, col] - b1[row, col]) <= 1e-5
        assert abs(g2[row, col] - b2[row, col]) <= 1e-5
    assert max(abs(b1[r, c]) for r, c in pixels) > 1e-3


def test_spacing_controls_exactness(flow64):
    x1, x2 = smooth_pair(32, 32, seed=5)
    exact1, exact2 = explain.guidance_maps(flow64, x1, x2, device="cpu")
    wider = explain.compute_guidance(flow64, x1, x2, spacing=20, device="cpu")
    assert wider.exact and np.abs(wider.guidance1[0] - exact1).max() <= 1e-12
    approximate = explain.compute_guidance(flow64, x1, x2, spacing=8, device="cpu")
    assert not approximate.exact and approximate.probes == 64
    error = max(np.abs(approximate.guidance1[0] - exact1).max(), np.abs(approximate.guidance2[0] - exact2).max())
    assert 1e-9 < error < 0.5 * max(np.abs(exact1).max(), np.abs(exact2).max())


def test_logit_target_follows_the_chain_rule(flow64):
    x1, x2 = smooth_pair(16, 20, seed=10)
    fused = explain.compute_guidance(flow64, x1, x2, device="cpu")
    logit = explain.compute_guidance(flow64, x1, x2, target="logit", device="cpu")
    y = fused.fused[0]
    assert np.array_equal(fused.fused, logit.fused)  # both report y = sigmoid(u)
    derivative = y * (1 - y)  # sigma'(u)
    assert np.abs(fused.guidance1[0] - derivative * logit.guidance1[0]).max() <= 1e-12
    assert np.abs(fused.guidance2[0] - derivative * logit.guidance2[0]).max() <= 1e-12
    with pytest.raises(ValueError, match="target"):
        explain.guidance_maps(flow64, x1, x2, target="z", device="cpu")


def test_stack_batching_progress_and_cancel(flow64):
    x1, x2 = smooth_pair(20, 24, seed=6)
    stack1 = np.stack([x1, x2, x1 * 0.5])
    stack2 = np.stack([x2, x1, x2])
    fractions = []
    g1, g2 = explain.guidance_maps(flow64, stack1, stack2, device="cpu", batch_size=7, progress=fractions.append)
    single1, single2 = explain.guidance_maps(flow64, stack1[1], stack2[1], device="cpu")
    assert g1.shape == (3, 20, 24)
    assert np.abs(g1[1] - single1).max() <= 1e-12 and np.abs(g2[1] - single2).max() <= 1e-12
    assert fractions and fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)
    with pytest.raises(Cancelled):
        explain.guidance_maps(flow64, stack1, stack2, device="cpu", cancel=lambda: True)


def test_bad_inputs_are_refused(flow64):
    x1, x2 = smooth_pair(16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        explain.guidance_maps(flow64, x1, x2[:8], device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        explain.guidance_maps(flow64, np.full((16, 16), np.nan), x2, device="cpu")
    with pytest.raises(ValueError, match="spacing"):
        explain.guidance_maps(flow64, x1, x2, spacing=0, device="cpu")
    with pytest.raises(ValueError, match="outside"):
        explain.jacobian_at(flow64, x1, x2, 16, 3, device="cpu")


# -- Jacobian at a pixel ------------------------------------------------------------------------
@pytest.mark.parametrize("pixel", [(0, 0), (36, 40), (20, 21), (37, 0), (5, 40)])
def test_jacobian_on_crop_equals_full_slice(flow64, pixel):
    x1, x2 = smooth_pair(38, 41, seed=7)  # odd width: padded column
    row, col = pixel
    j1, j2, (row0, col0) = explain.jacobian_at(flow64, x1, x2, row, col, device="cpu")
    f1, f2, origin = explain.jacobian_at(flow64, x1, x2, row, col, crop=False, device="cpu")
    assert origin == (0, 0) and f1.shape == x1.shape
    height, width = j1.shape
    assert height <= 34 and width <= 34  # receptive field (31) rounded to the squeeze grid
    assert row0 % 2 == 0 and col0 % 2 == 0
    assert np.abs(j1 - f1[row0:row0 + height, col0:col0 + width]).max() <= 1e-12
    assert np.abs(j2 - f2[row0:row0 + height, col0:col0 + width]).max() <= 1e-12
    f1[row0:row0 + height, col0:col0 + width] = 0
    f2[row0:row0 + height, col0:col0 + width] = 0
    assert not f1.any() and not f2.any()  # nothing outside the crop
    # the diagonal entry is the guidance
    b1, b2 = brute_force(flow64, x1, x2, [pixel])
    assert j1[row - row0, col - col0] == pytest.approx(b1[row, col], abs=1e-12)
    assert j2[row - row0, col - col0] == pytest.approx(b2[row, col], abs=1e-12)


def test_jacobian_on_crop_of_real_sized_slice_float32(flow32):
    x1, x2 = smooth_pair(240, 240, seed=8)
    x1, x2 = x1.astype(np.float32), x2.astype(np.float32)
    j1, j2, (row0, col0) = explain.jacobian_at(flow32, x1, x2, 121, 77, device="cpu")
    f1, f2, _ = explain.jacobian_at(flow32, x1, x2, 121, 77, crop=False, device="cpu")
    height, width = j1.shape
    # odd row 121 sees rows 106..135, odd column 77 columns 62..91: already on the 2x2 grid
    assert j1.shape == (30, 30) and (row0, col0) == (106, 62)
    assert np.abs(j1 - f1[row0:row0 + height, col0:col0 + width]).max() <= 1e-5
    assert np.abs(j2 - f2[row0:row0 + height, col0:col0 + width]).max() <= 1e-5


# -- display helpers ----------------------------------------------------------------------------
def test_guidance_rgb_channels_and_gamma():
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 6)) * 0.1
    fused = rng.random((2, 5, 6))
    rgb = explain.guidance_rgb(g1, g2, fused)
    assert rgb.shape == (2, 5, 6, 3) and rgb.dtype == np.uint8
    for channel, g in ((0, g1), (1, g2)):
        assert rgb[..., channel].max() == 255 and rgb[..., channel].min() == 0
        assert rgb[..., channel].flat[np.argmax(np.abs(g))] == 255
    assert np.array_equal(rgb[..., 2], np.rint(fused * 255).astype(np.uint8))
    brighter = explain.guidance_rgb(g1, g2, fused, gamma=0.5)
    assert (brighter[..., :2].astype(int) >= rgb[..., :2].astype(int)).all()
    assert (brighter[..., :2] > rgb[..., :2]).any()
    common = explain.guidance_rgb(g1, g2, fused, common_scale=True)
    assert common[..., 1].max() < 128  # input 2's guidance is 10x weaker: dim green on a shared scale
    with pytest.raises(ValueError, match="gamma"):
        explain.guidance_rgb(g1, g2, fused, gamma=0)
    assert not explain.display_normalize(np.ones((3, 3))).any()


def test_scatter_table_flags_the_neighbourhood():
    g1 = np.arange(4 * 20 * 30, dtype=np.float64).reshape(4, 20, 30)
    g2 = -g1
    table = explain.scatter_table(g1, g2, point=(2, 10, 15), radius=3)
    assert list(table) == ["k", "j", "i", "guidance1", "guidance2", "neighbourhood"]
    assert all(len(column) == g1.size for column in table.values())
    assert int(table["neighbourhood"].sum()) == 7 * 7  # same slice only
    flagged = table["neighbourhood"] == 1
    assert set(table["k"][flagged]) == {2} and table["j"][flagged].min() == 7 and table["i"][flagged].max() == 18
    index = 2 * 600 + 10 * 30 + 15
    assert table["guidance1"][index] == g1[2, 10, 15] and table["guidance2"][index] == g2[2, 10, 15]
    corner = explain.scatter_table(g1[0], g2[0], point=(0, 0), radius=3)
    assert list(corner)[:2] == ["j", "i"] and int(corner["neighbourhood"].sum()) == 16
    mask = np.zeros(g1.shape, bool)
    mask[1] = True
    assert len(explain.scatter_table(g1, g2, mask=mask)["k"]) == 600
    text = explain.table_to_tsv(corner)
    assert text.splitlines()[0] == "j\ti\tguidance1\tguidance2\tneighbourhood"
    assert len(text.splitlines()) == 601
    with pytest.raises(ValueError, match="outside"):
        explain.scatter_table(g1, g2, point=(4, 0, 0))


# -- volumes ------------------------------------------------------------------------------------
def rotated_direction(angle_degrees: float = 30.0):
    a = math.radians(angle_degrees)
    rotation = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, -1.0]])
    return tuple(float(v) for v in rotation.ravel())


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(3)
    a1, a2 = smooth_pair(36, 34, seed=9)
    array1 = np.stack([a1 * (1 + 0.1 * k) for k in range(3)]).astype(np.float32) * 900
    array2 = np.stack([a2 + 0.02 * rng.random(a2.shape) for _ in range(3)]).astype(np.float32) * 400
    geometry = dict(spacing=(0.8, 1.2, 2.5), origin=(5.0, -7.0, 12.0), direction=rotated_direction())
    return Volume(array1, **geometry), Volume(array2, **geometry)


def test_explain_volumes_fills_requested_slices_only(flow64, volumes):
    volume1, volume2 = volumes
    output = explain.explain_volumes(volume1, volume2, flow64, slices=(1, 2), device="cpu")
    assert output.guidance1.shape == volume1.shape and output.rgb.shape == volume1.shape + (3,)
    assert output.guidance1.origin == volume1.origin and output.guidance1.direction == volume1.direction
    assert output.exact and output.spacing == 16 and output.slices == (1, 2)
    for volume in (output.guidance1, output.guidance2, output.fused):
        assert not volume.array[0].any() and not volume.array[2].any() and volume.array[1].any()
    assert not output.rgb[0].any() and output.rgb[1].max() == 255
    assert 0.0 <= output.fused.array.min() and output.fused.array.max() <= 1.0
    same = explain.explain_volumes(volume1, volume2, flow64, slices=range(1, 2), approximate=True, device="cpu")
    assert not same.exact and same.spacing == explain.APPROXIMATE_SPACING
    assert any("approximate" in note for note in same.notes)
    with pytest.raises(ValueError, match="outside"):
        explain.explain_volumes(volume1, volume2, flow64, slices=(2, 5), device="cpu")


@pytest.mark.parametrize("axis", [0, 1])
def test_jacobian_volumes_are_placed_at_the_crop(flow64, volumes, axis):
    volume1, volume2 = volumes
    point_ijk = (30, 4, 2)  # i = column, j = row, k = slice
    jac1, jac2 = explain.jacobian_volumes(volume1, volume2, point_ijk, flow64, axis=axis, device="cpu")
    assert jac1.shape[axis] == 1 and jac1.shape == jac2.shape
    assert jac1.spacing == volume1.spacing and jac1.direction == volume1.direction
    image1 = sitk.GetImageFromArray(volume1.array)
    image1.SetSpacing(volume1.spacing)
    image1.SetOrigin(volume1.origin)
    image1.SetDirection(volume1.direction)
    jac_image = sitk.GetImageFromArray(jac1.array)
    jac_image.SetSpacing(jac1.spacing)
    jac_image.SetOrigin(jac1.origin)
    jac_image.SetDirection(jac1.direction)
    # the point's physical position falls on the Jacobian voxel that holds dy(p)/dx1(p)
    physical = image1.TransformIndexToPhysicalPoint(point_ijk)
    local = jac_image.TransformPhysicalPointToIndex(physical)
    slices = (point_ijk[2 - axis], point_ijk[2 - axis] + 1)
    output = explain.explain_volumes(volume1, volume2, flow64, slices=slices, axis=axis, device="cpu")
    k, j, i = point_ijk[2], point_ijk[1], point_ijk[0]
    assert jac1.array[local[2], local[1], local[0]] == pytest.approx(output.guidance1.array[k, j, i], abs=1e-12)
    assert jac2.array[local[2], local[1], local[0]] == pytest.approx(output.guidance2.array[k, j, i], abs=1e-12)
    assert np.abs(jac1.array).max() > 0
    # the origin is the physical point of the crop's first voxel in input 1's grid
    first = [int(round(v)) for v in image1.TransformPhysicalPointToContinuousIndex(jac1.origin)]
    assert np.allclose(image1.TransformIndexToPhysicalPoint(first), jac1.origin, atol=1e-9)
    assert first[2 - axis] == point_ijk[2 - axis]
    with pytest.raises(ValueError, match="outside"):
        explain.jacobian_volumes(volume1, volume2, (34, 0, 0), flow64, device="cpu")


# -- command line -------------------------------------------------------------------------------
def run_cli(*args: str):
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"))
    return subprocess.run([sys.executable, "-m", "FusionINNLib.cli", "explain", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_explain_writes_all_outputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for number in (1, 2):
        image = sitk.GetImageFromArray((rng.random((3, 26, 21)) * 100).astype(np.float32))
        image.SetSpacing((0.9, 1.1, 2.0))
        image.SetOrigin((10.0, -5.0, 3.0))
        paths.append(tmp_path / f"input{number}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    model = save_checkpoint(tmp_path / "model.pt", perturbed_flow(2))
    out = {name: tmp_path / name for name in ("g1.nrrd", "g2.nii.gz", "rgb.nrrd", "j1.nrrd", "j2.nrrd", "s.tsv")}
    result = run_cli(str(paths[0]), str(paths[1]), "--guidance1", str(out["g1.nrrd"]), "--guidance2",
                     str(out["g2.nii.gz"]), "--rgb", str(out["rgb.nrrd"]), "--point", "20,25,1",
                     "--jacobian1", str(out["j1.nrrd"]), "--jacobian2", str(out["j2.nrrd"]), "--slices", "1:2",
                     "--scatter", str(out["s.tsv"]), "--model", str(model), "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    g1 = sitk.ReadImage(str(out["g1.nrrd"]))
    assert g1.GetSize() == (21, 26, 3) and g1.GetOrigin() == pytest.approx((10.0, -5.0, 3.0))
    array = sitk.GetArrayFromImage(g1)
    assert not array[0].any() and not array[2].any() and array[1].any()
    rgb = sitk.ReadImage(str(out["rgb.nrrd"]))
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetSize() == (21, 26, 3)
    j1 = sitk.ReadImage(str(out["j1.nrrd"]))
    assert j1.GetSize()[2] == 1
    # crop starts at an even row/column index in slice 1
    start = j1.GetOrigin()
    assert start[2] == pytest.approx(3.0 + 2.0 * 1)
    assert round((start[0] - 10.0) / 0.9) == 6  # even column 20 sees columns 6..35
    lines = out["s.tsv"].read_text().splitlines()
    assert lines[0].split("\t") == ["k", "j", "i", "guidance1", "guidance2", "neighbourhood"]
    assert len(lines) == 1 + 26 * 21
    flagged = [line for line in lines[1:] if line.endswith("\t1")]
    assert len(flagged) == 6 * 6  # rows 20..25 and columns 15..20, clipped by the image border
    # errors: one line, nothing written (in-process: the same main() the subprocess ran)
    bad = tmp_path / "bad.nrrd"
    common = [str(paths[0]), str(paths[1]), "--guidance1", str(bad), "--guidance2", str(tmp_path / "b2.nrrd"),
              "--model", str(model), "--device", "cpu", "--quiet"]
    assert cli.main(["explain", *common, "--jacobian1", str(tmp_path / "x.nrrd"),
                     "--jacobian2", str(tmp_path / "y.nrrd")]) == 2  # options that do not go together: usage
    assert "--point" in capsys.readouterr().err
    assert cli.main(["explain", *common, "--slices", "2:9"]) == 1
    assert "outside" in capsys.readouterr().err
    assert cli.main(["explain", *common, "--point", "21,0,0"]) == 1
    assert "outside" in capsys.readouterr().err
    assert cli.main(["explain", *common[:2], "--guidance1", str(tmp_path / "g.png"), *common[4:]]) == 1
    assert "float format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", *common, "--spacing", "8", "--approximate"])
    assert not bad.exists() and not (tmp_path / "b2.nrrd").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_background_rule_zero_guidance_and_the_engines_fused_image():
    from FusionINNLib.core.engine import SliceEngine

    flow = FusionFlow(FusionINNConfig(clear_background=True), seed=3)
    x1, x2 = smooth_pair(32, 32, seed=2)
    x1[:10], x2[:10] = -0.2, -0.1  # both background in the top rows
    result = explain.compute_guidance(flow, x1, x2, device="cpu")
    assert np.all(result.guidance1[:, :10] == 0) and np.all(result.guidance2[:, :10] == 0)
    assert np.abs(result.guidance1[:, 12:]).max() > 1e-3
    engine_fused = SliceEngine(flow, "cpu").fuse(x1[None], x2[None]).fused
    assert np.allclose(result.fused, engine_fused, atol=1e-6)
