"""`python -m research.reproduce`: the paper's Tables 2, 4, 5, 6, 9 and Figs. 1, 4 on the toy world, in one run.

Trains (or reuses, cached by config hash under --cache) every variant the tables need from the committed
toy teacher with the recipe of configs/toy.yaml, samples each on the held-out prompts (combinations of
color, shape and direction never seen in training) and writes a report: REPORT.md, plots, a few mp4
samples and results.json. All times and speed-ups come from this one run. The report is rewritten after
every section, so an interrupted run leaves the finished tables (and the cache) behind.

--quick runs the same report with tiny training runs and few prompts (minutes; numbers are not
meaningful, only the structure): the test suite uses it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling
from fastlightgen.toy.evaluate import evaluate_batch
from fastlightgen.toy.generate import generate_few_step, generate_teacher, generate_well_guided
from fastlightgen.toy.prompts import split_prompts
from fastlightgen.video_io import write_mp4
from train.config import Config
from train.models import MODEL_FILE, load_teacher, load_weights, read_run_info, student_model

from .report import Costs, Measured, all_finite, contour_plot, markdown_table, measure, parameter_count, with_settings
from .run_cache import StageCache

REPO = Path(__file__).resolve().parent.parent
PAPER_WAN_SPEEDUP = 35.0


@dataclass(frozen=True)
class Mode:
    name: str
    combinations: int | None  # held-out combinations used (None: all)
    renders: int  # renders (positions, backgrounds) per combination
    preview_steps: int  # Euler steps of the auto-beta previews
    rounds: int  # a model's time per video is its best of this many timing rounds
    round_seconds: float  # each timing round repeats a model's video for about this long
    overrides: tuple[str, ...] = ()  # applied to the config of every run


FULL = Mode("full", None, 2, 20, 10, 2.0)
QUICK = Mode("quick", 4, 1, 6, 1, 0.0, ("stage1.samples=1", "stage1.timesteps=2", "data.batch_size=1",
                                     "stage2.iterations=2", "stage3.iterations=1", "stage3.fake_updates=1"))

ALPHAS = (0.0, 0.5, 1.0)
BETA1S = (1.5, 2.5, 3.5, 4.5)  # at the config's beta2 (the paper's Table 5 values)
BETA2S = (0.0, 0.25, 0.5, 1.0)  # at the config's beta1
KEEPS = (0.7, 0.5, 0.3)  # pruning 30 / 50 / 70 %
FEW_STEP_LISTS = {1: (1000,), 2: (1000, 500), 4: (1000, 750, 500, 250)}
# report sections in run order (cheap, paper-central ones first) and the Reproduction method of each
SECTIONS = {"Table 2": "table2", "Fig. 4": "fig4", "Table 6": "table6", "Fig. 1": "fig1", "Table 4": "table4",
            "Table 9": "table9", "Table 5": "table5", "Automatic beta selection": "auto_beta"}


@dataclass
class Report:
    """The sections written so far, in order; `write` renders them all (pending ones as a line)."""

    out: Path
    header: str
    sections: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, text: str, numbers: dict) -> None:
        self.sections[name] = text
        self.numbers[name] = numbers
        self.write()

    def write(self) -> None:
        body = [self.header]
        for name in SECTIONS:
            body.append(self.sections.get(name, f"## {name}\n\n(pending: not run yet)\n"))
        atomic_write_text(self.out / "REPORT.md", "\n".join(body))
        atomic_write_text(self.out / "results.json", json.dumps(self.numbers, indent=1))


class Reproduction:
    """The models, prompts and cache of one report run, and one method per table."""

    def __init__(self, mode: Mode, cache: StageCache, out: Path, seed: int):
        self.mode, self.cache, self.out, self.seed = mode, cache, out, seed
        self.measured: dict[tuple, Measured] = {}
        self.costs = Costs(mode.rounds, mode.round_seconds)
        self.base = cache.config()
        self.teacher, meta = load_wan(self.base.model.teacher)
        self.teacher_params = parameter_count(self.teacher)
        self.teacher_sampling = meta.recommended
        self.prompts = split_prompts("heldout", mode.renders, seed, mode.combinations)
        self.train_prompts = split_prompts("train", 1, seed, len(self.prompts.factors))
        self.teacher_measured = self.euler("Euler with CFG (teacher)", self.teacher, keep_videos=True)

    # ---- configs and models ----------------------------------------------------------------------

    def config(self, **settings) -> Config:
        overrides = [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
        return self.cache.config(overrides)

    def plan(self, cfg: Config) -> PrunePlan:
        return PrunePlan.load(self.cache.plan(cfg))

    def euler(self, label: str, model: torch.nn.Module, keep_videos: bool = False) -> Measured:
        ts = self.teacher_sampling
        return measure(label, model, lambda a, prompts: generate_teacher(a, prompts, self.seed, ts), self.prompts,
                       self.teacher_params, ts.steps, ts.nfe, keep_videos)

    def memo(self, key: tuple, label: str, run: Callable[[], Measured]) -> Measured:
        """A model's measurement is taken once per report run; later tables reuse it under their label."""
        if key not in self.measured:
            self.measured[key] = run()
        return replace(self.measured[key], label=label)

    @property
    def teacher_row(self) -> Measured:
        return self.costs.of([self.teacher_measured])[0]

    def student(self, label: str, folder: Path, steps: int = 4, keep_videos: bool = False) -> Measured:
        return self.memo((folder, steps), label, lambda: self._student(label, folder, steps, keep_videos))

    def _student(self, label: str, folder: Path, steps: int, keep_videos: bool) -> Measured:
        info = read_run_info(folder)
        model = student_model(self.base, folder, info)
        few = Sampling.few_step(FEW_STEP_LISTS[steps], info["shift"])
        return measure(label, model, lambda a, prompts: generate_few_step(a, prompts, self.seed, few), self.prompts,
                       self.teacher_params, steps, steps, keep_videos)

    def stage2_pruned(self, label: str, cfg: Config) -> Measured:
        folder = self.cache.stage2(cfg)
        return self.memo((folder, "euler"), label,
                         lambda: self.euler(label, student_model(self.base, folder, read_run_info(folder))))

    def prompts_line(self) -> str:
        combos = len({f.combination for f in self.prompts.factors})
        return (f"n = {len(self.prompts.factors)} videos ({combos} held-out combinations x {self.mode.renders} "
                f"renders), noise seed {self.seed}; ± is the std over the videos.")

    # ---- the tables ------------------------------------------------------------------------------

    def table2(self) -> tuple[str, dict]:
        base = self.config()
        plan = self.plan(base)
        rows = [self.teacher_measured,
                self.student("Step only: DMD, all blocks", self.cache.stage3(
                    self.config(stage1__keep_ratio=1.0, stage3__init="teacher"))),
                self.euler("Stage I prune only, no training", adapt(self.teacher).pruned_model(plan.kept)),
                self.stage2_pruned("Size only: Stage II pruned path", base),
                self.student("FastLightGen (Stage I-III)", self.cache.stage3(base), keep_videos=True)]
        rows = self.costs.of(rows)  # the first costs of the report: the teacher's and these models' shapes together
        teacher, step_only, stage1_only, size_only, fast = rows
        speedup = teacher.seconds / fast.seconds
        meets = speedup >= PAPER_WAN_SPEEDUP and fast.overall >= teacher.overall
        verdict = (f"FastLightGen is **{speedup:.1f}x** faster than the teacher in wall clock on this CPU "
                   f"(target >= {PAPER_WAN_SPEEDUP:.0f}x) at overall {fast.overall:.3f} against the teacher's "
                   f"{teacher.overall:.3f}: the target is **{'met' if meets else 'missed'}**. In floating-point "
                   f"operations per video, which depend on neither the machine nor its load, it is "
                   f"{teacher.cost.flops / fast.cost.flops:.1f}x cheaper.")
        if fast.overall < teacher.overall:
            verdict += (" The paper reports the student on par with the teacher (0.794 vs 0.790); on the toy world "
                        f"it loses {teacher.overall - fast.overall:.3f}.")
        comparisons = (("step-only DMD", step_only, "0.716 for DMD2"),
                       ("the Stage II pruned model at 50 steps", size_only, "0.769 for ICMD and 0.751 for F3-Pruning"),
                       ("the untrained Stage I prune", stage1_only, None))
        for name, other, paper in comparisons:
            better = fast.overall > other.overall
            verdict += (f" Against {name}: {fast.overall:.3f} vs {other.overall:.3f}, FastLightGen is "
                        f"{'better' if better else 'worse'}" + (f" (paper: 0.794 vs {paper}; "
                        f"{'agrees' if better else 'disagrees'})." if paper else "."))
        self.write_samples([teacher, fast])
        text = (f"## Table 2: methods on the same prompts\n\n{self.prompts_line()} Time per video: one video per "
                f"call for every model (as a user makes them), the best of {self.mode.rounds} rounds. Models of one "
                f"shape (blocks, steps, CFG) share one time, measured once per report; the shapes first met in a "
                f"table are timed together in alternating rounds, so that a slow spell of the machine hits each "
                f"alike (this table's shapes are the report's first). GFLOP: the matmuls, convolutions and attention "
                f"of one video.\n\n"
                f"{markdown_table(rows, teacher)}\n\n{verdict}\n")
        return text, {r.label: r.numbers() for r in rows}

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
                f"{'consistent with' if agrees else 'unlike'} the paper.\n")
        return text, {"scores": {r[0]: float(r[1]) for r in rows}}

    def table6(self) -> tuple[str, dict]:
        rows = []
        for keep in KEEPS:
            cfg = self.config(stage1__keep_ratio=keep)
            pruning = f"{1 - keep:.0%}"
            rows.append(with_settings(self.stage2_pruned("Stage II only", cfg), "no", pruning))
            rows.append(with_settings(self.student("Stage II + III", self.cache.stage3(cfg)), "yes", pruning))
        rows = self.costs.of(rows)
        pairs = list(zip(rows[0::2], rows[1::2]))
        helped = sum(b.overall > a.overall for a, b in pairs)
        declines = all(x.overall >= y.overall for x, y in zip(rows[1::2], rows[3::2]))
        text = (f"## Table 6: with and without Stage III at 30 / 50 / 70 % pruning\n\n{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('Stage III', 'pruning'))}\n\n"
                f"The paper: Stage III (4 steps) beats the pruned model without it (28 steps) at every ratio, and "
                f"quality falls as pruning grows. Toy: Stage III is better at {helped} of 3 ratios; quality "
                f"{'falls monotonically' if declines else 'does not fall monotonically'} with pruning after Stage III"
                f"{'' if helped == 3 and declines else ' (this part disagrees with the paper)'}. The rows without "
                f"Stage III use the teacher's {self.teacher_sampling.steps}-step Euler with CFG, not the paper's 28.\n")
        return text, {f"{r.settings[0]}-stage3 pruning {r.settings[1]}": r.numbers() for r in rows}

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
            scores.append([c.overall for c in cells])
            params.append(cells[0].params)
            raw[f"{keep:.0%} blocks"] = {str(s): c.overall for s, c in zip(xs, cells)}
        contour_plot(self.out / "fig1_steps_params.png", xs, params, scores, "toy world: overall score")
        grid = "| kept params | " + " | ".join(f"{s} steps" for s in steps) + \
               f" | {xs[-1]} steps + CFG |\n" + "|---" * (len(xs) + 1) + "|\n" + "\n".join(
                   f"| {p:.0%} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for p, row in zip(params, scores))
        text = (f"## Fig. 1: sampling steps x kept parameters\n\n{self.prompts_line()}\n\n"
                f"![steps x params](fig1_steps_params.png)\n\n{grid}\n\nFew-step columns: the 4-step students of "
                f"Stage III (step-only DMD for 100 %) run on the first 1, 2 or 4 entries of a shortened denoising "
                f"list {list(FEW_STEP_LISTS.values())}; they were trained for 4 steps only, unlike the paper's "
                f"per-point models. Last column: the Stage II pruned path (the teacher for 100 %) with Euler + CFG.\n")
        return text, raw

    def table4(self) -> tuple[str, dict]:
        rows = self.costs.of([with_settings(self.student("FastLightGen", self.cache.stage3(
            self.config(stage2__alpha=a))), a, 1 - a) for a in ALPHAS])
        best = max(rows, key=lambda r: r.overall)
        text = (f"## Table 4: distill weight alpha (Stage II)\n\n{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('alpha', '1 - alpha'))}\n\n"
                f"The paper's best is alpha = 1 (distillation only). Toy: best alpha = {best.settings[0]}"
                f"{': agrees.' if float(best.settings[0]) == 1.0 else ': disagrees with the paper.'} Alpha = 1 "
                f"scores {rows[-1].overall:.3f} here (the teacher {self.teacher_row.overall:.3f}). The recipe's "
                f"alpha = {self.base.stage2.alpha} was fixed before this table existed, after alpha = 1 collapsed an "
                f"earlier toy model at a larger learning rate (train/README.md, \"The toy recipe\").\n")
        return text, {f"alpha {r.settings[0]}": r.numbers() for r in rows}

    def table9(self) -> tuple[str, dict]:
        rows = self.costs.of([with_settings(self.student("FastLightGen", self.cache.stage3(
            self.config(stage3__plan_teacher=t))), t) for t in ("pruned", "unpruned")])
        pruned_wins = rows[0].overall >= rows[1].overall
        text = (f"## Table 9: weak (pruned) vs strong (unpruned) teacher as real and fake score\n\n"
                f"{self.prompts_line()}\n\n"
                f"{markdown_table([self.teacher_row] + rows, self.teacher_row, ('teacher path',))}\n\n"
                f"Pruned: eq. 9 with the config's betas on the pruned path; unpruned: CFG beta1 on all blocks, the "
                f"fake score's LoRA on all blocks. The paper (HunyuanVideo) finds the pruned teacher better. Toy: "
                f"the {'pruned' if pruned_wins else 'unpruned'} teacher is better"
                f"{': agrees.' if pruned_wins else ': disagrees with the paper.'}\n")
        return text, {f"{r.settings[0]} teacher": r.numbers() for r in rows}

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
        by_beta1 = self.costs.of([self.beta_student(b1, s3.beta2) for b1 in self.beta1_values()])
        by_beta2 = self.costs.of([self.beta_student(s3.beta1, b2) for b2 in BETA2S])
        best1 = max(by_beta1, key=lambda r: r.overall)
        best2 = max(by_beta2, key=lambda r: r.overall)
        headers = ("beta1", "beta2")
        text = (f"## Table 5: inter CFG beta1 and intra CFG beta2 (Stage III)\n\n{self.prompts_line()}\n\n"
                f"Fixed beta2 = {s3.beta2}:\n\n{markdown_table(by_beta1, self.teacher_row, headers)}\n\n"
                f"Fixed beta1 = {s3.beta1}:\n\n{markdown_table(by_beta2, self.teacher_row, headers)}\n\n"
                f"The paper's best for Wan TI2V is beta1 = 3.5 and beta2 = 0.25. "
                f"Toy: best beta1 = {best1.settings[0]}, "
                f"best beta2 = {best2.settings[1]} ("
                f"{'agrees' if (float(best1.settings[0]), float(best2.settings[1])) == (3.5, 0.25) else 'disagrees'}"
                f" with the paper).\n")
        return text, {f"beta1 {r.settings[0]} beta2 {r.settings[1]}": r.numbers() for r in by_beta1 + by_beta2}

    def auto_beta(self) -> tuple[str, dict]:
        """Pick (beta1, beta2) by sampling eq. 9's teacher mix itself on training prompts (no Stage III run),
        scored by the evaluator; compare with the students trained on the grid (Table 5)."""
        base = self.config()
        folder = self.cache.stage2(base)
        model = adapt(load_weights(load_teacher(self.base), folder / MODEL_FILE).eval())
        plan = self.plan(base)
        preview = Sampling(self.mode.preview_steps, self.teacher_sampling.shift, 1.0)
        start = time.perf_counter()
        previews = {}
        for b1, b2 in self.beta_grid():
            videos = generate_well_guided(model, self.train_prompts, self.seed, preview, plan.skip, b1, b2)
            previews[(b1, b2)] = evaluate_batch(videos, list(self.train_prompts.factors)).mean()["overall"]
        preview_seconds = time.perf_counter() - start
        chosen = max(previews, key=previews.get)
        students = {b: self.beta_student(*b) for b in self.beta_grid()}
        ranked = sorted(students, key=lambda b: -students[b].overall)
        train_seconds = sum(stage_seconds(self.cache.stage3(self.config(stage3__beta1=b1, stage3__beta2=b2)))
                            for b1, b2 in self.beta_grid())
        lines = "\n".join(f"| {b1} | {b2} | {previews[(b1, b2)]:.3f} | {students[(b1, b2)].overall:.3f} |"
                          for b1, b2 in self.beta_grid())
        text = (f"## Automatic beta selection\n\nThe paper leaves choosing (beta1, beta2) to future work. Procedure: "
                f"sample the well-guided teacher of eq. 9 itself (the Stage II model, "
                f"{preview.steps}-step Euler on the "
                f"mix, no CFG on top) on {len(self.train_prompts.factors)} **training** prompts for each candidate, "
                f"score with the evaluator, take the best. It costs {preview_seconds:.0f} s for "
                f"{len(previews)} candidates, against {train_seconds:.0f} s of Stage III training for the grid.\n\n"
                f"| beta1 | beta2 | preview overall (train prompts) | student overall (held-out, Table 5) |\n"
                f"|---|---|---|---|\n{lines}\n\nChosen: beta = {chosen}; its student ranks "
                f"{ranked.index(chosen) + 1} of {len(ranked)} (overall {students[chosen].overall:.3f}; the grid's best "
                f"is {ranked[0]} at {students[ranked[0]].overall:.3f}).\n")
        return text, {"previews": {str(k): v for k, v in previews.items()}, "chosen": list(chosen),
                      "chosen_rank": ranked.index(chosen) + 1, "preview_seconds": preview_seconds,
                      "grid_train_seconds": train_seconds}

    def write_samples(self, rows: list[Measured]) -> None:
        for row in rows:
            name = row.label.split(" (")[0].split(":")[0].replace(" ", "_").lower()
            for i in range(min(2, len(self.prompts.factors))):
                label = self.prompts.captions[i].replace(" ", "_")
                write_mp4(self.out / "samples" / f"{name}_{i}_{label}.mp4", row.videos[i], upscale=8)


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
    p.add_argument("--seed", type=int, default=0, help="noise seed of the evaluation")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    out = args.out or (Path("outputs/reproduce-quick") if args.quick else REPO / "train" / "report")
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(args.cache / mode.name, args.config, mode.overrides)

    started = time.perf_counter()
    repro = Reproduction(mode, cache, out, args.seed)
    header = (f"# FastLightGen on the toy world: the paper's tables\n\nRegenerate with `python -m research.reproduce"
              f"{' --quick' if args.quick else ''}` ({mode.name} mode; runs cached in `{args.cache}`). Teacher: "
              f"`{Path(repro.base.model.teacher).name}`; recipe: `{Path(args.config).name}`"
              f"{' with ' + ', '.join(mode.overrides) if mode.overrides else ''}. {torch.get_num_threads()} CPU "
              f"threads. Quality: the toy evaluator (fastlightgen/toy/evaluate.py) on held-out prompts.\n")
    report = Report(out, header)
    for name, method in SECTIONS.items():
        text, numbers = getattr(repro, method)()
        report.add(name, text, numbers)
        print(f"[reproduce] {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    training = sum(stage_seconds(folder) for folder in cache.used)
    report.header += (f"\nThis run took {time.perf_counter() - started:.0f} s and trained {len(cache.trained)} stage "
                      f"runs (the rest came from the cache); its {len(cache.used)} Stage II and III runs took "
                      f"{training:.0f} s of training in all (their logged step times).\n")
    report.write()
    if not all_finite(report.numbers):
        raise SystemExit(f"non-finite numbers in {out / 'results.json'}")
    print(f"report in {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
