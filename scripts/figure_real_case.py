#!/usr/bin/env python
"""Figure of one real case: T1-Gd, FLAIR, their mean and the model's fused image on the slice with the
most enhancing tumour, so that the enhancing rim (T1-Gd) and the oedema (FLAIR) can be checked in
the fusion. The figure shows real patient data: write it outside the repository (it is never
committed, see ../shared/data/PROVENANCE.md).

    python scripts/figure_real_case.py CASE_DIR OUT.png [--model M.pt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FusionINN"))

from FusionINNLib.core.normalization import normalize_volume  # noqa: E402
from FusionINNLib.io.brats import discover_cases  # noqa: E402
from FusionINNLib.io.checkpoint import resolve_model  # noqa: E402
from FusionINNLib.io.volume import read_volume  # noqa: E402
from FusionINNLib.jobs.pipeline import fuse_volumes  # noqa: E402

ENHANCING = 4  # BraTS 2018 label of the enhancing tumour


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir")
    parser.add_argument("output")
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_dir = Path(args.case_dir)
    case = discover_cases(case_dir.parent).cases
    case = next(c for c in case if c.case_id == case_dir.name)
    v1, v2 = read_volume(case.path("t1ce")), read_volume(case.path("flair"))
    if case.seg is not None:
        seg = read_volume(case.seg).array
        k = int(np.argmax((seg == ENHANCING).sum(axis=(1, 2))))
    else:
        k = v1.array.shape[0] // 2
    fused = fuse_volumes(v1, v2, resolve_model(args.model), log=lambda message: None)
    n1 = np.clip(normalize_volume(v1.array)[0][k], 0, 1)
    n2 = np.clip(normalize_volume(v2.array)[0][k], 0, 1)
    panels = (("T1-Gd", n1), ("FLAIR", n2), ("mean", (n1 + n2) / 2), ("FusionINN fused", fused.fused.array[k]))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{case.case_id}, slice {k}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=80)
    print(f"wrote {args.output} (slice {k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
