"""Samplers, deterministic given their noise and generator, usable with any adapter and skip-set.

- `sample_euler_cfg`: the teacher baseline, N-step Euler on the shifted schedule with CFG.
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
from .flow import add_noise, denoising_list_sigmas, euler_sigmas, euler_step, pinned_first_frame_sigma, \
    x0_from_velocity

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


def _pin(x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    if first_frame is None:
        return x
    return torch.cat([first_frame.to(x), x[:, :, 1:]], dim=2)


def _model_sigma(sigma: float, x: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    s = torch.full((x.shape[0],), float(sigma))
    return s if first_frame is None else pinned_first_frame_sigma(s, x.shape[2])


def sample_euler_cfg(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning, null_cond: Conditioning,
                     config: TeacherSampling = TeacherSampling(), skip: Iterable[int] = (),
                     first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    sigmas = euler_sigmas(config.steps, config.shift).tolist()
    x = _pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            sig = _model_sigma(s, x, first_frame)
            v_c = adapter.forward(x, sig, cond, skip=skip)
            v = v_c
            if config.cfg_scale != 1.0:
                v_null = adapter.forward(x, sig, null_cond, skip=skip)
                v = v_null + config.cfg_scale * (v_c - v_null)
            x = _pin(euler_step(x, v, sig, _model_sigma(s_next, x, first_frame)), first_frame)
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x


def sample_few_step(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning,
                    config: FewStepSampling = FewStepSampling(), skip: Iterable[int] = (),
                    generator: torch.Generator | None = None, first_frame: torch.Tensor | None = None,
                    sigmas: Sequence[float] | None = None, progress: Progress | None = None) -> torch.Tensor:
    """`sigmas` (ending in 0) overrides the config's list, e.g. the SIGMAS a checkpoint recommends."""
    sigmas = list(config.sigmas.tolist() if sigmas is None else sigmas)
    if sigmas[-1] != 0:
        raise ValueError(f"few-step sigmas must end at 0, got {sigmas}")
    x = _pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            sig = _model_sigma(s, x, first_frame)
            x0 = _pin(x0_from_velocity(x, adapter.forward(x, sig, cond, skip=skip), sig), first_frame)
            if s_next > 0:
                fresh = torch.randn(x.shape, generator=generator).to(x)
                x = _pin(add_noise(x0, fresh, _model_sigma(s_next, x, first_frame)), first_frame)
            else:
                x = x0
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x
