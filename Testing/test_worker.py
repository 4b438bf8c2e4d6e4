"""The FusionINN worker process and its client (what the Slicer module uses), without Slicer.

The client is driven exactly as the module's QTimer drives it: ``job.poll()`` calls that never
block; ``job.wait()`` is that loop with a 10 ms sleep. Every test starts a real worker process
(``python -m FusionINNLib.worker``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from FusionINNLib import slicer_support as support
from FusionINNLib.io.phantom import make_phantom_case
from FusionINNLib.io.volume import Volume
from FusionINNLib.worker_client import WorkerClient, WorkerError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tmp_path):
    worker = WorkerClient(library_path=str(REPO / "FusionINN"), temp_root=str(tmp_path / "temp"),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield worker
    worker.stop()


def _case(shape=(16, 48, 48), seed=1):
    case = make_phantom_case(shape, seed=seed)
    geometry = dict(spacing=(0.9, 1.1, 2.0), origin=(5.0, -3.0, 10.0))
    return Volume(case["t1ce"], **geometry), Volume(case["flair"], **geometry)


def _fuse_request(volume1, volume2, keep_latent=True, batch_size=4):
    return {"kind": "fuse", "input1": volume1, "input2": volume2, "input_names": ["t1ce", "flair"],
            "keep_latent": keep_latent, "device": "cpu", "batch_size": batch_size}


def test_ready_ping_and_one_process_for_many_jobs(client):
    first = client.run("ping", {"echo": 1}, timeout=300)
    assert first["echo"] == 1 and first["torch_loaded"] is True  # torch is imported at start-up
    pid = client.pid
    for number in range(3):
        assert client.run("ping", {"echo": number}, timeout=30)["pid"] == pid
    assert client.ready is not None and client.ready["pid"] == pid and client.starts == 1


def test_fuse_and_exact_decompose_through_the_jobs_layer(client):
    volume1, volume2 = _case()
    fused = client.run("job", _fuse_request(volume1, volume2), timeout=300)
    assert fused["kind"] == "fuse_result"
    assert isinstance(fused["fused"], Volume) and fused["fused"].shape == volume1.shape
    assert fused["fused"].spacing == pytest.approx(volume1.spacing) and fused["latent"].shape[0] == 2
    assert 0.0 <= float(fused["fused"].array.min()) and float(fused["fused"].array.max()) <= 1.0
    back = client.run("job", {"kind": "decompose", "fused": fused["fused"], "record": fused["record"],
                              "latent": fused["latent"], "device": "cpu"}, timeout=300)
    for source, estimate in ((volume1, back["source1"]), (volume2, back["source2"])):
        error = np.abs(estimate.array.astype(np.float64) - source.array).max()
        assert error < 1e-3 * np.ptp(source.array), "exact decomposition in source units"


def test_job_folders_hold_the_voxels_and_are_removed(client):
    volume1, volume2 = _case()
    job = client.submit("job", _fuse_request(volume1, volume2))
    inputs = sorted(job.folder.glob("*.npy"))
    assert len(inputs) == 2, "both inputs travel as .npy files, not inside the JSON"
    assert job.wait(300)
    status = job.poll()
    assert status.error is None and status.done and status.fraction == pytest.approx(1.0)
    assert len(list(job.folder.glob("*.npy"))) > 2  # the worker's outputs
    job.cleanup()
    assert not job.folder.exists()


def test_progress_is_live_and_cancel_is_cooperative(client):
    client.run("ping", timeout=300)
    job = client.submit("sleep", {"seconds": 30})
    fractions = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(set(fractions)) < 3:
        fractions.append(job.poll().fraction)
        time.sleep(0.05)
    assert len(set(fractions)) >= 3 and fractions == sorted(fractions), "progress arrives while the job runs"
    pid = client.pid
    job.cancel()
    start = time.monotonic()
    assert job.wait(5)
    assert time.monotonic() - start < 1.0
    status = job.poll()
    assert status.cancelled and status.error is None and status.result is None
    assert client.pid == pid, "a job that checks its cancel flag is stopped without killing the worker"
    assert not job.folder.exists()


def test_cancel_of_a_job_that_does_not_check_kills_the_worker_within_a_second(client, tmp_path):
    client.run("ping", timeout=300)
    watched = tmp_path / "out"
    watched.mkdir()
    kept = watched / "case1_fused.nii.gz"
    kept.write_text("a complete earlier output")
    job = client.submit("hang", {"seconds": 30}, watch_folders=[str(watched)])
    partial = watched / ".case2_fused.nii.gz.abc123.tmp.nii.gz"  # what an atomic write leaves when killed
    partial.write_text("half")
    old_pid = client.pid
    job.cancel()
    start = time.monotonic()
    assert job.wait(5)
    assert time.monotonic() - start < 1.0
    assert job.poll().cancelled
    assert not client.running
    assert not partial.exists(), "the half-written temporary file is removed"
    assert kept.exists(), "complete outputs stay"
    assert not job.folder.exists() and not (job.folder / "late.txt").exists()
    assert client.run("ping", timeout=300)["pid"] != old_pid, "the next job restarts the worker"


def test_an_error_is_one_clear_message_with_the_traceback_in_the_details(client):
    volume1, _ = _case()
    other = Volume(np.ones((4, 4, 4), np.float32), origin=(1e4, 1e4, 1e4))
    with pytest.raises(WorkerError) as raised:
        client.run("job", _fuse_request(volume1, other), timeout=300)
    message = str(raised.value)
    assert "\n" not in message and "overlap" in message
    assert "Traceback" in raised.value.details
    assert client.run("ping", timeout=30)["pid"] == client.pid, "the worker survives a failed job"


def test_stray_stdout_output_never_corrupts_the_replies(client):
    result = client.run("print", {"text": "not a reply"}, timeout=300)
    assert result == {"printed": "not a reply"}
    assert client.run("ping", {"echo": "after"}, timeout=30)["echo"] == "after"
    assert "not a reply" in client.log_tail(), "stdout output goes to the worker log"


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_a_worker_that_dies_is_reported_with_its_exit_code(client):
    client.run("ping", timeout=300)
    job = client.submit("sleep", {"seconds": 30})
    os.kill(client.pid, signal.SIGKILL)
    assert job.wait(5)
    status = job.poll()
    assert isinstance(status.error, WorkerError)
    assert "stopped unexpectedly" in str(status.error) and "exit code" in str(status.error)


def test_live_jacobian_session_sends_the_inputs_once(client):
    volume1, volume2 = _case()
    params = {"session": "s1", "index": [10, 20, 3], "model": None,
              "options": {"axis": 0, "normalization": "volume", "device": "cpu"}}
    first = client.run("jacobian", dict(params, volume1=volume1, volume2=volume2), timeout=300)
    assert first["jacobian1"].shape[0] == 1 and first["index"] == [10, 20, 3]
    again = client.run("jacobian", dict(params, index=[30, 11, 5]), timeout=60)  # no volumes sent
    assert again["index"] == [30, 11, 5]
    assert not np.array_equal(first["jacobian1"].array, again["jacobian1"].array)
    with pytest.raises(WorkerError, match="session expired"):
        client.run("jacobian", dict(params, session="other"), timeout=60)


def test_worker_module_changes_process_state_only_in_its_own_process():
    """The client (what runs in Slicer's process) imports no torch and no compute module."""
    code = ("import sys; import FusionINNLib.worker_client, FusionINNLib.slicer_support, FusionINNLib.jobs.codec; "
            "print(sorted(m for m in ('torch', 'FusionINNLib.core.engine', 'FusionINNLib.jobs.pipeline') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "FusionINN")))
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_record_helpers_agree_with_the_pipeline():
    from FusionINNLib.jobs import batch, pipeline

    assert support.RECORD_FORMAT == pipeline.RECORD_FORMAT
    assert support.RECORD_FILE_KEY == pipeline.RECORD_KEY
    assert support.BASELINE_METHODS == batch.BASELINE_METHODS
    for name in ("fused.nii.gz", "fused.nrrd", "a.b.mha", "x.tif"):
        assert support.record_sidecar_path(Path("/d") / name) == str(pipeline.record_sidecar(Path("/d") / name))


def test_typed_errors_are_worded_for_the_gui(client, tmp_path):
    from FusionINNLib.core.model import FusionFlow, FusionINNConfig
    from FusionINNLib.io.checkpoint import save_checkpoint

    other = tmp_path / "other.pt"
    save_checkpoint(other, FusionFlow(FusionINNConfig()))
    volume1, volume2 = _case()
    fused = client.run("job", _fuse_request(volume1, volume2, keep_latent=False), timeout=300)
    with pytest.raises(WorkerError) as raised:
        client.run("job", {"kind": "decompose", "fused": fused["fused"], "record": fused["record"],
                           "model": str(other), "device": "cpu"}, timeout=300)
    assert raised.value.error_type == "ModelMismatchError"
    assert "--model" not in str(raised.value) and "Model section" in str(raised.value)


@pytest.mark.skipif(os.name == "nt", reason="process liveness is checked on POSIX only")
def test_temporary_folders_of_dead_processes_are_removed(tmp_path):
    from FusionINNLib.worker_client import remove_stale_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"FusionINN-{dead.pid}-abc"
    (stale / "job-1").mkdir(parents=True)
    alive = tmp_path / f"FusionINN-{os.getpid()}-xyz"
    alive.mkdir()
    other = tmp_path / "unrelated-folder"
    other.mkdir()
    assert remove_stale_folders(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and alive.exists() and other.exists()
    client = WorkerClient(temp_root=str(tmp_path))
    folder = client.new_folder()
    assert folder.parent.name.startswith(f"FusionINN-{os.getpid()}-")
    client.stop()
    assert not folder.parent.exists()
