"""The ``fusioninn`` command line: argument parsing and printing only; the work is in the library.

Exit codes: 0 success, 1 error (one line on stderr, no traceback unless ``--debug``),
2 usage error (argument errors included, also one line), 130 interrupted (Ctrl-C), 143 SIGTERM,
129 SIGHUP; a stopped run leaves no temporary file. Lines starting ``warning:`` print even with
``--quiet``.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from . import __version__
from .core.choices import NORMALIZATIONS, PRIORS

DEVICE_HELP = "compute device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps (default: auto)"


class Reporter:
    """Progress bars (tqdm, on stderr) and messages, silenced by --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        # a bar is being drawn or was left without its closing newline (a signal can interrupt
        # tqdm half-way through drawing): a message printed now must start on a new line
        self.open_line = False

    def log(self, message: str) -> None:
        # --quiet silences progress and information, never a warning: a clamped or guessed result
        # must not pass without a word
        if not self.quiet or message.startswith("warning:"):
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, description: str) -> Iterator[Optional[Callable[[float], None]]]:
        """A fraction-done callback drawing a tqdm bar; the bar appears on the first update only,
        so that input errors found before any work print just their one line."""
        if self.quiet:
            yield None
            return
        from tqdm import tqdm

        bars = []

        def update(fraction: float) -> None:
            self.open_line = True
            if not bars:
                bars.append(tqdm(total=1000, desc=description, file=sys.stderr, leave=True,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"))
            bar = bars[0]
            target = int(round(min(max(fraction, 0.0), 1.0) * 1000))
            bar.update(max(0, target - bar.n))

        try:
            yield update
        finally:
            for bar in bars:
                bar.close()
            if bars:
                self.open_line = False


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages (warnings still print)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _add_model_device(parser: argparse.ArgumentParser, batch: bool = True) -> None:
    parser.add_argument("--model", metavar="M",
                        help="model checkpoint (.pt): ours, or the authors' inn.pt / state dict "
                             "(default: the bundled model)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if batch:
        parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                            help="slices per forward pass; halved automatically on GPU out-of-memory; on the CPU "
                                 "capped at 8 x 256 x 256 pixels per pass to bound memory (default: 8)")


# -- fuse ---------------------------------------------------------------------------------------
def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="fuse two co-registered images into one",
                       description="Fuse INPUT1 (e.g. T1-Gd) and INPUT2 (e.g. FLAIR). Input 2 is resampled "
                                   "onto input 1's grid when their geometry differs; the output has input 1's "
                                   "geometry and values in [0, 1]. A JSON sidecar <output>.fusioninn.json "
                                   "(and NRRD/MHA metadata) records what decomposition needs.")
    p.add_argument("input1", help="first source image (any format SimpleITK reads)")
    p.add_argument("input2", help="second source image")
    p.add_argument("--output", "-o", required=True, metavar="FUSED", help="fused image to write")
    p.add_argument("--latent", metavar="LATENT",
                   help="also keep the latent (2-component .nrrd/.mha/.nii.gz) for an exact decomposition")
    _add_model_device(p)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=0,
                   help="slice axis in numpy (k, j, i) order: 0 = axial for the usual RAS/LPS volumes (default)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="volume",
                   help="volume: robust per-volume map (0.5/99.5 percentiles of the foreground to 0/1, "
                        "no clipping; default); slice: per-slice min-max as the reference code")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on CUDA (faster, not bit-exact; ignored with --latent and on CPU)")
    _add_common(p)
    p.set_defaults(run=_run_fuse)


def _run_fuse(args, reporter: Reporter) -> int:
    from .jobs import FuseRequest, run_fuse

    request = FuseRequest(args.input1, args.input2, output=args.output, latent_output=args.latent, model=args.model,
                          device=args.device, batch_size=args.batch_size, axis=args.axis,
                          normalization=args.normalization, amp=args.amp)
    with reporter.progress("fuse") as progress:
        result = run_fuse(request, progress=progress, log=reporter.log)
    reporter.log(f"wrote {args.output}" + (f" and {args.latent}" if args.latent else "")
                 + f" (model: {result.record['model']['path']}, device: {result.record['device']})")
    return 0


# -- decompose ----------------------------------------------------------------------------------
def _add_decompose(sub) -> None:
    p = sub.add_parser("decompose", help="decompose a fused image back into both sources",
                       description="Decompose FUSED into estimates of both sources, in the sources' intensity "
                                   "units when the fusion record is found. With --latent the inverse is exact; "
                                   "otherwise --samples latents are drawn from the prior and the per-voxel mean "
                                   "(and, for N > 1, standard deviation) is written.")
    p.add_argument("fused", help="fused image written by 'fusioninn fuse'")
    p.add_argument("--output1", required=True, metavar="O1", help="decomposed source 1 to write")
    p.add_argument("--output2", required=True, metavar="O2", help="decomposed source 2 to write")
    p.add_argument("--latent", metavar="LATENT", help="kept latent from 'fuse --latent': exact decomposition")
    p.add_argument("--samples", type=_positive_int, default=1, metavar="N",
                   help="number of sampled latents to average (default: 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed for the latents (default: 0)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, metavar="T",
                   help="standard deviation of the sampled latent (scales uniform too; default: 1)")
    p.add_argument("--prior", choices=PRIORS, default="normal",
                   help="latent prior: normal N(0, T^2), zeros, ones, or uniform T*U[0,1) (default: normal)")
    p.add_argument("--std1", metavar="S1", help="per-voxel standard deviation of source 1 (needs --samples >= 2)")
    p.add_argument("--std2", metavar="S2", help="per-voxel standard deviation of source 2")
    p.add_argument("--ignore-model-mismatch", action="store_true",
                   help="decompose even if the fused image was made with another model")
    p.add_argument("--float-output", action="store_true",
                   help="write float32 volumes even where the exact decomposition returns an integer source in its "
                        "own type (default: the source's type when exact, float32 otherwise)")
    _add_model_device(p)
    _add_common(p)
    p.set_defaults(run=_run_decompose)


def _run_decompose(args, reporter: Reporter) -> int:
    from .jobs import DecomposeRequest, run_decompose

    request = DecomposeRequest(args.fused, latent=args.latent, output1=args.output1, output2=args.output2,
                               std1=args.std1, std2=args.std2, samples=args.samples, seed=args.seed,
                               temperature=args.temperature, prior=args.prior, model=args.model, device=args.device,
                               batch_size=args.batch_size, allow_model_mismatch=args.ignore_model_mismatch,
                               float_output=bool(getattr(args, "float_output", False)))
    with reporter.progress("decompose") as progress:
        run_decompose(request, progress=progress, log=reporter.log)
    reporter.log(f"wrote {args.output1} and {args.output2}" + (f", {args.std1}, {args.std2}" if args.std1 else ""))
    return 0


# -- batch --------------------------------------------------------------------------------------
def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="fuse every case of a folder (BraTS case folders or two file patterns)",
                       description="Fuse every case under DIR into OUT_DIR: one fused image per case "
                                   "(<case>_fused.nii.gz with its .fusioninn.json record, optionally the latent) "
                                   "and a summary.tsv with one row per case (status, message, outputs and, with "
                                   "--metrics, the metric suite). Cases are found by modality (BraTS namings, "
                                   "default t1ce + flair) or, with --pattern1/--pattern2, by two file-name globs "
                                   "whose wildcard parts must agree (e.g. '*_T1c.nii.gz' and '*_FLAIR.nii.gz'). "
                                   "A case that fails or lacks a modality is reported in the summary and skipped; "
                                   "the exit code is 1 only when no case succeeded.")
    p.add_argument("directory", metavar="DIR", help="folder holding the cases (searched recursively)")
    p.add_argument("--output", "-o", required=True, metavar="OUT_DIR", help="folder for the fused images and summary")
    p.add_argument("--modalities", nargs=2, default=["t1ce", "flair"], metavar=("M1", "M2"),
                   help="modalities to fuse, input 1 then input 2 (any BraTS alias; default: t1ce flair)")
    p.add_argument("--pattern1", metavar="GLOB", help="file-name glob of input 1 (instead of --modalities)")
    p.add_argument("--pattern2", metavar="GLOB", help="file-name glob of input 2 (with --pattern1)")
    p.add_argument("--latent", action="store_true", help="also keep each case's latent for an exact decomposition")
    p.add_argument("--metrics", action="store_true", help="score every fusion and add the metrics to the summary")
    p.add_argument("--paper-compatible", action="store_true",
                   help="with --metrics: the FusionINN paper's metric variants (see 'fusioninn metrics')")
    p.add_argument("--format", dest="output_format", choices=("nii.gz", "nrrd", "mha"), default="nii.gz",
                   help="image format of the outputs (default: nii.gz)")
    _add_model_device(p)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=0,
                   help="slice axis in numpy (k, j, i) order (default: 0)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="volume",
                   help="intensity normalization, as for 'fusioninn fuse' (default: volume)")
    _add_common(p)
    p.set_defaults(run=_run_batch)


def _run_batch(args, reporter: Reporter) -> int:
    from .jobs import BatchRequest, run_batch

    request = BatchRequest(args.directory, args.output, modalities=tuple(args.modalities), pattern1=args.pattern1,
                           pattern2=args.pattern2, keep_latent=args.latent, metrics=args.metrics,
                           paper_compatible=args.paper_compatible, model=args.model, device=args.device,
                           batch_size=args.batch_size, axis=args.axis, normalization=args.normalization,
                           output_format=args.output_format)
    import os

    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        reporter = Reporter(True)  # under torchrun the ranks share the cases; rank 0 reports
    with reporter.progress("batch") as progress:
        report = run_batch(request, progress=progress, log=reporter.log)
    reporter.log(report.description)
    if report.succeeded == 0:
        if rank == 0:
            print(f"fusioninn batch: error: no case was fused ({report.description})", file=sys.stderr)
        return 1
    return 0


# -- metrics ------------------------------------------------------------------------------------
def _add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="score a fusion: the paper's five metrics plus MMIF-AMIN's set",
                       description="Score FUSED against INPUT1 and INPUT2: Q_SSIM, Q_FMI, Q_NCIE, Q_XY, Q_P (the "
                                   "FusionINN paper's five) and EN, AG, SD, SF, MI, NMI, PSNR, VIFF, QABF. 3-D volumes "
                                   "are scored per slice along the fusion's slice axis (from FUSED's record; axis 0 "
                                   "without one) and averaged over slices with foreground. "
                                   "Intensity scale: 8-bit images on 0..255 (data range 255), anything else min-max "
                                   "normalised to [0, 1] (data range 1) unless --data-range is given. See "
                                   "docs/metrics.md for the definitions and the two modes.")
    p.add_argument("input1", help="source image 1")
    p.add_argument("input2", help="source image 2 (resampled onto input 1's grid if its geometry differs)")
    p.add_argument("fused", help="fused image (on input 1's grid)")
    p.add_argument("--mask", metavar="M", help="score only voxels where this image is non-zero (resampled, nearest "
                                               "neighbour, onto input 1's grid if its geometry differs)")
    p.add_argument("--paper-compatible", action="store_true",
                   help="reproduce the authors' MATLAB numbers (centre-patch Q_XY/Q_P, side-by-side RGB Q_FMI, "
                        "8-bit quantisation) instead of the intended full-image definitions")
    p.add_argument("--data-range", type=_positive_float, metavar="R",
                   help="override the intensity range (images in [0, R])")
    p.add_argument("--json", action="store_true", help="print JSON (summary, per-slice values, notes) on stdout")
    p.add_argument("--as-given", action="store_true",
                   help="score even when INPUT1 or INPUT2 is a fused image (has a fusion record) and FUSED is not; "
                        "by default that order is refused as a mix-up")
    _add_common(p)
    p.set_defaults(run=_run_metrics)


def _run_metrics(args, reporter: Reporter) -> int:
    import math

    import numpy as np

    from .jobs import ScoreRequest, run_score

    if not args.as_given:
        from .jobs.pipeline import check_metrics_order

        check_metrics_order(args.input1, args.input2, args.fused)
    from pathlib import Path

    from .jobs.pipeline import _same_file

    if _same_file(Path(args.input1), Path(args.input2)):
        reporter.log(f"warning: {args.input1} and {args.input2} are the same file: the fusion is scored against one "
                     "source twice; give the second source as INPUT2 (scored anyway)")
    report = run_score(ScoreRequest(args.input1, args.input2, args.fused, mask=args.mask,
                                    paper_compatible=args.paper_compatible, data_range=args.data_range))
    result = report.fusion
    if args.json:
        def clean(value):  # JSON has no NaN/Infinity: write null
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple, np.ndarray)):
                return [clean(v) for v in value]
            value = float(value)
            return value if math.isfinite(value) else None

        print_json({"summary": clean(result["summary"]), "per_slice": clean(result.get("per_slice", {})),
                    "notes": result["notes"]})
    else:
        for name, value in result["summary"].items():
            print(f"{name}\t{value:.6g}")
        for note in result["notes"]:
            reporter.log(f"note: {note}")
    return 0


# -- phantom ------------------------------------------------------------------------------------
def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write synthetic BraTS-style cases (T1-Gd, FLAIR, segmentation)",
                       description="Write N synthetic skull-stripped brain cases with a tumour (necrotic core, "
                                   "enhancing rim, oedema) in BraTS 2021 naming: "
                                   "OUT_DIR/BraTS2021_Phantom_00000/BraTS2021_Phantom_00000_{t1ce,flair,seg}.nii.gz.")
    p.add_argument("output_dir", metavar="OUT_DIR", help="folder to write the case folders into")
    p.add_argument("--cases", type=_positive_int, default=2, metavar="N", help="number of cases (default: 2)")
    p.add_argument("--shape", type=_positive_int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"),
                   help="volume size in voxels, slices first (default: 64 128 128)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; same seed, same cases (default: 0)")
    _add_common(p)
    p.set_defaults(run=_run_phantom)


def _run_phantom(args, reporter: Reporter) -> int:
    from .io.phantom import write_phantom_cases

    with reporter.progress("phantom") as progress:
        folders = write_phantom_cases(args.output_dir, cases=args.cases, shape=tuple(args.shape), seed=args.seed,
                                      progress=None if progress is None else (lambda d, t: progress(d / t)))
    reporter.log(f"wrote {len(folders)} case(s) under {args.output_dir}")
    return 0


# -- demo ---------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job end to end on a generated phantom case",
                       description="Generate a phantom case, fuse it with the bundled model, decompose it exactly "
                                   "(kept latent) and with 8 sampled latents, and write the volumes, montage.png "
                                   "and metrics.json into --output.")
    p.add_argument("--output", "-o", default="demo_output", metavar="DIR", help="output folder (default: demo_output)")
    p.add_argument("--model", metavar="M", help="model checkpoint (default: the bundled model)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="phantom and sampling seed (default: 0)")
    _add_common(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args, reporter: Reporter) -> int:
    from .jobs.demo import run_demo

    with reporter.progress("demo") as progress:
        result = run_demo(args.output, model=args.model, device=args.device, seed=args.seed, log=reporter.log,
                          progress=progress)
    for group, values in result.metrics.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(values.items())[:6])
        reporter.log(f"{group}: {shown}")
    reporter.log(f"montage: {result.montage}")
    return 0


# -- explain ------------------------------------------------------------------------------------
def _ijk_point(text: str):
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"must be three non-negative integers i,j,k (e.g. 120,96,77), got {text}")
    return values


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="FuseVis-style guidance maps and Jacobian images of a fusion",
                       description="Explain how the fused image depends on INPUT1 and INPUT2 (FuseVis): guidance "
                                   "maps G_k(p) = dy(p)/dx_k(p) of the fused image y = sigmoid(u) w.r.t. each "
                                   "normalized input, computed exactly by lattice probing of the network's bounded "
                                   "receptive field (about 7 s per 240x240 slice on 2 CPU cores), a guidance RGB "
                                   "(R = |G1|, G = |G2| min-max normalised with gamma, B = fused), the Jacobian images "
                                   "dy(p)/dx_k of one voxel and a scatter table of G1 vs G2. Outputs are on input 1's "
                                   "grid; voxels outside --slices are 0. See docs/explain.md.")
    p.add_argument("input1", help="first source image (any format SimpleITK reads)")
    p.add_argument("input2", help="second source image (resampled onto input 1's grid if needed)")
    p.add_argument("--guidance1", required=True, metavar="G1", help="guidance map of input 1 to write (float format)")
    p.add_argument("--guidance2", required=True, metavar="G2", help="guidance map of input 2 to write (float format)")
    p.add_argument("--rgb", metavar="RGB", help="guidance RGB image to write (.nrrd, .nii.gz; .png for 2-D inputs)")
    p.add_argument("--point", type=_ijk_point, metavar="i,j,k",
                   help="a voxel of input 1 as its IJK index (Slicer/ITK order: i = column, j = row, k = slice)")
    p.add_argument("--jacobian1", metavar="J1", help="Jacobian image dy(point)/dx1 to write (needs --point)")
    p.add_argument("--jacobian2", metavar="J2", help="Jacobian image dy(point)/dx2 to write (needs --point)")
    p.add_argument("--scatter", metavar="TSV",
                   help="table of guidance 1 vs 2 per voxel of the explained slices (columns k j i guidance1 "
                        "guidance2 neighbourhood; neighbourhood = 1 near --point)")
    p.add_argument("--scatter-radius", type=int, default=5, metavar="N",
                   help="in-plane half-width of the --point neighbourhood flagged in --scatter (default: 5)")
    p.add_argument("--slices", metavar="a:b",
                   help="slices to explain along --axis, half-open like Python (e.g. 70:80) or one index "
                        "(default: all slices, about 7 s each on a 2-core CPU)")
    spacing = p.add_mutually_exclusive_group()
    spacing.add_argument("--spacing", type=_positive_int, metavar="S",
                         help="lattice spacing: >= receptive radius + 1 (16 for the reference network, the default) "
                              "is exact, smaller is faster and approximate")
    spacing.add_argument("--approximate", action="store_true",
                         help="faster, approximate guidance (spacing 12: 1.8x faster; error in docs/explain.md)")
    p.add_argument("--gamma", type=_positive_float, default=1.0, metavar="G",
                   help="gamma correction of the RGB guidance channels, v^G (FuseVis offers 0.1-2; default: 1)")
    _add_model_device(p, batch=False)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=0,
                   help="slice axis in numpy (k, j, i) order, as for 'fusioninn fuse' (default: 0)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="volume",
                   help="intensity normalization, as for 'fusioninn fuse' (default: volume)")
    _add_common(p)
    p.set_defaults(run=_run_explain)


def _run_explain(args, reporter: Reporter) -> int:
    from .jobs import ExplainRequest, run_explain

    request = ExplainRequest(args.input1, args.input2, guidance1=args.guidance1, guidance2=args.guidance2, rgb=args.rgb,
                             point_ijk=args.point, jacobian1=args.jacobian1, jacobian2=args.jacobian2,
                             scatter=args.scatter, scatter_radius=args.scatter_radius, slices=args.slices,
                             model=args.model, axis=args.axis, normalization=args.normalization, spacing=args.spacing,
                             approximate=args.approximate, gamma=args.gamma, device=args.device)
    with reporter.progress("explain") as progress:
        result = run_explain(request, progress=progress, log=reporter.log)
    described = result.description
    kind = "exact" if described["exact"] else "approximate"
    reporter.log(f"{kind} guidance (lattice spacing {described['spacing']}, receptive radius "
                 f"{described['receptive_radius']}) of slices {described['slices'][0]}:{described['slices'][1]}; "
                 f"wrote {', '.join(result.written)}")
    return 0


# -- train --------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on BraTS-style cases",
        description="Train FusionINN on every case under DATA_DIR (BraTS 2013-2023 namings; one folder per "
                    "case). Defaults are the paper's: L = a(L_fusion + L_latent) + (1-a)L_dec with a = 0.5, "
                    "L_fusion/L_dec = l*SSIM + (1-l)*L2 with l = 0.8, k = 3 blocks, N(0, I) prior, Adam 3e-4, "
                    "ReduceLROnPlateau x0.95 after 8 epochs, batch 64, 400 epochs. The split is by subject and "
                    "written to the run directory with last.pt (every epoch, for --resume), best.pt, the "
                    "history and metrics tables (TSV + Slicer .schema.tsv) and loss_curves.png. OUTPUT is the "
                    "epoch with the lowest validation loss. Multi-GPU / multi-node: run under torchrun, e.g. "
                    "'torchrun --nproc_per_node=2 -m FusionINNLib.cli train DATA --output M.pt'.")
    from .train.options import add_train_arguments

    add_train_arguments(p)
    _add_common(p)
    p.set_defaults(run=_run_train)


def _run_train(args, reporter: Reporter) -> int:
    import os

    from .train.training import TrainingConfig, train

    if int(os.environ.get("RANK", "0") or 0) > 0:
        reporter = Reporter(True)  # under torchrun only rank 0 reports
    from .train.options import config_from_cli

    config = TrainingConfig(**config_from_cli(args))
    with reporter.progress("train") as update:
        def log(message: str) -> None:
            if reporter.quiet:
                return
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

        result = train(config, progress=(lambda fraction, message: update(fraction)) if update else None, log=log)
    reporter.log(f"wrote {result.model_path} (best epoch {result.best_epoch}, loss {result.best_val_loss:.5f}, "
                 f"mean sampled-z decomposition SSIM {result.mean_decomposition_ssim:.4f}); "
                 f"history {result.history_path}, metrics {result.metrics_path}, run folder {result.run_dir}")
    return 0


# -- main ---------------------------------------------------------------------------------------
COMMANDS = [_add_demo, _add_fuse, _add_decompose, _add_metrics, _add_phantom]
COMMANDS.append(_add_batch)
COMMANDS.append(_add_explain)
COMMANDS.append(_add_train)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other error (argparse prints the whole
    usage block first): ``fusioninn fuse: error: PROBLEM (see 'fusioninn fuse --help')``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fusioninn",
        description="Decomposable MRI fusion with an invertible flow (FusionINN): fuse two co-registered "
                    "images, decompose a fused image back into its sources, score and explain fusions.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM (``timeout``, a cluster scheduler) or SIGHUP (the terminal closed) as an exception:
    like Ctrl-C it unwinds through the all-or-nothing writers, which remove their temporary files,
    instead of killing the process with the files in place."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    import signal

    # once is enough: a second signal must not interrupt the clean-up of the temporary files
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


STOP_SIGNALS = tuple(name for name in ("SIGTERM", "SIGHUP") if hasattr(__import__("signal"), name))


# What is left on disk when a command is stopped half-way.
STOPPED = {
    "batch": "the cases finished before are kept and listed in the summary",
    "train": "the last complete epoch is kept in the run folder's last.pt (continue with --resume)",
    "demo": "the files finished before are kept, none is half-written",
    "phantom": "the cases finished before are kept, none is half-written",
}


def _one_line(error: BaseException) -> str:
    """The error as one line. An OSError from the system says "[Errno 30] Read-only file system:
    'x'"; it reads "x: read-only file system" like every other message."""
    if isinstance(error, OSError) and error.strerror and error.errno is not None:
        reason = error.strerror[:1].lower() + error.strerror[1:]
        message = f"{error.filename}: {reason}" if error.filename is not None else reason
    else:
        message = str(error)
    return " ".join(message.split()) or type(error).__name__


def _is_usage_error(error: BaseException) -> bool:
    from .io.volume import UsageError

    return isinstance(error, UsageError) or getattr(error, "KIND", None) == "option"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> str:
    # warnings that reach the user: one line, no Python source file and line
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reporter = Reporter(getattr(args, "quiet", False))
    # The command line owns its process: it may tune it (the allocator; never done inside Slicer).
    from .core.process import allow_process_tuning

    allow_process_tuning()
    import signal
    import warnings

    previous = {}
    try:
        for name in STOP_SIGNALS:
            previous[name] = signal.signal(getattr(signal, name), _terminate)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous = {}
    format_warning, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return int(args.run(args, reporter) or 0)
    except (KeyboardInterrupt, Terminated) as stop:
        terminated = isinstance(stop, Terminated)
        what = f"terminated ({signal.Signals(stop.signum).name})" if terminated else "interrupted"
        try:
            print(("\n" if reporter.open_line else "")
                  + f"fusioninn {args.command}: {what}; {STOPPED.get(args.command, 'no output written')}",
                  file=sys.stderr)
        except OSError:
            pass  # the terminal is gone (SIGHUP): the exit code still says it
        return 128 + stop.signum if terminated else 130
    except Exception as error:  # noqa: BLE001 - the CLI's one place that turns errors into a line
        if getattr(args, "debug", False):
            raise
        print(("\n" if reporter.open_line else "") + f"fusioninn {args.command}: error: {_one_line(error)}",
              file=sys.stderr)
        return 2 if _is_usage_error(error) else 1
    finally:
        warnings.formatwarning = format_warning
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
