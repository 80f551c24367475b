"""`python -m train.stage3`: Stage III, fine-grained distribution matching (paper sec. 3.4, eq. 8-9).

Models, all from the Stage II weights:
- generator: the pruned path physically pruned into its own, smaller model (trainable), sampled on the
  few-step list stage3.denoising_step_list with stage3.shift;
- real score: the frozen Stage II model as the well-guided teacher of eq. 9 (pruned and unpruned paths,
  beta1/beta2 jittered per step);
- fake score: the same frozen weights with a trainable LoRA on the kept blocks, pruned path.
Ablations (the paper's Tables 2 and 9): `stage3.init=teacher` starts from the teacher instead of Stage II,
and a plan that drops no block makes the student the whole model (step-only DMD, eq. 9 = CFG with beta1);
`stage3.plan_teacher=unpruned` takes both scores on the unpruned path (the "strong teacher": CFG beta1 on
all blocks, LoRA on all blocks), while the student stays pruned.
One iteration (`train_one_step`) = stage3.fake_updates fake-score updates (flow matching on detached
generator samples, TTUR) + one generator update (DMD2 loss). The generator's sample at a random step of the
list is reached by backward simulation: the earlier steps run without gradients, as at inference.
Writes run_dir/stage3/model.safetensors (the student) for `train.export`. API: `run(cfg, resume)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastlightgen.adapters import adapt
from fastlightgen.adapters.base import Conditioning
from fastlightgen.distill import backward_simulation, dmd_generator_loss, fake_velocity, mse, teacher_scores
from fastlightgen.first_frame import given_frame, noised
from fastlightgen.flow import shift_sigma, velocity_target, x0_from_velocity
from fastlightgen.guidance import TeacherMix
from fastlightgen.lora import add_lora, lora_enabled, lora_parameters
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling, Velocity, predict_x0

from .cli import stage_main
from .config import Config
from .data.batches import Batch, BatchFn, batch_source, data_fingerprint
from .distributed.processes import init_dist, step_generator
from .loop.run import Run, learning_rate, train
from .models.loading import (MODEL_FILE, check_stage_inputs, load_plan, load_pruned, load_start, plan_path,
                             save_stage_output)
from .models.record import StageRecord
from .loop.state import hold_run_dir
from .models.units import AdapterModule, Trainable, compute_dtype, make_trainable


@dataclass
class Stage3Models:
    """What one Stage III iteration reads."""
    cfg: Config
    run: Run
    generator: Trainable  # the physically pruned student
    fake: Trainable  # the frozen teacher weights; only the fake score's LoRA trains
    lora_model: nn.Module  # fake's model, whose LoRA the scores switch on and off
    skip: frozenset[int]  # the blocks both scores skip: the plan's dropped ones, none for the unpruned teacher
    plan: PrunePlan
    mix: TeacherMix
    sampling: Sampling  # the few-step list the student learns
    draw_batch: BatchFn
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.run.dist.device

    @property
    def sigmas(self) -> list[float]:
        """The few-step list's sigmas, ending at 0."""
        return self.sampling.sigmas.tolist()


class GeneratorSample(NamedTuple):
    batch: Batch
    first: torch.Tensor | None  # the TI2V first frame
    x0: torch.Tensor
    g: torch.Generator  # the stream that drew it, continued by the caller


def build(cfg: Config) -> Stage3Models:
    """Generator = the pruned copy of the Stage II weights; fake = those weights frozen, plus a LoRA. Under ZeRO-3
    each rank reads only its partitions of both (train/models/loading.py, `sharded`); the frozen teacher of eq. 9 is the
    fake engine's module, so its weights stay partitioned with the fake score's."""
    s3 = cfg.stage3
    dist = init_dist(cfg)
    init = None if s3.init == "teacher" else s3.init or cfg.stage_dir("stage2") / MODEL_FILE
    teacher = load_start(cfg, init)
    plan = load_plan(cfg, s3.plan, teacher)
    student = load_pruned(cfg, teacher, init, plan.kept).train()
    teacher.requires_grad_(False)
    skip = plan.skip if s3.plan_teacher == "pruned" else frozenset()
    lora_blocks = [b for i, b in enumerate(adapt(teacher).blocks()) if i not in skip]
    # seeded: a resumed or multi-rank run must start every rank from the same LoRA
    add_lora(lora_blocks, s3.lora_rank, s3.lora_alpha, step_generator(cfg.run.seed, "lora-init", 0, None))
    for p in lora_parameters(teacher):
        p.requires_grad_(True)
    ckpt = cfg.model.gradient_checkpointing
    generator = make_trainable("generator", AdapterModule(student, ckpt, dist.shards), cfg, dist, s3.lr)
    fake = make_trainable("fake", AdapterModule(teacher, ckpt, dist.shards), cfg, dist, s3.fake_lr)
    return Stage3Models(
        cfg, Run(cfg, "stage3", dist), generator, fake, fake.module.model, skip, plan,
        TeacherMix(s3.beta1, s3.beta2, s3.beta1_below, s3.beta1_above, s3.beta2_jitter),
        Sampling.few_step(s3.denoising_step_list, s3.shift), batch_source(cfg), compute_dtype(cfg))


def student_velocity(m: Stage3Models, cond: Conditioning) -> Velocity:
    return lambda x, sigma: m.generator(lambda a: a.forward(x.to(m.dtype), sigma.to(m.device), cond))


def generator_sample(m: Stage3Models, i: int, stream: str, grad: bool) -> GeneratorSample:
    """The generator's x0 at a random step of the list, reached by backward simulation."""
    g = m.run.generator(i, stream)
    batch = m.draw_batch(g, m.cfg.data.batch_size).to(m.device, m.dtype)
    velocity = student_velocity(m, batch.cond)
    first = given_frame(batch.x0.float(), batch.ti2v)
    stop = int(torch.randint(0, len(m.sigmas) - 1, (1,), generator=m.run.generator(i, stream, shared=True)))
    noise = torch.randn(batch.x0.shape, generator=g).to(m.device)
    x = backward_simulation(velocity, noise, m.sigmas, stop, g, first)
    with torch.set_grad_enabled(grad):
        x0 = predict_x0(velocity, x, m.sigmas[stop], first)
    return GeneratorSample(batch, first, x0, g)


def dmd_sigma(m: Stage3Models, g: torch.Generator, n: int) -> torch.Tensor:
    lo, hi = m.cfg.stage3.dmd_sigma_range
    return shift_sigma(lo + (hi - lo) * torch.rand(n, generator=g), m.cfg.stage3.shift)


def fake_update(m: Stage3Models, i: int, k: int) -> float:
    """Flow matching of the fake score (LoRA on) on a detached generator sample."""
    batch, first, x0, g = generator_sample(m, i, f"fake{k}", grad=False)
    x_t, sigma, noise = noised(x0, dmd_sigma(m, g, x0.shape[0]), g, first)
    with lora_enabled(m.lora_model, True):  # backward recomputes checkpointed blocks: keep the LoRA on
        v = m.fake(lambda a: fake_velocity(a, m.lora_model, x_t.to(m.dtype), sigma.to(m.device), batch.cond, m.skip))
        loss = mse(v, velocity_target(x0, noise), batch.ti2v)
        m.fake.update(loss, batch.desc, learning_rate(m.cfg.stage3.fake_lr, i, m.cfg.run.warmup))
    return loss.item()


def generator_update(m: Stage3Models, i: int) -> dict:
    """The DMD2 step of the generator between the real score (eq. 9) and the fake score."""
    batch, first, x0_gen, g = generator_sample(m, i, "gen", grad=True)
    x_t, sigma, _ = noised(x0_gen.detach(), dmd_sigma(m, g, x0_gen.shape[0]), g, first)
    beta1, beta2 = m.mix.sample(g)
    # A forward through a unit's engine (`m.fake(...)`) must be followed by that unit's backward: DeepSpeed
    # prepares it there (hooks on the outputs). The scores are targets only, never backpropagated, so they
    # are read through the wrapped module, under no_grad; ZeRO-3 still gathers its parameters (units.py).
    with torch.no_grad():
        v_real, v_fake = m.fake.module(lambda a: teacher_scores(a, m.lora_model, x_t.to(m.dtype), sigma.to(m.device),
                                                                batch.cond, batch.null, m.skip, beta1, beta2))
    x0_real, x0_fake = x0_from_velocity(x_t, v_real, sigma), x0_from_velocity(x_t, v_fake, sigma)
    loss = dmd_generator_loss(x0_gen, x0_real, x0_fake, batch.ti2v)
    m.generator.update(loss, batch.desc, learning_rate(m.cfg.stage3.lr, i, m.cfg.run.warmup))
    return {"gen_loss": loss.item(), "beta1": beta1, "beta2": beta2}


def train_one_step(m: Stage3Models, i: int) -> dict:
    fake_losses = [fake_update(m, i, k) for k in range(m.cfg.stage3.fake_updates)]
    return {**generator_update(m, i), "fake_loss": sum(fake_losses) / max(1, len(fake_losses))}


def run(cfg: Config, resume: bool = False) -> Path:
    """Trains Stage III (continuing the newest checkpoint with `resume`); returns the student's model.safetensors."""
    s3 = cfg.validate().stage3
    check_stage_inputs(cfg, "stage3")
    with hold_run_dir(cfg.stage_dir("stage3")):
        m = build(cfg)
        steps = train(m.run, [m.generator, m.fake], partial(train_one_step, m), s3.iterations, resume)
        # the student, physically pruned, for train.export
        weights = m.generator.full_state_dict()
        if m.run.dist.is_main:
            save_stage_output(m.run.dir, weights, StageRecord(
                "stage3", m.plan, str(plan_path(cfg, s3.plan)), steps, m.sampling, data_fingerprint(cfg),
                cfg.to_dict(), alpha=None if s3.init == "teacher" else cfg.stage2.alpha, betas=(s3.beta1, s3.beta2),
                student_config=dict(m.generator.module.model.config)))
            m.run.print_on_main(f"wrote {m.run.dir / MODEL_FILE}")
        m.run.dist.close()
        return m.run.dir / MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, argv, run)


if __name__ == "__main__":
    main()
