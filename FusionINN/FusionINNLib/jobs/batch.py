"""Case-level work shared by ``fusioninn batch`` and the Slicer module: fuse every case of a folder.

Finding the pairs
    * by modality (default ``t1ce`` + ``flair``): :func:`FusionINNLib.io.brats.discover_cases`, which
      understands the BraTS namings and reports every case folder it skips (e.g. a missing
      modality) with the reason;
    * by two file-name patterns (``pattern1``/``pattern2``, shell globs matched against file names
      anywhere under the folder): a file matching pattern 1 is paired with the file in the *same
      folder* whose wildcard parts (``*``, ``?``) are the same for pattern 2, so
      ``*_T1c.nii.gz`` + ``*_FLAIR.nii.gz`` pairs ``p01_T1c`` with ``p01_FLAIR`` even when all
      cases share one folder. A file without a partner is reported, never dropped silently.
One case
    read both images → :func:`FusionINNLib.jobs.pipeline.fuse_volumes` (input 2 resampled onto input 1
    when their grids differ) → :func:`FusionINNLib.jobs.pipeline.write_fused` (fused image + JSON record
    sidecar + optional latent, all or nothing) → optionally the metric suite
    (:func:`FusionINNLib.metrics.fusion_metrics`) on (input 1, input 2 on input 1's grid, fused).
The summary
    ``summary.tsv`` in the output folder: one row per case with ``case``, ``status`` (``ok``,
    ``failed``, ``skipped`` or ``cancelled``), ``message``, input/output paths and one column per
    metric. A failing case is recorded and the batch goes on.

:func:`score_volumes` (= :func:`FusionINNLib.metrics.scoring.score_fusion`, the one scorer) and
:func:`baseline_fusions` are the triple-level helpers the score job (:mod:`FusionINNLib.jobs`) uses
as well, so the GUI and the command line score a fusion identically.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..core.choices import BASELINE_METHODS  # noqa: F401 - defined once, re-exported
from ..core.errors import OptionError
from ..io.atomic import atomic_write_text
from ..io.volume import Volume
from ..metrics.scoring import align_to_reference, baseline_fusions, difference_volume  # noqa: F401 - their home is scoring

PathLike = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]
STATUSES = ("ok", "failed", "skipped", "cancelled")
OUTPUT_FORMATS = ("nii.gz", "nrrd", "mha")
SUMMARY_NAME = "summary.tsv"
BASE_COLUMNS = ("case", "status", "message", "input1", "input2", "output", "latent")


@dataclass
class BatchCase:
    case_id: str
    input1: Path
    input2: Path


@dataclass
class CaseOutcome:
    case_id: str
    status: str
    message: str = ""
    input1: Optional[Path] = None
    input2: Optional[Path] = None
    output: Optional[Path] = None
    latent: Optional[Path] = None
    metrics: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown case status {self.status!r}")


@dataclass
class BatchResult:
    outcomes: List[CaseOutcome]
    summary_path: Path
    cancelled: bool = False

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def succeeded(self) -> int:
        return self.count("ok")

    def describe(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in STATUSES if self.count(s)]
        return f"{len(self.outcomes)} case(s): {', '.join(parts) or 'none'}; summary: {self.summary_path}"


# -- finding the pairs ------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern:
    """A shell glob as a regex whose groups capture what each ``*`` and ``?`` matched."""
    if not pattern or "/" in pattern or "\\" in pattern:
        raise ValueError(f"file-name pattern must be a non-empty glob without folders, got {pattern!r}")
    parts: List[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            parts.append("(.*)")
        elif char == "?":
            parts.append("(.)")
        elif char == "[":
            end = pattern.find("]", index + 2)
            if end < 0:
                parts.append(re.escape(char))
            else:
                body = pattern[index + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                parts.append(f"[{body}]")
                index = end
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts) + r"\Z")


def _visible_files(root: Path) -> List[Path]:
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names) if not name.startswith("."))
    return files


def _case_label(root: Path, folder: Path, captures: Tuple[str, ...]) -> str:
    relative = folder.relative_to(root).as_posix()
    pieces = ([] if relative == "." else [relative]) + [c for c in captures if c]
    return "/".join(pieces) or root.name or "case"


def find_pattern_cases(root: PathLike, pattern1: str, pattern2: str) -> Tuple[List[BatchCase], List[Tuple[Path, str]]]:
    """Pairs of files matching ``pattern1``/``pattern2`` (see module docstring) and the unpaired files."""
    root_path = Path(root)
    if pattern1 == pattern2:
        raise OptionError(rule="differ", options=("pattern1", "pattern2"))
    regex1, regex2 = _glob_regex(pattern1), _glob_regex(pattern2)
    if regex1.groups != regex2.groups:
        raise ValueError(f"patterns {pattern1!r} and {pattern2!r} must have the same wildcards (* and ?) "
                         "so that partners can be matched")
    first: Dict[Tuple[Path, Tuple[str, ...]], Path] = {}
    second: Dict[Tuple[Path, Tuple[str, ...]], Path] = {}
    skipped: List[Tuple[Path, str]] = []
    for path in _visible_files(root_path):
        match1, match2 = regex1.match(path.name), regex2.match(path.name)
        if match1 and match2:
            skipped.append((path, f"matches both {pattern1!r} and {pattern2!r}; rename it or make the patterns "
                                  "more specific"))
        elif match1:
            first[(path.parent, match1.groups())] = path
        elif match2:
            second[(path.parent, match2.groups())] = path
    cases = []
    for key in sorted(first, key=lambda k: (str(k[0]), k[1])):
        if key in second:
            cases.append(BatchCase(_case_label(root_path, key[0], key[1]), first[key], second.pop(key)))
        else:
            skipped.append((first[key], f"no file matching {pattern2!r} with the same name parts next to it"))
    for path in sorted(second.values(), key=str):
        skipped.append((path, f"no file matching {pattern1!r} with the same name parts next to it"))
    return cases, skipped


def find_batch_cases(root: PathLike, modalities: Sequence[str] = ("t1ce", "flair"),
                     pattern1: Optional[str] = None, pattern2: Optional[str] = None
                     ) -> Tuple[List[BatchCase], List[Tuple[Path, str]]]:
    """The cases to fuse under ``root`` and the folders/files skipped with the reason.

    Uses the two patterns when given (both are required together), else BraTS case discovery with
    the two ``modalities``. Raises FileNotFoundError for a missing folder and ValueError when no
    case at all is found (the message lists what was skipped and why).
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"{root_path}: input folder not found")
    if not root_path.is_dir():
        raise ValueError(f"{root_path}: is a file; give the folder that holds the cases")
    if (pattern1 is None) != (pattern2 is None):
        raise OptionError(rule="both", options=("pattern1", "pattern2"))
    if pattern1 is not None:
        cases, skipped = find_pattern_cases(root_path, pattern1, pattern2)
        if not cases:
            detail = "".join(f"\n  - {path}: {reason}" for path, reason in skipped[:20])
            raise ValueError(f"no pair of files matching {pattern1!r} and {pattern2!r} under {root_path}{detail}")
        return cases, skipped
    if len(modalities) != 2:
        raise ValueError(f"batch fusion needs exactly two modalities, got {list(modalities)}")
    from ..io.brats import LOGGER as discovery_logger
    from ..io.brats import discover_cases

    # The batch reports skipped folders itself (summary rows and its log, which --quiet silences);
    # discovery's own warning would print them a second time, past --quiet.
    level = discovery_logger.level
    discovery_logger.setLevel(logging.ERROR)
    try:
        found = discover_cases(root_path, tuple(modalities))
    finally:
        discovery_logger.setLevel(level)
    cases = [BatchCase(case.case_id, Path(case.paths[modalities[0]]), Path(case.paths[modalities[1]]))
             for case in found.cases]
    return cases, [(Path(path), reason) for path, reason in found.skipped]


# -- one triple -------------------------------------------------------------------------------
def score_volumes(volume1: Volume, volume2: Volume, fused: Volume, *, mask: Optional[Volume] = None,
                  paper_compatible: bool = False, data_range: Optional[float] = None, axis: int = 0) -> dict:
    """The metric suite of one triple: :func:`FusionINNLib.metrics.scoring.score_fusion`, the one scorer
    (input 2 and the mask onto input 1's grid, the fused image on it; see that module's policy)."""
    from ..metrics.scoring import score_fusion

    return score_fusion(volume1, volume2, fused, mask=mask, paper_compatible=paper_compatible,
                        data_range=data_range, axis=axis)


# -- the batch --------------------------------------------------------------------------------
def safe_file_stem(case_id: str) -> str:
    """A file-name stem for a case id (folder separators and unsafe characters become ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", case_id).strip("._")
    return stem or "case"


def _output_paths(cases: Sequence[BatchCase], output_dir: Path, output_format: str
                  ) -> List[Tuple[Path, Path]]:
    """(fused, latent) per case; stems made unique when two case ids sanitise to the same name."""
    used: Dict[str, int] = {}
    paths = []
    for case in cases:
        stem = safe_file_stem(case.case_id)
        count = used.get(stem.lower(), 0) + 1
        used[stem.lower()] = count
        if count > 1:
            stem = f"{stem}_{count}"
        paths.append((output_dir / f"{stem}_fused.{output_format}", output_dir / f"{stem}_latent.{output_format}"))
    return paths


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".6g")
    return " ".join(str(value).split())  # no tabs or newlines inside a cell


def write_summary(outcomes: Sequence[CaseOutcome], path: PathLike,
                  metric_names: Sequence[str] = ()) -> Path:
    """The summary TSV, written atomically (temp file beside the target, then rename)."""
    path = Path(path)
    names = list(metric_names)
    for outcome in outcomes:
        names += [n for n in outcome.metrics if n not in names]
    lines = ["\t".join(list(BASE_COLUMNS) + names)]
    for o in outcomes:
        row = [o.case_id, o.status, o.message, o.input1, o.input2, o.output, o.latent]
        row += [o.metrics.get(n) for n in names]
        lines.append("\t".join(_cell(v) for v in row))
    # Slicer's table reader (vtkMRMLTableStorageNode) types the columns from the .schema.tsv
    # sidecar; without it every column, the metrics too, loads as text. Written first, so that a
    # summary is never there without its schema.
    schema = ["columnName\ttype"] + [f"{name}\tstring" for name in BASE_COLUMNS] + [f"{name}\tdouble" for name in names]
    atomic_write_text(summary_schema_path(path), "\n".join(schema) + "\n")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def summary_schema_path(path: PathLike) -> Path:
    """``summary.tsv`` → ``summary.schema.tsv`` (Slicer's table-schema sidecar)."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.schema{path.suffix or '.tsv'}")


def read_summary(path: PathLike) -> List[Dict[str, str]]:
    """The rows of a summary TSV as dicts (for tests and for re-running failed cases)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty summary file")
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def run_batch(root: PathLike, output_dir: PathLike, *, modalities: Sequence[str] = ("t1ce", "flair"),
              pattern1: Optional[str] = None, pattern2: Optional[str] = None, keep_latent: bool = False,
              metrics: bool = False, paper_compatible: bool = False, model: Optional[PathLike] = None,
              device: str = "auto", batch_size: int = 8, axis: int = 0, normalization: str = "volume",
              output_format: str = "nii.gz", summary_name: str = SUMMARY_NAME,
              progress: Optional[Callable[[float], None]] = None, cancel: Optional[Callable[[], bool]] = None,
              log: Log = print) -> BatchResult:
    """Fuse every case under ``root`` into ``output_dir`` and write the summary TSV there.

    The model is loaded once. A case that fails (unreadable image, inputs that do not overlap, ...)
    becomes a ``failed`` row with the error message and the batch continues; cases discovery
    skipped become ``skipped`` rows. When ``cancel()`` turns true the current case stops, the
    remaining ones are marked ``cancelled`` and the summary is still written.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks share the cases (rank r fuses cases r, r + W,
    ...; on CUDA each rank uses its ``LOCAL_RANK`` GPU), their outcomes are gathered (gloo, or the
    group the caller has set up), every rank returns the whole result and rank 0 alone writes the
    one summary, in discovery order, identical to a single-process run's.
    """
    from ..core.engine import Cancelled
    from ..io.checkpoint import LoadedModel, resolve_model
    from ..io.volume import read_volume
    from .pipeline import fuse_volumes, write_fused

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    cases, skipped = find_batch_cases(root, modalities, pattern1, pattern2)
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: output folder is not writable")
    loaded = model if isinstance(model, LoadedModel) else resolve_model(model)
    if loaded.origin == "random":
        log("warning: no trained model found (bundled model missing, no model file chosen): "
            "using an untrained random model")

    ranks = _BatchRanks.from_environment(device)
    device = ranks.device
    skipped_rows = [CaseOutcome(str(path), "skipped", reason) for path, reason in skipped]
    outcomes: List[CaseOutcome] = list(skipped_rows)
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    metric_names: List[str] = []
    cancelled = False
    total = len(cases)
    mine = [n for n in range(total) if n % ranks.world == ranks.rank]
    numbered: List[Tuple[int, CaseOutcome]] = []
    for number, (case, (fused_path, latent_path)) in enumerate(zip(cases, _output_paths(cases, out, output_format))):
        if number % ranks.world != ranks.rank:
            continue  # another rank's case
        outcome = CaseOutcome(case.case_id, "ok", input1=case.input1, input2=case.input2)
        if cancelled or (cancel is not None and cancel()):
            cancelled = True
            outcome.status, outcome.message = "cancelled", "batch cancelled before this case"
            outcomes.append(outcome)
            numbered.append((number, outcome))
            continue

        def case_progress(fraction: float, position: int = mine.index(number)) -> None:
            if progress is not None:
                progress((position + min(max(fraction, 0.0), 1.0)) / max(len(mine), 1))

        try:
            if fused_path.resolve() in (case.input1.resolve(), case.input2.resolve()):
                raise ValueError(f"{fused_path}: output would overwrite an input file")
            volume1, volume2 = read_volume(case.input1), read_volume(case.input2)
            result = fuse_volumes(volume1, volume2, loaded, axis=axis, normalization=normalization,
                                  keep_latent=keep_latent, device=device, batch_size=batch_size,
                                  progress=case_progress, cancel=cancel, log=lambda message: None,
                                  input_names=(str(case.input1), str(case.input2)))
            write_fused(result, fused_path, latent_path if keep_latent else None)
            outcome.output = fused_path
            outcome.latent = latent_path if keep_latent else None
            notes = list(result.notes)
            if metrics:
                try:
                    scores = score_volumes(volume1, volume2, result.fused, paper_compatible=paper_compatible,
                                           axis=axis)
                    outcome.metrics = dict(scores["summary"])
                    # the fusion has noted the resampling already; the slice count is the same every case
                    notes += [f"metrics: {note}" for note in scores["notes"]
                              if not note.startswith(("averaged over", "input 2 resampled"))]
                    metric_names += [n for n in outcome.metrics if n not in metric_names]
                except Exception as error:  # noqa: BLE001 - the fused output is fine; report the metrics
                    notes.append(f"metrics failed: {' '.join(str(error).split())}")
            outcome.message = "; ".join(notes)
        except Cancelled:
            cancelled = True
            outcome.status, outcome.message = "cancelled", "cancelled during this case; nothing written for it"
        except Exception as error:  # noqa: BLE001 - one bad case must not stop the batch
            outcome.status = "failed"
            outcome.message = " ".join(str(error).split()) or type(error).__name__
        except BaseException:
            # Ctrl-C or SIGTERM (the command line raises for it): the case's files were never
            # renamed into place; the summary still lists what was done before it goes on up.
            outcome.status, outcome.message = "cancelled", "interrupted during this case; nothing written for it"
            outcomes.append(outcome)
            for later in cases[number + 1:]:
                outcomes.append(CaseOutcome(later.case_id, "cancelled", "batch interrupted before this case",
                                            input1=later.input1, input2=later.input2))
            if ranks.world == 1:
                write_summary(outcomes, out / summary_name, metric_names)
            raise
        outcomes.append(outcome)
        numbered.append((number, outcome))
        log(f"[{number + 1}/{total}] {case.case_id}: {outcome.status}"
            + (f" ({outcome.message})" if outcome.message else ""))
        case_progress(1.0)
    summary_path = out / summary_name
    if ranks.world > 1:
        gathered = ranks.gather((numbered, metric_names, cancelled))
        numbered = sorted((pair for part in gathered for pair in part[0]), key=lambda pair: pair[0])
        metric_names = [name for part in gathered for name in part[1]]
        metric_names = list(dict.fromkeys(metric_names))
        cancelled = any(part[2] for part in gathered)
        outcomes = skipped_rows + [outcome for _, outcome in numbered]
    if ranks.rank == 0:
        write_summary(outcomes, summary_path, metric_names)
    ranks.close()
    return BatchResult(outcomes, summary_path, cancelled)


@dataclass
class _BatchRanks:
    """This process's share of a batch under ``torchrun`` (one rank, the whole batch, otherwise)."""

    rank: int = 0
    world: int = 1
    device: str = "auto"
    created_group: bool = False

    @classmethod
    def from_environment(cls, device: str) -> _BatchRanks:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls(device=device)
        import torch
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0") or 0)
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        created = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # only Python objects travel: gloo suits any device
            created = True
        return cls(dist.get_rank(), dist.get_world_size(), device, created)

    def gather(self, value):
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, value)
        return parts

    def close(self) -> None:
        if self.created_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
