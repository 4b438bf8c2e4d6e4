"""BraTS data: case discovery across namings, subject-level split, slice selection and caching.

Discovery (``discover_cases``)
    Walks a directory tree and treats every folder that *directly* holds image files
    (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) named after a modality as a
    case folder. A file name (extension removed) is split into alphanumeric tokens at ``_``, ``-``,
    ``.`` and spaces, and a modality matches a whole token (or two adjacent tokens written
    together, so ``t1_gd`` reads as ``t1gd``) from ``MODALITY_ALIASES``, case-insensitively. Whole-token
    matching is what keeps ``t1`` from matching ``t1ce``/``t1c``, ``t2`` from matching ``t2f`` and
    ``brainmask`` from being anything. The namings this covers:

    ============================  ======================================================
    BraTS 2018-2021               ``BraTS2021_00000_t1ce.nii.gz``, ``_flair``, ``_t1``, ``_t2``, ``_seg``
    BraTS 2023+                   ``BraTS-GLI-00001-000-t1c.nii.gz``, ``-t2f``, ``-t1n``, ``-t2w``, ``-seg``
    BraTS 2013/2015 exports       ``T1c_subtrMeanDivStd.nii.gz``, ``Flair_*``, ``OTMultiClass.nii.gz``;
                                  original 2015 ``VSD.Brain.XX.O.MR_T1c.54513.mha``, ``...O.OT...``
    BraTS-Toolkit                 ``*_t1c_*``, ``*_fla_*``, ``*_t1_*``, ``*_t2_*``
    ============================  ======================================================

    A folder holding several files of one modality (all cases in one flat folder) is split into
    cases by the file name with the modality token removed (``BraTS2021_00000_t1ce`` → case
    ``BraTS2021_00000``). Symbolic links to folders are followed, but every folder is visited once
    (by device and inode), so link loops end. Hidden files and folders (leading ``.``) are ignored,
    which also hides half-written temporary files. Every case folder that lacks a requested
    modality, or holds two candidates for one, is reported in ``DiscoveryResult.skipped`` with the
    reason; nothing is dropped silently.

Subjects and split (``split_subjects``)
    BraTS 2023 names a case ``BraTS-GLI-00001-000`` where the last number is the time point, so
    the subject is ``BraTS-GLI-00001``; BraTS 2015 names such as ``brats_tcia_pat123_1`` carry a
    scan index after the patient number, so the subject is ``brats_tcia_pat123``. Otherwise the
    case name is the subject. The split draws whole subjects, so two time points of one patient
    always land on the same side (the reference implementation split *slices*, which leaks
    patients between training and validation).

Slice selection (``select_slices``)
    The paper keeps the axial slices whose annotation contains necrotic core / non-enhancing
    tumour and oedema. A label rule is a conjunction of alternatives: ``((2,), (1, 3))`` means
    "contains label 2 (oedema) AND at least one of labels 1 (necrosis) or 3 (non-enhancing
    tumour in BraTS 2013-2017 numbering)", which is the default, ``DEFAULT_LABEL_RULE``.
    In BraTS 2018-2021, label 1 already merges necrosis and non-enhancing tumour and 3 is unused;
    in BraTS 2023, label 3 is the *enhancing* tumour, so pass ``"2,1"`` there for the paper's
    strict choice. Without a segmentation (or with ``labels=None``) the brain-content rule applies:
    a slice qualifies when at least ``min_fraction`` of its pixels are foreground in *both*
    modalities (foreground as in ``normalization.foreground_mask``: not the background value 0 or,
    for z-scored exports, the volume minimum).

Caching (``load_case_slices``)
    The selected, normalised slices of a case are stored as one ``.npy`` array (2, N, H, W) plus
    a JSON side-car with the slice indices, keyed by a SHA-256 over each input file's size,
    modification time and first/last 64 KiB, and the settings (modalities, label rule,
    normalization, axis, thresholds, cache format version). A second run maps the ``.npy`` with
    ``np.load(mmap_mode="r")`` instead of decoding the images again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from FusionINNLib.core.normalization import foreground_mask, normalize_volume
from FusionINNLib.io.atomic import atomic_file, atomic_write_text

LOGGER = logging.getLogger(__name__)

# Canonical modality name → accepted spellings (compared case-insensitively with whole tokens).
MODALITY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "t1ce": ("t1ce", "t1c", "t1gd", "t1gad", "t1post"),
    "flair": ("flair", "t2f", "fla", "t2flair"),
    "t1": ("t1", "t1n", "t1w"),
    "t2": ("t2", "t2w"),
    "seg": ("seg", "otmulticlass", "ot", "label"),
}
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

LabelRule = Tuple[Tuple[int, ...], ...]
LabelSpec = Union[str, int, Sequence[Union[int, Sequence[int]]], None]

DEFAULT_LABEL_RULE: LabelRule = ((2,), (1, 3))
DEFAULT_MIN_BRAIN_FRACTION = 0.05
DEFAULT_MIN_LABEL_VOXELS = 1
CACHE_FORMAT_VERSION = 1
_FINGERPRINT_BYTES = 64 * 1024

_TOKEN = re.compile(r"[A-Za-z0-9]+")
_SUBJECT_PATTERNS = (
    re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$"),  # BraTS 2023+: BraTS-GLI-00001-000 (time point)
    re.compile(r"^(.*pat\d+)_\d+$", re.IGNORECASE),  # BraTS 2015: brats_tcia_pat123_1 (scan index)
)


# --------------------------------------------------------------------------------------------
# Modality names
# --------------------------------------------------------------------------------------------
def _alias_table(extra: Iterable[str] = ()) -> Dict[str, str]:
    """Lower-case spelling → canonical modality; requested unknown names map to themselves."""
    table = {alias: canonical for canonical, aliases in MODALITY_ALIASES.items() for alias in aliases}
    for name in extra:
        table.setdefault(name.lower(), name.lower())
    return table


def canonical_modality(name: str) -> str:
    """``"T1c"`` → ``"t1ce"``, ``"t2f"`` → ``"flair"``; unknown names are returned lower-cased."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"modality name must be a non-empty string, got {name!r}")
    key = name.strip().lower()
    return _alias_table().get(key, key)


def _strip_extension(file_name: str) -> Optional[str]:
    lower = file_name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(file_name) > len(extension):
            return file_name[: -len(extension)]
    return None


def _match_modalities(stem: str, table: Dict[str, str]) -> Tuple[set, str]:
    """Canonical modalities named in ``stem`` and the stem with those tokens removed.

    Two adjacent tokens written together are tried before single tokens, so ``T1_Gd`` is
    ``t1gd`` (T1-Gd) rather than ``t1``.
    """
    tokens = [(m.group(0).lower(), m.start(), m.end()) for m in _TOKEN.finditer(stem)]
    found: set = set()
    removed: List[Tuple[int, int]] = []
    index = 0
    while index < len(tokens):
        if index + 1 < len(tokens) and tokens[index][0] + tokens[index + 1][0] in table:
            found.add(table[tokens[index][0] + tokens[index + 1][0]])
            removed.append((tokens[index][1], tokens[index + 1][2]))
            index += 2
            continue
        if tokens[index][0] in table:
            found.add(table[tokens[index][0]])
            removed.append((tokens[index][1], tokens[index][2]))
        index += 1
    residual = stem
    for start, end in reversed(removed):
        residual = residual[:start] + residual[end:]
    residual = re.sub(r"[_\-. ]{2,}", lambda m: m.group(0)[0], residual).strip("_-. ")
    return found, residual


# --------------------------------------------------------------------------------------------
# Cases and discovery
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One co-registered case: the requested modality files (keyed by the names asked for)."""

    subject_id: str
    case_dir: Path
    paths: Dict[str, Path]
    seg: Optional[Path] = None
    case_id: str = ""

    def __post_init__(self) -> None:
        self.case_dir = Path(self.case_dir)
        self.paths = {name: Path(path) for name, path in self.paths.items()}
        self.seg = Path(self.seg) if self.seg is not None else None
        if not self.case_id:
            self.case_id = self.case_dir.name

    def path(self, modality: str) -> Path:
        """File of ``modality`` under any alias (``"t1c"`` finds the ``"t1ce"`` entry)."""
        wanted = canonical_modality(modality)
        for name, path in self.paths.items():
            if canonical_modality(name) == wanted:
                return path
        if wanted == "seg" and self.seg is not None:
            return self.seg
        raise KeyError(f"case {self.case_id} has no {modality!r} image (has {', '.join(self.paths)})")

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "subject_id": self.subject_id,
            "case_dir": str(self.case_dir),
            "paths": {name: str(path) for name, path in self.paths.items()},
            "seg": str(self.seg) if self.seg is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        return cls(
            subject_id=str(data["subject_id"]),
            case_dir=Path(data["case_dir"]),
            paths={str(k): Path(v) for k, v in data["paths"].items()},
            seg=Path(data["seg"]) if data.get("seg") else None,
            case_id=str(data.get("case_id", "")),
        )


@dataclass
class DiscoveryResult:
    """Usable cases (sorted by folder, then name) and the case folders skipped, with reasons."""

    root: Path
    modalities: Tuple[str, ...]
    cases: List[Case] = field(default_factory=list)
    skipped: List[Tuple[Path, str]] = field(default_factory=list)

    @property
    def subjects(self) -> List[str]:
        return sorted({case.subject_id for case in self.cases})

    def summary(self, slice_counts: Optional[Dict[str, int]] = None) -> str:
        """Human-readable report; ``slice_counts`` (case_id → selected slices) adds slice totals."""
        with_seg = sum(case.seg is not None for case in self.cases)
        lines = [
            f"Found {len(self.cases)} case(s) of {len(self.subjects)} subject(s) under {self.root} "
            f"with {' + '.join(self.modalities)}; {with_seg} with a segmentation."
        ]
        if slice_counts:
            counts = np.array([slice_counts.get(case.case_id, 0) for case in self.cases])
            lines.append(
                f"Selected {int(counts.sum())} slice(s): {int(counts.min())}-{int(counts.max())} per case "
                f"(median {float(np.median(counts)):g})."
            )
            empty = [case.case_id for case in self.cases if slice_counts.get(case.case_id, 0) == 0]
            if empty:
                lines.append(f"No slice qualified in {len(empty)} case(s): {', '.join(empty)}")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} case folder(s):")
            lines.extend(f"  - {path}: {reason}" for path, reason in self.skipped)
        return "\n".join(lines)


def subject_id_from_name(name: str, pattern: Optional[str] = None) -> str:
    """Subject of a case name: the first group of ``pattern`` if given and matching, else the
    BraTS 2023 / 2015 rules in the module docstring, else the name itself."""
    patterns = [re.compile(pattern)] if pattern else []
    for regex in (*patterns, *_SUBJECT_PATTERNS):
        match = regex.match(name)
        if match and match.groups() and match.group(1):
            return match.group(1)
    return name


def _walk_directories(root: Path, skipped: List[Tuple[Path, str]]) -> Iterable[Tuple[Path, List[str]]]:
    """Yield (folder, visible file names) depth-first in sorted order, each real folder once."""
    visited: set = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError as error:  # broken link or vanished folder
            skipped.append((folder, f"cannot read folder: {error.strerror or error}"))
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            continue  # symbolic-link loop or a second link to a folder already seen
        visited.add(identity)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((folder, f"cannot list folder: {error.strerror or error}"))
            continue
        files, subfolders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    subfolders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    files.append(entry.name)
            except OSError:
                continue  # dangling link: neither file nor folder
        yield folder, files
        stack.extend(reversed(subfolders))


def _validated_modalities(modalities: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    names = tuple(modalities)
    if not names:
        raise ValueError("at least one modality is needed")
    canonical = [canonical_modality(name) for name in names]
    if "seg" in canonical:
        raise ValueError("'seg' is the segmentation, not an image modality; use require_seg=True")
    duplicates = sorted({c for c in canonical if canonical.count(c) > 1})
    if duplicates:
        raise ValueError(f"modalities {list(names)} name the same image twice ({', '.join(duplicates)})")
    return names


def discover_cases(
    root: os.PathLike | str,
    modalities: Sequence[str] = ("t1ce", "flair"),
    require_seg: bool = False,
    subject_pattern: Optional[str] = None,
) -> DiscoveryResult:
    """Find every case under ``root`` holding all ``modalities`` (any alias, see module doc).

    ``require_seg`` also skips cases without a segmentation. ``subject_pattern`` is an optional
    regular expression whose first group extracts the subject from a case name. Raises
    ``FileNotFoundError`` if ``root`` does not exist and ``ValueError`` if no usable case is found
    (the message lists why folders were skipped).
    """
    names = _validated_modalities(modalities)
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"data directory not found: {root_path}")
    if not root_path.is_dir():
        raise ValueError(f"data path {root_path} is a file; give the directory that holds the cases")
    table = _alias_table(names)
    wanted = {canonical_modality(name): name for name in names}

    result = DiscoveryResult(root=root_path, modalities=names)
    for folder, files in _walk_directories(root_path, result.skipped):
        # file → (canonical modalities, case key) for image files named after some modality
        groups: Dict[str, Dict[str, List[Path]]] = {}
        per_modality: Dict[str, List[Path]] = {}
        ambiguous_files: List[str] = []
        for file_name in files:
            stem = _strip_extension(file_name)
            if stem is None:
                continue
            found, residual = _match_modalities(stem, table)
            if not found:
                continue
            if len(found) > 1:
                ambiguous_files.append(f"{file_name} (names {', '.join(sorted(found))})")
                continue
            (modality,) = found
            per_modality.setdefault(modality, []).append(folder / file_name)
            groups.setdefault(residual, {}).setdefault(modality, []).append(folder / file_name)
        if not per_modality and not ambiguous_files:
            continue  # not a case folder

        candidates = [(folder.name, per_modality)]
        if any(len(paths) > 1 for paths in per_modality.values()) and len(groups) > 1:
            # Several cases in one flat folder: one case per file-name key, provided that at least
            # one key then holds every requested modality. Otherwise the duplicates are more
            # likely alternatives of one case (T1c_a, T1c_b), reported as such for the folder.
            if any(all(len(files_of.get(c, [])) == 1 for c in wanted) for files_of in groups.values()):
                candidates = sorted(groups.items())
        for case_key, files_of in candidates:
            case_key = case_key or folder.name  # files named only by modality ("t1ce.nii.gz")
            label = folder if case_key == folder.name else folder / f"{case_key}*"
            problems = []
            for canonical, name in wanted.items():
                paths = files_of.get(canonical, [])
                if not paths:
                    problems.append(f"no {name} image")
                elif len(paths) > 1:
                    problems.append(f"{len(paths)} candidates for {name}: {', '.join(p.name for p in paths)}")
            segs = files_of.get("seg", [])
            if len(segs) > 1:
                problems.append(f"{len(segs)} candidate segmentations: {', '.join(p.name for p in segs)}")
            elif require_seg and not segs:
                problems.append("no segmentation (required)")
            if ambiguous_files and problems:
                problems.append(f"ignored files naming several modalities: {'; '.join(ambiguous_files)}")
            if problems:
                result.skipped.append((label, "; ".join(problems)))
                continue
            if ambiguous_files:
                LOGGER.warning("%s: ignored files naming several modalities: %s", label, "; ".join(ambiguous_files))
            result.cases.append(
                Case(
                    subject_id=subject_id_from_name(case_key, subject_pattern),
                    case_dir=folder,
                    paths={name: files_of[canonical][0] for canonical, name in wanted.items()},
                    seg=segs[0] if segs else None,
                    case_id=case_key,
                )
            )

    result.cases.sort(key=lambda case: (str(case.case_dir), case.case_id))
    if not result.cases:
        detail = "\n".join(f"  - {path}: {reason}" for path, reason in result.skipped[:20])
        raise ValueError(
            f"no case with {' + '.join(names)} found under {root_path}"
            + (f"; skipped:\n{detail}" if detail else
               " (expected files such as BraTS2021_00000_t1ce.nii.gz, BraTS-GLI-00001-000-t1c.nii.gz"
               " or T1c_*.nii.gz in one folder per case)")
        )
    if result.skipped:
        LOGGER.warning("skipped %d case folder(s) under %s", len(result.skipped), root_path)
    return result


# --------------------------------------------------------------------------------------------
# Subject-level split
# --------------------------------------------------------------------------------------------
def split_subjects(
    cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0
) -> Tuple[List[Case], List[Case]]:
    """Split cases into (train, validation) by subject.

    Subjects are sorted, permuted with ``numpy.random.default_rng(seed)`` and the first
    n_val = round(val_fraction · n_subjects) go to validation, clamped to [1, n_subjects − 1] when
    there are at least two subjects and ``val_fraction > 0`` (so both sides are non-empty). With a
    single subject everything is training data. The result depends only on the set of cases and
    the seed, not on the input order; each side keeps the input's case order.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    subjects = sorted({case.subject_id for case in cases})
    if len(subjects) < 2 or val_fraction == 0:
        if val_fraction > 0:
            LOGGER.warning("only %d subject(s): no validation split possible", len(subjects))
        return list(cases), []
    n_val = int(round(float(val_fraction) * len(subjects)))
    n_val = min(max(n_val, 1), len(subjects) - 1)
    order = np.random.default_rng(seed).permutation(len(subjects))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [case for case in cases if case.subject_id not in val_subjects]
    val = [case for case in cases if case.subject_id in val_subjects]
    return train, val


def write_split(path: os.PathLike | str, train: Sequence[Case], val: Sequence[Case], **extra: object) -> Path:
    """Write the split as JSON (atomically); ``extra`` (e.g. seed, val_fraction) is stored too."""
    record = {
        "format": "fusioninn-split/1",
        **extra,
        "train_subjects": sorted({case.subject_id for case in train}),
        "val_subjects": sorted({case.subject_id for case in val}),
        "train": [case.to_dict() for case in train],
        "val": [case.to_dict() for case in val],
    }
    target = Path(path)
    atomic_write_text(target, json.dumps(record, indent=2, default=str) + "\n")
    return target


def read_split(path: os.PathLike | str) -> Tuple[List[Case], List[Case]]:
    """Cases of a split written by ``write_split`` (e.g. to resume with the same partition)."""
    source = Path(path)
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
        return (
            [Case.from_dict(item) for item in record["train"]],
            [Case.from_dict(item) for item in record["val"]],
        )
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{source} is not a valid split file: {error}") from error


# --------------------------------------------------------------------------------------------
# Slice selection
# --------------------------------------------------------------------------------------------
def parse_label_rule(labels: LabelSpec) -> Optional[LabelRule]:
    """Normalise a label rule to a tuple of alternatives groups (all groups must be present).

    Accepted forms: ``None`` (no label rule: brain-content selection); an int (that label);
    a string with ``,`` for AND and ``|`` for OR, e.g. ``"2,1|3"``; a sequence whose items are
    ints (required labels) or sequences of ints (at least one of them), e.g. ``(2, (1, 3))``.
    Note: a flat sequence such as ``(1, 2, 4)`` requires *all* listed labels; write ``((1, 2, 4),)``
    or ``"1|2|4"`` for "any tumour label".
    """
    if labels is None:
        return None
    try:
        if isinstance(labels, str):
            groups = [
                tuple(int(value) for value in group.split("|") if value.strip())
                for group in labels.replace(" ", "").split(",")
                if group
            ]
        elif isinstance(labels, (int, np.integer)):
            groups = [(int(labels),)]
        else:
            groups = [
                (int(item),) if isinstance(item, (int, np.integer)) else tuple(int(value) for value in item)
                for item in labels
            ]
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid label rule {labels!r}: {error}") from error
    if not groups or any(not group for group in groups):
        raise ValueError(f"invalid label rule {labels!r}: empty group")
    return tuple(groups)


def _per_slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    other_axes = tuple(i for i in range(mask.ndim) if i != axis)
    return np.count_nonzero(mask, axis=other_axes)


def select_slices(
    seg_or_none: Optional[np.ndarray],
    image1: np.ndarray,
    image2: np.ndarray,
    labels: LabelSpec = DEFAULT_LABEL_RULE,
    axis: int = 0,
    min_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    min_label_voxels: int = DEFAULT_MIN_LABEL_VOXELS,
) -> np.ndarray:
    """Indices (int64, ascending) of the slices along ``axis`` to train on.

    With a segmentation and a label rule, slice s qualifies when for every group G of the rule
    some label l ∈ G has at least ``min_label_voxels`` voxels in s (default rule: oedema and
    (necrosis or non-enhancing tumour), see the module docstring). Without a segmentation, or
    with ``labels=None``, slice s qualifies when |F₁ ∩ F₂ ∩ s| ≥ min_fraction · |s|, F_k the
    foreground of image k.
    """
    volume1 = np.asarray(image1)
    volume2 = np.asarray(image2)
    if volume1.ndim != 3 or volume1.shape != volume2.shape:
        raise ValueError(f"need two 3-D images of the same shape, got {volume1.shape} and {volume2.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    axis %= 3
    rule = parse_label_rule(labels)
    if seg_or_none is not None and rule is not None:
        seg = np.asarray(seg_or_none)
        if seg.shape != volume1.shape:
            raise ValueError(f"segmentation shape {seg.shape} differs from image shape {volume1.shape}")
        if np.issubdtype(seg.dtype, np.floating):
            seg = np.rint(seg)  # some exports store labels as float32
        keep = np.ones(volume1.shape[axis], dtype=bool)
        for group in rule:
            present = np.zeros_like(keep)
            for label in group:
                present |= _per_slice_counts(seg == label, axis) >= max(1, int(min_label_voxels))
            keep &= present
        return np.flatnonzero(keep).astype(np.int64)
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    both = foreground_mask(volume1) & foreground_mask(volume2)
    pixels_per_slice = volume1.size // volume1.shape[axis]
    fraction = _per_slice_counts(both, axis) / float(pixels_per_slice)
    return np.flatnonzero(fraction >= float(min_fraction)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Loading slices with a cache
# --------------------------------------------------------------------------------------------
class CaseSlices(tuple):
    """``(slices1, slices2, indices)``; unpacks like a tuple and also carries ``from_cache``,
    ``cache_path`` and ``normalization`` (the two ``NormalizationParams`` as dicts)."""

    from_cache: bool
    cache_path: Optional[Path]
    normalization: List[dict]

    def __new__(
        cls,
        slices1: np.ndarray,
        slices2: np.ndarray,
        indices: np.ndarray,
        from_cache: bool = False,
        cache_path: Optional[Path] = None,
        normalization: Optional[List[dict]] = None,
    ) -> CaseSlices:
        instance = super().__new__(cls, (slices1, slices2, indices))
        instance.from_cache = from_cache
        instance.cache_path = cache_path
        instance.normalization = list(normalization or [])
        return instance

    def __getnewargs__(self):  # pickling (e.g. DataLoader workers) must rebuild all fields
        return (*self, self.from_cache, self.cache_path, self.normalization)


def _read_image(path: Path):
    """The image as a :class:`~FusionINNLib.io.volume.Volume` (voxels *and* geometry) through the one
    image reader, :func:`FusionINNLib.io.volume.read_volume` (its damaged-file checks included); a
    training case needs 3-D scalar images. Errors name the file."""
    from .volume import VolumeError, read_volume

    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        volume = read_volume(path)
    except VolumeError as error:
        reason = str(error)
        if reason.startswith(f"{path}: "):
            reason = reason[len(f"{path}: "):]
        raise ValueError(f"cannot read image {path}: {reason}") from None
    if any("colour image converted" in note for note in volume.notes):
        raise ValueError(f"{path} has colour components per voxel; need a scalar image")
    if volume.is_2d:
        raise ValueError(f"{path} is 2-D; need a 3-D volume")
    return volume


def _file_fingerprint(path: Path) -> str:
    """SHA-256 of size, mtime and the first and last 64 KiB: cheap, and changes when the file does."""
    info = path.stat()
    digest = hashlib.sha256(f"{info.st_size}:{info.st_mtime_ns}".encode())
    with open(path, "rb") as stream:
        digest.update(stream.read(_FINGERPRINT_BYTES))
        if info.st_size > 2 * _FINGERPRINT_BYTES:
            stream.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(stream.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def slice_cache_key(
    files: Sequence[Optional[Path]],
    modalities: Sequence[str],
    rule: Optional[LabelRule],
    normalization: str,
    axis: int,
    min_fraction: float,
    min_label_voxels: int,
) -> str:
    """Hex key of one case's slice cache (see module docstring for what it covers)."""
    material = {
        "version": CACHE_FORMAT_VERSION,
        "files": [_file_fingerprint(Path(f)) if f is not None else None for f in files],
        "modalities": [canonical_modality(m) for m in modalities],
        "rule": [list(group) for group in rule] if rule is not None else None,
        "normalization": normalization,
        "axis": int(axis),
        "min_fraction": float(min_fraction),
        "min_label_voxels": int(min_label_voxels),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def _load_cache(array_path: Path, meta_path: Path, key: str) -> Optional[CaseSlices]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        indices = np.asarray(meta["indices"], dtype=np.int64)
        shape = tuple(int(v) for v in meta["shape"])
        # np.memmap cannot map zero bytes of data, so an empty selection is read normally.
        stack = np.load(array_path, mmap_mode="r" if indices.size else None)
        if stack.shape != shape or stack.shape[1] != indices.size or stack.dtype != np.float32:
            raise ValueError(f"shape {stack.shape} {stack.dtype}, expected {shape} float32")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        LOGGER.warning("ignoring unreadable slice cache %s (%s); rebuilding it", array_path, error)
        return None
    return CaseSlices(stack[0], stack[1], indices, True, array_path, meta.get("normalization"))


def _save_cache(array_path: Path, meta_path: Path, key: str, stack: np.ndarray, indices: np.ndarray,
                normalization: List[dict]) -> None:
    array_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(array_path) as temp, open(temp, "wb") as stream:
        np.save(stream, stack)  # a file object: np.save must not append ".npy" to the temp name
    # The side-car is written last: a cache entry is valid only once both files exist.
    meta = {"key": key, "shape": list(stack.shape), "indices": indices.tolist(), "normalization": normalization}
    atomic_write_text(meta_path, json.dumps(meta))


def load_case_slices(
    case: Case,
    modalities: Sequence[str] = ("t1ce", "flair"),
    *,
    labels: LabelSpec = DEFAULT_LABEL_RULE,
    normalization: str = "volume",
    cache_dir: Optional[os.PathLike | str] = None,
    axis: int = 0,
    min_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    min_label_voxels: int = DEFAULT_MIN_LABEL_VOXELS,
) -> CaseSlices:
    """Selected slices of both modalities, normalised, as float32 arrays (N, H, W).

    Each whole volume is normalised with ``normalize_volume(volume, normalization, axis)`` first
    (so ``"volume"`` uses statistics of the entire brain, as at inference), then the slices chosen
    by ``select_slices`` are taken along ``axis`` (moved to the front). Returns a ``CaseSlices``
    that unpacks as ``(slices1, slices2, indices)``. With ``cache_dir`` the result is stored there
    and later calls with unchanged files and settings return read-only memory-mapped arrays
    (``result.from_cache`` is True); copy them (``np.array``) before modifying.
    """
    names = _validated_modalities(modalities)
    if len(names) != 2:
        raise ValueError(f"need exactly two modalities, got {list(names)}")
    if not -3 <= axis < 3:
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    axis %= 3
    rule = parse_label_rule(labels)
    files = [case.path(names[0]), case.path(names[1])]
    seg_path = case.seg if rule is not None else None

    array_path = meta_path = None
    key = ""
    if cache_dir is not None:
        key = slice_cache_key(
            [*files, seg_path], names, rule, normalization, axis, min_fraction, min_label_voxels
        )
        stem = f"{_safe_name(case.case_id)}-{key}"
        array_path = Path(cache_dir) / f"{stem}.npy"
        meta_path = Path(cache_dir) / f"{stem}.json"
        cached = _load_cache(array_path, meta_path, key)
        if cached is not None:
            LOGGER.debug("slice cache hit for %s: %s", case.case_id, array_path)
            return cached

    image1 = _read_image(files[0])
    image2 = _read_image(files[1])
    if image1.shape != image2.shape:
        raise ValueError(
            f"case {case.case_id}: {files[0].name} has shape {image1.shape} but {files[1].name} has "
            f"{image2.shape}; the modalities must be co-registered on one grid"
        )
    if not image1.same_grid(image2):  # same shape, other spacing/origin/direction: misaligned voxels
        raise ValueError(
            f"case {case.case_id}: {files[0].name} and {files[1].name} have the same shape but different "
            "geometry (spacing, origin or direction); the modalities must be co-registered on one grid"
        )
    volume1, volume2 = image1.array, image2.array
    del image1, image2
    seg = None
    if seg_path is not None:
        seg = _read_image(seg_path).array
        if seg.shape != volume1.shape:
            raise ValueError(
                f"case {case.case_id}: segmentation {seg_path.name} has shape {seg.shape}, "
                f"images have {volume1.shape}"
            )
    indices = select_slices(seg, volume1, volume2, rule, axis, min_fraction, min_label_voxels)
    if indices.size == 0:
        LOGGER.warning("case %s: no slice matches the selection rule", case.case_id)
    normalized = []
    params = []
    for volume in (volume1, volume2):
        values, record = normalize_volume(volume, normalization, axis)
        normalized.append(np.moveaxis(values, axis, 0)[indices])
        params.append(record.to_dict())
    stack = np.ascontiguousarray(np.stack(normalized), dtype=np.float32)
    if array_path is not None and meta_path is not None:
        _save_cache(array_path, meta_path, key, stack, indices, params)
    return CaseSlices(stack[0], stack[1], indices, False, array_path, params)
