"""Benchmark of the Slicer module's worker process (issue 11); every number comes from the same run.

    nice -n 19 python Testing/benchmarks/bench_worker.py [--updates 60] [--gil]

Rows:
- worker start-up: a fresh ``python -m FusionINNLib.worker`` until it answers (process, torch and
  FusionINNLib imports), median of 3; then the first job's model load;
- live Jacobian at the crosshair on a 240 x 240 slice, as the module runs it: crosshair RAS ->
  request (the inputs were sent once) -> worker -> .npy reply -> the two Jacobian nodes refilled
  (real MRML from slicer-core), polling every 15 ms like the module's live QTimer; updates per second
  over ``--updates`` points spread over the brain, next to the bare in-process compute of one
  Jacobian (``VolumeExplainer.jacobian``) as the baseline;
- with ``--gil``: a fusion job under a main thread that holds the GIL between 100 ms polls (what
  PythonQt's event loop does), in the worker vs on a thread of the same process (the old design),
  both against the same job with a free main thread.

The volume is the real BraTS-GLI-00001-000 case (T1-Gd, FLAIR, 240 x 240 x 155) when
../shared/data is present, else a phantom of that size.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "FusionINN"))

from FusionINNLib import slicer_support as support  # noqa: E402
from FusionINNLib.io.volume import Volume, read_volume  # noqa: E402
from FusionINNLib.worker_client import WorkerClient  # noqa: E402

CASE = REPO.parent / "shared" / "data" / "brats" / "BraTS-GLI-00001-000"
LIB = str(REPO / "FusionINN")


def load_inputs():
    if CASE.is_dir():
        return (read_volume(CASE / "BraTS-GLI-00001-000-t1c.nii.gz"),
                read_volume(CASE / "BraTS-GLI-00001-000-t2f.nii.gz"), "BraTS-GLI-00001-000")
    from FusionINNLib.io.phantom import make_phantom_case

    case = make_phantom_case((155, 240, 240), seed=0)
    return Volume(case["t1ce"]), Volume(case["flair"]), "phantom 155x240x240"


def startup_seconds(runs=3):
    times = []
    for _ in range(runs):
        client = WorkerClient(library_path=LIB)
        start = time.monotonic()
        client.run("ping", timeout=300)
        times.append(time.monotonic() - start)
        client.stop()
    return statistics.median(times)


def live_jacobian(volume1, volume2, updates):
    import slicer

    from FusionINNSlicerLib.logic import FusionINNCoreLogic

    class Params:
        modelSource, modelPath, device, axis, normalization = "bundled", Path(), "cpu", 0, "volume"

    scene = slicer.vtkMRMLScene()
    logic = FusionINNCoreLogic(scene, worker=WorkerClient(library_path=LIB))
    nodes = []
    with logic.allOrNothing() as created:
        for volume, name in ((volume1, "t1c"), (volume2, "flair")):
            nodes.append(logic.addVolumeNode(volume, name, created))
    p = Params()
    p.inputVolume1, p.inputVolume2 = nodes
    ijk_to_ras = logic.worldIJKToRAS(nodes[0])
    k = volume1.shape[0] // 2
    rng = np.random.default_rng(0)
    foreground = np.argwhere(volume1.array[k] > np.percentile(volume1.array[k], 60))
    points = foreground[rng.choice(len(foreground), updates + 1, replace=False)]

    def update(j, i):
        request = logic.prepareJacobian(p, (ijk_to_ras @ [i, j, k, 1])[:3])
        job = logic.submit("jacobian", request["params"])
        while not job.finished:
            time.sleep(0.015)  # the module's live poll interval
            job.poll()
        status = job.poll()
        assert status.error is None, status.error
        logic.finishJacobian(request, status.result)
        job.cleanup()
        return request

    start = time.monotonic()
    first = update(*points[0])
    first_seconds = time.monotonic() - start
    assert "volume1" in first["params"]
    start = time.monotonic()
    for j, i in points[1:]:
        request = update(j, i)
        assert "volume1" not in request["params"]
    rate = updates / (time.monotonic() - start)
    logic.shutdownWorker()
    return first_seconds, rate


def bare_jacobian(volume1, volume2, updates):
    from FusionINNLib.io.checkpoint import resolve_model
    from FusionINNLib.jobs.explain import VolumeExplainer

    explainer = VolumeExplainer(volume1, volume2, resolve_model(), device="cpu")
    k = volume1.shape[0] // 2
    rng = np.random.default_rng(1)
    times = []
    for _ in range(updates):
        j, i = rng.integers(40, 200, size=2)
        start = time.monotonic()
        explainer.jacobian((int(i), int(j), k))
        times.append(time.monotonic() - start)
    return statistics.median(times)


def hold_gil(job_finished, poll, interval=0.1):
    libc = ctypes.PyDLL(ctypes.util.find_library("c"))
    start = time.monotonic()
    while not job_finished():
        libc.usleep(int(interval * 1e6))
        poll()
    return time.monotonic() - start


def gil_comparison(volume1, volume2):
    from FusionINNLib.io.checkpoint import resolve_model
    from FusionINNLib.jobs.pipeline import fuse_volumes

    sub1 = volume1.with_array(np.ascontiguousarray(volume1.array[60:92]))
    sub2 = volume2.with_array(np.ascontiguousarray(volume2.array[60:92]))
    params = {"kind": "fuse", "input1": sub1, "input2": sub2, "device": "cpu", "batch_size": 8}
    client = WorkerClient(library_path=LIB)
    client.run("job", params, timeout=600)  # start-up and model load
    job = client.submit("job", params)
    job.wait(600)
    worker_free = job.poll().elapsed
    job.cleanup()
    job = client.submit("job", params)
    worker_held = hold_gil(lambda: job.finished, job.poll)
    job.cleanup()
    client.stop()

    model = resolve_model()
    fuse_volumes(sub1, sub2, model, device="cpu", log=lambda m: None)  # warm
    start = time.monotonic()
    fuse_volumes(sub1, sub2, model, device="cpu", log=lambda m: None)
    thread_free = time.monotonic() - start
    thread_job = support.BackgroundJob(lambda progress, cancel, log: fuse_volumes(
        sub1, sub2, model, device="cpu", progress=progress, cancel=cancel, log=log)).start()
    thread_held = hold_gil(lambda: thread_job.poll().done, lambda: None)
    return worker_free, worker_held, thread_free, thread_held


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--gil", action="store_true", help="also the GIL-holding main thread comparison")
    args = parser.parse_args()
    volume1, volume2, name = load_inputs()
    print(f"inputs: {name}, shape {volume1.shape}; load average {os.getloadavg()[0]:.1f}")
    print(f"worker start-up (process + imports): {startup_seconds():.2f} s (median of 3)")
    bare = bare_jacobian(volume1, volume2, 30)
    first, rate = live_jacobian(volume1, volume2, args.updates)
    print(f"live Jacobian, 240x240 slice: first update {first:.2f} s (start-up, model, inputs sent once); "
          f"then {rate:.1f} updates/s end to end ({1000 / rate:.0f} ms each); "
          f"bare compute {1000 * bare:.1f} ms (in-process baseline, {1 / bare:.0f}/s)")
    if args.gil:
        worker_free, worker_held, thread_free, thread_held = gil_comparison(volume1, volume2)
        print("fusion of 32 slices 240x240 under a GIL-holding main thread (100 ms polls):")
        print(f"  worker process: {worker_free:.2f} s free -> {worker_held:.2f} s held "
              f"({worker_held / worker_free:.2f}x)")
        print(f"  thread in Slicer's process (old design): {thread_free:.2f} s free -> {thread_held:.2f} s held "
              f"({thread_held / thread_free:.1f}x)")


if __name__ == "__main__":
    main()
