"""``fusioninn demo``: the main job end to end on data the project makes itself.

Generates one phantom BraTS-style case, fuses T1-Gd and FLAIR with the bundled model (keeping the
latent), decomposes the fused volume exactly (kept latent) and by sampling (8 latents: mean and
per-voxel standard deviation), scores fusion and decomposition, and writes the volumes, a PNG
montage of the slice through the tumour and ``metrics.json``. Every step goes through the same
library functions as the command line and the Slicer module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ..io.volume import OutputSet, read_volume

DEMO_SHAPE = (64, 128, 128)
DEMO_SAMPLES = 8


@dataclass
class DemoResult:
    output_dir: Path
    montage: Path
    metrics: Dict[str, Dict[str, float]]
    model: str


def _tumour_slice(seg: np.ndarray) -> int:
    counts = (seg > 0).sum(axis=(1, 2))
    return int(np.argmax(counts)) if counts.any() else seg.shape[0] // 2


def _montage(path: Path, rows: Dict[str, Dict[str, np.ndarray]], fused: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source", "fused", "decomposed (exact)", "decomposed (mean of 8)", "|error| (mean of 8)",
               "uncertainty (std)"]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.6 * len(rows) + 0.4))
    for r, (name, images) in enumerate(rows.items()):
        low, high = np.percentile(images["source"], [0.5, 99.5])
        panels = [images["source"], fused, images["exact"], images["mean"], np.abs(images["mean"] - images["source"]),
                  images["std"]]
        for c, (label, image) in enumerate(zip(columns, panels)):
            axis = axes[r, c]
            if label == "fused":
                shown = axis.imshow(image, cmap="gray", vmin=0, vmax=1)
            elif label.startswith(("|error|", "uncertainty")):
                shown = axis.imshow(image, cmap="inferno", vmin=0, vmax=max(float(np.percentile(image, 99.5)), 1e-6))
                figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
            else:
                axis.imshow(image, cmap="gray", vmin=low, vmax=high)
            axis.set_title(f"{name}: {label}" if c == 0 else label, fontsize=8)
            axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with OutputSet() as outputs:
        outputs.add_file(lambda temp: figure.savefig(temp, format="png", dpi=110), path)
    plt.close(figure)


def run_demo(output_dir: str = "demo_output", model: Optional[str] = None, device: str = "auto",
             seed: int = 0, log: Callable[[str], None] = print,
             progress: Optional[Callable[[float], None]] = None) -> DemoResult:
    from .. import jobs
    from ..io.phantom import write_phantom_cases

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = jobs.ModelCache()
    loaded = models.get(model)
    if loaded.origin == "random":
        log("WARNING: no bundled model found; the demo uses an UNTRAINED random model")
    log(f"model: {loaded.source} ({loaded.origin})")

    case_dir = write_phantom_cases(out / "phantom", cases=1, shape=DEMO_SHAPE, seed=seed)[0]
    t1_path = next(case_dir.glob("*_t1ce.nii.gz"))
    flair_path = next(case_dir.glob("*_flair.nii.gz"))
    seg = read_volume(next(case_dir.glob("*_seg.nii.gz"))).array
    log(f"phantom case: {case_dir}")

    def stage(start: float, width: float) -> Optional[Callable[[float], None]]:
        return None if progress is None else (lambda f: progress(start + width * f))

    model_arg = loaded.source if loaded.origin != "random" else None
    def quiet(message: str) -> None:
        pass  # the demo prints its own summary

    jobs.run_fuse(jobs.FuseRequest(str(t1_path), str(flair_path), output=str(out / "fused.nrrd"),
                                   latent_output=str(out / "latent.nrrd"), model=model_arg, device=device),
                  progress=stage(0.0, 0.3), log=quiet, models=models)
    exact = jobs.run_decompose(jobs.DecomposeRequest(str(out / "fused.nrrd"), latent=str(out / "latent.nrrd"),
                                                     output1=str(out / "decomposed_exact_t1ce.nrrd"),
                                                     output2=str(out / "decomposed_exact_flair.nrrd"),
                                                     model=model_arg, device=device),
                               progress=stage(0.3, 0.2), log=quiet, models=models)
    sampled = jobs.run_decompose(jobs.DecomposeRequest(str(out / "fused.nrrd"),
                                                       output1=str(out / "decomposed_t1ce.nrrd"),
                                                       output2=str(out / "decomposed_flair.nrrd"),
                                                       std1=str(out / "uncertainty_t1ce.nrrd"),
                                                       std2=str(out / "uncertainty_flair.nrrd"), samples=DEMO_SAMPLES,
                                                       seed=seed, model=model_arg, device=device),
                                 progress=stage(0.5, 0.45), log=quiet, models=models)
    t1, flair = read_volume(t1_path).array, read_volume(flair_path).array
    fused = read_volume(out / "fused.nrrd").array
    # The one scorer (FusionINNLib.metrics.scoring): decompositions on their source's scale, so gain and
    # offset errors are not normalised away.
    report = jobs.run_score(jobs.ScoreRequest(str(t1_path), str(flair_path), str(out / "fused.nrrd"),
                                              decomposed1=exact.source1, decomposed2=exact.source2))
    sampled_report = jobs.run_score(jobs.ScoreRequest(str(t1_path), str(flair_path), str(out / "fused.nrrd"),
                                                      decomposed1=sampled.source1, decomposed2=sampled.source2))
    metrics = {
        "fusion": report.summary,
        "decomposition_exact_t1ce": report.decomposition["1"],
        "decomposition_exact_flair": report.decomposition["2"],
        f"decomposition_sampled{DEMO_SAMPLES}_t1ce": sampled_report.decomposition["1"],
        f"decomposition_sampled{DEMO_SAMPLES}_flair": sampled_report.decomposition["2"],
    }
    metrics_path = out / "metrics.json"
    with OutputSet() as outputs:
        outputs.add_text(json.dumps({"model": loaded.describe(), "metrics": metrics}, indent=1, default=float),
                         metrics_path)

    k = _tumour_slice(seg)
    rows = {
        "T1-Gd": {"source": t1[k], "exact": exact.source1.array[k], "mean": sampled.source1.array[k],
                  "std": sampled.std1.array[k]},
        "FLAIR": {"source": flair[k], "exact": exact.source2.array[k], "mean": sampled.source2.array[k],
                  "std": sampled.std2.array[k]},
    }
    montage = out / "montage.png"
    ssim = metrics[f"decomposition_sampled{DEMO_SAMPLES}_t1ce"].get("SSIM", float("nan"))
    _montage(montage, rows, fused[k],
             f"FusionINN demo - phantom slice {k} - model {Path(loaded.source).name} - "
             f"sampled decomposition SSIM (T1-Gd) {ssim:.3f}")
    if progress is not None:
        progress(1.0)
    log(f"wrote {out}/: fused.nrrd, latent.nrrd, decomposed_*.nrrd, uncertainty_*.nrrd, metrics.json, montage.png")
    return DemoResult(out, montage, metrics, loaded.source)
