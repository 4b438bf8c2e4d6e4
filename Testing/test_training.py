"""Training end to end on tiny phantom cases: outputs, resume, subject split, NaN guard, output
checks, cancel, the command line, and a real two-process DDP run with gloo."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from FusionINNLib.cli import main as cli_main
from FusionINNLib.core.engine import Cancelled
from FusionINNLib.core.losses import LossTerms
from FusionINNLib.io.checkpoint import load_checkpoint
from FusionINNLib.io.phantom import write_phantom_cases
from FusionINNLib.train import checkpoints, training
from FusionINNLib.train.training import TrainingConfig, train

REPO = Path(__file__).resolve().parents[1]
# Case name → phantom index. BraTS 2023 naming: subject BraTS-GLI-00001 has two time points.
CASES = {"BraTS-GLI-00001-000": 0, "BraTS-GLI-00001-001": 1, "BraTS-GLI-00002-000": 2, "BraTS-GLI-00003-000": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("phantoms")
    write_phantom_cases(raw, cases=len(CASES), shape=(16, 64, 64), seed=5)
    root = tmp_path_factory.mktemp("brats2023")
    suffix = {"t1ce": "t1c", "flair": "t2f", "seg": "seg"}
    for name, index in CASES.items():
        source = raw / f"BraTS2021_Phantom_{index:05d}"
        (root / name).mkdir()
        for key, new in suffix.items():
            shutil.copy(source / f"BraTS2021_Phantom_{index:05d}_{key}.nii.gz", root / name / f"{name}-{new}.nii.gz")
    return root


def _config(data_dir: Path, out: Path, **overrides) -> TrainingConfig:
    settings = dict(data_dir=str(data_dir), output=str(out / "model.pt"), cache_dir=str(out.parent / "cache"),
                    epochs=1, batch_size=4, val_fraction=0.34, seed=3, device="cpu")
    settings.update(overrides)
    return TrainingConfig(**settings)


def _read_tsv(path: Path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def test_one_epoch_writes_model_tables_schemas_and_plot_with_a_subject_split(data_dir, tmp_path):
    progress, messages = [], []
    result = train(_config(data_dir, tmp_path / "run", piella_weight=0.5), progress=lambda f, m: progress.append(f),
                   log=messages.append)
    run_dir = tmp_path / "run" / "model_run"
    assert result.run_dir == run_dir and result.best_epoch == 1 and result.epochs_run == 1

    loaded = load_checkpoint(result.model_path)
    meta = loaded.metadata
    assert meta["modalities"] == ["t1ce", "flair"] and meta["normalization"] == "volume"
    assert meta["data"]["train_slices"] > 0 and meta["data"]["val_slices"] > 0
    assert "Found 4 case(s) of 3 subject(s)" in meta["data"]["summary"]
    train_subjects, val_subjects = set(meta["split"]["train_subjects"]), set(meta["split"]["val_subjects"])
    assert train_subjects and val_subjects and not train_subjects & val_subjects
    # Both time points of BraTS-GLI-00001 sit on the same side of the split.
    sides = {case: ("train" if case in meta["data"]["train_cases"] else "val")
             for case in meta["data"]["train_cases"] + meta["data"]["val_cases"]}
    assert sides["BraTS-GLI-00001-000"] == sides["BraTS-GLI-00001-001"]
    split = json.loads((run_dir / "split.json").read_text())
    assert set(split["val_subjects"]) == val_subjects
    assert set(meta["metrics"]) >= {"fusion_ssim_t1ce", "decomposition_ssim_flair", "decomposition_psnr_t1ce"}

    history = _read_tsv(result.history_path)
    assert [row["epoch"] for row in history] == ["1"]
    for column in ("train_loss", "train_fusion", "train_latent", "train_dec_ssim", "val_loss", "val_dec", "lr",
                   "seconds"):
        assert math.isfinite(float(history[0][column])), column
    assert 0.0 < float(history[0]["train_fusion_piella"]) < 1.0  # the local-weight term ran (1 - Q_P)
    schema = {row["columnName"]: row["type"] for row in _read_tsv(training.schema_path(result.history_path))}
    assert schema["epoch"] == "int" and schema["val_loss"] == "double" and list(schema) == list(history[0])

    metrics = _read_tsv(result.metrics_path)
    assert [row["case"] for row in metrics] == sorted(meta["data"]["val_cases"]) + ["mean"]
    for column in ("fusion_ssim_t1ce", "fusion_ssim_flair", "decomposition_ssim_t1ce", "decomposition_psnr_flair"):
        value = float(metrics[-1][column])
        assert math.isfinite(value) and (value <= 1.0 or "psnr" in column)
    # The whole fusion metric suite joins the table (mean over each case's slices).
    from FusionINNLib.metrics import FUSION_METRIC_NAMES

    for name in FUSION_METRIC_NAMES:
        assert math.isfinite(float(metrics[0][f"fusion_{name}"])), name
    assert 0.0 < float(metrics[-1]["fusion_Q_SSIM"]) <= 1.0 and 0.0 < float(metrics[-1]["fusion_Q_FMI"]) <= 1.0
    metric_schema = {row["columnName"]: row["type"] for row in _read_tsv(training.schema_path(result.metrics_path))}
    assert metric_schema["case"] == "string" and metric_schema["slices"] == "int"
    assert metric_schema["decomposition_ssim_t1ce"] == "double"

    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    assert progress and progress[-1] == pytest.approx(1.0) and all(0 <= f <= 1 for f in progress)
    assert any("ETA" in message for message in messages)
    # The slice cache is filled, so the next run reads it instead of decoding the images again.
    assert any(p.suffix == ".npy" for p in (tmp_path / "cache").iterdir())


def test_resume_continues_the_history_and_matches_an_uninterrupted_run(data_dir, tmp_path):
    common = dict(crop_size=32, latent_loss="pixel_mmd")
    straight = train(_config(data_dir, tmp_path / "a", epochs=2, **common), log=lambda m: None)
    first = train(_config(data_dir, tmp_path / "b", epochs=1, **common), log=lambda m: None)
    messages = []
    resumed = train(_config(data_dir, tmp_path / "b", epochs=2, resume=str(first.run_dir / "last.pt"), **common),
                    log=messages.append)
    assert any("resuming" in m for m in messages)
    history = _read_tsv(resumed.history_path)
    assert [row["epoch"] for row in history] == ["1", "2"]
    reference = _read_tsv(straight.history_path)
    for ours, theirs in zip(history, reference):
        for column in ("train_loss", "val_loss", "train_latent"):
            assert float(ours[column]) == pytest.approx(float(theirs[column]), rel=1e-5, abs=1e-7), column
    a = load_checkpoint(straight.model_path).model.graph.state_dict()
    b = load_checkpoint(resumed.model_path).model.graph.state_dict()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_a_killed_run_resumes_from_its_last_complete_epoch(data_dir, tmp_path):
    """SIGKILL in the middle of training (no handler runs): last.pt is a complete checkpoint of the
    last finished epoch, and --resume carries on from there with the whole history."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "FusionINNLib.cli", "train", str(data_dir), "--output", str(out / "model.pt"),
               "--epochs", "100", "--batch-size", "4", "--crop-size", "32", "--val-fraction", "0.34", "--seed", "3",
               "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "model_run" / "last.pt"
    deadline = time.monotonic() + 300
    try:
        while not last.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        time.sleep(1.0)  # well into the next epoch, possibly while last.pt is being rewritten
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()  # the model is written once, at the end
    # what the Slicer module finds when Train is pressed again for the same output model
    from FusionINNLib.slicer_support import resumable_checkpoint

    assert resumable_checkpoint(out / "model.pt") == str(last)

    state = torch.load(last, map_location="cpu", weights_only=True)[checkpoints.STATE_KEY]
    done = state["epoch"]
    assert done >= 1 and [row["epoch"] for row in state["history"]] == list(range(1, done + 1))

    messages = []
    resumed = train(_config(data_dir, out, epochs=done + 1, crop_size=32, resume=str(last)), log=messages.append)
    assert any("resuming" in m for m in messages)
    assert [row["epoch"] for row in _read_tsv(resumed.history_path)] == [str(e) for e in range(1, done + 2)]
    assert load_checkpoint(resumed.model_path).metadata["training"]["epochs_run"] == done + 1


def test_nan_guard_skips_the_step_and_says_so(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_fusion_loss = training.fusion_loss

    def poisoned(*args, **kwargs):
        terms = real_fusion_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the first training step
            nan = terms.total * float("nan")
            return LossTerms(nan, terms.ssim, terms.l2)
        return terms

    monkeypatch.setattr(training, "fusion_loss", poisoned)
    messages = []
    result = train(_config(data_dir, tmp_path / "nan", batch_size=2), log=messages.append)
    history = _read_tsv(result.history_path)
    assert history[0]["skipped_steps"] == "1"
    assert math.isfinite(float(history[0]["train_loss"]))
    assert any("non-finite" in m and "skipped" in m for m in messages)
    state = load_checkpoint(result.model_path).model.graph.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_unwritable_output_or_full_disk_is_reported_before_training(data_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="a_file"):
        train(_config(data_dir, tmp_path, output=str(blocker / "model.pt")))

    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
    with pytest.raises(ValueError, match="not enough free disk space"):
        train(_config(data_dir, tmp_path / "full"))
    assert not (tmp_path / "full" / "model_run" / "split.json").exists()


def test_invalid_settings_and_cancel(data_dir, tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        train(_config(data_dir, tmp_path, alpha=1.5))
    with pytest.raises(ValueError, match="piella_weight"):
        train(_config(data_dir, tmp_path, piella_weight=-1.0))
    with pytest.raises(ValueError, match="crop_size"):
        train(_config(data_dir, tmp_path, crop_size=17))
    with pytest.raises(ValueError, match="latent loss"):
        train(_config(data_dir, tmp_path, latent_loss="kl"))
    with pytest.raises(FileNotFoundError):
        train(_config(tmp_path / "missing", tmp_path))
    with pytest.raises(Cancelled):
        train(_config(data_dir, tmp_path / "cancel"), cancel=lambda: True)


def test_cli_train_reports_errors_in_one_line(tmp_path, capsys):
    code = cli_main(["train", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m.pt"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("fusioninn train: error:") and "nowhere" in err[0]


def test_ddp_two_processes_with_gloo_partition_the_data(data_dir, tmp_path):
    """torchrun, 2 CPU processes, gloo: each rank trains on its own half and the replicas agree."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "FusionINNLib.cli", "train", str(data_dir), "--output", str(out / "model.pt"),
               "--epochs", "1", "--batch-size", "2", "--val-fraction", "0.34", "--seed", "3", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    partition = json.loads((out / "model_run" / "partition.json").read_text())
    assert partition["world_size"] == 2 and partition["backend"] == "gloo"
    ranks = sorted(partition["ranks"], key=lambda r: r["rank"])
    size = partition["dataset_size"]
    samples = [set(r["samples"]) for r in ranks]
    assert [len(r["samples"]) for r in ranks] == [math.ceil(size / 2)] * 2
    assert samples[0] | samples[1] == set(range(size))
    assert len(samples[0] & samples[1]) == 2 * math.ceil(size / 2) - size  # DistributedSampler's padding only
    assert ranks[0]["parameter_checksum"] == pytest.approx(ranks[1]["parameter_checksum"], rel=1e-12)

    meta = load_checkpoint(out / "model.pt").metadata
    assert meta["training"]["world_size"] == 2
    assert len(partition["items"]) == size == meta["data"]["train_slices"]


def test_early_stopping_and_the_scheduler_follow_the_epoch_mean_validation_loss(data_dir, tmp_path, monkeypatch):
    seen = []

    def flat_validation(self):
        return dict.fromkeys(training.LOSS_PARTS, 0.5)

    real_step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def recording_step(self, metrics, *args, **kwargs):
        seen.append(float(metrics))
        return real_step(self, metrics, *args, **kwargs)

    monkeypatch.setattr(training._Trainer, "validate", flat_validation)
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", recording_step)
    messages = []
    result = train(_config(data_dir, tmp_path / "stop", epochs=5, early_stopping=2, crop_size=32), log=messages.append)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert seen == [0.5, 0.5, 0.5]
    assert any("early stopping" in m for m in messages)
    assert [row["best"] for row in _read_tsv(result.history_path)] == ["1", "0", "0"]


def test_cli_choices_match_the_library():
    from FusionINNLib.core import losses
    from FusionINNLib.train import options as train_options

    assert train_options.PRIORS == losses.PRIORS
    assert train_options.LATENT_LOSSES == losses.LATENT_LOSSES
    assert train_options.LATENT_LOSSES[0] == losses.DEFAULT_LATENT_LOSS


def test_intensity_jitter_is_an_affine_map_per_sample_and_modality_reproducible_and_off_by_default():
    rng = np.random.default_rng(0)
    slices = rng.uniform(-0.2, 1.2, size=(2, 3, 40, 44)).astype(np.float32)
    case = training.CaseData("c", "s", slices[0], slices[1], np.arange(3))
    plain = training.SliceDataset([case], multiple=4, crop=32, seed=7)
    jittered = training.SliceDataset([case], multiple=4, crop=32, seed=7, jitter=0.1)
    assert TrainingConfig.__dataclass_fields__["intensity_jitter"].default == 0.0
    gains = []
    for index in range(len(plain)):
        x, y = plain[index].numpy().astype(np.float64), jittered[index].numpy().astype(np.float64)
        assert torch.equal(jittered[index], jittered[index])  # same (seed, epoch, item): same sample
        for channel in range(2):  # the same crop, mapped by g x + o with |g - 1| <= 0.1, |o| <= 0.1
            gain, offset = np.polyfit(x[channel].ravel(), y[channel].ravel(), 1)
            assert np.allclose(gain * x[channel] + offset, y[channel], atol=1e-5)
            assert abs(gain - 1) <= 0.1 and abs(offset) <= 0.1
            gains.append(gain)
    assert np.ptp(gains) > 0.01  # drawn per sample and modality, not one constant map
    jittered.set_epoch(1)
    assert not torch.equal(jittered[0], training.SliceDataset([case], 4, 32, seed=7, jitter=0.1)[0])
    with pytest.raises(ValueError, match="intensity_jitter"):
        TrainingConfig(data_dir=".", output="m.pt", intensity_jitter=1.0).validate()


def test_resume_reads_through_the_checkpoint_loader(tmp_path):
    """A damaged or unsafe last.pt is refused by the checkpoint loader's one safe read, in one line."""
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"training_state": Path("x")}, unsafe)  # a class weights_only refuses
    for path, needle in ((damaged, "not a readable PyTorch checkpoint"), (unsafe, "refused unsafe unpickling")):
        config = TrainingConfig(data_dir=str(tmp_path), output=str(tmp_path / "m.pt"), resume=str(path))
        with pytest.raises(ValueError, match="cannot read the checkpoint to resume") as caught:
            train(config)
        assert needle in str(caught.value) and str(path) in str(caught.value)
        assert "\n" not in str(caught.value)


def test_run_paths_and_training_data_are_units_of_their_own(data_dir, tmp_path):
    """The trainer's data and artefact concerns work without a trainer: RunPaths resolves every
    output, load_training_data splits by subject, writes split.json and loads the cached slices."""
    config = _config(data_dir, tmp_path / "run")
    paths = training.RunPaths.resolve(config)
    assert paths.run_dir == tmp_path / "run" / "model_run" and paths.history_path.name == "history.tsv"
    (tmp_path / "run").mkdir()
    paths.check(lambda message: None)
    messages = []
    data = training.load_training_data(config, paths, training.DistributedContext(), None, messages.append)
    subjects = ({c.subject_id for c in data.train_data}, {c.subject_id for c in data.val_data})
    assert subjects[0] and subjects[1] and not subjects[0] & subjects[1]
    assert data.slice_counts["train"] == sum(len(c.indices) for c in data.train_data) > 0
    assert json.loads((paths.run_dir / "split.json").read_text())["seed"] == 3
    assert any(message.startswith("split by subject") for message in messages)
    with pytest.raises(ValueError, match="needs a file name ending in .pt"):
        training.RunPaths.resolve(_config(data_dir, tmp_path, output=str(tmp_path / "model")))


def test_training_step_decomposes_the_cleared_fused_image():
    from FusionINNLib.core.model import BACKGROUND_U, FUSED_BACKGROUND, FusionFlow, FusionINNConfig, logit
    from FusionINNLib.train.training import FlowTrainingStep

    flow = FusionFlow(FusionINNConfig(clear_background=True), seed=0)
    x = torch.rand(2, 2, 32, 32)
    x[:, :, :8] = -0.1  # both sources background in the top rows
    z = torch.randn(2, 1, 32, 32)
    y, _, x_hat = FlowTrainingStep(flow)(x, z)
    assert torch.all(y[:, :, :8] == FUSED_BACKGROUND)
    u, _ = flow(x)
    assert torch.equal(y[:, :, 8:], torch.sigmoid(u)[:, :, 8:])
    # the decomposition is the one inference computes from the cleared image alone, with each
    # source's background value where y says background
    u_in = logit(y).masked_fill(y == FUSED_BACKGROUND, BACKGROUND_U)
    assert torch.equal(flow.inverse_input(y), u_in)
    inverse = flow.inverse(u_in, z)
    assert torch.allclose(x_hat[:, :, 8:], inverse[:, :, 8:])
    assert torch.all(x_hat[:, :, :8] == -0.1)
