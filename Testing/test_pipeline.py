"""Files in, files out: geometry, resampling, source units, records, atomic outputs, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib.core.engine import Cancelled
from FusionINNLib.core.model import FusionFlow
from FusionINNLib.io.checkpoint import save_checkpoint
from FusionINNLib.io.volume import VolumeError, read_volume
from FusionINNLib.jobs.pipeline import (
    decompose_files,
    fuse_files,
    read_latent,
    read_record,
    record_sidecar,
)

REPO = Path(__file__).resolve().parents[1]
OBLIQUE = (0.9848077, -0.1736482, 0.0, 0.1736482, 0.9848077, 0.0, 0.0, 0.0, 1.0)


def write_image(path, array, spacing=(1.0, 1.0, 2.0), origin=(10.0, -5.0, 3.0), direction=OBLIQUE):
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return Path(path)


def brain_pair(shape=(6, 40, 44), seed=0):
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    inside = ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.4) ** 2
    t1 = np.where(inside, 400 + 300 * rng.random(shape), 0).astype(np.int16)
    flair = np.where(inside, 100 + 900 * rng.random(shape) * (j / shape[1]), 0).astype(np.float32)
    return t1, flair


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", FusionFlow(seed=7))


@pytest.fixture
def pair_files(tmp_path):
    t1, flair = brain_pair()
    return write_image(tmp_path / "t1.nii.gz", t1), write_image(tmp_path / "flair.nrrd", flair)


def test_fuse_then_exact_decompose_returns_the_sources_in_source_units(tmp_path, pair_files, model_path):
    in1, in2 = pair_files
    fused_path, latent_path = tmp_path / "fused.nrrd", tmp_path / "latent.nrrd"
    fuse_files(in1, in2, fused_path, latent=latent_path, model=model_path, device="cpu", log=lambda m: None)
    fused = read_volume(fused_path)
    source = read_volume(in1)
    assert fused.shape == source.shape
    assert np.allclose(fused.spacing, source.spacing) and np.allclose(fused.origin, source.origin)
    assert np.allclose(fused.direction, source.direction, atol=1e-6)
    assert 0 <= fused.array.min() and fused.array.max() <= 1
    record = read_record(fused_path, fused)
    assert record["model"]["sha256"] and len(record["normalization"]) == 2
    assert json.loads(record_sidecar(fused_path).read_text())["axis"] == 0

    out1, out2 = tmp_path / "d1.nii.gz", tmp_path / "d2.mha"
    decompose_files(fused_path, out1, out2, latent=latent_path, model=model_path, device="cpu", log=lambda m: None)
    assert np.abs(read_volume(out1).array - source.array).max() < 0.05  # int16 units, up to ~700
    assert np.abs(read_volume(out2).array - read_volume(in2).array).max() < 0.05
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_exact_round_trip_on_a_240x240x155_volume(tmp_path, model_path):
    rng = np.random.default_rng(0)
    shape = (155, 240, 240)
    t1 = (rng.random(shape, dtype=np.float32) * 1000).astype(np.float32)
    flair = (rng.random(shape, dtype=np.float32) * 500).astype(np.float32)
    in1 = write_image(tmp_path / "t1.nrrd", t1, spacing=(1, 1, 1), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    in2 = write_image(tmp_path / "fl.nrrd", flair, spacing=(1, 1, 1), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
               batch_size=16, log=lambda m: None)
    out = decompose_files(tmp_path / "f.nrrd", tmp_path / "a.nrrd", tmp_path / "b.nrrd", latent=tmp_path / "z.nrrd",
                          model=model_path, device="cpu", batch_size=16, log=lambda m: None)
    record = read_record(tmp_path / "f.nrrd")
    scale1 = record["normalization"][0]["scale"][0]
    scale2 = record["normalization"][1]["scale"][0]
    # max abs error <= 1e-4 in the normalized (network) units, for every voxel
    assert np.abs(out.source1.array - t1).max() / scale1 <= 1e-4
    assert np.abs(out.source2.array - flair).max() / scale2 <= 1e-4


def test_input2_with_other_geometry_is_resampled_onto_input1(tmp_path, model_path):
    t1, flair = brain_pair((6, 40, 44))
    in1 = write_image(tmp_path / "t1.nii.gz", t1, spacing=(1, 1, 2), origin=(0, 0, 0),
                      direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    coarse = flair[:, ::2, ::2].copy()
    in2 = write_image(tmp_path / "fl.nii.gz", coarse, spacing=(2, 2, 2), origin=(0.5, 0.5, 0),
                      direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    messages = []
    result = fuse_files(in1, in2, tmp_path / "f.nii.gz", model=model_path, device="cpu", log=messages.append)
    assert any("resampled" in m for m in messages) and any("resampled" in n for n in result.record["notes"])
    fused = read_volume(tmp_path / "f.nii.gz")
    assert fused.shape == t1.shape and np.allclose(fused.spacing, (1, 1, 2)) and np.allclose(fused.origin, 0)


def test_non_overlapping_inputs_are_refused_and_nothing_is_written(tmp_path, model_path):
    t1, flair = brain_pair()
    in1 = write_image(tmp_path / "t1.nii.gz", t1, origin=(0, 0, 0))
    in2 = write_image(tmp_path / "fl.nii.gz", flair, origin=(5000, 0, 0))
    with pytest.raises(VolumeError, match="do not overlap"):
        fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
                   log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fl.nii.gz", "t1.nii.gz"]


def test_sampled_decomposition_writes_std_maps(tmp_path, pair_files, model_path):
    in1, in2 = pair_files
    fuse_files(in1, in2, tmp_path / "f.nii.gz", model=model_path, device="cpu", log=lambda m: None)
    outputs = [tmp_path / n for n in ("m1.nrrd", "m2.nrrd", "s1.nrrd", "s2.nrrd")]
    decompose_files(tmp_path / "f.nii.gz", outputs[0], outputs[1], std1=outputs[2], std2=outputs[3],
                    samples=8, seed=3, model=model_path, device="cpu", log=lambda m: None)
    std = read_volume(outputs[2]).array
    assert np.isfinite(std).all() and std.min() >= 0 and std.max() > 0
    decompose_files(tmp_path / "f.nii.gz", outputs[0], outputs[1], std1=outputs[2], std2=outputs[3],
                    samples=8, temperature=0.0, model=model_path, device="cpu", log=lambda m: None)
    assert read_volume(outputs[2]).array.max() == 0


def test_a_cleared_background_decomposes_to_each_sources_background_with_no_uncertainty(tmp_path, pair_files):
    from FusionINNLib.core.model import FUSED_BACKGROUND, FusionINNConfig

    model = save_checkpoint(tmp_path / "cleared.pt", FusionFlow(FusionINNConfig(clear_background=True), seed=7))
    in1, in2 = pair_files
    fuse_files(in1, in2, tmp_path / "f.nrrd", model=model, device="cpu", log=lambda m: None)
    fused = read_volume(tmp_path / "f.nrrd").array
    t1, flair = read_volume(in1).array, read_volume(in2).array
    background = (t1 == 0) & (flair == 0)  # brain_pair: 0 outside the disc in both
    assert background.any() and np.all(fused[background] == np.float32(FUSED_BACKGROUND))
    assert np.all(fused[~background] != np.float32(FUSED_BACKGROUND))
    outputs = [tmp_path / n for n in ("m1.nrrd", "m2.nrrd", "s1.nrrd", "s2.nrrd")]
    decompose_files(tmp_path / "f.nrrd", outputs[0], outputs[1], std1=outputs[2], std2=outputs[3],
                    samples=4, seed=3, model=model, device="cpu", log=lambda m: None)
    m1, m2, s1 = (read_volume(o).array for o in outputs[:3])
    assert np.all(m1[background] == 0) and np.all(m2[background] == 0) and np.all(s1[background] == 0)
    assert s1[~background].max() > 0


@pytest.mark.parametrize("value", [0.0, 123.0])
def test_constant_and_all_zero_inputs_give_finite_outputs(tmp_path, model_path, value):
    in1 = write_image(tmp_path / "a.nii.gz", np.full((3, 16, 16), value, np.float32))
    in2 = write_image(tmp_path / "b.nii.gz", np.full((3, 16, 16), value, np.float32))
    fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
               log=lambda m: None)
    assert np.isfinite(read_volume(tmp_path / "f.nrrd").array).all()
    out = decompose_files(tmp_path / "f.nrrd", tmp_path / "x.nrrd", tmp_path / "y.nrrd", latent=tmp_path / "z.nrrd",
                          model=model_path, device="cpu", log=lambda m: None)
    assert np.allclose(out.source1.array, value, atol=1e-3)


def test_2d_png_inputs(tmp_path, model_path):
    rng = np.random.default_rng(2)
    a = write_image(tmp_path / "a.png", (rng.random((33, 31)) * 255).astype(np.uint8))
    b = write_image(tmp_path / "b.png", (rng.random((33, 31)) * 255).astype(np.uint8))
    fuse_files(a, b, tmp_path / "f.png", model=model_path, device="cpu", log=lambda m: None)
    fused = sitk.ReadImage(str(tmp_path / "f.png"))
    assert fused.GetDimension() == 2 and fused.GetSize() == (31, 33)
    assert read_record(tmp_path / "f.png") is not None  # from the sidecar


def test_wrong_model_is_named(tmp_path, pair_files, model_path):
    in1, in2 = pair_files
    fuse_files(in1, in2, tmp_path / "f.nrrd", model=model_path, device="cpu", log=lambda m: None)
    other = save_checkpoint(tmp_path / "other.pt", FusionFlow(seed=99))
    with pytest.raises(ValueError, match="made with model"):
        decompose_files(tmp_path / "f.nrrd", tmp_path / "x.nrrd", tmp_path / "y.nrrd", model=other, device="cpu",
                        log=lambda m: None)
    assert not (tmp_path / "x.nrrd").exists()


def test_outputs_never_overwrite_inputs(pair_files, model_path):
    in1, in2 = pair_files
    before = in1.read_bytes()
    with pytest.raises(ValueError, match="overwrite an input"):
        fuse_files(in1, in2, in1, model=model_path, device="cpu")
    assert in1.read_bytes() == before


def test_cancel_leaves_no_output(tmp_path, pair_files, model_path):
    in1, in2 = pair_files
    with pytest.raises(Cancelled):
        fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
                   batch_size=1, cancel=lambda: True, log=lambda m: None)
    assert not (tmp_path / "f.nrrd").exists() and not (tmp_path / "z.nrrd").exists()
    assert not record_sidecar(tmp_path / "f.nrrd").exists()


def test_latent_file_layout(tmp_path, model_path):
    t1, flair = brain_pair((3, 21, 23))  # odd sizes: the latent carries the padding
    in1, in2 = write_image(tmp_path / "a.nrrd", t1), write_image(tmp_path / "b.nrrd", flair)
    fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
               log=lambda m: None)
    assert read_latent(tmp_path / "z.nrrd").shape == (2, 3, 22, 24)
    out = decompose_files(tmp_path / "f.nrrd", tmp_path / "x.nrrd", tmp_path / "y.nrrd", latent=tmp_path / "z.nrrd",
                          model=model_path, device="cpu", log=lambda m: None)
    assert np.abs(out.source1.array - t1).max() < 0.05


def test_a_latent_only_decomposes_the_fused_image_it_was_written_with(tmp_path, model_path):
    quiet = dict(model=model_path, device="cpu", log=lambda m: None)
    t1, flair = brain_pair(seed=1)
    other1, other2 = brain_pair(seed=2)  # same shape and geometry: only the fingerprint tells them apart
    fuse_files(write_image(tmp_path / "a.nrrd", t1), write_image(tmp_path / "b.nrrd", flair), tmp_path / "f.nrrd",
               latent=tmp_path / "z.nrrd", **quiet)
    fuse_files(write_image(tmp_path / "c.nrrd", other1), write_image(tmp_path / "d.nrrd", other2),
               tmp_path / "g.nrrd", latent=tmp_path / "w.nii.gz", **quiet)
    with pytest.raises(VolumeError, match="different fused image"):
        decompose_files(tmp_path / "g.nrrd", tmp_path / "x.nrrd", tmp_path / "y.nrrd", latent=tmp_path / "z.nrrd",
                        **quiet)
    assert not (tmp_path / "x.nrrd").exists() and not (tmp_path / "y.nrrd").exists()
    out = decompose_files(tmp_path / "f.nrrd", tmp_path / "x.nrrd", tmp_path / "y.nrrd", latent=tmp_path / "z.nrrd",
                          **quiet)
    assert np.abs(out.source1.array - t1).max() < 0.05
    # NIfTI keeps no custom header: its latent is accepted on shape alone (documented).
    out = decompose_files(tmp_path / "g.nrrd", tmp_path / "x2.nrrd", tmp_path / "y2.nrrd",
                          latent=tmp_path / "w.nii.gz", **quiet)
    assert np.abs(out.source2.array - other2).max() < 0.05


# -- command line -------------------------------------------------------------------------------
def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"))
    return subprocess.run([sys.executable, "-m", "FusionINNLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_cli_fuse_and_decompose(tmp_path, pair_files, model_path):
    in1, in2 = pair_files
    done = run_cli("fuse", in1, in2, "--output", tmp_path / "f.nrrd", "--latent", tmp_path / "z.nrrd",
                   "--model", model_path, "--device", "cpu", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr and "100%" in done.stderr
    done = run_cli("decompose", tmp_path / "f.nrrd", "--output1", tmp_path / "a.nrrd", "--output2",
                   tmp_path / "b.nrrd", "--samples", "4", "--std1", tmp_path / "s1.nrrd", "--std2",
                   tmp_path / "s2.nrrd", "--model", model_path, "--quiet")
    # --quiet leaves only warnings (this untrained model's sampled estimates get clamped)
    assert done.returncode == 0 and done.stdout == ""
    assert all(line.startswith("warning: ") for line in done.stderr.splitlines()), done.stderr
    assert (tmp_path / "s2.nrrd").is_file()


@pytest.mark.parametrize("args, message", [
    (["fuse", "missing1.nii", "missing2.nii", "-o", "f.nrrd"], "missing1.nii: file not found"),
    (["decompose", "nope.nrrd", "--output1", "a.nrrd", "--output2", "b.nrrd"], "nope.nrrd: file not found"),
])
def test_cli_errors_are_one_clear_line(tmp_path, model_path, args, message):
    done = run_cli(*args, "--model", model_path, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_usage_errors_exit_2(tmp_path):
    assert run_cli("fuse", "a", "b", "-o", "f", "--batch-size", "0").returncode == 2
    assert run_cli("decompose", "f", "--output1", "a", "--output2", "b", "--prior", "cauchy").returncode == 2


def test_cli_help_documents_every_option():
    for command in ("fuse", "decompose"):
        text = run_cli(command, "--help").stdout
        for option in {"fuse": ["--output", "--latent", "--model", "--device", "--batch-size", "--axis",
                                "--normalization", "--quiet"],
                       "decompose": ["--output1", "--output2", "--latent", "--samples", "--seed", "--temperature",
                                     "--prior", "--std1", "--std2", "--model", "--device"]}[command]:
            assert option in text
