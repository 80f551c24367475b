"""Samplers, deterministic given their noise and generator, usable with any adapter and skip-set.

- `sample_euler_cfg`: the teacher baseline, N-step Euler on the shifted schedule with CFG
  (`sample_euler` takes any guided velocity, e.g. eq. 9's well-guided teacher).
- `sample_few_step`: the LightX2V contract for distilled students: a denoising_step_list of timesteps
  (default [1000, 750, 500, 250]) warped by shift 5, CFG off; at each step predict x0, then re-noise it
  to the next sigma with fresh noise (the last step returns x0).
TI2V: pass `first_frame` (B, C, 1, H, W); it is kept clean at sigma 0 on every step, as Wan 2.2 does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .adapters.base import Conditioning, DiTAdapter
from .flow import add_noise, denoising_list_sigmas, euler_sigmas, euler_step, pinned_first_frame_sigma, x0_from_velocity

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TeacherSampling:
    steps: int = 50
    shift: float = 5.0
    cfg_scale: float = 5.0


@dataclass(frozen=True)
class FewStepSampling:
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0

    @property
    def sigmas(self) -> torch.Tensor:
        return denoising_list_sigmas(self.denoising_step_list, self.shift)


def pin(x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    """Puts the given TI2V first latent frame back in place (no-op without one)."""
    if first_frame is None:
        return x
    return torch.cat([first_frame.to(x), x[:, :, 1:]], dim=2)


def frame_sigma(sigma, x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    """(B,) sigmas, or (B, F) with frame 0 at 0 when a first frame is given."""
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0]).clone()
    return s if first_frame is None else pinned_first_frame_sigma(s, x.shape[2])


def renoise(x0: torch.Tensor, sigma_next, generator: torch.Generator | None,
            first_frame: torch.Tensor | None) -> torch.Tensor:
    """The few-step transition: an x0 prediction noised to the next sigma with fresh noise."""
    fresh = torch.randn(x0.shape, generator=generator).to(x0)
    return pin(add_noise(x0, fresh, frame_sigma(sigma_next, x0, first_frame)), first_frame)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, per-frame sigma) -> v


def sample_euler(velocity: Velocity, noise: torch.Tensor, config: TeacherSampling = TeacherSampling(),
                 first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    """N-step Euler on the shifted schedule with any guided velocity (config.cfg_scale is the caller's)."""
    sigmas = euler_sigmas(config.steps, config.shift).tolist()
    x = pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            sig = frame_sigma(s, x, first_frame)
            x = pin(euler_step(x, velocity(x, sig), sig, frame_sigma(s_next, x, first_frame)), first_frame)
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x


def sample_euler_cfg(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning, null_cond: Conditioning,
                     config: TeacherSampling = TeacherSampling(), skip: Iterable[int] = (),
                     first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    def velocity(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        v_c = adapter.forward(x, sig, cond, skip=skip)
        if config.cfg_scale == 1.0:
            return v_c
        v_null = adapter.forward(x, sig, null_cond, skip=skip)
        return v_null + config.cfg_scale * (v_c - v_null)

    return sample_euler(velocity, noise, config, first_frame, progress)


def sample_few_step(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning,
                    config: FewStepSampling = FewStepSampling(), skip: Iterable[int] = (),
                    generator: torch.Generator | None = None, first_frame: torch.Tensor | None = None,
                    sigmas: Sequence[float] | None = None, progress: Progress | None = None) -> torch.Tensor:
    """`sigmas` (ending in 0) overrides the config's list, e.g. the SIGMAS a checkpoint recommends."""
    sigmas = list(config.sigmas.tolist() if sigmas is None else sigmas)
    if sigmas[-1] != 0:
        raise ValueError(f"few-step sigmas must end at 0, got {sigmas}")
    x = pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            sig = frame_sigma(s, x, first_frame)
            x0 = pin(x0_from_velocity(x, adapter.forward(x, sig, cond, skip=skip), sig), first_frame)
            x = renoise(x0, s_next, generator, first_frame) if s_next > 0 else x0
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x
