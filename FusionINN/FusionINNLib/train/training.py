"""Training FusionINN on BraTS-style cases: configuration, data, the loop, DDP, history and metrics tables.

Its siblings hold the rest of a run: :mod:`.checkpoints` (``last.pt``/``best.pt``/the output model,
resuming), :mod:`.metadata` (what the model file says about its training), :mod:`.plot` (the loss
curves) and :mod:`.options` (the one table of options the command lines are built from).

Objective (paper §2; formulas in :mod:`FusionINNLib.core.losses`)::

    L = α (L_fusion + β L_latent) + (1 − α) L_dec,   L_fusion / L_dec = λ L_SSIM + (1 − λ) L_ℓ2

with the paper's schedule as defaults: Adam (lr 3e-4), ReduceLROnPlateau (×0.95 after 8 epochs
without improvement), batch 64, 400 epochs, α = 0.5, λ = 0.8, k = 3, z ~ N(0, I), modality
weights 0.5 / 0.5.

Differences from the reference code, each on purpose (see ``../shared/spec/fusioninn.md`` §4b):

- the train/validation split is by *subject* (``brats.split_subjects``), never by slice;
- the latent loss is ``pixel_mmd`` with weight β = 0.1 by default (the reference MMD on flattened
  z is inert; it is still available as ``latent_loss="reference_mmd"``, ``latent_weight=1``);
- the fused image is compared with the sources clipped to [0.001, 0.999] and the decomposition
  is trained from the fused image as inference sees it (``FlowTrainingStep``);
- the coupling subnets have no final ReLU by default (``subnet_final_relu=True`` restores it);
- the data are reshuffled every epoch; the last partial batch is used, not dropped;
- the scheduler steps on the epoch-mean validation loss (not the last batch's);
- the output model is the epoch with the lowest validation loss, not the last one;
- every source of randomness is derived from ``seed`` and the epoch number (crop positions from
  (seed, epoch, sample), shuffling from (seed, epoch), fresh latents from (seed, epoch, rank)), so
  a run is reproducible and a resumed run continues exactly as an uninterrupted one would.

Files written (rank 0 only), all atomically (temporary file in the same folder, then rename):

``run_dir/split.json``           the subject-level split
``run_dir/last.pt``              every epoch: model + optimizer/scheduler/scaler state + history
``run_dir/best.pt``              the best epoch so far (a normal model checkpoint)
``run_dir/partition.json``       under DDP: which samples each rank trained on in the last epoch
``history_table`` (+ ``.schema.tsv``)   one row per epoch: every sub-loss train/val, lr, seconds
``metrics_table`` (+ ``.schema.tsv``)   per validation case and mean: fusion SSIM per source,
                                         sampled-z decomposition SSIM and PSNR per source
``run_dir/loss_curves.png``      the history as curves
``output``                       the best model with metadata (modalities, normalization, data
                                 summary, split, final metrics, training settings)

Scale-out: under ``torchrun`` (environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) the
model is wrapped in ``DistributedDataParallel`` (gloo on the CPU, nccl on CUDA) and every rank
trains on its own part of each epoch (``DistributedSampler``); epoch losses are all-reduced so the
scheduler, best-model choice and early stopping agree on every rank.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.engine import Cancelled, SliceEngine, fill_cleared_background, select_device, tune_cpu_allocator
from ..core.losses import (
    DEFAULT_LATENT_LOSS,
    LATENT_LOSSES,
    PRIORS,
    adaptive_weights,
    decomposition_loss,
    fusion_loss,
    gradient_loss,
    latent_loss,
    piella_loss,
    sample_prior,
)
from ..core.model import FusionFlow, FusionINNConfig
from ..core.normalization import MODES
from ..io.atomic import atomic_write_text
from ..io.checkpoint import FORMAT_VERSION
from . import checkpoints
from .metadata import model_metadata
from .plot import write_plot

LOGGER = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
LogFn = Callable[[str], None]
CancelFn = Callable[[], bool]

DEFAULT_LABELS = "2,1|3"  # oedema AND (necrosis OR non-enhancing tumour): the paper's slices
BRAIN_LABELS = ("brain", "none", "")  # spellings of "no label rule: brain-content slices"
MIN_FREE_BYTES = 64 * 1024 * 1024
LOSS_PARTS = ("loss", "fusion", "fusion_ssim", "fusion_l2", "fusion_grad", "fusion_piella", "latent", "dec", "dec_ssim",
              "dec_l2")
# Fusion targets are clipped to [m, 1 − m] (see _Trainer._losses), which keeps |u| <= logit(1 − m) ≈ 6.9.
FUSION_TARGET_MARGIN = 1e-3


# ------------------------------------------------------------------------------------------------
# Configuration and result
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainingConfig:
    """Every training setting; the defaults are the paper's (see the module docstring)."""

    data_dir: str
    output: str
    run_dir: Optional[str] = None  # default: <output without suffix>_run
    history_table: Optional[str] = None  # default: run_dir/history.tsv
    metrics_table: Optional[str] = None  # default: run_dir/metrics.tsv
    plot: Optional[str] = None  # default: run_dir/loss_curves.png
    cache_dir: Optional[str] = None  # slice cache; default: $FUSIONINN_CACHE_DIR or ~/.cache/fusioninn/slices
    modalities: Tuple[str, str] = ("t1ce", "flair")
    labels: Optional[str] = DEFAULT_LABELS  # label rule (brats.parse_label_rule) or "brain"
    normalization: str = "volume"
    axis: int = 0
    epochs: int = 400
    batch_size: int = 64
    lr: float = 3e-4
    alpha: float = 0.5
    lam: float = 0.8
    blocks: int = 3
    hidden_channels: int = 32
    # The authors' subnets end in a ReLU (s, t >= 0: couplings can only expand and shift upwards).
    # Off by default for new models: measured on phantoms (6 epochs, 64x64 crops, lr 1e-3) the
    # fusion loss reached 0.24 without it and 0.58 with it (docs/training.md).
    subnet_final_relu: bool = False
    full_resolution: bool = False  # no 2x2 squeeze (model.FusionINNConfig.full_resolution)
    padding_mode: str = "zeros"  # subnet convolutions at the image border (model.FusionINNConfig.padding_mode)
    clear_background: bool = False  # flat fused background (model.FusionINNConfig.clear_background)
    reverse_input: str = "logit"
    prior: str = "normal"
    latent_loss: str = DEFAULT_LATENT_LOSS
    # β in L = α(L_fusion + β L_latent) + (1 − α) L_dec. The paper has β = 1; with the working
    # pixel MMD, β = 1 cost 0.04 sampled-z decomposition SSIM on phantoms while β = 0.1 still
    # shapes z and matches the unshaped model (docs/training.md, latent-loss experiment).
    latent_weight: float = 0.1
    adaptive_weights: bool = False
    modality_weights: Tuple[float, float] = (0.5, 0.5)
    val_fraction: float = 0.2
    max_cases: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    resume: Optional[str] = None
    patience: int = 8
    lr_factor: float = 0.95
    early_stopping: Optional[int] = None  # stop after this many epochs without improvement
    grad_clip: Optional[float] = None  # max global gradient norm
    crop_size: Optional[int] = None  # train on random crops (CPU); None = full slices
    crops_per_slice: int = 1
    max_val_slices: Optional[int] = None  # evenly spaced subset of the validation slices
    metric_samples: int = 1  # sampled latents averaged in the final decomposition metrics
    # Training inputs x -> g x + o per sample and modality, g ~ U[1 - J, 1 + J], o ~ U[-J, J]: the same
    # normalization lands tissue and background at slightly different values on different scanners
    # and cases (measured: a phantom-trained model fused a real brain's background at 0.01-0.07
    # instead of ~0.001, which alone took the fusion SSIM from 0.74 to 0.25). 0 = off (the paper).
    intensity_jitter: float = 0.0
    # Weight of the max-abs gradient term inside the fusion loss (losses.gradient_loss): SSIM + ℓ2
    # alone converge towards the average, which halves every edge only one source has. 0 = the paper.
    gradient_weight: float = 0.0
    # Weight of Piella's variance-weighted local SSIM term (losses.piella_loss, 1 − Q_P) inside the
    # fusion loss: in each window the source with the structure counts most. 0 = the paper.
    piella_weight: float = 0.0
    # Start from this model's weights instead of a fresh initialisation (fine-tuning, e.g. whole
    # slices after crops); its architecture must match the run's.
    init_model: Optional[str] = None
    max_train_slices: Optional[int] = None  # evenly spaced subset of the training slices
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)  # type: ignore[assignment]
        self.modality_weights = tuple(float(w) for w in self.modality_weights)  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def fraction(name: str, value: float, upper_open: bool = False) -> None:
            ok = math.isfinite(value) and 0.0 <= value and (value < 1.0 if upper_open else value <= 1.0)
            if not ok:
                raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")

        if len(self.modalities) != 2 or len({m.lower() for m in self.modalities}) != 2:
            raise ValueError(f"need two different modalities, got {list(self.modalities)}")
        for name in ("epochs", "batch_size", "crops_per_slice", "metric_samples"):
            positive_int(name, getattr(self, name))
        for name in ("max_cases", "early_stopping", "max_val_slices", "max_train_slices"):
            positive_int(name, getattr(self, name), allow_none=True)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        fraction("alpha", self.alpha)
        fraction("lambda", self.lam)
        fraction("val_fraction", self.val_fraction, upper_open=True)
        fraction("intensity_jitter", self.intensity_jitter, upper_open=True)
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"unknown prior {self.prior!r}; choose one of {', '.join(PRIORS)}")
        if self.latent_loss not in LATENT_LOSSES:
            raise ValueError(f"unknown latent loss {self.latent_loss!r}; choose one of {', '.join(LATENT_LOSSES)}")
        if not (math.isfinite(self.latent_weight) and self.latent_weight >= 0):
            raise ValueError(f"latent_weight must be >= 0, got {self.latent_weight}")
        for name in ("gradient_weight", "piella_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if len(self.modality_weights) != 2 or min(self.modality_weights) < 0 or sum(self.modality_weights) <= 0:
            raise ValueError(f"modality weights must be two numbers >= 0 with a positive sum, got "
                             f"{list(self.modality_weights)}")
        if self.normalization not in MODES:
            raise ValueError(f"normalization must be one of {', '.join(MODES)}, got {self.normalization!r}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number, got {self.grad_clip}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        model_config = self.model_config()  # validates blocks, hidden channels, reverse_input
        if self.crop_size is not None:
            multiple = model_config.pad_multiple
            if self.crop_size < 16 or self.crop_size % multiple:
                raise ValueError(f"crop_size must be at least 16 and a multiple of {multiple} for "
                                 f"{self.blocks} blocks, got {self.crop_size}")

    def model_config(self) -> FusionINNConfig:
        return FusionINNConfig(blocks=self.blocks, hidden_channels=self.hidden_channels,
                               subnet_final_relu=self.subnet_final_relu, permutation_seed=self.seed,
                               full_resolution=self.full_resolution, padding_mode=self.padding_mode,
                               clear_background=self.clear_background, reverse_input=self.reverse_input)

    def label_rule(self) -> Optional[str]:
        if self.labels is None or str(self.labels).strip().lower() in BRAIN_LABELS:
            return None
        return str(self.labels)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        data["modality_weights"] = list(self.modality_weights)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainingResult:
    best_epoch: int
    best_val_loss: float
    mean_decomposition_ssim: float
    model_path: Path
    history_path: Path
    metrics_path: Path
    run_dir: Path
    plot_path: Optional[Path] = None
    epochs_run: int = 0
    stopped_early: bool = False
    metrics: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Small utilities
# ------------------------------------------------------------------------------------------------
def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence: independent streams for distinct tuples)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def schema_path(table: Path) -> Path:
    """Slicer's table-schema sidecar: ``H.tsv`` → ``H.schema.tsv`` (same base name)."""
    name = table.name
    stem = name[: -len(table.suffix)] if table.suffix else name
    return table.with_name(f"{stem}.schema{table.suffix or '.tsv'}")


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.8g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def write_table(path: Path, columns: Sequence[Tuple[str, str]], rows: Sequence[Dict[str, Any]]) -> Path:
    """Write a TSV table and its Slicer ``.schema.tsv`` sidecar (columnName, type), atomically.

    ``columns`` is [(name, type)] with type ``double``, ``int`` or ``string``; the schema makes
    Slicer load numbers as numbers instead of strings.
    """
    lines = ["\t".join(name for name, _ in columns)]
    lines += ["\t".join(_format_cell(row.get(name)) for name, _ in columns) for row in rows]
    schema = ["columnName\ttype"] + [f"{name}\t{kind}" for name, kind in columns]
    atomic_write_text(schema_path(path), "\n".join(schema) + "\n")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def check_writable(path: Path, what: str, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail before training if ``path`` cannot be written: folder not creatable, not writable,
    ``path`` is a directory, or less than ``min_free`` bytes free on its file system."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the folder {folder} for the {what}: {error.strerror or error}") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".fusioninn-write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write the {what} in {folder}: {error.strerror or error}") from None
    free = shutil.disk_usage(folder).free
    if free < min_free:
        raise ValueError(f"not enough free disk space for the {what} in {folder}: {free / 2**20:.1f} MB free, "
                         f"need at least {min_free / 2**20:.0f} MB")


def default_cache_dir() -> Path:
    env = os.environ.get("FUSIONINN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fusioninn" / "slices"


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ------------------------------------------------------------------------------------------------
# Distributed context
# ------------------------------------------------------------------------------------------------
@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over ranks (float64)."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        if self.enabled:
            if self.backend == "nccl":
                tensor = tensor.cuda()
            torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()

    def gather(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def distributed_context(device: torch.device) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistributedContext()
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    initialized_here = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
        initialized_here = True
    return DistributedContext(rank, world, local_rank, torch.distributed.get_backend(), initialized_here)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclass
class CaseData:
    case_id: str
    subject_id: str
    slices1: np.ndarray  # (N, H, W) float32, normalized
    slices2: np.ndarray
    indices: np.ndarray  # slice positions along the axis


def _foreground_boxes(case: CaseData) -> np.ndarray:
    """(N, 4) [row0, row1, col0, col1] (inclusive) of each slice's non-background pixels."""
    boxes = np.zeros((len(case.indices), 4), dtype=np.int64)
    for i in range(len(case.indices)):
        s1 = np.asarray(case.slices1[i])
        s2 = np.asarray(case.slices2[i])
        # Background is each slice's minimum (0 for ordinary MRI, a constant for z-scored exports).
        mask = (s1 > s1.min()) | (s2 > s2.min())
        if not mask.any():
            boxes[i] = (0, s1.shape[0] - 1, 0, s1.shape[1] - 1)
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes[i] = (rows[0], rows[-1], cols[0], cols[-1])
    return boxes


def _pad_to(pair: np.ndarray, height: int, width: int) -> np.ndarray:
    """Edge-pad a (2, h, w) pair at the high end to (2, height, width), as the inference engine."""
    _, h, w = pair.shape
    if h == height and w == width:
        return pair
    return np.pad(pair, ((0, 0), (0, height - h), (0, width - w)), mode="edge")


class SliceDataset(torch.utils.data.Dataset):
    """Slice pairs (2, H, W) of several cases: whole slices padded to one size, or random crops.

    Crops: the crop centre is drawn uniformly inside the slice's foreground bounding box (so crops
    rarely show only background) from a generator seeded by (seed, epoch, item), which makes the
    crops independent of worker processes, ranks and resumption. ``jitter`` J > 0 maps each
    modality of each sample to g x + o (g ~ U[1 - J, 1 + J], o ~ U[-J, J]) from the same generator.
    """

    def __init__(self, cases: Sequence[CaseData], multiple: int, crop: Optional[int] = None,
                 crops_per_slice: int = 1, seed: int = 0, subset: Optional[int] = None, jitter: float = 0.0):
        self.cases = list(cases)
        self.crop = crop
        self.jitter = float(jitter)
        self.seed = seed
        self.epoch = 0
        self.items: List[Tuple[int, int]] = [
            (c, s) for c, case in enumerate(self.cases) for s in range(len(case.indices))
        ]
        if subset is not None and len(self.items) > subset:
            keep = np.linspace(0, len(self.items) - 1, subset).round().astype(int)
            self.items = [self.items[i] for i in keep]
        self.repeats = int(crops_per_slice) if crop else 1
        heights = [case.slices1.shape[1] for case in self.cases] or [multiple]
        widths = [case.slices1.shape[2] for case in self.cases] or [multiple]
        self.height = int(math.ceil(max(heights) / multiple) * multiple)
        self.width = int(math.ceil(max(widths) / multiple) * multiple)
        self.boxes = [_foreground_boxes(case) for case in self.cases] if crop else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def describe(self, index: int) -> Tuple[str, int]:
        case_index, slice_index = self.items[index % len(self.items)]
        case = self.cases[case_index]
        return case.case_id, int(case.indices[slice_index])

    def __getitem__(self, index: int) -> torch.Tensor:
        case_index, slice_index = self.items[index % len(self.items)]
        case = self.cases[case_index]
        pair = np.stack([np.asarray(case.slices1[slice_index]), np.asarray(case.slices2[slice_index])])
        pair = pair.astype(np.float32, copy=False)
        rng = np.random.default_rng(derived_seed(self.seed, self.epoch, index))
        if not self.crop:
            pair = _pad_to(pair, self.height, self.width)
        else:
            crop = self.crop
            pair = _pad_to(pair, max(crop, pair.shape[1]), max(crop, pair.shape[2]))
            r0, r1, c0, c1 = self.boxes[case_index][slice_index]
            centre_row = rng.integers(r0, r1 + 1)
            centre_col = rng.integers(c0, c1 + 1)
            top = int(np.clip(centre_row - crop // 2, 0, pair.shape[1] - crop))
            left = int(np.clip(centre_col - crop // 2, 0, pair.shape[2] - crop))
            pair = pair[:, top:top + crop, left:left + crop]
        if self.jitter > 0:
            gain = rng.uniform(1.0 - self.jitter, 1.0 + self.jitter, size=(2, 1, 1))
            offset = rng.uniform(-self.jitter, self.jitter, size=(2, 1, 1))
            pair = (pair * gain + offset).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(pair))


class _ShardSampler(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank`` in order: an exact, unpadded validation partition."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------
# Model pieces
# ------------------------------------------------------------------------------------------------
class FlowTrainingStep(nn.Module):
    """One module for the whole training pass, so that ``DistributedDataParallel`` sees both
    directions: ``(u, z) = f(x)``, then the decomposition exactly as inference computes it from
    the fused image alone: ``x̂ = f⁻¹(logit(y), z′)`` with y = ``flow.fused_image(u, x)`` (or, for
    the authors' scheme with ``reverse_input="sigmoid"``, ``x̂ = σ(f⁻¹(y, z′))``); returns (y, z, x̂).

    Feeding ``u`` itself back would train a decomposition that inference cannot reproduce: once
    σ(u) rounds to 0 or 1 in float32 (|u| ≳ 16.6) the fused image no longer determines u. Measured:
    a model trained that way pushed u to −37 over the background and its sampled-z decomposition
    from y fell from SSIM 0.96 (with the true u) to 0.60.
    """

    def __init__(self, flow: FusionFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, z_fresh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, z = self.flow(x)
        y = self.flow.fused_image(u, x)
        x_hat = self.flow.inverse(self.flow.inverse_input(y), z_fresh)
        if self.flow.config.reverse_input == "sigmoid":
            x_hat = torch.sigmoid(x_hat)
        background = self.flow.cleared_background(y)
        if background is not None:
            # as the sampled decomposition at inference: each source's background value (its
            # minimum, which is the background of a slice that has any) where y says background
            floor = x.detach().amin(dim=(2, 3), keepdim=True)
            x_hat = torch.where(background, floor, x_hat)
        return y, z, x_hat


def initialize_actnorm(flow: FusionFlow, batch: torch.Tensor) -> None:
    """Data-dependent ActNorm initialisation (Kingma & Dhariwal 2018) from one batch.

    Each ActNorm computes a·x + b per channel with a = exp(scale); it is set so that its output on
    ``batch`` has zero mean and unit standard deviation per channel: scale = −log σ_c,
    bias = −μ_c / σ_c. FrEIA 0.2's own on-first-batch initialisation only accepts the nominal build
    size, so this is done here for any slice or crop size.
    """
    import FrEIA.modules as fm

    for module in [m for m in flow.graph.modules() if isinstance(m, fm.ActNorm)]:
        captured: List[torch.Tensor] = []

        def capture(_module: nn.Module, args: tuple, store: List[torch.Tensor] = captured) -> None:
            store.append(args[0][0].detach())

        handle = module.register_forward_pre_hook(capture)
        try:
            with torch.no_grad():
                flow(batch)
        finally:
            handle.remove()
        data = captured[0].transpose(0, 1).reshape(captured[0].shape[1], -1).double()
        std = data.std(dim=1).clamp_min(1e-6)
        mean = data.mean(dim=1)
        with torch.no_grad():
            module.scale.data.view(-1).copy_((-torch.log(std)).to(module.scale.dtype))
            module.bias.data.view(-1).copy_((-mean / std).to(module.bias.dtype))
        module.init_on_next_batch = False


def _parameter_checksum(module: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum().item() for p in module.parameters()))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def psnr(estimate: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR = 10 log₁₀(R² / MSE) over all voxels (normalized units, R = 1); inf if identical."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def mean_slice_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over slices of the 2-D SSIM on the explicit scale of normalized units (data range 1):
    the one scorer (:func:`FusionINNLib.metrics.scoring.pair_ssim`; pytorch-msssim's conventions, the same
    numbers to ~1e-8 as the pytorch-msssim call this replaced, and faster on a CPU)."""
    from ..metrics.scoring import pair_ssim

    return pair_ssim(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), data_range=1.0)


def evaluate_case(flow: FusionFlow, slices1: np.ndarray, slices2: np.ndarray, *, samples: int = 1,
                  seed: int = 0, prior: str = "normal", device: str = "cpu", batch_size: int = 8
                  ) -> Dict[str, float]:
    """Fusion SSIM per source (against the source clipped to [0, 1]), sampled-z decomposition
    SSIM / PSNR per source (keys ``*_1``, ``*_2``) and the whole fusion metric suite (keys
    ``fusion_<metric>``: the paper's five and MMIF-AMIN's set, mean over the slices, data range 1)
    for a stack of normalized slices (N, H, W), using the inference engine."""
    engine = SliceEngine(copy.deepcopy(flow), device=device, batch_size=batch_size)
    x1 = np.asarray(slices1, dtype=np.float32)
    x2 = np.asarray(slices2, dtype=np.float32)
    fused = engine.fuse(x1, x2).fused
    d1, d2, _, _ = engine.decompose_sampled(fused, samples=samples, seed=seed, prior=prior)
    fill_cleared_background(engine.model, fused, (d1, d2), (None, None), (float(x1.min()), float(x2.min())))
    # The fused image is in (0, 1): scored against the sources clipped to [0, 1], as trained.
    c1, c2 = np.clip(x1, 0.0, 1.0), np.clip(x2, 0.0, 1.0)
    values = {
        "fusion_ssim_1": mean_slice_ssim(fused, c1),
        "fusion_ssim_2": mean_slice_ssim(fused, c2),
        "decomposition_ssim_1": mean_slice_ssim(d1, x1),
        "decomposition_ssim_2": mean_slice_ssim(d2, x2),
        "decomposition_psnr_1": psnr(d1, x1),
        "decomposition_psnr_2": psnr(d2, x2),
    }
    # The one scorer on the explicit scale of normalized units (degenerate slices give NaN or
    # defined values; its notes, not warnings, say so: the table shows the values).
    from ..io.volume import Volume
    from ..metrics.scoring import score_fusion

    suite = score_fusion(Volume(c1), Volume(c2), Volume(np.asarray(fused, dtype=np.float32)), data_range=1.0,
                         axis=0)["summary"]
    values.update({f"fusion_{name}": float(value) for name, value in suite.items()})
    return values


# ------------------------------------------------------------------------------------------------
# Where a run writes, and the data it trains on (two concerns of a run, each on its own)
# ------------------------------------------------------------------------------------------------
@dataclass
class RunPaths:
    """Every file a run writes: the model, the run folder (last.pt, best.pt, split.json), the
    history and metrics tables, the loss-curve plot, and the slice cache it reads and fills."""

    output: Path
    run_dir: Path
    history_path: Path
    metrics_path: Path
    plot_path: Path
    cache_dir: Path

    @classmethod
    def resolve(cls, c: TrainingConfig) -> RunPaths:
        output = Path(c.output)
        if output.suffix == "":
            raise ValueError(f"output model {output} needs a file name ending in .pt")
        run_dir = Path(c.run_dir) if c.run_dir else output.with_name(output.stem + "_run")
        return cls(output=output, run_dir=run_dir,
                   history_path=Path(c.history_table) if c.history_table else run_dir / "history.tsv",
                   metrics_path=Path(c.metrics_table) if c.metrics_table else run_dir / "metrics.tsv",
                   plot_path=Path(c.plot) if c.plot else run_dir / "loss_curves.png",
                   cache_dir=Path(c.cache_dir) if c.cache_dir else default_cache_dir())

    def check(self, log: LogFn) -> None:
        """Refuse unwritable outputs before any work; an unwritable cache moves into the run folder."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a directory")
        check_writable(self.output, "output model")
        check_writable(self.run_dir / "last.pt", "run directory")
        check_writable(self.history_path, "history table")
        check_writable(self.metrics_path, "metrics table")
        check_writable(self.plot_path, "loss-curve plot")
        try:
            check_writable(self.cache_dir / "probe", "slice cache", min_free=0)
        except ValueError as error:
            fallback = self.run_dir / "slice_cache"
            log(f"{error}; caching slices in {fallback} instead")
            self.cache_dir = fallback


@dataclass
class TrainingData:
    """The cases of a run (split by subject) and their selected, normalized slices."""

    train_cases: List[Any]
    val_cases: List[Any]
    train_data: List[CaseData]
    val_data: List[CaseData]
    data_summary: str
    slice_counts: Dict[str, int]


def load_training_data(c: TrainingConfig, paths: RunPaths, dist: DistributedContext,
                       resume_state: Optional[Dict[str, Any]], log: LogFn) -> TrainingData:
    """Discover and split the cases (or take a resumed run's split), write split.json, and load
    every case's slices through the cache (rank 0 fills it first, the other ranks then read it)."""
    from ..io.brats import Case, discover_cases, load_case_slices, split_subjects, write_split

    discovery = None
    if resume_state is not None:
        split = resume_state["split"]
        train_cases = [Case.from_dict(d) for d in split["train"]]
        val_cases = [Case.from_dict(d) for d in split["val"]]
        for case in train_cases + val_cases:
            for path in list(case.paths.values()) + ([case.seg] if case.seg else []):
                if not Path(path).is_file():
                    raise FileNotFoundError(f"case {case.case_id} of the resumed run: file not found: {path}")
        data_summary = resume_state.get("data_summary", "")
    else:
        discovery = discover_cases(c.data_dir, c.modalities, require_seg=False)
        cases = list(discovery.cases)
        if c.max_cases is not None and len(cases) > c.max_cases:
            cases = cases[: c.max_cases]
            log(f"using the first {c.max_cases} of {len(discovery.cases)} cases (maximum number of cases)")
        train_cases, val_cases = split_subjects(cases, c.val_fraction, c.seed)
        if not val_cases:
            log("warning: no validation subjects (one subject, or val_fraction 0): the best model is "
                "chosen on the training loss and the metrics table reports training cases")
        if dist.is_main:
            write_split(paths.run_dir / "split.json", train_cases, val_cases, seed=c.seed,
                        val_fraction=c.val_fraction)
        data_summary = ""

    def load(cases) -> List[CaseData]:
        loaded = []
        for case in cases:
            try:
                slices1, slices2, indices = load_case_slices(
                    case, c.modalities, labels=c.label_rule(), normalization=c.normalization,
                    cache_dir=paths.cache_dir, axis=c.axis)
            except OSError as error:
                raise OSError(f"case {case.case_id}: cannot read or cache its slices "
                              f"({error.strerror or error})") from error
            if len(indices) == 0:
                log(f"case {case.case_id}: no slice matches the selection; skipped")
                continue
            loaded.append(CaseData(case.case_id, case.subject_id, slices1, slices2, np.asarray(indices)))
        return loaded

    if dist.is_main:
        train_data, val_data = load(train_cases), load(val_cases)
    dist.barrier()
    if not dist.is_main:
        train_data, val_data = load(train_cases), load(val_cases)
    if not train_data:
        raise ValueError(f"no training slices: none of the {len(train_cases)} training case(s) under "
                         f"{c.data_dir} has a slice matching the selection (labels {c.label_rule() or 'brain'})")
    counts = {case.case_id: len(case.indices) for case in train_data + val_data}
    if not data_summary and discovery is not None:
        data_summary = discovery.summary(counts)
    log(data_summary)
    n_train = sum(counts[case.case_id] for case in train_data)
    n_val = sum(counts[case.case_id] for case in val_data)
    log(f"split by subject: {len(train_data)} training case(s), {n_train} slices; "
        f"{len(val_data)} validation case(s), {n_val} slices")
    return TrainingData(train_cases, val_cases, train_data, val_data, data_summary, {"train": n_train, "val": n_val})


def evaluation_table(flow: FusionFlow, data: TrainingData, c: TrainingConfig, device: str,
                     check_cancel: Callable[[], None]) -> Tuple[List[Dict[str, Any]], Dict[str, Any], str]:
    """The metrics table of a trained model (the evaluation concern): one row per validation case
    (training cases without a validation split) plus the mean row; per-source columns are named
    after the modality."""
    eval_cases = data.val_data if data.val_data else data.train_data
    split_name = "validation" if data.val_data else "training"
    names = [str(m) for m in c.modalities]
    rows: List[Dict[str, Any]] = []
    for case in eval_cases:
        check_cancel()
        values = evaluate_case(flow, case.slices1, case.slices2, samples=c.metric_samples, seed=c.seed,
                               prior=c.prior, device=device)
        row = {"case": case.case_id, "subject": case.subject_id, "split": split_name, "slices": len(case.indices)}
        for key, value in values.items():
            if key.endswith(("_1", "_2")):  # per source: named after the modality
                key = key[:-2] + "_" + names[int(key[-1]) - 1]
            row[key] = value
        rows.append(row)
    numeric = [name for name in rows[0] if name not in ("case", "subject", "split", "slices")]
    mean_row: Dict[str, Any] = {"case": "mean", "subject": "", "split": split_name,
                                "slices": int(sum(r["slices"] for r in rows))}
    for name in numeric:
        mean_row[name] = float(np.mean([r[name] for r in rows]))
    return rows, mean_row, split_name


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class _Trainer:
    """The training loop and its state (model, optimizer, scheduler, history, best epoch), and the
    final evaluation.

    The other concerns of a run are units of their own: where it writes (:class:`RunPaths`), the
    data it trains on (:func:`load_training_data` → :class:`TrainingData`), how the trained model is
    evaluated (:func:`evaluation_table`, :func:`evaluate_case`), above in this module; saving and
    resuming through the checkpoint writer and loader (:mod:`FusionINNLib.train.checkpoints`), the
    model's metadata (:mod:`FusionINNLib.train.metadata`) and the loss-curve plot
    (:mod:`FusionINNLib.train.plot`), in modules of their own.
    """

    def __init__(self, config: TrainingConfig, progress: Optional[ProgressFn], log: Optional[LogFn],
                 cancel: Optional[CancelFn]):
        self.config = config
        self._progress = progress
        self._log = log
        self.cancel = cancel
        self.resume_point: Optional[checkpoints.ResumePoint] = None
        self.resume_state: Optional[Dict[str, Any]] = None  # resume_point.state, what the data loader reads
        self.paths: Optional[RunPaths] = None  # set by _run
        self.data: Optional[TrainingData] = None  # set by _run

    # -- messages ----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.dist.is_main:
            return
        if self._log is not None:
            self._log(message)
        else:
            LOGGER.info(message)

    def progress(self, fraction: float, message: str) -> None:
        if self._progress is not None and self.dist.is_main:
            self._progress(min(max(fraction, 0.0), 1.0), message)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("training cancelled by the user; the last finished epoch is in last.pt")

    # -- setup -------------------------------------------------------------------------------
    def load_resume(self) -> None:
        """Read the checkpoint to resume and take its settings (except ``checkpoints.RESUME_OVERRIDABLE``)."""
        point = checkpoints.read_resume(self.config.resume)  # type: ignore[arg-type]
        saved = TrainingConfig.from_dict(point.state["config"])
        self.config = checkpoints.resumed_config(saved, self.config, point.path)
        self.resume_point = point
        self.resume_state = point.state

    def build(self) -> None:
        c = self.config
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device(f"cuda:{self.dist.local_rank}")
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
            if self.dist.enabled:
                # Ranks on one machine would otherwise each start one thread per core.
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.dist.world_size)))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        self.memory_format = torch.channels_last
        model_config = c.model_config()
        multiple = model_config.pad_multiple
        self.train_set = SliceDataset(self.data.train_data, multiple, c.crop_size, c.crops_per_slice, c.seed,
                                      subset=c.max_train_slices, jitter=c.intensity_jitter)
        self.val_set = SliceDataset(self.data.val_data, multiple, None, 1, c.seed, subset=c.max_val_slices) \
            if self.data.val_data else None
        self.sampler = torch.utils.data.distributed.DistributedSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
            seed=c.seed, drop_last=False)
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=c.batch_size, sampler=self.sampler, num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        if self.val_set is not None:
            self.val_loader = torch.utils.data.DataLoader(
                self.val_set, batch_size=c.batch_size,
                sampler=_ShardSampler(len(self.val_set), self.dist.rank, self.dist.world_size),
                num_workers=c.num_workers)

        self.flow = FusionFlow(model_config)
        self.flow.set_actnorm_data_init(False)
        self.flow.to(self.device, memory_format=self.memory_format)
        self.step_module: nn.Module = FlowTrainingStep(self.flow)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=c.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=c.lr_factor, patience=c.patience)
        self.amp_dtype: Optional[torch.dtype] = None
        self.scaler = None
        if c.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.amp_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
        elif c.amp:
            self.log("AMP is only used on CUDA; training in float32")

        self.history: List[Dict[str, Any]] = []
        self.start_epoch = 1
        self.best_epoch = 0
        self.best_loss = math.inf
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.stale_epochs = 0
        if self.resume_point is not None:
            state = self.resume_point.state
            checkpoints.restore(self.resume_point, self.flow, self.optimizer, self.scheduler, self.scaler)
            self.history = list(state["history"])
            self.start_epoch = int(state["epoch"]) + 1
            self.best_epoch = int(state["best_epoch"])
            self.best_loss = float(state["best_loss"])
            self.best_state = dict(state["best_state_dict"])
            self.stale_epochs = int(state["stale_epochs"])
            self.log(f"resuming from {self.resume_point.path} after epoch {state['epoch']} "
                     f"(best so far: epoch {self.best_epoch}, loss {self.best_loss:.5f})")
        elif c.init_model:
            checkpoints.load_initial_weights(self.flow, c.init_model, model_config)
            self.log(f"starting from the weights of {c.init_model}")
        else:
            self.sampler.set_epoch(1)
            self.train_set.set_epoch(1)
            first = [self.train_set[i] for i in list(iter(self.sampler))[: c.batch_size]]
            batch = torch.stack(first).to(self.device).contiguous(memory_format=self.memory_format)
            initialize_actnorm(self.flow, batch)
        if self.dist.enabled:
            # DDP's constructor broadcasts rank 0's parameters, so the ActNorm statistics of rank 0's
            # first batch are what every rank starts from.
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.step_module, device_ids=device_ids)

    # -- one pass ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _losses(self, x: torch.Tensor, z_generator: torch.Generator, latent_generator: torch.Generator
                ) -> Dict[str, torch.Tensor]:
        c = self.config
        z_fresh = sample_prior(c.prior, (x.shape[0], 1, *x.shape[2:]), z_generator, self.device)
        z_fresh = z_fresh.contiguous(memory_format=self.memory_format)
        with self._autocast():
            y, z, x_hat = self.step_module(x, z_fresh)
        y = y.float()
        if c.adaptive_weights:
            ssim_w, l2_w = adaptive_weights(x)
        else:
            ssim_w, l2_w = c.modality_weights, c.modality_weights
        # y = σ(u) lies in (0, 1) but normalized sources do not (the robust volume map puts the
        # background below 0 and bright tumour above 1); comparing y with values it cannot reach
        # makes SSIM's luminance term ≈ 0 over the whole background and drives u to −∞ there. The
        # fused image is therefore compared with the sources clipped to [m, 1 − m]: the optimum
        # stays at |u| <= 6.9, far from float32 saturation. The decomposition is compared with the
        # unclipped sources.
        targets = x.clamp(FUSION_TARGET_MARGIN, 1.0 - FUSION_TARGET_MARGIN)
        fusion = fusion_loss(y, targets, c.lam, ssim_w, l2_w)
        grad = gradient_loss(y, targets) if c.gradient_weight > 0 else x.new_zeros(())
        piella = piella_loss(y, targets) if c.piella_weight > 0 else x.new_zeros(())
        dec = decomposition_loss(x_hat.float(), x, c.lam, c.modality_weights)
        latent = latent_loss(c.latent_loss, z.float(), c.prior, latent_generator) \
            if c.latent_loss != "none" else x.new_zeros(())
        total = c.alpha * (fusion.total + c.gradient_weight * grad + c.piella_weight * piella
                           + c.latent_weight * latent) \
            + (1.0 - c.alpha) * dec.total
        return {"loss": total, "fusion": fusion.total, "fusion_ssim": fusion.ssim, "fusion_l2": fusion.l2,
                "fusion_grad": grad, "fusion_piella": piella, "latent": latent, "dec": dec.total,
                "dec_ssim": dec.ssim, "dec_l2": dec.l2}

    def _generators(self, *parts: int) -> Tuple[torch.Generator, torch.Generator]:
        z_generator = torch.Generator(device=self.device) if self.device.type != "mps" else torch.Generator()
        z_generator.manual_seed(derived_seed(self.config.seed, *parts, 1))
        latent_generator = torch.Generator().manual_seed(derived_seed(self.config.seed, *parts, 2))
        return z_generator, latent_generator

    def train_epoch(self, epoch: int, epoch_start: float) -> Tuple[Dict[str, float], int, List[int]]:
        c = self.config
        self.step_module.train()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        seen = list(iter(self.sampler))
        z_generator, latent_generator = self._generators(epoch, self.dist.rank)
        sums = dict.fromkeys(LOSS_PARTS, 0.0)
        count = 0
        skipped = 0
        steps = len(self.train_loader)
        for step, batch in enumerate(self.train_loader, start=1):
            self.check_cancel()
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            terms = self._losses(x, z_generator, latent_generator)
            loss = terms["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            max_norm = c.grad_clip if c.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), max_norm)
            finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(grad_norm).item())
            if self.dist.enabled:
                # Every rank must take the same decision, or the replicas drift apart.
                finite = self.dist.sum([0.0 if finite else 1.0])[0] == 0.0
            if not finite:
                skipped += 1
                self.log(f"epoch {epoch} step {step}: non-finite loss or gradient "
                         f"(loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}); "
                         f"step skipped, weights unchanged")
                if self.scaler is not None:
                    self.scaler.update()  # lowers the loss scale after an fp16 overflow
                continue
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            size = x.shape[0]
            for key in LOSS_PARTS:
                sums[key] += float(terms[key].detach()) * size
            count += size
            done = (epoch - 1 + step / steps) / c.epochs
            elapsed = time.perf_counter() - epoch_start
            eta_epoch = elapsed / step * (steps - step)
            self.progress(done, f"epoch {epoch}/{c.epochs} step {step}/{steps} loss {float(loss.detach()):.4f} "
                                f"(epoch ETA {_format_duration(eta_epoch)})")
        totals = self.dist.sum([sums[k] for k in LOSS_PARTS] + [count, skipped])
        count_all, skipped_all = totals[-2], int(totals[-1])
        means = {k: (totals[i] / count_all if count_all else math.nan) for i, k in enumerate(LOSS_PARTS)}
        return means, skipped_all, seen

    def validate(self) -> Optional[Dict[str, float]]:
        if self.val_set is None:
            return None
        self.step_module.eval()
        # The same latents every epoch (seeded by rank only), so validation losses are comparable.
        z_generator, latent_generator = self._generators(0, self.dist.rank, 7)
        sums = dict.fromkeys(LOSS_PARTS, 0.0)
        count = 0
        with torch.no_grad():
            for batch in self.val_loader:
                self.check_cancel()
                x = batch.to(self.device).contiguous(memory_format=self.memory_format)
                terms = self._losses(x, z_generator, latent_generator)
                for key in LOSS_PARTS:
                    sums[key] += float(terms[key]) * x.shape[0]
                count += x.shape[0]
        totals = self.dist.sum([sums[k] for k in LOSS_PARTS] + [count])
        return {k: totals[i] / totals[-1] for i, k in enumerate(LOSS_PARTS)}

    # -- outputs ---------------------------------------------------------------------------------
    def history_columns(self) -> List[Tuple[str, str]]:
        columns = [("epoch", "int")]
        columns += [(f"train_{k}", "double") for k in LOSS_PARTS]
        if self.val_set is not None:
            columns += [(f"val_{k}", "double") for k in LOSS_PARTS]
        columns += [("lr", "double"), ("seconds", "double"), ("skipped_steps", "int"), ("best", "int")]
        return columns

    def metadata(self, metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return model_metadata(self.config, self.data, best_epoch=self.best_epoch, best_loss=self.best_loss,
                              validated=self.val_set is not None, epochs_run=len(self.history),
                              world_size=self.dist.world_size, metrics=metrics)

    def save_last(self, epoch: int) -> None:
        state = checkpoints.training_state(
            config=self.config.to_dict(), epoch=epoch, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, history=self.history, best_epoch=self.best_epoch, best_loss=self.best_loss,
            best_state=self.best_state, stale_epochs=self.stale_epochs, train_cases=self.data.train_cases,
            val_cases=self.data.val_cases, data_summary=self.data.data_summary)
        checkpoints.save_last(self.paths.run_dir, self.flow, self.metadata(), state)

    def write_partition(self, epoch: int, seen: List[int]) -> None:
        ranks = self.dist.gather({"rank": self.dist.rank, "samples": seen,
                                  "parameter_checksum": _parameter_checksum(self.flow)})
        if not self.dist.is_main:
            return
        record = {"world_size": self.dist.world_size, "backend": self.dist.backend, "epoch": epoch,
                  "dataset_size": len(self.train_set),
                  "items": [list(self.train_set.describe(i)) for i in range(len(self.train_set))],
                  "ranks": ranks}
        atomic_write_text(self.paths.run_dir / "partition.json", json.dumps(record) + "\n")

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        c = self.config
        if c.resume:
            self.load_resume()
        self.config.validate()
        c = self.config
        self.device = select_device(c.device)
        if self.device.type == "mps" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            self.device = torch.device("cpu")  # torch.distributed has no MPS backend
        self.dist = distributed_context(self.device)
        try:
            return self._run()
        finally:
            self.dist.close()

    def _run(self) -> TrainingResult:
        c = self.config
        self.paths = RunPaths.resolve(c)
        self.paths.check(self.log)
        self.data = load_training_data(c, self.paths, self.dist, self.resume_state, self.log)
        self.build()
        self.log(f"training on {self.device}" + (f" x {self.dist.world_size} ranks ({self.dist.backend})"
                                                  if self.dist.enabled else "")
                 + f": {len(self.train_set)} samples per epoch"
                 + (f" ({c.crop_size}x{c.crop_size} crops)" if c.crop_size else "")
                 + f", batch {c.batch_size}, epochs {self.start_epoch}-{c.epochs}, latent loss {c.latent_loss}")
        run_start = time.perf_counter()
        stopped_early = False
        epochs_this_run = 0
        for epoch in range(self.start_epoch, c.epochs + 1):
            epoch_start = time.perf_counter()
            train_means, skipped, seen = self.train_epoch(epoch, epoch_start)
            val_means = self.validate()
            monitored = val_means["loss"] if val_means is not None else train_means["loss"]
            lr = float(self.optimizer.param_groups[0]["lr"])
            if math.isfinite(monitored):
                self.scheduler.step(monitored)
            improved = math.isfinite(monitored) and monitored < self.best_loss
            if improved:
                self.best_loss = monitored
                self.best_epoch = epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.flow.graph.state_dict().items()}
                self.stale_epochs = 0
            else:
                self.stale_epochs += 1
            seconds = time.perf_counter() - epoch_start
            row: Dict[str, Any] = {"epoch": epoch, "lr": lr, "seconds": seconds, "skipped_steps": skipped,
                                   "best": int(improved)}
            row.update({f"train_{k}": v for k, v in train_means.items()})
            if val_means is not None:
                row.update({f"val_{k}": v for k, v in val_means.items()})
            self.history.append(row)
            epochs_this_run += 1
            if self.dist.enabled:
                self.write_partition(epoch, seen)
            if self.dist.is_main:
                write_table(self.paths.history_path, self.history_columns(), self.history)
                if improved:
                    checkpoints.save_model(self.paths.run_dir / "best.pt", c.model_config(), self.best_state,
                                           self.metadata())
                self.save_last(epoch)
            elapsed = time.perf_counter() - run_start
            remaining = (c.epochs - epoch) * elapsed / epochs_this_run
            message = (f"epoch {epoch}/{c.epochs}: train {train_means['loss']:.5f}"
                       + (f", val {val_means['loss']:.5f}" if val_means is not None else "")
                       + f" (fusion {train_means['fusion']:.4f}, dec {train_means['dec']:.4f}, "
                         f"latent {train_means['latent']:.3g}), lr {lr:.3g}, {seconds:.1f} s, "
                         f"ETA {_format_duration(remaining)}" + (" *best*" if improved else "")
                       + (f", {skipped} step(s) skipped" if skipped else ""))
            self.log(message)
            self.progress(epoch / c.epochs, message)
            if c.early_stopping is not None and self.stale_epochs >= c.early_stopping:
                self.log(f"early stopping: no improvement for {self.stale_epochs} epochs "
                         f"(best epoch {self.best_epoch})")
                stopped_early = True
                break
        self.dist.barrier()
        if self.best_state is None:
            from ..core.errors import TrainingDivergedError

            raise TrainingDivergedError(detail="training produced no finite loss in any epoch; no model written "
                                               "(check the data)")
        return self.finish(stopped_early)

    def finish(self, stopped_early: bool) -> TrainingResult:
        c = self.config
        best_flow = FusionFlow(c.model_config())
        best_flow.graph.load_state_dict(self.best_state)
        best_flow.eval()
        rows: List[Dict[str, Any]] = []
        mean_row: Dict[str, Any] = {}
        if self.dist.is_main:
            rows, mean_row, split_name = evaluation_table(best_flow, self.data, c, str(self.device), self.check_cancel)
            numeric = [name for name in rows[0] if name not in ("case", "subject", "split", "slices")]
            columns = [("case", "string"), ("subject", "string"), ("split", "string"), ("slices", "int")]
            columns += [(name, "double") for name in numeric]
            write_table(self.paths.metrics_path, columns, rows + [mean_row])
            metrics = {k: v for k, v in mean_row.items() if k not in ("case", "subject")}
            metrics["samples"] = c.metric_samples
            checkpoints.save_model(self.paths.output, c.model_config(), self.best_state, self.metadata(metrics))
            plot_path = write_plot(self.history, self.paths.plot_path, self.log)
            self.log(f"best epoch {self.best_epoch} (loss {self.best_loss:.5f}); wrote {self.paths.output}, "
                     f"{self.paths.history_path}, {self.paths.metrics_path}")
            summary = ", ".join(f"{k} {v:.4f}" for k, v in mean_row.items() if isinstance(v, float))
            self.log(f"{split_name} metrics (mean over {len(rows)} case(s)): {summary}")
        else:
            plot_path = self.paths.plot_path
        self.dist.barrier()
        dec_ssim = [v for k, v in mean_row.items() if k.startswith("decomposition_ssim_")]
        return TrainingResult(
            best_epoch=self.best_epoch, best_val_loss=self.best_loss,
            mean_decomposition_ssim=float(np.mean(dec_ssim)) if dec_ssim else math.nan,
            model_path=self.paths.output, history_path=self.paths.history_path, metrics_path=self.paths.metrics_path,
            run_dir=self.paths.run_dir, plot_path=plot_path, epochs_run=len(self.history),
            stopped_early=stopped_early,
            metrics={k: v for k, v in mean_row.items() if isinstance(v, float)})


def train(config: TrainingConfig, progress: Optional[ProgressFn] = None, log: Optional[LogFn] = None,
          cancel: Optional[CancelFn] = None) -> TrainingResult:
    """Train a FusionINN model as ``config`` says; see the module docstring for what is written.

    ``progress(fraction, message)`` is called after every step and epoch, ``log(message)`` for
    each log line (epoch summaries with ETA, warnings), ``cancel()`` is polled every step and
    raises :class:`~FusionINNLib.core.engine.Cancelled` (the last finished epoch stays in last.pt).
    Invalid settings, unusable data and unwritable outputs raise ``ValueError`` /
    ``FileNotFoundError`` before any training step.
    """
    return _Trainer(config, progress, log, cancel).run()


__all__ = ["TrainingConfig", "TrainingResult", "train", "write_table", "schema_path",
           "evaluate_case", "initialize_actnorm", "FlowTrainingStep", "SliceDataset", "psnr",
           "mean_slice_ssim", "FORMAT_VERSION"]
