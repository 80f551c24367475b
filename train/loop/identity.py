"""What a checkpoint must agree with to be resumed (`run_identity`), its digest and a readable difference.

Kept apart from the settings (train/config.py) because it reads the stage's input files (train/models/loading.py names
them), and the settings are what every module imports.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.fingerprint import file_digest, json_digest
from ..models.loading import expert_count, model_experts, stage_inputs, teacher_path


def run_identity(cfg: Config, stage: str, world_size: int, whole_run: bool = False) -> dict:
    """What a checkpoint must agree with to be resumed: every setting that changes the result and the
    contents of the files the stage reads ("<setting> (contents)": teacher, shards, plan, Stage II weights)
    in place of their paths, so a run whose inputs were copied elsewhere (per-job scratch) resumes and one
    whose inputs changed at the same path does not; but not logging, checkpointing, speed or memory settings,
    nor the length of the run unless its learning-rate schedule depends on it (a cosine decay extended mid-run
    would jump back up), nor export settings. With `whole_run`, the length too: what a finished run's result depends on."""
    section = _identity_settings(getattr(cfg, stage))
    if not whole_run and (section.get("lr_decay", "constant") == "constant" or section.get("lr_cycle", 0) > 0):
        section.pop("iterations", None)
    if stage == "stage2" and section["target"] != "ema":  # the decay is read only by the EMA target
        section.pop("target_ema_decay")
    if stage in ("stage2", "toy_teacher"):  # init named by contents only: runs without one keep their key
        section.pop("init")
    for setting, (path, _) in stage_inputs(cfg, stage).items():
        name = setting.split(".")[1]
        section.pop(name, None)
        section[f"{name} (contents)"] = (json_digest if name == "plan" else file_digest)(path)
    try:
        teacher = file_digest(teacher_path(cfg))
    except FileNotFoundError:  # toy_teacher reads none; the other stages refuse to start without one
        teacher = None
    model = {k: v for k, v in _identity_settings(cfg.model).items()
             if k not in ("arch", "gradient_checkpointing", "path", "teacher", "teacher_2")}
    if expert_count(cfg) == 2:  # the low-noise expert by contents like the teacher, and the boundary in use
        try:
            experts = model_experts(cfg)
            model.update({"teacher_2 (contents)": file_digest(experts.low), "boundary": experts.boundary})
        except (FileNotFoundError, ValueError):  # the stages refuse to start without them
            model["teacher_2 (contents)"] = None
    data = {k: v for k, v in asdict(cfg.data).items() if k != "shards"}
    if cfg.data.source == "shards":  # the index holds every shard's content digest (train.preprocess)
        data["shards (contents)"] = json_digest(Path(cfg.data.shards) / "index.json")
    run = {k: v for k, v in asdict(cfg.run).items() if k in ("seed", "warmup")}
    dist = {k: v for k, v in asdict(cfg.dist).items() if k in ("deepspeed", "zero_stage", "cpu_adam", "bf16",
                                                               "grad_clip")}
    if cfg.dist.sequence_parallel > 1:  # which rank draws which sample; absent at 1, as before it existed
        dist["sequence_parallel"] = cfg.dist.sequence_parallel
    return {"stage": stage, "world_size": world_size, "model": {**model, "teacher (contents)": teacher},
            "data": data, "run": run, "dist": dist, stage: section}


def _identity_settings(section: Any) -> dict:
    """A section's settings as `run_identity` counts them: without those it leaves out (export settings, and
    added settings at their default)."""
    out = asdict(section)
    for f in fields(section):
        rule = f.metadata.get("identity", True)
        if rule is False or (rule == "unless_default" and out[f.name] == getattr(type(section)(), f.name)):
            out.pop(f.name)
    return out


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identities, e.g. ['stage2.lr: 1e-05 != 2e-05']."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out
