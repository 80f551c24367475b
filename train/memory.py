"""`--dry-run`: per-GPU memory of a config under ZeRO-3 at its planned world size, without loading weights.

The architecture comes from model.arch, else from the teacher's config.json (a diffusers folder) or its
safetensors header (a file); the model is built once, on the meta device. ZeRO-3 splits parameters,
gradients and optimizer states evenly over the W ranks. Per GPU:
  parameters  (every model the stage holds) * bytes / W
  gradients   (trainable parameters) * bytes / W
  optimizer   (trainable parameters) * 12 / W   (fp32 master copy + AdamW's two moments; on the CPU
              when dist.offload_optimizer is set)
  gathered    the largest block, whole, twice (the one running and the one prefetched)
Activations are not counted (gradient checkpointing keeps them at about one block's).
Stage III holds the student (the kept blocks, trainable), the frozen teacher and the fake score's LoRA,
which sits on the kept blocks (on every block with stage3.plan_teacher=unpruned).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .models import model_class, teacher_config

GIB = 1024 ** 3


@dataclass
class ParamCounts:
    total: int
    per_block: list[int]
    lora_per_block: list[int]  # the fake score's LoRA at stage3.lora_rank, were it on that block

    @property
    def outside_blocks(self) -> int:
        return self.total - sum(self.per_block)


def meta_model(cfg: Config) -> nn.Module:
    """The config's model on the meta device: no weight is read or allocated."""
    config = cfg.model.arch or teacher_config(cfg)
    with torch.device("meta"):
        return model_class(cfg.model.family).from_config(config)


def count_params(cfg: Config) -> ParamCounts:
    from fastlightgen.adapters import adapt
    from fastlightgen.lora import add_lora

    model = meta_model(cfg)
    blocks = adapt(model).blocks()
    total = sum(p.numel() for p in model.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    # counted after the base parameters: the LoRA layers are added to this throwaway meta model
    lora = [sum(layer.lora_down.weight.numel() + layer.lora_up.weight.numel()
                for layer in add_lora([b], cfg.stage3.lora_rank, cfg.stage3.lora_alpha)) for b in blocks]
    return ParamCounts(total, per_block, lora)


def estimate(cfg: Config, counts: ParamCounts | None = None) -> dict[str, dict[str, float]]:
    counts = counts or count_params(cfg)
    w = max(1, cfg.dist.world_size) if cfg.dist.deepspeed else 1
    offload = cfg.dist.deepspeed and cfg.dist.offload_optimizer
    b = 2 if cfg.dist.bf16 else 4
    n = len(counts.per_block)
    kept = max(1, round(cfg.stage1.keep_ratio * n))
    # the plan is not known before Stage I: count the largest blocks (an upper bound for uneven blocks)
    student = counts.outside_blocks + sum(sorted(counts.per_block)[-kept:])
    lora_blocks = kept if cfg.stage3.plan_teacher == "pruned" else n
    lora = sum(sorted(counts.lora_per_block)[-lora_blocks:])
    gathered = 2 * max(counts.per_block) * b / GIB if cfg.dist.deepspeed else 0.0

    def stage(held: int, trainable: int) -> dict[str, float]:
        row = {"parameters": held * b / w / GIB, "gradients": trainable * b / w / GIB,
               "optimizer": trainable * 12 / w / GIB, "gathered": gathered}
        on_gpu = ["parameters", "gradients", "gathered"] + ([] if offload else ["optimizer"])
        row["gpu_total"] = sum(row[k] for k in on_gpu)
        return row

    return {"stage1": {"parameters": counts.total * b / GIB, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0,
                       "gpu_total": counts.total * b / GIB},
            "stage2": stage(counts.total, counts.total),
            "stage3": stage(counts.total + student + lora, student + lora)}


def report(cfg: Config) -> str:
    counts = count_params(cfg)
    rows = estimate(cfg, counts)
    d = cfg.dist
    where = "CPU (offloaded)" if d.deepspeed and d.offload_optimizer else "GPU"
    setup = f"world size {d.world_size}, {'bf16' if d.bf16 else 'fp32'}, ZeRO-{d.zero_stage}" if d.deepspeed \
        else "one plain process (no DeepSpeed: nothing sharded), fp32"
    lines = [f"{cfg.model.family}: {counts.total / 1e9:.3f} B parameters in {len(counts.per_block)} blocks; "
             f"{setup}, optimizer states on {where}; Stage III student keeps {cfg.stage1.keep_ratio:.0%} of the blocks",
             f"{'GiB per GPU':<8} | {'parameters':>10} | {'gradients':>9} | {'optimizer':>9} | {'gathered':>8} | "
             f"{'GPU total':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<11} | {r['parameters']:>10.2f} | {r['gradients']:>9.2f} | {r['optimizer']:>9.2f} | "
                     f"{r['gathered']:>8.2f} | {r['gpu_total']:>9.2f}")
    lines.append("(stage1 runs unsharded on one GPU; activations are not included)")
    return "\n".join(lines)
