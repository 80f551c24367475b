"""`python -m train.stage2`: Stage II, the robust dynamically pruned model (paper sec. 3.3, eq. 5-7).

Each step skips each of the plan's dropped blocks independently with probability stage2.skip_prob
(0.5 in the paper; the same draw on every rank) and trains the resulting pruned path toward the
stop-gradient unpruned path (alpha = 1), plus flow matching on both paths when alpha < 1. The unpruned
target comes from stage2.target: `shared`, the same weights (the paper's form: both passes share the
blocks before the first skipped one; with alpha = 1 only the pruned branch records gradients); `frozen`,
a copy of the starting weights; `ema`, an exponential moving average of the trained weights (checkpointed
with them; plain loop only). Both run without gradients: the EMA and, whole models loaded (the plain loop,
dist.sharded_load false), the frozen copy as plain modules on every rank; under sharded ZeRO-3 loading the
frozen copy is partitioned like the trained weights (`frozen_target`). The weights start from the
teacher's, or from stage2.init: another Stage II run's, so that a smaller plan continues a larger one's run
(progressive pruning). Writes run_dir/stage2/model.safetensors (all blocks) for Stage III.
A two-expert model (Wan 2.2 A14B) is trained one expert per run (stage2.expert), from that expert's weights, with
its plan of the two-expert plan.json, at training sigmas drawn from stage2.sigma_law conditioned on its part of
the schedule (`fastlightgen.experts.sigma_range`), into run_dir/stage2_<expert>/.
API: `run(cfg, resume)`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fastlightgen.distill import sample_skip, stage2_loss
from fastlightgen.experts import sigma_range as expert_sigma_range
from fastlightgen.first_frame import given_frame, noised
from fastlightgen.flow import sample_training_sigma, velocity_target
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling

from .cli import stage_main
from .config import Config
from .data.batches import BatchFn, batch_source, data_fingerprint
from .distributed.processes import Dist, init_dist
from .loop.run import Run, learning_rate, train
from .models.loading import (MODEL_FILE, check_expert_plan, check_stage_inputs, expert_config, load_plan, load_start,
                     model_experts, plan_path, save_stage_output, stage_expert)
from .models.record import StageRecord
from .loop.state import hold_run_dir
from .models.units import (EMA, AdapterModule, Predictor, Trainable, compute_dtype, is_partitioned, make_trainable,
                           predictor)


@dataclass
class Stage2Models:
    """What one Stage II step reads."""
    cfg: Config
    run: Run
    unit: Trainable  # the teacher's weights, trained in place
    plan: PrunePlan  # which blocks may be skipped
    draw_batch: BatchFn
    dtype: torch.dtype
    target: Predictor | None = None  # the unpruned target's own weights (stage2.target frozen or ema)
    ema: EMA | None = None  # stage2.target=ema: updated after every step, checkpointed with the unit
    sigma_range: tuple[float, float] = (0.0, 1.0)  # the trained expert's part of the schedule


def build(cfg: Config, sigma_range: tuple[float, float] = (0.0, 1.0)) -> Stage2Models:
    """The models of a run of `cfg` (one expert's, `expert_config`, for a two-expert model)."""
    s2 = cfg.stage2
    dist = init_dist(cfg)
    model = load_start(cfg, s2.init or None)  # under ZeRO-3, this rank's partitions only (models.sharded)
    plan = load_plan(cfg, cfg.stage2.plan, model, s2.expert or None)
    dtype = compute_dtype(cfg)
    frozen = frozen_target(cfg, dist, model, dtype) if s2.target == "frozen" else None
    module = AdapterModule(model, cfg.model.gradient_checkpointing, dist.shards)
    unit = make_trainable("model", module, cfg, dist, s2.lr, s2.weight_decay)
    # the EMA starts at the teacher's weights, so its decay needs no warm-up (that forgets a random init)
    ema = EMA("target_ema", unit, s2.target_ema_decay, warmup=False) if s2.target == "ema" else None
    target = AdapterModule(ema.model) if ema is not None else frozen
    return Stage2Models(cfg, Run(cfg, "stage2", dist), unit, plan, batch_source(cfg), dtype, target, ema, sigma_range)


def frozen_target(cfg: Config, dist: Dist, model: torch.nn.Module, dtype: torch.dtype) -> Predictor:
    """stage2.target=frozen: the starting weights, never trained. A whole `model` is copied before DeepSpeed
    partitions it (whole on every rank, in the dtype of the inputs); under sharded ZeRO-3 loading the weights are
    read again as this rank's partitions and predict through an inference engine."""
    if is_partitioned(model):
        frozen = load_start(cfg, cfg.stage2.init or None)
    else:
        frozen = copy.deepcopy(model).to(dist.device, dtype)
    return predictor(AdapterModule(frozen.eval().requires_grad_(False), shards=dist.shards), cfg)


def train_one_step(m: Stage2Models, i: int) -> dict:
    cfg, s2, device = m.cfg, m.cfg.stage2, m.run.dist.device
    skip = sample_skip(m.plan.dropped, s2.skip_prob, m.run.generator(i, "skip", shared=True))
    g = m.run.generator(i, "batch")
    batch = m.draw_batch(g, cfg.data.batch_size)
    x0 = batch.x0
    sigma = sample_training_sigma(x0.shape[0], g, s2.sigma_shift, s2.sigma_law, within=m.sigma_range)
    x_t, sigma, noise = noised(x0, sigma, g, given_frame(x0, batch.ti2v))
    batch = batch.to(device, m.dtype)
    x_t = x_t.to(device, m.dtype)
    target = velocity_target(x0, noise).to(device)
    unpruned_target = None
    if m.target is not None:
        with torch.no_grad():
            unpruned_target = m.target(lambda a: a.forward(x_t, sigma.to(device), batch.cond))
    loss, parts = m.unit(lambda a: stage2_loss(a, x_t, sigma.to(device), batch.cond, target, skip, s2.alpha,
                                               batch.ti2v, unpruned_target))
    m.unit.update(loss, batch.desc, learning_rate(s2.lr, i, cfg.run.warmup, s2.lr_decay, s2.iterations))
    if m.ema is not None:
        m.ema.update(i)
    return {"loss": loss.item(), **parts, "skipped_blocks": len(skip)}


def run(cfg: Config, resume: bool = False) -> Path:
    """Trains Stage II (continuing the newest checkpoint with `resume`); returns its model.safetensors."""
    check_stage_inputs(cfg.validate(), "stage2")
    expert = stage_expert(cfg, "stage2")
    sigma_range = (0.0, 1.0)
    if expert:
        boundary = model_experts(cfg).boundary
        check_expert_plan(cfg, cfg.stage2.plan, expert, boundary)
        sigma_range = expert_sigma_range(expert, boundary)
        cfg = expert_config(cfg, expert)
    with hold_run_dir(cfg.stage_dir("stage2")):
        m = build(cfg, sigma_range)
        state = [m.unit] if m.ema is None else [m.unit, m.ema]
        steps = train(m.run, state, partial(train_one_step, m), cfg.stage2.iterations, resume)
        # the whole model (pruned and unpruned paths share it) for Stage III and export
        weights = m.unit.full_state_dict()
        if m.run.dist.is_main:
            save_stage_output(m.run.dir, weights, StageRecord(
                "stage2", m.plan, str(plan_path(cfg, cfg.stage2.plan)), steps, Sampling(), data_fingerprint(cfg),
                cfg.to_dict(), alpha=cfg.stage2.alpha, expert=expert, sigma_range=sigma_range if expert else None))
            m.run.print_on_main(f"wrote {m.run.dir / MODEL_FILE}")
        m.run.dist.close()
        return m.run.dir / MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, argv, run)


if __name__ == "__main__":
    main()
