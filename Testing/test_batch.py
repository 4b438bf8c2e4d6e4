"""Batch fusion of case folders (FusionINNLib.jobs.batch) and the ``fusioninn batch`` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib.io.phantom import make_phantom_case
from FusionINNLib.io.volume import Volume, read_volume
from FusionINNLib.jobs import batch

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 32, 32)


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An explicit (untrained) checkpoint: the bundled model is not part of the test environment."""
    from FusionINNLib.core.model import FusionFlow
    from FusionINNLib.io.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, FusionFlow())
    return path


@pytest.fixture
def brats_folder(tmp_path) -> Path:
    """BraTS-2021-style cases: two complete, one without FLAIR."""
    root = tmp_path / "cases"
    for index in range(3):
        name = f"BraTS2021_{index:05d}"
        case = make_phantom_case(SHAPE, seed=index)
        _write(case["t1ce"], root / name / f"{name}_t1ce.nii.gz")
        if index != 2:
            _write(case["flair"], root / name / f"{name}_flair.nii.gz")
        _write(case["seg"], root / name / f"{name}_seg.nii.gz")
    return root


def _run(root, out, model_path, **options):
    messages = []
    result = batch.run_batch(root, out, model=model_path, device="cpu", log=messages.append, **options)
    return result, messages


def test_batch_fuses_every_complete_case_and_reports_the_incomplete_one(brats_folder, tmp_path, model_path):
    out = tmp_path / "out"
    result, messages = _run(brats_folder, out, model_path, keep_latent=True, metrics=True)
    by_status = {s: [o for o in result.outcomes if o.status == s] for s in batch.STATUSES}
    assert [o.case_id for o in by_status["ok"]] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert len(by_status["skipped"]) == 1
    assert "BraTS2021_00002" in by_status["skipped"][0].case_id
    assert "flair" in by_status["skipped"][0].message
    assert any("skipped" in m and "flair" in m for m in messages)

    for outcome in by_status["ok"]:
        fused = read_volume(outcome.output)
        source = read_volume(outcome.input1)
        assert fused.shape == SHAPE and fused.same_grid(source)
        assert 0.0 <= fused.array.min() and fused.array.max() <= 1.0
        assert outcome.output.with_name(outcome.output.name.replace(".nii.gz", ".fusioninn.json")).is_file()
        assert outcome.latent.is_file()
        assert set(outcome.metrics) >= {"Q_SSIM", "Q_FMI", "Q_NCIE", "Q_XY", "Q_P"}

    rows = batch.read_summary(result.summary_path)
    assert result.summary_path == out / "summary.tsv"
    assert [r["status"] for r in rows] == ["skipped", "ok", "ok"]
    assert list(rows[0])[:7] == list(batch.BASE_COLUMNS)
    assert "Q_SSIM" in rows[1] and float(rows[1]["Q_SSIM"]) == pytest.approx(by_status["ok"][0].metrics["Q_SSIM"],
                                                                              rel=1e-5)
    assert rows[0]["Q_SSIM"] == ""
    assert "2 ok" in result.describe() and "1 skipped" in result.describe()


def test_batch_outputs_decompose_exactly_with_their_kept_latent(brats_folder, tmp_path, model_path):
    from FusionINNLib.jobs.pipeline import decompose_files

    result, _ = _run(brats_folder, tmp_path / "out", model_path, keep_latent=True)
    outcome = next(o for o in result.outcomes if o.status == "ok")
    out1, out2 = tmp_path / "d1.nii.gz", tmp_path / "d2.nii.gz"
    decompose_files(outcome.output, out1, out2, latent=outcome.latent, model=model_path, device="cpu",
                    log=lambda m: None)
    for decomposed, source in ((out1, outcome.input1), (out2, outcome.input2)):
        original = read_volume(source).array
        np.testing.assert_allclose(read_volume(decomposed).array, original, atol=1e-3 * np.ptp(original))


def test_a_failing_case_is_reported_and_the_batch_continues(brats_folder, tmp_path, model_path):
    broken = brats_folder / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    result, messages = _run(brats_folder, tmp_path / "out", model_path)
    statuses = {o.case_id: o for o in result.outcomes}
    assert statuses["BraTS2021_00000"].status == "failed"
    assert "BraTS2021_00000_t1ce.nii.gz" in statuses["BraTS2021_00000"].message
    assert statuses["BraTS2021_00000"].output is None
    assert statuses["BraTS2021_00001"].status == "ok"
    assert not list((tmp_path / "out").glob("BraTS2021_00000*"))
    assert any("BraTS2021_00000: failed" in m for m in messages)
    assert result.succeeded == 1


def test_different_geometry_is_resampled_with_a_note(tmp_path, model_path):
    case = make_phantom_case(SHAPE, seed=5)
    _write(case["t1ce"], tmp_path / "c" / "p_t1ce.nii.gz")
    _write(case["flair"][:, ::2, ::2], tmp_path / "c" / "p_flair.nii.gz", spacing=(2.0, 2.0, 1.0))
    result, _ = _run(tmp_path / "c", tmp_path / "out", model_path)
    (outcome,) = result.outcomes
    assert outcome.status == "ok" and "resampled" in outcome.message
    assert read_volume(outcome.output).shape == SHAPE


def test_pattern_pairs_in_one_flat_folder(tmp_path, model_path):
    flat = tmp_path / "flat"
    for name in ("p01", "p02", "p03"):
        case = make_phantom_case(SHAPE, seed=int(name[1:]))
        _write(case["t1ce"], flat / f"{name}_T1c.nrrd")
        if name != "p03":
            _write(case["flair"], flat / f"{name}_FLAIR.nrrd")
    _write(np.zeros(SHAPE), flat / "notes_other.nrrd")
    result, _ = _run(flat, tmp_path / "out", model_path, pattern1="*_T1c.nrrd", pattern2="*_FLAIR.nrrd",
                     output_format="nrrd")
    ok = [o for o in result.outcomes if o.status == "ok"]
    assert [o.case_id for o in ok] == ["p01", "p02"]
    assert [o.output.name for o in ok] == ["p01_fused.nrrd", "p02_fused.nrrd"]
    (skipped,) = [o for o in result.outcomes if o.status == "skipped"]
    assert "p03_T1c.nrrd" in skipped.case_id and "*_FLAIR.nrrd" in skipped.message


def test_find_pattern_cases_pairs_by_folder_and_wildcards(tmp_path):
    for path in ("a/scan_T1.nii", "a/scan_T2.nii", "b/x_T1.nii", "b/x_T2.nii", "b/y_T1.nii", "c/.hidden_T1.nii"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    cases, skipped = batch.find_pattern_cases(tmp_path, "*_T1.nii", "*_T2.nii")
    assert [c.case_id for c in cases] == ["a/scan", "b/x"]
    assert cases[0].input2 == tmp_path / "a" / "scan_T2.nii"
    assert [p.name for p, _ in skipped] == ["y_T1.nii"]
    with pytest.raises(ValueError, match="must differ"):
        batch.find_pattern_cases(tmp_path, "*.nii", "*.nii")
    with pytest.raises(ValueError, match="same wildcards"):
        batch.find_pattern_cases(tmp_path, "*_T1.nii", "scan_T2.nii")
    with pytest.raises(ValueError, match="without folders"):
        batch.find_pattern_cases(tmp_path, "a/*_T1.nii", "a/*_T2.nii")
    cases, skipped = batch.find_pattern_cases(tmp_path, "*T1.nii", "scan_T?.nii")
    assert any("matches both" in reason for _, reason in skipped)


def test_find_batch_cases_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        batch.find_batch_cases(tmp_path / "missing")
    with pytest.raises(ValueError, match="both --pattern1 and --pattern2"):
        batch.find_batch_cases(tmp_path, pattern1="*.nii")
    with pytest.raises(ValueError, match="exactly two modalities"):
        batch.find_batch_cases(tmp_path, modalities=("t1ce",))
    with pytest.raises(ValueError, match="no pair"):
        batch.find_batch_cases(tmp_path, pattern1="*_a.nii", pattern2="*_b.nii")


def test_cancel_stops_the_batch_and_still_writes_the_summary(brats_folder, tmp_path, model_path):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # the first case starts, everything after is cancelled

    result, _ = _run(brats_folder, tmp_path / "out", model_path, cancel=cancel)
    assert result.cancelled
    statuses = [o.status for o in result.outcomes if o.status != "skipped"]
    assert statuses[-1] == "cancelled" and "ok" not in statuses[1:]
    rows = batch.read_summary(result.summary_path)
    assert "cancelled" in [r["status"] for r in rows]


def test_summary_cells_never_break_the_tsv(tmp_path):
    outcome = batch.CaseOutcome("case\t1", "failed", "line one\nline\ttwo", metrics={"Q": float("nan"), "R": 0.5})
    path = batch.write_summary([outcome], tmp_path / "s.tsv")
    (row,) = batch.read_summary(path)
    assert row["case"] == "case 1" and row["message"] == "line one line two"
    assert row["Q"] == "nan" and row["R"] == "0.5"
    assert not list(tmp_path.glob(".s.tsv*"))  # no temporary file left behind
    with pytest.raises(ValueError):
        batch.CaseOutcome("c", "weird")


def test_output_stems_are_safe_and_unique(tmp_path):
    cases = [batch.BatchCase("a/b", Path("x"), Path("y")), batch.BatchCase("a_b", Path("x"), Path("y")),
             batch.BatchCase("../..", Path("x"), Path("y"))]
    paths = batch._output_paths(cases, tmp_path, "nii.gz")
    names = [fused.name for fused, _ in paths]
    assert names == ["a_b_fused.nii.gz", "a_b_2_fused.nii.gz", "case_fused.nii.gz"]
    assert all(fused.parent == tmp_path for fused, _ in paths)


def test_score_volumes_aligns_inputs_and_mask():
    case = make_phantom_case((16, 48, 48), seed=7)
    volume1 = Volume(case["t1ce"])
    coarse = Volume(np.ascontiguousarray(case["flair"][:, ::2, ::2]), spacing=(2.0, 2.0, 1.0))
    fused = volume1.with_array(np.clip(case["t1ce"] / case["t1ce"].max(), 0, 1).astype(np.float32))
    mask = Volume((case["seg"] > 0).astype(np.uint8))
    result = batch.score_volumes(volume1, coarse, fused, mask=mask)
    assert any("input 2 resampled" in note for note in result["notes"])
    assert np.isfinite(result["summary"]["Q_SSIM"])
    with pytest.raises(ValueError, match="mask is empty"):
        batch.score_volumes(volume1, coarse, fused, mask=Volume(np.zeros((16, 48, 48), np.uint8)))


def test_baselines_and_difference_volume():
    case = make_phantom_case((16, 32, 32), seed=8)
    volume1, volume2 = Volume(case["t1ce"]), Volume(case["flair"])
    baselines = batch.baseline_fusions(volume1, volume2)
    assert set(baselines) == {"mean", "max", "weighted"}
    for fused in baselines.values():
        assert fused.shape == volume1.shape and fused.array.min() >= 0 and fused.array.max() <= 1
    assert np.all(baselines["max"].array >= baselines["mean"].array - 1e-6)
    difference = batch.difference_volume(volume2, volume1)
    np.testing.assert_allclose(difference.array, case["flair"] - case["t1ce"], atol=1e-4)


# -- the command line -------------------------------------------------------------------------
def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"))
    return subprocess.run([sys.executable, "-m", "FusionINNLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_batch_writes_outputs_and_summary(brats_folder, tmp_path, model_path):
    out = tmp_path / "cli_out"
    run = _cli("batch", brats_folder, "--output", out, "--model", model_path, "--device", "cpu", "--metrics",
               "--latent", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    rows = batch.read_summary(out / "summary.tsv")
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "skipped"]
    assert all(Path(r["output"]).is_file() for r in rows if r["status"] == "ok")
    assert all(r["Q_SSIM"] not in ("", "nan") for r in rows if r["status"] == "ok")


def test_cli_batch_exit_code_is_nonzero_when_every_case_fails(tmp_path, model_path):
    root = tmp_path / "bad"
    for name in ("c1", "c2"):
        (root / name).mkdir(parents=True)
        (root / name / f"{name}_t1ce.nii.gz").write_bytes(b"broken")
        (root / name / f"{name}_flair.nii.gz").write_bytes(b"broken")
    run = _cli("batch", root, "--output", tmp_path / "out", "--model", model_path, "--quiet")
    assert run.returncode == 1
    assert "no case was fused" in run.stderr and "Traceback" not in run.stderr
    rows = batch.read_summary(tmp_path / "out" / "summary.tsv")
    assert [r["status"] for r in rows] == ["failed", "failed"]


def test_cli_batch_reports_a_missing_folder_in_one_line(tmp_path, model_path):
    run = _cli("batch", tmp_path / "nowhere", "--output", tmp_path / "out", "--model", model_path)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "not found" in run.stderr


def test_batch_under_torchrun_shares_the_cases_and_writes_one_summary(tmp_path, model_path):
    """2 CPU ranks (gloo) fuse 3 cases between them; the summary and the fused images are those of
    a single-process run."""
    root = tmp_path / "cases"
    for index in range(3):
        name = f"BraTS2021_{index:05d}"
        case = make_phantom_case(SHAPE, seed=10 + index)
        _write(case["t1ce"], root / name / f"{name}_t1ce.nii.gz")
        _write(case["flair"], root / name / f"{name}_flair.nii.gz")
    # discovery skips a case without FLAIR: one skipped row, written once
    _write(make_phantom_case(SHAPE, seed=9)["t1ce"], root / "BraTS2021_00009" / "BraTS2021_00009_t1ce.nii.gz")
    single, _ = _run(root, tmp_path / "single", model_path, metrics=True)
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "FusionINNLib.cli", "batch", str(root), "--output", str(tmp_path / "ranks"), "--model",
               str(model_path), "--device", "cpu", "--metrics"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = batch.read_summary(tmp_path / "ranks" / "summary.tsv")
    expected = batch.read_summary(single.summary_path)
    assert [(r["case"], r["status"]) for r in rows] == [(r["case"], r["status"]) for r in expected]
    assert [r["status"] for r in rows].count("ok") == 3 and [r["status"] for r in rows].count("skipped") == 1
    for row, reference in zip(rows, expected):
        if row["status"] != "ok":
            continue
        assert Path(row["output"]).parent == tmp_path / "ranks"
        np.testing.assert_array_equal(read_volume(row["output"]).array, read_volume(reference["output"]).array)
        assert float(row["Q_SSIM"]) == pytest.approx(float(reference["Q_SSIM"]), rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "ranks").glob("*summary*")) == ["summary.schema.tsv", "summary.tsv"]
