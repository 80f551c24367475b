"""`python -m train.toy_teacher -c configs/toy_teacher.yaml`: the toy world's Wan 2.2-style teacher, from scratch
(or, with toy_teacher.init, continued from an exported teacher under other settings).

Recipe (the `toy_teacher` section, with data, run and dist): flow matching in the project's convention
(fastlightgen.flow) with sigmas drawn where the teacher's sampler (50-step Euler, shift 5) evaluates it:
uniform, then the shift warp (research/README.md, "The toy teacher", says why). TI2V when model.ti2v
(the first latent frame is given clean at sigma 0 and carries no loss) and T2V in data.first_frame_dropout of
the batches, data.caption_dropout for CFG, AdamW with run.warmup (then toy_teacher.lr_decay; both restart every
toy_teacher.lr_cycle steps when it is set), and an EMA of the weights that becomes the exported teacher. With
toy_teacher.expert (and toy_teacher.boundary) a copy of an exported teacher (toy_teacher.init) becomes one expert of
a two-expert teacher: its sigmas are drawn by the same law on that expert's part of the schedule only, and the file
names the expert and the boundary (issue #41; scripts/train_toy_experts.sh). The
shared loop (train.loop.run) seeds every batch and noise draw by (run.seed, step), checkpoints the weights, AdamW and
the EMA, resumes (--resume), logs and skips non-finite losses, as for every stage.
Export, at the end or from the newest checkpoint (--export-only): the EMA in bf16, with the CFG scale whose
50-step samples of training prompts (never held-out ones; TI2V and T2V) score the best `faithful` as the
recommended one, and a provenance holding the whole config.
API: `run(cfg, resume, export_only)`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import CheckpointMeta, load_wan, save_checkpoint
from fastlightgen.distill import mse
from fastlightgen.experts import sigma_range
from fastlightgen.first_frame import given_frame, noised
from fastlightgen.flow import sample_training_sigma, velocity_target
from fastlightgen.sampling import Sampling
from fastlightgen.toy.evaluate import evaluate_batch
from fastlightgen.toy.generate import generate_teacher
from fastlightgen.toy.prompts import split_prompts
from fastlightgen.toy.teacher import TOY_TEACHER, ToyTeacherShape, build_toy_teacher

from .cli import parse
from .config import Config
from .data.batches import batch_source, data_fingerprint
from .distributed.processes import init_dist
from .loop.run import Run, learning_rate, log_path, train
from .models.loading import check_stage_inputs
from .loop.state import hold_run_dir
from .models.units import EMA, AdapterModule, make_trainable

STAGE = "toy_teacher"
TRAINER = "train.toy_teacher"


def teacher_shape(cfg: Config) -> ToyTeacherShape:
    shape = cfg.toy_teacher.shape
    valid = [f.name for f in dataclasses.fields(ToyTeacherShape)]
    if not isinstance(shape, dict) or set(shape) - set(valid):
        raise SystemExit(f"toy_teacher.shape takes a mapping of {', '.join(valid)}; got {shape!r}")
    return dataclasses.replace(TOY_TEACHER, **shape)


def initial_teacher(cfg: Config) -> torch.nn.Module:
    """Fresh weights seeded by run.seed, or those of toy_teacher.init, which must have the configured shape."""
    shape = teacher_shape(cfg)
    if not cfg.toy_teacher.init:
        return build_toy_teacher(shape, seed=cfg.run.seed)
    model, _ = load_wan(cfg.toy_teacher.init)
    found = {f.name: model.config[f.name] for f in dataclasses.fields(shape)}
    if found != dataclasses.asdict(shape):
        raise SystemExit(f"toy_teacher.init {cfg.toy_teacher.init} holds a teacher of shape {found}, not the "
                         f"configured {dataclasses.asdict(shape)}: set toy_teacher.shape to the file's, or give "
                         "another file")
    return model.float()


def training_range(cfg: Config) -> tuple[float, float]:
    """The part of the schedule the teacher is trained on: its expert's (toy_teacher.expert), or all of it."""
    tt = cfg.toy_teacher
    return sigma_range(tt.expert, tt.boundary) if tt.expert else (0.0, 1.0)


def output_path(cfg: Config) -> Path:
    return Path(cfg.toy_teacher.out) if cfg.toy_teacher.out else Path(cfg.run.run_dir) / "toy_teacher.safetensors"


def recent_loss(run: Run, last: int = 50) -> float | None:
    """Mean loss of the last `last` logged steps: the final loss, less noisy than one batch's."""
    path = log_path(run)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    losses = [r["loss"] for r in records if "loss" in r][-last:]
    return sum(losses) / len(losses) if losses else None


def select_cfg(cfg: Config, model: torch.nn.Module) -> tuple[float, dict[float, float]]:
    """(best CFG scale, `faithful` score per candidate) on every third training combination in TI2V and in T2V,
    seed run.seed."""
    prompt_sets = [split_prompts("train", 1, cfg.run.seed, stride=3, t2v=t2v) for t2v in (False, True)]
    adapter = adapt(model)
    scores = {}
    for scale in map(float, cfg.toy_teacher.cfg_candidates):
        rows = []
        for prompts in prompt_sets:
            videos = generate_teacher(adapter, prompts, cfg.run.seed, Sampling(cfg_scale=scale))
            rows += evaluate_batch(videos, list(prompts.factors), t2v=prompts.t2v).rows
        scores[scale] = sum(r["faithful"] for r in rows) / len(rows)
        print(f"CFG {scale:g}: faithful {scores[scale]:.3f} on {len(rows)} training prompts (TI2V and T2V)", flush=True)
    return max(scores, key=scores.get), scores


def recommended_cfg(cfg: Config, model: torch.nn.Module) -> tuple[float, dict[float, float]]:
    """(CFG scale, `faithful` per candidate): select_cfg's, or for an expert its init's scale with no candidates
    scored, since one expert alone samples the whole schedule with weights trained on part of it, and the pair
    of experts is sampled at one scale."""
    if not cfg.toy_teacher.expert:
        return select_cfg(cfg, model)
    _, meta = load_wan(cfg.toy_teacher.init)
    return meta.recommended.cfg_scale, {}


def export(cfg: Config, run: Run, model: torch.nn.Module, step: int) -> Path:
    model = model.cpu()  # the toy world's samplers draw their noise on the CPU
    scale, scores = recommended_cfg(cfg, model)
    blocks = model.config.num_layers
    tt = cfg.toy_teacher
    meta = CheckpointMeta(original_num_blocks=blocks, kept_blocks=list(range(blocks)),
                          head_dim=model.config.attention_head_dim, recommended=Sampling(cfg_scale=scale),
                          expert=tt.expert or None, boundary=tt.boundary if tt.expert else None,
                          provenance={"trainer": TRAINER, "config": cfg.to_dict(), "step": step,
                                      "final_loss": recent_loss(run), "weights": "EMA", "data": data_fingerprint(cfg),
                                      "cfg_selection": {f"{k:g}": round(v, 4) for k, v in scores.items()}})
    return save_checkpoint(output_path(cfg), model, meta, dtype=torch.bfloat16)


def run(cfg: Config, resume: bool = False, export_only: bool = False) -> Path:
    """Trains the teacher (continuing the newest checkpoint with `resume`) and exports it, or with
    `export_only` exports the newest checkpoint; returns the exported file."""
    cfg.validate()
    # the inputs are checked before a run folder is made: a wrong one leaves nothing to clean up
    try:
        check_stage_inputs(cfg, STAGE)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    model = initial_teacher(cfg)
    with hold_run_dir(cfg.stage_dir(STAGE)):
        return train_and_export(cfg, model, resume, export_only)


def train_and_export(cfg: Config, model: torch.nn.Module, resume: bool, export_only: bool) -> Path:
    tt = cfg.toy_teacher
    # models: the teacher (fresh, or toy_teacher.init's), trained in place, and the EMA of its weights
    dist = init_dist(cfg)
    model.train()
    module = AdapterModule(model, cfg.model.gradient_checkpointing, dist.shards)
    unit = make_trainable("model", module, cfg, dist, tt.lr, tt.weight_decay)
    ema = EMA("ema", unit, tt.ema_decay)
    training = Run(cfg, STAGE, dist)

    if export_only:
        steps, _ = training.resume([unit, ema])
        if not steps:
            raise SystemExit(f"{training.dir} holds no checkpoint to export")
    else:
        draw_batch = batch_source(cfg)

        def step(i: int) -> dict:
            g = training.generator(i, "batch")
            batch = draw_batch(g, cfg.data.batch_size)
            x0 = batch.x0
            sigma = sample_training_sigma(x0.shape[0], g, tt.sigma_shift, tt.sigma_law, within=training_range(cfg))
            x_t, sigma, noise = noised(x0, sigma, g, given_frame(x0, batch.ti2v))
            cond = batch.to(dist.device, torch.float32).cond
            x_t, sigma = x_t.to(dist.device), sigma.to(dist.device)
            target = velocity_target(x0, noise).to(dist.device)
            loss = unit(lambda a: mse(a.forward(x_t, sigma, cond), target, batch.ti2v))
            unit.update(loss, batch.desc, learning_rate(tt.lr, i, cfg.run.warmup, tt.lr_decay, tt.iterations,
                                                         tt.lr_cycle))
            ema.update(i)
            return {"loss": loss.item()}

        steps = train(training, [unit, ema], step, tt.iterations, resume)

    out = export(cfg, training, ema.model, steps)
    training.print_on_main(f"wrote {out}")
    dist.close()
    return out


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(__doc__, argv, flags=[("--export-only", "export the EMA of the newest checkpoint; no training")])
    if args.dry_run:
        n = sum(p.numel() for p in build_toy_teacher(teacher_shape(cfg)).parameters())
        print(f"toy teacher: {n / 1e6:.1f} M parameters; the plain fp32 loop holds {n * 20 / 2 ** 30:.2f} GiB of "
              "weights, gradients, AdamW moments and EMA (activations not included)")
        return
    run(cfg, args.resume, args.export_only)


if __name__ == "__main__":
    main()
