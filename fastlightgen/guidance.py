"""The well-guided teacher (paper eq. 9): one set of weights, two paths, two guidance scales.

    v_real = beta1 * (vP(c) - vP(null)) + beta2 * (vU(c) - vP(c)) + vP(null)

vP is the pruned path (the plan's blocks skipped), vU the unpruned path. The first term is ordinary
classifier-free guidance on the pruned path in the "v_null + s * (v_c - v_null)" form with scale
beta1 (inter CFG); the second pulls toward the unpruned model with scale beta2 (intra CFG). So beta2 = 0
is plain CFG on the pruned path, and beta1 = beta2 = 1 gives vU(c). The three predictions come from one
`guided_predictions` call: [c; null] as one batch through the prefix (blocks before the first
pruned block) and the pruned path, vU(c) continuing from the c rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .adapters.base import Conditioning, DiTAdapter, batch_sigma
from .branches import Branch, run_branches


@dataclass(frozen=True)
class TeacherMix:
    """Centre values and jitter of the two scales; each call of `sample` draws a (beta1, beta2)."""

    beta1: float = 3.5
    beta2: float = 0.25
    beta1_below: float = 1.0  # a1: beta1_cur ~ U[beta1 - a1, beta1 + b1]
    beta1_above: float = 1.0  # b1
    beta2_jitter: float = 0.1  # a2 = b2: beta2_cur ~ U[beta2 - a2, beta2 + a2]

    def __post_init__(self):
        for name in ("beta1_below", "beta1_above", "beta2_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def sample(self, generator: torch.Generator) -> tuple[float, float]:
        u1, u2 = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        b1 = self.beta1 - self.beta1_below + u1 * (self.beta1_below + self.beta1_above)
        b2 = self.beta2 - self.beta2_jitter + u2 * 2 * self.beta2_jitter
        return b1, b2


def guided_predictions(adapter: DiTAdapter, x: torch.Tensor, sigma, cond: Conditioning, null_cond: Conditioning,
                       pruned_skip: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vP(c), vP(null), vU(c)) in one call: [c; null] as one batch (which pays wherever one sample leaves the
    device idle, a GPU at batch 1) along the pruned path, vU(c) continuing from the c rows where the paths part."""
    n, sigma = x.shape[0], batch_sigma(sigma, x)
    pruned, unpruned = run_branches(adapter, torch.cat([x, x]), torch.cat([sigma, sigma]), cond.cat(null_cond),
                                    [Branch(frozenset(pruned_skip)), Branch(rows=n)])
    return pruned[:n], pruned[n:], unpruned


def well_guided_velocity(adapter: DiTAdapter, x: torch.Tensor, sigma, cond: Conditioning,
                         null_cond: Conditioning, pruned_skip: Iterable[int], beta1: float,
                         beta2: float) -> torch.Tensor:
    v_pruned_c, v_pruned_null, v_unpruned_c = guided_predictions(adapter, x, sigma, cond, null_cond, pruned_skip)
    return mix_velocities(v_pruned_c, v_pruned_null, v_unpruned_c, beta1, beta2)


def mix_velocities(v_pruned_c: torch.Tensor, v_pruned_null: torch.Tensor, v_unpruned_c: torch.Tensor,
                   beta1: float, beta2: float) -> torch.Tensor:
    """Eq. 9 on precomputed predictions.

    Its weights (beta1 - beta2, 1 - beta1, beta2) sum to 1, so the same mix of x0 predictions is the x0
    of the mixed velocity: the ComfyUI guider, which receives x0, calls this too.
    """
    return beta1 * (v_pruned_c - v_pruned_null) + beta2 * (v_unpruned_c - v_pruned_c) + v_pruned_null
