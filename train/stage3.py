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
One iteration = stage3.fake_updates fake-score updates (flow matching on detached generator samples,
TTUR) + one generator update (DMD2 loss). The generator's sample at a random step of the list is reached
by backward simulation: the earlier steps run without gradients, as at inference.
Writes run_dir/stage3/model.safetensors (the student) for `train.export`.
"""
from __future__ import annotations

import torch

from fastlightgen.adapters import adapt
from fastlightgen.distill import (
    backward_simulation,
    dmd_generator_loss,
    fake_velocity,
    mse,
    noised,
    student_x0,
    teacher_scores,
)
from fastlightgen.flow import shift_sigma, velocity_target, x0_from_velocity
from fastlightgen.guidance import TeacherMix
from fastlightgen.lora import add_lora, lora_enabled, lora_parameters
from fastlightgen.sampling import FewStepSampling

from .cli import dry_run, parse
from .data import batch_source, data_fingerprint
from .dist import init_dist, step_generator
from .loop import Run, learning_rate, train
from .models import MODEL_FILE, load_plan, load_teacher, load_weights, plan_path, save_stage_output
from .units import AdapterModule, compute_dtype, make_unit


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv)
    if args.dry_run:
        return dry_run(cfg)
    s3 = cfg.stage3
    dist = init_dist(cfg)

    # models: generator = pruned copy; teacher = frozen Stage II weights + fake-score LoRA
    teacher = load_teacher(cfg)
    if s3.init != "teacher":
        teacher = load_weights(teacher, s3.init or cfg.stage_dir("stage2") / MODEL_FILE)
    plan = load_plan(cfg, s3.plan, teacher)
    student = adapt(teacher).pruned_model(plan.kept).train()
    teacher.requires_grad_(False)
    skip = plan.skip if s3.plan_teacher == "pruned" else frozenset()
    lora_blocks = [b for i, b in enumerate(adapt(teacher).blocks()) if i not in skip]
    # seeded: a resumed or multi-rank run must start every rank from the same LoRA
    add_lora(lora_blocks, s3.lora_rank, s3.lora_alpha, step_generator(cfg.run.seed, "lora-init", 0, None))
    for p in lora_parameters(teacher):
        p.requires_grad_(True)
    ckpt = cfg.model.gradient_checkpointing
    generator = make_unit("generator", AdapterModule(student, ckpt), cfg, dist, s3.lr)
    fake = make_unit("fake", AdapterModule(teacher, ckpt), cfg, dist, s3.fake_lr)
    lora_model = fake.module.model

    # the recipe's constants
    dtype = compute_dtype(cfg)
    mix = TeacherMix(s3.beta1, s3.beta2, s3.beta1_below, s3.beta1_above, s3.beta2_jitter)
    sigmas = FewStepSampling(tuple(s3.denoising_step_list), s3.shift).sigmas.tolist()
    draw_batch = batch_source(cfg)
    run = Run(cfg, "stage3", dist)

    def student_velocity(cond):
        return lambda x, sigma: generator(lambda a: a.forward(x.to(dtype), sigma.to(dist.device), cond))

    def generator_sample(i: int, stream: str, grad: bool):
        """(batch, first frame, x0 of the generator at a random step of the list, reached by backward simulation)."""
        g = run.generator(i, stream)
        batch = draw_batch(g, cfg.data.batch_size).to(dist.device, dtype)
        student_v = student_velocity(batch.cond)
        first = batch.x0[:, :, :1].float() if cfg.model.ti2v else None
        stop = int(torch.randint(0, len(sigmas) - 1, (1,), generator=run.generator(i, stream, shared=True)))
        noise = torch.randn(batch.x0.shape, generator=g).to(dist.device)
        x = backward_simulation(student_v, noise, sigmas, stop, g, first)
        with torch.set_grad_enabled(grad):
            x0 = student_x0(student_v, x, sigmas[stop], first)
        return batch, first, x0, g

    def dmd_sigma(g: torch.Generator, n: int) -> torch.Tensor:
        lo, hi = s3.dmd_sigma_range
        return shift_sigma(lo + (hi - lo) * torch.rand(n, generator=g), s3.shift)

    def fake_update(i: int, k: int) -> float:
        batch, first, x0, g = generator_sample(i, f"fake{k}", grad=False)
        x_t, sigma, noise = noised(x0, dmd_sigma(g, x0.shape[0]), g, first)
        with lora_enabled(lora_model, True):  # backward recomputes checkpointed blocks: keep the LoRA on
            v = fake(lambda a: fake_velocity(a, lora_model, x_t.to(dtype), sigma.to(dist.device), batch.cond, skip))
            loss = mse(v, velocity_target(x0, noise), cfg.model.ti2v)
            fake.update(loss, batch.desc, learning_rate(s3.fake_lr, i, cfg.run.warmup))
        return loss.item()

    def generator_update(i: int) -> dict:
        batch, first, x0_gen, g = generator_sample(i, "gen", grad=True)
        x_t, sigma, _ = noised(x0_gen.detach(), dmd_sigma(g, x0_gen.shape[0]), g, first)
        beta1, beta2 = mix.sample(g)
        with torch.no_grad():
            v_real, v_fake = fake.module(lambda a: teacher_scores(a, lora_model, x_t.to(dtype), sigma.to(dist.device),
                                                                  batch.cond, batch.null, skip, beta1, beta2))
        x0_real, x0_fake = x0_from_velocity(x_t, v_real, sigma), x0_from_velocity(x_t, v_fake, sigma)
        loss = dmd_generator_loss(x0_gen, x0_real, x0_fake, cfg.model.ti2v)
        generator.update(loss, batch.desc, learning_rate(s3.lr, i, cfg.run.warmup))
        return {"gen_loss": loss.item(), "beta1": beta1, "beta2": beta2}

    def step(i: int) -> dict:
        fake_losses = [fake_update(i, k) for k in range(s3.fake_updates)]
        return {**generator_update(i), "fake_loss": sum(fake_losses) / max(1, len(fake_losses))}

    steps = train(run, [generator, fake], step, s3.iterations, args.resume)

    # output: the student, physically pruned, for train.export
    weights = generator.full_state_dict()
    if dist.is_main:
        out = save_stage_output(run.dir, weights, {
            "stage": "stage3", "plan": plan.to_dict(), "plan_path": str(plan_path(cfg, s3.plan)), "steps": steps,
            "alpha": None if s3.init == "teacher" else cfg.stage2.alpha, "beta1": s3.beta1, "beta2": s3.beta2,
            "plan_teacher": s3.plan_teacher, "denoising_step_list": s3.denoising_step_list,
            "shift": s3.shift, "student_config": dict(student.config), "data": data_fingerprint(cfg),
            "config": cfg.to_dict()})
        run.say(f"wrote {out}")
    dist.close()


if __name__ == "__main__":
    main()
