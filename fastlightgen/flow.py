"""The one flow-matching convention of FastLightGen.

Every other module imports these helpers; nothing else re-derives them.

Convention (rectified flow, as in Wan and HunyuanVideo):
    sigma in [0, 1] is the noise level, 0 = clean data, 1 = pure noise;
    x_t      = (1 - sigma) * x0 + sigma * noise
    velocity = noise - x0          (what the DiT predicts: d x_t / d sigma)
    x0       = x_t - sigma * v     (Tweedie estimate, paper eq. 4)
    timestep = 1000 * sigma        (what the DiT's time embedding receives)

The paper's eq. 5 writes the target as (x0 - x1); that is the negated velocity of
this convention. We keep the models' sign (noise - x0) everywhere.

A sigma may be a scalar, a (B,) tensor or any tensor broadcastable to the latent after
`expand_sigma`; per-frame sigmas (B, F) are how TI2V holds the first frame at sigma 0 (`first_frame`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def expand_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma of shape (), (B,) or (B, F) onto a latent (B, C, F, H, W)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        return sigma.view(-1, *([1] * (like.ndim - 1)))
    if sigma.ndim == 2 and like.ndim == 5:
        return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} cannot be broadcast onto a latent of shape {tuple(like.shape)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - expand_sigma(sigma, x_t) * v


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x_t + (expand_sigma(sigma_next, x_t) - expand_sigma(sigma, x_t)) * v


def shift_sigma(sigma, shift: float):
    """Timestep shift warp: sigma' = s*sigma / (1 + (s - 1)*sigma); shift 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_timestep(sigma):
    return sigma * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timestep):
    return timestep / NUM_TRAIN_TIMESTEPS


def euler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps+1 sigmas from 1 to 0, uniform in t then shifted (the teacher's schedule)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def denoising_list_problem(steps: Sequence[float]) -> str | None:
    """Why a denoising_step_list cannot be sampled (None if it can): the one rule for the sampler and the
    training settings."""
    if not steps:
        return "is empty; give timesteps such as [1000, 750, 500, 250]"
    if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps):
        return f"must hold timesteps in (0, {NUM_TRAIN_TIMESTEPS}]"
    if any(a <= b for a, b in zip(steps, steps[1:])):
        return "must be strictly decreasing (the first is the noisiest)"
    return None


def denoising_list_sigmas(denoising_step_list, shift: float) -> torch.Tensor:
    """Sigmas of a LightX2V-style denoising_step_list (timesteps in (0, 1000]) plus a final 0."""
    steps = [float(t) for t in denoising_step_list]
    problem = denoising_list_problem(steps)
    if problem:
        raise ValueError(f"denoising_step_list {steps} {problem}")
    sig = shift_sigma(timestep_to_sigma(torch.tensor(steps, dtype=torch.float64)), shift)
    return torch.cat([sig, sig.new_zeros(1)]).float()


SIGMA_LAWS = ("logit_normal", "uniform")


def unshift_sigma(sigma, shift: float):
    """The inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def sample_training_sigma(batch: int, generator: torch.Generator | None = None, shift: float = 1.0,
                          law: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                          within: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Training sigmas for flow matching: logit-normal (SD3) or uniform, then the shift warp.

    Uniform then shift k is the density of the sigmas that k-shifted Euler sampling visits, so a model
    trained that way is trained where its sampler evaluates it; logit-normal favours the middle.
    `within` (low, high), a part of the schedule (one expert's of a two-expert model): the same law conditioned on
    it, drawn exactly through the inverse of its distribution function, one uniform number a sample.
    """
    if tuple(within) != (0.0, 1.0):
        return shift_sigma(_law_within(batch, generator, law, mean, std, unshift_sigma(torch.tensor(
            within, dtype=torch.float64), shift)), shift).float()
    if law == "uniform":
        u = torch.rand(batch, generator=generator)
    elif law == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    else:
        raise ValueError(f"unknown sigma law {law!r}; use one of {', '.join(SIGMA_LAWS)}")
    return shift_sigma(u, shift)



def _law_within(batch: int, generator: torch.Generator | None, law: str, mean: float, std: float,
                bounds: torch.Tensor) -> torch.Tensor:
    """The unshifted law's draws conditioned on [bounds[0], bounds[1]], in float64."""
    if not 0 <= bounds[0] < bounds[1] <= 1:
        raise ValueError(f"a sigma range must be 0 <= low < high <= 1, got {bounds.tolist()}")
    r = torch.rand(batch, generator=generator, dtype=torch.float64)
    if law == "uniform":
        return bounds[0] + (bounds[1] - bounds[0]) * r
    if law != "logit_normal":
        raise ValueError(f"unknown sigma law {law!r}; use one of {', '.join(SIGMA_LAWS)}")
    cdf = torch.special.ndtr((torch.logit(bounds) - mean) / std)  # the normal's mass below each bound
    return torch.sigmoid(torch.special.ndtri(cdf[0] + (cdf[1] - cdf[0]) * r) * std + mean)
