#!/usr/bin/env python
"""Latent-loss experiment for docs/training.md: same data, seed and schedule, one run per latent
loss; then, on the validation slices (and optionally on real cases), fusion SSIM, decomposition
SSIM with the exact latent, with 1 sampled latent and with the mean of 8, and statistics of the
forward latent z (mean, std, lag-1 autocorrelation: N(0, I) has 0, 1, 0).

Usage (phantoms only, the numbers in docs/training.md):
    python scripts/latent_loss_experiment.py --phantoms 10 --epochs 25 --out /tmp/latent_exp
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FusionINN"))

from FusionINNLib.core.engine import SliceEngine  # noqa: E402
from FusionINNLib.io.brats import discover_cases, load_case_slices  # noqa: E402
from FusionINNLib.io.checkpoint import load_checkpoint  # noqa: E402
from FusionINNLib.io.phantom import write_phantom_cases  # noqa: E402
from FusionINNLib.train.training import TrainingConfig, mean_slice_ssim, train  # noqa: E402


def latent_stats(model, s1, s2):
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([s1, s2], axis=1).astype(np.float32))
        _, z = model(x)
    z = z.double()
    centred = z - z.mean(dim=(2, 3), keepdim=True)
    lag1 = (centred[..., 1:] * centred[..., :-1]).mean() / centred.pow(2).mean()
    return float(z.mean()), float(z.std()), float(lag1)


def evaluate(model_path, cases_slices):
    loaded = load_checkpoint(model_path)
    engine = SliceEngine(loaded.model, "cpu", batch_size=8)
    rows = []
    for name, (s1, s2) in cases_slices.items():
        fused = engine.fuse(s1, s2, keep_latent=True)
        e1, e2 = engine.decompose_exact(fused.fused, fused.latent)
        a1, a2, _, _ = engine.decompose_sampled(fused.fused, samples=1, seed=1)
        b1, b2, _, _ = engine.decompose_sampled(fused.fused, samples=8, seed=1)
        mean, std, lag1 = latent_stats(loaded.model, s1, s2)
        rows.append({
            "case": name,
            "fusion": [mean_slice_ssim(fused.fused, np.clip(s1, 0, 1)),
                       mean_slice_ssim(fused.fused, np.clip(s2, 0, 1))],
            "exact": [mean_slice_ssim(e1, s1), mean_slice_ssim(e2, s2)],
            "sampled1": [mean_slice_ssim(a1, s1), mean_slice_ssim(a2, s2)],
            "sampled8": [mean_slice_ssim(b1, s1), mean_slice_ssim(b2, s2)],
            "z_mean": mean, "z_std": std, "z_lag1": lag1,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--phantoms", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
    parser.add_argument("--losses", nargs="+", default=["pixel_mmd", "moments", "reference_mmd", "none"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--latent-weights", type=float, nargs="+", default=[1.0],
                        help="one weight per latent loss, or one for all")
    parser.add_argument("--labels", default="brain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subnet-final-relu", action="store_true")
    parser.add_argument("--real", help="also evaluate on every case under this folder (brain slices)")
    args = parser.parse_args()

    out = Path(args.out)
    data = out / "phantoms"
    if not data.is_dir():
        write_phantom_cases(data, cases=args.phantoms, shape=args.shape, seed=2024)
    results = {}
    weights = args.latent_weights * len(args.losses) if len(args.latent_weights) == 1 else args.latent_weights
    for loss_name, weight in zip(args.losses, weights):
        loss = loss_name if weight == 1.0 else f"{loss_name}@{weight:g}"
        start = time.perf_counter()
        config = TrainingConfig(data_dir=str(data), output=str(out / f"{loss}.pt"), cache_dir=str(out / "cache"),
                                labels=args.labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                crop_size=args.crop_size, latent_loss=loss_name, latent_weight=weight,
                                val_fraction=0.2, seed=args.seed, max_val_slices=48, device="cpu",
                                subnet_final_relu=args.subnet_final_relu)
        result = train(config, log=lambda m, tag=loss: print(f"[{tag}] {m}", flush=True))
        seconds = time.perf_counter() - start
        val_ids = json.loads((result.run_dir / "split.json").read_text())["val_subjects"]
        cases = {}
        for case in discover_cases(data).cases:
            if case.subject_id in val_ids:
                s1, s2, _ = load_case_slices(case, labels=None, cache_dir=out / "cache")
                cases[case.case_id] = (np.asarray(s1), np.asarray(s2))
        if args.real:
            for case in discover_cases(args.real).cases:
                s1, s2, _ = load_case_slices(case, labels=None, cache_dir=out / "cache")
                cases["real:" + case.case_id] = (np.asarray(s1), np.asarray(s2))
        rows = evaluate(result.model_path, cases)
        results[loss] = {"seconds": seconds, "best_epoch": result.best_epoch, "rows": rows}
        (out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| latent loss | set | fusion SSIM | exact dec. SSIM | sampled z, 1 | mean of 8 "
          "| z mean | z std | z lag-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loss, record in results.items():
        groups = {"phantom val": [r for r in record["rows"] if not r["case"].startswith("real:")]}
        for r in record["rows"]:
            if r["case"].startswith("real:"):
                groups[r["case"][5:]] = [r]
        for label, rows in groups.items():
            if not rows:
                continue
            def avg(key, group=rows):
                return np.array([r[key] for r in group], dtype=float).mean(axis=0)
            f, e, s1, s8 = avg("fusion"), avg("exact"), avg("sampled1"), avg("sampled8")
            print(f"| {loss} | {label} | {f[0]:.3f}/{f[1]:.3f} | {e[0]:.4f}/{e[1]:.4f} | {s1[0]:.3f}/{s1[1]:.3f} | "
                  f"{s8[0]:.3f}/{s8[1]:.3f} | {avg('z_mean'):.2f} | {avg('z_std'):.2f} | {avg('z_lag1'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
