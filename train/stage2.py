"""`python -m train.stage2`: Stage II, the robust dynamically pruned model (paper sec. 3.3, eq. 5-7).

Each step skips each of the plan's dropped blocks independently with probability stage2.skip_prob
(0.5 in the paper; the same draw on every rank) and trains the resulting pruned path toward the
stop-gradient unpruned path of the same weights (alpha = 1), plus flow matching on both paths when
alpha < 1. Both passes share the blocks before the first skipped one; with alpha = 1 only the pruned
branch records gradients. Writes run_dir/stage2/model.safetensors (all blocks) for Stage III.
"""
from __future__ import annotations

import torch

from fastlightgen.distill import sample_skip, stage2_loss
from fastlightgen.flow import add_noise, pinned_first_frame_sigma, sample_training_sigma, velocity_target

from .cli import dry_run, parse
from .data import batch_source, data_fingerprint
from .dist import init_dist
from .loop import Run, learning_rate, train
from .models import load_plan, load_teacher, plan_path, save_stage_output
from .units import AdapterModule, compute_dtype, make_unit


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv)
    if args.dry_run:
        return dry_run(cfg)
    s2 = cfg.stage2

    # models: the teacher's weights, trained in place; the plan says which blocks may be skipped
    dist = init_dist(cfg)
    model = load_teacher(cfg)
    plan = load_plan(cfg, s2.plan, model)
    unit = make_unit("model", AdapterModule(model, cfg.model.gradient_checkpointing), cfg, dist, s2.lr, s2.weight_decay)
    dtype = compute_dtype(cfg)
    draw_batch = batch_source(cfg)
    run = Run(cfg, "stage2", dist)

    def step(i: int) -> dict:
        skip = sample_skip(plan.dropped, s2.skip_prob, run.generator(i, "skip", shared=True))
        g = run.generator(i, "batch")
        batch = draw_batch(g, cfg.data.batch_size)
        x0 = batch.x0
        sigma = sample_training_sigma(x0.shape[0], g, s2.sigma_shift, s2.sigma_law)
        if cfg.model.ti2v:
            sigma = pinned_first_frame_sigma(sigma, x0.shape[2])
        noise = torch.randn(x0.shape, generator=g)
        batch = batch.to(dist.device, dtype)
        x_t = add_noise(x0, noise, sigma).to(dist.device, dtype)
        target = velocity_target(x0, noise).to(dist.device)
        loss, parts = unit(lambda a: stage2_loss(a, x_t, sigma.to(dist.device), batch.cond, target, skip, s2.alpha,
                                                 cfg.model.ti2v))
        unit.update(loss, batch.desc, learning_rate(s2.lr, i, cfg.run.warmup, s2.lr_decay, s2.iterations))
        return {"loss": loss.item(), **parts, "skipped_blocks": len(skip)}

    steps = train(run, [unit], step, s2.iterations, args.resume)

    # output: the whole model (pruned and unpruned paths share it) for Stage III and export
    weights = unit.full_state_dict()
    if dist.is_main:
        out = save_stage_output(run.dir, weights, {
            "stage": "stage2", "plan": plan.to_dict(), "plan_path": str(plan_path(cfg, s2.plan)), "steps": steps,
            "alpha": s2.alpha, "skip_prob": s2.skip_prob, "data": data_fingerprint(cfg), "config": cfg.to_dict()})
        run.say(f"wrote {out}")
    dist.close()


if __name__ == "__main__":
    main()
