"""The Slicer module's plain-data helpers (FusionINNLib.slicer_support), tested without Slicer."""
from __future__ import annotations

import json
import math
import threading
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib import slicer_support as support
from FusionINNLib.io.volume import Volume


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


# -- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_ijk_to_ras_matches_simpleitk_physical_points(seed):
    """Independent check: ITK's index→LPS point, with x and y negated, is what IJKToRAS gives."""
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.3, 3.0, 3))
    origin = tuple(rng.uniform(-100, 100, 3))
    direction = tuple(_rotation(rng.uniform(-np.pi, np.pi, 3)).reshape(9))
    image = sitk.Image(7, 5, 3, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    matrix = support.itk_geometry_to_ijk_to_ras(spacing, origin, direction)
    for index in [(0, 0, 0), (6, 4, 2), (3, 1, 2), (1, 4, 0)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = matrix @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
        assert ras[3] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_geometry_round_trip(seed):
    rng = np.random.default_rng(100 + seed)
    spacing = tuple(rng.uniform(0.2, 4.0, 3))
    origin = tuple(rng.uniform(-300, 300, 3))
    direction = _rotation(rng.uniform(-np.pi, np.pi, 3))
    if seed % 2:
        direction = direction @ np.diag([1.0, -1.0, 1.0])  # a left-handed (flipped) index frame
    back_spacing, back_origin, back_direction = support.ijk_to_ras_to_itk_geometry(
        support.itk_geometry_to_ijk_to_ras(spacing, origin, tuple(direction.reshape(9))))
    np.testing.assert_allclose(back_spacing, spacing, rtol=1e-12)
    np.testing.assert_allclose(back_origin, origin, atol=1e-9)
    np.testing.assert_allclose(np.reshape(back_direction, (3, 3)), direction, atol=1e-12)


def test_slicer_default_orientation_is_lps_identity():
    """A plain NRRD in Slicer has IJKToRAS diag(-1, -1, 1): identity direction in LPS."""
    spacing, origin, direction = support.ijk_to_ras_to_itk_geometry(np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert spacing == (1.0, 1.0, 1.0)
    assert origin == (0.0, 0.0, 0.0)
    np.testing.assert_allclose(direction, np.eye(3).reshape(9))


@pytest.mark.parametrize("matrix, message", [
    (np.eye(3), "4x4"),
    (np.diag([1.0, 0.0, 1.0, 1.0]), "zero-length"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.1, 0, 0, 1.0]]), "not affine"),
    (np.diag([np.nan, 1.0, 1.0, 1.0]), "NaN"),
])
def test_invalid_ijk_to_ras_is_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        support.ijk_to_ras_to_itk_geometry(matrix)


def test_invalid_itk_geometry_is_refused():
    with pytest.raises(ValueError, match="spacing"):
        support.itk_geometry_to_ijk_to_ras((1.0, 0.0, 1.0), (0, 0, 0), np.eye(3).reshape(9))


def test_compose_transform_applies_parent_after_local():
    local = support.itk_geometry_to_ijk_to_ras((2.0, 2.0, 2.0), (0, 0, 0), np.eye(3).reshape(9))
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 1.0)
    world = support.compose_transform(shift, local)
    np.testing.assert_allclose(world @ [1, 1, 1, 1], [-2 + 5, -2 - 3, 2 + 1, 1])
    with pytest.raises(ValueError):
        support.compose_transform(np.eye(3), local)


def test_ras_to_ijk_index_inverts_the_matrix_and_rounds():
    matrix = support.itk_geometry_to_ijk_to_ras((0.5, 2.0, 3.0), (10.0, 20.0, -5.0),
                                                tuple(_rotation((0.3, -0.2, 1.1)).reshape(9)))
    shape_kji = (6, 9, 11)
    for index in [(0, 0, 0), (10, 8, 5), (4, 2, 3)]:
        ras = (matrix @ [*index, 1.0])[:3] + 0.2 * np.array([0.5, 0.2, -0.3])  # a bit off-centre
        assert support.ras_to_ijk_index(matrix, ras, shape_kji) == index
    outside = (matrix @ [11.0, 0.0, 0.0, 1.0])[:3]
    with pytest.raises(ValueError, match="outside the volume"):
        support.ras_to_ijk_index(matrix, outside, shape_kji)


def test_latent_vector_layout_matches_the_latent_file_format():
    from FusionINNLib.jobs.pipeline import latent_image

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    vector = support.latent_to_vector_array(latent)
    assert vector.shape == (3, 8, 8, 2)
    reference = Volume(np.zeros((3, 8, 8), np.float32))
    np.testing.assert_array_equal(vector, sitk.GetArrayFromImage(latent_image(latent, reference, 0)))
    np.testing.assert_array_equal(support.vector_array_to_latent(vector), latent)
    with pytest.raises(ValueError, match="2 components"):
        support.vector_array_to_latent(np.zeros((3, 8, 8, 3)))
    with pytest.raises(ValueError, match="shape"):
        support.latent_to_vector_array(np.zeros((3, 3, 8, 8)))


# -- names ------------------------------------------------------------------------------------
def test_output_names_follow_the_inputs():
    assert support.fused_volume_name("T1ce", "FLAIR") == "T1ce + FLAIR fused"
    fused = support.fused_volume_name("T1ce", "FLAIR")
    assert support.latent_volume_name(fused) == "T1ce + FLAIR fused latent"
    d1, d2 = support.decomposed_volume_names(fused, ["T1ce", "FLAIR"])
    assert d1.endswith("decomposed T1ce") and d2.endswith("decomposed FLAIR")
    assert support.decomposed_volume_names("F", [])[1] == "F decomposed 2"
    assert support.std_volume_names((d1, d2))[0] == d1 + " std"
    assert "weighted" in support.baseline_volume_name("weighted", "a", "b")
    assert support.jacobian_volume_names("a", "b", (1, 2, 3))[0] == "a Jacobian at ijk 1,2,3"
    assert len(set(support.guidance_volume_names("a", "b"))) == 3
    assert support.difference_volume_name("d", "s") == "d minus s"
    assert support.metrics_table_name(fused).endswith("metrics")


def test_short_name_is_bounded_and_never_empty():
    long = "x" * 30 + "MIDDLE" + "y" * 30
    short = support.short_name(long)
    assert len(short) <= support.MAX_NAME_PART and short.startswith("xxx") and short.endswith("yyy")
    assert support.short_name("   ") == "volume"
    assert support.short_name("a \n b") == "a b"


def test_model_argument():
    assert support.model_argument("bundled", "/some/file.pt") is None
    assert support.model_argument("file", "/models/inn.pt") == "/models/inn.pt"
    for empty in ("", ".", None):
        with pytest.raises(ValueError, match="model file"):
            support.model_argument("file", empty)
    with pytest.raises(ValueError, match="unknown model source"):
        support.model_argument("url", "x")


# -- provenance -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fusion_record():
    from FusionINNLib.io.checkpoint import resolve_model
    from FusionINNLib.jobs.pipeline import fuse_volumes

    rng = np.random.default_rng(1)
    volume1 = Volume(rng.uniform(0, 100, (2, 16, 16)).astype(np.float32))
    volume2 = Volume(rng.uniform(0, 50, (2, 16, 16)).astype(np.float32))
    return fuse_volumes(volume1, volume2, resolve_model(None), device="cpu", log=lambda m: None,
                        input_names=("T1ce", "FLAIR")).record


def test_provenance_of_a_fused_volume_round_trips_the_record(fusion_record):
    attributes = support.provenance_attributes("fused", fusion_record, inputs=("T1ce", "FLAIR"), seed=3,
                                               paper_compatible=True)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items())
    prefix = support.ATTRIBUTE_PREFIX
    assert attributes[support.ROLE_ATTRIBUTE] == "fused"
    assert attributes[prefix + "ModelPath"] == fusion_record["model"]["path"]
    assert attributes[prefix + "ModelSHA256"] == fusion_record["model"]["sha256"]
    assert json.loads(attributes[prefix + "ModelConfig"]) == fusion_record["model"]["config"]
    assert json.loads(attributes[prefix + "Normalization"]) == fusion_record["normalization"]
    assert attributes[prefix + "Device"] == "cpu"
    assert json.loads(attributes[prefix + "Inputs"]) == ["T1ce", "FLAIR"]
    assert attributes[prefix + "Seed"] == "3"
    assert attributes[prefix + "PaperCompatible"] == "true"
    assert support.record_from_attributes(attributes) == json.loads(json.dumps(fusion_record))


def test_only_the_fused_volume_carries_the_record(fusion_record):
    attributes = support.provenance_attributes("decomposed", fusion_record, mode="exact")
    assert support.RECORD_ATTRIBUTE not in attributes
    assert support.record_from_attributes(attributes) is None
    assert attributes[support.ATTRIBUTE_PREFIX + "Mode"] == "exact"


def test_bad_provenance_input_is_refused():
    with pytest.raises(ValueError, match="role"):
        support.provenance_attributes("something")
    with pytest.raises(ValueError, match="not valid JSON"):
        support.record_from_attributes({support.RECORD_ATTRIBUTE: "{oops"})
    with pytest.raises(ValueError, match="not a FusionINN fusion record"):
        support.record_from_attributes({support.RECORD_ATTRIBUTE: "[1, 2]"})
    assert support.attribute_key("paper_compatible") == "PaperCompatible"
    assert support.attribute_key("pointIJK") == "PointIJK"


# -- metrics table ----------------------------------------------------------------------------
def test_metrics_table_columns_are_typed_and_aligned():
    results = {"FusionINN": {"Q_SSIM": 0.8, "EN": 6.5}, "mean": {"Q_SSIM": 0.7}}
    descriptions = {"Q_SSIM": "structural similarity", "EN": {"description": "entropy"}}
    columns = support.metrics_table_columns(results, descriptions, ["EN", "Q_SSIM", "Q_P"])
    assert [c.name for c in columns] == ["Metric", "FusionINN", "mean", "Description"]
    assert [c.type for c in columns] == ["string", "double", "double", "string"]
    assert columns[0].values == ["EN", "Q_SSIM", "Q_P"]
    assert columns[1].values[:2] == [6.5, 0.8] and math.isnan(columns[1].values[2])
    assert math.isnan(columns[2].values[0]) and columns[2].values[1] == 0.7
    assert columns[3].values == ["entropy", "structural similarity", ""]
    assert len({len(c.values) for c in columns}) == 1
    with pytest.raises(ValueError):
        support.metrics_table_columns({})
    with pytest.raises(ValueError, match="column type"):
        support.TableColumn("x", "float", [])


def test_metrics_table_uses_the_metric_suite_order():
    from FusionINNLib.metrics import FUSION_METRIC_NAMES, METRIC_DESCRIPTIONS

    summary = {name: float(i) for i, name in enumerate(reversed(FUSION_METRIC_NAMES))}
    columns = support.metrics_table_columns({"FusionINN": summary}, METRIC_DESCRIPTIONS, FUSION_METRIC_NAMES)
    assert columns[0].values == list(FUSION_METRIC_NAMES)
    assert all(text for text in columns[-1].values)


def test_decomposition_rows():
    values, texts = support.decomposition_rows({2: {"SSIM": 0.5}, 1: {"SSIM": 0.9, "MAE": 0.1}}, {"SSIM": "ssim"})
    assert list(values) == ["Decomposed 1 SSIM (vs input 1)", "Decomposed 1 MAE (vs input 1)",
                            "Decomposed 2 SSIM (vs input 2)"]
    assert texts["Decomposed 2 SSIM (vs input 2)"].endswith("ssim")


# -- layout and display -----------------------------------------------------------------------
@pytest.mark.parametrize("has_decomposition, count", [(True, 5), (False, 3)])
def test_compare_layout_xml(has_decomposition, count):
    views = support.compare_views(has_decomposition)
    root = ET.fromstring(support.compare_layout_xml(views, "Coronal"))
    found = root.findall(".//view")
    assert len(found) == count
    assert [v.get("singletontag") for v in found] == [v.name for v in views]
    assert all(v.get("class") == "vtkMRMLSliceNode" for v in found)
    assert {p.text for p in root.findall(".//property[@name='orientation']")} == {"Coronal"}
    assert len(root.findall("./item/layout")) == (2 if has_decomposition else 1)
    assert {v.role for v in views} <= {"input1", "input2", "fused", "decomposed1", "decomposed2"}
    with pytest.raises(ValueError):
        support.compare_layout_xml(views, "Oblique")


def test_colormaps_named_by_the_module_exist():
    for name in (support.STD_COLORMAP, support.GUIDANCE_COLORMAP, support.DIFFERENCE_COLORMAP):
        assert support.OVERLAY_COLORMAPS[name].startswith("vtkMRML")


def test_symmetric_window_level():
    values = np.concatenate([np.linspace(-2, 2, 1000), [np.nan, 50.0]])
    window, level = support.symmetric_window_level(values)
    assert level == 0.0
    assert 3.9 < window < 2 * 50.0  # the single outlier is not the window
    assert support.symmetric_window_level(np.zeros(5)) == (1.0, 0.0)


# -- dependencies -----------------------------------------------------------------------------
def test_missing_requirements():
    assert support.missing_requirements(lambda name: name != "FrEIA") == ["FrEIA==0.2"]
    assert support.missing_requirements(lambda name: True) == []
    import importlib.util

    # the test environment has the whole core installed, so nothing is missing here
    assert support.missing_requirements(lambda name: importlib.util.find_spec(name) is not None) == []


# -- background job ---------------------------------------------------------------------------
def test_background_job_reports_progress_messages_and_result():
    release = threading.Event()

    def work(progress, is_cancelled, log):
        progress(0.25)
        log("first")
        release.wait(10)
        progress(1.5)  # clamped
        log("second")
        return 42

    job = support.BackgroundJob(work).start()
    deadline = threading.Event()
    for _ in range(200):
        status = job.poll()
        if status.messages:
            break
        deadline.wait(0.01)
    assert status.running and not status.done
    assert status.fraction == 0.25 and status.messages == ["first"]
    assert job.poll().messages == []  # messages are handed out once
    release.set()
    assert job.wait(10)
    final = job.poll()
    assert final.done and not final.running and final.result == 42 and final.error is None
    assert final.fraction == 1.0 and final.messages == ["second"] and not final.cancelled
    with pytest.raises(RuntimeError, match="already started"):
        job.start()


def test_background_job_hands_errors_to_the_poller():
    def work(progress, is_cancelled, log):
        raise ValueError("bad input: file.nrrd")

    job = support.BackgroundJob(work).start()
    assert job.wait(10)
    status = job.poll()
    assert isinstance(status.error, ValueError) and not status.cancelled and status.result is None
    assert support.first_line(status.error) == "bad input: file.nrrd"


def test_background_job_cancels_a_real_fusion():
    """The cancel flag reaches the engine, which stops between batches with Cancelled."""
    from FusionINNLib.core.engine import Cancelled
    from FusionINNLib.io.checkpoint import resolve_model
    from FusionINNLib.jobs.pipeline import fuse_volumes

    rng = np.random.default_rng(2)
    volume = Volume(rng.uniform(0, 1, (64, 16, 16)).astype(np.float32))
    started, cancel_sent = threading.Event(), threading.Event()
    model = resolve_model(None)

    def work(progress, is_cancelled, log):
        def progress_and_signal(fraction):
            progress(fraction)
            started.set()
            cancel_sent.wait(10)  # deterministic: the next batch starts only after the cancel
        return fuse_volumes(volume, volume, model, device="cpu", batch_size=1, progress=progress_and_signal,
                            cancel=is_cancelled, log=log)

    job = support.BackgroundJob(work).start()
    assert started.wait(30)
    job.cancel()
    cancel_sent.set()
    assert job.cancel_requested
    assert job.wait(30)
    status = job.poll()
    assert isinstance(status.error, Cancelled) and status.cancelled and status.result is None
    assert status.fraction < 1.0
