"""Prompt sets of the toy world: which factors a model is asked to generate, and their given first frames.

A split's prompts are seeded, so a (split, seed) pair always names the same videos; held-out prompts are
for reporting only, never for choosing a setting. TI2V prompts give the first frame; T2V prompts give only
the caption, on plain backgrounds (a textured background's stripes are not in the caption, so a scorer could
not know them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import encode_video
from .world import BACKGROUNDS, Factors, caption, render, sample_factors, split_combinations


@dataclass(frozen=True)
class Prompts:
    factors: tuple[Factors, ...]
    t2v: bool = False  # no first frame given

    @property
    def mode(self) -> str:
        return "T2V" if self.t2v else "TI2V"

    @property
    def captions(self) -> list[str]:
        return [caption(f) for f in self.factors]

    def first_frames(self) -> torch.Tensor | None:
        """Model-space first latent frames (B, 48, 1, h, w); None in T2V."""
        if self.t2v:
            return None
        videos = torch.stack([render(f) for f in self.factors])
        return encode_video(videos)[:, :, :1]

    def latent_shape(self) -> tuple[int, ...]:
        return tuple(encode_video(render(self.factors[0])[None]).shape[1:])

    def first(self) -> Prompts:
        """The first prompt alone: a model's cost is measured on one video, as a user makes them."""
        return Prompts(self.factors[:1], self.t2v)


def split_prompts(split: str, per_combination: int = 1, seed: int = 0, limit: int | None = None,
                  stride: int = 1, t2v: bool = False) -> Prompts:
    """Every `stride`-th combination of a split (up to `limit`), `per_combination` times, with seeded
    positions, speeds, color changes and backgrounds."""
    combos = split_combinations(split)[::stride][:limit]
    backgrounds = ("plain",) if t2v else BACKGROUNDS
    return Prompts(tuple(sample_factors(seed * 10_007 + i * len(combos) + j, [c], backgrounds)
                         for i in range(per_combination) for j, c in enumerate(combos)), t2v)


def heldout_prompts(per_combination: int = 1, seed: int = 0, t2v: bool = False) -> Prompts:
    return split_prompts("heldout", per_combination, seed, t2v=t2v)
