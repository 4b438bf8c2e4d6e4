"""`fusioninn demo`, `phantom` and `metrics` as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib.io.checkpoint import bundled_model_path, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "FusionINNLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_bundled_model_is_present_small_and_loads():
    path = bundled_model_path()
    assert path.is_file(), "the bundled default model is missing"
    assert path.stat().st_size < 2 * 1024 * 1024
    loaded = load_checkpoint(path)
    assert loaded.origin == "fusioninn" and loaded.config.reverse_input == "logit"
    assert loaded.config.clear_background and loaded.config.padding_mode == "replicate"  # docs/models.md
    # the model card's facts travel with the weights: real training subjects, a disjoint validation
    # set of at least 5 subjects, the recipe and the data-use terms (docs/models.md)
    trained_on = loaded.metadata["trained_on"]
    train, val = set(trained_on["train_subjects"]), set(trained_on["val_subjects"])
    assert len(train) >= 20 and len(val) >= 5 and not train & val
    assert set(loaded.metadata["split"]["val_subjects"]) == val
    assert "BraTS" in loaded.metadata["data_use_terms"] and "non-commercial" in loaded.metadata["data_use_terms"]
    assert loaded.metadata["recipe"].startswith("scripts/train_default_model.sh")


def test_demo_with_the_bundled_model(tmp_path):
    done = run_cli("demo", "--output", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    assert "UNTRAINED" not in done.stderr
    assert "Warning" not in done.stderr  # the main job talks to a new user in plain lines
    out = tmp_path / "demo"
    for name in ("fused.nrrd", "fused.fusioninn.json", "latent.nrrd", "decomposed_exact_t1ce.nrrd",
                 "decomposed_t1ce.nrrd", "uncertainty_flair.nrrd", "metrics.json", "montage.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["decomposition_exact_t1ce"]["SSIM"] > 0.999  # exact inverse
    assert metrics["decomposition_sampled8_flair"]["SSIM"] > 0.5  # a trained model decomposes from y
    assert 0 < metrics["fusion"]["Q_SSIM"] <= 1
    montage = sitk.ReadImage(str(out / "montage.png"))
    assert montage.GetWidth() > 600 and montage.GetHeight() > 200
    assert np.asarray(sitk.GetArrayFromImage(montage)).std() > 10  # not a blank picture


def test_phantom_command_writes_brats_2021_cases(tmp_path):
    done = run_cli("phantom", tmp_path, "--cases", "2", "--shape", "16", "32", "32", "--seed", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["BraTS2021_Phantom_00000", "BraTS2021_Phantom_00001"]
    image = sitk.ReadImage(str(tmp_path / folders[0] / f"{folders[0]}_flair.nii.gz"))
    assert image.GetSize() == (32, 32, 16)


def test_metrics_command_text_and_json(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((3, 24, 24)) * 100).astype(np.float32)
    b = (rng.random((3, 24, 24)) * 100).astype(np.float32)
    for name, array in (("a", a), ("b", b), ("f", (a + b) / 2)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nrrd"))
    text = run_cli("metrics", tmp_path / "a.nrrd", tmp_path / "b.nrrd", tmp_path / "f.nrrd")
    assert text.returncode == 0, text.stderr
    names = [line.split("\t")[0] for line in text.stdout.splitlines()]
    assert names[:5] == ["Q_SSIM", "Q_FMI", "Q_NCIE", "Q_XY", "Q_P"]
    data = json.loads(run_cli("metrics", tmp_path / "a.nrrd", tmp_path / "b.nrrd", tmp_path / "f.nrrd",
                              "--json", "--paper-compatible").stdout)
    assert set(data) == {"summary", "per_slice", "notes"} and len(data["per_slice"]["Q_SSIM"]) == 3


def test_metrics_command_refuses_a_fused_image_of_another_shape(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 8, 8), np.float32)), str(tmp_path / "a.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 8, 9), np.float32)), str(tmp_path / "f.nrrd"))
    done = run_cli("metrics", tmp_path / "a.nrrd", tmp_path / "a.nrrd", tmp_path / "f.nrrd")
    assert done.returncode == 1 and "f.nrrd: shape" in done.stderr


@pytest.mark.parametrize("command", ["demo", "phantom", "metrics"])
def test_help_is_available(command):
    done = run_cli(command, "--help")
    assert done.returncode == 0 and "--quiet" in done.stdout
