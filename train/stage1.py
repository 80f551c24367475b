"""`python -m train.stage1`: Stage I, block importance (paper sec. 3.2, eq. 3-4) and the prune plan.

Scores every block by the Tweedie x0 error of the model with that block skipped, over stage1.samples
batches of the dataset at stage1.timesteps noise levels, and keeps the top stage1.keep_ratio (plus
stage1.protected). Writes plan.json, scores.csv and importance.png to run_dir/stage1. Inference only:
it runs in one process (on one GPU for the real models), or, for videos too long for one GPU, as one
sequence-parallel group (`torchrun --nproc_per_node N -m train.stage1 ... --set dist.deepspeed=true --set
dist.sequence_parallel=N`: every process holds the whole teacher and 1/N of each sample's tokens; rank 0 writes).
API: `run(cfg)`.
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
from .data.batches import batch_source
from .distributed.processes import Dist, init_dist, step_generator
from .models.memory import meta_model
from .models.loading import check_conditioning, expert_config, load_teacher, model_experts, plan_path, teacher_config
from .distributed.sequence import check_setting as check_sequence_parallel
from .models.units import compute_dtype


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


def score(cfg: Config, dist: Dist, batches: list, sigmas: list[float], keep_ratio: float, label: str
          ) -> tuple[ImportanceResult, PrunePlan]:
    """The teacher of `cfg` (one expert) scored on `batches` at `sigmas`, and its plan at `keep_ratio`."""
    dtype = compute_dtype(cfg)
    model = load_teacher(cfg).to(dist.device).eval()
    adapter = adapt(model.to(dtype) if dtype != torch.float32 else model)
    if dist.shards is not None:
        adapter.shard_sequence(dist.shards)
    from tqdm import tqdm
    with tqdm(total=len(batches) * len(sigmas), desc=label, disable=not dist.is_main) as bar:
        result = block_importance(adapter, [(b.x0, b.cond) for b in batches], sigmas, seed=cfg.run.seed,
                                  pin_first_frame=cfg.model.ti2v, progress=lambda done, total: bar.update(done - bar.n))
    return result, result.plan(adapter, keep_ratio=keep_ratio, protected=cfg.stage1.protected)


def run(cfg: Config) -> Path:
    """Scores the blocks and writes the plan; returns the plan's path."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != cfg.dist.sequence_parallel:
        raise SystemExit(f"Stage I is inference: run it as one process (python -m train.stage1), or as one "
                         f"sequence-parallel group of {world} processes with --set dist.deepspeed=true --set "
                         f"dist.sequence_parallel={world}")
    s1 = cfg.validate().stage1
    experts = model_experts(cfg)  # both experts' parts and their boundary, before any load
    check_block_numbers("stage1.protected", s1.protected, adapt(meta_model(cfg)).num_blocks)
    check_conditioning(cfg)
    if cfg.dist.sequence_parallel > 1:
        check_sequence_parallel(cfg, teacher_config(cfg))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_dist(cfg) if world > 1 else Dist(0, 1, 0, device, False)
    # stage1.samples batches drawn like training batches, the same for every expert (and rank)
    draw_batch = batch_source(cfg)
    batches = [draw_batch(step_generator(cfg.run.seed, "stage1", i, None), cfg.data.batch_size)
               .to(dist.device, compute_dtype(cfg)) for i in range(s1.samples)]
    if experts is None:
        results = {None: score(cfg, dist, batches, stage1_sigmas(s1.timesteps), s1.keep_ratio, "stage1")}
    else:
        results, ranges = {}, {}
        for name in EXPERTS:  # one expert in memory at a time
            ranges[name] = sigma_range(name, experts.boundary)
            results[name] = score(expert_config(cfg, name), dist, batches, stage1_sigmas(s1.timesteps, *ranges[name]),
                                  s1.expert_keep_ratios.get(name, s1.keep_ratio), f"stage1 {name}")
    out = plan_path(cfg, s1.plan)
    if dist.is_main:
        write_outputs(out, results, None if experts is None else (experts.boundary, ranges))
    dist.close()
    return out


def write_outputs(out: Path, results: dict, experts: tuple[float, dict] | None) -> None:
    """plan.json, importance.png and scores.csv beside it, and the tables on stdout; `experts`: (the boundary,
    each expert's sigma range) for a two-expert model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if experts is None:
        result, plan = results[None]
        plan.save(out)
        importance_chart(result, plan).save(out.parent / "importance.png")
    else:
        boundary, ranges = experts
        ExpertPlans(boundary, {name: plan for name, (_, plan) in results.items()}).save(out)
        expert_charts({name: (*results[name], ranges[name]) for name in results}).save(out.parent / "importance.png")
    write_csv(out.parent / "scores.csv", results)
    for expert, (result, plan) in results.items():
        print(("" if expert is None else f"{expert}-noise expert\n") + result.table())
        print(f"kept {plan.kept}, dropped {plan.dropped}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
