"""The FusionINN normalizing flow, built from FrEIA 0.2 modules.

``[u, z] = f([x1, x2])``: u is the fused image before the final sigmoid (y = sigmoid(u)) and z the
latent image; both have the sources' spatial size. The graph is the authors' reference graph for
the default :class:`FusionINNConfig` (k = 3), node for node, so that their state dicts load:

    ActNorm -> GLOW(32) -> PermuteRandom -> IRevNetDown -> GLOW(64) -> PermuteRandom
            -> IRevNetUp -> GLOW(32) -> Split(fused, latent)

Generalisation to k = 1...6 blocks: block i runs at resolution level min(i, k - 1 - i) (a "U"
of 2x2 i-RevNet squeezes: k = 4 -> 0 1 1 0, k = 5 -> 0 1 2 1 0), the subnet width doubles per
level, and a fixed random channel permutation follows every block but the last. k = 3 gives
exactly the reference's placement (down before block 2, up before block 3).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

REVERSE_INPUTS = ("logit", "sigmoid")
# The fused value where both sources are background (``FusionINNConfig.clear_background``): exactly
# the sources' own normalized background level (clipped to y's range [0, 1]). Any other constant is
# flat too, but not against the zero padding that edge metrics use at the image border: 1e-4 there
# cost Q_XY 0.016 on the one-pixel border ring alone (docs/models.md).
FUSED_BACKGROUND = 0.0
# What the inverse flow reads where the fused image is FUSED_BACKGROUND: the finite u = logit(1e-4)
# (−9.21), inside the range the flow itself produces over background (measured y = 1e-5..2e-4), which
# is what the bundled model was trained with (its fused background was 1e-4 then).
BACKGROUND_U = math.log(1e-4) - math.log1p(-1e-4)
LOGIT_EPS = 1e-7  # logit clamps y to [ε, 1 − ε]: finite where σ(u) rounded to 0 or 1 in float32
PADDING_MODES = ("zeros", "replicate")


def logit(y: torch.Tensor) -> torch.Tensor:
    """log(y / (1 − y)) with y clamped to [LOGIT_EPS, 1 − LOGIT_EPS]."""
    y = y.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)
    return torch.log(y) - torch.log1p(-y)


@dataclass(frozen=True)
class FusionINNConfig:
    """Every architectural choice of the flow. The defaults are the authors' reference network."""

    blocks: int = 3
    hidden_channels: int = 32
    clamp: float = 2.0
    clamp_activation: str = "ATAN"
    # The reference subnets end with a ReLU after the last conv (so s, t >= 0); kept for
    # compatibility with their weights, switchable for new models.
    subnet_final_relu: bool = True
    permutation_seed: int = 0
    # Every coupling block at full resolution (no 2x2 i-RevNet squeeze). The squeeze lets the middle
    # block see further, but a model trained on a CPU budget keeps a 2x2 block pattern on the squeeze
    # grid in its fused image (measured in docs/models.md); without squeezes every operation is a
    # convolution or a channel permutation, so the flow is shift-equivariant and cannot make one.
    full_resolution: bool = False
    # How the subnets' 3x3 convolutions see beyond the image border. The authors pad with zeros;
    # the normalized background lies below 0, so zeros make a step at the border that showed as a
    # bright line in the sampled decomposition's std map (docs/models.md). "replicate" continues the
    # border. Padding has no weights: either mode loads the same state dict.
    padding_mode: str = "zeros"
    # Where both normalized sources are at or below 0 (background, and the darkest voxels below the
    # robust range), the fused image is FUSED_BACKGROUND instead of σ(u). The flow's 3x3 couplings
    # spread a faint halo of tissue values up to its receptive radius into the background, which
    # exists in neither source: a full-image edge metric (Q_XY) scores it as lost flat background,
    # and that halo was the whole gap between the flow and the plain average (docs/models.md). A
    # model must be trained with it; the halo also coded the sources' background levels for the
    # sampled decomposition, which therefore puts each source's background value wherever the fused
    # image is FUSED_BACKGROUND (and learns the tissue without reading the halo). The exact
    # decomposition is unaffected: the kept residual r = u − logit(y) restores u.
    clear_background: bool = False
    # "logit": decompose by feeding logit(y) back (exact inverse); "sigmoid": feed y itself and
    # squash the result, as the authors' code trained and decomposed.
    reverse_input: str = "logit"

    def __post_init__(self) -> None:
        if not 1 <= int(self.blocks) <= 6:
            raise ValueError(f"blocks must be between 1 and 6, got {self.blocks}")
        if int(self.hidden_channels) < 1:
            raise ValueError(f"hidden_channels must be positive, got {self.hidden_channels}")
        if self.reverse_input not in REVERSE_INPUTS:
            raise ValueError(f"reverse_input must be one of {REVERSE_INPUTS}, got {self.reverse_input!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if self.clamp_activation not in ("ATAN", "TANH", "SIGMOID"):
            raise ValueError(f"unknown clamp_activation {self.clamp_activation!r}")

    @property
    def levels(self) -> List[int]:
        """Resolution level (number of 2x2 squeezes) at which each coupling block runs."""
        if self.full_resolution:
            return [0] * self.blocks
        return [min(i, self.blocks - 1 - i) for i in range(self.blocks)]

    @property
    def pad_multiple(self) -> int:
        """Height and width must be multiples of this for the squeezes."""
        return 2 ** max(self.levels)

    @property
    def receptive_radius(self) -> int:
        """Structural bound (pixels) on how far a fused pixel sees into the inputs."""
        radius = 0
        for level in self.levels:
            # two 3x3 convs per subnet, applied twice per coupling (both halves): 4 px at level L
            # is 4 * 2**L source pixels, plus up to 2**L - 1 for the squeeze grouping.
            radius += 4 * 2**level + (2**level - 1)
        return radius

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FusionINNConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model configuration keys: {', '.join(unknown)}")
        return cls(**data)


def _subnet_factory(hidden: int, final_relu: bool, padding_mode: str = "zeros"):
    def make(channels_in: int, channels_out: int) -> nn.Module:
        layers = [
            nn.Conv2d(channels_in, hidden, 3, padding=1, padding_mode=padding_mode),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, 3, padding=1, padding_mode=padding_mode),
        ]
        if final_relu:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


def build_graph(config: FusionINNConfig) -> nn.Module:
    """The FrEIA ``GraphINN`` for ``config`` (module order = the reference's state-dict keys)."""
    import FrEIA.framework as ff
    import FrEIA.modules as fm

    # FrEIA wants fixed dims at build time; they only enter ActNorm's log-det, which inference does
    # not use, so any size divisible by the squeezes works for every input size later.
    nominal = 8 * config.pad_multiple
    nodes = [ff.InputNode(2, nominal, nominal, name="input")]
    nodes.append(ff.Node(nodes[-1], fm.ActNorm, {}, name="actnorm"))
    level = 0
    for index, block_level in enumerate(config.levels):
        while level < block_level:
            nodes.append(ff.Node(nodes[-1], fm.IRevNetDownsampling, {}, name=f"down{index}"))
            level += 1
        while level > block_level:
            nodes.append(ff.Node(nodes[-1], fm.IRevNetUpsampling, {}, name=f"up{index}"))
            level -= 1
        subnet = _subnet_factory(config.hidden_channels * 2**block_level, config.subnet_final_relu,
                                 config.padding_mode)
        nodes.append(
            ff.Node(
                nodes[-1],
                fm.GLOWCouplingBlock,
                {"subnet_constructor": subnet, "clamp": config.clamp,
                 "clamp_activation": config.clamp_activation},
                name=f"coupling{index}",
            )
        )
        if index < config.blocks - 1:
            nodes.append(ff.Node(nodes[-1], fm.PermuteRandom, {}, name=f"permute{index}"))
    while level > 0:  # only for shapes whose last block is not at full resolution
        nodes.append(ff.Node(nodes[-1], fm.IRevNetUpsampling, {}, name="up_final"))
        level -= 1
    split = ff.Node(nodes[-1], fm.Split, {"section_sizes": [1, 1], "dim": 0}, name="split")
    nodes.append(split)
    nodes.append(ff.OutputNode(split.out0, name="fused"))
    nodes.append(ff.OutputNode(split.out1, name="latent"))
    return ff.GraphINN(nodes)


class FusionFlow(nn.Module):
    """``forward(x) -> (u, z)`` and ``inverse(u, z) -> x`` for x of shape (B, 2, H, W).

    ``self.graph`` is the FrEIA graph; its ``state_dict()`` has the reference's keys
    (``module_list.0.scale`` ...), which is what checkpoints store.
    """

    def __init__(self, config: Optional[FusionINNConfig] = None, seed: Optional[int] = None):
        super().__init__()
        self.config = config or FusionINNConfig()
        generator_seed = self.config.permutation_seed if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            self.graph = build_graph(self.config)
        self._set_permutations(np.random.default_rng(generator_seed))
        # ActNorm initialises itself from the first batch it sees. That is wanted at the start of
        # training only: inference with an untrained model must not depend on its first input.
        self.set_actnorm_data_init(False)

    def _set_permutations(self, rng: np.random.Generator) -> None:
        # FrEIA's PermuteRandom reseeds numpy's *global* RNG when given a seed; draw our own.
        import FrEIA.modules as fm

        for module in self.graph.modules():
            if isinstance(module, fm.PermuteRandom):
                perm = rng.permutation(module.in_channels)
                module.perm.data = torch.as_tensor(perm, dtype=torch.long)
                module.perm_inv.data = torch.as_tensor(np.argsort(perm), dtype=torch.long)

    def set_actnorm_data_init(self, enabled: bool) -> None:
        import FrEIA.modules as fm

        for module in self.graph.modules():
            if isinstance(module, fm.ActNorm):
                module.init_on_next_batch = enabled

    @property
    def pad_multiple(self) -> int:
        return self.config.pad_multiple

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        (u, z), _ = self.graph(x, jac=False)
        return u, z

    def fused_image(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The fused image y = σ(u) of sources x (B, 2, H, W), with the background rule of
        ``config.clear_background``: the one definition used by inference and training."""
        y = torch.sigmoid(u)
        if not self.config.clear_background:
            return y
        return y.masked_fill((x <= 0).all(dim=1, keepdim=True), FUSED_BACKGROUND)

    def cleared_background(self, y):
        """Where the fused image y (tensor or array) says "both sources are background": the voxels
        that the background rule set (None for a model without the rule). σ(u) is never 0 by chance:
        in float32 that needs u < −103, and the flow's u stays within about ±17."""
        if not self.config.clear_background:
            return None
        return y == (FUSED_BACKGROUND if isinstance(y, torch.Tensor) else np.float32(FUSED_BACKGROUND))

    def inverse_input(self, y: torch.Tensor) -> torch.Tensor:
        """What the inverse flow reads for the fused image y: logit(y), and BACKGROUND_U where the
        background rule cleared y (y itself for the authors' ``reverse_input="sigmoid"``). The one
        definition used by training, fusion's kept residual and both decompositions."""
        if self.config.reverse_input == "sigmoid":
            return y
        u = logit(y)
        background = self.cleared_background(y)
        return u if background is None else u.masked_fill(background, BACKGROUND_U)

    def inverse(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x, _ = self.graph([u, z], rev=True, jac=False)
        return x[0] if isinstance(x, (tuple, list)) else x


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
