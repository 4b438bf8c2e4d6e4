"""The ``fusioninn`` command line: argument parsing and printing only; the work is in the library.

Exit codes: 0 success, 1 error (one line on stderr, no traceback unless ``--debug``),
2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from . import __version__

DEVICE_HELP = "compute device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps (default: auto)"


class Reporter:
    """Progress bars (tqdm, on stderr) and messages, silenced by --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
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
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _add_model_device(parser: argparse.ArgumentParser, batch: bool = True) -> None:
    parser.add_argument("--model", metavar="M",
                        help="model checkpoint (.pt): ours, or the authors' inn.pt / state dict "
                             "(default: the bundled model)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if batch:
        parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                            help="slices per forward pass; halved automatically on GPU out-of-memory (default: 8)")


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
    p.add_argument("--normalization", choices=("volume", "slice"), default="volume",
                   help="volume: robust per-volume map (0.5/99.5 percentiles of the foreground to 0/1, "
                        "no clipping; default); slice: per-slice min-max as the reference code")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on CUDA (faster, not bit-exact; ignored with --latent and on CPU)")
    _add_common(p)
    p.set_defaults(run=_run_fuse)


def _run_fuse(args, reporter: Reporter) -> int:
    from .pipeline import fuse_files

    with reporter.progress("fuse") as progress:
        result = fuse_files(args.input1, args.input2, args.output, latent=args.latent, model=args.model,
                            device=args.device, batch_size=args.batch_size, axis=args.axis,
                            normalization=args.normalization, amp=args.amp, progress=progress,
                            log=reporter.log)
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
    p.add_argument("--prior", choices=("normal", "zeros", "ones", "uniform"), default="normal",
                   help="latent prior: normal N(0, T^2), zeros, ones, or uniform T*U[0,1) (default: normal)")
    p.add_argument("--std1", metavar="S1", help="per-voxel standard deviation of source 1 (needs --samples >= 2)")
    p.add_argument("--std2", metavar="S2", help="per-voxel standard deviation of source 2")
    p.add_argument("--ignore-model-mismatch", action="store_true",
                   help="decompose even if the fused image was made with another model")
    _add_model_device(p)
    _add_common(p)
    p.set_defaults(run=_run_decompose)


def _run_decompose(args, reporter: Reporter) -> int:
    from .pipeline import decompose_files

    with reporter.progress("decompose") as progress:
        decompose_files(args.fused, args.output1, args.output2, latent=args.latent, std1=args.std1,
                        std2=args.std2, model=args.model, samples=args.samples, seed=args.seed,
                        temperature=args.temperature, prior=args.prior, device=args.device,
                        batch_size=args.batch_size, progress=progress, log=reporter.log,
                        allow_model_mismatch=args.ignore_model_mismatch)
    reporter.log(f"wrote {args.output1} and {args.output2}" + (f", {args.std1}, {args.std2}" if args.std1 else ""))
    return 0


# -- main ---------------------------------------------------------------------------------------
COMMANDS = [_add_fuse, _add_decompose]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusioninn",
        description="Decomposable MRI fusion with an invertible flow (FusionINN): fuse two co-registered "
                    "images, decompose a fused image back into its sources, score and explain fusions.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reporter = Reporter(getattr(args, "quiet", False))
    try:
        return int(args.run(args, reporter) or 0)
    except KeyboardInterrupt:
        print("fusioninn: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's one place that turns errors into a line
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fusioninn {args.command}: error: {message}", file=sys.stderr)
        return 1


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
