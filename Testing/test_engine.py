"""Slice engine: exact inverse (also where the sigmoid saturates), sampling, batching, OOM, cancel."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from FusionINNLib.core.engine import Cancelled, SliceEngine, select_device
from FusionINNLib.core.model import FusionFlow, FusionINNConfig, logit


def saturating_model(seed: int = 0) -> FusionFlow:
    """A random flow whose ActNorm amplifies ×4.5: a few % of fused pixels get u > 17.5, where the
    float32 sigmoid is exactly 1 (the pure flow still inverts to ~2e-6 there)."""
    model = FusionFlow(seed=seed)
    with torch.no_grad():
        model.graph.module_list[0].scale.fill_(1.5)
    return model


def random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    smooth = rng.random(shape).astype(np.float32)
    return smooth, np.clip(smooth * 0.5 + rng.random(shape).astype(np.float32) * 0.6, 0, 1.3)


def test_exact_round_trip_on_real_sized_slices_including_saturated_voxels():
    x1, x2 = random_pair((3, 240, 240))
    engine = SliceEngine(saturating_model(), "cpu", batch_size=2)
    result = engine.fuse(x1, x2, keep_latent=True)
    with torch.no_grad():
        u, _ = engine.model(torch.from_numpy(np.stack([x1, x2], 1)))
    saturated = (u > 17.5).numpy()[:, 0]
    assert saturated.sum() > 1000, "the test must exercise saturated voxels"
    assert np.all(result.fused[saturated] == 1.0)  # float32 sigmoid rounds to exactly 1 there
    d1, d2 = engine.decompose_exact(result.fused, result.latent)
    assert np.abs(d1 - x1).max() <= 1e-4
    assert np.abs(d2 - x2).max() <= 1e-4
    assert np.abs(d1 - x1)[saturated].max() <= 1e-4


def test_plain_logit_of_y_is_not_enough_where_saturated():
    # Why the kept latent carries a residual: without it saturated voxels are lost.
    x1, x2 = random_pair((1, 64, 64))
    engine = SliceEngine(saturating_model(), "cpu")
    result = engine.fuse(x1, x2, keep_latent=True)
    latent = result.latent.copy()
    latent[1] = 0.0
    d1, _ = engine.decompose_exact(result.fused, latent)
    assert np.abs(d1 - x1).max() > 1e-2


@pytest.mark.parametrize("shape", [(2, 33, 47), (1, 1, 1), (3, 17, 2)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_odd_sizes_and_every_axis_invert_exactly(shape, axis):
    x1, x2 = random_pair(shape, seed=3)
    engine = SliceEngine(FusionFlow(seed=2), "cpu", batch_size=3)
    result = engine.fuse(x1, x2, axis=axis, keep_latent=True)
    assert result.fused.shape == shape
    d1, d2 = engine.decompose_exact(result.fused, result.latent, axis=axis)
    assert np.abs(d1 - x1).max() <= 1e-5 and np.abs(d2 - x2).max() <= 1e-5


def test_batch_size_does_not_change_results():
    x1, x2 = random_pair((5, 40, 40))
    a = SliceEngine(FusionFlow(seed=1), "cpu", batch_size=1)
    b = SliceEngine(FusionFlow(seed=1), "cpu", batch_size=4)
    assert np.allclose(a.fuse(x1, x2).fused, b.fuse(x1, x2).fused, atol=1e-6)
    sa = a.decompose_sampled(a.fuse(x1, x2).fused, samples=3, seed=9)
    sb = b.decompose_sampled(b.fuse(x1, x2).fused, samples=3, seed=9)
    for va, vb in zip(sa, sb):
        assert np.allclose(va, vb, atol=1e-5)


def test_sampling_statistics_and_controls():
    x1, x2 = random_pair((2, 32, 32))
    engine = SliceEngine(FusionFlow(seed=4), "cpu")
    fused = engine.fuse(x1, x2).fused
    m1, m2, s1, s2 = engine.decompose_sampled(fused, samples=8, seed=1)
    assert s1 is not None and np.isfinite(s1).all() and (s1 >= 0).all() and s1.max() > 0
    _, _, t1, t2 = engine.decompose_sampled(fused, samples=8, seed=1, temperature=0.0)
    assert t1.max() == 0.0 and t2.max() == 0.0
    again = engine.decompose_sampled(fused, samples=8, seed=1)
    assert np.array_equal(again[0], m1)
    other = engine.decompose_sampled(fused, samples=8, seed=2)
    assert not np.array_equal(other[0], m1)
    _, _, none1, _ = engine.decompose_sampled(fused, samples=1)
    assert none1 is None
    for prior in ("zeros", "ones"):
        _, _, c1, _ = engine.decompose_sampled(fused, samples=3, prior=prior)
        assert c1.max() == 0.0  # constant priors have no spread
    u1 = engine.decompose_sampled(fused, samples=1, prior="uniform", seed=0)[0]
    assert np.isfinite(u1).all()


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"prior": "cauchy"}, {"temperature": -1.0},
                                    {"temperature": float("nan")}])
def test_bad_sampling_arguments_are_refused(kwargs):
    engine = SliceEngine(FusionFlow(), "cpu")
    with pytest.raises(ValueError):
        engine.decompose_sampled(np.full((1, 8, 8), 0.5, np.float32), **kwargs)


def test_sigmoid_reverse_input_decomposes_like_the_reference():
    model = FusionFlow(FusionINNConfig(reverse_input="sigmoid"), seed=5)
    x1, x2 = random_pair((1, 16, 16))
    engine = SliceEngine(model, "cpu", channels_last=False)
    result = engine.fuse(x1, x2, keep_latent=True)
    d1, d2 = engine.decompose_exact(result.fused, result.latent)
    with torch.no_grad():
        y = torch.from_numpy(result.fused)[:, None]
        z = torch.from_numpy(result.latent[0])[:, None]
        expected = torch.sigmoid(model.inverse(y, z))
    assert np.allclose(d1, expected[:, 0].numpy(), atol=1e-6)
    assert np.allclose(d2, expected[:, 1].numpy(), atol=1e-6)


def test_out_of_memory_halves_the_batch_and_finishes(monkeypatch):
    model = FusionFlow(seed=6)
    calls = []
    original = model.forward

    def failing_forward(x):
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(x)

    monkeypatch.setattr(model, "forward", failing_forward)
    messages = []
    engine = SliceEngine(model, "cpu", batch_size=8, log=messages.append)
    x1, x2 = random_pair((7, 16, 16))
    fused = engine.fuse(x1, x2).fused
    reference = SliceEngine(FusionFlow(seed=6), "cpu", batch_size=8).fuse(x1, x2).fused
    assert np.allclose(fused, reference, atol=1e-6)
    assert calls[:3] == [7, 4, 2] and engine.batch_size == 2
    assert any("retrying with batch size 2" in m for m in messages)


def test_out_of_memory_at_batch_one_is_a_clear_error(monkeypatch):
    model = FusionFlow()

    def always_oom(x):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(model, "forward", always_oom)
    with pytest.raises(RuntimeError, match="even with batch size 1"):
        SliceEngine(model, "cpu", batch_size=1).fuse(*random_pair((1, 8, 8)))


def test_other_errors_are_not_mistaken_for_oom(monkeypatch):
    model = FusionFlow()
    monkeypatch.setattr(model, "forward", lambda x: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        SliceEngine(model, "cpu", batch_size=4).fuse(*random_pair((3, 8, 8)))


def test_progress_is_monotone_and_cancel_stops():
    seen = []
    engine = SliceEngine(FusionFlow(), "cpu", batch_size=2, progress=seen.append)
    engine.fuse(*random_pair((5, 8, 8)))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 3
    stop_after = iter([False, False, True])
    cancelling = SliceEngine(FusionFlow(), "cpu", batch_size=1, cancel=lambda: next(stop_after))
    with pytest.raises(Cancelled):
        cancelling.fuse(*random_pair((5, 8, 8)))


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            select_device("cuda")


def test_logit_is_finite_at_the_ends():
    values = logit(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(values).all() and values[1] == 0


def brain_with_background(shape=(2, 48, 48), seed=5):
    """Two sources in normalized units: a bright disc of tissue on a background below 0 (as the
    robust volume normalization puts it), with one pixel where only source 2 has signal."""
    x1, x2 = random_pair(shape, seed)
    rows, cols = np.mgrid[:shape[1], :shape[2]]
    outside = (rows - shape[1] / 2) ** 2 + (cols - shape[2] / 2) ** 2 > (shape[1] / 3) ** 2
    x1[:, outside], x2[:, outside] = -0.2, -0.1
    x2[:, 0, 0] = 0.4  # background in source 1 only: not cleared
    return x1, x2, outside


def test_clear_background_makes_the_fused_background_flat_and_still_inverts_exactly():
    from FusionINNLib.core.model import BACKGROUND_U, FUSED_BACKGROUND

    x1, x2, outside = brain_with_background()
    plain = SliceEngine(FusionFlow(FusionINNConfig(padding_mode="replicate"), seed=1), "cpu")
    cleared = SliceEngine(FusionFlow(FusionINNConfig(padding_mode="replicate", clear_background=True), seed=1),
                          "cpu")
    cleared.model.graph.load_state_dict(plain.model.graph.state_dict())
    raw, result = plain.fuse(x1, x2), cleared.fuse(x1, x2, keep_latent=True)
    both = outside.copy()
    both[0, 0] = False
    # without the rule the flow spreads a halo of varying values into the background
    assert np.ptp(raw.fused[:, both]) > 1e-3
    assert np.all(result.fused[:, both] == np.float32(FUSED_BACKGROUND))
    assert np.array_equal(result.fused[:, ~both], raw.fused[:, ~both])
    d1, d2 = cleared.decompose_exact(result.fused, result.latent)
    assert np.abs(d1 - x1).max() <= 1e-4 and np.abs(d2 - x2).max() <= 1e-4
    # exactly the sources' clipped background level, so the image is flat against zero padding too
    assert FUSED_BACKGROUND == 0.0 and np.all(np.clip(x1[:, both], 0, 1) == 0)
    # the inverse flow reads the cleared background as the finite u the model was trained with
    u_in = cleared.model.inverse_input(torch.from_numpy(result.fused))
    assert torch.all(u_in[:, both] == BACKGROUND_U) and math.isclose(BACKGROUND_U, math.log(1e-4 / (1 - 1e-4)))
    assert torch.equal(u_in[:, ~both], logit(torch.from_numpy(result.fused[:, ~both])))
    s1, _, _, _ = cleared.decompose_sampled(result.fused, samples=1, seed=0)
    assert np.isfinite(s1).all()
