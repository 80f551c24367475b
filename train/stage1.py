"""`python -m train.stage1`: Stage I, block importance (paper sec. 3.2, eq. 3-4) and the prune plan.

Scores every block by the Tweedie x0 error of the model with that block skipped, over stage1.samples
batches of the dataset at stage1.timesteps noise levels, and keeps the top stage1.keep_ratio (plus
stage1.protected). Writes plan.json, scores.csv and importance.png to run_dir/stage1. Inference only:
it runs in one process (on one GPU for the real models). API: `run(cfg)`.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from fastlightgen.adapters import adapt
from fastlightgen.importance import ImportanceResult, block_importance, stage1_sigmas
from fastlightgen.plan import PrunePlan, check_block_numbers
from fastlightgen.plot import importance_chart

from .cli import dry_run, parse
from .config import Config
from .data import batch_source
from .dist import step_generator
from .memory import meta_model
from .models import load_teacher, plan_path
from .units import compute_dtype


def write_csv(path: Path, result: ImportanceResult, plan: PrunePlan) -> None:
    rank = {b: r + 1 for r, b in enumerate(result.ranking)}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "score", "rank", "kept"])
        for i, s in enumerate(result.scores):
            w.writerow([i, f"{s:.8g}", rank[i], int(i in plan.kept)])


def run(cfg: Config) -> Path:
    """Scores the blocks and writes the plan; returns the plan's path."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("Stage I is inference: run it as one process (python -m train.stage1)")
    s1 = cfg.validate().stage1
    check_block_numbers("stage1.protected", s1.protected, adapt(meta_model(cfg)).num_blocks)  # before any load

    # models and data: the teacher and stage1.samples batches drawn like training batches
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(cfg)
    model = load_teacher(cfg).to(device).eval()
    adapter = adapt(model.to(dtype) if dtype != torch.float32 else model)
    draw_batch = batch_source(cfg)
    batches = [draw_batch(step_generator(cfg.run.seed, "stage1", i, None), cfg.data.batch_size).to(device, dtype)
               for i in range(s1.samples)]

    # the scores (eq. 4) and the plan
    from tqdm import tqdm
    with tqdm(total=s1.samples * s1.timesteps, desc="stage1") as bar:
        result = block_importance(adapter, [(b.x0, b.cond) for b in batches], stage1_sigmas(s1.timesteps),
                                  seed=cfg.run.seed, pin_first_frame=cfg.model.ti2v,
                                  progress=lambda done, total: bar.update(done - bar.n))
    plan = result.plan(adapter, keep_ratio=s1.keep_ratio, protected=s1.protected)

    out = plan_path(cfg, s1.plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    write_csv(out.parent / "scores.csv", result, plan)
    importance_chart(result, plan).save(out.parent / "importance.png")
    print(result.table())
    print(f"kept {plan.kept}, dropped {plan.dropped}; wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
