"""`python -m train.stage1`: Stage I, block importance (paper sec. 3.2, eq. 3-4) and the prune plan.

Scores every block by the Tweedie x0 error of the model with that block skipped, over stage1.samples
batches of the dataset at stage1.timesteps noise levels, and keeps the top stage1.keep_ratio (plus
stage1.protected). Writes plan.json, scores.csv and importance.png to run_dir/stage1. Inference only:
it runs in one process (on one GPU for the real models). API: `run(cfg)`.
A two-expert model (Wan 2.2 A14B) is scored one expert after the other, each on its part of the schedule
(`fastlightgen.experts.sigma_range`: the high-noise expert at sigmas above the boundary, the low-noise one below)
with the same batches, and kept at stage1.expert_keep_ratios[expert] (else stage1.keep_ratio): plan.json holds
both plans (`fastlightgen.plan.ExpertPlans`), scores.csv an expert column, importance.png both charts.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from fastlightgen.adapters import adapt
from fastlightgen.experts import EXPERTS, sigma_range
from fastlightgen.importance import ImportanceResult, block_importance, stage1_sigmas
from fastlightgen.plan import ExpertPlans, PrunePlan, check_block_numbers
from fastlightgen.plot import expert_charts, importance_chart

from .cli import dry_run, parse
from .config import Config
from .data import batch_source
from .dist import step_generator
from .memory import meta_model
from .models import check_conditioning, expert_config, load_teacher, model_experts, plan_path
from .units import compute_dtype


def write_csv(path: Path, results: dict[str | None, tuple[ImportanceResult, PrunePlan]]) -> None:
    """One row per block (and expert: a leading column for a two-expert model)."""
    experts = list(results) != [None]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["expert"] if experts else []) + ["block", "score", "rank", "kept"])
        for expert, (result, plan) in results.items():
            rank = {b: r + 1 for r, b in enumerate(result.ranking)}
            for i, s in enumerate(result.scores):
                w.writerow(([expert] if experts else []) + [i, f"{s:.8g}", rank[i], int(i in plan.kept)])


def score(cfg: Config, batches: list, sigmas: list[float], keep_ratio: float, label: str
          ) -> tuple[ImportanceResult, PrunePlan]:
    """The teacher of `cfg` (one expert) scored on `batches` at `sigmas`, and its plan at `keep_ratio`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(cfg)
    model = load_teacher(cfg).to(device).eval()
    adapter = adapt(model.to(dtype) if dtype != torch.float32 else model)
    from tqdm import tqdm
    with tqdm(total=len(batches) * len(sigmas), desc=label) as bar:
        result = block_importance(adapter, [(b.x0, b.cond) for b in batches], sigmas, seed=cfg.run.seed,
                                  pin_first_frame=cfg.model.ti2v, progress=lambda done, total: bar.update(done - bar.n))
    return result, result.plan(adapter, keep_ratio=keep_ratio, protected=cfg.stage1.protected)


def run(cfg: Config) -> Path:
    """Scores the blocks and writes the plan; returns the plan's path."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("Stage I is inference: run it as one process (python -m train.stage1)")
    s1 = cfg.validate().stage1
    experts = model_experts(cfg)  # both experts' parts and their boundary, before any load
    check_block_numbers("stage1.protected", s1.protected, adapt(meta_model(cfg)).num_blocks)
    check_conditioning(cfg)

    # stage1.samples batches drawn like training batches, the same for every expert
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    draw_batch = batch_source(cfg)
    batches = [draw_batch(step_generator(cfg.run.seed, "stage1", i, None), cfg.data.batch_size)
               .to(device, compute_dtype(cfg)) for i in range(s1.samples)]

    out = plan_path(cfg, s1.plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    if experts is None:
        result, plan = score(cfg, batches, stage1_sigmas(s1.timesteps), s1.keep_ratio, "stage1")
        plan.save(out)
        importance_chart(result, plan).save(out.parent / "importance.png")
        results = {None: (result, plan)}
    else:
        results, charts = {}, {}
        for name in EXPERTS:  # one expert in memory at a time
            low, high = sigma_range(name, experts.boundary)
            results[name] = score(expert_config(cfg, name), batches, stage1_sigmas(s1.timesteps, low, high),
                                  s1.expert_keep_ratios.get(name, s1.keep_ratio), f"stage1 {name}")
            charts[name] = (*results[name], (low, high))
        ExpertPlans(experts.boundary, {name: plan for name, (_, plan) in results.items()}).save(out)
        expert_charts(charts).save(out.parent / "importance.png")
    write_csv(out.parent / "scores.csv", results)
    for expert, (result, plan) in results.items():
        print(("" if expert is None else f"{expert}-noise expert\n") + result.table())
        print(f"kept {plan.kept}, dropped {plan.dropped}")
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
