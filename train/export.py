"""`python -m train.export`: a finished stage -> the FastLightGen checkpoint format (and optionally diffusers).

From run_dir/stage3 (default): the few-step student, already physically pruned. From run_dir/stage2: the
pruned path of the dynamically pruned model, physically pruned here (a multi-step model: recommended
Euler with CFG). The file is `fastlightgen.checkpoint` format: original/ComfyUI Wan key layout, kept blocks
renumbered 0..K-1, metadata with the kept original indices, the recommended denoising list and shift,
and provenance (betas, alpha, iterations, data fingerprint). `export.diffusers_out` also writes a
diffusers folder (the only output for HunyuanVideo, which the checkpoint format does not cover).
API: `run(cfg)`; the model itself: `train.models.student_model`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling

from .cli import parse
from .config import Config
from .models import read_run_info, student_model


def metadata(model: torch.nn.Module, info: dict) -> CheckpointMeta:
    plan = PrunePlan.from_dict(info["plan"])
    if info["stage"] == "stage3":
        recommended = Sampling.few_step(info["denoising_step_list"], info["shift"])
    else:
        recommended = Sampling()
    provenance = {"trainer": f"train.{info['stage']}", "iterations": info["steps"], "alpha": info["alpha"],
                  "betas": [info.get("beta1"), info.get("beta2")], "data": info["data"],
                  "plan_method": plan.method, "keep_ratio": plan.keep_ratio}
    return CheckpointMeta(original_num_blocks=plan.fingerprint.num_blocks, kept_blocks=plan.kept,
                          family=plan.fingerprint.family, head_dim=model.config.attention_head_dim,
                          recommended=recommended, provenance=provenance)


def run(cfg: Config) -> Path:
    """Exports the run export.run (default run_dir/stage3); returns the checkpoint, or the diffusers folder
    when the family has no checkpoint format."""
    ex = cfg.validate().export
    folder = Path(ex.run) if ex.run else cfg.stage_dir("stage3")
    info = read_run_info(folder)
    model = student_model(cfg, folder, info)
    meta = metadata(model, info)
    dtype = getattr(torch, ex.dtype)

    out = None
    if meta.family == "wan":
        out = Path(ex.out) if ex.out else Path(cfg.run.run_dir) / "student.safetensors"
        save_checkpoint(out, model, meta, dtype=dtype)
        print(f"wrote {out}: {len(meta.kept_blocks)} of {meta.original_num_blocks} blocks, "
              f"kept {meta.kept_blocks}, recommended {meta.recommended}")
    elif not ex.diffusers_out:
        raise SystemExit(f"the FastLightGen checkpoint format holds Wan models; for {meta.family} set "
                         "--set export.diffusers_out=FOLDER")
    if ex.diffusers_out:
        model.to(dtype).save_pretrained(ex.diffusers_out, safe_serialization=True)
        meta_json = json.dumps(json.loads(meta.to_json()), indent=1)
        atomic_write_text(Path(ex.diffusers_out) / "fastlightgen.json", meta_json)
        print(f"wrote diffusers folder {ex.diffusers_out}")
    return out or Path(ex.diffusers_out)


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse(__doc__, argv, training=False)
    run(cfg)


if __name__ == "__main__":
    main()
