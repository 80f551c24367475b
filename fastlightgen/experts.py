"""Two-expert models (Wan 2.2 A14B): which expert takes a noise level, the one rule for sampling and training.

A14B runs a high-noise expert while the timestep is at or above the boundary (boundary_ratio x 1000 in the Wan
2.2 pipelines: 0.875 for T2V, 0.9 for I2V; in sigmas, the shifted schedule's sigma) and the low-noise expert
below it.
"""
from __future__ import annotations

import torch

T2V_BOUNDARY = 0.875  # Wan2.2-T2V-A14B's boundary_ratio
I2V_BOUNDARY = 0.9  # Wan2.2-I2V-A14B's
# the experts by name, as the settings and plans call them: diffusers' `transformer` and `transformer_2`
EXPERTS = ("high", "low")


def takes_high_noise(sigma: float, boundary: float) -> bool:
    return sigma >= boundary


def check_boundary(boundary: float) -> float:
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"the expert boundary must be a sigma in (0, 1), got {boundary}")
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
