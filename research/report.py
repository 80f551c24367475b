"""What `research.reproduce` measures about one model, and how a table of such measurements is written.

A `Measured` is one model sampled on the report's prompts: every held-out prompt in both modes (TI2V, T2V) at
every noise seed, scored by the evaluator (`Samples`, in a fixed order, so two models' videos pair up one for
one); its parameters as a fraction of the teacher's; its cost class (blocks, steps, network evaluations per
video) and, once `Costs` has measured that class, its wall-clock seconds and FLOPs per video. Two models are
compared by `paired`: the per-video differences of their primary score, with a 95% bootstrap interval over
(mode, combination) clusters (research/stats.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from fastlightgen.adapters import DiTAdapter, adapt
from fastlightgen.toy.evaluate import GATES, EvalTable, evaluate_batch
from fastlightgen.toy.prompts import Prompts

from .demo import MODES, one_video
from .stats import EQUIVALENCE_MARGIN, Interval, paired_interval
from .timing import flops_per_call, seconds_per_call

PRIMARY = "faithful"  # the score every comparison and claim of the report is made on
VideoKey = tuple[str, int, int]  # (mode, noise seed, prompt index): which video a score belongs to
SAMPLE_VIDEOS = 2  # videos kept per mode (the first seed's first prompts), for the report's mp4 samples


@dataclass(frozen=True)
class Samples:
    """A model's scored videos: the prompts of each mode (in MODES order) at each noise seed, in that order."""

    table: EvalTable
    keys: tuple[VideoKey, ...]
    clusters: tuple[tuple, ...]  # (mode, combination) of each video: what the bootstrap resamples first
    videos: dict[str, torch.Tensor]  # mode -> the first SAMPLE_VIDEOS videos of the first seed

    def scores(self, column: str = PRIMARY, mode: str | None = None) -> list[float]:
        return [row[column] for key, row in zip(self.keys, self.table.rows) if mode in (None, key[0])]

    def mean(self, column: str = PRIMARY, mode: str | None = None) -> float:
        return float(torch.tensor(self.scores(column, mode), dtype=torch.float64).mean())

    def subset(self, mode: str, seed: int | None = None) -> EvalTable:
        """The rows of one mode (and seed), in prompt order."""
        picked = [i for i, (m, s, _) in enumerate(self.keys) if m == mode and seed in (None, s)]
        return EvalTable([self.table.labels[i] for i in picked], [self.table.rows[i] for i in picked])


SeededGenerate = Callable[[Prompts, int], torch.Tensor]  # videos (B, 3, F, H, W) of the prompts at a noise seed


def sample(generate: SeededGenerate, prompts: Sequence[Prompts], seeds: Sequence[int]) -> Samples:
    """Every prompt set at every seed, one batched call each, scored against its factors (in its mode)."""
    labels, rows, keys, clusters, videos = [], [], [], [], {}
    for batch in prompts:
        for seed in seeds:
            generated = generate(batch, seed)
            if seed == seeds[0]:
                videos[batch.mode] = generated[:SAMPLE_VIDEOS].clone()
            table = evaluate_batch(generated, list(batch.factors), t2v=batch.t2v)
            labels += [f"{batch.mode} seed {seed}: {label}" for label in table.labels]
            rows += table.rows
            keys += [(batch.mode, seed, i) for i in range(len(batch.factors))]
            clusters += [(batch.mode, f.combination) for f in batch.factors]
    return Samples(EvalTable(labels, rows), tuple(keys), tuple(clusters), videos)


def paired_samples(a: Samples, b: Samples, column: str = PRIMARY) -> Interval:
    """Mean of a - b over the same videos, with its 95% interval (clusters: mode and combination)."""
    if a.keys != b.keys:
        raise ValueError("the two models were not measured on the same videos (prompts, seeds, modes)")
    return paired_interval(a.scores(column), b.scores(column), a.clusters)


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
    samples: Samples
    params: float  # fraction of the teacher's parameters
    cost_class: CostClass
    timer: Callable[[], object]  # generates one video, as a user makes them, for `Costs`
    settings: tuple[str, ...] = ()  # the ablated values this row was trained with, in the table's extra columns
    cost: Cost | None = None  # set by `Costs.of`

    def mean(self, column: str = PRIMARY, mode: str | None = None) -> float:
        return self.samples.mean(column, mode)

    @property
    def faithful(self) -> float:
        return self.mean(PRIMARY)

    @property
    def spread(self) -> float:
        return float(torch.tensor(self.samples.scores(PRIMARY), dtype=torch.float64).std(correction=0))

    @property
    def seconds(self) -> float:
        if self.cost is None:
            raise ValueError(f"{self.label!r} has no cost yet: pass its row through Costs.of")
        return self.cost.seconds

    def numbers(self, reference: Measured | None = None) -> dict[str, object]:
        """The means over every video (and the primary score per mode), costs, and the paired interval
        against `reference` (unless this row is the reference)."""
        out: dict[str, object] = {**self.samples.table.mean(), "videos": len(self.samples.keys),
                                  f"{PRIMARY}_std": self.spread,
                                  **{f"{PRIMARY}_{mode}": self.mean(PRIMARY, mode) for mode in MODES},
                                  "seconds_per_video": self.seconds, "gflops_per_video": self.cost.flops / 1e9,
                                  "params": self.params, "blocks": self.cost_class.blocks,
                                  "steps": self.cost_class.steps, "nfe": self.cost_class.nfe}
        if reference is not None and not same_model(self, reference):
            interval = paired(self, reference)
            out[f"{PRIMARY}_minus_reference"] = {"mean": interval.mean, "low": interval.low, "high": interval.high,
                                                 "verdict": interval.verdict()}
        return out


def paired(a: Measured, b: Measured, column: str = PRIMARY) -> Interval:
    """a - b per video on the same videos, with its 95% bootstrap interval."""
    return paired_samples(a.samples, b.samples, column)


def same_model(a: Measured, b: Measured) -> bool:
    """One measurement shown under two labels (a model reused by a later table)."""
    return a.samples is b.samples


def comparison(a: Measured, b: Measured, column: str = PRIMARY) -> str:
    """'a - b = mean [low, high]: verdict', the form of every claim in the report."""
    interval = paired(a, b, column)
    return f"{interval}: {interval.verdict()}"


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Generate = Callable[[DiTAdapter, Prompts, int], torch.Tensor]  # videos (B, 3, F, H, W) of the prompts at a seed


def measure(label: str, model: nn.Module, generate: Generate, prompts: Sequence[Prompts], seeds: Sequence[int],
            teacher_params: int, steps: int, nfe: int) -> Measured:
    """Quality over every prompt set at every seed; the cost (one video of the first prompt set at the first
    seed: TI2V) is measured per cost class, by `Costs`."""
    adapter = adapt(model.float().eval())
    samples = sample(lambda batch, seed: generate(adapter, batch, seed), prompts, seeds)
    return Measured(label, samples, parameter_count(model) / teacher_params, CostClass(adapter.num_blocks, steps, nfe),
                    one_video(lambda batch: generate(adapter, batch, seeds[0]), prompts[0]))


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


GATE_HEADS = tuple(g.replace("gate_", "gate ") for g in GATES)


def markdown_table(rows: Sequence[Measured], reference: Measured, extra: Sequence[str] = ()) -> str:
    """One row per model: its settings under the `extra` headers; the primary score per mode and over both
    (± std over the videos), the share of correct videos, each gate's pass rate and the VBench-like overall;
    cost and speed-up over `reference` (the teacher, same run); and the paired difference to it on the primary
    score with its 95% interval and verdict."""
    head = ["method", *extra, "params", "steps (NFE)", *(f"{PRIMARY} {mode}" for mode in MODES), f"{PRIMARY} ± std",
            "correct", *GATE_HEADS, "overall", "s / video", "speed-up", "GFLOP / video", "FLOP ratio",
            f"{PRIMARY} − teacher [95% CI]", f"verdict (±{EQUIVALENCE_MARGIN})"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        if same_model(row, reference):
            against = ("–", "–")
        else:
            interval = paired(row, reference)
            against = (str(interval), interval.verdict())
        settings = row.settings or ("–",) * len(extra)
        cells = [row.label, *settings, f"{row.params:.0%}", f"{row.cost_class.steps} ({row.cost_class.nfe})",
                 *(f"{row.mean(PRIMARY, mode):.3f}" for mode in MODES), f"**{row.faithful:.3f}** ± {row.spread:.3f}",
                 *(f"{row.mean(c):.3f}" for c in ("correct", *GATES, "overall")),
                 f"{row.seconds:.3f}", f"{reference.seconds / row.seconds:.1f}x", f"{row.cost.flops / 1e9:.2f}",
                 f"{reference.cost.flops / row.cost.flops:.1f}x", *against]
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
                 title: str, score: str = PRIMARY) -> None:
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
    fig.colorbar(filled, label=f"evaluator: {score}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
