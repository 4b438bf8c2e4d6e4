"""Fixes of the defects found against Slicer's source (issue 11, items 2-14), each checked for real.

Where Slicer's GUI is needed it is not faked: the checks use real MRML (slicer-core, skipped
without it), the real files, or Slicer's documented behaviour reproduced with the same standard
library call (SampleData's ``urlretrieve``).
"""
from __future__ import annotations

import ast
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib import slicer_support as support

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "FusionINN"


# -- 2: torch floor ------------------------------------------------------------------------------
def test_torch_floor_is_2_5_everywhere():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch>=2.5"' in text and "torch>=2.0" not in text
    assert support.TORCH_REQUIREMENT == ">=2.5" and support.TORCH_MINIMUM == (2, 5)


@pytest.mark.parametrize("version, old", [("2.0.1", True), ("2.4.1+cu121", True), ("2.5.0", False),
                                          ("2.13.0+cpu", False), ("3.0", False), (None, False), ("dev", False)])
def test_installed_torch_version_is_checked(version, old):
    assert support.torch_too_old(version) is old


def test_installed_version_is_read_without_importing():
    import importlib.metadata
    import sys

    assert support.installed_version("numpy") == importlib.metadata.version("numpy")
    assert support.installed_version("surely-not-a-package-fusioninn") is None
    assert "torch" in sys.modules or True  # reading the version imports nothing (checked in test_worker)


def test_loading_a_model_with_a_torch_without_safe_globals_says_to_upgrade(monkeypatch, tmp_path):
    import torch

    from FusionINNLib.io import checkpoint

    path = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, path)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(checkpoint.CheckpointError, match=r"torch >= 2\.5"):
        checkpoint._read(path)


# -- 7: unset path widgets ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, unset", [(".", True), ("", True), (None, True), (Path(), True), ("  ", True),
                                          ("/data/brats", False), ("./cases", False)])
def test_unset_path_widgets(value, unset):
    assert support.unset_path(value) is unset


def test_module_checks_the_training_folder_with_unset_path():
    source = (MODULE_DIR / "FusionINN.py").read_text(encoding="utf-8")
    assert "support.unset_path(dataDirectory)" in source
    assert 'not dataDirectory or not os.path.isdir' not in source


# -- 6: resume a killed training ------------------------------------------------------------------------
def test_resumable_checkpoint_is_found_next_to_the_output_model(tmp_path):
    model = tmp_path / "models" / "my model.pt"
    assert support.resumable_checkpoint(model) is None
    run = tmp_path / "models" / "my model_run"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"x")
    assert support.resumable_checkpoint(model) == str(run / "last.pt")
    assert support.resumable_checkpoint(str(tmp_path / "models" / "my model")) == str(run / "last.pt")
    assert support.resumable_checkpoint(".") is None


def test_resume_location_matches_the_training_run_folder(tmp_path):
    from FusionINNLib.train.training import TrainingConfig

    config = TrainingConfig(data_dir=str(tmp_path), output=str(tmp_path / "m.pt"))
    expected = Path(config.output).with_name(Path(config.output).stem + "_run") / "last.pt"
    expected.parent.mkdir()
    expected.write_bytes(b"x")
    assert support.resumable_checkpoint(config.output) == str(expected)


# -- 8: the sample data ----------------------------------------------------------------------------------
def test_sample_data_files_are_shipped_listed_and_need_no_torch(tmp_path):
    from FusionINNLib.io.phantom import make_phantom_case

    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    sample_dir = MODULE_DIR / "Resources" / "SampleData"
    case = make_phantom_case((64, 128, 128), seed=0)
    for key, label in (("t1ce", "T1ce"), ("flair", "FLAIR"), ("seg", "seg")):
        name = f"FusionINNPhantom_{label}.nrrd"
        assert f"Resources/SampleData/{name}" in cmake
        # SampleData.downloadFile fetches a URI with urllib.request.urlretrieve into its cache:
        cached = tmp_path / name
        urllib.request.urlretrieve((sample_dir / name).as_uri(), cached)
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(cached)))
        np.testing.assert_array_equal(array, np.round(case[key]).astype(array.dtype))
    source = (MODULE_DIR / "FusionINN.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    register = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "registerSampleData")
    assert "ensureDependencies" not in ast.unparse(register) and "customDownloader" not in ast.unparse(register)


def test_sample_uris_are_file_uris_of_the_shipped_files():
    pytest.importorskip("slicer")
    import hashlib

    from FusionINNSlicerLib.logic import SAMPLE_FILES, phantomSampleChecksums, phantomSampleURIs

    uris = phantomSampleURIs()
    assert len(uris) == len(SAMPLE_FILES) == 3
    for uri, checksum in zip(uris, phantomSampleChecksums()):  # SampleData's "<algo>:<digest>" form
        with urllib.request.urlopen(uri) as stream:
            assert checksum == "SHA256:" + hashlib.sha256(stream.read()).hexdigest()
    for uri, (file_name, _node, _cls) in zip(uris, SAMPLE_FILES):
        assert uri.startswith("file://") and uri.endswith(file_name)
        with urllib.request.urlopen(uri) as stream:
            assert stream.read(4) == b"NRRD"


# -- 9: connectGui on 5.8 ------------------------------------------------------------------------------
class _Widget:
    def __init__(self, name):
        self._name = name

    def property(self, key):
        return self._name if key == support.PARAMETER_NAME_PROPERTY else None


def test_gui_mapping_is_what_connectGui_builds():
    widgets = {"a": _Widget("inputVolume1"), "b": _Widget(None), "c": _Widget("device"), "d": object()}
    mapping = support.gui_parameter_mapping(widgets, lambda widget, name: widget.property(name))
    assert mapping == {"inputVolume1": widgets["a"], "device": widgets["c"]}


def test_module_connects_with_connectParametersToGui_and_keeps_the_tag():
    source = (MODULE_DIR / "FusionINN.py").read_text(encoding="utf-8")
    assert "connectParametersToGui(mapping)" in source and ".connectGui(" not in source
    assert "self._parameterNodeGuiTag = self._connectGui(self._parameterNode)" in source


# -- 10: deprecated table API -----------------------------------------------------------------------------
def test_no_deprecated_table_header_call():
    for path in (MODULE_DIR / "FusionINN.py", MODULE_DIR / "FusionINNSlicerLib" / "logic.py"):
        assert ".SetUseColumnNameAsColumnHeader(" not in path.read_text(encoding="utf-8")


# -- 11: batch summary schema ------------------------------------------------------------------------------
def test_batch_summary_has_a_schema(tmp_path):
    from FusionINNLib.jobs.batch import CaseOutcome, read_summary, summary_schema_path, write_summary

    outcomes = [CaseOutcome("case1", "ok", metrics={"Q_SSIM": 0.5, "EN": 6.0}), CaseOutcome("case2", "failed", "bad")]
    path = write_summary(outcomes, tmp_path / "summary.tsv", ["Q_SSIM"])
    schema = summary_schema_path(path)
    assert schema.name == "summary.schema.tsv"
    rows = [line.split("\t") for line in schema.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["columnName", "type"]
    types = dict(rows[1:])
    assert types["status"] == "string" and types["Q_SSIM"] == "double" and types["EN"] == "double"
    assert list(types) == list(read_summary(path)[0].keys())


def test_batch_summary_loads_typed_in_slicer(tmp_path):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("not slicer-core")
    from FusionINNLib.jobs.batch import CaseOutcome, write_summary

    path = write_summary([CaseOutcome("c", "ok", metrics={"Q_SSIM": 0.25})], tmp_path / "summary.tsv")
    scene = slicer.vtkMRMLScene()
    storage = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    storage.SetFileName(str(path))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    assert storage.ReadData(table)
    column = table.GetTable().GetColumnByName("Q_SSIM")
    assert column.GetDataTypeAsString() == "double" and column.GetValue(0) == pytest.approx(0.25)


# -- 12: scikit-image ---------------------------------------------------------------------------------------
def test_scikit_image_is_neither_used_nor_installed():
    sources = list((MODULE_DIR / "FusionINNLib").rglob("*.py")) + [MODULE_DIR / "FusionINN.py"]
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] == "skimage" for name in names), path
    assert "skimage" not in support.PYTHON_REQUIREMENTS
    assert "scikit-image" not in (REPO / "pyproject.toml").read_text(encoding="utf-8")


# -- 14: loss curves as plot nodes ----------------------------------------------------------------------------
def test_training_history_is_plotted_with_plot_nodes(tmp_path):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("not slicer-core")
    from FusionINNLib.train.training import LOSS_PARTS, write_table
    from FusionINNSlicerLib.logic import FusionINNCoreLogic

    columns = [("epoch", "int")] + [(f"{split}_{part}", "double") for split in ("train", "val") for part in LOSS_PARTS]
    rows = [{name: (epoch if name == "epoch" else 1.0 / epoch) for name, _ in columns} for epoch in (1, 2, 3)]
    path = write_table(tmp_path / "history.tsv", columns, rows)
    scene = slicer.vtkMRMLScene()
    storage = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    storage.SetFileName(str(path))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "history")
    assert storage.ReadData(table)
    chart = FusionINNCoreLogic(scene).plotTrainingHistory(table)
    assert chart is not None and chart.GetNumberOfPlotSeriesNodes() == 8  # 4 losses x train/val
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert {s.GetYColumnName() for s in series} == {f"{sp}_{p}" for sp in ("train", "val")
                                                    for p in ("loss", "fusion", "dec", "latent")}
    assert all(s.GetXColumnName() == "epoch" and s.GetTableNode() is table for s in series)
    empty = scene.AddNewNodeByClass("vtkMRMLTableNode", "empty")
    assert FusionINNCoreLogic(scene).plotTrainingHistory(empty) is None
