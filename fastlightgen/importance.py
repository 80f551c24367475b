"""Stage I (paper eq. 3-4): how much the Tweedie x0 estimate degrades when one block is skipped.

score_i = E_(t, x_t, x0) || x_t - t * v_skip-i(x_t, t) - x0 ||^2   (mean over elements and samples)

With prefix reuse, the skip-i pass starts from the full pass's input to block i, so one sample costs
N + sum_i (N - 1 - i) block evaluations instead of (N + 1) * N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .adapters.base import Conditioning, DiTAdapter
from .branches import Branch, run_branches
from .first_frame import given_frame, noised
from .flow import x0_from_velocity
from .plan import PrunePlan


@dataclass
class ImportanceResult:
    scores: list[float]  # per block; larger = more important
    reference_error: float  # the full model's error on the same samples
    num_samples: int
    timesteps: list[float]  # sigmas used

    @property
    def ranking(self) -> list[int]:
        """Block indices from most to least important."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    def plan(self, adapter: DiTAdapter, keep_ratio: float | None = None, keep_count: int | None = None,
             protected: Sequence[int] = ()) -> PrunePlan:
        return PrunePlan.from_scores(adapter.fingerprint(), self.scores, keep_ratio, keep_count, protected,
                                     self.reference_error)

    def table(self) -> str:
        rank = {b: r for r, b in enumerate(self.ranking)}
        lines = ["block | score | rank", "---|---|---"]
        lines += [f"{i} | {s:.6g} | {rank[i] + 1}" for i, s in enumerate(self.scores)]
        lines.append(f"full model | {self.reference_error:.6g} | -")
        return "\n".join(lines)


def stage1_sigmas(num_timesteps: int, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Evenly spaced interior noise levels of [low, high]; the ends say nothing (sigma 0 is exact, sigma 1 is
    pure noise). A part of the schedule ([boundary, 1] or [0, boundary]) scores one expert of a two-expert
    model (`fastlightgen.experts`) where it runs."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"the sigma range must be 0 <= low < high <= 1, got [{low}, {high}]")
    return [low + (high - low) * (k + 0.5) / num_timesteps for k in range(num_timesteps)]


def check_error(error: float, block: int | None, sigma: float) -> float:
    """A NaN error would rank its block anywhere and silently break the plan: stop at the first one."""
    if not math.isfinite(error):
        what = "the full model" if block is None else f"block {block} skipped"
        raise ValueError(f"Stage I: the x0 error ({what}) is {error} at sigma {sigma:g}: the model's output is "
                         "not finite (it overflowed or holds NaN weights); run Stage I in a wider dtype (bf16/fp32 "
                         "instead of fp16/fp8) or on an intact checkpoint")
    return error


def block_importance(adapter: DiTAdapter, samples: Iterable[tuple[torch.Tensor, Conditioning]],
                     sigmas: Sequence[float], seed: int = 0, pin_first_frame: bool = False,
                     prefix_reuse: bool = True,
                     progress: Callable[[int, int], None] | None = None) -> ImportanceResult:
    """Scores every block over `samples` (clean latents x0 with their conditioning) at each sigma.

    pin_first_frame: TI2V models see the first latent frame clean (sigma 0), as at inference.
    """
    n = adapter.num_blocks
    totals = torch.zeros(n, dtype=torch.float64)
    reference = 0.0
    count = 0
    generator = torch.Generator().manual_seed(seed)
    samples = list(samples)
    work, done = len(samples) * len(sigmas), 0
    with torch.no_grad():
        for x0, cond in samples:
            for s in sigmas:
                x_t, sigma, _ = noised(x0, float(s), generator, given_frame(x0, pin_first_frame))
                err = lambda v: (x0_from_velocity(x_t, v, sigma) - x0).double().pow(2).mean().item()  # noqa: E731
                if prefix_reuse:  # the full pass and each one-block-skipped pass, sharing their prefixes
                    v_full, *skipped = run_branches(adapter, x_t, sigma, cond,
                                                    [Branch()] + [Branch(frozenset({i})) for i in range(n)])
                    full = check_error(err(v_full), None, float(s))
                    per_block = [check_error(err(v), i, float(s)) for i, v in enumerate(skipped)]
                else:
                    full = check_error(err(adapter.forward(x_t, sigma, cond)), None, float(s))
                    per_block = [check_error(err(adapter.forward(x_t, sigma, cond, skip={i})), i, float(s))
                                 for i in range(n)]
                totals += torch.tensor(per_block, dtype=torch.float64)
                reference += full
                count += 1
                done += 1
                if progress:
                    progress(done, work)
    if count == 0:
        raise ValueError("Stage I needs at least one sample and one timestep")
    return ImportanceResult((totals / count).tolist(), reference / count, count, [float(s) for s in sigmas])
