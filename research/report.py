"""What `research.reproduce` measures about one model, and how a table of such measurements is written.

A `Measured` is one model sampled on the report's prompts: the evaluator's table over its videos, its
parameters as a fraction of the teacher's, its cost class (blocks, steps, network evaluations per video) and,
once `Costs` has measured that class, its wall-clock seconds and FLOPs per video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from fastlightgen.adapters import DiTAdapter, adapt
from fastlightgen.toy.evaluate import EvalTable, evaluate_batch
from fastlightgen.toy.prompts import Prompts

from .demo import one_video
from .timing import flops_per_call, seconds_per_call

SHOWN = ("color", "shape", "direction", "i2v_subject", "subject_consistency", "motion_smoothness",
         "dynamic_degree", "imaging_quality", "temporal_flicker")
SHORT = {"i2v_subject": "i2v subj", "subject_consistency": "subj cons", "motion_smoothness": "smooth",
         "dynamic_degree": "dynamic", "imaging_quality": "imaging", "temporal_flicker": "flicker"}


@dataclass(frozen=True)
class CostClass:
    """All a model's cost per video depends on: two models of one cost class differ only in their weights."""

    blocks: int
    steps: int
    nfe: int  # network evaluations per video (CFG doubles them)


@dataclass(frozen=True)
class Cost:
    seconds: float  # wall clock per video
    flops: float  # per video


@dataclass
class Measured:
    label: str
    table: EvalTable
    params: float  # fraction of the teacher's parameters
    cost_class: CostClass
    timer: Callable[[], object]  # generates one video, as a user makes them, for `Costs`
    videos: torch.Tensor | None = None
    settings: tuple[str, ...] = ()  # the ablated values this row was trained with, in the table's extra columns
    cost: Cost | None = None  # set by `Costs.of`

    @property
    def overall(self) -> float:
        return self.table.mean()["overall"]

    @property
    def spread(self) -> float:
        return self.table.std()["overall"]

    @property
    def seconds(self) -> float:
        if self.cost is None:
            raise ValueError(f"{self.label!r} has no cost yet: pass its row through Costs.of")
        return self.cost.seconds

    def numbers(self) -> dict[str, float]:
        return {**self.table.mean(), "overall_std": self.spread, "seconds_per_video": self.seconds,
                "gflops_per_video": self.cost.flops / 1e9, "params": self.params, "blocks": self.cost_class.blocks,
                "steps": self.cost_class.steps, "nfe": self.cost_class.nfe}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Generate = Callable[[DiTAdapter, Prompts], torch.Tensor]  # videos (B, 3, F, H, W) of the prompts


def measure(label: str, model: nn.Module, generate: Generate, prompts: Prompts, teacher_params: int, steps: int,
            nfe: int, keep_videos: bool = False) -> Measured:
    """Quality over all `prompts`; the cost is measured per cost class, by `Costs`."""
    adapter = adapt(model.float().eval())
    videos = generate(adapter, prompts)
    table = evaluate_batch(videos, list(prompts.factors))
    return Measured(label, table, parameter_count(model) / teacher_params, CostClass(adapter.num_blocks, steps, nfe),
                    one_video(lambda batch: generate(adapter, batch), prompts), videos if keep_videos else None)


class Costs:
    """Seconds and FLOPs per video of each cost class, measured once per report.

    One video per call for every model (as a user makes them; a 4-step model timed on 24 videos at once
    looked faster than it is against a teacher timed on fewer). The classes first met
    in one table are timed together in alternating rounds (`seconds_per_call`), so that their ratios are not
    decided by when each was measured; later rows of a known class reuse its cost.
    """

    def __init__(self, rounds: int, round_seconds: float):
        self.rounds, self.round_seconds = rounds, round_seconds
        self.known: dict[CostClass, Cost] = {}

    def of(self, rows: Sequence[Measured]) -> list[Measured]:
        new: dict[CostClass, Callable[[], object]] = {}
        for row in rows:
            if row.cost_class not in self.known:
                new.setdefault(row.cost_class, row.timer)
        seconds = seconds_per_call(*new.values(), rounds=self.rounds, round_seconds=self.round_seconds) if new else []
        for (cost_class, timer), s in zip(new.items(), seconds):
            self.known[cost_class] = Cost(s, flops_per_call(timer))
        return [replace(row, cost=self.known[row.cost_class]) for row in rows]


def markdown_table(rows: Sequence[Measured], reference: Measured | None, extra: Sequence[str] = ()) -> str:
    """One row per model: its settings under the `extra` headers, the evaluator's dimensions, overall
    +- std over the videos, time per video and speed-up over `reference` (same run)."""
    head = ["method", *extra, "params", "steps (NFE)", *(SHORT.get(c, c) for c in SHOWN), "overall ± std",
            "s / video", "speed-up", "GFLOP / video", "FLOP ratio"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        mean = row.table.mean()
        speed, flop_ratio = (f"{reference.seconds / row.seconds:.1f}x",
                             f"{reference.cost.flops / row.cost.flops:.1f}x") if reference else ("–", "–")
        settings = row.settings or ("–",) * len(extra)
        cells = [row.label, *settings, f"{row.params:.0%}", f"{row.cost_class.steps} ({row.cost_class.nfe})",
                 *(f"{mean[c]:.3f}" for c in SHOWN), f"**{row.overall:.3f}** ± {row.spread:.3f}",
                 f"{row.seconds:.3f}", speed, f"{row.cost.flops / 1e9:.2f}", flop_ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_settings(row: Measured, *values: object) -> Measured:
    return replace(row, settings=tuple(str(v) for v in values))


def all_finite(values: dict) -> bool:
    return all(math.isfinite(v) for v in _flatten(values))


def _flatten(values) -> list[float]:
    if isinstance(values, dict):
        return [x for v in values.values() for x in _flatten(v)]
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in _flatten(v)]
    return [float(values)] if isinstance(values, (int, float)) and not isinstance(values, bool) else []


def contour_plot(path: Path, steps: Sequence[int], kept: Sequence[float], scores: list[list[float]],
                 title: str) -> None:
    """Fig. 1: average score over (sampling steps, kept parameters); scores[i][j] is kept[i] at steps[j]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = torch.tensor([math.log2(s) for s in steps])
    ys = torch.tensor([100 * k for k in kept])
    z = torch.tensor(scores)
    filled = ax.contourf(xs.numpy(), ys.numpy(), z.numpy(), levels=12, cmap="viridis")
    ax.contour(xs.numpy(), ys.numpy(), z.numpy(), levels=12, colors="k", linewidths=0.4)
    for i, k in enumerate(ys.tolist()):
        for j, s in enumerate(xs.tolist()):
            ax.annotate(f"{scores[i][j]:.2f}", (s, k), ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    for axis, v in ((ax.set_xlim, xs), (ax.set_ylim, ys)):  # room for the labels on the edge points
        pad = 0.06 * float(v.max() - v.min())
        axis(float(v.min()) - pad, float(v.max()) + pad)
    ax.set_xticks(xs.numpy(), [str(s) for s in steps])
    ax.set_xlabel("sampling steps (log scale; the last column is Euler with CFG)")
    ax.set_ylabel("kept parameters (%)")
    ax.set_title(title)
    fig.colorbar(filled, label="evaluator overall")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
