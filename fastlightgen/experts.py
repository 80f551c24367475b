"""Two-expert models (Wan 2.2 A14B): which expert takes a noise level, the one rule for sampling and training.

A14B runs a high-noise expert while the timestep is at or above the boundary (boundary_ratio x 1000 in the Wan
2.2 pipelines: 0.875 for T2V, 0.9 for I2V; in sigmas, the shifted schedule's sigma) and the low-noise expert
below it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from .image_condition import condition_channels

if TYPE_CHECKING:
    from .adapters.base import Conditioning, DiTAdapter

T2V_BOUNDARY = 0.875  # Wan2.2-T2V-A14B's boundary_ratio
I2V_BOUNDARY = 0.9  # Wan2.2-I2V-A14B's
# the experts by name, as the settings and plans call them: diffusers' `transformer` and `transformer_2`
EXPERTS = ("high", "low")
# A node's boundary input at this value: the boundary the files name, else the one of the model's kind
AUTO_BOUNDARY = 0.0


def takes_high_noise(sigma: float, boundary: float) -> bool:
    return sigma >= boundary


def check_boundary(boundary: float) -> float:
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"the expert boundary must be a sigma in (0, 1), got {boundary}")
    return boundary


def default_boundary(in_channels: int, out_channels: int) -> float:
    """The boundary of an A14B expert whose file names none, from the model's kind: I2V-A14B's experts take the
    start image's channels beside the latent (36 in, `image_condition`), T2V-A14B's the latent alone."""
    return I2V_BOUNDARY if condition_channels(in_channels, out_channels) else T2V_BOUNDARY


def requested_boundary(boundary: float, in_channels: int, out_channels: int) -> float:
    """What a node's boundary input asks for, for experts whose files name none: AUTO_BOUNDARY -> the boundary of
    the model's kind (of `in_channels` / `out_channels`), else the sigma given."""
    if boundary == AUTO_BOUNDARY:
        return default_boundary(in_channels, out_channels)
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"the boundary is {boundary}: set 0 to take it from the files or the model (0.875 for "
                         "T2V-A14B, 0.9 for I2V-A14B), or a sigma in (0, 1)")
    return boundary


def sigma_range(expert: str, boundary: float) -> tuple[float, float]:
    """(low, high): the part of the schedule `expert` runs on, where Stage I scores it and Stage II trains it."""
    check_boundary(boundary)
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; the experts are {', '.join(EXPERTS)}")
    return (boundary, 1.0) if expert == "high" else (0.0, boundary)


def split_sigmas(sigmas: torch.Tensor, boundary: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the high-noise expert's sigmas, the low-noise expert's): each step goes to the expert whose range holds
    the sigma it starts from, and the two parts share the sigma where one hands over to the other. A part
    with no step is empty."""
    check_boundary(boundary)
    steps = sigmas[:-1].tolist()
    first_low = next((i for i, s in enumerate(steps) if not takes_high_noise(s, boundary)), len(steps))
    high = sigmas[:first_low + 1] if first_low > 0 else sigmas[:0]
    low = sigmas[first_low:] if first_low < len(steps) else sigmas[:0]
    return high, low


def step_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Each row's noise level from a per-row or per-frame sigma: its largest, since TI2V's given first frame sits
    at 0 and does not choose an expert."""
    return sigma.reshape(sigma.shape[0], -1).amax(dim=1) if sigma.ndim else sigma.reshape(1)


def expert_of(sigma: torch.Tensor, boundary: float) -> str:
    """The expert whose range holds a call's sigma (one, per row or per frame); every row must lie on one side."""
    high = {takes_high_noise(float(s), boundary) for s in step_sigma(sigma)}
    if len(high) > 1:
        raise ValueError(f"a batch whose rows lie on both sides of the boundary {boundary:g} reaches two experts: "
                         "call each expert on its own rows")
    return EXPERTS[0] if high.pop() else EXPERTS[1]


@dataclass(frozen=True)
class ExpertPair:
    """A two-expert model as a sampler calls one model (`forward`, as `DiTAdapter`): each call goes to the expert
    whose range holds its sigma. `skip` is given to both experts (a physically pruned student skips none)."""
    high: "DiTAdapter"
    low: "DiTAdapter"
    boundary: float

    def __post_init__(self):
        check_boundary(self.boundary)

    def expert(self, sigma: torch.Tensor) -> "DiTAdapter":
        return self.high if expert_of(sigma, self.boundary) == "high" else self.low

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: "Conditioning", skip: Iterable[int] = ()):
        return self.expert(sigma).forward(x, sigma, cond, skip=skip)
