"""Models of a run: the teacher from its file, a stage's consolidated weights, and the plan.

A stage ends by writing `model.safetensors` (the whole model, diffusers layout) and `run.json` (stage,
plan, config, steps, data fingerprint) into its folder; the next stage and `train.export` read them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastlightgen.io_utils import atomic_path, atomic_write_text
from fastlightgen.plan import PrunePlan

from .config import Config

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"


def load_teacher(cfg: Config) -> nn.Module:
    """The diffusers model named by model.teacher, in fp32 train mode (DeepSpeed casts for bf16)."""
    path = Path(cfg.model.teacher)
    if not path.exists():
        raise FileNotFoundError(f"model.teacher {path} does not exist; set --set model.teacher=PATH")
    if cfg.model.family == "wan":
        if path.is_dir():
            from diffusers import WanTransformer3DModel
            model = WanTransformer3DModel.from_pretrained(str(path))
        else:
            from fastlightgen.checkpoint import load_wan
            model, _ = load_wan(path)
    else:  # hunyuanvideo (the config admits no other family)
        from diffusers import HunyuanVideoTransformer3DModel
        model = HunyuanVideoTransformer3DModel.from_pretrained(str(path))
    return model.float().train()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a stage's `model.safetensors` (must match the model exactly)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the previous stage first or set its path")
    weights = load_file(str(path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_stage_output(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> Path:
    out = folder / MODEL_FILE
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    atomic_write_text(folder / RUN_FILE, json.dumps(info, indent=1))
    return out


def read_run_info(folder: Path) -> dict:
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {RUN_FILE}: that stage has not finished")
    return json.loads(path.read_text())


def plan_path(cfg: Config, configured: str) -> Path:
    return Path(configured) if configured else cfg.stage_dir("stage1") / "plan.json"


def load_plan(cfg: Config, configured: str, model: nn.Module) -> PrunePlan:
    from fastlightgen.adapters import adapt

    path = plan_path(cfg, configured)
    if not path.is_file():
        raise FileNotFoundError(f"prune plan {path} does not exist; run `python -m train.stage1` first")
    plan = PrunePlan.load(path)
    plan.check(adapt(model).fingerprint())
    return plan
