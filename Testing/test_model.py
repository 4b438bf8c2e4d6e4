"""The flow: reference-compatible graph, exact invertibility for k = 1..6, configuration checks."""
from __future__ import annotations

import FrEIA.framework as ff
import FrEIA.modules as fm
import numpy as np
import pytest
import torch
from torch import nn

from FusionINNLib.core.model import FusionFlow, FusionINNConfig, count_parameters
from FusionINNLib.io.checkpoint import load_checkpoint


def reference_graph() -> ff.GraphINN:
    """The authors' graph written out by hand from the spec (not through our builder)."""

    def subnet(hidden):
        return lambda c_in, c_out: nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1), nn.ReLU()
        )

    nodes = [ff.InputNode(2, 240, 240, name="input")]
    nodes.append(ff.Node(nodes[-1], fm.ActNorm, {}))
    nodes.append(ff.Node(nodes[-1], fm.GLOWCouplingBlock, {"subnet_constructor": subnet(32), "clamp": 2.0}))
    nodes.append(ff.Node(nodes[-1], fm.PermuteRandom, {"seed": 3}))
    nodes.append(ff.Node(nodes[-1], fm.IRevNetDownsampling, {}))
    nodes.append(ff.Node(nodes[-1], fm.GLOWCouplingBlock, {"subnet_constructor": subnet(64), "clamp": 2.0}))
    nodes.append(ff.Node(nodes[-1], fm.PermuteRandom, {"seed": 4}))
    nodes.append(ff.Node(nodes[-1], fm.IRevNetUpsampling, {}))
    nodes.append(ff.Node(nodes[-1], fm.GLOWCouplingBlock, {"subnet_constructor": subnet(32), "clamp": 2.0}))
    split = ff.Node(nodes[-1], fm.Split, {"section_sizes": [1, 1], "dim": 0})
    nodes += [split, ff.OutputNode(split.out0), ff.OutputNode(split.out1)]
    return ff.GraphINN(nodes)


@pytest.fixture(scope="module")
def trained_reference():
    torch.manual_seed(11)
    graph = reference_graph()
    x = torch.rand(2, 2, 240, 240)
    graph(x)  # ActNorm initialises from this batch, as in the authors' training
    with torch.no_grad():
        for parameter in graph.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return graph


@pytest.mark.parametrize("layout", ["authors", "bare", "dataparallel"])
def test_reference_state_dict_loads_with_equal_outputs(tmp_path, trained_reference, layout):
    state = trained_reference.state_dict()
    if layout == "authors":  # their training script: dict with loss lists of NumPy scalars
        payload = {"model_state_dict": state, "train_loss": [np.float64(0.5), np.float64(0.25)]}
    elif layout == "bare":
        payload = state
    else:
        payload = {"model_state_dict": {"module." + k: v for k, v in state.items()}}
    path = tmp_path / "inn.pt"
    torch.save(payload, path)

    loaded = load_checkpoint(path)
    assert loaded.origin == "reference"
    assert loaded.config.reverse_input == "sigmoid"  # decomposed the way the authors trained it
    x = torch.rand(2, 2, 240, 240)
    with torch.no_grad():
        (u_ref, z_ref), _ = trained_reference(x)
        u, z = loaded.model(x)
    assert torch.allclose(u, u_ref, atol=1e-6, rtol=0)
    assert torch.allclose(z, z_ref, atol=1e-6, rtol=0)


def test_default_config_is_the_reference_architecture():
    model = FusionFlow()
    assert count_parameters(model) == count_parameters(reference_graph()) == 17564
    assert list(model.graph.state_dict()) == list(reference_graph().state_dict())
    assert model.config.levels == [0, 1, 0]


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 6])
def test_every_depth_is_exactly_invertible(blocks):
    model = FusionFlow(FusionINNConfig(blocks=blocks), seed=blocks)
    size = 4 * model.pad_multiple
    x = torch.rand(2, 2, size, size, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        u, z = model(x)
        back = model.inverse(u, z)
    assert u.shape == z.shape == (2, 1, size, size)
    assert torch.max(torch.abs(back - x)).item() < 1e-12


def test_generalised_levels_form_a_u_shape():
    assert FusionINNConfig(blocks=1).levels == [0]
    assert FusionINNConfig(blocks=4).levels == [0, 1, 1, 0]
    assert FusionINNConfig(blocks=5).levels == [0, 1, 2, 1, 0]
    assert FusionINNConfig(blocks=6).pad_multiple == 4


def test_same_seed_same_network_and_global_numpy_rng_untouched():
    state = np.random.get_state()[1].copy()
    a, b = FusionFlow(seed=5), FusionFlow(seed=5)
    assert np.array_equal(np.random.get_state()[1], state)
    for (key, va), vb in zip(a.graph.state_dict().items(), b.graph.state_dict().values()):
        assert torch.equal(va, vb), key
    c = FusionFlow(seed=6)
    assert not torch.equal(a.graph.state_dict()["module_list.1.subnet1.0.weight"],
                           c.graph.state_dict()["module_list.1.subnet1.0.weight"])


def test_random_model_does_not_initialise_actnorm_from_its_first_input():
    model = FusionFlow()
    with torch.no_grad():
        first = model(torch.rand(1, 2, 16, 16) * 100)
        second = model(torch.ones(1, 2, 16, 16))
    assert torch.count_nonzero(model.graph.state_dict()["module_list.0.scale"]) == 0
    assert first[0].shape == second[0].shape


@pytest.mark.parametrize("bad", [{"blocks": 0}, {"blocks": 7}, {"reverse_input": "exp"},
                                 {"hidden_channels": 0}, {"clamp_activation": "RELU"}])
def test_invalid_configuration_is_refused(bad):
    with pytest.raises(ValueError):
        FusionINNConfig(**bad)


def test_config_round_trips_and_rejects_unknown_keys():
    config = FusionINNConfig(blocks=4, reverse_input="sigmoid")
    assert FusionINNConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model configuration keys: colour"):
        FusionINNConfig.from_dict({"colour": 1})
