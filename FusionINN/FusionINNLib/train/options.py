"""The one table of training options: ``fusioninn train``, the FusionINNTraining Slicer CLI and
:class:`FusionINNLib.train.training.TrainingConfig` are all derived from :data:`OPTIONS`.

Each :class:`TrainOption` is one setting with one name:

* the ``TrainingConfig`` field (``field``, e.g. ``lr``);
* the canonical long option of ``fusioninn train`` (``flag``, e.g. ``--learning-rate``) plus the
  spellings earlier versions accepted (``aliases``, e.g. ``--lr``), which keep working;
* the Slicer parameter name, which is always the camelCase of ``flag`` (``--learning-rate`` ↔
  ``learningRate``, :func:`slicer_name`); the Slicer CLI's ``<longflag>`` is the same name;
* type, default, bounds, choices, help text and the Slicer label, group and widget hints.

From the table: :func:`add_train_arguments` builds the ``fusioninn train`` parser,
:func:`slicer_xml` writes ``FusionINNTraining/FusionINNTraining.xml`` (``python -m
FusionINNLib.train.options --write-xml PATH``; ``Testing/test_train_options.py`` checks the file
byte for byte and the defaults against ``TrainingConfig``), :func:`config_from_cli` and
:func:`config_from_slicer` turn parsed values into ``TrainingConfig`` keyword arguments, and
:func:`bounds` gives the limits both parsers enforce.

Settled where the hand-written copies disagreed: the bounds are the stricter of the two (blocks
1–6, validation fraction [0, 0.9], intensity jitter [0, 0.5], seed [0, 2³²−1], learning rate > 0,
gradient clip > 0) and apply to both command lines; in Slicer, where a number cannot be left
empty, 0 means "not set" for the optional counts and the gradient clip (``zero_unset``); an empty
label rule means the default rule. The Slicer index-0/1 parameters are named after the command
line's ``DATA_DIR`` and ``--output``: ``dataDir`` and ``output``.

This module imports neither torch nor SimpleITK (the Slicer CLI builds its parser before PyTorch
is loaded).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

from ..core.choices import DEVICES, LATENT_LOSSES, NORMALIZATIONS, PRIORS
from ..core.choices import TRAINING_MODALITIES as MODALITIES

DEFAULT_LABELS = "2,1|3"
DEVICE_HELP = "compute device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda or mps (default: auto)"

# Kinds: int, float, bool, choice, text, path (input file), dir, out_file, out_dir, table, image, pair_float,
# pair_choice (two values on the command line).
GROUPS = (
    ("input", "Input data", "The BraTS-style cases to train on and how they are selected and split.", False),
    ("model", "Model and training",
     "Architecture and optimization. The defaults are the paper's: k = 3 blocks, alpha = 0.5, lambda = 0.8, Adam "
     "with learning rate 3e-4, batch 64, 400 epochs.", False),
    ("outputs", "Outputs", "The trained model and the reports, loaded into the scene as tables and a volume.", False),
    ("advanced", "Advanced", "Loss terms, schedule, resumption, speed and memory settings, and where intermediate "
                             "files go.", True),
)


@dataclass(frozen=True)
class TrainOption:
    field: Optional[str]          # TrainingConfig field (None: not a setting, e.g. the preview output)
    flag: str                     # canonical long option without "--"
    kind: str
    default: Any
    help: str                     # ``fusioninn train --help`` text
    label: str                    # Slicer label
    group: str                    # key of GROUPS
    aliases: Tuple[str, ...] = ()  # older spellings fusioninn train still accepts (without "--")
    choices: Tuple[str, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False  # value > minimum (not >=)
    slider: bool = False          # write <constraints> (Slicer shows a slider): bounded fractions only
    step: Optional[float] = None
    zero_unset: bool = False      # Slicer passes 0 for "not set" (TrainingConfig: None)
    description: str = ""         # Slicer description (default: help)
    xml_default: Optional[str] = None  # the default as written in the XML (decimals = spin-box precision)
    xml_tag: Optional[str] = None  # override of the XML element (e.g. "double" for a float)
    index: Optional[int] = None   # positional (DATA_DIR, MODEL) in both front ends
    metavar: Optional[str] = None
    extensions: Tuple[str, ...] = ()
    cli: bool = True              # part of fusioninn train
    slicer: bool = True           # part of the Slicer CLI
    pair_index: Optional[int] = None  # modality1/modality2: one element of a two-value field

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def slicer_name(self) -> str:
        return slicer_name(self.flag)


def slicer_name(flag: str) -> str:
    """``learning-rate`` (or ``--learning-rate``) → ``learningRate``."""
    parts = flag.lstrip("-").split("-")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


_O = TrainOption
OPTIONS: Tuple[TrainOption, ...] = (
    # -- input data ----------------------------------------------------------------------------
    _O("data_dir", "data-dir", "dir", None, "folder holding the case folders", "BraTS data directory", "input",
      index=0, metavar="DATA_DIR",
      description="Folder holding the cases, one sub-folder per case (BraTS 2018-2021, 2023 and 2013/2015 namings are "
                  "recognized, e.g. BraTS2021_00000_t1ce.nii.gz). Case folders missing a modality are skipped and "
                  "reported."),
    _O("modalities", "modalities", "pair_choice", ("t1ce", "flair"),
      "the two modalities, any BraTS alias (default: t1ce flair)", "Modalities", "input", metavar=("M1", "M2"),
      slicer=False),
    _O("modalities", "modality1", "choice", "t1ce", "modality 1 (instead of the first of --modalities)",
      "Modality 1", "input", choices=MODALITIES, pair_index=0, metavar="M1",
      description="First source image of each case (file-name aliases such as t1c, t1gd, t2f, t1n, t2w are "
                  "recognized)."),
    _O("modalities", "modality2", "choice", "flair", "modality 2 (instead of the second of --modalities)",
      "Modality 2", "input", choices=MODALITIES, pair_index=1, metavar="M2",
      description="Second source image of each case; must differ from modality 1."),
    _O("labels", "labels", "text", DEFAULT_LABELS,
      "slice selection by segmentation labels: ',' = and, '|' = or (default '2,1|3': oedema and "
      "necrosis/non-enhancing, as the paper); 'brain' = every slice with brain in both modalities. Cases without a "
      "segmentation always use 'brain'.", "Label set", "input", metavar="RULE",
      description="Which slices to train on, as a rule on the segmentation labels: ',' means AND, '|' means OR. The "
                  "default 2,1|3 keeps slices with oedema (2) and necrosis or non-enhancing tumour (1 or 3), as in "
                  "the paper; use 2,1 for BraTS 2023. 'brain' keeps every slice with enough brain in both modalities "
                  "(no segmentation needed)."),
    _O("max_cases", "max-cases", "int", None, "use only the first N cases", "Maximum number of cases", "input",
      minimum=1, zero_unset=True, metavar="N",
      description="Use only the first N cases (sorted by folder name); 0 uses all."),
    _O("val_fraction", "validation-fraction", "float", 0.2, "fraction of subjects for validation (default: 0.2)",
      "Validation fraction", "input", aliases=("val-fraction",), minimum=0.0, maximum=0.9, slider=True, step=0.05,
      metavar="F",
      description="Fraction of the subjects held out for validation (at least one subject when there are two or "
                  "more; 0 disables validation and the best model is then chosen on the training loss)."),
    _O("seed", "seed", "int", 0, "seed of split, crops, shuffling and latents (default: 0)", "Random seed", "input",
      minimum=0, maximum=2**32 - 1, metavar="S",
      description="Seed of the split, the weight initialization, the shuffling, the crops and the latent samples: a "
                  "run is reproducible."),
    # -- model and training --------------------------------------------------------------------
    _O("blocks", "blocks", "int", 3, "coupling blocks, 1-6 (default: 3)", "Invertible blocks (k)", "model",
      minimum=1, maximum=6, metavar="K", description="Number of invertible blocks k of the flow (1-6)."),
    _O("alpha", "alpha", "float", 0.5, "weight of fusion + latent vs decomposition loss (default: 0.5)",
      "Fusion weight (&#945;)", "model", minimum=0.0, maximum=1.0, slider=True, step=0.05, metavar="A",
      description="L = alpha (L_fusion + L_latent) + (1 - alpha) L_decomposition."),
    _O("lam", "lambda-ssim", "float", 0.8, "SSIM share of the SSIM/L2 mix (default: 0.8)", "SSIM weight (&#955;)",
      "model", aliases=("lam",), minimum=0.0, maximum=1.0, slider=True, step=0.05, metavar="L",
      description="Each of the fusion and decomposition losses is lambda L_SSIM + (1 - lambda) L_l2."),
    _O("prior", "prior", "choice", "normal", "latent prior (default: normal)", "Latent prior (z)", "model",
      choices=PRIORS,
      description="Distribution of the latent z used for decomposition during training and validation."),
    _O("epochs", "epochs", "int", 400, "epochs (default: 400)", "Epochs", "model", minimum=1, metavar="N",
      description="Number of passes over the training slices (the total, also when resuming)."),
    _O("batch_size", "batch-size", "int", 64, "batch size (default: 64)", "Batch size", "model", minimum=1,
      metavar="B", description="Slices (or crops) per optimization step."),
    _O("lr", "learning-rate", "float", 3e-4, "Adam learning rate (default: 3e-4)", "Learning rate", "model",
      aliases=("lr",), minimum=0.0, exclusive_minimum=True, xml_tag="double", xml_default="0.00030", metavar="LR",
      description="Initial Adam learning rate; it is multiplied by 0.95 when the validation loss has not improved for "
                  "'patience' epochs."),
    _O("device", "device", "choice", "auto", DEVICE_HELP, "Device", "model", choices=DEVICES,
      description="auto: CUDA if available, else Apple MPS, else the CPU."),
    # -- outputs -------------------------------------------------------------------------------
    _O("output", "output", "out_file", None, "trained model to write", "Output model", "outputs", index=1,
      metavar="MODEL.pt", extensions=(".pt",),
      description="Where to write the best model (.pt); use it in the FusionINN module with Model = file."),
    _O("history_table", "history-table", "table", None, "per-epoch losses (default: RUN_DIR/history.tsv)",
      "History table", "outputs", metavar="H.tsv", extensions=(".tsv",),
      description="One row per epoch: every training and validation loss term, learning rate, duration, skipped "
                  "steps, and whether the epoch was the best so far. Default: history.tsv in the run folder."),
    _O("metrics_table", "metrics-table", "table", None, "final validation metrics (default: RUN_DIR/metrics.tsv)",
      "Metrics table", "outputs", metavar="M.tsv", extensions=(".tsv",),
      description="One row per validation case and a mean row: fusion SSIM to each source, SSIM and PSNR of the "
                  "decomposition (sampled latent) of each source, and the fusion metric suite (Q_SSIM, Q_FMI, "
                  "Q_NCIE, Q_XY, Q_P, EN, AG, SD, SF, MI, NMI, PSNR, VIFF, QABF). Default: metrics.tsv in the run "
                  "folder."),
    _O(None, "preview-volume", "image", None,
      "after training, fuse the first validation case (else the first training case) with the new model into "
      "this file (with its fusion record)", "Preview fusion", "outputs", metavar="PREVIEW", extensions=(".nrrd",),
      description="Optional: the first validation case fused with the new model (the first training case when there "
                  "is no validation split)."),
    # -- advanced ------------------------------------------------------------------------------
    _O("patience", "patience", "int", 8,
      "epochs without improvement before the learning rate is multiplied by 0.95 (default: 8)",
      "Learning-rate patience", "advanced", minimum=0, metavar="P",
      description="Epochs without improvement of the validation loss before the learning rate is reduced (x 0.95)."),
    _O("early_stopping", "early-stopping", "int", None, "stop after N epochs without validation improvement "
      "(default: off)", "Early stopping", "advanced", minimum=1, zero_unset=True, metavar="N",
      description="Stop after this many epochs without improvement; 0 trains for all epochs."),
    _O("amp", "amp", "bool", False, "mixed precision on CUDA (ignored on the CPU)", "Mixed precision (AMP)",
      "advanced", description="Use bfloat16/float16 autocast on CUDA (ignored on other devices)."),
    _O("resume", "resume", "path", None, "continue a run from its last.pt (or its run directory)",
      "Resume checkpoint", "advanced", metavar="CKPT", extensions=(".pt",),
      description="Continue an interrupted run from its last.pt (in the run folder): the settings and the split come "
                  "from the checkpoint, only Epochs, Early stopping, Device and the output locations can change."),
    _O("init_model", "init-model", "path", None,
      "start from this model's weights (fine-tuning, e.g. whole slices after crops); same architecture required "
      "(default: fresh initialisation)", "Initial model", "advanced", metavar="MODEL.pt", extensions=(".pt",),
      description="Start from this model's weights instead of a fresh initialization (fine-tuning, e.g. on whole "
                  "slices after training on crops); its architecture must match."),
    _O("crop_size", "crop-size", "int", None,
      "train on random CxC crops (multiple of 4, >= 16; much faster on a CPU; default: whole slices)", "Crop size",
      "advanced", minimum=1, zero_unset=True, metavar="C",
      description="Train on random square crops of this size (pixels; at least 16 and a multiple of the flow's "
                  "down-sampling factor, 2 for k = 3) around the brain, which is much faster on a CPU; 0 trains on "
                  "whole slices."),
    _O("intensity_jitter", "intensity-jitter", "float", 0.0,
      "augment: map each training input to g*x + o per sample and modality, g in [1-J, 1+J], o in [-J, J], for "
      "robustness to normalization differences between scanners (default: 0 = off; the bundled model used 0.1)",
      "Intensity jitter", "advanced", minimum=0.0, maximum=0.5, slider=True, step=0.05, metavar="J",
      description="Augmentation: each training input becomes g x + o per sample and modality, with g drawn from "
                  "[1 - J, 1 + J] and o from [-J, J], for robustness to normalization differences between scanners; "
                  "0 is off (the bundled model used 0.1)."),
    _O("max_train_slices", "max-train-slices", "int", None, "train on N evenly spaced training slices (default: all)",
      "Maximum training slices", "advanced", minimum=1, zero_unset=True, metavar="N",
      description="Train on an evenly spaced subset of this many training slices; 0 uses all."),
    _O("max_val_slices", "max-validation-slices", "int", None,
      "validate on N evenly spaced validation slices (default: all)", "Maximum validation slices", "advanced",
      aliases=("max-val-slices",), minimum=1, zero_unset=True, metavar="N",
      description="Validate each epoch on an evenly spaced subset of this many validation slices; 0 uses all. The "
                  "final metrics always use every validation slice."),
    _O("normalization", "normalization", "choice", "volume", "intensity normalization, as at inference (default: "
      "volume)", "Intensity normalization", "advanced", choices=NORMALIZATIONS,
      description="volume: one robust intensity range per volume (as for fusion in the FusionINN module); slice: per "
                  "slice."),
    _O("latent_loss", "latent-loss", "choice", "pixel_mmd",
      "latent loss: pixel_mmd (default; shapes z), moments, reference_mmd (the authors', inert on image-sized z), "
      "none", "Latent loss", "advanced", choices=LATENT_LOSSES,
      description="How z is pulled towards the prior: pixel_mmd (default), moments, reference_mmd (the authors' MMD "
                  "on flattened z), or none."),
    _O("latent_weight", "latent-weight", "float", 0.1,
      "weight of the latent loss inside the fusion term (default: 0.1; the paper: 1)", "Latent-loss weight (beta)",
      "advanced", minimum=0.0, metavar="W", xml_default="0.10",
      description="beta in L = alpha (L_fusion + beta L_latent) + (1 - alpha) L_decomposition; 0.1 by default (the "
                  "paper: 1)."),
    _O("gradient_weight", "gradient-weight", "float", 0.0,
      "weight of the edge term inside the fusion loss: L1 between the fused image's finite differences and the "
      "stronger source's (default: 0 = the paper; the bundled model: see docs/models.md)", "Edge-loss weight",
      "advanced", minimum=0.0, metavar="G", xml_default="0.00",
      description="Weight of the edge term inside the fusion loss (L1 between the fused image's finite differences "
                  "and the stronger source's); 0 is the paper's loss."),
    _O("piella_weight", "piella-weight", "float", 0.0,
      "weight of the local-weight term inside the fusion loss: 1 - Piella's Q_P, SSIM to each source weighted "
      "per 11x11 window by the sources' local variances (default: 0 = the paper; the bundled model: see "
      "docs/models.md)", "Local-weight loss weight", "advanced", minimum=0.0, metavar="P", xml_default="0.00",
      description="Weight of the local-weight term inside the fusion loss (1 - Q_P: SSIM to each source weighted "
                  "per window by the sources' local variances); 0 is the paper's loss."),
    _O("modality_weights", "modality-weights", "pair_float", (0.5, 0.5),
      "per-modality weights of the SSIM and L2 terms (default: 0.5 0.5)", "Modality weights", "advanced",
      minimum=0.0, metavar=("W1", "W2"), xml_default="0.5,0.5",
      description="Weights of modality 1 and modality 2 in the SSIM and l2 terms (two numbers >= 0 with a positive "
                  "sum)."),
    _O("adaptive_weights", "adaptive-weights", "bool", False,
      "MMIF-AMIN fusion weights from each source's average gradient (SSIM) and entropy (L2)", "Adaptive weights",
      "advanced",
      description="Weight the sources per image by their average gradient (SSIM term) and entropy (l2 term), as "
                  "MMIF-AMIN, instead of the fixed modality weights."),
    _O("subnet_final_relu", "subnet-final-relu", "bool", False,
      "end each coupling subnet with a ReLU as the authors' network (trains much slower; default: off)",
      "Final ReLU in the subnets", "advanced",
      description="End each coupling subnet with a ReLU as the authors' network does (trains much slower)."),
    _O("full_resolution", "full-resolution", "bool", False,
      "run every coupling block at full resolution, without the 2x2 squeeze (no 2x2 block artefacts, but the "
      "sampled decomposition fails on a CPU budget, docs/models.md; default: off = the authors' architecture)",
      "Full-resolution blocks", "model",
      description="Run every coupling block at full resolution, without the 2x2 i-RevNet squeeze: the flow is then "
                  "shift-equivariant and cannot leave a 2x2 block pattern in the fused image."),
    _O("padding_mode", "padding-mode", "choice", "zeros",
      "how the subnets' convolutions see beyond the image border: zeros (the authors') or replicate (the bundled "
      "model; no bright border line in the uncertainty map; default: zeros)", "Border padding", "model",
      choices=("zeros", "replicate"),
      description="zeros: the authors' convolution padding; replicate: continue the image border, which keeps the "
                  "border of the sampled decomposition's uncertainty map at the background's level."),
    _O("clear_background", "clear-background", "bool", False,
      "make the fused image flat where both sources are background instead of the flow's faint halo (the bundled "
      "model uses it; default: off = the authors' fused image)", "Clear background", "model",
      description="Where both normalized sources are background, the fused image takes one flat value instead of "
                  "the faint halo of tissue values the flow spreads there; the decomposition is trained with it."),
    _O("grad_clip", "grad-clip", "float", None, "clip the global gradient norm to G (default: off)",
      "Gradient clipping", "advanced", minimum=0.0, exclusive_minimum=True, zero_unset=True, xml_tag="double",
      xml_default="0.0", metavar="G", description="Maximum global gradient norm; 0 disables clipping."),
    _O("num_workers", "num-workers", "int", 0, "data-loader worker processes (default: 0)", "Data-loader workers",
      "advanced", minimum=0, metavar="N",
      description="Data-loader worker processes; 0 loads the slices in the training process."),
    _O("run_dir", "run-dir", "out_dir", None, "checkpoints, split, tables and plot (default: <MODEL>_run)",
      "Run folder", "advanced", metavar="DIR",
      description="Folder for last.pt (resumable), best.pt, split.json and loss_curves.png; default: <output model "
                  "without .pt>_run."),
    _O("cache_dir", "cache-dir", "dir", None,
       "slice cache (default: $FUSIONINN_CACHE_DIR or ~/.cache/fusioninn/slices)",
      "Slice cache folder", "advanced", metavar="DIR",
      description="Where the selected, normalized slices of each case are cached between runs; default: "
                  "$FUSIONINN_CACHE_DIR or ~/.cache/fusioninn/slices."),
)
del _O

# TrainingConfig fields that are not options of either front end, with the reason.
NOT_EXPOSED = {
    "plot": "always RUN_DIR/loss_curves.png",
    "axis": "training slices are axial (axis 0), as the bundled model",
    "hidden_channels": "the paper's architecture (32)",
    "reverse_input": "new models invert the logit; the authors' sigmoid variant is for their checkpoints",
    "lr_factor": "the paper's schedule (x0.95)",
    "crops_per_slice": "one crop per slice and epoch",
    "metric_samples": "one sampled latent in the final metrics",
}

RETURN_VALUES = (
    ("integer", "bestEpoch", "Best epoch",
     "Epoch of the saved model (lowest validation loss, or training loss without validation).", "0"),
    ("double", "bestValidationLoss", "Best validation loss",
     "Total loss of the saved model on the validation slices (training loss without validation).", "0.0000"),
    ("double", "meanDecompositionSSIM", "Mean decomposition SSIM",
     "SSIM between each source and its decomposition from a sampled latent, averaged over both sources and the "
     "validation cases.", "0.0000"),
    ("integer", "epochsRun", "Epochs run", "Epochs in the history (fewer than requested after early stopping).", "0"),
    ("integer", "skippedCases", "Skipped case folders",
     "Case folders that were not used because a modality was missing or ambiguous (listed in the log).", "0"),
)


def by_flag() -> Dict[str, TrainOption]:
    return {option.flag: option for option in OPTIONS}


def by_slicer_name() -> Dict[str, TrainOption]:
    return {option.slicer_name: option for option in OPTIONS if option.slicer}


# -- values ----------------------------------------------------------------------------------
def bounds(option: TrainOption) -> Tuple[Optional[float], Optional[float]]:
    return option.minimum, option.maximum


def check_value(option: TrainOption, value: Any, name: str) -> Any:
    """``value`` if it is within the option's bounds, else ValueError naming the option as ``name``."""
    if value is None or option.kind not in ("int", "float", "pair_float"):
        return value
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{name} must be a finite number, got {item!r}")
        low, high = option.minimum, option.maximum
        if low is not None and option.exclusive_minimum and item <= low:
            raise ValueError(f"{name} must be greater than {low:g}, got {item:g}")
        if (low is not None and item < low) or (high is not None and item > high):
            limits = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ValueError(f"{name} must be {limits}, got {item:g}")
    return value


def parse_number(option: TrainOption, text: str, name: str, allow_zero_unset: bool = False) -> Any:
    """A command-line number for ``option`` (bounds checked); ``allow_zero_unset``: 0 → None."""
    integer = option.kind == "int"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {text!r}") from None
    if allow_zero_unset and option.zero_unset and value == 0:
        return None
    return check_value(option, value, name)


def _argparse_type(option: TrainOption, name: str, allow_zero_unset: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_number(option, text, name, allow_zero_unset)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "integer" if option.kind == "int" else "number"
    return parse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the table as ``fusioninn train`` arguments (canonical flag + aliases)."""
    positionals = sorted((o for o in OPTIONS if o.cli and o.index is not None), key=lambda o: o.index)
    parser.add_argument(positionals[0].dest, metavar=positionals[0].metavar, help=positionals[0].help)
    for option in OPTIONS:
        if not option.cli or option.index == 0:
            continue
        strings = ["--" + option.flag] + ["--" + alias for alias in option.aliases]
        if option.field == "output":
            strings.append("-o")
        kwargs: Dict[str, Any] = {"dest": option.dest, "help": option.help}
        if option.kind == "bool":
            kwargs["action"] = "store_true"
        elif option.kind in ("int", "float"):
            kwargs.update(type=_argparse_type(option, "--" + option.flag), default=option.default,
                          metavar=option.metavar)
        elif option.kind == "pair_float":
            kwargs.update(type=_argparse_type(option, "--" + option.flag), nargs=2, default=list(option.default),
                          metavar=option.metavar)
        elif option.kind == "pair_choice":
            kwargs.update(nargs=2, default=list(option.default), metavar=option.metavar)
        elif option.kind == "choice":
            kwargs.update(choices=option.choices, default=None if option.pair_index is not None else option.default)
            if option.pair_index is not None:
                kwargs["metavar"] = option.metavar
        else:
            kwargs.update(default=option.default, metavar=option.metavar)
        if option.index == 1:
            kwargs["required"] = True
        parser.add_argument(*strings, **kwargs)


def _pair(values: Mapping[str, Any], option_list: Sequence[TrainOption], base: Sequence[Any]) -> Tuple[Any, Any]:
    pair = list(base)
    for option in option_list:
        value = values.get(option.dest)
        if value is not None:
            pair[option.pair_index] = value
    return tuple(pair)  # type: ignore[return-value]


def config_from_cli(args: Any) -> Dict[str, Any]:
    """``TrainingConfig`` keyword arguments from parsed ``fusioninn train`` arguments."""
    values = vars(args) if not isinstance(args, Mapping) else dict(args)
    config: Dict[str, Any] = {}
    for option in OPTIONS:
        if not option.cli or option.field is None or option.pair_index is not None:
            continue
        value = values.get(option.dest, option.default)
        if option.kind in ("pair_float", "pair_choice"):
            value = tuple(value)
        config[option.field] = value
    singles = [o for o in OPTIONS if o.pair_index is not None and o.field == "modalities"]
    config["modalities"] = _pair(values, singles, config.get("modalities", ("t1ce", "flair")))
    return config


def config_from_slicer(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``TrainingConfig`` keyword arguments from the Slicer CLI's parsed values (by Slicer name):
    0 → None for ``zero_unset`` options, "" → None for paths, "" → the default label rule."""
    config: Dict[str, Any] = {}
    pair = [None, None]
    for option in OPTIONS:
        if not option.slicer or option.field is None:
            continue
        value = values.get(option.slicer_name)
        if option.pair_index is not None:
            pair[option.pair_index] = value if value not in (None, "") else option.default
            continue
        if option.kind in ("path", "dir", "out_file", "out_dir", "table", "image", "text"):
            value = (str(value).strip() or None) if value is not None else None
            if option.field == "labels" and value is None:
                value = DEFAULT_LABELS
        elif option.kind == "pair_float":
            value = parse_vector(value, option) if isinstance(value, str) else tuple(value or option.default)
        elif option.zero_unset and not value:
            value = None
        elif option.kind == "bool":
            value = bool(value)
        if value is None and option.default is not None and option.kind in ("int", "float", "choice"):
            value = option.default
        config[option.field] = value
    config["modalities"] = tuple(pair)
    return config


def parse_vector(text: str, option: TrainOption, name: Optional[str] = None) -> Tuple[float, ...]:
    """Slicer's ``<float-vector>`` value ("0.5,0.5") as a tuple, bounds checked."""
    label = name or option.slicer_name
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"{label} must be two numbers separated by a comma, got {text!r}") from None
    if len(values) != 2:
        raise ValueError(f"{label} must be two numbers separated by a comma, got {text!r}")
    return check_value(option, values, label)


# -- the Slicer CLI description --------------------------------------------------------------
_DESCRIPTION = (
    "Train (or continue training) a FusionINN fusion model on BraTS-style cases: one folder per case holding two "
    "co-registered MRI modalities and, optionally, a tumour segmentation. The split into training and validation is "
    "by subject. Writes the best model (lowest validation loss), a per-epoch history table, a per-case metrics table "
    "and, optionally, a preview fusion of one validation case. The run folder (default: next to the model, named "
    "<model>_run) keeps last.pt for resuming, the split and a loss-curve plot. Every parameter is also an option of "
    "'fusioninn train' (e.g. learningRate is --learning-rate).")
_ACKNOWLEDGEMENTS = (
    "FusionINN was proposed by N. Kumar, P. Gumhold and colleagues (arXiv:2403.15769, 2024). This module is an "
    "independent implementation using PyTorch and FrEIA.")
XML_HEADER = f"""<?xml version="1.0" encoding="utf-8"?>
<!-- Parameters of the FusionINNTraining scripted CLI. GENERATED from FusionINNLib/train/options.py (the one table of
     training options) by `python -m FusionINNLib.train.options` with its write-xml option (see that module);
     do not edit by hand (Testing/test_train_options.py compares it byte for byte). FusionINNTraining.py builds its
     argument parser from this file; names and long flags are identifiers (Slicer's rule), each the camelCase of a
     long option of `fusioninn train`. Float defaults are written with as many decimals as Slicer's spin box should
     show (it takes them from the default text). -->
<executable>
  <category>Filtering</category>
  <title>FusionINN Training</title>
  <description><![CDATA[{_DESCRIPTION}]]></description>
  <version>0.1.0</version>
  <documentation-url>https://github.com/SlicerFusionINN/SlicerFusionINN/blob/main/docs/training_cli.md</documentation-url>
  <license>MIT</license>
  <contributor>SlicerFusionINN contributors</contributor>
  <acknowledgements><![CDATA[{_ACKNOWLEDGEMENTS}]]></acknowledgements>
"""

_XML_TAGS = {"int": "integer", "float": "float", "bool": "boolean", "choice": "string-enumeration", "text": "string",
             "path": "file", "dir": "directory", "out_file": "file", "out_dir": "directory", "table": "table",
             "image": "image", "pair_float": "float-vector"}
_INPUT_PATHS = ("path", "dir")
_OUTPUT_PATHS = ("out_file", "out_dir", "table", "image")


def _default_text(option: TrainOption) -> Optional[str]:
    if option.xml_default is not None:
        return option.xml_default
    if option.kind == "bool":
        return "false"
    if option.kind in _INPUT_PATHS + _OUTPUT_PATHS:
        return None
    if option.zero_unset and option.default is None:
        return "0"
    if option.default is None:
        return None
    if option.kind == "float":
        return repr(float(option.default))
    return str(option.default)


def _parameter_xml(option: TrainOption) -> List[str]:
    tag = option.xml_tag or _XML_TAGS[option.kind]
    attributes = ""
    if option.kind == "image":
        attributes += ' type="scalar"'
    if option.extensions:
        attributes += f' fileExtensions="{",".join(option.extensions)}"'
    lines = [f"    <{tag}{attributes}>", f"      <name>{option.slicer_name}</name>"]
    if option.index is None:
        lines.append(f"      <longflag>{option.slicer_name}</longflag>")
    lines.append(f"      <label>{option.label}</label>")
    lines.append(f"      <description><![CDATA[{option.description or option.help}]]></description>")
    if option.kind in _INPUT_PATHS:
        lines.append("      <channel>input</channel>")
    elif option.kind in _OUTPUT_PATHS:
        lines.append("      <channel>output</channel>")
    if option.index is not None:
        lines.append(f"      <index>{option.index}</index>")
    default = _default_text(option)
    if default is not None:
        lines.append(f"      <default>{escape(default)}</default>")
    for choice in option.choices:
        lines.append(f"      <element>{choice}</element>")
    if option.slider:
        lines += ["      <constraints>", f"        <minimum>{float(option.minimum)!r}</minimum>",
                  f"        <maximum>{float(option.maximum)!r}</maximum>", f"        <step>{option.step!r}</step>",
                  "      </constraints>"]
    lines.append(f"    </{tag}>")
    return lines


def slicer_xml() -> str:
    """The FusionINNTraining.xml text derived from :data:`OPTIONS` (see the module docstring)."""
    assert "--" not in XML_HEADER.split("<!--", 1)[1].split("-->", 1)[0], "XML comments cannot hold '--'"
    lines = [XML_HEADER.rstrip("\n")]
    for key, label, description, advanced in GROUPS:
        lines += ["", '  <parameters advanced="true">' if advanced else "  <parameters>", f"    <label>{label}</label>",
                  f"    <description><![CDATA[{description}]]></description>"]
        for option in OPTIONS:
            if option.slicer and option.group == key:
                lines += _parameter_xml(option)
        lines.append("  </parameters>")
    lines += ["", "  <parameters>", "    <label>Results</label>",
              "    <description><![CDATA[Summary of the finished run.]]></description>"]
    for tag, name, label, description, default in RETURN_VALUES:
        lines += [f"    <{tag}>", f"      <name>{name}</name>", f"      <label>{label}</label>",
                  f"      <description><![CDATA[{description}]]></description>", "      <channel>output</channel>",
                  f"      <default>{default}</default>", f"    </{tag}>"]
    lines += ["  </parameters>", "</executable>", ""]
    return "\n".join(lines)


def slicer_bounds() -> Dict[str, Tuple[Optional[float], Optional[float], bool, bool]]:
    """Slicer name → (minimum, maximum, exclusive minimum, 0 means unset) of every number."""
    return {o.slicer_name: (o.minimum, o.maximum, o.exclusive_minimum, o.zero_unset)
            for o in OPTIONS if o.slicer and o.kind in ("int", "float", "pair_float")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m FusionINNLib.train.options",
                                     description="Write the Slicer CLI description derived from the option table.")
    parser.add_argument("--write-xml", metavar="PATH", help="write FusionINNTraining.xml here (atomically)")
    args = parser.parse_args(argv)
    if args.write_xml:
        from ..io.atomic import atomic_write_bytes

        atomic_write_bytes(args.write_xml, slicer_xml().encode("utf-8"))
    else:
        sys.stdout.write(slicer_xml())
    return 0


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
assert all(_IDENTIFIER.match(o.slicer_name) for o in OPTIONS), "Slicer names must be identifiers"

if __name__ == "__main__":
    sys.exit(main())
