"""Write models/loras/toy_teacher_demo_lora.safetensors: a LoRA made for the full toy teacher, for the
student-LoRA workflow.

Random rank-4 factors (seed 0) in ComfyUI form (`diffusion_model.blocks.N.<module>.lora_A/lora_B.weight`
and `.alpha`) on the self-attention and FFN Linears of all 12 blocks, scaled so each weight changes by 5%
of its Frobenius norm. It carries no style: it shows where the LoRA of each original block lands on the
8-block student and what the student's dropped blocks leave out.

    python scripts/make_toy_lora.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "models" / "fastlightgen" / "toy_teacher.safetensors"
OUT = REPO / "models" / "loras" / "toy_teacher_demo_lora.safetensors"
MODULES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2")
RANK, RELATIVE_CHANGE, SEED = 4, 0.05, 0


def main() -> int:
    weights = load_file(str(TEACHER))
    num_blocks = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    gen = torch.Generator().manual_seed(SEED)
    lora = {}
    for block in range(num_blocks):
        for module in MODULES:
            w = weights[f"blocks.{block}.{module}.weight"].float()
            up, down = torch.randn(w.shape[0], RANK, generator=gen), torch.randn(RANK, w.shape[1], generator=gen)
            scale = (RELATIVE_CHANGE * w.norm() / (up @ down).norm()).sqrt()  # alpha = rank: the delta is up @ down
            name = f"diffusion_model.blocks.{block}.{module}"
            lora[f"{name}.lora_B.weight"] = (scale * up).to(torch.bfloat16).contiguous()
            lora[f"{name}.lora_A.weight"] = (scale * down).to(torch.bfloat16).contiguous()
            lora[f"{name}.alpha"] = torch.tensor(float(RANK))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    about = {"made_for": TEACHER.name, "num_blocks": num_blocks, "rank": RANK, "seed": SEED,
             "what": "random demo LoRA: no style, for the student-LoRA workflow"}
    save_file(lora, str(OUT), metadata={"fastlightgen_demo": json.dumps(about)})
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size // 1024} KiB, {len(lora)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
