"""`python -m research.recipe_choice`: a value of the toy recipe chosen on training prompts, never held-out ones.

A candidate is the recipe (configs/toy.yaml with --base applied) with some settings changed. Its runs come
from the report's cache (research.reproduce's full mode: trained there when missing, and reused by the
report once the recipe adopts the value), and the model of its last stage is sampled on training prompts of
both modes at noise seeds the report does not use: `--stage 2`, the Stage II pruned path at the teacher's
sampling; `--stage 3`, the Stage III student at 4 steps. Prints the teacher, the recipe and each candidate
with its `faithful` and its per-video paired differences to the recipe and to the teacher, each with its 95%
interval and verdict (research/stats.py).

  python -m research.recipe_choice --stage 2 --candidate stage2.alpha=1,stage2.target=frozen
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text

from .demo import MODES
from .report import PRIMARY, Measured, paired, parameter_count
from .reproduce import FULL, PREVIEW_SEED, REPO, measure_euler, measure_student, pruned_path, training_prompts
from .run_cache import StageCache


def settings(spec: str) -> list[str]:
    return [s for s in spec.split(",") if s]


def choice_markdown(rows: list[Measured]) -> str:
    teacher, recipe, *_ = rows
    header = [PRIMARY, *(f"{PRIMARY} {m}" for m in MODES), "− recipe [95% CI]", "− teacher [95% CI]"]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row in rows:
        diffs = [f"{paired(row, ref)}, {paired(row, ref).verdict()}" if row is not ref else ""
                 for ref in (recipe, teacher)]
        lines.append(f"| {row.label} | {row.faithful:.3f} | " + " | ".join(f"{row.mean(PRIMARY, m):.3f}" for m in MODES)
                     + " | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", type=settings, default=[], required=True,
                   help="settings changed from the recipe, comma-separated (repeatable), e.g. stage2.lr=5e-4")
    p.add_argument("--base", type=settings, default=[],
                   help="settings applied to the recipe and every candidate, e.g. stage1.keep_ratio=0.5")
    p.add_argument("--stage", type=int, choices=(2, 3), default=3, help="2: the Stage II pruned path; 3: the student")
    p.add_argument("--seeds", default=f"{PREVIEW_SEED},{PREVIEW_SEED + 1}", help="noise seeds, comma-separated")
    p.add_argument("--combinations", type=int, default=12, help="training combinations, spread over the split")
    p.add_argument("--config", "-c", default=str(REPO / "configs" / "toy.yaml"))
    p.add_argument("--cache", type=Path, default=Path("runs/reproduce"), help="the report's cached stage runs")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2 or set(seeds) & set(FULL.seeds):
        p.error(f"--seeds: at least two noise seeds, none of the report's evaluation seeds {FULL.seeds}")

    cache = StageCache(args.cache / FULL.name, args.config, FULL.overrides)
    teacher, meta = load_wan(cache.config(args.base).model.teacher)
    params = parameter_count(teacher)
    prompts = training_prompts(args.combinations)
    rows = [measure_euler("teacher", teacher, meta.recommended, prompts, seeds, params)]
    for changed in [[], *args.candidate]:
        cfg = cache.config([*args.base, *changed])
        label = ", ".join(changed) or "the recipe"
        if args.stage == 2:
            rows.append(measure_euler(label, pruned_path(cfg, cache.stage2(cfg)), meta.recommended, prompts, seeds,
                                      params))
        else:
            rows.append(measure_student(label, cfg, cache.stage3(cfg), 4, prompts, seeds, params))
    what = "the Stage II pruned path at the teacher's sampling" if args.stage == 2 else "the 4-step student"
    text = (f"# Recipe choice: {what}\n\nRecipe `{Path(args.config).name}`"
            f"{' with ' + ', '.join(args.base) if args.base else ''}; {len(prompts[0].factors)} training prompts per "
            f"mode ({', '.join(MODES)}) x noise seeds {args.seeds} ({len(rows[0].samples.keys)} videos per model).\n\n"
            f"{choice_markdown(rows)}\n")
    if args.out:
        atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
