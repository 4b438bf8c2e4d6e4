#!/usr/bin/env python
"""Score a model on held-out cases the way a user runs it: fuse the two source volumes, then
decompose the fused volume without its latent (sampled z′) and with it (exact), and compare every
result with the normalized sources on the brain slices.

    python scripts/heldout_decomposition.py --model M.pt DATA_DIR [--normalization slice] [--samples 1 8]

Every case under DATA_DIR (any BraTS naming, T1-Gd + FLAIR) is fused with
``pipeline.fuse_volumes`` and decomposed with ``pipeline.decompose_volume`` (the functions behind
``fusioninn fuse`` / ``fusioninn decompose``). Estimates come back in source units and are mapped
with each source's own normalization, so SSIM (pytorch-msssim, 2-D per slice, data range 1) is
computed in the units the model works in. Slices: those with brain in both modalities
(``brats.select_slices`` without labels). Fusion SSIM is against the source clipped to [0, 1].
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FusionINN"))

from FusionINNLib.core.normalization import normalize_volume  # noqa: E402
from FusionINNLib.io.brats import discover_cases, select_slices  # noqa: E402
from FusionINNLib.io.checkpoint import resolve_model  # noqa: E402
from FusionINNLib.io.volume import read_volume  # noqa: E402
from FusionINNLib.jobs.pipeline import decompose_volume, fuse_volumes  # noqa: E402
from FusionINNLib.train.training import mean_slice_ssim  # noqa: E402


def normalize_with(estimate: np.ndarray, source: np.ndarray, mode: str) -> np.ndarray:
    """``estimate`` (source units) mapped with the normalization computed from ``source``."""
    _, params = normalize_volume(source, mode)
    offset = np.asarray(params.offset, dtype=np.float64)
    scale = np.asarray(params.scale, dtype=np.float64)
    if mode == "slice":
        offset, scale = offset[:, None, None], scale[:, None, None]
    return ((estimate - offset) / scale).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder with the held-out case folders")
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--normalization", choices=("volume", "slice"), default="volume")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = resolve_model(args.model)
    quiet = (lambda message: None)  # noqa: E731
    print(f"model: {model.source} ({model.metadata.get('normalization', '?')} normalization in training); "
          f"evaluated with {args.normalization} normalization")
    header = "| case | slices | fusion SSIM | exact dec. SSIM | " + " | ".join(
        "one sampled z" if n == 1 else f"mean of {n} sampled z" for n in args.samples) + " |"
    print(header)
    print("|---" * (4 + len(args.samples)) + "|")
    for case in discover_cases(args.data).cases:
        v1 = read_volume(case.path("t1ce"))
        v2 = read_volume(case.path("flair"))
        keep = select_slices(None, v1.array, v2.array, labels=None)
        n1, _ = normalize_volume(v1.array, args.normalization)
        n2, _ = normalize_volume(v2.array, args.normalization)
        sources = (n1[keep], n2[keep])
        fused = fuse_volumes(v1, v2, model, normalization=args.normalization, keep_latent=True, log=quiet)

        y = fused.fused.array[keep]
        fusion = "/".join(f"{mean_slice_ssim(y, np.clip(s, 0, 1)):.3f}" for s in sources)
        decompositions = [decompose_volume(fused.fused, fused.record, model, latent=fused.latent, log=quiet)]
        decompositions += [decompose_volume(fused.fused, fused.record, model, samples=n, seed=args.seed, log=quiet)
                           for n in args.samples]
        columns = []
        for output in decompositions:
            estimates = (normalize_with(output.source1.array, v1.array, args.normalization)[keep],
                         normalize_with(output.source2.array, v2.array, args.normalization)[keep])
            columns.append("/".join(f"{mean_slice_ssim(e, s):.3f}" for e, s in zip(estimates, sources)))
        exact, sampled = columns[0], columns[1:]
        print(f"| {case.case_id} | {len(keep)} | {fusion} | {exact} | " + " | ".join(sampled) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
