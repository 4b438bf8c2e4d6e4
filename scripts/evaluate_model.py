#!/usr/bin/env python
"""Validate a FusionINN model on real subjects it never trained on, as a user runs it.

    python scripts/evaluate_model.py DATA_DIR [--model M.pt] [--subjects S ...] [--json OUT.json]

For each case (default: the model's own validation subjects, from its metadata), the two volumes
are fused with the default options of ``fusioninn fuse`` (``pipeline.fuse_volumes``: volume
normalization, slices along axis 0) and decomposed with the defaults of ``fusioninn decompose``
(``pipeline.decompose_volume``): exactly with the kept latent, with one sampled z′ and with the
mean of 8. Everything is compared in the model's units: the sources normalized as the pipeline does
(clipped to [0, 1] for fusion, where y = σ(u) lives), on whole 240×240 slices.

Slice sets: ``brain`` = every slice with brain in both modalities (``brats.select_slices`` without
labels); ``tumour`` = the slices with at least 20 tumour voxels in the segmentation (labels 1|2|4,
cases with a segmentation only).

Measures (each the mean over the slices of the set):
* fusion Q_SSIM, Q_XY, Q_P (``metrics``; full-image definitions, data range 1) of the model and of
  the mean, max and FuseVis weighted-average baselines (``baselines.classical_fusion``), and Q_XY over
  the pixels where a source has signal (``Q_XY_tissue``);
* checkerboard ratio (``artefacts.checkerboard_ratio``) over the whole brain (blocks inside both
  sources' foreground), fused image vs the pooled sources; acceptance ≤ 1.1;
* hot background (``artefacts.hot_background_fraction``): share of the voxels where both sources
  are background at which the fused image exceeds 0.3, over the whole volume; acceptance ≤ 1e-4;
* decomposition SSIM per source (pytorch-msssim per slice): exact, one sampled z′, mean of 8.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FusionINN"))

from FusionINNLib import metrics  # noqa: E402
from FusionINNLib.core.normalization import normalize_volume  # noqa: E402
from FusionINNLib.io.brats import discover_cases, select_slices  # noqa: E402
from FusionINNLib.io.checkpoint import resolve_model  # noqa: E402
from FusionINNLib.io.volume import read_volume  # noqa: E402
from FusionINNLib.jobs.pipeline import decompose_volume, fuse_volumes  # noqa: E402
from FusionINNLib.metrics.artefacts import background_mask, checkerboard_ratio, hot_background_fraction  # noqa: E402
from FusionINNLib.metrics.baselines import classical_fusion  # noqa: E402
from FusionINNLib.train.training import mean_slice_ssim  # noqa: E402

FUSION_METRICS = {"Q_SSIM": metrics.q_ssim, "Q_XY": metrics.q_xy, "Q_P": metrics.q_p}
BASELINES = ("mean", "max", "weighted")
TUMOUR_RULE = "1|2|4"


def normalize_with(estimate: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``estimate`` (source units) mapped with the volume normalization computed from ``source``."""
    _, params = normalize_volume(source, "volume")
    offset = float(np.asarray(params.offset, dtype=np.float64).reshape(-1)[0])
    scale = float(np.asarray(params.scale, dtype=np.float64).reshape(-1)[0])
    return ((estimate - offset) / scale).astype(np.float32)


def slice_scores(s1: np.ndarray, s2: np.ndarray, fused: np.ndarray, keep: np.ndarray) -> dict:
    """Mean over ``keep`` of each fusion metric on 2-D slices in [0, 1], and Q_XY over the pixels
    where a source has signal (``Q_XY_tissue``): the full-image Q_XY is mostly background, which
    scores ~0.99 where the fused image is exactly flat and ~0 where it is not."""
    out = {}
    for name, function in FUSION_METRICS.items():
        values = [function(s1[k], s2[k], fused[k], data_range=1.0) for k in keep]
        out[name] = float(np.nanmean(values))
    tissue = (s1 > 0) | (s2 > 0)
    out["Q_XY_tissue"] = float(np.nanmean([metrics.q_xy(s1[k], s2[k], fused[k], data_range=1.0, mask=tissue[k])
                                           for k in keep]))
    return out


def evaluate_case(case, model, samples: int, seed: int, slice_step: int) -> dict:
    v1, v2 = read_volume(case.path("t1ce")), read_volume(case.path("flair"))
    quiet = (lambda message: None)  # noqa: E731
    started = time.perf_counter()
    fused = fuse_volumes(v1, v2, model, keep_latent=True, log=quiet)
    fuse_seconds = time.perf_counter() - started
    n1, _ = normalize_volume(v1.array, "volume")
    n2, _ = normalize_volume(v2.array, "volume")
    c1, c2 = np.clip(n1, 0, 1), np.clip(n2, 0, 1)
    y = fused.fused.array.astype(np.float32)
    brain = select_slices(None, v1.array, v2.array, labels=None)
    sets = {"brain": brain[::slice_step]}
    if case.seg is not None:
        seg = read_volume(case.seg).array
        sets["tumour"] = select_slices(seg, v1.array, v2.array, labels=TUMOUR_RULE, min_label_voxels=20)
    result = {"case": case.case_id, "slices": {k: int(len(v)) for k, v in sets.items()},
              "fuse_seconds": round(fuse_seconds, 2)}
    images = {"model": y}
    images.update({name: classical_fusion(c1, c2, name).astype(np.float32) for name in BASELINES})
    for set_name, keep in sets.items():
        result[set_name] = {name: slice_scores(c1, c2, image, keep) for name, image in images.items()}
    background = background_mask(v1.array, v2.array)
    foreground = ~background_mask(v1.array, v1.array) & ~background_mask(v2.array, v2.array)
    result["checkerboard_ratio"] = checkerboard_ratio(c1[brain], c2[brain], y[brain], mask=foreground[brain])
    result["hot_background"] = hot_background_fraction(y, background)
    decompositions = {"exact": decompose_volume(fused.fused, fused.record, model, latent=fused.latent, log=quiet),
                      "one_sample": decompose_volume(fused.fused, fused.record, model, samples=1, seed=seed,
                                                     log=quiet),
                      f"mean_of_{samples}": decompose_volume(fused.fused, fused.record, model, samples=samples,
                                                             seed=seed, log=quiet)}
    result["uncertainty"] = uncertainty_stats(decompositions[f"mean_of_{samples}"], (v1.array, v2.array),
                                              foreground, background)
    result["decomposition_ssim"] = {}
    for name, output in decompositions.items():
        e1 = normalize_with(output.source1.array, v1.array)[brain]
        e2 = normalize_with(output.source2.array, v2.array)[brain]
        result["decomposition_ssim"][name] = [mean_slice_ssim(e1, n1[brain]), mean_slice_ssim(e2, n2[brain])]
    return result


def uncertainty_stats(output, raws, foreground: np.ndarray, background: np.ndarray) -> dict:
    """Per source, the sampled decomposition's per-voxel std (normalized units) in the brain
    (median), over the background (mean, 99th percentile) and on the image border ring (the
    outermost 2 pixels of every slice, mean) — where a padding artefact would show."""
    ring = np.zeros(foreground.shape, bool)
    ring[:, :2, :] = ring[:, -2:, :] = ring[:, :, :2] = ring[:, :, -2:] = True
    stats = {}
    for key, std, raw in (("t1ce", output.std1, raws[0]), ("flair", output.std2, raws[1])):
        _, params = normalize_volume(raw, "volume")
        s = std.array / float(np.asarray(params.scale, dtype=np.float64).reshape(-1)[0])
        inner_background = background & ~ring
        stats[key] = {"brain_median": float(np.median(s[foreground])),
                      "background_mean": float(s[inner_background].mean()),
                      "background_p99": float(np.percentile(s[inner_background], 99)),
                      "border_ring_mean": float(s[ring].mean())}
    return stats


def print_tables(results: list) -> None:
    for set_name in ("brain", "tumour"):
        rows = [r for r in results if set_name in r]
        if not rows:
            continue
        print(f"\n### {set_name} slices: model (mean / max / weighted)\n")
        names = [*FUSION_METRICS, "Q_XY_tissue"]
        print("| case | slices | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for r in rows:
            cells = []
            for metric in names:
                base = " / ".join(f"{r[set_name][b][metric]:.3f}" for b in BASELINES)
                cells.append(f"**{r[set_name]['model'][metric]:.3f}** ({base})")
            print(f"| {r['case']} | {r['slices'][set_name]} | " + " | ".join(cells) + " |")
        means = {m: np.mean([r[set_name]["model"][m] for r in rows]) for m in names}
        base_means = {m: [np.mean([r[set_name][b][m] for r in rows]) for b in BASELINES] for m in names}
        cells = [f"**{means[m]:.3f}** (" + " / ".join(f"{v:.3f}" for v in base_means[m]) + ")" for m in names]
        print("| **mean** | | " + " | ".join(cells) + " |")
    print("\n### artefacts and decomposition (T1-Gd / FLAIR)\n")
    keys = list(results[0]["decomposition_ssim"])
    print("| case | checkerboard ratio | hot background | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in results:
        dec = " | ".join("/".join(f"{v:.4f}" if k == "exact" else f"{v:.3f}" for v in r["decomposition_ssim"][k])
                         for k in keys)
        print(f"| {r['case']} | {r['checkerboard_ratio']:.3f} | {100 * r['hot_background']:.4f} % | {dec} |")
    dec_means = " | ".join("/".join(f"{np.mean([r['decomposition_ssim'][k][i] for r in results]):.3f}"
                                    for i in range(2)) for k in keys)
    print(f"| **mean** | {np.mean([r['checkerboard_ratio'] for r in results]):.3f} | "
          f"{100 * np.mean([r['hot_background'] for r in results]):.4f} % | {dec_means} |")
    print("\n### uncertainty (std of the sampled decomposition, normalized units, T1-Gd / FLAIR)\n")
    names = ("brain_median", "background_mean", "background_p99", "border_ring_mean")
    print("| case | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for r in results:
        u = r["uncertainty"]
        print(f"| {r['case']} | " + " | ".join(f"{u['t1ce'][n]:.4f}/{u['flair'][n]:.4f}" for n in names) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder with the case folders")
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--subjects", nargs="+", help="subject ids to evaluate (default: the model's validation "
                                                      "subjects, from its metadata)")
    parser.add_argument("--samples", type=int, default=8, help="sampled latents of the averaged decomposition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice-step", type=int, default=1, help="score every N-th brain slice (default: all)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = resolve_model(args.model)
    subjects = args.subjects or model.metadata.get("split", {}).get("val_subjects")
    if not subjects:
        parser.error("the model records no validation subjects: pass --subjects")
    cases = [c for c in discover_cases(args.data).cases if c.subject_id in set(subjects)]
    print(f"model: {model.source}; {len(cases)} case(s): {', '.join(c.case_id for c in cases)}", flush=True)
    results = []
    for case in cases:
        results.append(evaluate_case(case, model, args.samples, args.seed, args.slice_step))
        print(json.dumps(results[-1]), flush=True)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
