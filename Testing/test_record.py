"""One fusion record, one codec: header, sidecar and node attribute read each other."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FusionINNLib import slicer_support as support
from FusionINNLib.core.model import FusionFlow
from FusionINNLib.io import record as rec
from FusionINNLib.io.checkpoint import save_checkpoint
from FusionINNLib.io.phantom import make_phantom_case
from FusionINNLib.io.volume import read_volume
from FusionINNLib.jobs.pipeline import fuse_files, read_record

# A sidecar exactly as the code before the record module wrote it (json.dumps of a plain dict).
OLD_RECORD = {
    "format": "fusioninn-record", "version": 1, "axis": 0,
    "normalization": [{"mode": "volume", "axis": 0, "offset": [10.0], "scale": [500.0], "nonfinite": 0},
                      {"mode": "volume", "axis": 0, "offset": [0.0], "scale": [900.0], "nonfinite": 0}],
    "model": {"path": "m.pt", "sha256": "ab" * 32, "origin": "fusioninn", "config": {"blocks": 3}},
    "device": "cpu", "inputs": ["t1.nii.gz", "flair.nii.gz"], "notes": [],
}


@pytest.fixture(scope="module")
def fused_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    case = make_phantom_case((16, 32, 32), seed=2)
    for name in ("t1ce", "flair"):
        sitk.WriteImage(sitk.GetImageFromArray(case[name]), str(folder / f"{name}.nii.gz"))
    model = save_checkpoint(folder / "m.pt", FusionFlow(seed=1))
    for suffix in ("nrrd", "nii.gz"):
        fuse_files(folder / "t1ce.nii.gz", folder / "flair.nii.gz", folder / f"f.{suffix}", model=model, device="cpu",
                   log=lambda m: None)
    return folder


def test_header_sidecar_and_node_attribute_carry_the_same_record(fused_files):
    header = rec.FusionRecord.from_json(rec.header_value(fused_files / "f.nrrd"), "header")
    sidecar = rec.FusionRecord.from_json((fused_files / "f.fusioninn.json").read_text(), "sidecar")
    assert header == sidecar
    # pipeline (SimpleITK metadata), record (header text, no SimpleITK) and Slicer support agree
    assert read_record(fused_files / "f.nrrd", read_volume(fused_files / "f.nrrd")) == header
    assert rec.read_record(fused_files / "f.nrrd") == header
    assert support.record_from_file(fused_files / "f.nrrd") == header
    attributes = support.provenance_attributes("fused", header, inputs=("a", "b"))
    from_node = support.record_from_attributes(attributes)
    assert isinstance(from_node, rec.FusionRecord) and from_node == header
    assert from_node.axis == 0 and len(from_node.normalization_params) == 2
    assert from_node.model_sha256 == header["model"]["sha256"] and len(from_node.model_sha256) == 64
    # a node saved from Slicer: its sidecar is read back by the command line's reader
    support.write_record_sidecar(fused_files / "saved.nrrd", from_node)
    assert rec.read_record(fused_files / "saved.nrrd") == header


def test_nifti_has_no_header_record_and_uses_the_sidecar(fused_files):
    assert rec.header_value(fused_files / "f.nii.gz") is None
    assert read_record(fused_files / "f.nii.gz") == rec.read_record(fused_files / "f.nii.gz")
    assert rec.read_record(fused_files / "f.nii.gz")["inputs"][0].endswith("t1ce.nii.gz")


def test_records_written_by_earlier_versions_still_read(tmp_path):
    (tmp_path / "old.fusioninn.json").write_text(json.dumps(OLD_RECORD))
    record = rec.read_record(tmp_path / "old.nii.gz")
    assert dict(record) == OLD_RECORD and record.latent_sha256 is None
    assert record.normalization_params[1].scale == [900.0]
    assert support.record_from_attributes({support.RECORD_ATTRIBUTE: json.dumps(OLD_RECORD)}) == OLD_RECORD
    future = dict(OLD_RECORD, version=2)
    with pytest.raises(ValueError, match="newer than this software"):
        rec.FusionRecord.from_dict(future, "x")
    kept = rec.FusionRecord.from_dict(dict(OLD_RECORD, something_new=[1]), "x")
    assert json.loads(kept.to_json())["something_new"] == [1]  # unknown keys survive a round trip


@pytest.mark.parametrize("text, needle", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "not a FusionINN fusion record"),
    (json.dumps(dict(OLD_RECORD, normalization=[{}])), "damaged fusion record"),
    (json.dumps(dict(OLD_RECORD, axis=5)), "damaged fusion record"),
    (json.dumps(dict(OLD_RECORD, format="other")), "not a FusionINN fusion record"),
])
def test_one_validator_for_every_carrier(tmp_path, text, needle):
    (tmp_path / "f.fusioninn.json").write_text(text)
    with pytest.raises(ValueError, match=needle) as from_file:
        rec.read_record(tmp_path / "f.nii.gz")
    assert "f.nii.gz" in str(from_file.value)
    with pytest.raises(ValueError, match=needle) as from_node:
        support.record_from_attributes({support.RECORD_ATTRIBUTE: text})
    assert rec.NODE_ATTRIBUTE in str(from_node.value)


def test_the_record_module_imports_neither_torch_nor_simpleitk():
    code = ("import sys; import FusionINNLib.io.record, FusionINNLib.slicer_support; "
            "print('torch' in sys.modules, 'SimpleITK' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "FusionINN")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_fused_record_is_a_dict_that_json_and_equality_accept(fused_files):
    record = rec.read_record(fused_files / "f.nrrd")
    assert json.loads(json.dumps(record)) == record
    assert np.isfinite(record.normalization_params[0].scale).all()
