"""Checkpoint files (safe loading, clear errors) and the invertible intensity normalization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from FusionINNLib.core.model import FusionFlow, FusionINNConfig
from FusionINNLib.core.normalization import (
    NormalizationParams,
    background_value,
    denormalize_std,
    denormalize_volume,
    normalize_volume,
)
from FusionINNLib.io.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    resolve_model,
    save_checkpoint,
)


def test_save_and_load_round_trip(tmp_path):
    model = FusionFlow(FusionINNConfig(blocks=4, hidden_channels=8), seed=3)
    path = save_checkpoint(tmp_path / "m.pt", model, metadata={"modalities": ["t1ce", "flair"]})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.origin == "fusioninn"
    assert loaded.metadata["modalities"] == ["t1ce", "flair"]
    assert loaded.sha256 == file_sha256(path)
    x = torch.rand(1, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0], model(x)[0])
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_future_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, FusionFlow(), extra={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="newer than this software"):
        load_checkpoint(path)


def test_other_architecture_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "k4.pt"
    torch.save(FusionFlow(FusionINNConfig(blocks=4)).graph.state_dict(), path)  # bare, no config
    with pytest.raises(CheckpointError, match=r"k4\.pt: weights do not fit"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_corrupt_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", FusionFlow())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not allowed"):
        load_checkpoint(path)
    assert not marker.exists(), "the payload ran during loading"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_resolve_model_prefers_explicit_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", FusionFlow(seed=8))
    assert resolve_model(path).source == str(path)


# -- normalization ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["volume", "slice"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int64])
def test_round_trip_is_lossless(mode, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((4, 10, 12)) * 200).astype(dtype)
    data[:, :2] = 0
    normalized, params = normalize_volume(data, mode, axis=0)
    restored = denormalize_volume(normalized, params)
    assert normalized.dtype == np.float32
    assert np.allclose(restored, data, atol=1e-3 * max(1, float(data.max())) * 1e-2)
    again = NormalizationParams.from_dict(params.to_dict())
    assert np.array_equal(denormalize_volume(normalized, again), restored)


def test_robust_volume_mode_does_not_clip():
    data = np.zeros((2, 50, 50), np.float32)
    data[:, 10:40, 10:40] = np.linspace(1, 100, 900).reshape(30, 30)
    data[0, 20, 20] = 400  # one hot voxel, e.g. enhancing tumour
    normalized, params = normalize_volume(data, "volume")
    assert normalized.max() > 3.5 and params.note == ""  # kept its offset, not clipped to 1
    assert np.isclose(denormalize_volume(normalized, params)[0, 20, 20], 400, rtol=1e-6)
    foreground = normalized[:, 10:40, 10:40]
    assert 0 <= np.percentile(foreground, 1) < 0.05 and 0.95 < np.percentile(foreground, 99) < 1.05


def test_far_outliers_fall_back_to_min_max_so_the_flow_inverts():
    """A voxel 100x brighter than the foreground span would sit at 100 in normalized units, where
    the flow no longer inverts in float32 (issue 13): min-max instead, with a note."""
    data = np.zeros((2, 50, 50), np.float32)
    data[:, 10:40, 10:40] = np.linspace(1, 100, 900).reshape(30, 30)
    data[0, 20, 20] = 10_000
    normalized, params = normalize_volume(data, "volume")
    assert 0.0 <= normalized.min() and normalized.max() <= 1.0
    assert params.offset == [0.0] and params.scale == [10_000.0] and "min-max" in params.note
    assert (params.minimum, params.maximum) == (0.0, 10_000.0)
    assert np.isclose(denormalize_volume(normalized, params)[0, 20, 20], 10_000, rtol=1e-6)
    again = NormalizationParams.from_dict(params.to_dict())
    assert again == params


def test_z_scored_background_is_detected():
    data = np.full((2, 20, 20), -1.7, np.float32)
    data[:, 5:15, 5:15] = np.random.default_rng(1).normal(0, 1, (2, 10, 10))
    assert background_value(data) == pytest.approx(-1.7)
    _, params = normalize_volume(data)
    foreground = data[:, 5:15, 5:15]
    assert params.offset[0] == pytest.approx(np.percentile(foreground, 0.5), rel=1e-6)


@pytest.mark.parametrize("mode", ["volume", "slice"])
@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_volumes_give_finite_zeros(mode, value):
    normalized, params = normalize_volume(np.full((3, 4, 4), value), mode)
    assert np.isfinite(normalized).all() and np.all(normalized == 0)
    assert np.allclose(denormalize_volume(normalized, params), value)


def test_nonfinite_voxels_are_replaced_and_counted():
    data = np.ones((2, 5, 5), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[1, 2, 2] = np.nan, np.inf, -np.inf
    normalized, params = normalize_volume(data)
    assert params.nonfinite == 3 and np.isfinite(normalized).all()


def test_slice_mode_is_per_slice_min_max_and_std_scales():
    data = np.stack([np.linspace(0, 10, 16).reshape(4, 4), np.linspace(5, 6, 16).reshape(4, 4)])
    normalized, params = normalize_volume(data, "slice", axis=0)
    assert np.allclose(normalized.min(axis=(1, 2)), 0) and np.allclose(normalized.max(axis=(1, 2)), 1)
    std = denormalize_std(np.ones_like(normalized), params)
    assert np.allclose(std[0], 10) and np.allclose(std[1], 1)


def test_bad_normalization_input():
    with pytest.raises(ValueError, match="unknown normalization mode"):
        normalize_volume(np.ones((2, 2, 2)), "zscore")
    with pytest.raises(ValueError, match="complex"):
        normalize_volume(np.ones((2, 2, 2), np.complex64))
    with pytest.raises(ValueError, match="invalid normalization record"):
        NormalizationParams.from_dict({"mode": "volume"})


def test_metadata_of_any_type_is_stored_as_plain_values(tmp_path):
    # torch.__version__ is a TorchVersion object: stored as-is it makes weights_only loading refuse the file.
    path = save_checkpoint(tmp_path / "m.pt", FusionFlow(), metadata={"torch": torch.__version__,
                                                                       "loss": np.float64(0.25), "where": tmp_path})
    metadata = load_checkpoint(path).metadata
    assert metadata == {"torch": str(torch.__version__), "loss": 0.25, "where": str(tmp_path)}
