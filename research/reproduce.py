"""`python -m research.reproduce`: the paper's Tables 2, 4, 5, 6, 9 and Figs. 1, 4 on the toy world.

Trains (or reuses, cached by config hash under --cache) every variant the tables need from the committed
toy teacher with the recipe of configs/toy.yaml, samples each on the held-out prompts (combinations of
color, shape and direction never seen in training) in both modes, TI2V and T2V, at several noise seeds,
and writes a report: REPORT.md, plots, a few mp4 samples and results.json. It opens with the sanity tables
(the scorer's ranking of known answers on the same prompts). Every comparison and claim rests on a paired
interval (research/stats.py): the per-video difference of the primary score `faithful` between two models on
the same videos, with a 95% bootstrap interval over (mode, combination) clusters and a verdict against the
equivalence margin fixed there. A section's numbers, times and speed-ups all come from one run, which the
section names at its end. The report is rewritten after every section; the sections of a report already in
--out stay until the run replaces them, so an interrupted run leaves a whole report (and the cache) behind,
and `--sections` reruns only some: a report longer than one session is finished in pieces. Choices (the
automatic betas) are made on training prompts only, never on the held-out prompts.

--quick runs the same report with tiny training runs and few prompts (minutes; numbers are not
meaningful, only the structure): the test suite uses it.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling
from fastlightgen.toy.generate import generate_few_step, generate_teacher, generate_well_guided
from fastlightgen.toy.prompts import Prompts, split_prompts
from fastlightgen.toy.world import split_combinations
from fastlightgen.video_io import write_mp4
from train.config import Config
from train.models.loading import MODEL_FILE, load_teacher, load_weights, student_model
from train.models.record import StageRecord

from .demo import MODES
from .report import (PRIMARY, Costs, Measured, all_finite, comparison, contour_plot, markdown_table, measure, paired,
                     paired_samples, parameter_count, sample, with_settings)
from .run_cache import StageCache
from .sanity import SANITY_MARGIN, ordering_holds, sanity_markdown, sanity_rows
from .stats import EQUIVALENCE_MARGIN, Interval

REPO = Path(__file__).resolve().parent.parent
PAPER_WAN_SPEEDUP = 35.0
PAPER_HALF_SPEEDUP = 50.0  # the paper's Fig. 1: a 50 %-pruned 4-step student, about 50x at the teacher's quality
PREVIEW_SEED = 1000  # noise seed of the automatic-beta previews: training prompts, apart from the evaluation seeds


@dataclass(frozen=True)
class Mode:
    name: str
    combinations: int | None  # held-out combinations used (None: all)
    renders: int  # renders (positions, backgrounds) per combination
    seeds: tuple[int, ...]  # noise seeds: every prompt of both modes is sampled at each
    preview_steps: int  # Euler steps of the auto-beta previews
    rounds: int  # a model's time per video is its best of this many timing rounds
    round_seconds: float  # each timing round repeats a model's video for about this long
    overrides: tuple[str, ...] = ()  # applied to the config of every run
    teacher_steps: int | None = None  # Euler steps of the teacher-shaped rows (None: the teacher's recommended)


# 12 held-out combinations x 1 render x 5 seeds x 2 modes = 120 videos per model
FULL = Mode("full", None, 1, (0, 1, 2, 3, 4), 20, 10, 2.0)
QUICK = Mode("quick", 4, 1, (0, 1), 6, 1, 0.0, ("stage1.samples=1", "stage1.timesteps=2", "data.batch_size=1",
                                              "stage2.iterations=2", "stage3.iterations=1", "stage3.fake_updates=1"),
             teacher_steps=6)

ALPHAS = (0.0, 0.5, 1.0)
STABLE_TARGETS = ("frozen", "ema")  # alpha = 1 with a target that does not move with the trained weights
BETA1S = (1.5, 2.5, 3.5, 4.5)  # at the config's beta2 (the paper's Table 5 values)
BETA2S = (0.0, 0.25, 0.5, 1.0)  # at the config's beta1
KEEPS = (0.7, 0.5, 0.3)  # pruning 30 / 50 / 70 %
FEW_STEP_LISTS = {1: (1000,), 2: (1000, 500), 4: (1000, 750, 500, 250)}
# report sections in run order (cheap, paper-central ones first) and the Reproduction method of each
SECTIONS = {"Sanity": "sanity", "Table 2": "table2", "Fig. 4": "fig4", "Table 6": "table6", "Fig. 1": "fig1",
            "Table 4": "table4", "Table 9": "table9", "Table 5": "table5", "Automatic beta selection": "auto_beta"}
UNTRAINED = ("Sanity", "Fig. 4")  # sections that read no Stage II or III run: their run line names no lengths


def training_prompts(combinations: int) -> list[Prompts]:
    """`combinations` training combinations spread over the training split, one render each, in MODES order."""
    stride = max(1, len(split_combinations("train")) // combinations)
    return [split_prompts("train", 1, 0, combinations, stride, t2v=m == "T2V") for m in MODES]


def measure_euler(label: str, model: torch.nn.Module, sampling: Sampling, prompts: Sequence[Prompts],
                  seeds: Sequence[int], teacher_params: int) -> Measured:
    """A model sampled as the teacher is (Euler with CFG at `sampling`)."""
    return measure(label, model, lambda a, batch, seed: generate_teacher(a, batch, seed, sampling), prompts, seeds,
                   teacher_params, sampling.steps, sampling.nfe)


def measure_student(label: str, base: Config, folder: Path, steps: int, prompts: Sequence[Prompts],
                    seeds: Sequence[int], teacher_params: int) -> Measured:
    """The student of a finished Stage III run sampled at `steps` of its few-step schedule."""
    record = StageRecord.load(folder)
    few = Sampling.few_step(FEW_STEP_LISTS[steps], record.sampling.shift)
    return measure(label, student_model(base, folder, record),
                   lambda a, batch, seed: generate_few_step(a, batch, seed, few), prompts, seeds, teacher_params,
                   steps, steps)


def pruned_path(base: Config, folder: Path) -> torch.nn.Module:
    """The pruned path of a finished Stage II run, as its own model."""
    return student_model(base, folder, StageRecord.load(folder))


def training_lengths(base: Config) -> str:
    return f"Stage II {base.stage2.iterations} steps, Stage III {base.stage3.iterations}"


def section_names(text: str) -> list[str]:
    """`--sections`' comma-separated names, checked against SECTIONS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--sections: unknown {unknown or 'empty list'}; the sections are: {', '.join(SECTIONS)}")
    return names


def previous_report(out: Path, required: bool) -> tuple[dict[str, str], dict[str, dict]]:
    """The sections (REPORT.md cut at its section headings, one per section in SECTIONS order) and numbers of
    the report already in `out`, which a run keeps until it replaces them (so an interrupted run leaves every
    section, each naming its run); none when there is no such report, an error if `required`."""
    fix = f"run the whole report into {out} first (without --sections)"
    if not (out / "REPORT.md").is_file() or not (out / "results.json").is_file():
        if required:
            raise SystemExit(f"--sections keeps the other sections of the report in {out}, but there is none: {fix}")
        return {}, {}
    chunks = re.split(r"^(?=## )", (out / "REPORT.md").read_text(), flags=re.M)[1:]
    if [c.splitlines()[0][3:].split(":")[0] for c in chunks] != list(SECTIONS):
        if required:
            raise SystemExit(f"{out / 'REPORT.md'} does not hold the sections {', '.join(SECTIONS)} in order: {fix}")
        return {}, {}
    return dict(zip(SECTIONS, chunks)), json.loads((out / "results.json").read_text())


@dataclass
class Report:
    """The sections written so far, in order; `write` renders them all (pending ones as a line). Each section
    ends with the run that made it: when, and the training lengths of the runs it reads (`training`)."""

    out: Path
    header: str
    training: str
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    sections: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, text: str, numbers: dict) -> None:
        run = f"run of {self.when}" if name in UNTRAINED else f"{self.training} (run of {self.when})"
        self.sections[name] = f"{text.rstrip()}\n\n*This section: {run}.*\n"
        self.numbers[name] = numbers
        self.write()

    def write(self) -> None:
        body = [self.header]
        for name in SECTIONS:
            body.append(self.sections.get(name, f"## {name}\n\n(pending: not run yet)\n").rstrip() + "\n")
        atomic_write_text(self.out / "REPORT.md", "\n".join(body))
        atomic_write_text(self.out / "results.json", json.dumps(self.numbers, indent=1))


def against_paper(interval: Interval, paper_says_better: bool = True) -> str:
    """Whether a paired interval (the paper's favoured model first) agrees with a paper's 'better' claim."""
    verdict = interval.verdict()
    if "better" in verdict:
        return "agrees" if paper_says_better else "disagrees"
    if "worse" in verdict:
        return "disagrees" if paper_says_better else "agrees"
    return "inconclusive" + (" (the two match within the margin)" if "matches" in verdict else "")


def best_of(rows: list[Measured], name: Callable[[Measured], str], paper: str | None = None) -> tuple[str, dict]:
    """The claim 'best X': the row of highest mean, and whether its intervals against every other row say
    so; with the paper's choice `paper` (a `name`), whether the toy agrees."""
    top = max(rows, key=lambda r: r.faithful)
    others = [r for r in rows if r is not top]
    intervals = {name(r): paired(top, r) for r in others}
    tied = [n for n, i in intervals.items() if "better" not in i.verdict()]
    detail = "; ".join(f"{name(top)} − {n}: {i}, {i.verdict()}" for n, i in intervals.items())
    if not tied:
        claim = f"best {name(top)}, better than every other value ({detail})"
    else:
        claim = (f"highest mean at {name(top)}, not separated from {', '.join(tied)} ({detail}): which is best is "
                 f"**inconclusive**")
    if paper is not None:
        if paper == name(top):
            claim += " — agrees with the paper" if not tied else " — the paper's value is among the best: inconclusive"
        elif paper in tied:
            claim += " — the paper's value is among the best: inconclusive"
        else:
            claim += f" — the paper's {paper} is worse than {name(top)}: disagrees"
    numbers = {"best_by_mean": name(top), "not_separated": tied,
               "intervals": {n: [i.mean, i.low, i.high] for n, i in intervals.items()}}
    return claim, numbers


class Reproduction:
    """The models, prompts and cache of one report run, and one method per table."""

    def __init__(self, mode: Mode, cache: StageCache, out: Path):
        self.mode, self.cache, self.out = mode, cache, out
        self.seeds = mode.seeds
        self.measured: dict[tuple, Measured] = {}
        self.costs = Costs(mode.rounds, mode.round_seconds)
        self.base = cache.config()
        self.teacher, meta = load_wan(self.base.model.teacher)
        self.teacher_params = parameter_count(self.teacher)
        self.teacher_sampling = (replace(meta.recommended, steps=mode.teacher_steps) if mode.teacher_steps
                                 else meta.recommended)
        # the held-out prompts of each mode, in MODES order: every model is sampled on all of them
        self.prompts = [split_prompts("heldout", mode.renders, 0, mode.combinations, t2v=m == "T2V") for m in MODES]
        # as many training combinations: the automatic betas are chosen on these
        self.train_prompts = training_prompts(len({f.combination for f in self.prompts[0].factors}))
        self.teacher_measured = self.euler("Euler with CFG (teacher)", self.teacher)

    # ---- configs and models ----------------------------------------------------------------------

    def config(self, **settings) -> Config:
        overrides = [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
        return self.cache.config(overrides)

    def plan(self, cfg: Config) -> PrunePlan:
        return PrunePlan.load(self.cache.plan(cfg))

    def euler(self, label: str, model: torch.nn.Module) -> Measured:
        return measure_euler(label, model, self.teacher_sampling, self.prompts, self.seeds, self.teacher_params)

    def memo(self, key: tuple, label: str, run: Callable[[], Measured]) -> Measured:
        """A model's measurement is taken once per report run; later tables reuse it under their label."""
        if key not in self.measured:
            self.measured[key] = run()
        return replace(self.measured[key], label=label)

    @property
    def teacher_row(self) -> Measured:
        return self.costs.of([self.teacher_measured])[0]

    def costed(self, rows: Sequence[Measured]) -> list[Measured]:
        """The rows with their costs. The teacher's shape goes with them, so the first costed section of a run,
        whichever `--sections` picked, times the teacher in alternating rounds beside its own models."""
        return self.costs.of([self.teacher_measured, *rows])[1:]

    def student(self, label: str, folder: Path, steps: int = 4) -> Measured:
        return self.memo((folder, steps), label, lambda: self._student(label, folder, steps))

    def _student(self, label: str, folder: Path, steps: int) -> Measured:
        return measure_student(label, self.base, folder, steps, self.prompts, self.seeds, self.teacher_params)

    def stage2_pruned(self, label: str, cfg: Config) -> Measured:
        folder = self.cache.stage2(cfg)
        return self.memo((folder, "euler"), label, lambda: self.euler(label, pruned_path(self.base, folder)))

    def prompts_line(self) -> str:
        combos = len({f.combination for f in self.prompts[0].factors})
        videos = len(self.teacher_measured.samples.keys)
        return (f"n = {videos} videos per model: {combos} held-out combinations x {self.mode.renders} render(s) x "
                f"noise seeds {', '.join(map(str, self.seeds))} x {len(MODES)} modes ({', '.join(MODES)}), the same "
                f"videos for every model; ± is the std over the videos. Every difference is paired per video on "
                f"`{PRIMARY}`, with its 95% bootstrap interval over (mode, combination) clusters and the verdict "
                f"against the equivalence margin ±{EQUIVALENCE_MARGIN} (research/stats.py).")

    # ---- the sections ----------------------------------------------------------------------------

    def sanity(self) -> tuple[str, dict]:
        """Known answers (ground truth, wrong answers, a no-model shortcut) scored on each mode's prompts, against
        the teacher's videos of every seed; the teacher's least favorable seed is shown alone as well."""
        parts, numbers = [], {}
        samples = self.teacher_measured.samples
        for prompts in self.prompts:
            rows = sanity_rows(prompts, samples.subset(prompts.mode), self.seeds[0])
            by_seed = {s: samples.subset(prompts.mode, s) for s in self.seeds}
            worst = min(self.seeds, key=lambda s: by_seed[s].mean()[PRIMARY])
            worst_holds = ordering_holds({**rows, "teacher": by_seed[worst]})
            seeds = ", ".join(f"{s}: {t.mean()[PRIMARY]:.3f}" for s, t in by_seed.items())
            parts.append(f"{sanity_markdown(rows)} The teacher's `{PRIMARY}` by noise seed ({seeds}); at its least "
                         f"favorable seed ({worst}) alone the ordering **{'holds' if worst_holds else 'FAILS'}**.\n")
            numbers[prompts.mode] = {"ordering holds": ordering_holds(rows), "least favorable seed": worst,
                                     "ordering holds at the least favorable seed": worst_holds,
                                     **{name: table.mean() for name, table in rows.items()}}
        videos = len(self.prompts[0].factors)
        text = (f"## Sanity: the scorer's ranking of known answers\n\nOn the held-out prompts of each mode "
                f"({videos} prompts; the teacher's row is its {videos * len(self.seeds)} videos of Table 2, noise "
                f"seeds {', '.join(map(str, self.seeds))}), known answers scored like the models: the scorer may rank "
                f"models only if the ground truth is above the teacher and the teacher above every wrong answer and near "
                f"miss by at least {SANITY_MARGIN} on `{PRIMARY}`. The no-model shortcut is listed apart: where it reaches the "
                f"ground truth the world is too easy to tell models apart.\n\n" + "\n".join(parts))
        return text, numbers

    def table2(self) -> tuple[str, dict]:
        base = self.config()
        plan = self.plan(base)
        rows = [self.student("Step only: DMD, all blocks", self.cache.stage3(
                    self.config(stage1__keep_ratio=1.0, stage3__init="teacher"))),
                self.euler("Stage I prune only, no training", adapt(self.teacher).pruned_model(plan.kept)),
                self.stage2_pruned("Size only: Stage II pruned path", base),
                self.student("FastLightGen (Stage I-III)", self.cache.stage3(base)),
                self.student("FastLightGen 50 % pruned", self.cache.stage3(self.config(stage1__keep_ratio=0.5)))]
        step_only, stage1_only, size_only, fast, half = self.costed(rows)
        teacher = self.teacher_row
        rows = [teacher, step_only, stage1_only, size_only, fast, half]
        text = (f"## Table 2: methods on the same prompts\n\n{self.prompts_line()} Time per video: one TI2V video "
                f"per call for every model (as a user makes them), the best of {self.mode.rounds} rounds. Models of "
                f"one shape (blocks, steps, CFG) share one time, measured once per report; the shapes first met in a "
                f"table are timed together in alternating rounds, so that a slow spell of the machine hits each "
                f"alike (this table's shapes are the report's first). GFLOP: the matmuls, convolutions and attention "
                f"of one video.\n\n{markdown_table(rows, teacher)}\n\n"
                f"{self.parity(fast, teacher, 'FastLightGen', PAPER_WAN_SPEEDUP, 'on par (0.794 vs 0.790)')} "
                f"{self.parity(half, teacher, 'the 50 %-pruned 4-step student', PAPER_HALF_SPEEDUP, 'at parity')}")
        comparisons = (("step-only DMD", step_only, "0.716 for DMD2"),
                       (f"the Stage II pruned model at {self.teacher_sampling.steps} steps", size_only,
                        "0.769 for ICMD and 0.751 for F3-Pruning"),
                       ("the untrained Stage I prune", stage1_only, None))
        for name, other, paper in comparisons:
            interval = paired(fast, other)
            text += f" FastLightGen − {name}: {interval}, {interval.verdict()}"
            text += (f" (paper: 0.794 vs {paper}, FastLightGen better; {against_paper(interval)})." if paper else ".")
        self.write_samples([teacher, fast])
        return text + "\n", {r.label: r.numbers(teacher) for r in rows}

    def parity(self, student: Measured, teacher: Measured, name: str, target: float, paper: str) -> str:
        """The paper's claim 'x-fold faster at the teacher's quality', judged by the speed-up and the interval."""
        speedup = teacher.seconds / student.seconds
        interval = paired(student, teacher)
        verdict = interval.verdict()
        missed = ([f"slower than {target:.0f}x"] if speedup < target else []) + (
            ["worse than the teacher beyond the margin"] if verdict == "worse" else [])
        if missed:
            outcome = f"**missed** ({' and '.join(missed)})"
        elif "matches" in verdict or "better" in verdict:
            outcome = "**met**"
        else:
            outcome = "**not shown** (the quality interval is inconclusive)"
        return (f"{name[0].upper() + name[1:]} is **{speedup:.1f}x** faster than the teacher in wall clock on this CPU "
                f"({teacher.cost.flops / student.cost.flops:.1f}x in floating-point operations, which depend on "
                f"neither the machine nor its load) at {PRIMARY} {student.faithful:.3f} against the teacher's "
                f"{teacher.faithful:.3f}: {name} − teacher = {interval}, {verdict}. The paper's claim, about "
                f"{target:.0f}x {paper}: {outcome}.")

    def fig4(self) -> tuple[str, dict]:
        folder = self.cache.plan(self.base).parent
        shutil.copyfile(folder / "importance.png", self.out / "fig4_importance.png")
        plan = self.plan(self.base)
        rows = [line.split(",") for line in (folder / "scores.csv").read_text().splitlines()[1:]]
        table = "| block | x0 error with the block skipped | kept |\n|---|---|---|\n" + "\n".join(
            f"| {b} | {float(s):.5f} | {'yes' if k == '1' else 'no'} |" for b, s, _, k in rows)
        ends = {0, len(rows) - 1}
        top = sorted(rows, key=lambda r: -float(r[1]))[:3]
        agrees = bool(ends & {int(r[0]) for r in top})
        text = (f"## Fig. 4: Stage I importance per block of the toy teacher\n\n![importance](fig4_importance.png)\n\n"
                f"{table}\n\nKept {plan.kept}, dropped {plan.dropped}. The paper finds the first and last blocks the "
                f"most critical; here the three most important are blocks {[int(r[0]) for r in top]}: "
                f"{'consistent with' if agrees else 'unlike'} the paper. (A ranking of one deterministic measurement "
                f"per block, not a comparison of sampled videos: no interval.)\n")
        return text, {"scores": {r[0]: float(r[1]) for r in rows}}

    def table6(self) -> tuple[str, dict]:
        rows = []
        for keep in KEEPS:
            cfg = self.config(stage1__keep_ratio=keep)
            pruning = f"{1 - keep:.0%}"
            rows.append(with_settings(self.stage2_pruned("Stage II only", cfg), "no", pruning))
            rows.append(with_settings(self.student("Stage II + III", self.cache.stage3(cfg)), "yes", pruning))
        rows = self.costed(rows)
        helps = {b.settings[1]: paired(b, a) for a, b in zip(rows[0::2], rows[1::2])}
        helped = sum("better" in i.verdict() for i in helps.values())
        hurt = sum("worse" in i.verdict() for i in helps.values())
        after = rows[1::2]
        steps = {f"{x.settings[1]} − {y.settings[1]}": paired(x, y) for x, y in zip(after, after[1:])}
        matched = sum(i.verdict() == "matches" for i in helps.values())
        if all("better" in i.verdict() for i in steps.values()):
            falls, fell = "quality falls monotonically with pruning", True
        elif any("worse" in i.verdict() for i in steps.values()):
            falls, fell = "quality does not fall monotonically with pruning", False
        else:
            falls, fell = "whether quality falls monotonically with pruning is **inconclusive**", None
        agree = ("agrees with the paper" if helped == len(helps) and fell else
                 "disagrees with the paper" if hurt or fell is False else "agreement with the paper: inconclusive")
        detail = "; ".join(f"{p} pruning: {i}, {i.verdict()}" for p, i in helps.items())
        detail_falls = "; ".join(f"pruning {p}: {i}, {i.verdict()}" for p, i in steps.items())
        text = (f"## Table 6: with and without Stage III at 30 / 50 / 70 % pruning\n\n{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('Stage III', 'pruning'))}\n\n"
                f"The paper: Stage III (4 steps) beats the pruned model without it (28 steps) at every ratio, and "
                f"quality falls as pruning grows. Toy: Stage III is better at {helped} of {len(helps)} ratios, "
                f"worse at {hurt}, equivalent within the margin at {matched} (II + III − II only, {detail}); after "
                f"Stage III, {falls} ({detail_falls}): {agree}. The rows without Stage III use the teacher's "
                f"{self.teacher_sampling.steps}-step Euler with CFG, not the paper's 28.\n")
        numbers = {f"{r.settings[0]}-stage3 pruning {r.settings[1]}": r.numbers(self.teacher_row) for r in rows}
        numbers["stage3 helps"] = {p: [i.mean, i.low, i.high] for p, i in helps.items()}
        numbers["pruning steps"] = {p: [i.mean, i.low, i.high] for p, i in steps.items()}
        return text, numbers

    def fig1(self) -> tuple[str, dict]:
        steps = sorted(FEW_STEP_LISTS)
        kept_rows = [(1.0, self.cache.stage3(self.config(stage1__keep_ratio=1.0, stage3__init="teacher")), None)]
        kept_rows += [(k, self.cache.stage3(self.config(stage1__keep_ratio=k)), self.config(stage1__keep_ratio=k))
                      for k in KEEPS]
        xs = steps + [self.teacher_sampling.steps]
        scores, params, raw = [], [], {}
        for keep, folder, cfg in kept_rows:
            cells = [self.student(f"{keep:.0%} blocks, {s} steps", folder, s) for s in steps]
            cells.append(self.teacher_row if cfg is None else self.stage2_pruned("Stage II, Euler CFG", cfg))
            scores.append([c.faithful for c in cells])
            params.append(cells[0].params)
            raw[f"{keep:.0%} blocks"] = {str(s): c.faithful for s, c in zip(xs, cells)}
        contour_plot(self.out / "fig1_steps_params.png", xs, params, scores, f"toy world: {PRIMARY}")
        grid = "| kept params | " + " | ".join(f"{s} steps" for s in steps) + \
               f" | {xs[-1]} steps + CFG |\n" + "|---" * (len(xs) + 1) + "|\n" + "\n".join(
                   f"| {p:.0%} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for p, row in zip(params, scores))
        text = (f"## Fig. 1: sampling steps x kept parameters\n\n{self.prompts_line()}\n\n"
                f"![steps x params](fig1_steps_params.png)\n\nMean `{PRIMARY}` over the videos (descriptive: the "
                f"claims about these models are the intervals of Tables 2 and 6):\n\n{grid}\n\nFew-step columns: the "
                f"4-step students of Stage III (step-only DMD for 100 %) run on the first 1, 2 or 4 entries of a "
                f"shortened denoising list {list(FEW_STEP_LISTS.values())}; they were trained for 4 steps only, unlike "
                f"the paper's per-point models. Last column: the Stage II pruned path (the teacher for 100 %) with "
                f"Euler + CFG.\n")
        return text, raw

    def table4(self) -> tuple[str, dict]:
        recipe_target = self.base.stage2.target
        paper_rows = [with_settings(self.alpha_student(a, "shared" if a == 1.0 else recipe_target), a, 1 - a,
                                    "shared" if a == 1.0 else recipe_target) for a in ALPHAS]
        stable = [with_settings(self.alpha_student(1.0, t), 1.0, 0.0, t) for t in STABLE_TARGETS]
        rows = self.costed(paper_rows + stable)
        paper_rows, stable = rows[:len(ALPHAS)], rows[len(ALPHAS):]
        claim, best = best_of(paper_rows, lambda r: f"alpha = {r.settings[0]}", paper="alpha = 1.0")
        shared = paper_rows[ALPHAS.index(1.0)]
        recipe = next((r for r in paper_rows if float(r.settings[0]) == self.base.stage2.alpha), None)
        fixes = {r.settings[2]: paired(r, shared) for r in stable}
        analysis = "; ".join(f"{t} − shared: {i}, {i.verdict()}" for t, i in fixes.items())
        if any("better" in i.verdict() for i in fixes.values()):
            cause = ("a target that does not move with the trained weights is better than the paper's form: "
                     "consistent with the moving target as the cause of the collapse")
        elif all("worse" not in i.verdict() for i in fixes.values()):
            cause = "the moving target is **not shown** to be the cause (no interval excludes zero in its favour)"
        else:
            cause = "a target that does not move is worse, not better: the moving target is not shown to be the cause"
        against_recipe = "" if recipe is None else " Against the recipe's alpha = {} ({} target): {}.".format(
            recipe.settings[0], recipe.settings[2],
            "; ".join(f"alpha 1 {r.settings[2]} − recipe: {comparison(r, recipe)}" for r in stable))
        text = (f"## Table 4: distill weight alpha (Stage II)\n\n{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('alpha', '1 - alpha', 'target'))}\n\n"
                f"Target: where Stage II's stop-gradient distillation target (the unpruned path's prediction) comes "
                f"from (`stage2.target`): `shared`, the weights being trained (the paper's form), `frozen`, a copy "
                f"of the starting weights, `ema`, a moving average of the trained weights. The paper's best is "
                f"alpha = 1 (distillation only). Toy, over the paper's rows: {claim}. The paper's alpha = 1 (shared "
                f"target) − teacher: {comparison(shared, self.teacher_row)} (it collapsed the earlier toy Stage II: "
                f"overall 0.181 against 0.839). The hypothesis: with shared weights, the pruned path's loss also "
                f"moves the unpruned path that makes its own target, so the target chases the student. With a target "
                f"that does not follow the trained weights ({analysis}): {cause}.{against_recipe} The recipe's "
                f"alpha = {self.base.stage2.alpha} was fixed before this table existed, after alpha = 1 collapsed an "
                f"earlier toy model at a larger learning rate (train/README.md, \"The toy recipe\").\n")
        numbers = {f"alpha {r.settings[0]} target {r.settings[2]}": r.numbers(self.teacher_row) for r in rows}
        numbers["best alpha"] = best
        numbers["stable target - shared"] = {t: [i.mean, i.low, i.high] for t, i in fixes.items()}
        return text, numbers

    def alpha_student(self, alpha: float, target: str) -> Measured:
        return self.student("FastLightGen", self.cache.stage3(self.config(stage2__alpha=alpha, stage2__target=target)))

    def table9(self) -> tuple[str, dict]:
        rows = self.costed([with_settings(self.student("FastLightGen", self.cache.stage3(
            self.config(stage3__plan_teacher=t))), t) for t in ("pruned", "unpruned")])
        interval = paired(rows[0], rows[1])
        text = (f"## Table 9: weak (pruned) vs strong (unpruned) teacher as real and fake score\n\n"
                f"{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('teacher path',))}\n\n"
                f"Pruned: eq. 9 with the config's betas on the pruned path; unpruned: CFG beta1 on all blocks, the "
                f"fake score's LoRA on all blocks. The paper (HunyuanVideo) finds the pruned teacher better. Toy: "
                f"pruned − unpruned: {interval}, {interval.verdict()}: {against_paper(interval)}.\n")
        numbers = {f"{r.settings[0]} teacher": r.numbers(self.teacher_row) for r in rows}
        numbers["pruned - unpruned"] = [interval.mean, interval.low, interval.high]
        return text, numbers

    def beta1_values(self) -> list[float]:
        """The paper's beta1 sweep plus the recipe's own value, so the recipe's student is a row of it."""
        return sorted(set(BETA1S) | {self.base.stage3.beta1})

    def beta_grid(self) -> list[tuple[float, float]]:
        s3 = self.base.stage3
        return [(b1, s3.beta2) for b1 in self.beta1_values()] + [(s3.beta1, b2) for b2 in BETA2S if b2 != s3.beta2]

    def beta_student(self, beta1: float, beta2: float, label: str = "FastLightGen") -> Measured:
        return with_settings(self.student(label, self.cache.stage3(self.config(stage3__beta1=beta1,
                                                                                stage3__beta2=beta2))), beta1, beta2)

    def table5(self) -> tuple[str, dict]:
        s3 = self.base.stage3
        by_beta1 = self.costed([self.beta_student(b1, s3.beta2) for b1 in self.beta1_values()])
        by_beta2 = self.costed([self.beta_student(s3.beta1, b2) for b2 in BETA2S])
        claim1, best1 = best_of(by_beta1, lambda r: f"beta1 = {float(r.settings[0])}", paper="beta1 = 3.5")
        claim2, best2 = best_of(by_beta2, lambda r: f"beta2 = {float(r.settings[1])}", paper="beta2 = 0.25")
        headers = ("beta1", "beta2")
        text = (f"## Table 5: inter CFG beta1 and intra CFG beta2 (Stage III)\n\n{self.prompts_line()}\n\n"
                f"Fixed beta2 = {s3.beta2}:\n\n{markdown_table(by_beta1, self.teacher_row, headers)}\n\n"
                f"Fixed beta1 = {s3.beta1}:\n\n{markdown_table(by_beta2, self.teacher_row, headers)}\n\n"
                f"The paper's best for Wan TI2V is beta1 = 3.5 and beta2 = 0.25. Toy, at beta2 = {s3.beta2}: "
                f"{claim1}. At beta1 = {s3.beta1}: {claim2}. These are readings of the held-out prompts, not choices: "
                f"the recipe's betas come from the automatic selection on training prompts (below).\n")
        numbers = {f"beta1 {r.settings[0]} beta2 {r.settings[1]}": r.numbers(self.teacher_row)
                   for r in by_beta1 + by_beta2}
        return text, {**numbers, "best beta1": best1, "best beta2": best2}

    def auto_beta(self) -> tuple[str, dict]:
        """Pick (beta1, beta2) by sampling eq. 9's teacher mix itself on training prompts of both modes (no
        Stage III run), scored by `faithful`; compare with the students trained on the grid (Table 5)."""
        base = self.config()
        folder = self.cache.stage2(base)
        model = adapt(load_weights(load_teacher(self.base), folder / MODEL_FILE).eval())
        plan = self.plan(base)
        preview = Sampling(self.mode.preview_steps, self.teacher_sampling.shift, 1.0)
        start = time.perf_counter()
        previews = {(b1, b2): sample(lambda p, seed, b1=b1, b2=b2: generate_well_guided(
            model, p, seed, preview, plan.skip, b1, b2), self.train_prompts, (PREVIEW_SEED,))
            for b1, b2 in self.beta_grid()}
        preview_seconds = time.perf_counter() - start
        chosen = max(previews, key=lambda b: previews[b].mean())
        students = {b: self.beta_student(*b) for b in self.beta_grid()}
        ranked = sorted(students, key=lambda b: -students[b].faithful)
        train_seconds = sum(stage_seconds(self.cache.stage3(self.config(stage3__beta1=b1, stage3__beta2=b2)))
                            for b1, b2 in self.beta_grid())
        runner_up = max((b for b in previews if b != chosen), key=lambda b: previews[b].mean(), default=None)
        margin = ("" if runner_up is None else
                  f" On the training previews, chosen − the runner-up {runner_up}: "
                  f"{paired_samples(previews[chosen], previews[runner_up])}, "
                  f"{paired_samples(previews[chosen], previews[runner_up]).verdict()}.")
        if chosen == ranked[0]:
            outcome = f"the grid's highest ({students[chosen].faithful:.3f})"
        else:
            outcome = (f"against the grid's best by mean, {ranked[0]}, on the held-out prompts: "
                       f"{comparison(students[chosen], students[ranked[0]])}")
        lines = "\n".join(f"| {b[0]} | {b[1]} | " + " | ".join(f"{previews[b].mean(PRIMARY, m):.3f}" for m in MODES)
                           + f" | {previews[b].mean():.3f} | {students[b].faithful:.3f} |" for b in self.beta_grid())
        n = len(previews[chosen].keys)
        text = (f"## Automatic beta selection\n\nThe paper leaves choosing (beta1, beta2) to future work. Procedure: "
                f"sample the well-guided teacher of eq. 9 itself (the Stage II model, {preview.steps}-step Euler on "
                f"the mix, no CFG on top) on {n} **training** prompts ({n // len(MODES)} training combinations in "
                f"each of {', '.join(MODES)}, noise seed {PREVIEW_SEED}) for each candidate, score `{PRIMARY}`, take "
                f"the best; the held-out prompts play no part. It costs {preview_seconds:.0f} s for {len(previews)} "
                f"candidates, against {train_seconds:.0f} s of Stage III training for the grid.\n\n"
                f"| beta1 | beta2 | " + " | ".join(f"preview {PRIMARY} {m} (train)" for m in MODES)
                + f" | preview {PRIMARY} (train) | student {PRIMARY} (held-out, Table 5) |\n"
                f"|---|---|" + "---|" * (len(MODES) + 2) + f"\n{lines}\n\nChosen: beta = {chosen}.{margin} Its student "
                f"ranks {ranked.index(chosen) + 1} of {len(ranked)} by held-out mean; {outcome}.\n")
        return text, {"previews": {str(k): v.mean() for k, v in previews.items()}, "chosen": list(chosen),
                      "chosen_rank": ranked.index(chosen) + 1, "preview_seconds": preview_seconds,
                      "grid_train_seconds": train_seconds}

    def write_samples(self, rows: list[Measured]) -> None:
        """The first seed's first videos of each mode, for each row."""
        for row in rows:
            name = row.label.split(" (")[0].split(":")[0].replace(" ", "_").lower()
            for prompts in self.prompts:
                for i, video in enumerate(row.samples.videos[prompts.mode]):
                    label = prompts.captions[i].replace(" ", "_")
                    write_mp4(self.out / "samples" / f"{name}_{prompts.mode}_{i}_{label}.mp4", video, upscale=8)


def stage_seconds(folder: Path) -> float:
    """Training time of a finished run: the sum of its logged step times."""
    log = folder / "metrics.jsonl"
    return sum(json.loads(line).get("s_per_step", 0.0) for line in log.read_text().splitlines() if line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny runs and 4 prompts: checks the structure in minutes")
    p.add_argument("--config", "-c", default=str(REPO / "configs" / "toy.yaml"))
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/toy, or "
                   "outputs/reproduce-quick with --quick)")
    p.add_argument("--cache", type=Path, default=Path("runs/reproduce"), help="cached stage runs")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run (default: "
                   "all); the others are kept from the report already in --out")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    out = args.out or (Path("outputs/reproduce-quick") if args.quick else REPO / "reports" / "toy")
    names = section_names(args.sections)
    kept, kept_numbers = previous_report(out, required=len(names) < len(SECTIONS))
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(args.cache / mode.name, args.config, mode.overrides)

    started = time.perf_counter()
    repro = Reproduction(mode, cache, out)
    header = (f"# FastLightGen on the toy world: the paper's tables\n\nRegenerate with `python -m research.reproduce"
              f"{' --quick' if args.quick else ''}` ({mode.name} mode; runs cached in `{args.cache}`; `--sections` "
              f"reruns some sections and keeps the rest). Teacher: `{Path(repro.base.model.teacher).name}`; recipe: "
              f"`{Path(args.config).name}`{' with ' + ', '.join(mode.overrides) if mode.overrides else ''}; each "
              f"section ends with the run that made it (its date, and the training lengths of the Stage II and III "
              f"runs it reads). {torch.get_num_threads()} CPU threads. Quality: the toy evaluator "
              f"(fastlightgen/toy/evaluate.py) on the held-out prompts of both modes (TI2V: first frame given; T2V: "
              f"caption alone) at noise seeds "
              f"{', '.join(map(str, mode.seeds))}. The primary score is `{PRIMARY}` (every stated factor right, "
              f"times the fidelity to the unique answer); `overall` (the VBench-like mean) is a secondary view. "
              f"Statistics (research/stats.py): two models are compared on the same videos, per-video paired "
              f"differences of `{PRIMARY}` with a 95% bootstrap interval resampling (mode, combination) clusters, "
              f"then videos; the equivalence margin ±{EQUIVALENCE_MARGIN} was fixed before the run. \"matches\" "
              f"(the interval inside the margin), \"better\" and \"worse\" (the interval excludes zero) are said "
              f"only where the interval says so, \"inconclusive\" otherwise.\n")
    report = Report(out, header, training_lengths(repro.base), sections=dict(kept), numbers=dict(kept_numbers))
    for name in names:
        text, numbers = getattr(repro, SECTIONS[name])()
        report.add(name, text, numbers)
        print(f"[reproduce] {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    training = sum(stage_seconds(folder) for folder in cache.used)
    ran = "every section" if len(names) == len(SECTIONS) else ", ".join(names)
    report.header += (f"\nThe last run ({ran}) took {time.perf_counter() - started:.0f} s and trained "
                      f"{len(cache.trained)} stage runs (the rest came from the cache); its {len(cache.used)} Stage "
                      f"II and III runs took {training:.0f} s of training in all (their logged step times).\n")
    report.write()
    if not all_finite(report.numbers):
        raise SystemExit(f"non-finite numbers in {out / 'results.json'}")
    print(f"report in {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
