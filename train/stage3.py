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
Two experts (Wan 2.2 A14B; the choices the paper leaves open: train/README.md, "Two experts"): each expert's student,
real and fake score are built as above from its own Stage II run (run_dir/stage2_<expert>); each step of the list
goes to the generator of the expert whose range holds its sigma, and each DMD draw (a fake update, the generator
update) to one expert's scores, chosen with that expert's share of the DMD sigma law and the same on every rank;
the generator update trains the expert that took the sampled step.
Writes run_dir/stage3/model.safetensors (the student; two experts: run_dir/stage3/<expert>/model.safetensors) for
`train.export`. API: `run(cfg, resume)`.
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
from fastlightgen.experts import EXPERTS, expert_of, sigma_range
from fastlightgen.first_frame import given_frame, noised
from fastlightgen.flow import shift_sigma, unshift_sigma, velocity_target, x0_from_velocity
from fastlightgen.guidance import TeacherMix
from fastlightgen.lora import add_lora, lora_enabled, lora_parameters
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling, Velocity, predict_x0

from .cli import stage_main
from .config import Config
from .data.batches import Batch, BatchFn, batch_source, data_fingerprint
from .distributed.processes import Dist, init_dist, step_generator
from .loop.run import Run, learning_rate, train
from .models.loading import (MODEL_FILE, check_expert_plan, check_stage_inputs, expert_config, load_plan, load_pruned,
                             load_start, model_experts, plan_path, save_stage_output, stage3_start)
from .models.record import StageRecord
from .loop.state import hold_run_dir
from .models.units import AdapterModule, Trainable, compute_dtype, make_trainable


@dataclass
class ExpertUnits:
    """One expert of the student with its scores; a one-expert model is one over the whole schedule."""
    name: str | None  # "high" or "low" (fastlightgen.experts); None for a one-expert model
    sigma_range: tuple[float, float]  # the part of the schedule it runs on
    plan: PrunePlan
    generator: Trainable  # the physically pruned student
    fake: Trainable  # the frozen Stage II weights (eq. 9's teacher); only the fake score's LoRA trains
    skip: frozenset[int]  # the blocks both scores skip: the plan's dropped ones, none for the unpruned teacher

    @property
    def lora_model(self) -> nn.Module:
        """The fake score's model, whose LoRA the scores switch on and off."""
        return self.fake.module.model


@dataclass
class Stage3Models:
    """What one Stage III iteration reads."""
    cfg: Config
    run: Run
    experts: list[ExpertUnits]  # the high-noise expert first
    boundary: float | None  # where the low-noise expert takes over; None for one expert
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

    def expert_at(self, sigma: torch.Tensor | float) -> ExpertUnits:
        """The expert whose range holds `sigma` (a step's, or a batch's per-row or per-frame sigmas)."""
        if self.boundary is None:
            return self.experts[0]
        name = expert_of(torch.as_tensor(sigma), self.boundary)
        return next(e for e in self.experts if e.name == name)

    def units(self) -> list[Trainable]:
        """Every trained unit, checkpointed together."""
        return [e.generator for e in self.experts] + [e.fake for e in self.experts]


class GeneratorSample(NamedTuple):
    batch: Batch
    first: torch.Tensor | None  # the TI2V first frame
    x0: torch.Tensor
    g: torch.Generator  # the stream that drew it, continued by the caller
    expert: ExpertUnits  # the expert whose generator took the step that made x0


def build(cfg: Config) -> Stage3Models:
    """The student and scores of every expert: `build_expert` each, from its Stage II run (run_dir/stage2_<expert>
    for a two-expert model)."""
    s3 = cfg.stage3
    dist = init_dist(cfg)
    experts = model_experts(cfg)
    if experts is None:
        units = [build_expert(cfg, dist, None, (0.0, 1.0))]
    else:
        units = [build_expert(expert_config(cfg, name), dist, name, sigma_range(name, experts.boundary))
                 for name in EXPERTS]
    return Stage3Models(
        cfg, Run(cfg, "stage3", dist), units, experts.boundary if experts else None,
        TeacherMix(s3.beta1, s3.beta2, s3.beta1_below, s3.beta1_above, s3.beta2_jitter),
        Sampling.few_step(s3.denoising_step_list, s3.shift), batch_source(cfg), compute_dtype(cfg))


def build_expert(cfg: Config, dist: Dist, name: str | None, expert_range: tuple[float, float]) -> ExpertUnits:
    """Generator = the pruned copy of the Stage II weights; fake = those weights frozen, plus a LoRA. Under ZeRO-3
    each rank reads only its partitions of both (train/models/loading.py, `sharded`); the frozen teacher of eq. 9 is
    the fake engine's module, so its weights stay partitioned with the fake score's. `cfg`: the expert's own
    (`expert_config`) for one of two."""
    s3 = cfg.stage3
    init = stage3_start(cfg, name)
    teacher = load_start(cfg, init)
    plan = load_plan(cfg, s3.plan, teacher, name)
    student = load_pruned(cfg, teacher, init, plan.kept).train()
    teacher.requires_grad_(False)
    skip = plan.skip if s3.plan_teacher == "pruned" else frozenset()
    lora_blocks = [b for i, b in enumerate(adapt(teacher).blocks()) if i not in skip]
    # seeded: a resumed or multi-rank run must start every rank from the same LoRA
    add_lora(lora_blocks, s3.lora_rank, s3.lora_alpha, step_generator(cfg.run.seed, unit_name("lora-init", name), 0,
                                                                      None))
    for p in lora_parameters(teacher):
        p.requires_grad_(True)
    ckpt = cfg.model.gradient_checkpointing
    generator = make_trainable(unit_name("generator", name), AdapterModule(student, ckpt, dist.shards), cfg, dist,
                               s3.lr)
    fake = make_trainable(unit_name("fake", name), AdapterModule(teacher, ckpt, dist.shards), cfg, dist, s3.fake_lr)
    return ExpertUnits(name, expert_range, plan, generator, fake, skip)


def unit_name(base: str, expert: str | None) -> str:
    """A unit's (or stream's) name: one expert's carries its name, so two experts' checkpoints and draws differ."""
    return base if expert is None else f"{base}_{expert}"


def student_velocity(m: Stage3Models, cond: Conditioning) -> Velocity:
    """The few-step student: each step by the generator of the expert whose range holds its sigma."""
    return lambda x, sigma: m.expert_at(sigma).generator(lambda a: a.forward(x.to(m.dtype), sigma.to(m.device), cond))


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
    return GeneratorSample(batch, first, x0, g, m.expert_at(m.sigmas[stop]))


def dmd_expert(m: Stage3Models, i: int, stream: str) -> ExpertUnits:
    """The expert whose scores take a DMD draw, chosen with its share of the DMD sigma law; the same on every rank
    (ZeRO-3 gathers the chosen scores' weights on all), so the draws of all experts follow that law together."""
    if len(m.experts) == 1:
        return m.experts[0]
    u = float(torch.rand(1, generator=m.run.generator(i, f"{stream}_expert", shared=True)))
    lo, hi = m.cfg.stage3.dmd_sigma_range
    for unit in m.experts:
        a, b = dmd_bounds(m, unit)
        u -= (b - a) / (hi - lo)
        if u < 0:
            return unit
    return m.experts[-1]


def dmd_bounds(m: Stage3Models, unit: ExpertUnits) -> tuple[float, float]:
    """The part of stage3.dmd_sigma_range (before the shift warp) whose sigmas lie in `unit`'s range; empty when
    none do."""
    lo, hi = m.cfg.stage3.dmd_sigma_range
    a, b = (float(unshift_sigma(s, m.cfg.stage3.shift)) for s in unit.sigma_range)
    low = max(lo, a)
    return low, max(low, min(hi, b))


def dmd_sigma(m: Stage3Models, g: torch.Generator, n: int, unit: ExpertUnits) -> torch.Tensor:
    lo, hi = dmd_bounds(m, unit)
    return shift_sigma(lo + (hi - lo) * torch.rand(n, generator=g), m.cfg.stage3.shift)


def fake_update(m: Stage3Models, i: int, k: int) -> float:
    """Flow matching of one expert's fake score (LoRA on) on a detached generator sample."""
    unit = dmd_expert(m, i, f"fake{k}")
    batch, first, x0, g, _ = generator_sample(m, i, f"fake{k}", grad=False)
    x_t, sigma, noise = noised(x0, dmd_sigma(m, g, x0.shape[0], unit), g, first)
    with lora_enabled(unit.lora_model, True):  # backward recomputes checkpointed blocks: keep the LoRA on
        v = unit.fake(lambda a: fake_velocity(a, unit.lora_model, x_t.to(m.dtype), sigma.to(m.device), batch.cond,
                                              unit.skip))
        loss = mse(v, velocity_target(x0, noise), batch.ti2v)
        unit.fake.update(loss, batch.desc, learning_rate(m.cfg.stage3.fake_lr, i, m.cfg.run.warmup))
    return loss.item()


def generator_update(m: Stage3Models, i: int) -> dict:
    """The DMD2 step of the generator between the real score (eq. 9) and the fake score of one expert, the one
    whose range holds the draw's sigma; the gradient reaches the generator that took the sampled step."""
    unit = dmd_expert(m, i, "gen")
    batch, first, x0_gen, g, made_by = generator_sample(m, i, "gen", grad=True)
    x_t, sigma, _ = noised(x0_gen.detach(), dmd_sigma(m, g, x0_gen.shape[0], unit), g, first)
    beta1, beta2 = m.mix.sample(g)
    # A forward through a unit's engine (`unit.fake(...)`) must be followed by that unit's backward: DeepSpeed
    # prepares it there (hooks on the outputs). The scores are targets only, never backpropagated, so they
    # are read through the wrapped module, under no_grad; ZeRO-3 still gathers its parameters (units.py).
    with torch.no_grad():
        v_real, v_fake = unit.fake.module(lambda a: teacher_scores(
            a, unit.lora_model, x_t.to(m.dtype), sigma.to(m.device), batch.cond, batch.null, unit.skip, beta1, beta2))
    x0_real, x0_fake = x0_from_velocity(x_t, v_real, sigma), x0_from_velocity(x_t, v_fake, sigma)
    loss = dmd_generator_loss(x0_gen, x0_real, x0_fake, batch.ti2v)
    made_by.generator.update(loss, batch.desc, learning_rate(m.cfg.stage3.lr, i, m.cfg.run.warmup))
    return {"gen_loss": loss.item(), "beta1": beta1, "beta2": beta2}


def train_one_step(m: Stage3Models, i: int) -> dict:
    fake_losses = [fake_update(m, i, k) for k in range(m.cfg.stage3.fake_updates)]
    return {**generator_update(m, i), "fake_loss": sum(fake_losses) / max(1, len(fake_losses))}


def run(cfg: Config, resume: bool = False) -> Path:
    """Trains Stage III (continuing the newest checkpoint with `resume`); returns the student's model.safetensors,
    or for a two-expert model the folder holding one folder per expert (high/, low/), each with its own."""
    s3 = cfg.validate().stage3
    check_stage_inputs(cfg, "stage3")
    experts = model_experts(cfg)
    if experts is not None:
        for name in EXPERTS:
            check_expert_plan(cfg, s3.plan, name, experts.boundary)
    with hold_run_dir(cfg.stage_dir("stage3")):
        m = build(cfg)
        steps = train(m.run, m.units(), partial(train_one_step, m), s3.iterations, resume)
        for unit in m.experts:  # each student physically pruned, for train.export
            save_student(m, unit, steps)
        m.run.dist.close()
        return m.run.dir / MODEL_FILE if experts is None else m.run.dir


def save_student(m: Stage3Models, unit: ExpertUnits, steps: int) -> None:
    """Writes one expert's student with its StageRecord (in run_dir/stage3, or its expert's folder there)."""
    cfg, s3 = m.cfg, m.cfg.stage3
    weights = unit.generator.full_state_dict()  # a collective under ZeRO-3: every rank gathers
    if not m.run.dist.is_main:
        return
    folder = m.run.dir if unit.name is None else m.run.dir / unit.name
    save_stage_output(folder, weights, StageRecord(
        "stage3", unit.plan, str(plan_path(cfg, s3.plan)), steps, m.sampling, data_fingerprint(cfg), cfg.to_dict(),
        alpha=None if s3.init == "teacher" else cfg.stage2.alpha, betas=(s3.beta1, s3.beta2),
        student_config=dict(unit.generator.module.model.config), expert=unit.name,
        sigma_range=unit.sigma_range if unit.name else None))
    m.run.print_on_main(f"wrote {folder / MODEL_FILE}")


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, argv, run)


if __name__ == "__main__":
    main()
