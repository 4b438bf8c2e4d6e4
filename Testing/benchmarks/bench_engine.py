"""Benchmark: fusing a 240x240x155 volume on the CPU, our engine vs a plain batch-1 slice loop.

    python Testing/benchmarks/bench_engine.py [--slices 155] [--repeats 2] [--batch-sizes 1 4 8 16]

Both run the same FrEIA graph (the reference architecture) in the same process. The baseline is
what the reference test script does: one slice per forward, default memory format, default glibc
allocator. It runs first because the engine's allocator tuning is process-wide and one-way. The
table reports slices/s and the ratio to the baseline measured in this run (absolute seconds on a
shared machine are noisy; ratios are what to compare). Also reports exact-decomposition speed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "FusionINN"))

from FusionINNLib.core.engine import SliceEngine  # noqa: E402
from FusionINNLib.core.model import FusionFlow  # noqa: E402
from FusionINNLib.core.process import allow_process_tuning  # noqa: E402

allow_process_tuning()  # as the command line does (the library tunes no process by itself)


def plain_loop(model: FusionFlow, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    out = np.empty_like(x1)
    with torch.no_grad():
        for index in range(x1.shape[0]):
            pair = torch.from_numpy(np.stack([x1[index], x2[index]])[None])
            u, _ = model(pair)
            out[index] = torch.sigmoid(u)[0, 0].numpy()
    return out


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.slices, 240, 240)
    x1 = rng.random(shape, dtype=np.float32)
    x2 = rng.random(shape, dtype=np.float32)
    model = FusionFlow(seed=0).eval()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, volume {shape}")

    baseline_out = plain_loop(model, x1[:2], x2[:2])  # warm-up
    baseline = best_time(lambda: plain_loop(model, x1, x2), args.repeats)
    rows = [("plain loop, batch 1 (baseline)", baseline, 1.0)]
    baseline_out = plain_loop(model, x1, x2)

    for batch in args.batch_sizes:
        engine = SliceEngine(FusionFlow(seed=0), "cpu", batch_size=batch)
        engine.fuse(x1[:batch], x2[:batch])  # warm-up
        seconds = best_time(lambda e=engine: e.fuse(x1, x2), args.repeats)
        rows.append((f"engine fuse, batch {batch}", seconds, baseline / seconds))
    agreement = np.abs(engine.fuse(x1, x2).fused - baseline_out).max()

    engine = SliceEngine(FusionFlow(seed=0), "cpu", batch_size=8)
    kept = engine.fuse(x1, x2, keep_latent=True)
    seconds = best_time(lambda: engine.fuse(x1, x2, keep_latent=True), args.repeats)
    rows.append(("engine fuse + kept latent, batch 8", seconds, baseline / seconds))
    seconds = best_time(lambda: engine.decompose_exact(kept.fused, kept.latent), args.repeats)
    rows.append(("engine exact decomposition, batch 8", seconds, baseline / seconds))

    print(f"\n| {'configuration':<38} | {'seconds':>8} | {'slices/s':>8} | {'vs baseline':>11} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, seconds, ratio in rows:
        print(f"| {name:<38} | {seconds:8.2f} | {args.slices / seconds:8.1f} | {ratio:10.2f}x |")
    print(f"\nmax |engine - baseline| on the fused volume: {agreement:.2e}")


if __name__ == "__main__":
    main()
