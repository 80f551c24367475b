"""The sampling contract and the samplers, deterministic given their noise and generator, for any adapter
and skip-set.

`Sampling` is how a model is meant to be sampled, the one type a checkpoint recommends and every sampler reads:
- Euler (a teacher): `steps` uniform steps on the shifted schedule with CFG `cfg_scale` (`sample_euler_cfg`;
  `sample_euler` takes any guided velocity, e.g. eq. 9's well-guided teacher);
- few-step (a distilled student, `Sampling.few_step`): the LightX2V contract, a denoising_step_list of
  timesteps (default [1000, 750, 500, 250]) warped by shift 5, CFG off (`sample_few_step`): at each step
  predict x0, then re-noise it to the next sigma with fresh noise (the last step returns x0).
TI2V: pass `first_frame` (B, C, 1, H, W); the samplers keep it by `fastlightgen.first_frame`'s rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .adapters.base import Conditioning, DiTAdapter
from .first_frame import frame_sigma, noised, pin
from .flow import denoising_list_sigmas, euler_sigmas, euler_step, x0_from_velocity

Progress = Callable[[int, int], None]


# The distilled student's default contract (LightX2V's): four timesteps warped by shift 5.
FEW_STEP_LIST = (1000, 750, 500, 250)
FEW_STEP_SHIFT = 5.0


@dataclass(frozen=True)
class Sampling:
    """Euler with CFG when `denoising_step_list` is empty; otherwise the few-step list, whose length is
    `steps` and which runs without CFG. Stored in checkpoint metadata as the JSON of its fields."""

    steps: int = 50
    shift: float = 5.0
    cfg_scale: float = 5.0
    denoising_step_list: tuple[int, ...] = ()

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.denoising_step_list and (self.steps != len(self.denoising_step_list) or self.cfg_scale != 1.0):
            raise ValueError(f"a few-step list {list(self.denoising_step_list)} runs {len(self.denoising_step_list)} "
                             f"steps without CFG, not {self.steps} steps at CFG {self.cfg_scale:g}")

    @classmethod
    def few_step(cls, denoising_step_list: Sequence[int] = FEW_STEP_LIST, shift: float = FEW_STEP_SHIFT) -> "Sampling":
        steps = tuple(int(t) for t in denoising_step_list)
        return cls(len(steps), shift, 1.0, steps)

    @property
    def is_few_step(self) -> bool:
        return bool(self.denoising_step_list)

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule, ending at 0: the few-step list's sigmas, or the Euler steps' on the shifted schedule."""
        if self.is_few_step:
            return denoising_list_sigmas(self.denoising_step_list, self.shift)
        return euler_sigmas(self.steps, self.shift)

    @property
    def nfe(self) -> int:
        """Network evaluations per video: CFG doubles them."""
        return self.steps * (2 if self.cfg_scale != 1.0 else 1)

    @classmethod
    def from_dict(cls, d: dict) -> "Sampling":
        return cls(int(d["steps"]), float(d["shift"]), float(d["cfg_scale"]),
                   tuple(int(t) for t in d["denoising_step_list"]))


FEW_STEP = Sampling.few_step()  # the distilled student's default contract
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, per-frame sigma) -> v


def sample_euler(velocity: Velocity, noise: torch.Tensor, config: Sampling = Sampling(),
                 first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Euler steps over config's schedule with any guided velocity (config.cfg_scale is the caller's)."""
    sigmas = config.sigmas.tolist()
    ti2v = first_frame is not None
    x = pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            sig = frame_sigma(s, x, ti2v)
            x = pin(euler_step(x, velocity(x, sig), sig, frame_sigma(s_next, x, ti2v)), first_frame)
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x


def sample_euler_cfg(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning, null_cond: Conditioning,
                     config: Sampling = Sampling(), skip: Iterable[int] = (),
                     first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    def velocity(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        v_c = adapter.forward(x, sig, cond, skip=skip)
        if config.cfg_scale == 1.0:
            return v_c
        v_null = adapter.forward(x, sig, null_cond, skip=skip)
        return v_null + config.cfg_scale * (v_c - v_null)

    return sample_euler(velocity, noise, config, first_frame, progress)


def predict_x0(velocity: Velocity, x: torch.Tensor, sigma: float, first_frame: torch.Tensor | None) -> torch.Tensor:
    """One few-step prediction: the x0 of the velocity at sigma, the first frame kept."""
    sig = frame_sigma(sigma, x, first_frame is not None)
    return pin(x0_from_velocity(x, velocity(x, sig), sig), first_frame)


def sample_few_step(adapter: DiTAdapter, noise: torch.Tensor, cond: Conditioning, config: Sampling = FEW_STEP,
                    skip: Iterable[int] = (), generator: torch.Generator | None = None,
                    first_frame: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    if config.cfg_scale != 1.0:
        raise ValueError(f"the few-step sampler runs without CFG; {config} asks for CFG {config.cfg_scale:g}, "
                         "sample it with sample_euler_cfg")
    sigmas = config.sigmas.tolist()
    x = pin(noise, first_frame)
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            x0 = predict_x0(lambda x_t, sig: adapter.forward(x_t, sig, cond, skip=skip), x, s, first_frame)
            x = noised(x0, s_next, generator, first_frame)[0] if s_next > 0 else x0
            if progress:
                progress(i + 1, len(sigmas) - 1)
    return x
