"""Bad-input matrix over every entry point: a correct result or ONE clear line, nothing else.

Each case runs a ``fusioninn`` command (in-process through ``FusionINNLib.cli.main``, the code path
of ``python -m FusionINNLib.cli`` minus interpreter start-up; a representative set also runs as
a real subprocess) or the Python API, and then checks the contract of issue 8:

* success: exit 0, every written image finite (no NaN/Inf written), a fused image in [0, 1] on
  input 1's grid, and where a latent is kept the exact decomposition returns the source;
* failure: exit 1, exactly one line on stderr that names the offending file and the problem,
  nothing on stdout, no traceback;
* always: the inputs are byte-for-byte unchanged (SHA-256 of every file before/after) and, on
  failure, the folder listing is unchanged: no output and no temporary file is left behind.

The matrix of inputs and the decisions behind it are documented in docs/robustness.md.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FusionINNLib import cli as fusioninn_cli
from FusionINNLib.core.engine import Cancelled, SliceEngine
from FusionINNLib.core.model import FusionFlow, FusionINNConfig
from FusionINNLib.io.checkpoint import FORMAT_VERSION, save_checkpoint
from FusionINNLib.io.volume import Volume, read_volume
from FusionINNLib.jobs.pipeline import decompose_files, fuse_files, read_record, record_sidecar

REPO = Path(__file__).resolve().parents[1]
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SHAPE = (5, 20, 24)


# -- helpers ------------------------------------------------------------------------------------
def write_image(path: Path, array: np.ndarray, spacing=None, origin=None, direction=None,
                vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return Path(path)


def brain(shape=SHAPE, seed=0, scale=700.0, dtype=np.float32) -> np.ndarray:
    """A bright disc with noise on a zero background, like a skull-stripped slice stack."""
    rng = np.random.default_rng(seed)
    _, j, i = np.indices(shape)
    inside = ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.4) ** 2
    return np.where(inside, scale * (0.4 + 0.6 * rng.random(shape)), 0).astype(dtype)


def snapshot(root: Path) -> Dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> its kind and, for files, SHA-256."""
    entries: Dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            relative = str(path.relative_to(root))
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                entries[relative] = "link->" + os.readlink(path)
            elif stat.S_ISDIR(mode):
                entries[relative] = "dir"
            elif stat.S_ISREG(mode):
                entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[relative] = "special"
    return entries


def run_inprocess(capfd, *args) -> Tuple[int, str, str]:
    """``fusioninn ARGS`` through the same ``main`` the console script calls; (code, out, err)."""
    capfd.readouterr()
    code = fusioninn_cli.main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def run_subprocess(*args, timeout: float = 120, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"))
    return subprocess.run([sys.executable, "-m", "FusionINNLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=cwd)


def assert_one_line_error(code: int, out: str, err: str, command: str, needles: Sequence[str],
                          expected_code: int = 1) -> None:
    """``expected_code`` 2: a usage error (options that do not go together), as the README says."""
    assert code == expected_code, f"exit {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"fusioninn {command}: error: "), lines[0]
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from: {lines[0]}"


def assert_new_images_are_finite(before: Dict[str, str], root: Path) -> List[Path]:
    """Every image written since ``before`` reads back without NaN/Inf; no temp file is left."""
    new = [root / name for name in snapshot(root) if name not in before]
    assert not [p for p in new if p.name.startswith(".") or ".tmp" in p.name], new
    for path in new:
        if path.suffix not in (".json", ".tsv") and path.is_file():
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            assert np.isfinite(array).all(), f"{path.name} holds NaN/Inf"
    return new


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", FusionFlow(seed=7))


# -- fuse: inputs -------------------------------------------------------------------------------
@dataclass
class FuseCase:
    """Inputs for ``fusioninn fuse``; ``error`` lists what the one error line must contain."""

    build: Callable[[Path], Tuple[Path, Path]]
    error: Tuple[str, ...] = ()
    output: str = "fused.nrrd"
    extra: Tuple[str, ...] = ()
    latent: bool = False  # also keep the latent and check the exact decomposition
    check: Optional[Callable[[Path, Path, Path], None]] = None
    note: str = ""  # must appear in the fusion record's notes


def _pair(array1: np.ndarray, array2: Optional[np.ndarray] = None, name1="in1.nrrd", name2="in2.nrrd",
          **options):
    """Two inputs on the same grid (``options``: write_image's geometry and ``vector``)."""
    def build(folder: Path) -> Tuple[Path, Path]:
        second = brain(array1.shape, seed=1, scale=300.0) if array2 is None else array2
        return write_image(folder / name1, array1, **options), write_image(folder / name2, second, **options)
    return build


def _with_good_second(make_first: Callable[[Path], Path]):
    def build(folder: Path) -> Tuple[Path, Path]:
        return make_first(folder), write_image(folder / "in2.nrrd", brain(seed=1, scale=300.0))
    return build


def _nan_inf() -> np.ndarray:
    array = brain()
    array[0, 10, 12], array[1, 10, 12], array[2, 3, 3] = np.nan, np.inf, -np.inf
    return array  # NRRD keeps NaN/Inf (ITK's NIfTI reader turns NaN into 0)


def _full_range(dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    values = np.random.default_rng(3).integers(info.min, info.max, size=SHAPE, dtype=dtype, endpoint=True)
    values.flat[:2] = (info.min, info.max)  # both ends of the type
    return values


def _noise_2d_uint8() -> np.ndarray:
    return (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)


def _truncated(name: str, fraction: float, content: Optional[np.ndarray] = None):
    def make(folder: Path) -> Path:
        whole = write_image(folder / ("whole_" + name), brain() if content is None else content)
        data = whole.read_bytes()
        whole.unlink()
        (folder / name).write_bytes(data[: int(len(data) * fraction)])
        return folder / name
    return make


def _bytes_file(name: str, data: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


def _nifti_claiming_terabytes(name: str):
    """A NIfTI whose header says 30000 x 30000 x 3000 float32 voxels (10.8 TB): refused before ITK
    tries to allocate them."""
    def make(folder: Path) -> Path:
        small = write_image(folder / "small.nii", np.ones((4, 4, 4), np.float32))
        header = bytearray(small.read_bytes())
        small.unlink()
        struct.pack_into("<8h", header, 40, 3, 30000, 30000, 3000, 1, 1, 1, 1)  # dim[0..7]
        data = gzip.compress(bytes(header)) if name.endswith(".gz") else bytes(header)
        (folder / name).write_bytes(data)
        return folder / name
    return make


def _png_named_nii_gz(folder: Path) -> Path:
    png = write_image(folder / "tmp_image.png", (brain((1, 20, 24))[0] / 3).astype(np.uint8))
    return Path(shutil.move(str(png), str(folder / "picture.nii.gz")))


def _four_d(folder: Path) -> Path:
    series = sitk.JoinSeries([sitk.GetImageFromArray(brain()), sitk.GetImageFromArray(brain(seed=2))])
    sitk.WriteImage(series, str(folder / "series.nii.gz"))
    return folder / "series.nii.gz"


def _complex(folder: Path) -> Path:
    real = sitk.GetImageFromArray(brain())
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(folder / "complex.nii.gz"))
    return folder / "complex.nii.gz"


def _multipage_tiff(folder: Path) -> Path:
    return write_image(folder / "stack.tif", brain(dtype=np.uint8, scale=250))


def _symlink_loop(folder: Path) -> Path:
    os.symlink(folder / "loop_b.nii.gz", folder / "loop_a.nii.gz")
    os.symlink(folder / "loop_a.nii.gz", folder / "loop_b.nii.gz")
    return folder / "loop_a.nii.gz"


def _dangling(folder: Path) -> Path:
    os.symlink(folder / "gone.nii.gz", folder / "dangling.nii.gz")
    return folder / "dangling.nii.gz"


def _directory(folder: Path) -> Path:
    (folder / "a_folder.nii.gz").mkdir()
    return folder / "a_folder.nii.gz"


def _check_source_round_trip(tolerance_fraction: float = 1e-4):
    """Exact decomposition with the kept latent gives input 1 back to a fraction of its range."""
    def check(folder: Path, input1: Path, fused: Path) -> None:
        out1, out2 = folder / "back1.nrrd", folder / "back2.nrrd"
        decompose_files(fused, out1, out2, latent=folder / "latent.nrrd", model=_MODEL[0], device="cpu",
                        log=lambda m: None)
        source = read_volume(input1).array.astype(np.float64)
        restored = read_volume(out1).array.astype(np.float64)
        span = max(1.0, float(source.max() - source.min()))
        assert np.abs(restored - source).max() <= tolerance_fraction * span
    return check


def _check_geometry(spacing, direction):
    def check(folder: Path, input1: Path, fused: Path) -> None:
        image = sitk.ReadImage(str(fused))
        assert np.allclose(image.GetSpacing(), spacing) and np.allclose(image.GetDirection(), direction, atol=1e-6)
    return check


def _check_2d(size):
    def check(folder: Path, input1: Path, fused: Path) -> None:
        image = sitk.ReadImage(str(fused))
        assert image.GetDimension() == 2 and image.GetSize() == size
    return check


_MODEL: List[Path] = []  # the module's checkpoint, for checks that decompose
ROTATED = tuple(sitk.VersorTransform((0.3, 0.2, 0.9), 0.35).GetMatrix())
ANISOTROPIC = (0.3, 0.7, 6.0)

FUSE_CASES: Dict[str, FuseCase] = {
    # -- images that must fuse ------------------------------------------------------------------
    "nan_and_inf_voxels": FuseCase(_pair(_nan_inf()), note="3 NaN/Inf voxels replaced"),
    "all_zero": FuseCase(_pair(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)), latent=True,
                         check=_check_source_round_trip()),
    "constant": FuseCase(_pair(np.full(SHAPE, 123, np.int16), np.full(SHAPE, -4.5, np.float32)), latent=True,
                         check=_check_source_round_trip()),
    "nearly_empty": FuseCase(_pair(np.where(np.indices(SHAPE).sum(0) == 20, 9.0, 0.0).astype(np.float32)),
                             latent=True, check=_check_source_round_trip()),
    **{f"integers_{np.dtype(t).name}": FuseCase(_pair(_full_range(t)), latent=True, check=_check_source_round_trip())
       for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)},
    "one_slice": FuseCase(_pair(brain((1, 20, 24))), latent=True, check=_check_source_round_trip()),
    "one_by_one_2d": FuseCase(_pair(np.array([[5.0]], np.float32), np.array([[2.0]], np.float32)),
                              latent=False, check=_check_2d((1, 1))),
    "one_by_one_3d": FuseCase(_pair(brain((4, 1, 1)) + 1), latent=True, check=_check_source_round_trip()),
    "prime_sizes_axis_2": FuseCase(_pair(brain((7, 13, 17))), extra=("--axis", "2"), latent=True,
                                   check=_check_source_round_trip()),
    "prime_sizes_axis_1_slice_mode": FuseCase(_pair(brain((11, 5, 3))), extra=("--axis", "1", "--normalization",
                                                                                "slice"),
                                              latent=True, check=_check_source_round_trip()),
    "anisotropic_spacing": FuseCase(_pair(brain(), spacing=ANISOTROPIC), latent=True,
                                    check=_check_geometry(ANISOTROPIC, IDENTITY)),
    "oblique_both": FuseCase(_pair(brain(), spacing=(1, 1, 2), direction=ROTATED), latent=True,
                             check=_check_geometry((1, 1, 2), ROTATED)),
    "oblique_input2_only": FuseCase(
        lambda folder: (write_image(folder / "in1.nrrd", brain(), origin=(-12, -10, -5)),
                        write_image(folder / "in2.nrrd", brain(seed=1), origin=(-12, -10, -5), direction=ROTATED)),
        note="resampled", check=_check_geometry((1, 1, 1), IDENTITY)),
    "rgb_png": FuseCase(_pair((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8),
                              (np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8),
                              name1="in1.png", name2="in2.png", vector=True),
                        output="fused.png", note="colour image converted to luminance", check=_check_2d((24, 20))),
    "png_content_named_nii_gz": FuseCase(lambda folder: (_png_named_nii_gz(folder), _png_named_nii_gz(folder)),
                                         check=_check_2d((24, 20))),
    "multipage_tiff": FuseCase(lambda folder: (_multipage_tiff(folder),
                                               write_image(folder / "in2.nrrd", brain(seed=1)))),
    # -- images that must be refused --------------------------------------------------------------
    "all_nan": FuseCase(_pair(np.full(SHAPE, np.nan, np.float32)), error=("in1.nrrd", "every voxel is NaN")),
    "four_d": FuseCase(_with_good_second(_four_d), error=("series.nii.gz", "4-D images are not supported")),
    "two_component_vector": FuseCase(
        _with_good_second(lambda f: write_image(f / "vec.nrrd", np.zeros(SHAPE + (2,), np.float32), vector=True)),
        error=("vec.nrrd", "2 components per voxel")),
    "float_vector_field": FuseCase(
        _with_good_second(lambda f: write_image(f / "field.nrrd", np.zeros(SHAPE + (3,), np.float32), vector=True)),
        error=("field.nrrd", "vector images")),
    "complex": FuseCase(_with_good_second(_complex), error=("complex.nii.gz", "complex-valued")),
    "non_overlapping": FuseCase(
        lambda folder: (write_image(folder / "in1.nrrd", brain()),
                        write_image(folder / "in2.nrrd", brain(seed=1), origin=(5000.0, 0.0, 0.0))),
        error=("do not overlap",)),
    # -- files that must be refused ---------------------------------------------------------------
    "missing": FuseCase(lambda folder: (folder / "missing.nii.gz", write_image(folder / "in2.nrrd", brain())),
                        error=("missing.nii.gz", "file not found")),
    "directory": FuseCase(_with_good_second(_directory), error=("a_folder.nii.gz", "is a directory")),
    "dangling_symlink": FuseCase(_with_good_second(_dangling), error=("dangling.nii.gz", "symbolic link")),
    "symlink_loop": FuseCase(_with_good_second(_symlink_loop), error=("loop_a.nii.gz", "symbolic link")),
    "truncated_nii_gz": FuseCase(_with_good_second(_truncated("cut.nii.gz", 0.6)),
                                 error=("cut.nii.gz", "damaged or truncated")),
    "truncated_nii_gz_tail": FuseCase(_with_good_second(_truncated("tail.nii.gz", 0.995)),
                                      error=("tail.nii.gz", "damaged or truncated")),
    "nifti_header_claims_terabytes": FuseCase(_with_good_second(_nifti_claiming_terabytes("huge.nii")),
                                              error=("huge.nii", "header describes 10800000000352 bytes")),
    "nifti_gz_header_claims_terabytes": FuseCase(_with_good_second(_nifti_claiming_terabytes("huge.nii.gz")),
                                                 error=("huge.nii.gz", "more than the")),
    "truncated_nii": FuseCase(_with_good_second(_truncated("cut.nii", 0.8)), error=("cut.nii", "damaged or truncated")),
    "truncated_nrrd": FuseCase(_with_good_second(_truncated("cut.nrrd", 0.5)),
                               error=("cut.nrrd", "damaged or truncated")),
    "truncated_mha": FuseCase(_with_good_second(_truncated("cut.mha", 0.5)), error=("cut.mha", "damaged or truncated")),
    "truncated_tiff": FuseCase(_with_good_second(_truncated("cut.tif", 0.5, brain(dtype=np.uint8, scale=250))),
                               error=("cut.tif", "damaged")),
    "truncated_png": FuseCase(_with_good_second(_truncated("cut.png", 0.5, _noise_2d_uint8())),
                              error=("cut.png", "cannot read image")),
    "empty_file": FuseCase(_with_good_second(_bytes_file("empty.nii.gz", b"")),
                           error=("empty.nii.gz", "cannot read image")),
    "text_named_nrrd": FuseCase(_with_good_second(_bytes_file("notes.nrrd", b"these are my notes\n")),
                                error=("notes.nrrd", "cannot read image")),
    "random_bytes_named_mha": FuseCase(
        _with_good_second(_bytes_file("noise.mha", np.random.default_rng(1).bytes(4096))),
        error=("noise.mha", "cannot read image")),
    # -- outputs that must be refused -------------------------------------------------------------
    "output_overwrites_input": FuseCase(_pair(brain()), output="in1.nrrd", error=("in1.nrrd", "overwrite an input")),
    "output_is_a_directory": FuseCase(_pair(brain()), output="out_dir", error=("out_dir", "directory")),
    "output_folder_missing": FuseCase(_pair(brain()), output="no/such/fused.nrrd",
                                      error=("no/such", "output folder does not exist")),
    "output_unknown_format": FuseCase(_pair(brain()), output="fused.xyz", error=("fused.xyz", "'.xyz' format")),
    "output_3d_into_png": FuseCase(_pair(brain()), output="fused.png", error=("fused.png", "holds one slice")),
    "output_detached_header": FuseCase(_pair(brain()), output="fused.nhdr",
                                       error=("fused.nhdr", "separate data file")),
}


@pytest.mark.parametrize("name", sorted(FUSE_CASES))
def test_fuse_matrix(name, tmp_path, model_path, capfd):
    _MODEL[:] = [model_path]
    case = FUSE_CASES[name]
    input1, input2 = case.build(tmp_path)
    if name == "output_is_a_directory":
        (tmp_path / "out_dir").mkdir()
    before = snapshot(tmp_path)
    output = tmp_path / case.output
    args = ["fuse", input1, input2, "--output", output, "--model", model_path, "--device", "cpu", "--quiet",
            *case.extra]
    if case.latent:
        args += ["--latent", tmp_path / "latent.nrrd"]
    code, out, err = run_inprocess(capfd, *args)

    if case.error:
        assert_one_line_error(code, out, err, "fuse", case.error)
        assert snapshot(tmp_path) == before, "a failed run changed the folder"
        return
    assert code == 0, err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "an input was modified"
    written = assert_new_images_are_finite(before, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        [output.name, record_sidecar(output).name] + (["latent.nrrd"] if case.latent else []))
    fused = read_volume(output)
    assert fused.shape == read_volume(input1).shape
    values = fused.array / 255.0 if fused.array.dtype == np.uint8 else fused.array  # 8-bit files store 255 y
    assert 0.0 <= values.min() and values.max() <= 1.0
    if case.note:
        assert any(case.note in note for note in read_record(output, fused)["notes"]), read_record(output)["notes"]
    if case.check is not None:
        case.check(tmp_path, input1, output)


def test_inputs_keep_their_bytes_even_when_fusion_succeeds_in_place(tmp_path, model_path, capfd):
    """Outputs next to the inputs, with names that differ only by extension, touch nothing else."""
    in1 = write_image(tmp_path / "case.nii.gz", brain())
    in2 = write_image(tmp_path / "case.nrrd", brain(seed=1))
    before = snapshot(tmp_path)
    code, _, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "case.mha", "--latent",
                                 tmp_path / "case_latent.nii.gz", "--model", model_path, "--quiet")
    assert code == 0, err
    after = snapshot(tmp_path)
    assert all(after[name] == digest for name, digest in before.items())
    assert set(after) - set(before) == {"case.mha", "case.fusioninn.json", "case_latent.nii.gz"}


def test_output_hard_linked_to_an_input_is_refused(tmp_path, model_path, capfd):
    in1, in2 = _pair(brain())(tmp_path)
    os.link(in1, tmp_path / "alias.nrrd")
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "alias.nrrd", "--model", model_path)
    assert_one_line_error(code, out, err, "fuse", ("alias.nrrd", "overwrite an input"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("latent_name, output_name, needle", [
    ("latent.png", "fused.nrrd", "needs a float format"),
    ("fused.nrrd", "fused.nrrd", "same file name"),
])
def test_bad_latent_outputs(tmp_path, model_path, capfd, latent_name, output_name, needle):
    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / output_name, "--latent",
                                   tmp_path / latent_name, "--model", model_path)
    assert_one_line_error(code, out, err, "fuse", (needle,))
    assert snapshot(tmp_path) == before


def test_a_failing_write_leaves_no_partial_output(tmp_path, model_path, monkeypatch):
    """The second of three files fails to write (e.g. disk full): none of them appears."""
    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)
    real_write = sitk.WriteImage
    calls = []

    def failing_write(image, name, *args):
        calls.append(name)
        if len(calls) == 3:  # probe, probe, then the latent: the first real write
            real_write(image, name, *args)
            Path(name).write_bytes(Path(name).read_bytes()[:100])  # a half-written file...
            raise RuntimeError("No space left on device")
        return real_write(image, name, *args)

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(ValueError, match="cannot write image"):
        fuse_files(in1, in2, tmp_path / "f.nrrd", latent=tmp_path / "z.nrrd", model=model_path, device="cpu",
                   log=lambda m: None)
    assert snapshot(tmp_path) == before


def test_interrupt_mid_run_exits_130_and_writes_nothing(tmp_path, model_path, capfd, monkeypatch):
    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SliceEngine, "fuse", interrupted)
    code, _, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--model", model_path,
                                 "--quiet")
    assert code == 130 and "no output written" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_root_can_read_a_mode_000_file_and_fuses_it(tmp_path, model_path):
    """As root (how these tests run in CI containers) chmod 000 does not stop reading: that is a
    correct result, not a failure. The refusal for an ordinary user is the subprocess test below."""
    in1, in2 = _pair(brain())(tmp_path)
    os.chmod(in1, 0)
    try:
        if os.access(in1, os.R_OK):
            fuse_files(in1, in2, tmp_path / "f.nrrd", model=model_path, device="cpu", log=lambda m: None)
            assert np.isfinite(read_volume(tmp_path / "f.nrrd").array).all()
        else:
            with pytest.raises(PermissionError, match="in1.nrrd: file is not readable"):
                fuse_files(in1, in2, tmp_path / "f.nrrd", model=model_path, device="cpu", log=lambda m: None)
    finally:
        os.chmod(in1, 0o644)


# -- the Python API on volumes in memory (what the Slicer module hands over) ---------------------
def _volume(array, **geometry):
    return Volume(np.asarray(array), **geometry)


API_CASES: Dict[str, Tuple[Callable[[], Tuple[Volume, Volume]], str]] = {
    "nan_and_inf": (lambda: (_volume(_nan_inf()), _volume(brain(seed=1))), ""),
    "float16_and_bool": (lambda: (_volume(brain().astype(np.float16)), _volume(brain(seed=1) > 300)), ""),
    "float16_on_another_grid": (lambda: (_volume(brain()), _volume(brain(seed=1).astype(np.float16),
                                                                     spacing=(1.0, 1.0, 0.5))), ""),
    "int64_extremes": (lambda: (_volume(_full_range(np.int64)), _volume(_full_range(np.uint64))), ""),
    "one_voxel": (lambda: (_volume(np.ones((1, 1, 1))), _volume(np.zeros((1, 1, 1)))), ""),
    "two_d": (lambda: (_volume(brain((1, 9, 11)), is_2d=True), _volume(brain((1, 9, 11), seed=1), is_2d=True)), ""),
    "all_nan": (lambda: (_volume(brain()), _volume(np.full(SHAPE, np.nan))), "input2: every voxel is NaN"),
    "complex": (lambda: (_volume(brain().astype(np.complex64)), _volume(brain())), "input1: complex-valued"),
    "strings": (lambda: (_volume(brain()), _volume(np.full(SHAPE, "a"))), "input2: cannot normalize voxels"),
    "non_overlapping": (lambda: (_volume(brain()), _volume(brain(), origin=(0.0, 9000.0, 0.0))), "do not overlap"),
}


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_fuse_volumes_matrix_leaves_the_caller_arrays_alone(name, model_path):
    from FusionINNLib.io.checkpoint import load_checkpoint
    from FusionINNLib.io.volume import VolumeError
    from FusionINNLib.jobs.pipeline import fuse_volumes

    build, error = API_CASES[name]
    volume1, volume2 = build()
    copies = [volume1.array.copy(), volume2.array.copy()]
    model = load_checkpoint(model_path)
    if error:
        with pytest.raises(VolumeError, match=error):
            fuse_volumes(volume1, volume2, model, device="cpu", log=lambda m: None)
    else:
        result = fuse_volumes(volume1, volume2, model, device="cpu", keep_latent=True, log=lambda m: None)
        assert result.fused.shape == volume1.shape and result.fused.array.dtype == np.float32
        assert np.isfinite(result.fused.array).all() and 0 <= result.fused.array.min() <= 1
        assert result.fused.array.max() <= 1 and np.isfinite(result.latent).all()
    for original, volume in zip(copies, (volume1, volume2)):
        assert np.array_equal(original, volume.array, equal_nan=original.dtype.kind in "fc")


@pytest.mark.parametrize("geometry, message", [
    ({"spacing": (0.0, 1.0, 1.0)}, "spacing must be three positive numbers"),
    ({"spacing": (float("nan"), 1.0, 1.0)}, "spacing must be three positive numbers"),
    ({"origin": (float("inf"), 0.0, 0.0)}, "origin must be three finite numbers"),
    ({"direction": (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, "direction must be an invertible"),
])
def test_broken_geometry_is_refused_where_it_is_made(geometry, message):
    from FusionINNLib.io.volume import VolumeError

    with pytest.raises(VolumeError, match=message):
        Volume(brain(), **geometry)


# -- real subprocesses --------------------------------------------------------------------------
# Root reads any file whatever its mode, through the capabilities to override file permissions.
# Without them (setpriv drops them from the bounding set before exec) root obeys chmod 000.
DROP_FILE_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                      "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_input_is_refused_for_an_ordinary_user(tmp_path, model_path):
    """The real command, as a user that chmod 000 stops: exit 1 and one line naming the file."""
    prefix: List[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux 'setpriv' to give up the file-permission override")
        prefix = DROP_FILE_OVERRIDE
    in1, in2 = _pair(brain())(tmp_path)
    os.chmod(in1, 0)
    try:
        before = snapshot(tmp_path)
        env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"))
        done = subprocess.run([*prefix, sys.executable, "-m", "FusionINNLib.cli", "fuse", str(in1), str(in2), "-o",
                               str(tmp_path / "f.nrrd"), "--model", str(model_path), "--device", "cpu"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert_one_line_error(done.returncode, done.stdout, done.stderr, "fuse",
                              ("in1.nrrd", "not readable", "permission denied"))
        assert snapshot(tmp_path) == before
    finally:
        os.chmod(in1, 0o644)


def test_fifo_input_is_refused_instead_of_blocking(tmp_path, model_path):
    """Reading a FIFO with no writer blocks forever; the timeout turns a regression into a failure."""
    os.mkfifo(tmp_path / "pipe.nii.gz")
    good = write_image(tmp_path / "in2.nrrd", brain())
    before = snapshot(tmp_path)
    done = run_subprocess("fuse", tmp_path / "pipe.nii.gz", good, "-o", tmp_path / "f.nrrd", "--model", model_path,
                          timeout=60)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "fuse", ("pipe.nii.gz", "not a regular file"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, make, needles", [
    ("truncated_nii_gz", _truncated("cut.nii.gz", 0.6), ("cut.nii.gz", "damaged or truncated")),
    # ITK's MetaImage reader prints its own lines on stderr: they must not reach the user
    ("truncated_mha", _truncated("cut.mha", 0.5), ("cut.mha", "damaged or truncated")),
    # ITK's JPEG reader prints "Premature end of JPEG file" on *stdout* and returns an image
    ("truncated_jpeg", _truncated("cut.jpg", 0.6, _noise_2d_uint8()), ("cut.jpg", "damaged")),
])
def test_damaged_files_through_the_real_command(tmp_path, model_path, name, make, needles):
    bad = make(tmp_path)
    good = write_image(tmp_path / "in2.nrrd", brain())
    before = snapshot(tmp_path)
    done = run_subprocess("fuse", good, bad, "-o", tmp_path / "f.nrrd", "--model", model_path)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "fuse", needles)
    assert snapshot(tmp_path) == before


# -- checkpoints on the command line ------------------------------------------------------------
class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _checkpoint(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        good = save_checkpoint(folder / "good.pt", FusionFlow(seed=1)).read_bytes()
        path.write_bytes(good[: len(good) // 2])
        (folder / "good.pt").unlink()
    elif kind == "other_architecture":
        torch.save(FusionFlow(FusionINNConfig(blocks=4)).graph.state_dict(), path)
    elif kind == "future_version":
        save_checkpoint(path, FusionFlow(), extra={"format_version": FORMAT_VERSION + 1})
    elif kind == "malicious":
        torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": _Payload(folder / "pwned")}, path)
    elif kind == "directory":
        path.mkdir()
    return path


CHECKPOINT_CASES = {
    "corrupt": "not a readable PyTorch checkpoint",
    "empty": "not a readable PyTorch checkpoint",
    "truncated": "not a readable PyTorch checkpoint",
    "other_architecture": "weights do not fit the model architecture",
    "future_version": "newer than this software",
    "malicious": "not allowed in a model file",
    "directory": "is a directory",
    "missing": "model file not found",
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints_on_the_command_line(kind, tmp_path, capfd):
    models = tmp_path / "models"
    models.mkdir()
    model = _checkpoint(kind, models)
    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--model", model)
    assert_one_line_error(code, out, err, "fuse", (model.name, CHECKPOINT_CASES[kind]))
    assert snapshot(tmp_path) == before
    assert not (models / "pwned").exists()


def test_malicious_checkpoint_payload_never_runs_in_the_real_command(tmp_path, fused_set):
    model = _checkpoint("malicious", tmp_path)
    assert not (tmp_path / "pwned").exists()
    before = snapshot(tmp_path)
    done = run_subprocess("decompose", fused_set / "f.nii.gz", "--output1", tmp_path / "a.nrrd", "--output2",
                          tmp_path / "b.nrrd", "--model", model)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "decompose",
                          ("malicious.pt", "not allowed in a model file"))
    assert not (tmp_path / "pwned").exists(), "the pickle payload ran"
    assert snapshot(tmp_path) == before


# -- decompose ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_set(tmp_path_factory, model_path) -> Path:
    """One fusion kept for the decomposition cases: f.nii.gz (+ sidecar record), latent z.nrrd,
    and a second, differently shaped fusion g.nii.gz with its latent y.nrrd."""
    folder = tmp_path_factory.mktemp("fused")
    t1 = write_image(folder / "t1.nii.gz", brain(dtype=np.int16))
    flair = write_image(folder / "flair.nii.gz", brain(seed=1, scale=300.0))
    fuse_files(t1, flair, folder / "f.nii.gz", latent=folder / "z.nrrd", model=model_path, device="cpu",
               normalization="slice", log=lambda m: None)
    small1 = write_image(folder / "small1.nii.gz", brain((3, 14, 14)))
    small2 = write_image(folder / "small2.nii.gz", brain((3, 14, 14), seed=1))
    fuse_files(small1, small2, folder / "g.nii.gz", latent=folder / "y.nrrd", model=model_path, device="cpu",
               log=lambda m: None)
    two_d1 = write_image(folder / "p1.png", (brain((1, 20, 24))[0] / 3).astype(np.uint8))
    two_d2 = write_image(folder / "p2.png", (brain((1, 20, 24), seed=1)[0] / 3).astype(np.uint8))
    fuse_files(two_d1, two_d2, folder / "p.png", model=model_path, device="cpu", log=lambda m: None)
    return folder


def _copy_fused(source: Path, folder: Path, names=("f.nii.gz", "f.fusioninn.json", "z.nrrd")) -> None:
    for name in names:
        shutil.copy(source / name, folder / name)


def _edit_record(folder: Path, edit: Callable[[dict], object]) -> None:
    sidecar = folder / "f.fusioninn.json"
    record = json.loads(sidecar.read_text())
    result = edit(record)
    sidecar.write_text(result if isinstance(result, str) else json.dumps(record))


def _crop_fused(folder: Path) -> None:
    image = sitk.ReadImage(str(folder / "f.nii.gz"))
    sitk.WriteImage(image[:, :, :3], str(folder / "f.nii.gz"))


def _nan_fused(folder: Path) -> None:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "f.nii.gz")))
    array[0, 0, 0] = np.nan
    write_image(folder / "f.nrrd", array)
    shutil.copy(folder / "f.fusioninn.json", folder / "f_nan.fusioninn.json")


@dataclass
class DecomposeCase:
    prepare: Callable[[Path, Path], List[str]]  # (case folder, fused_set) -> extra arguments
    error: Tuple[str, ...] = ()
    fused: str = "f.nii.gz"
    needs_other_model: str = ""
    expect_in_stderr: str = ""
    outputs: Tuple[str, str] = ("d1.nrrd", "d2.nrrd")
    code: int = 1  # 2 for usage errors


def _args(*extra):
    return lambda folder, fused: list(extra)


DECOMPOSE_CASES: Dict[str, DecomposeCase] = {
    "exact_with_latent": DecomposeCase(lambda f, s: ["--latent", f / "z.nrrd"]),
    "wrong_model": DecomposeCase(_args(), needs_other_model="seed", error=("made with model", "--model")),
    "wrong_architecture": DecomposeCase(_args(), needs_other_model="blocks",
                                        error=("made with model", "a different architecture")),
    "wrong_model_ignored_on_request": DecomposeCase(_args("--ignore-model-mismatch"), needs_other_model="seed"),
    "latent_of_another_volume": DecomposeCase(
        lambda f, s: [shutil.copy(s / "y.nrrd", f / "y.nrrd") and "--latent", f / "y.nrrd"],
        error=("y.nrrd", "does not belong to this fused volume")),
    "truncated_latent": DecomposeCase(
        lambda f, s: ((f / "z_cut.nrrd").write_bytes((f / "z.nrrd").read_bytes()[:3000]) and ["--latent",
                                                                                                f / "z_cut.nrrd"]),
        error=("z_cut.nrrd", "cannot read latent")),
    "not_a_fused_image": DecomposeCase(
        lambda f, s: [shutil.copy(s / "t1.nii.gz", f / "t1.nii.gz") and "--samples", "2"], fused="t1.nii.gz",
        error=("t1.nii.gz", "is this a fused image")),
    "fused_with_nan": DecomposeCase(lambda f, s: [_nan_fused(f) or "--samples", "1"], fused="f.nrrd",
                                    error=("f.nrrd", "NaN/Inf")),
    "record_not_json": DecomposeCase(lambda f, s: [_edit_record(f, lambda r: "{not json") or "--samples", "1"],
                                     error=("f.nii.gz", "not valid JSON")),
    "record_not_text": DecomposeCase(lambda f, s: [(f / "f.fusioninn.json").write_bytes(b"\xff\xfe\x00garbage")
                                                   and "--samples", "1"],
                                     error=("f.fusioninn.json", "cannot read the fusion record")),
    "record_without_normalization": DecomposeCase(
        lambda f, s: [_edit_record(f, lambda r: r.pop("normalization")) or "--samples", "1"],
        error=("f.nii.gz", "damaged fusion record")),
    "record_from_the_future": DecomposeCase(
        lambda f, s: [_edit_record(f, lambda r: r.update(version=99)) or "--samples", "1"],
        error=("f.nii.gz", "newer than this software")),
    "cropped_fused_image": DecomposeCase(lambda f, s: [_crop_fused(f) or "--samples", "1"],
                                         error=("f.nii.gz", "describes 5 slices")),
    "output_overwrites_fused": DecomposeCase(_args(), outputs=("f.nii.gz", "d2.nrrd"),
                                             error=("f.nii.gz", "overwrite an input")),
    "output_overwrites_latent": DecomposeCase(lambda f, s: ["--latent", f / "z.nrrd"], outputs=("z.nrrd", "d2.nrrd"),
                                              error=("z.nrrd", "overwrite an input")),
    "std1_without_std2": DecomposeCase(lambda f, s: ["--samples", "2", "--std1", f / "s1.nrrd"],
                                       error=("--std1 and --std2",), code=2),
    "latent_and_samples": DecomposeCase(lambda f, s: ["--latent", f / "z.nrrd", "--samples", "3"],
                                        error=("takes no --samples",), code=2),
    "eight_bit_png_fused_image": DecomposeCase(
        lambda f, s: [(shutil.copy(s / "p.png", f / "p.png"), shutil.copy(s / "p.fusioninn.json",
                                                                          f / "p.fusioninn.json")) and "--samples",
                      "1"],
        fused="p.png", expect_in_stderr="8-bit fused image read as value/255"),
}


@pytest.mark.parametrize("name", sorted(DECOMPOSE_CASES))
def test_decompose_matrix(name, tmp_path, fused_set, model_path, capfd):
    case = DECOMPOSE_CASES[name]
    _copy_fused(fused_set, tmp_path)
    extra = [str(a) for a in case.prepare(tmp_path, fused_set)]
    model = model_path
    if case.needs_other_model:
        config = FusionINNConfig(blocks=4) if case.needs_other_model == "blocks" else FusionINNConfig()
        model = save_checkpoint(tmp_path / "other.pt", FusionFlow(config, seed=99))
    before = snapshot(tmp_path)
    out1, out2 = (tmp_path / name for name in case.outputs)
    code, out, err = run_inprocess(capfd, "decompose", tmp_path / case.fused, "--output1", out1, "--output2", out2,
                                   "--model", model, "--device", "cpu", *extra)
    if case.error:
        assert_one_line_error(code, out, err, "decompose", case.error, case.code)
        assert snapshot(tmp_path) == before
        return
    assert code == 0, err
    assert "Traceback" not in err and case.expect_in_stderr in err
    after = snapshot(tmp_path)
    assert all(after[k] == v for k, v in before.items()), "an input was modified"
    assert {p.name for p in assert_new_images_are_finite(before, tmp_path)} == {out1.name, out2.name}
    if name == "exact_with_latent":
        source = read_volume(fused_set / "t1.nii.gz").array.astype(np.float64)
        assert np.abs(read_volume(out1).array - source).max() <= 1e-4 * np.ptp(source)


def test_cancelling_a_decomposition_leaves_no_output(tmp_path, fused_set, model_path):
    _copy_fused(fused_set, tmp_path)
    before = snapshot(tmp_path)
    answers = iter([False, True])  # the first batch runs, the second is cancelled
    with pytest.raises(Cancelled):
        decompose_files(tmp_path / "f.nii.gz", tmp_path / "a.nrrd", tmp_path / "b.nrrd", std1=tmp_path / "s1.nrrd",
                        std2=tmp_path / "s2.nrrd", samples=2, model=model_path, device="cpu", batch_size=2,
                        cancel=lambda: next(answers), log=lambda m: None)
    assert snapshot(tmp_path) == before


# -- resources ----------------------------------------------------------------------------------
def test_cpu_batches_are_capped_by_pixels_not_by_slice_count(monkeypatch):
    """Memory of one forward pass grows with batch x height x width: on the CPU the product is
    capped (512x512 slices go 2 at a time, BraTS 240x240 slices keep batch 8), results unchanged."""
    engine = SliceEngine(FusionFlow(seed=5), "cpu", batch_size=8)
    assert engine.batch_limit(512 * 512) == 2 and engine.batch_limit(240 * 240) == 8
    assert engine.batch_limit(4096 * 4096) == 1

    model = FusionFlow(seed=5)
    seen: List[int] = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append(x.shape[0]), forward(x))[1])
    capped = SliceEngine(model, "cpu", batch_size=8, batch_pixels=2 * 16 * 16)
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((5, 15, 16), dtype=np.float32), rng.random((5, 15, 16), dtype=np.float32)
    result = capped.fuse(x1, x2, keep_latent=True)
    assert seen == [2, 2, 1]  # 15 rows pad to 16: two 16x16 slices per pass
    reference = SliceEngine(FusionFlow(seed=5), "cpu", batch_size=8, batch_pixels=10**9).fuse(x1, x2)
    assert np.allclose(result.fused, reference.fused, atol=1e-6)


def test_out_of_memory_under_the_pixel_cap_still_halves(monkeypatch):
    model = FusionFlow(seed=6)
    forward = model.forward

    def small_only(x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return forward(x)

    monkeypatch.setattr(model, "forward", small_only)
    engine = SliceEngine(model, "cpu", batch_size=8, batch_pixels=4 * 16 * 16)
    rng = np.random.default_rng(1)
    engine.fuse(rng.random((3, 16, 16), dtype=np.float32), rng.random((3, 16, 16), dtype=np.float32))
    assert engine.batch_size == 1  # 4 (the cap) -> 2 -> 1, not 8 -> 4 with no effect


# -- metrics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fused, needles", [
    ("truncated_fused", "cut.nii.gz", ("cut.nii.gz", "damaged or truncated")),
    ("fused_of_other_shape", "g.nii.gz", ("g.nii.gz", "differs from input 1")),
    ("fused_is_a_directory", "folder.nii.gz", ("folder.nii.gz", "is a directory")),
])
def test_metrics_refuses_bad_inputs_in_one_line(name, fused, needles, tmp_path, fused_set, capfd):
    _copy_fused(fused_set, tmp_path, ("f.nii.gz", "g.nii.gz", "t1.nii.gz", "flair.nii.gz"))
    data = (tmp_path / "f.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.nii.gz").mkdir()
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "t1.nii.gz", tmp_path / "flair.nii.gz",
                                   tmp_path / fused)
    assert_one_line_error(code, out, err, "metrics", needles)
    assert snapshot(tmp_path) == before


def test_metrics_name_the_input_with_nan_voxels(tmp_path, fused_set, capfd):
    write_image(tmp_path / "in1.nrrd", _nan_inf())
    write_image(tmp_path / "in2.nrrd", brain(seed=1, scale=300.0))
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "in1.nrrd", tmp_path / "in2.nrrd",
                                   fused_set / "f.nii.gz", "--json")
    assert_one_line_error(code, out, err, "metrics", ("in1.nrrd", "NaN or infinite"))


# -- batch --------------------------------------------------------------------------------------
def _brats_tree(root: Path) -> None:
    """ok: complete case; missing: no FLAIR; damaged: truncated T1-Gd; mixed: FLAIR on another
    grid (fewer, thicker slices); plus a symbolic link looping back to the root."""
    def case(name: str, t1ce: Optional[np.ndarray], flair: Optional[np.ndarray], flair_spacing=(1.0, 1.0, 1.0)):
        folder = root / f"BraTS2021_{name}"
        folder.mkdir(parents=True)
        if t1ce is not None:
            write_image(folder / f"BraTS2021_{name}_t1ce.nii.gz", t1ce)
        if flair is not None:
            write_image(folder / f"BraTS2021_{name}_flair.nii.gz", flair, spacing=flair_spacing)
        return folder

    case("00001", brain(), brain(seed=1))
    case("00002", brain(), None)
    damaged = case("00003", brain(), brain(seed=1))
    target = damaged / "BraTS2021_00003_t1ce.nii.gz"
    target.write_bytes(target.read_bytes()[:600])
    case("00004", brain(), brain((3, 20, 24), seed=1), flair_spacing=(1.0, 1.0, 5 / 3))
    os.symlink(root, root / "BraTS2021_00001" / "loop_back_to_root")


def test_batch_over_a_messy_brats_tree(tmp_path, model_path, capfd):
    root, out = tmp_path / "cases", tmp_path / "out"
    _brats_tree(root)
    before = snapshot(root)
    code, _, err = run_inprocess(capfd, "batch", root, "--output", out, "--model", model_path, "--device", "cpu",
                                 "--quiet")
    assert code == 0, err
    assert snapshot(root) == before, "the batch changed its input tree"
    rows = {row["case"]: row for row in _read_tsv(out / "summary.tsv")}
    statuses = {case[-5:]: row["status"] for case, row in rows.items()}
    assert statuses == {"00001": "ok", "00002": "skipped", "00003": "failed", "00004": "ok"}, rows
    damaged = next(row for case, row in rows.items() if case.endswith("00003"))
    assert "BraTS2021_00003_t1ce.nii.gz" in damaged["message"] and "damaged" in damaged["message"]
    assert "resampled" in next(row for case, row in rows.items() if case.endswith("00004"))["message"]
    written = assert_new_images_are_finite({}, out)
    fused = sorted(p.name for p in written if p.name.endswith("_fused.nii.gz"))
    assert len(fused) == 2 and all(("00001" in n) or ("00004" in n) for n in fused)


def _read_tsv(path: Path) -> List[Dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_batch_over_a_folder_without_cases_is_one_line(tmp_path, model_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, out, err = run_inprocess(capfd, "batch", tmp_path / "empty", "--output", tmp_path / "out", "--model",
                                   model_path, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no case" in err and "empty" in err


# -- issue 13: every exit 0 is a correct result ---------------------------------------------------
def _fuse_cli(capfd, folder: Path, in1: Path, in2: Path, model: Path, latent: bool = True, name: str = "f"):
    args = ["fuse", in1, in2, "-o", folder / f"{name}.nrrd", "--model", model, "--device", "cpu", "--quiet"]
    if latent:
        args += ["--latent", folder / f"{name}_z.nrrd"]
    code, out, err = run_inprocess(capfd, *args)
    assert code == 0, err
    return folder / f"{name}.nrrd", folder / f"{name}_z.nrrd"


def test_sampled_estimates_next_to_saturated_voxels_are_clamped_and_counted(tmp_path, model_path, capfd):
    """Item 1: fused voxels at exactly 0 or 1 (saturated) send the sampled inverse to values far
    outside the source (-1.1e4 for a source of 0..698 with this model): clamped, with a warning."""
    t1 = write_image(tmp_path / "t1.nrrd", brain(dtype=np.int16))
    flair = write_image(tmp_path / "flair.nrrd", brain(seed=1, scale=300.0))
    fused, _ = _fuse_cli(capfd, tmp_path, t1, flair, model_path, latent=False)
    image = sitk.ReadImage(str(fused))
    array = sitk.GetArrayFromImage(image)
    array[:, 2:6, 2:8], array[:, 12:16, 2:8] = 1.0, 0.0  # saturated, as next to hot voxels
    saturated = sitk.GetImageFromArray(array)
    for key in image.GetMetaDataKeys():
        saturated.SetMetaData(key, image.GetMetaData(key))
    sitk.WriteImage(saturated, str(fused))
    code, out, err = run_inprocess(capfd, "decompose", fused, "--output1", tmp_path / "e1.nrrd", "--output2",
                                   tmp_path / "e2.nrrd", "--samples", "2", "--std1", tmp_path / "s1.nrrd", "--std2",
                                   tmp_path / "s2.nrrd", "--model", model_path, "--device", "cpu")
    assert code == 0, err
    assert "clamped" in err and "impossible values" in err and "the kept latent gives the exact sources" in err
    for output, source in (("e1.nrrd", t1), ("e2.nrrd", flair)):
        estimate, original = read_volume(tmp_path / output).array, read_volume(source).array
        assert original.min() <= estimate.min() and estimate.max() <= original.max() + 1e-3
    for output, source in (("s1.nrrd", t1), ("s2.nrrd", flair)):
        span = float(np.ptp(read_volume(source).array))
        assert np.isfinite(read_volume(tmp_path / output).array).all()
        assert read_volume(tmp_path / output).array.max() <= span / 2 + 1e-3
    record = read_record(fused, read_volume(fused))
    params = record["normalization"][0]
    assert (params["minimum"], params["maximum"]) == (float(read_volume(t1).array.min()),
                                                      float(read_volume(t1).array.max()))


def _two_batch_cases(root: Path) -> None:
    for number, seed in (("00001", 0), ("00002", 5)):
        folder = root / f"BraTS2021_{number}"
        folder.mkdir(parents=True)
        write_image(folder / f"BraTS2021_{number}_t1ce.nii.gz", brain(seed=seed, dtype=np.int16))
        write_image(folder / f"BraTS2021_{number}_flair.nii.gz", brain(seed=seed + 1, scale=300.0))


def test_batch_nifti_latents_refuse_another_case_and_invert_their_own_bit_exactly(tmp_path, model_path, capfd):
    """Item 2: batch writes .nii.gz latents (no header for a fingerprint); the fused record names
    its latent's SHA-256, so case 1 decomposed with case 2's same-shaped latent is refused."""
    root, out = tmp_path / "cases", tmp_path / "out"
    _two_batch_cases(root)
    code, _, err = run_inprocess(capfd, "batch", root, "--output", out, "--latent", "--model", model_path,
                                 "--device", "cpu", "--quiet")
    assert code == 0, err
    fused1 = next(out.glob("*00001_fused.nii.gz"))
    latent1, latent2 = next(out.glob("*00001_latent.nii.gz")), next(out.glob("*00002_latent.nii.gz"))
    before = snapshot(tmp_path)
    code, stdout, err = run_inprocess(capfd, "decompose", fused1, "--output1", tmp_path / "a.nrrd", "--output2",
                                      tmp_path / "b.nrrd", "--latent", latent2, "--model", model_path)
    assert_one_line_error(code, stdout, err, "decompose", (latent2.name, "does not belong to this fused volume"))
    assert snapshot(tmp_path) == before
    code, _, err = run_inprocess(capfd, "decompose", fused1, "--output1", tmp_path / "a.nrrd", "--output2",
                                 tmp_path / "b.nrrd", "--latent", latent1, "--model", model_path, "--quiet")
    assert code == 0, err
    source = read_volume(root / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").array
    restored = read_volume(tmp_path / "a.nrrd").array
    assert restored.dtype == np.int16 and np.array_equal(restored, source)


def _near_degenerate(seed: int) -> np.ndarray:
    array = np.zeros(SHAPE, np.uint16)
    array[:, 4:16, 4:20] = 65535 - seed
    array[:, 8:12, 8:12] = 65534 + seed
    return array


def test_near_degenerate_uint16_normalization_round_trips_bit_exactly(tmp_path, model_path, capfd):
    """Item 3: a foreground of 65535/65534 on 0 had percentiles 65534..65535 (scale 1, the
    background at -65534 where the flow does not invert: errors 0.96 and 1.67 before). Now the
    volume falls back to min-max, says so, and the round trip is exact."""
    in1 = write_image(tmp_path / "u1.nrrd", _near_degenerate(0))
    in2 = write_image(tmp_path / "u2.nrrd", _near_degenerate(1))
    fused, latent = _fuse_cli(capfd, tmp_path, in1, in2, model_path)
    notes = read_record(fused, read_volume(fused))["notes"]
    assert sum("normalized by min-max instead" in note for note in notes) == 2, notes
    code, _, err = run_inprocess(capfd, "decompose", fused, "--output1", tmp_path / "d1.nrrd", "--output2",
                                 tmp_path / "d2.nrrd", "--latent", latent, "--model", model_path, "--quiet")
    assert code == 0, err
    for source, restored in ((in1, "d1.nrrd"), (in2, "d2.nrrd")):
        back = read_volume(tmp_path / restored).array
        assert back.dtype == np.uint16 and np.array_equal(back, read_volume(source).array)


def test_a_model_with_nan_weights_is_refused_everywhere(tmp_path, capfd):
    """Item 4: NaN weights wrote an all-NaN fused NRRD with exit 0; refused at load, by fuse,
    decompose, batch and the training CLI's --init-model."""
    from FusionINNLib.io.checkpoint import CheckpointError, load_checkpoint

    flow = FusionFlow(seed=3)
    with torch.no_grad():
        next(p for p in flow.parameters() if p.is_floating_point()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="not written: 1 weight tensor"):
        save_checkpoint(tmp_path / "refused.pt", flow)  # what training saves: never a NaN model
    assert list(tmp_path.iterdir()) == []
    model = tmp_path / "nan.pt"  # as a diverged run of an older version (or another tool) wrote it
    torch.save({"format": "fusioninn-checkpoint", "format_version": FORMAT_VERSION, "config": flow.config.to_dict(),
                "state_dict": flow.graph.state_dict(), "metadata": {}}, model)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        load_checkpoint(model)
    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--model", model)
    assert_one_line_error(code, out, err, "fuse", ("nan.pt", "NaN/Inf", "diverged"))
    assert snapshot(tmp_path) == before
    root = tmp_path / "cases"
    _two_batch_cases(root)
    code, out, err = run_inprocess(capfd, "batch", root, "-o", tmp_path / "out", "--model", model, "--quiet")
    assert_one_line_error(code, out, err, "batch", ("nan.pt", "NaN/Inf"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*fused*"))
    from FusionINNLib.io.phantom import write_phantom_cases

    write_phantom_cases(tmp_path / "phantoms", cases=2, shape=(16, 32, 32), seed=0)
    code, out, err = run_inprocess(capfd, "train", tmp_path / "phantoms", "-o", tmp_path / "trained.pt",
                                   "--init-model", model, "--epochs", "1", "--batch-size", "4", "--labels", "brain",
                                   "--crop-size", "16", "--cache-dir", tmp_path / "cache", "--device", "cpu", "--quiet")
    assert_one_line_error(code, out, err, "train", ("nan.pt", "NaN/Inf"))
    assert not (tmp_path / "trained.pt").exists()


def test_a_network_that_outputs_nan_writes_nothing(tmp_path, fused_set, capfd):
    """Item 4, second guard: finite but huge weights (x1e18, a real model) overflow to NaN in the
    network; every fused and decomposed volume is checked before it is written."""
    flow = FusionFlow(seed=3)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.is_floating_point():
                parameter.mul_(1e18)
    model = save_checkpoint(tmp_path / "huge.pt", flow)  # finite weights: loads and saves
    in1, in2 = _pair(brain())(tmp_path)
    _copy_fused(fused_set, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--latent", tmp_path / "l.nrrd",
                                   "--model", model, "--device", "cpu", "--quiet")
    assert_one_line_error(code, out, err, "fuse", ("huge.pt", "produced NaN/Inf values"))
    code, out, err = run_inprocess(capfd, "decompose", tmp_path / "f.nii.gz", "--output1", tmp_path / "a.nrrd",
                                   "--output2", tmp_path / "b.nrrd", "--model", model, "--ignore-model-mismatch",
                                   "--device", "cpu", "--quiet")
    assert code == 1 and "produced NaN/Inf values" in err.strip().splitlines()[-1], err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_while_writing_removes_the_temporary_files(signal_name, code, tmp_path, model_path, capfd,
                                                           monkeypatch):
    """Item 5: SIGTERM (or SIGHUP, a closed terminal) arrives after the first output file was
    written to its temporary sibling (the real signal, to this process, with the real handler the
    CLI installs)."""
    import signal

    from FusionINNLib.io.volume import OutputSet

    if not hasattr(signal, signal_name):
        pytest.skip(f"no {signal_name} on this platform")
    number = getattr(signal, signal_name)

    in1, in2 = _pair(brain())(tmp_path)
    before = snapshot(tmp_path)
    real_add = OutputSet.add_file

    def add_then_terminate(self, write, path):
        real_add(self, write, path)
        assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # a temporary file is there now
        os.kill(os.getpid(), number)
        os.kill(os.getpid(), number)  # a second one during the clean-up is ignored

    handlers = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", signal_name)}
    monkeypatch.setattr(OutputSet, "add_file", add_then_terminate)
    result, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--latent",
                                     tmp_path / "z.nrrd", "--model", model_path, "--device", "cpu", "--quiet")
    assert result == code and out == ""
    assert err.strip().splitlines() == [f"fusioninn fuse: terminated ({signal_name}); no output written"]
    assert snapshot(tmp_path) == before  # no hidden temporary file, no output
    assert {name: signal.getsignal(getattr(signal, name)) for name in handlers} == handlers  # put back


def test_sigterm_to_the_real_command_mid_run(tmp_path, model_path):
    """Item 5 through a real process: SIGTERM while the network runs; exit 143, one line, no
    output, no temporary file (before: killed silently, 21 MB of hidden files on a real case)."""
    import signal
    import time

    in1 = write_image(tmp_path / "in1.nrrd", brain((48, 64, 64)))
    in2 = write_image(tmp_path / "in2.nrrd", brain((48, 64, 64), seed=1))
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "FusionINNLib.cli", "fuse", str(in1), str(in2), "-o",
                                str(tmp_path / "f.nrrd"), "--latent", str(tmp_path / "z.nrrd"), "--model",
                                str(model_path), "--device", "cpu", "--batch-size", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = b""
    deadline = time.monotonic() + 120
    while b"fuse:" not in seen and time.monotonic() < deadline:  # the progress bar: the network runs
        seen += process.stderr.read1(256)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    lines = (seen + err).decode().replace("\r", "\n").strip().splitlines()
    assert process.returncode == 143, lines
    assert lines[-1] == "fusioninn fuse: terminated (SIGTERM); no output written"
    assert out == b"" and "Traceback" not in "\n".join(lines)
    assert snapshot(tmp_path) == before


def test_likely_mistakes_warn_with_what_was_detected(tmp_path, model_path, capfd):
    """Item 6: a label map, the same file twice, a constant input: fused (a correct result of
    what was given) with one warning line each, also kept in the record."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[:, 5:10, 5:10], seg[:, 12:15, 5:10], seg[:, 5:10, 12:18] = 1, 2, 4
    seg_path = write_image(tmp_path / "seg.nii.gz", seg)
    t1 = write_image(tmp_path / "t1.nii.gz", brain(dtype=np.int16))
    constant = write_image(tmp_path / "const.nii.gz", np.full(SHAPE, 7, np.int16))
    cases = [((t1, seg_path), ("seg.nii.gz looks like a label map", "4 distinct integer values: 0, 1, 2, 4")),
             ((t1, t1), ("t1.nii.gz and", "are the same file")),
             ((constant, t1), ("const.nii.gz is constant (every voxel 7)",))]
    for number, ((in1, in2), needles) in enumerate(cases):
        output = tmp_path / f"f{number}.nrrd"
        code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", output, "--model", model_path, "--device",
                                       "cpu")
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 1 and all(n in warnings[0] for n in needles), err
        assert "fused anyway" in warnings[0]
        assert warnings[0] in read_record(output, read_volume(output))["notes"]
    code, out, err = run_inprocess(capfd, "fuse", t1, write_image(tmp_path / "t2.nii.gz", brain(seed=4)), "-o",
                                   tmp_path / "clean.nrrd", "--model", model_path, "--device", "cpu")
    assert code == 0 and "warning" not in err  # ordinary inputs: no warning


def test_pngs_of_different_sizes_are_refused(tmp_path, model_path, capfd):
    """Item 6: PNGs carry no geometry: 'resampling' one onto the other placed pixels by a guess."""
    in1 = write_image(tmp_path / "p1.png", _noise_2d_uint8())
    in2 = write_image(tmp_path / "p2.png", (np.random.default_rng(2).random((30, 40)) * 255).astype(np.uint8))
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.png", "--model", model_path)
    assert_one_line_error(code, out, err, "fuse", ("p1.png (20 x 24)", "p2.png (30 x 40)", "differ in size",
                                                   "no position or spacing"))
    assert snapshot(tmp_path) == before


def test_metrics_with_the_fused_image_first_is_refused_unless_as_given(tmp_path, fused_set, capfd):
    """Item 6: 'metrics FUSED IN1 IN2' scored the wrong images silently."""
    _copy_fused(fused_set, tmp_path, ("f.nii.gz", "f.fusioninn.json", "t1.nii.gz", "flair.nii.gz"))
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "f.nii.gz", tmp_path / "t1.nii.gz",
                                   tmp_path / "flair.nii.gz")
    assert_one_line_error(code, out, err, "metrics", ("f.nii.gz is a fused image", "INPUT1 INPUT2 FUSED",
                                                      "--as-given"), expected_code=2)
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "f.nii.gz", tmp_path / "t1.nii.gz",
                                   tmp_path / "flair.nii.gz", "--as-given")
    assert code == 0 and "Q_SSIM" in out
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "t1.nii.gz", tmp_path / "flair.nii.gz",
                                   tmp_path / "f.nii.gz")
    assert code == 0 and "Q_SSIM" in out and "warning" not in err
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "t1.nii.gz", tmp_path / "t1.nii.gz",
                                   tmp_path / "f.nii.gz", "--quiet")
    assert code == 0 and "Q_SSIM" in out
    assert err.strip().splitlines() == [f"warning: {tmp_path / 't1.nii.gz'} and {tmp_path / 't1.nii.gz'} are the same "
                                        "file: the fusion is scored against one source twice; give the second source "
                                        "as INPUT2 (scored anyway)"]


def test_decompose_uses_the_model_recorded_by_fuse(tmp_path, model_path, capfd, monkeypatch):
    """Item 7: the README workflow 'fuse --model M', then 'decompose' without --model, from
    another folder: the recorded model (found by path, verified by SHA-256) is used."""
    shutil.copy(model_path, tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    t1 = write_image(tmp_path / "t1.nii.gz", brain(dtype=np.int16))
    flair = write_image(tmp_path / "flair.nii.gz", brain(seed=1, scale=300.0))
    code, _, err = run_inprocess(capfd, "fuse", "t1.nii.gz", "flair.nii.gz", "-o", "f.nrrd", "--latent", "z.nrrd",
                                 "--model", "mine.pt", "--device", "cpu", "--quiet")
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run_inprocess(capfd, "decompose", "../f.nrrd", "--output1", "a.nrrd", "--output2", "b.nrrd",
                                 "--latent", "../z.nrrd", "--device", "cpu")
    assert code == 0, err
    assert "decomposing with the model recorded at fusion" in err and "mine.pt" in err
    assert np.array_equal(read_volume("a.nrrd").array, read_volume(t1).array)
    assert np.abs(read_volume("b.nrrd").array - read_volume(flair).array).max() <= 1e-4 * 300
    (tmp_path / "mine.pt").write_bytes(save_checkpoint(tmp_path / "other.pt", FusionFlow(seed=8)).read_bytes())
    code, out, err = run_inprocess(capfd, "decompose", "../f.nrrd", "--output1", "c.nrrd", "--output2", "d.nrrd",
                                   "--device", "cpu")
    assert_one_line_error(code, out, err, "decompose", ("made with model", "--model"))  # changed file: not used


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
def test_exact_decomposition_returns_integer_sources_bit_exactly(dtype, tmp_path, model_path, capfd):
    """Item 9: int16 came back as float32 (-0.00048, 1791.998); now the source's type, bit-exact,
    unless --float-output."""
    source = (brain(scale=float(min(np.iinfo(dtype).max, 1800)))).astype(dtype)
    in1 = write_image(tmp_path / "in1.nii.gz", source)
    in2 = write_image(tmp_path / "in2.nii.gz", brain(seed=1, scale=300.0))
    fused, latent = _fuse_cli(capfd, tmp_path, in1, in2, model_path)
    code, _, err = run_inprocess(capfd, "decompose", fused, "--output1", tmp_path / "a.nii.gz", "--output2",
                                 tmp_path / "b.nii.gz", "--latent", latent, "--model", model_path, "--quiet")
    assert code == 0, err
    back = read_volume(tmp_path / "a.nii.gz").array
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, source)
    assert read_volume(tmp_path / "b.nii.gz").array.dtype == np.float32  # a float source stays float
    code, _, err = run_inprocess(capfd, "decompose", fused, "--output1", tmp_path / "c.nii.gz", "--output2",
                                 tmp_path / "d.nii.gz", "--latent", latent, "--model", model_path, "--quiet",
                                 "--float-output")
    assert code == 0 and read_volume(tmp_path / "c.nii.gz").array.dtype == np.float32


def test_full_range_int32_stays_float_with_a_note(tmp_path, model_path):
    """Item 9: 32 bits do not survive a float32 network: float32 output and a note, never a
    wrongly rounded integer image."""
    from FusionINNLib.io.checkpoint import load_checkpoint
    from FusionINNLib.jobs.pipeline import decompose_volume, fuse_volumes

    model = load_checkpoint(model_path)
    fused = fuse_volumes(Volume(_full_range(np.int32)), Volume(brain()), model, device="cpu", keep_latent=True,
                         log=lambda m: None)
    result = decompose_volume(fused.fused, fused.record, model, latent=fused.latent, device="cpu", log=lambda m: None)
    assert result.source1.array.dtype == np.float32
    assert any("written as float32, not int32" in note for note in result.notes)


def test_empty_mask_is_refused(tmp_path, fused_set, capfd):
    """Item 10: an empty mask printed a table of NaN (and a MetricWarning with a source line)."""
    _copy_fused(fused_set, tmp_path, ("f.nii.gz", "t1.nii.gz", "flair.nii.gz"))
    write_image(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8))
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "t1.nii.gz", tmp_path / "flair.nii.gz",
                                   tmp_path / "f.nii.gz", "--mask", tmp_path / "mask.nii.gz")
    assert_one_line_error(code, out, err, "metrics", ("mask is empty",))
    assert "nan" not in out.lower()


# -- item 8: messages in one line, in words -------------------------------------------------------
@pytest.mark.parametrize("output", ["", ".", "sub/.."])
def test_empty_output_name_is_refused_in_words(output, tmp_path, model_path, capfd):
    in1, in2 = _pair(brain())(tmp_path)
    (tmp_path / "sub").mkdir()
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", output, "--model", model_path)
    assert_one_line_error(code, out, err, "fuse", ("output file name is empty",))
    assert "PosixPath" not in err and snapshot(tmp_path) == before


@pytest.mark.parametrize("content, needle", [
    (b"hello, this is a text file\n", "the file holds something else"),
    (None, "damaged or truncated file"),  # random bytes after a zip header
    (b"", "the file is empty"),
])
def test_unreadable_checkpoints_say_why_in_words(content, needle, tmp_path, capfd):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04" + np.random.default_rng(0).bytes(3000) if content is None else content)
    in1, in2 = _pair(brain())(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--model", path)
    assert_one_line_error(code, out, err, "fuse", ("model.pt: not a readable PyTorch checkpoint", needle))
    assert "weights_only" not in err and "(101)" not in err and len(err) < 200


def _tmpfs(folder: Path, options: str) -> Path:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    return folder


def test_a_full_disk_says_no_space_left(tmp_path, model_path, capfd):
    """Item 8: ITK's text ('... ITK ERROR: NrrdImageIO(0x55...): Write: Error writing /tmp/...',
    cut at 200 characters) never said why; a real 200 KB file system, filled by the fused image."""
    full = _tmpfs(tmp_path / "full", "size=200k")
    try:
        in1 = write_image(tmp_path / "in1.nrrd", brain((40, 64, 64)))
        in2 = write_image(tmp_path / "in2.nrrd", brain((40, 64, 64), seed=1))
        code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", full / "f.nrrd", "--latent", full / "z.nrrd",
                                       "--model", model_path, "--device", "cpu", "--quiet")
        assert_one_line_error(code, out, err, "fuse", ("no space left on device",))
        assert "ITK ERROR" not in err and "0x" not in err
        assert list(full.iterdir()) == []  # no half-written or temporary file
        # the disk full already for the record sidecar (a Python write, not ITK): the target is named
        filler = full / "filler.bin"
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", full / "f.nrrd", "--model", model_path,
                                       "--device", "cpu", "--quiet")
        assert_one_line_error(code, out, err, "fuse", ("f.fusioninn.json: no space left on device",))
        assert ".tmp" not in err and "Errno" not in err
        assert [p.name for p in full.iterdir()] == ["filler.bin"]
    finally:
        subprocess.run(["umount", str(full)], check=False)


def test_a_read_only_folder_is_worded_without_errno(tmp_path, capfd):
    """Item 8: 'fusioninn demo: error: [Errno 30] Read-only file system: ...'."""
    read_only = _tmpfs(tmp_path / "ro", "size=1m,ro")
    try:
        code, out, err = run_inprocess(capfd, "demo", "--output", read_only / "demo", "--quiet")
        assert_one_line_error(code, out, err, "demo", ("read-only file system",))
        assert "Errno" not in err
    finally:
        subprocess.run(["umount", str(read_only)], check=False)


def test_usage_errors_exit_2_in_one_line(tmp_path, fused_set, capfd):
    """Item 8: options that do not go together are usage errors (exit 2, as the README says)."""
    _copy_fused(fused_set, tmp_path)
    code, out, err = run_inprocess(capfd, "decompose", tmp_path / "f.nii.gz", "--output1", tmp_path / "a.nrrd",
                                   "--output2", tmp_path / "b.nrrd", "--samples", "1", "--std1", tmp_path / "s1.nrrd",
                                   "--std2", tmp_path / "s2.nrrd")
    assert_one_line_error(code, out, err, "decompose", ("standard-deviation maps need --samples 2",),
                          expected_code=2)
    code, out, err = run_inprocess(capfd, "batch", tmp_path, "-o", tmp_path / "out", "--pattern1", "*_t1.nii.gz")
    assert_one_line_error(code, out, err, "batch", ("--pattern1 and --pattern2",), expected_code=2)


def test_metric_warnings_never_show_python_source_lines(tmp_path, capfd):
    """Item 8: 'cli.py:258: MetricWarning: ...' followed by the source line; warnings that reach
    the user are one line each."""
    for name, seed in (("a.png", 0), ("b.png", 1), ("f.png", 2)):
        write_image(tmp_path / name, (np.random.default_rng(seed).random((12, 12)) * 255).astype(np.uint8))
    code, out, err = run_inprocess(capfd, "metrics", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "f.png")
    assert code == 0, err
    assert "MetricWarning" not in err and ".py:" not in err and "warnings.warn" not in err
    import warnings

    from FusionINNLib.cli import _warning_line

    assert _warning_line("a\nb", UserWarning, "x.py", 3) == "warning: a b\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert warnings.formatwarning is not _warning_line  # main() put the formatter back


def test_sigterm_in_a_batch_keeps_finished_cases_and_writes_the_summary(tmp_path, model_path, capfd, monkeypatch):
    """Item 5 in batch: SIGTERM while case 2 is written; case 1 stays, case 2 leaves nothing, the
    summary says which, exit 143 with one line."""
    import signal

    from FusionINNLib.jobs import pipeline

    root, out = tmp_path / "cases", tmp_path / "out"
    _two_batch_cases(root)
    real_write = pipeline.write_fused
    calls = []

    def write_then_terminate(result, path, latent_path=None):
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(result, path, latent_path)

    monkeypatch.setattr(pipeline, "write_fused", write_then_terminate)
    code, stdout, err = run_inprocess(capfd, "batch", root, "-o", out, "--latent", "--model", model_path, "--device",
                                      "cpu", "--quiet")
    assert code == 143 and stdout == ""
    assert err.strip().splitlines() == [
        "fusioninn batch: terminated (SIGTERM); the cases finished before are kept and listed in the summary"]
    rows = {row["case"][-5:]: row for row in _read_tsv(out / "summary.tsv")}
    assert rows["00001"]["status"] == "ok" and rows["00002"]["status"] == "cancelled"
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporary file
    assert [n for n in names if "00002" in n] == [] and any("00001_fused" in n for n in names)


def test_sigterm_to_a_training_run_keeps_its_last_complete_epoch(tmp_path):
    """Item 5 in the training CLI: one line, exit 143, no temporary file in the run folder; what
    is there (last.pt) is a complete checkpoint."""
    import signal
    import time

    from FusionINNLib.io.checkpoint import load_checkpoint
    from FusionINNLib.io.phantom import write_phantom_cases

    write_phantom_cases(tmp_path / "data", cases=3, shape=(16, 32, 32), seed=0)
    env = dict(os.environ, PYTHONPATH=str(REPO / "FusionINN"), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "FusionINNLib.cli", "train", str(tmp_path / "data"), "-o",
                                str(tmp_path / "m.pt"), "--epochs", "500", "--batch-size", "2", "--labels", "brain",
                                "--crop-size", "16", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = b""
    deadline = time.monotonic() + 180
    while b"train:" not in seen and time.monotonic() < deadline:  # the first progress update
        seen += process.stderr.read1(256)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=180)
    lines = (seen + err).decode().replace("\r", "\n").strip().splitlines()
    assert process.returncode == 143, lines
    assert lines[-1].startswith("fusioninn train: terminated (SIGTERM); the last complete epoch is kept")
    assert "Traceback" not in "\n".join(lines)
    run = tmp_path / "m_run"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == [] and not (tmp_path / "m.pt").exists()
    if (run / "last.pt").exists():
        load_checkpoint(run / "last.pt")


def test_values_that_do_not_fit_a_png_are_refused_not_clipped(tmp_path, model_path, capfd):
    """A decomposed source with negative values written to PNG (0..65535 integers) was clipped
    to 0 without a word."""
    source = (brain((1, 20, 24)) - 300.0).astype(np.float32)[0]  # -300..400
    in1 = write_image(tmp_path / "in1.nrrd", source)
    in2 = write_image(tmp_path / "in2.nrrd", brain((1, 20, 24), seed=1)[0])
    fused, latent = _fuse_cli(capfd, tmp_path, in1, in2, model_path)
    before = snapshot(tmp_path)
    code, out, err = run_inprocess(capfd, "decompose", fused, "--output1", tmp_path / "a.png", "--output2",
                                   tmp_path / "b.nrrd", "--latent", latent, "--model", model_path, "--quiet")
    assert_one_line_error(code, out, err, "decompose", ("a.png", "do not fit the 0..65535 integers"))
    assert snapshot(tmp_path) == before


def test_a_fused_image_given_to_fuse_is_warned_about(tmp_path, fused_set, model_path, capfd):
    _copy_fused(fused_set, tmp_path, ("f.nii.gz", "f.fusioninn.json", "flair.nii.gz"))
    code, out, err = run_inprocess(capfd, "fuse", tmp_path / "f.nii.gz", tmp_path / "flair.nii.gz", "-o",
                                   tmp_path / "again.nrrd", "--model", model_path, "--device", "cpu")
    assert code == 0, err
    assert "warning: " + str(tmp_path / "f.nii.gz") + " is a fused image (it has a fusion record)" in err


def test_a_record_of_another_fusion_is_warned_about(tmp_path, model_path, capfd):
    """The fused record holds the SHA-256 of its fused voxels: a sidecar copied next to another
    fused image of the same shape (whose source units it would give) is noticed."""
    root, out = tmp_path / "cases", tmp_path / "out"
    _two_batch_cases(root)
    code, _, err = run_inprocess(capfd, "batch", root, "--output", out, "--model", model_path, "--device", "cpu",
                                 "--quiet")
    assert code == 0, err
    fused1 = next(out.glob("*00001_fused.nii.gz"))
    args = ["decompose", fused1, "--output1", tmp_path / "a.nrrd", "--output2", tmp_path / "b.nrrd", "--model",
            model_path, "--device", "cpu"]
    code, _, err = run_inprocess(capfd, *args)
    assert code == 0 and "differs from the fused image" not in err, err
    shutil.copy(next(out.glob("*00002_fused.fusioninn.json")), record_sidecar(fused1))
    code, _, err = run_inprocess(capfd, *args)
    assert code == 0 and "differs from the fused image its fusion record was written with" in err, err


def test_quiet_hides_progress_but_never_a_warning(tmp_path, model_path, capfd):
    """A clamped or guessed result must not pass without a word, even with --quiet."""
    t1 = write_image(tmp_path / "t1.nii.gz", brain(dtype=np.int16))
    code, out, err = run_inprocess(capfd, "fuse", t1, t1, "-o", tmp_path / "f.nrrd", "--model", model_path,
                                   "--device", "cpu", "--quiet")
    assert code == 0 and err.strip().splitlines() == [line for line in err.strip().splitlines()
                                                      if line.startswith("warning: ")]
    assert "are the same file" in err and "wrote" not in err and "fuse:" not in err


@pytest.mark.parametrize("args, needle", [
    (["fuse", "a.nrrd"], "the following arguments are required: input2, --output/-o"),
    (["decompose", "f.nrrd", "--output1", "a", "--output2", "b", "--temperature", "-1"], "--temperature"),
    (["metrics", "a", "b", "f", "--data-range", "-1"], "argument --data-range: must be a finite number > 0"),
    ([], "the following arguments are required: COMMAND"),
])
def test_argument_errors_are_one_line_with_exit_2(args, needle):
    """argparse printed its whole usage block before the error; now one line like every other error."""
    done = run_subprocess(*args, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
    assert lines[0].startswith("fusioninn") and "--help" in lines[0] and done.stdout == ""


def test_a_sidecar_of_another_file_with_the_same_stem_is_not_taken_for_this_one(tmp_path, model_path, capfd):
    """fuse case.nii.gz ... -o case.nrrd writes case.fusioninn.json, which also sits next to the
    source case.nii.gz: the source is not a fused image (the record's fused_sha256 says whose it is)."""
    source = write_image(tmp_path / "case.nii.gz", brain(dtype=np.int16))
    flair = write_image(tmp_path / "flair.nii.gz", brain(seed=1, scale=300.0))
    args = ["--model", model_path, "--device", "cpu"]
    code, _, err = run_inprocess(capfd, "fuse", source, flair, "-o", tmp_path / "case.nrrd", *args)
    assert code == 0 and (tmp_path / "case.fusioninn.json").is_file()
    code, _, err = run_inprocess(capfd, "fuse", source, flair, "-o", tmp_path / "again.nrrd", *args)
    assert code == 0 and "is a fused image" not in err, err
    code, out, err = run_inprocess(capfd, "metrics", source, flair, tmp_path / "again.nrrd")
    assert code == 0 and "Q_SSIM" in out


def test_an_unwritable_folder_is_named_not_the_temporary_file(tmp_path, model_path, capfd):
    """'/proc/.x.nrrd.fozgjp3o.tmp.nrrd: no such file or directory' named a file the user never
    asked for; the folder is named instead."""
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc (a folder where no file can be created, even as root)")
    in1, in2 = _pair(brain())(tmp_path)
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", "/proc/fused.nrrd", "--model", model_path)
    assert_one_line_error(code, out, err, "fuse", ("/proc: cannot create a file in this folder",))
    assert ".tmp" not in err


def test_a_partial_overlap_is_warned_about(tmp_path, model_path, capfd):
    """Input 2 shifted by half its width: outside it the resampled image is 0, which was only
    called 'resampled'; now the coverage is said, as a warning below 90 %."""
    in1 = write_image(tmp_path / "in1.nrrd", brain())
    in2 = write_image(tmp_path / "in2.nrrd", brain(seed=1), origin=(12.0, 0.0, 0.0))
    code, out, err = run_inprocess(capfd, "fuse", in1, in2, "-o", tmp_path / "f.nrrd", "--model", model_path,
                                   "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "warning: input 2 covers only 50 % of input 1's grid" in err and "co-registered" in err
    notes = read_record(tmp_path / "f.nrrd", read_volume(tmp_path / "f.nrrd"))["notes"]
    assert any("covers only 50 %" in note for note in notes)


def test_a_fused_image_without_its_record_is_warned_about_even_when_quiet(tmp_path, fused_set, model_path, capfd):
    """Without the record the decomposition is in normalized units, not the sources': a warning."""
    shutil.copy(fused_set / "f.nii.gz", tmp_path / "f.nii.gz")  # the sidecar left behind
    code, out, err = run_inprocess(capfd, "decompose", tmp_path / "f.nii.gz", "--output1", tmp_path / "a.nrrd",
                                   "--output2", tmp_path / "b.nrrd", "--model", model_path, "--device", "cpu",
                                   "--quiet")
    assert code == 0 and out == ""
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any("has no fusion record" in w and "normalized units" in w for w in warnings), err
