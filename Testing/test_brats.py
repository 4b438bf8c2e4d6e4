"""BraTS discovery across namings, subject split, slice selection and the slice cache."""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from FusionINNLib.io import brats
from FusionINNLib.io.brats import (
    DEFAULT_LABEL_RULE,
    MODALITY_ALIASES,
    Case,
    canonical_modality,
    discover_cases,
    load_case_slices,
    parse_label_rule,
    read_split,
    select_slices,
    split_subjects,
    subject_id_from_name,
    write_split,
)
from FusionINNLib.io.phantom import write_phantom_cases

TINY = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)


def write_image(path: Path, array: np.ndarray = TINY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def make_case(folder: Path, names: dict) -> Path:
    """names: modality key → file name; writes a tiny image for each."""
    for file_name in names.values():
        write_image(folder / file_name)
    return folder


NAMINGS = {
    "brats2021": ("BraTS2021_00042", {
        "t1": "BraTS2021_00042_t1.nii.gz", "t1ce": "BraTS2021_00042_t1ce.nii.gz",
        "t2": "BraTS2021_00042_t2.nii.gz", "flair": "BraTS2021_00042_flair.nii.gz",
        "seg": "BraTS2021_00042_seg.nii.gz"}),
    "brats2023": ("BraTS-GLI-00007-001", {
        "t1": "BraTS-GLI-00007-001-t1n.nii.gz", "t1ce": "BraTS-GLI-00007-001-t1c.nii.gz",
        "t2": "BraTS-GLI-00007-001-t2w.nii.gz", "flair": "BraTS-GLI-00007-001-t2f.nii.gz",
        "seg": "BraTS-GLI-00007-001-seg.nii.gz"}),
    "brats2013_export": ("brats_2013_pat0005_1", {
        "t1": "T1_subtrMeanDivStd.nii", "t1ce": "T1c_subtrMeanDivStd.nii",
        "t2": "T2_subtrMeanDivStd.nii", "flair": "Flair_subtrMeanDivStd.nii",
        "seg": "OTMultiClass.nii", "brainmask": "brainmask.nii"}),
    "brats2015_original": ("brats_tcia_pat101_1", {
        "t1": "VSD.Brain.XX.O.MR_T1.54512.mha", "t1ce": "VSD.Brain.XX.O.MR_T1c.54513.mha",
        "t2": "VSD.Brain.XX.O.MR_T2.54514.mha", "flair": "VSD.Brain.XX.O.MR_Flair.54515.mha",
        "seg": "VSD.Brain_3more.XX.O.OT.54517.mha"}),
    "brats_toolkit": ("patient7", {
        "t1": "patient7_t1_pp.nrrd", "t1ce": "patient7_t1c_pp.nrrd",
        "t2": "patient7_t2_pp.nrrd", "flair": "patient7_fla_pp.nrrd"}),
    "t1gd_spelling": ("subjectX", {
        "t1ce": "subjectX_T1_Gd.nii.gz", "flair": "subjectX_T2_FLAIR.nii.gz", "t1": "subjectX_T1.nii.gz"}),
}


@pytest.mark.parametrize("naming", sorted(NAMINGS))
@pytest.mark.parametrize("pair", [("t1ce", "flair"), ("t1", "t2"), ("T1c", "t2f"), ("t1gd", "fla")])
def test_each_naming_finds_the_right_files(tmp_path, naming, pair):
    folder_name, names = NAMINGS[naming]
    make_case(tmp_path / "data" / folder_name, names)
    canonical = [canonical_modality(m) for m in pair]
    if not all(c in names for c in canonical):
        with pytest.raises(ValueError, match="no case"):
            discover_cases(tmp_path / "data", pair)
        return
    result = discover_cases(tmp_path / "data", pair)
    assert len(result.cases) == 1 and not result.skipped
    case = result.cases[0]
    assert case.case_dir == tmp_path / "data" / folder_name
    assert {name: path.name for name, path in case.paths.items()} == {
        requested: names[c] for requested, c in zip(pair, canonical)
    }
    assert (case.seg.name if case.seg else None) == names.get("seg")
    assert case.path("t1ce" if "t1ce" in canonical else "t1").name == names[canonical[0]]


def test_aliases_cover_the_documented_spellings():
    for canonical, spellings in {
        "t1ce": ("t1ce", "t1c", "t1gd", "T1c"),
        "flair": ("flair", "t2f", "fla", "Flair"),
        "t1": ("t1", "t1n"),
        "t2": ("t2", "t2w"),
        "seg": ("seg", "OTMultiClass", "label"),
    }.items():
        assert all(canonical_modality(s) == canonical for s in spellings)
        assert all(s.lower() in MODALITY_ALIASES[canonical] for s in spellings)
    assert canonical_modality("DWI") == "dwi"


def test_unlisted_modality_names_work_by_exact_token(tmp_path):
    make_case(tmp_path / "p1", {"a": "p1_dwi.nii.gz", "b": "p1_adc.nii.gz", "c": "p1_adcmap.nii.gz"})
    case = discover_cases(tmp_path, ("dwi", "adc")).cases[0]
    assert case.paths["adc"].name == "p1_adc.nii.gz"


def test_nested_folders_and_case_folder_is_the_one_holding_files(tmp_path):
    make_case(tmp_path / "site_a" / "hgg" / "BraTS2021_00001", {
        "t1ce": "BraTS2021_00001_t1ce.nii.gz", "flair": "BraTS2021_00001_flair.nii.gz"})
    make_case(tmp_path / "site_b" / "BraTS-GLI-00002-000", {
        "t1ce": "BraTS-GLI-00002-000-t1c.nii.gz", "flair": "BraTS-GLI-00002-000-t2f.nii.gz"})
    (tmp_path / "site_a" / "README.txt").write_text("not an image")
    write_image(tmp_path / "site_a" / "hgg" / "BraTS2021_00001" / ".hidden_t1ce.nii.gz")
    result = discover_cases(tmp_path)
    assert [c.case_id for c in result.cases] == ["BraTS2021_00001", "BraTS-GLI-00002-000"]
    assert not result.skipped
    assert "Found 2 case(s) of 2 subject(s)" in result.summary()


def test_symlink_loop_terminates_and_visits_each_folder_once(tmp_path):
    case_dir = make_case(tmp_path / "BraTS2021_00003", {
        "t1ce": "BraTS2021_00003_t1ce.nii.gz", "flair": "BraTS2021_00003_flair.nii.gz"})
    os.symlink(tmp_path, case_dir / "loop_to_root")
    os.symlink(case_dir, tmp_path / "alias_of_case")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    result = discover_cases(tmp_path)
    assert len(result.cases) == 1


def test_missing_modality_is_reported_not_silently_dropped(tmp_path):
    make_case(tmp_path / "BraTS2021_00001", {
        "t1ce": "BraTS2021_00001_t1ce.nii.gz", "flair": "BraTS2021_00001_flair.nii.gz"})
    make_case(tmp_path / "BraTS2021_00002", {"t1ce": "BraTS2021_00002_t1ce.nii.gz",
                                             "seg": "BraTS2021_00002_seg.nii.gz"})
    result = discover_cases(tmp_path)
    assert [c.case_id for c in result.cases] == ["BraTS2021_00001"]
    assert result.skipped == [(tmp_path / "BraTS2021_00002", "no flair image")]
    assert "BraTS2021_00002: no flair image" in result.summary()
    with pytest.raises(ValueError, match="no segmentation"):
        discover_cases(tmp_path, require_seg=True)


def test_two_candidates_for_one_modality_are_reported(tmp_path):
    make_case(tmp_path / "case", {"a": "T1c_a.nii.gz", "b": "T1c_b.nii.gz", "c": "Flair.nii.gz"})
    make_case(tmp_path / "case2", {"a": "t1ce.nii.gz", "b": "t1ce.mha", "c": "flair.nii.gz"})
    with pytest.raises(ValueError) as error:
        discover_cases(tmp_path)
    assert "2 candidates for t1ce: T1c_a.nii.gz, T1c_b.nii.gz" in str(error.value)
    assert "2 candidates for t1ce: t1ce.mha, t1ce.nii.gz" in str(error.value)


def test_flat_folder_with_several_cases_is_split_by_file_name(tmp_path):
    folder = tmp_path / "flat"
    for subject in ("BraTS-GLI-00010-000", "BraTS-GLI-00010-001", "BraTS-GLI-00011-000"):
        make_case(folder, {"t1ce": f"{subject}-t1c.nii.gz", "flair": f"{subject}-t2f.nii.gz",
                           "seg": f"{subject}-seg.nii.gz"})
    write_image(folder / "BraTS-GLI-00012-000-t1c.nii.gz")
    result = discover_cases(folder)
    assert [c.case_id for c in result.cases] == [
        "BraTS-GLI-00010-000", "BraTS-GLI-00010-001", "BraTS-GLI-00011-000"]
    assert [c.subject_id for c in result.cases] == ["BraTS-GLI-00010"] * 2 + ["BraTS-GLI-00011"]
    assert all(c.seg.name == f"{c.case_id}-seg.nii.gz" for c in result.cases)
    assert len(result.skipped) == 1 and "no flair image" in result.skipped[0][1]


def test_extra_variant_file_in_a_case_folder_becomes_its_own_skipped_entry(tmp_path):
    make_case(tmp_path / "p9", {"a": "t1ce.nii.gz", "b": "flair.nii.gz", "c": "t1ce_norm.nii.gz"})
    result = discover_cases(tmp_path)
    assert [(c.case_id, c.subject_id, c.paths["t1ce"].name) for c in result.cases] == [("p9", "p9", "t1ce.nii.gz")]
    assert result.skipped == [(tmp_path / "p9" / "norm*", "no flair image")]


def test_missing_or_empty_root_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        discover_cases(tmp_path / "nope")
    with pytest.raises(ValueError, match="no case with t1ce \\+ flair"):
        discover_cases(tmp_path)
    write_image(tmp_path / "brainmask.nii.gz")
    with pytest.raises(ValueError, match="no case"):
        discover_cases(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        discover_cases(tmp_path / "brainmask.nii.gz")


@pytest.mark.parametrize("modalities", [("t1ce", "t1c"), ("seg", "flair"), (), ("",)])
def test_bad_modality_requests(tmp_path, modalities):
    with pytest.raises(ValueError):
        discover_cases(tmp_path, modalities)


def test_subject_ids():
    assert subject_id_from_name("BraTS-GLI-00001-000") == "BraTS-GLI-00001"
    assert subject_id_from_name("BraTS-MEN-01234-002") == "BraTS-MEN-01234"
    assert subject_id_from_name("BraTS2021_00042") == "BraTS2021_00042"
    assert subject_id_from_name("brats_tcia_pat123_1") == "brats_tcia_pat123"
    assert subject_id_from_name("Patient_7_scan2", r"^(Patient_\d+)_") == "Patient_7"


def _cases(subjects):
    return [Case(subject_id=s, case_dir=Path(f"/d/{s}/{i}"), paths={}, case_id=f"{s}-{i}")
            for i, s in enumerate(subjects)]


@settings(max_examples=60, deadline=None)
@given(
    subjects=st.lists(st.sampled_from([f"S{i}" for i in range(12)]), min_size=1, max_size=30),
    fraction=st.floats(min_value=0.01, max_value=0.95),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_split_is_by_subject_deterministic_and_order_independent(subjects, fraction, seed):
    cases = _cases(subjects)
    train, val = split_subjects(cases, fraction, seed)
    train_subjects = {c.subject_id for c in train}
    val_subjects = {c.subject_id for c in val}
    assert not train_subjects & val_subjects
    assert sorted(c.case_id for c in train + val) == sorted(c.case_id for c in cases)
    if len(set(subjects)) >= 2:
        assert train and val
    else:
        assert not val
    again = split_subjects(list(reversed(cases)), fraction, seed)
    assert sorted(c.case_id for c in again[1]) == sorted(c.case_id for c in val)


def test_split_keeps_time_points_together_and_changes_with_seed(tmp_path):
    folder = tmp_path / "flat"
    for subject in range(6):
        for time_point in range(2):
            name = f"BraTS-GLI-{subject:05d}-{time_point:03d}"
            make_case(folder, {"t1ce": f"{name}-t1c.nii.gz", "flair": f"{name}-t2f.nii.gz"})
    cases = discover_cases(folder).cases
    splits = set()
    for seed in range(8):
        train, val = split_subjects(cases, 0.34, seed)
        assert len(val) == 4 and len(train) == 8  # 2 of 6 subjects, both time points each
        assert not {c.subject_id for c in train} & {c.subject_id for c in val}
        splits.add(tuple(sorted(c.subject_id for c in val)))
    assert len(splits) > 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_subjects(cases, 1.0)


def test_write_and_read_split_round_trip(tmp_path):
    cases = _cases(["A", "A", "B", "C"])
    train, val = split_subjects(cases, 0.3, seed=1)
    path = write_split(tmp_path / "run" / "split.json", train, val, seed=1, val_fraction=0.3)
    record = json.loads(path.read_text())
    assert record["seed"] == 1 and set(record["train_subjects"]).isdisjoint(record["val_subjects"])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]
    train2, val2 = read_split(path)
    assert [c.to_dict() for c in train2] == [c.to_dict() for c in train]
    assert [c.to_dict() for c in val2] == [c.to_dict() for c in val]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid split"):
        read_split(tmp_path / "bad.json")


def test_parse_label_rule_forms():
    assert DEFAULT_LABEL_RULE == ((2,), (1, 3))
    assert parse_label_rule("2,1|3") == ((2,), (1, 3))
    assert parse_label_rule((2, (1, 3))) == ((2,), (1, 3))
    assert parse_label_rule((1, 2, 4)) == ((1,), (2,), (4,))
    assert parse_label_rule("1|2|4") == ((1, 2, 4),)
    assert parse_label_rule(4) == ((4,),)
    assert parse_label_rule(None) is None
    for bad in ("2,,x", "", ((),)):
        with pytest.raises(ValueError, match="label rule"):
            parse_label_rule(bad)


def test_select_slices_with_segmentation():
    seg = np.zeros((6, 8, 8), dtype=np.uint8)
    seg[0, 1, 1] = 2              # oedema only
    seg[1, 1, 1], seg[1, 2, 2] = 2, 1   # oedema + necrosis
    seg[2, 1, 1], seg[2, 2, 2] = 2, 3   # oedema + non-enhancing (BraTS 2013 numbering)
    seg[3, 1, 1] = 4              # enhancing only
    seg[4, 1, 1], seg[4, 2, 2] = 1, 4   # no oedema
    image = np.ones_like(seg, dtype=np.float32)
    assert select_slices(seg, image, image).tolist() == [1, 2]
    assert select_slices(seg, image, image, labels="2,1").tolist() == [1]
    assert select_slices(seg, image, image, labels="1|2|3|4").tolist() == [0, 1, 2, 3, 4]
    assert select_slices(seg.astype(np.float32), image, image).tolist() == [1, 2]
    assert select_slices(seg, image, image, labels=4, axis=1).tolist() == [1, 2]  # rows of label 4
    assert select_slices(seg, image, image, min_label_voxels=2).tolist() == []
    with pytest.raises(ValueError, match="segmentation shape"):
        select_slices(seg[:3], image, image)


def test_select_slices_by_brain_content_without_segmentation():
    # z-scored export: background is the volume minimum, not 0
    image1 = np.full((5, 10, 10), -3.0, dtype=np.float32)
    image2 = np.zeros((5, 10, 10), dtype=np.float32)
    image1[1, :5, :5] = 1.0   # 25 % in image 1 but nothing in image 2
    image2[1, :5, :5] = 0.0
    image1[2, :4, :4] = 0.5   # 16 % in both
    image2[2, :4, :4] = 7.0
    image1[3, 0, :3] = 0.5    # 3 % in both
    image2[3, 0, :3] = 7.0
    assert select_slices(None, image1, image2).tolist() == [2]
    assert select_slices(None, image1, image2, min_fraction=0.02).tolist() == [2, 3]
    seg = np.zeros(image1.shape, dtype=np.uint8)
    assert select_slices(seg, image1, image2, labels=None).tolist() == [2]
    with pytest.raises(ValueError, match="same shape"):
        select_slices(None, image1, image2[:, :5])


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_cases(root, cases=2, shape=(24, 48, 40), seed=3)
    return root


def test_phantoms_are_discovered_with_segmentations(phantom_root):
    result = discover_cases(phantom_root, require_seg=True)
    assert [c.case_id for c in result.cases] == ["BraTS2021_Phantom_00000", "BraTS2021_Phantom_00001"]
    assert all(c.seg is not None and c.paths["t1ce"].name.endswith("_t1ce.nii.gz") for c in result.cases)


def test_load_case_slices_shapes_and_normalization(phantom_root):
    case = discover_cases(phantom_root).cases[0]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case.seg)))
    slices1, slices2, indices = load_case_slices(case, ("t1ce", "flair"), labels="2,1|3")
    expected = [z for z in range(seg.shape[0]) if (seg[z] == 2).any() and (seg[z] == 1).any()]
    assert indices.tolist() == expected and len(expected) > 0
    assert slices1.shape == slices2.shape == (len(expected), 48, 40)
    assert slices1.dtype == np.float32
    assert -0.5 < slices1.min() and slices1.max() < 2.0 and np.percentile(slices1, 99) <= 1.05

    per_slice, _, _ = load_case_slices(case, ("t1c", "t2f"), normalization="slice")
    np.testing.assert_allclose(per_slice.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(per_slice.max(axis=(1, 2)), 1.0, atol=1e-6)

    coronal, _, coronal_indices = load_case_slices(case, ("t1ce", "flair"), axis=1, labels=None)
    assert coronal.shape[1:] == (24, 40) and coronal.shape[0] == coronal_indices.size > 0
    with pytest.raises(ValueError, match="exactly two"):
        load_case_slices(case, ("t1ce",))


def test_slice_cache_is_hit_the_second_time(phantom_root, tmp_path, monkeypatch):
    case = discover_cases(phantom_root).cases[1]
    cache = tmp_path / "cache"
    first = load_case_slices(case, ("t1ce", "flair"), cache_dir=cache)
    assert not first.from_cache and first.cache_path.is_file()
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]

    def no_reading(path):
        raise AssertionError(f"image {path} re-read despite a valid cache")

    monkeypatch.setattr(brats, "_read_image", no_reading)
    second = load_case_slices(case, ("t1ce", "flair"), cache_dir=cache)
    assert second.from_cache and isinstance(second[0], np.memmap)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert second.normalization == first.normalization
    restored = pickle.loads(pickle.dumps(second))
    assert restored.from_cache and restored.cache_path == second.cache_path
    np.testing.assert_array_equal(restored[2], second[2])
    # Different settings are a different cache entry: they must read the images again.
    with pytest.raises(AssertionError, match="re-read"):
        load_case_slices(case, ("t1ce", "flair"), cache_dir=cache, normalization="slice")


def test_slice_cache_misses_when_an_input_changes_or_is_corrupt(tmp_path, caplog):
    root = tmp_path / "data"
    write_phantom_cases(root, cases=1, shape=(20, 32, 32), seed=9)
    case = discover_cases(root).cases[0]
    cache = tmp_path / "cache"
    first = load_case_slices(case, ("t1ce", "flair"), cache_dir=cache, labels=None)
    # Rewrite the FLAIR with different content: the fingerprint changes.
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(case.paths["flair"])))
    write_image(case.paths["flair"], flair * 2.0 + 5.0)
    second = load_case_slices(case, ("t1ce", "flair"), cache_dir=cache, labels=None)
    assert not second.from_cache and second.cache_path != first.cache_path
    # A truncated array is detected and rebuilt rather than returned.
    second.cache_path.write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level(logging.WARNING, logger="FusionINNLib.io.brats"):
        third = load_case_slices(case, ("t1ce", "flair"), cache_dir=cache, labels=None)
    assert not third.from_cache and "unreadable slice cache" in caplog.text
    np.testing.assert_array_equal(third[1], second[1])
    assert load_case_slices(case, ("t1ce", "flair"), cache_dir=cache, labels=None).from_cache


def test_mismatched_grids_and_unreadable_files_name_the_file(tmp_path):
    folder = tmp_path / "BraTS2021_00001"
    write_image(folder / "BraTS2021_00001_t1ce.nii.gz", np.ones((4, 6, 5), np.float32))
    write_image(folder / "BraTS2021_00001_flair.nii.gz", np.ones((4, 6, 6), np.float32))
    case = discover_cases(tmp_path).cases[0]
    with pytest.raises(ValueError, match="t1ce.nii.gz has shape .* but BraTS2021_00001_flair.nii.gz has"):
        load_case_slices(case)
    (folder / "BraTS2021_00001_flair.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*flair"):
        load_case_slices(case)


def test_real_brats_folders(shared_data):
    """Holds for any set of real case folders: every folder is found with both modalities, none is
    skipped, subjects are distinct, a folder with a segmentation gets it, the namings known from
    PROVENANCE.md resolve to the right files, and a subject split is disjoint and complete."""
    root = shared_data / "brats"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.nii*")))
    result = discover_cases(root, ("t1ce", "flair"))
    by_name = {c.case_id: c for c in result.cases}
    assert sorted(by_name) == folders and len(folders) >= 3
    assert not result.skipped
    assert len({c.subject_id for c in result.cases}) == len(result.cases)
    for case in result.cases:
        assert case.paths["t1ce"].is_file() and case.paths["flair"].is_file()
        assert case.paths["t1ce"] != case.paths["flair"]
        has_seg = any(("seg" in p.name.lower() or "otmulticlass" in p.name.lower())
                      for p in (root / case.case_id).glob("*.nii*"))
        assert (case.seg is not None) == has_seg, case.case_id
    if "BraTS-GLI-00001-000" in by_name:
        case = by_name["BraTS-GLI-00001-000"]
        assert case.subject_id == "BraTS-GLI-00001"
        assert case.paths["t1ce"].name.endswith("-t1c.nii.gz")
        assert case.paths["flair"].name.endswith("-t2f.nii.gz")
    for name in ("deepmedic_brats_2013_pat0005_1", "deepmedic_brats_2013_pat0006_1"):
        if name in by_name:
            assert by_name[name].paths["t1ce"].name == "T1c_subtrMeanDivStd.nii.gz"
            assert by_name[name].paths["flair"].name == "Flair_subtrMeanDivStd.nii.gz"
            assert by_name[name].seg.name == "OTMultiClass.nii.gz"
    for case in result.cases:
        if case.case_id.startswith("Brats18_"):
            assert case.paths["t1ce"].name == f"{case.case_id}_t1ce.nii.gz"
            assert case.paths["flair"].name == f"{case.case_id}_flair.nii.gz"
    first = result.cases[0]
    slices1, slices2, indices = load_case_slices(first)
    assert slices1.shape == slices2.shape and slices1.shape[0] == indices.size > 0
    train, val = split_subjects(result.cases, 0.2, seed=0)
    train_subjects = {c.subject_id for c in train}
    val_subjects = {c.subject_id for c in val}
    assert not train_subjects & val_subjects
    assert len(train) + len(val) == len(result.cases) and len(val) >= 1


def test_truncated_case_file_is_refused_when_loading_slices(tmp_path):
    from FusionINNLib.io.brats import discover_cases, load_case_slices
    from FusionINNLib.io.phantom import write_phantom_cases

    write_phantom_cases(tmp_path, cases=1, shape=(16, 32, 32), seed=0)
    flair = next(tmp_path.rglob("*_flair.nii.gz"))
    data = flair.read_bytes()
    flair.write_bytes(data[: len(data) // 2])
    case = discover_cases(tmp_path).cases[0]
    with pytest.raises(ValueError, match="flair"):
        load_case_slices(case, labels=None)


def test_training_reads_geometry_and_refuses_misaligned_modalities(tmp_path):
    """The case reader is read_volume (one reader): two modalities of one shape on different grids
    (here: a shifted origin) would pair misaligned voxels, so the case is refused by name."""
    folder = tmp_path / "BraTS2021_00002"
    rng = np.random.default_rng(0)
    write_image(folder / "BraTS2021_00002_t1ce.nii.gz", rng.random((8, 12, 12)).astype(np.float32))
    shifted = sitk.GetImageFromArray(rng.random((8, 12, 12)).astype(np.float32))
    shifted.SetOrigin((0.0, 30.0, 0.0))
    sitk.WriteImage(shifted, str(folder / "BraTS2021_00002_flair.nii.gz"))
    case = discover_cases(tmp_path).cases[0]
    with pytest.raises(ValueError, match="same shape but different geometry"):
        load_case_slices(case, labels=None)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(folder / "BraTS2021_00002_flair.nii.gz"))
    slices1, slices2, _ = load_case_slices(case, labels=None)
    assert slices1.ndim == 3 and slices1.shape == slices2.shape
