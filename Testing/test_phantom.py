"""Synthetic BraTS-style phantoms: determinism, anatomy, MR contrasts and the files on disk."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib.io.phantom import (
    LABEL_ENHANCING,
    LABEL_NECROSIS,
    LABEL_OEDEMA,
    TISSUE_BACKGROUND,
    TISSUE_CSF,
    TISSUE_GREY,
    TISSUE_WHITE,
    make_phantom_case,
    phantom_case_name,
    phantom_case_seed,
    write_phantom_cases,
)

SEEDS = (0, 1, 2, 7)


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    return make_phantom_case(seed=request.param, return_tissue=True)


def test_keys_types_and_shape():
    volumes = make_phantom_case(shape=(20, 40, 36), seed=3)
    assert set(volumes) == {"t1ce", "flair", "seg"}
    assert volumes["t1ce"].dtype == np.float32 and volumes["flair"].dtype == np.float32
    assert volumes["seg"].dtype == np.uint8
    assert all(v.shape == (20, 40, 36) for v in volumes.values())
    assert np.all(np.isfinite(volumes["t1ce"])) and np.all(np.isfinite(volumes["flair"]))


def test_same_seed_same_case_and_different_seed_different_case():
    first = make_phantom_case(shape=(24, 48, 48), seed=5)
    again = make_phantom_case(shape=(24, 48, 48), seed=5)
    other = make_phantom_case(shape=(24, 48, 48), seed=6)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["seg"], other["seg"])
    assert not np.allclose(first["t1ce"], other["t1ce"])


def test_labels_are_brats_2021_and_every_compartment_exists(case):
    labels = set(np.unique(case["seg"]).tolist())
    assert labels == {0, LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING}
    # Sizes a tumour of a few cm has on a 1 mm grid; the core is surrounded by the rim.
    assert np.count_nonzero(case["seg"] == LABEL_NECROSIS) > 100
    assert np.count_nonzero(case["seg"] == LABEL_ENHANCING) > np.count_nonzero(case["seg"] == LABEL_NECROSIS) / 4
    assert np.count_nonzero(case["seg"] == LABEL_OEDEMA) > np.count_nonzero(case["seg"] == LABEL_ENHANCING)


def test_skull_stripped_brain_and_tumour_inside_it(case):
    brain = case["tissue"] != TISSUE_BACKGROUND
    assert 0.15 < brain.mean() < 0.6
    assert np.all(case["t1ce"][~brain] == 0) and np.all(case["flair"][~brain] == 0)
    assert np.all(case["t1ce"][brain] > 0) and np.all(case["flair"][brain] > 0)
    assert not np.any((case["seg"] > 0) & ~brain)
    # The brain does not touch the border of the field of view.
    for axis in range(3):
        assert not brain.take(0, axis=axis).any() and not brain.take(-1, axis=axis).any()
    # All of CSF, cortex and white matter are present in sensible proportions.
    fractions = {
        t: np.count_nonzero(case["tissue"] == t) / brain.sum() for t in (TISSUE_CSF, TISSUE_GREY, TISSUE_WHITE)
    }
    assert fractions[TISSUE_WHITE] > fractions[TISSUE_GREY] > fractions[TISSUE_CSF] > 0.03


def _mean(image, mask):
    assert mask.any()
    return float(image[mask].mean())


def test_t1_gd_contrast_rim_brighter_than_white_matter_brighter_than_necrosis(case):
    white = (case["tissue"] == TISSUE_WHITE) & (case["seg"] == 0)
    rim = _mean(case["t1ce"], case["seg"] == LABEL_ENHANCING)
    wm = _mean(case["t1ce"], white)
    necrosis = _mean(case["t1ce"], case["seg"] == LABEL_NECROSIS)
    assert rim > 1.2 * wm
    assert wm > 1.2 * necrosis


def test_flair_contrast_oedema_bright_and_csf_darkest(case):
    tissue, seg, flair = case["tissue"], case["seg"], case["flair"]
    csf = _mean(flair, (tissue == TISSUE_CSF) & (seg == 0))
    others = {
        "white": _mean(flair, (tissue == TISSUE_WHITE) & (seg == 0)),
        "grey": _mean(flair, (tissue == TISSUE_GREY) & (seg == 0)),
        "oedema": _mean(flair, seg == LABEL_OEDEMA),
        "necrosis": _mean(flair, seg == LABEL_NECROSIS),
        "rim": _mean(flair, seg == LABEL_ENHANCING),
    }
    assert others["oedema"] > 1.3 * others["white"]
    assert all(csf < value for value in others.values()), (csf, others)


def test_bias_field_and_noise_make_white_matter_vary():
    volumes = make_phantom_case(seed=11, return_tissue=True)
    white = volumes["t1ce"][(volumes["tissue"] == TISSUE_WHITE) & (volumes["seg"] == 0)]
    relative_spread = white.std() / white.mean()
    assert 0.02 < relative_spread < 0.25


def test_tumour_position_depends_on_seed():
    centres = []
    for seed in range(4):
        seg = make_phantom_case(shape=(32, 64, 64), seed=seed)["seg"]
        centres.append(np.argwhere(seg == LABEL_ENHANCING).mean(axis=0))
    distances = [np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]]
    assert min(distances) > 1.0


@pytest.mark.parametrize("shape", [(16, 16), (8, 64, 64), (32, 64, "x"), (32, 64, 64, 2)])
def test_invalid_shape_is_rejected(shape):
    with pytest.raises(ValueError, match="shape"):
        make_phantom_case(shape=shape)


def test_write_phantom_cases_brats_2021_layout(tmp_path):
    calls = []
    shape = (18, 40, 32)
    folders = write_phantom_cases(tmp_path / "out", cases=2, shape=shape, seed=4,
                                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert [f.name for f in folders] == ["BraTS2021_Phantom_00000", "BraTS2021_Phantom_00001"]
    for index, folder in enumerate(folders):
        name = phantom_case_name(index)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{name}_{key}.nii.gz" for key in ("t1ce", "flair", "seg")
        )
        expected = make_phantom_case(shape, seed=phantom_case_seed(4, index))
        for key in ("t1ce", "flair", "seg"):
            image = sitk.ReadImage(str(folder / f"{name}_{key}.nii.gz"))
            # numpy (z, y, x) ↔ ITK (x, y, z)
            assert image.GetSize() == (shape[2], shape[1], shape[0])
            assert image.GetSpacing() == (1.0, 1.0, 1.0)
            assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected[key])
        assert sitk.ReadImage(str(folder / f"{name}_seg.nii.gz")).GetPixelID() == sitk.sitkUInt8
    # Cases of one set differ from each other, and a set is reproducible.
    assert phantom_case_seed(4, 0) != phantom_case_seed(4, 1) != phantom_case_seed(5, 1)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").rglob("*"))


def test_write_phantom_cases_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        write_phantom_cases(tmp_path, cases=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_phantom_cases(blocker, cases=1, shape=(16, 16, 16))
