"""Benchmark: peak memory (RSS) of fusing a 512x512x400 volume on the CPU, stage by stage.

    python Testing/benchmarks/bench_memory.py [--shape 400 512 512] [--dtype float32] [--batch-size 8]
                                              [--limit-gb 4] [--latent] [--decompose]

Every stage runs in a fresh child process and its peak resident set size is read from the kernel
when the child is reaped (``os.wait4`` -> ``ru_maxrss``), so the numbers are the whole process's
high-water mark (interpreter, torch, buffers), not an estimate. The inputs are written first by
another child, as uncompressed NIfTI (``.nii``) so that reading them is not dominated by gzip.

Stages:
    import            python + torch + FusionINNLib imported (the floor every stage pays)
    read              both inputs read into :class:`Volume` objects
    normalize         read + both inputs normalized (the float32 arrays the network sees)
    fuse              ``fusioninn fuse IN1 IN2 -o FUSED.nrrd`` (the command line, end to end)
    fuse --latent     the same, also keeping the latent (2 float32 channels on the padded grid)
    decompose         ``fusioninn decompose`` exact, with the kept latent (with --decompose)

The table shows each stage's peak and what it adds over ``import``; the run fails (exit 1) when
``fuse`` exceeds ``--limit-gb`` (default 4 GB, the budget of issue 8). The content is a smooth
phantom-like ellipsoid with noise, so the compressed output size is realistic.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "FusionINN"
GB = 1e9


def _peak_bytes(usage) -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    return int(usage.ru_maxrss) * (1 if platform.system() == "Darwin" else 1024)


def run_measured(command: List[str]) -> Tuple[int, float, str]:
    """Run ``command``; (peak RSS of that child in bytes, seconds, stderr tail)."""
    env = dict(os.environ, PYTHONPATH=str(LIBRARY))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    if child.returncode != 0:
        raise SystemExit(f"stage failed ({' '.join(command[:6])} ...): exit {child.returncode}\n" + "\n".join(tail))
    return _peak_bytes(usage), seconds, "\n".join(tail)


# -- child stages (run as ``bench_memory.py --child STAGE ...``) ----------------------------------
def _child(stage: str, folder: Path, shape: Tuple[int, int, int], dtype: str) -> None:
    sys.path.insert(0, str(LIBRARY))
    import numpy as np

    if stage == "make":
        import SimpleITK as sitk

        from FusionINNLib.core.model import FusionFlow
        from FusionINNLib.io.checkpoint import save_checkpoint

        save_checkpoint(folder / "model.pt", FusionFlow(seed=0))
        rng = np.random.default_rng(0)
        k = np.linspace(-1, 1, shape[0])
        j = np.linspace(-1, 1, shape[1])[:, None]
        i = np.linspace(-1, 1, shape[2])[None, :]
        for index, name in enumerate(("input1.nii", "input2.nii")):
            image_array = np.empty(shape, dtype=np.dtype(dtype))
            for s in range(shape[0]):  # slice by slice: the generator itself stays small
                r = k[s] ** 2 + j ** 2 + i ** 2
                inside = r < 0.8
                values = np.where(inside, 400.0 + 300.0 * (1.0 - r) * (index + 1), 0.0)
                values += inside * rng.normal(0, 20, r.shape)
                image_array[s] = values.astype(image_array.dtype)
            image = sitk.GetImageFromArray(image_array)
            image.SetSpacing((0.5, 0.5, 0.8))
            sitk.WriteImage(image, str(folder / name))
        return

    # Every measured stage pays the same floor as the command line: torch and the pipeline loaded.
    import torch  # noqa: F401

    from FusionINNLib.core.normalization import normalize_volume
    from FusionINNLib.io.volume import read_volume
    from FusionINNLib.jobs import pipeline  # noqa: F401

    if stage == "import":
        return
    volume1, volume2 = read_volume(folder / "input1.nii"), read_volume(folder / "input2.nii")
    if stage == "normalize":
        x1, _ = normalize_volume(volume1.array)
        x2, _ = normalize_volume(volume2.array)
        assert x1.dtype == x2.dtype == np.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--dtype", default="float32", help="input voxel type (default: float32, the largest usual)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit-gb", type=float, default=4.0)
    parser.add_argument("--latent", action="store_true", help="also measure fuse --latent")
    parser.add_argument("--decompose", action="store_true", help="also measure the exact decomposition")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.child:
        _child(args.child, Path(args.folder), shape, args.dtype)
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--shape", *map(str, shape), "--dtype", args.dtype]
    cli = [sys.executable, "-m", "FusionINNLib.cli"]
    voxels = shape[0] * shape[1] * shape[2]
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as name:
        folder = Path(name)
        print(f"volume {shape[0]}x{shape[1]}x{shape[2]} ({voxels / 1e6:.0f} M voxels, {args.dtype}), "
              f"batch size {args.batch_size}, python {platform.python_version()}, {os.cpu_count()} cores")
        run_measured(me + common + ["--child", "make", "--folder", name])
        one_volume = voxels * 4
        model = ["--model", str(folder / "model.pt"), "--device", "cpu", "--batch-size", str(args.batch_size),
                 "--quiet"]
        stages = [
            ("import", me + common + ["--child", "import", "--folder", name]),
            ("read", me + common + ["--child", "read", "--folder", name]),
            ("normalize", me + common + ["--child", "normalize", "--folder", name]),
            ("fuse", cli + ["fuse", str(folder / "input1.nii"), str(folder / "input2.nii"), "-o",
                            str(folder / "fused.nrrd")] + model),
        ]
        if args.latent or args.decompose:
            stages.append(("fuse --latent", cli + ["fuse", str(folder / "input1.nii"), str(folder / "input2.nii"),
                                                   "-o", str(folder / "fused.nrrd"), "--latent",
                                                   str(folder / "latent.nrrd")] + model))
        if args.decompose:
            stages.append(("decompose (exact)", cli + ["decompose", str(folder / "fused.nrrd"), "--latent",
                                                       str(folder / "latent.nrrd"), "--output1",
                                                       str(folder / "d1.nrrd"), "--output2",
                                                       str(folder / "d2.nrrd")] + model))
        rows = []
        for stage, command in stages:
            peak, seconds, _ = run_measured(command)
            rows.append((stage, peak, seconds))
            print(f"  {stage:<18} peak {peak / GB:6.2f} GB  ({seconds:6.1f} s)", flush=True)

    floor = rows[0][1]
    print(f"\none float32 volume = {one_volume / GB:.2f} GB; limit for 'fuse' = {args.limit_gb:.1f} GB\n")
    print(f"| {'stage':<18} | {'peak RSS (GB)':>13} | {'over import (GB)':>16} | {'in volumes':>10} | {'seconds':>7} |")
    print(f"|{'-' * 20}|{'-' * 15}|{'-' * 18}|{'-' * 12}|{'-' * 9}|")
    for stage, peak, seconds in rows:
        print(f"| {stage:<18} | {peak / GB:13.2f} | {(peak - floor) / GB:16.2f} | "
              f"{(peak - floor) / one_volume:10.2f} | {seconds:7.1f} |")
    fuse_peak = dict((stage, peak) for stage, peak, _ in rows)["fuse"]
    verdict = "within" if fuse_peak <= args.limit_gb * GB else "OVER"
    print(f"\nfuse peak {fuse_peak / GB:.2f} GB: {verdict} the {args.limit_gb:.1f} GB budget")
    if fuse_peak > args.limit_gb * GB:
        sys.exit(1)


if __name__ == "__main__":
    main()
