"""Generating toy-world videos with any adapter: the teacher's 50-step CFG sampler, eq. 9's teacher mix, or
the few-step sampler.

The given first frame (TI2V) is the clean render of the factors' first frame, encoded by the codec.
Noise comes from one generator per call, so a (seed, prompts) pair always yields the same videos.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..adapters import DiTAdapter
from ..guidance import well_guided_velocity
from ..sampling import FEW_STEP, Sampling, sample_euler, sample_euler_cfg, sample_few_step
from .codec import decode_video
from .prompts import Prompts
from .teacher import conditioning, null_like


def _noise(prompts: Prompts, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((len(prompts.factors), *prompts.latent_shape()), generator=g), g


def generate_teacher(adapter: DiTAdapter, prompts: Prompts, seed: int,
                     config: Sampling = Sampling(), skip: Iterable[int] = ()) -> torch.Tensor:
    """Videos (B, 3, F, H, W) from the multi-step Euler CFG sampler."""
    noise, _ = _noise(prompts, seed)
    cond = conditioning(prompts.captions)
    latents = sample_euler_cfg(adapter, noise, cond, null_like(cond), config, skip=skip,
                               first_frame=prompts.first_frames())
    return decode_video(latents)


def generate_well_guided(adapter: DiTAdapter, prompts: Prompts, seed: int, config: Sampling,
                         pruned_skip: Iterable[int], beta1: float, beta2: float) -> torch.Tensor:
    """Videos from multi-step Euler on eq. 9's teacher mix (a preview of what Stage III's real score wants)."""
    noise, _ = _noise(prompts, seed)
    cond = conditioning(prompts.captions)
    null = null_like(cond)
    latents = sample_euler(lambda x, sig: well_guided_velocity(adapter, x, sig, cond, null, pruned_skip, beta1, beta2),
                           noise, config, first_frame=prompts.first_frames())
    return decode_video(latents)


def generate_few_step(adapter: DiTAdapter, prompts: Prompts, seed: int, config: Sampling = FEW_STEP,
                      skip: Iterable[int] = ()) -> torch.Tensor:
    """Videos (B, 3, F, H, W) from the few-step (CFG-free) sampler."""
    noise, g = _noise(prompts, seed)
    latents = sample_few_step(adapter, noise, conditioning(prompts.captions), config, skip=skip, generator=g,
                              first_frame=prompts.first_frames())
    return decode_video(latents)
