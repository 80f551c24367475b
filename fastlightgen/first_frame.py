"""The TI2V first-frame rule, owned here and applied everywhere through these helpers.

A TI2V model (Wan 2.2) is given the first latent frame clean: the frame is held in place at every step,
it sits at sigma 0 while the other frames carry the noise level (per-frame sigmas (B, F), which the model
turns into per-token timesteps), and, being given rather than predicted, it carries no loss.
Where the frame itself is at hand it is passed as `first_frame` (B, C, 1, H, W), None when there is none;
where only the rule matters, `ti2v` says whether it applies. Without it every helper is the plain flow rule.
"""
from __future__ import annotations

import torch

from .flow import add_noise


def pin(x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    """Puts the given first latent frame back in place (no-op without one)."""
    if first_frame is None:
        return x
    return torch.cat([first_frame.to(x), x[:, :, 1:]], dim=2)


def given_frame(x0: torch.Tensor, ti2v: bool) -> torch.Tensor | None:
    """The first latent frame of clean latents x0 under the TI2V rule, else None: what `noised` keeps clean."""
    return x0[:, :, :1] if ti2v else None


def frame_sigma(sigma, x: torch.Tensor, ti2v: bool) -> torch.Tensor:
    """Sigmas of a latent x (B, C, F, H, W): (B,), or (B, F) with frame 0 at 0 under the TI2V rule."""
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0]).clone()
    if not ti2v:
        return s
    per_frame = s.reshape(-1, 1).expand(-1, x.shape[2]).clone()
    per_frame[:, 0] = 0.0
    return per_frame


def noised(x0: torch.Tensor, sigma, generator: torch.Generator | None,
           first_frame: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, its sigma from `frame_sigma`, noise): x0 noised to sigma with fresh noise, the first frame clean."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    sig = frame_sigma(sigma, x0, first_frame is not None)
    return pin(add_noise(x0, noise, sig), first_frame), sig, noise


def loss_frames(x: torch.Tensor, ti2v: bool) -> torch.Tensor:
    """The frames of x (B, C, F, H, W) a loss is taken on: all but the given first one under the TI2V rule."""
    return x[:, :, 1:] if ti2v else x
