"""The loss-curve plot of a training run (``run_dir/loss_curves.png`` unless ``plot`` says otherwise).

matplotlib is imported only when a plot is drawn, with the Agg backend, so training needs no display;
without matplotlib the run goes on and says that the plot was skipped (:func:`write_plot`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from ..io.atomic import atomic_file


def plot_history(history: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Loss curves (total, fusion, decomposition, latent; train solid, validation dashed) and the
    learning rate, as a PNG written atomically (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 3.4), dpi=100)
    axes = figure.subplots(1, 4)
    panels = (("loss", "total loss"), ("fusion", "fusion loss"), ("dec", "decomposition loss"),
              ("latent", "latent loss"))
    for axis, (key, title) in zip(axes, panels):
        for prefix, style in (("train", "-"), ("val", "--")):
            values = [row.get(f"{prefix}_{key}") for row in history]
            if values and all(v is not None for v in values):
                axis.plot(epochs, values, style, marker="." if len(epochs) < 30 else None, label=prefix)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    lr_axis = axes[0].twinx()
    lr_axis.plot(epochs, [row["lr"] for row in history], ":", color="grey", linewidth=1)
    lr_axis.set_ylabel("lr (dotted)", fontsize=7)
    lr_axis.tick_params(labelsize=6)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temp:
        figure.savefig(temp, format="png")
    return path


def write_plot(history: Sequence[Dict[str, Any]], path: Path, log: Callable[[str], None]) -> Optional[Path]:
    """:func:`plot_history`, or None (with a log line) when matplotlib is missing."""
    try:
        plot_history(history, path)
        return path
    except ImportError as error:
        log(f"loss-curve plot skipped: {error}")
        return None
