"""Paired comparisons with confidence intervals, and the verdicts they allow.

A comparison of two models is made on the same videos (prompt, render, noise seed): the per-video
differences are paired. Their mean gets a 95% bootstrap interval that resamples prompt combinations (a
cluster: a combination's renders and seeds share its difficulty), then videos within them. "matches",
"better" and "worse" are said only where the interval says so; anything else is "inconclusive".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

# Fixed before any run that uses it, on the scale of the toy evaluator's scores (0..1): a student whose
# interval for (student - teacher) lies inside +-0.05 matches its teacher. It is half the gap the sanity table
# requires between the teacher and every wrong answer (research/sanity.py), so that a model within the margin
# stays nearer the teacher than any wrong answer can come.
EQUIVALENCE_MARGIN = 0.05


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int  # paired videos
    clusters: int  # prompt combinations resampled

    def verdict(self, margin: float = EQUIVALENCE_MARGIN) -> str:
        """The claims the interval supports, about the first model against the second."""
        claims = []
        if -margin < self.low and self.high < margin:
            claims.append("matches")
        if self.low > 0:
            claims.append("better")
        elif self.high < 0:
            claims.append("worse")
        return ", ".join(claims) or "inconclusive"

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_interval(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable] | None = None,
                    level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean of a - b over paired videos, with a percentile bootstrap interval over clusters then videos
    (every video its own cluster when `clusters` is None)."""
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if diffs.ndim != 1 or len(diffs) < 2:
        raise ValueError(f"need at least two paired videos, got {len(diffs)}")
    if not torch.isfinite(diffs).all():
        raise ValueError("a score is not finite: a comparison with NaN or inf has no interval")
    labels = list(range(len(diffs))) if clusters is None else list(clusters)
    if len(labels) != len(diffs):
        raise ValueError(f"{len(labels)} cluster labels for {len(diffs)} videos")
    keys = list(dict.fromkeys(labels))
    sizes = torch.tensor([labels.count(k) for k in keys])
    padded = torch.zeros(len(keys), int(sizes.max()), dtype=torch.float64)
    for row, key in enumerate(keys):
        padded[row, :sizes[row]] = diffs[[i for i, c in enumerate(labels) if c == key]]
    g = torch.Generator().manual_seed(seed)
    picked = torch.randint(len(keys), (resamples, len(keys)), generator=g)  # clusters, with replacement
    n = sizes[picked]  # (R, K) videos in each picked cluster
    within = (torch.rand((*picked.shape, padded.shape[1]), generator=g, dtype=torch.float64) * n[..., None]).long()
    used = torch.arange(padded.shape[1]) < n[..., None]  # a cluster draws as many videos as it has
    values = padded[picked[..., None], within] * used
    means = values.sum((1, 2)) / used.sum((1, 2))
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(diffs.mean().item(), low, high, len(diffs), len(keys))
