"""The jobs layer: requests → results, files and in-memory volumes alike, and their JSON form."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib import jobs
from FusionINNLib.core.engine import Cancelled
from FusionINNLib.core.errors import LatentMismatchError, ModelMismatchError, OptionError, error_from_dict, user_message
from FusionINNLib.core.model import FusionFlow
from FusionINNLib.io.checkpoint import save_checkpoint
from FusionINNLib.io.phantom import make_phantom_case
from FusionINNLib.io.volume import Volume, read_volume

REPO = Path(__file__).resolve().parents[1]


def write_image(path, array, spacing=(1.0, 1.0, 2.0), origin=(10.0, -5.0, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return Path(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", FusionFlow(seed=3))


@pytest.fixture(scope="module")
def case():
    return make_phantom_case((16, 40, 44), seed=5)


@pytest.fixture
def pair(tmp_path, case):
    return write_image(tmp_path / "t1.nii.gz", case["t1ce"]), write_image(tmp_path / "flair.nrrd", case["flair"])


def test_fuse_job_from_files_and_from_volumes_agree_and_decompose_exactly(tmp_path, pair, model_path):
    fractions = []
    on_files = jobs.run(jobs.FuseRequest(str(pair[0]), str(pair[1]), output=str(tmp_path / "f.nrrd"),
                                         latent_output=str(tmp_path / "z.nrrd"), model=str(model_path),
                                         device="cpu"), progress=fractions.append)
    assert on_files.written == [str(tmp_path / "f.nrrd"), str(tmp_path / "z.nrrd")]
    assert (tmp_path / "f.fusioninn.json").is_file()
    assert fractions and fractions[-1] == pytest.approx(1.0)
    in_memory = jobs.run(jobs.FuseRequest(read_volume(pair[0]), read_volume(pair[1]), keep_latent=True,
                                          model=str(model_path), device="cpu"))
    assert in_memory.written == []
    np.testing.assert_array_equal(in_memory.fused.array, on_files.fused.array)
    np.testing.assert_array_equal(in_memory.latent, on_files.latent)
    assert in_memory.record["normalization"] == on_files.record["normalization"]

    exact = jobs.run(jobs.DecomposeRequest(str(tmp_path / "f.nrrd"), latent=str(tmp_path / "z.nrrd"),
                                           output1=str(tmp_path / "d1.nrrd"), output2=str(tmp_path / "d2.nrrd"),
                                           model=str(model_path), device="cpu"))
    assert exact.exact and len(exact.written) == 2
    t1 = read_volume(pair[0]).array.astype(np.float64)
    assert np.abs(read_volume(tmp_path / "d1.nrrd").array - t1).max() < 1e-3 * np.ptp(t1)
    # the same decomposition in memory: record and latent given as values
    again = jobs.run(jobs.DecomposeRequest(in_memory.fused, record=in_memory.record, latent=in_memory.latent,
                                           model=str(model_path), device="cpu"))
    np.testing.assert_allclose(again.source1.array, exact.source1.array, rtol=0, atol=1e-3)


def test_messages_survive_json_and_a_store(tmp_path, pair, model_path):
    store = jobs.ArrayStore(tmp_path / "store")
    request = jobs.FuseRequest(read_volume(pair[0]), read_volume(pair[1]), keep_latent=True, model=str(model_path),
                               device="cpu", input_names=("T1", "FLAIR"))
    with pytest.raises(TypeError, match="ArrayStore"):
        request.to_dict()
    wire = json.loads(json.dumps(request.to_dict(store)))
    assert wire["kind"] == "fuse" and "__volume__" in wire["input1"]
    received = jobs.message_from_dict(wire, store)
    assert isinstance(received, jobs.FuseRequest) and received.input_names == ("T1", "FLAIR")
    np.testing.assert_array_equal(received.input1.array, request.input1.array)
    assert received.input1.spacing == request.input1.spacing and received.input1.origin == request.input1.origin
    result = jobs.run(received)
    back = jobs.message_from_dict(json.loads(json.dumps(result.to_dict(store))), store)
    assert isinstance(back, jobs.FuseResult)
    np.testing.assert_array_equal(back.fused.array, result.fused.array)
    np.testing.assert_array_equal(back.latent, result.latent)
    assert back.record == json.loads(json.dumps(result.record))
    # a request of plain paths needs no store
    plain = jobs.ScoreRequest("a.nii.gz", "b.nii.gz", "f.nrrd", baselines=("mean", "max"))
    assert jobs.message_from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    with pytest.raises(ValueError, match="unknown job message kind"):
        jobs.message_from_dict({"kind": "nonsense"})


def test_cancel_raises_and_writes_nothing(tmp_path, pair, model_path):
    with pytest.raises(Cancelled):
        jobs.run(jobs.FuseRequest(str(pair[0]), str(pair[1]), output=str(tmp_path / "f.nrrd"),
                                  model=str(model_path), device="cpu", batch_size=1), cancel=lambda: True)
    assert not (tmp_path / "f.nrrd").exists() and not (tmp_path / "f.fusioninn.json").exists()


def test_score_job_is_the_cli_and_the_batch_scorer(tmp_path, pair, model_path, capfd):
    """The same triple scored by the CLI, the score job (the GUI's path) and batch gives one set of numbers."""
    fused = tmp_path / "f.nrrd"
    jobs.run(jobs.FuseRequest(str(pair[0]), str(pair[1]), output=str(fused), model=str(model_path), device="cpu"))
    report = jobs.run(jobs.ScoreRequest(read_volume(pair[0]), read_volume(pair[1]), read_volume(fused),
                                        baselines=("mean",)))
    from FusionINNLib.cli import main
    from FusionINNLib.jobs.batch import score_volumes

    batch_summary = score_volumes(read_volume(pair[0]), read_volume(pair[1]), read_volume(fused))["summary"]
    assert main(["metrics", str(pair[0]), str(pair[1]), str(fused), "--json"]) == 0
    cli_summary = json.loads(capfd.readouterr().out)["summary"]
    for name, value in report.summary.items():
        assert batch_summary[name] == pytest.approx(value, nan_ok=True, rel=1e-12)
        if np.isfinite(value):
            assert cli_summary[name] == pytest.approx(value, rel=1e-12)
    assert set(report.baselines) == {"mean"}
    assert report.baselines["mean"]["Q_SSIM"] != pytest.approx(report.summary["Q_SSIM"])


def test_decomposition_rows_use_the_source_scale(tmp_path, case):
    """A decomposition at half the source's brightness is not a perfect one (per-image min-max said it was)."""
    source = Volume(case["t1ce"].astype(np.float32))
    half = source.with_array(source.array * np.float32(0.5))
    report = jobs.run(jobs.ScoreRequest(source, Volume(case["flair"]), source.with_array(
        np.clip(source.array / source.array.max(), 0, 1)), decomposed1=half, decomposed2=Volume(case["flair"])))
    assert report.decomposition["2"]["SSIM"] == pytest.approx(1.0)
    assert report.decomposition["1"]["SSIM"] < 0.9
    assert report.decomposition["1"]["MAE"] > 0.05


def test_typed_errors_are_worded_per_front_end(tmp_path, pair, model_path):
    other = save_checkpoint(tmp_path / "other.pt", FusionFlow(seed=11))
    jobs.run(jobs.FuseRequest(str(pair[0]), str(pair[1]), output=str(tmp_path / "f.nrrd"), model=str(model_path),
                              device="cpu"))
    with pytest.raises(ModelMismatchError) as caught:
        jobs.run(jobs.DecomposeRequest(str(tmp_path / "f.nrrd"), output1=str(tmp_path / "a.nrrd"),
                                       output2=str(tmp_path / "b.nrrd"), model=str(other), device="cpu"))
    error = caught.value
    assert isinstance(error, ValueError)  # older except clauses still catch it
    assert "--model" in str(error) and "--model" in error.message("cli")
    assert "--" not in error.message("gui") and "same model" in error.message("gui")
    rebuilt = error_from_dict(json.loads(json.dumps(jobs.error_to_dict(error))))
    assert isinstance(rebuilt, ModelMismatchError) and rebuilt.message("gui") == error.message("gui")
    both = OptionError(rule="both", options=("std1", "std2"))
    assert str(both) == "give both --std1 and --std2, or neither"
    assert "--" not in user_message(both, "gui")
    latent = LatentMismatchError(path="z.nrrd", reason="fingerprint")
    assert "(--samples)" in str(latent) and "--" not in latent.message("gui")


def test_worker_style_round_trip_in_a_subprocess(tmp_path, pair, model_path):
    """A request written as JSON by one process is run by another, which answers with JSON + .npy files."""
    store = tmp_path / "store"
    request = jobs.FuseRequest(read_volume(pair[0]), read_volume(pair[1]), model=str(model_path), device="cpu")
    (tmp_path / "request.json").write_text(json.dumps(request.to_dict(jobs.ArrayStore(store))))
    script = (
        "import json, sys\n"
        "from FusionINNLib import jobs\n"
        "store = jobs.ArrayStore(sys.argv[2])\n"
        "request = jobs.message_from_dict(json.load(open(sys.argv[1])), store)\n"
        "print(json.dumps(jobs.run(request).to_dict(store)))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "request.json"), str(store)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "FusionINN"),
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = jobs.message_from_dict(json.loads(done.stdout.strip().splitlines()[-1]), jobs.ArrayStore(store))
    local = jobs.run(request)
    np.testing.assert_array_equal(result.fused.array, local.fused.array)
    assert result.fused.spacing == local.fused.spacing


def test_library_errors_name_no_flag_in_the_gui_wording(tmp_path, pair):
    """Every typed error the library raises for option combinations, a device or a latent reads for
    the GUI without a command-line flag, and for the CLI exactly as before."""
    from FusionINNLib.core.engine import select_device
    from FusionINNLib.core.errors import DeviceUnavailableError, FusionINNError
    from FusionINNLib.jobs.batch import find_batch_cases
    from FusionINNLib.jobs.explain import explain_files

    raised = []
    for run in (lambda: explain_files(pair[0], pair[1], tmp_path / "g1.nrrd", tmp_path / "g2.nrrd",
                                      jacobian1=tmp_path / "j1.nrrd"),
                lambda: explain_files(pair[0], pair[1], tmp_path / "g1.nrrd", tmp_path / "g2.nrrd",
                                      jacobian1=tmp_path / "j1.nrrd", jacobian2=tmp_path / "j2.nrrd"),
                lambda: explain_files(pair[0], pair[1], tmp_path / "g1.nrrd", tmp_path / "g2.nrrd", spacing=4,
                                      approximate=True),
                lambda: find_batch_cases(tmp_path, pattern1="*_a.nii.gz"),
                lambda: find_batch_cases(tmp_path, pattern1="*.nii.gz", pattern2="*.nii.gz")):
        with pytest.raises(FusionINNError) as caught:
            run()
        raised.append(caught.value)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError) as caught:
            select_device("cuda")
        raised.append(caught.value)
    assert [str(e) for e in raised[:5]] == [
        "give both --jacobian1 and --jacobian2, or neither", "Jacobian images need --point i,j,k",
        "give either --spacing or --approximate, not both", "give both --pattern1 and --pattern2, or neither",
        "--pattern1 and --pattern2 must differ"]
    for error in raised:
        assert "--" in error.message("cli")
        gui = user_message(error, "gui")
        assert "--" not in gui and gui, gui
        assert error_from_dict(jobs.error_to_dict(error)).message("gui") == gui


@pytest.mark.parametrize("error", [
    __import__("FusionINNLib.core.errors", fromlist=["x"]).OutOfMemoryError(device="cuda:0"),
    __import__("FusionINNLib.core.errors", fromlist=["x"]).ModelNotFoundError(path="/x/fusioninn_default.pt"),
    __import__("FusionINNLib.core.errors", fromlist=["x"]).TrainingDivergedError(detail="m.pt: not written"),
])
def test_every_typed_error_has_a_flag_free_gui_wording(error):
    assert "--" in str(error) and "--" not in error.message("gui")
    assert error_from_dict(json.loads(json.dumps(jobs.error_to_dict(error)))).message("gui") == error.message("gui")


def test_save_checkpoint_refuses_nan_weights_with_a_typed_error(tmp_path):
    import torch

    from FusionINNLib.core.errors import TrainingDivergedError
    from FusionINNLib.io.checkpoint import CheckpointError

    model = FusionFlow(seed=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path / "nan.pt", model)
    assert isinstance(caught.value, TrainingDivergedError) and not (tmp_path / "nan.pt").exists()
    assert "--learning-rate" in str(caught.value) and "'Learning rate'" in caught.value.message("gui")


def test_explain_job_in_memory_matches_the_files_it_writes(tmp_path, pair, model_path):
    files = jobs.run(jobs.ExplainRequest(str(pair[0]), str(pair[1]), guidance1=str(tmp_path / "g1.nrrd"),
                                         guidance2=str(tmp_path / "g2.nrrd"), slices="3:5", model=str(model_path),
                                         device="cpu", point_ijk=(20, 18, 4), jacobian1=str(tmp_path / "j1.nrrd"),
                                         jacobian2=str(tmp_path / "j2.nrrd")))
    assert sorted(Path(p).name for p in files.written) == ["g1.nrrd", "g2.nrrd", "j1.nrrd", "j2.nrrd"]
    memory = jobs.run(jobs.ExplainRequest(read_volume(pair[0]), read_volume(pair[1]), slices="3:5",
                                          model=str(model_path), device="cpu", point_ijk=(20, 18, 4),
                                          jacobians=True))
    assert memory.written == [] and memory.description["slices"] == [3, 5]
    np.testing.assert_allclose(memory.guidance1.array, read_volume(tmp_path / "g1.nrrd").array, atol=1e-6)
    np.testing.assert_allclose(memory.jacobian2.array, read_volume(tmp_path / "j2.nrrd").array, atol=1e-6)
    assert np.abs(memory.guidance1.array[3:5]).max() > 0 and not memory.guidance1.array[:3].any()


def test_model_cache_loads_once_and_notices_a_replaced_file(tmp_path):
    import os

    path = save_checkpoint(tmp_path / "m.pt", FusionFlow(seed=1))
    cache = jobs.ModelCache()
    first = cache.get(str(path))
    assert cache.get(str(path)) is first
    save_checkpoint(path, FusionFlow(seed=2))
    os.utime(path, (first_stamp := os.path.getmtime(path) + 5, first_stamp))
    second = cache.get(str(path))
    assert second is not first and second.sha256 != first.sha256
