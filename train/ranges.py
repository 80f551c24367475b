"""The valid range of every training setting that has one, checked by `Config.validate` when a config is read
and again by every entry point's `run`, before anything loads: a bad value is named with its range and a
fix, never met minutes into a run as a traceback, an empty run, or a NaN blamed on a batch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from fastlightgen.experts import EXPERTS
from fastlightgen.flow import NUM_TRAIN_TIMESTEPS, denoising_list_problem


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Range:
    text: str  # how the error states the range
    ok: Callable[[Any], bool]


def at_least(low: int) -> Range:
    return Range(f"an integer >= {low}", lambda v: is_int(v) and v >= low)


def between(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Range:
    text = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Range(text, lambda v: is_finite(v) and (v > low if open_low else v >= low)
                 and (v < high if open_high else v <= high))


def is_timesteps(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(t) for t in v) and denoising_list_problem(v) is None


POSITIVE = Range("a finite number > 0", lambda v: is_finite(v) and v > 0)
# AdamW moves each weight by about lr a step: more than 1 cannot train, and near 1e38 its step size overflows
LEARNING_RATE = Range("a number in (0, 1]", between(0, 1, open_low=True).ok)
NON_NEGATIVE = Range("a finite number >= 0", lambda v: is_finite(v) and v >= 0)
FINITE = Range("a finite number", is_finite)
PROBABILITY = between(0, 1)
TIMESTEPS = Range(f"a non-empty list of integer timesteps in [1, {NUM_TRAIN_TIMESTEPS}], strictly decreasing "
                  "(the first is the noisiest)", is_timesteps)
SIGMA_RANGE = Range("two numbers [low, high] with 0 <= low < high <= 1",
                    lambda v: isinstance(v, list) and len(v) == 2 and all(is_finite(x) for x in v)
                    and 0 <= v[0] < v[1] <= 1)
BLOCK_INDICES = Range("a list of block indices (integers >= 0)",
                      lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v))
EXPERT_KEEP_RATIOS = Range(f"a mapping of experts ({', '.join(EXPERTS)}) to keep ratios in (0, 1], e.g. "
                           "{high: 0.6, low: 0.8} (empty: stage1.keep_ratio for both)",
                           lambda v: isinstance(v, dict) and all(k in EXPERTS and between(0, 1, open_low=True).ok(x)
                                                                 for k, x in v.items()))
CFG_SCALES = Range("a non-empty list of finite numbers > 0",
                   lambda v: isinstance(v, list) and len(v) > 0 and all(POSITIVE.ok(x) for x in v))

RANGES: dict[str, Range] = {
    "model.boundary": Range("a sigma in (0, 1), or 0 for the boundary_ratio of model.path/model_index.json",
                            between(0, 1, open_high=True).ok),
    "data.batch_size": at_least(1),
    "data.caption_dropout": PROBABILITY,
    "data.first_frame_dropout": PROBABILITY,
    # the DeepSpeed units are built for ZeRO-3: its gathering of the adapters' direct parameter reads, and
    # its gradient and weight partitions that the non-finite guard checks and clears
    "dist.zero_stage": Range("3", lambda v: v == 3 and is_int(v)),
    "dist.world_size": at_least(1),
    "dist.sequence_parallel": at_least(1),
    "dist.param_persistence_threshold": at_least(0),
    "dist.prefetch_bucket_size": at_least(0),
    "dist.grad_clip": Range("a finite number >= 0 (0: no clipping)", NON_NEGATIVE.ok),
    "run.seed": at_least(0),
    "run.save_every": at_least(1),
    "run.keep_checkpoints": at_least(1),
    "run.log_every": at_least(1),
    "run.max_bad_steps": at_least(1),
    "run.warmup": at_least(0),
    "stage1.samples": at_least(1),
    "stage1.timesteps": at_least(1),
    "stage1.keep_ratio": between(0, 1, open_low=True),
    "stage1.protected": BLOCK_INDICES,
    "stage1.expert_keep_ratios": EXPERT_KEEP_RATIOS,
    "stage2.lr": LEARNING_RATE,
    "stage2.iterations": at_least(1),
    "stage2.alpha": PROBABILITY,
    "stage2.skip_prob": PROBABILITY,
    "stage2.target_ema_decay": between(0, 1, open_high=True),
    "stage2.weight_decay": NON_NEGATIVE,
    "stage2.sigma_shift": POSITIVE,
    "stage3.lr": LEARNING_RATE,
    "stage3.fake_lr": LEARNING_RATE,
    "stage3.iterations": at_least(1),
    "stage3.beta1": FINITE,
    "stage3.beta2": FINITE,
    "stage3.beta1_below": FINITE,
    "stage3.beta1_above": FINITE,
    "stage3.beta2_jitter": NON_NEGATIVE,
    "stage3.fake_updates": at_least(0),
    "stage3.lora_rank": at_least(1),
    "stage3.lora_alpha": POSITIVE,
    "stage3.denoising_step_list": TIMESTEPS,
    "stage3.shift": POSITIVE,
    "stage3.dmd_sigma_range": SIGMA_RANGE,
    "preprocess.frames": at_least(1),
    "preprocess.height": at_least(1),
    "preprocess.width": at_least(1),
    "preprocess.frame_stride": at_least(1),
    "preprocess.fps": Range("a finite number >= 0 (0: preprocess.frame_stride decides)", NON_NEGATIVE.ok),
    "preprocess.shard_size": at_least(1),
    "preprocess.toy_samples": at_least(1),
    "toy_teacher.iterations": at_least(1),
    "toy_teacher.lr": LEARNING_RATE,
    "toy_teacher.lr_cycle": NON_NEGATIVE,
    "toy_teacher.weight_decay": NON_NEGATIVE,
    "toy_teacher.sigma_shift": POSITIVE,
    "toy_teacher.ema_decay": between(0, 1, open_high=True),
    "toy_teacher.cfg_candidates": CFG_SCALES,
    "toy_teacher.boundary": Range("a sigma in (0, 1) with toy_teacher.expert, else 0", between(0, 1, open_high=True).ok),
}


def problems(cfg: Any) -> list[str]:
    """Every out-of-range setting of `cfg` (a train.config.Config), each with its range and a fix."""
    out = []
    for section in fields(cfg):  # the one_of settings, for a config changed in code after it was read
        for setting in fields(getattr(cfg, section.name)):
            choices, value = setting.metadata.get("choices"), getattr(getattr(cfg, section.name), setting.name)
            if choices and value not in choices:
                out.append(f"{section.name}.{setting.name} must be one of {', '.join(choices)}, got {value!r}")
    for name, rule in RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not rule.ok(value):
            default = getattr(type(getattr(cfg, section))(), key)
            out.append(f"{name} must be {rule.text}, got {value!r} (the default: --set {name}={json.dumps(default)})")
    if cfg.dist.bf16 and not cfg.dist.deepspeed:
        out.append("dist.bf16 needs dist.deepspeed (the plain loop trains in fp32): "
                   "--set dist.deepspeed=true, or --set dist.bf16=false")
    if cfg.dist.sequence_parallel > 1 and not cfg.dist.deepspeed:
        out.append("dist.sequence_parallel > 1 needs dist.deepspeed (its groups are processes): "
                   "--set dist.deepspeed=true, or --set dist.sequence_parallel=1")
    if cfg.dist.world_size % cfg.dist.sequence_parallel:
        out.append(f"dist.sequence_parallel ({cfg.dist.sequence_parallel}) must divide dist.world_size "
                   f"({cfg.dist.world_size}): each group of that many ranks shares one sample")
    if bool(cfg.toy_teacher.expert) != bool(cfg.toy_teacher.boundary):
        out.append("toy_teacher.expert and toy_teacher.boundary go together (an expert's part of the schedule is "
                   "split at the boundary): set both, e.g. --set toy_teacher.expert=high --set toy_teacher.boundary="
                   "0.875, or neither")
    if cfg.toy_teacher.expert and not cfg.toy_teacher.init:
        out.append("toy_teacher.expert fine-tunes a trained teacher into one expert: set toy_teacher.init to its file")
    if cfg.stage2.target == "ema" and cfg.dist.deepspeed:
        out.append("stage2.target=ema needs the plain loop (ZeRO-3 partitions the weights to average): "
                   "--set stage2.target=frozen, or --set dist.deepspeed=false")
    return out
