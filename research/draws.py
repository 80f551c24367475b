"""`python -m research.draws`: Table 2's main row decided on several draws of the held-out prompts.

The committed FastLightGen student (models/fastlightgen/toy_student.safetensors) against the committed teacher,
no training: the 12 held-out combinations drawn at several prompt seeds (each draw its own starts, speeds, color
changes and backgrounds) x noise seeds, in both modes, every video scored by the present evaluator and paired
per video (research/stats.py, clusters: the held-out combinations, as in every report table). The design (prompt
seeds, noise seeds, margin) is fixed here before the run; the held-out videos choose nothing.

Each (mode, model, prompt seed, noise seed) batch of videos is cached under --cache as it is made, keyed by the
model file's digest, so an interrupted run resumes and a rescoring regenerates nothing.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from fastlightgen.io_utils import atomic_path, atomic_write_text
from fastlightgen.toy.evaluate import GATES, EvalTable, evaluate_batch
from fastlightgen.toy.prompts import Prompts, heldout_prompts
from train.data.fingerprint import file_digest

from .demo import MODES, STUDENT, TEACHER, Candidate, models_to_compare
from .sanity import SANITY_MARGIN, ordering_holds, sanity_markdown, sanity_rows
from .stats import EQUIVALENCE_MARGIN, Interval, paired_interval

PROMPT_SEEDS = (0, 1, 2, 3)
NOISE_SEEDS = tuple(range(10))
CACHE = Path("runs/draws")
TARGET_WIDTH = 0.03  # issue #43: the interval the draws are sized for
DEMO_SEEDS = (0, 1, 2, 3, 4)  # research.demo's default noise seeds, on prompt draw 0: its very videos


def draw(mode: str, prompt_seed: int) -> Prompts:
    return heldout_prompts(seed=prompt_seed, t2v=mode == "T2V")


def video_file(cache: Path, digest: str, mode: str, prompt_seed: int, noise_seed: int) -> Path:
    return cache / digest / f"{mode}-p{prompt_seed}-n{noise_seed}.pt"


def videos(model: Candidate, digest: str, cache: Path, mode: str, prompt_seed: int, noise_seed: int) -> torch.Tensor:
    """The model's videos of one draw at one noise seed, made once and then read from the cache."""
    path = video_file(cache, digest, mode, prompt_seed, noise_seed)
    if path.is_file():
        return torch.load(path)
    made = model.generate(draw(mode, prompt_seed), noise_seed)
    with atomic_path(path) as tmp:
        torch.save(made, tmp)
    return made


def batches(modes: tuple[str, ...]) -> Iterator[tuple[str, int, int]]:
    """(mode, prompt seed, noise seed) in the order they are made: a draw of prompts completes in every mode before
    the next draw starts, so a run cut short leaves whole draws."""
    for prompt_seed in PROMPT_SEEDS:
        for mode in modes:
            for noise_seed in NOISE_SEEDS:
                yield mode, prompt_seed, noise_seed


@dataclass
class Scored:
    """One model's videos of one mode: their scores, and each video's prompt draw and held-out combination."""
    table: EvalTable
    draws: list[int]
    noise: list[int]
    clusters: list[tuple]

    def subset(self, prompt_seed: int) -> EvalTable:
        return EvalTable([label for label, d in zip(self.table.labels, self.draws) if d == prompt_seed],
                         [row for row, d in zip(self.table.rows, self.draws) if d == prompt_seed])


def score(model: Candidate, digest: str, cache: Path, mode: str, prompt_seeds: tuple[int, ...],
          noise_seeds: tuple[int, ...] | None = None) -> Scored:
    """Every video of a mode's draws at `noise_seeds` (default NOISE_SEEDS) scored (made first where the cache lacks
    it)."""
    rows, labels, draws, noise, clusters = [], [], [], [], []
    for prompt_seed in prompt_seeds:
        prompts = draw(mode, prompt_seed)
        for noise_seed in NOISE_SEEDS if noise_seeds is None else noise_seeds:
            table = evaluate_batch(videos(model, digest, cache, mode, prompt_seed, noise_seed),
                                   list(prompts.factors), t2v=prompts.t2v)
            rows += table.rows
            labels += [f"prompts {prompt_seed}, noise {noise_seed}: {label}" for label in table.labels]
            draws += [prompt_seed] * len(table.rows)
            noise += [noise_seed] * len(table.rows)
            clusters += [f.combination for f in prompts.factors]
    return Scored(EvalTable(labels, rows), draws, noise, clusters)


def difference(student: Scored, teacher: Scored, prompt_seed: int | None = None,
               noise_seeds: tuple[int, ...] = NOISE_SEEDS) -> Interval:
    """Student - teacher on `faithful`, paired per video, resampled over combinations then videos; one prompt draw's
    videos alone if `prompt_seed` is given, and only the videos of `noise_seeds`."""
    keep = [(prompt_seed is None or d == prompt_seed) and n in noise_seeds
            for d, n in zip(teacher.draws, teacher.noise)]
    return paired_interval(_kept([r["faithful"] for r in student.table.rows], keep),
                           _kept([r["faithful"] for r in teacher.table.rows], keep), _kept(teacher.clusters, keep))


def _kept(values: list, keep: list[bool]) -> list:
    return [v for v, k in zip(values, keep) if k]


def sanity_section(mode: str, teacher: Scored, prompt_seeds: tuple[int, ...]) -> tuple[str, bool]:
    """The mode's sanity table on every draw's prompts, and whether its ordering holds (overall and at the teacher's
    least favorable draw)."""
    prompts = Prompts(tuple(f for s in prompt_seeds for f in draw(mode, s).factors), mode == "T2V")
    rows = sanity_rows(prompts, teacher.table)
    by_draw = {s: teacher.subset(s) for s in prompt_seeds}
    worst = min(prompt_seeds, key=lambda s: by_draw[s].mean()["faithful"])
    worst_holds = ordering_holds({**rows, "teacher": by_draw[worst]})
    holds = ordering_holds(rows) and worst_holds
    draws = ", ".join(f"{s}: {t.mean()['faithful']:.3f}" for s, t in by_draw.items())
    return (f"{sanity_markdown(rows)} The teacher's `faithful` by prompt draw ({draws}); at its least favorable "
            f"draw ({worst}) alone the ordering **{'holds' if worst_holds else 'FAILS'}**. {mode} is "
            f"{'evidence' if holds else '**not evidence**: no verdict is drawn from its rows'}.\n"), holds


ROW_COLUMNS = ("faithful", "correct", *GATES, "fidelity", "overall")


def main_row(mode: str, teacher: Scored, student: Scored, evidence: bool) -> str:
    interval = difference(student, teacher)
    ours, theirs = teacher.table.mean(), student.table.mean()
    cells = " | ".join(f"{ours[c]:.3f} / {theirs[c]:.3f}" for c in ROW_COLUMNS)
    verdict = interval.verdict() if evidence else f"none ({mode} is not evidence; {interval.verdict()} if it were)"
    return (f"| {mode} | {interval.n} | {cells} | {interval} | {interval.high - interval.low:.4f} | {verdict} |")


def main_row_table(scored: dict[str, tuple[Scored, Scored]], evidence: dict[str, bool]) -> str:
    head = ("| mode | paired videos | " + " | ".join(f"{c} (teacher / student)" for c in ROW_COLUMNS)
            + f" | student − teacher [95% CI] | width | verdict (±{EQUIVALENCE_MARGIN}) |")
    lines = [head, "|---" * (len(ROW_COLUMNS) + 5) + "|"]
    lines += [main_row(mode, teacher, student, evidence[mode]) for mode, (teacher, student) in scored.items()]
    return "\n".join(lines)


def by_draw_table(scored: dict[str, tuple[Scored, Scored]], prompt_seeds: tuple[int, ...]) -> str:
    """The difference on each draw alone: how far one draw of 12 prompts moves it."""
    lines = ["| mode | " + " | ".join(f"prompt draw {s}" for s in prompt_seeds) + " |",
             "|---" * (len(prompt_seeds) + 1) + "|"]
    for mode, (teacher, student) in scored.items():
        lines.append(f"| {mode} | " + " | ".join(str(difference(student, teacher, s)) for s in prompt_seeds) + " |")
    return "\n".join(lines)


def demo_videos_table(scored: dict[str, tuple[Scored, Scored]]) -> str:
    """The demo's own videos (prompt draw 0, its noise seeds), so its verdict under this scorer is read here too."""
    lines = ["| mode | teacher faithful | student faithful | student − teacher [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    for mode, (teacher, student) in scored.items():
        interval = difference(student, teacher, 0, DEMO_SEEDS)
        means = [sum(r["faithful"] for r, d, n in zip(t.table.rows, t.draws, t.noise) if d == 0 and n in DEMO_SEEDS)
                 / interval.n for t in (teacher, student)]
        lines.append(f"| {mode} | {means[0]:.3f} | {means[1]:.3f} | {interval} | {interval.verdict()} |")
    return "\n".join(lines)


def report(scored: dict[str, tuple[Scored, Scored]], sections: dict[str, str], evidence: dict[str, bool],
           prompt_seeds: tuple[int, ...]) -> str:
    n = len(next(iter(scored.values()))[0].table.rows)
    evident = [m for m, ok in evidence.items() if ok]
    return (f"# Table 2's main row on several draws of the held-out prompts ({date.today().isoformat()})\n\n"
            f"`python -m research.draws` (method: its docstring). The committed teacher "
            f"(`{TEACHER.name}`, 50-step Euler, CFG) against the committed FastLightGen student (`{STUDENT.name}`, "
            f"4 steps, 8 of 12 blocks); no training. Per mode: the 12 held-out combinations drawn at prompt seeds "
            f"{', '.join(map(str, prompt_seeds))} x noise seeds {NOISE_SEEDS[0]}-{NOISE_SEEDS[-1]} = {n} paired "
            f"videos per model. Scorer: fastlightgen/toy/evaluate.py with the near-miss gates of issue #43 (color "
            f"per frame, direction within 15 degrees, speed within 2^±0.25, TI2V step from the given frame within "
            f"0.4 px; tolerances from the ground truth's spread on training prompts, "
            f"reports/toy/gate_spread_2026-12-05.md). Intervals: 95% bootstrap over the held-out combinations, then "
            f"videos (research/stats.py); margin ±{EQUIVALENCE_MARGIN}, fixed before this run in research/stats.py; "
            f"the draws were sized for an interval at most {TARGET_WIDTH} wide. A mode is evidence only where its "
            f"sanity ordering holds (ground truth > teacher > every wrong answer and near miss by >= "
            f"{SANITY_MARGIN}).\n\n## Sanity\n\n" + "\n".join(sections.values())
            + f"\n## Table 2's main row\n\nEvidence: {', '.join(evident) or 'no mode'}.\n\n"
            f"{main_row_table(scored, evidence)}\n\n## By prompt draw\n\nStudent − teacher on `faithful` on "
            f"each draw alone ({len(NOISE_SEEDS)} noise seeds):\n\n{by_draw_table(scored, prompt_seeds)}\n\n"
            f"## The demo's videos\n\n`python -m research.demo` makes prompt draw 0 at noise seeds "
            f"{', '.join(map(str, DEMO_SEEDS))} with the same models and sampler: these are its videos, scored "
            f"here (its own verdicts take the sanity ordering of its 12 prompts):\n\n{demo_videos_table(scored)}\n")


def complete_draws(cache: Path, digests: list[str], modes: tuple[str, ...]) -> tuple[int, ...]:
    """The prompt seeds whose videos are cached for every model, mode and noise seed."""
    return tuple(s for s in PROMPT_SEEDS if all(video_file(cache, d, m, s, n).is_file()
                                                 for d in digests for m in modes for n in NOISE_SEEDS))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--generate-only", action="store_true", help="make and cache the videos, score nothing")
    p.add_argument("--cached-only", action="store_true",
                   help="score the prompt draws already complete in the cache, make nothing (a run cut short)")
    p.add_argument("--out", type=Path, default=Path(f"reports/toy/table2_draws_{date.today().isoformat()}.md"))
    args = p.parse_args(argv)
    modes = tuple(args.modes.split(","))
    models = models_to_compare(argparse.Namespace(teacher=TEACHER, student=STUDENT, student_adapter=None,
                                                  steps=None, cfg=None))
    digests = [file_digest(TEACHER), file_digest(STUDENT)]
    if not args.cached_only:
        for mode, prompt_seed, noise_seed in batches(modes):
            for model, digest in zip(models, digests):
                videos(model, digest, args.cache, mode, prompt_seed, noise_seed)
            print(f"{mode} prompts {prompt_seed} noise {noise_seed}: cached", flush=True)
    if args.generate_only:
        return
    prompt_seeds = complete_draws(args.cache, digests, modes)
    if not prompt_seeds:
        raise SystemExit(f"no prompt draw is complete in {args.cache}: run without --cached-only")
    scored = {mode: tuple(score(m, d, args.cache, mode, prompt_seeds) for m, d in zip(models, digests))
              for mode in modes}
    sections, evidence = {}, {}
    for mode, (teacher, _) in scored.items():
        sections[mode], evidence[mode] = sanity_section(mode, teacher, prompt_seeds)
    text = report(scored, sections, evidence, prompt_seeds)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
