"""A Hugging Face diffusers model folder as downloaded: its transformer's weights and a two-expert pipeline's parts.

A transformer folder (e.g. `transformer/`) holds `config.json` and its weights: one
`diffusion_pytorch_model.safetensors`, or shards named by `diffusion_pytorch_model.safetensors.index.json`
(save_pretrained's max_shard_size). A two-expert pipeline (Wan 2.2 A14B, Wan-AI/Wan2.2-*-A14B-Diffusers) keeps
the high-noise expert in `transformer/`, the low-noise one in `transformer_2/` and the boundary in
`model_index.json`'s `boundary_ratio`. Everything here is checked from file names and JSON before any weight is
read; `checkpoint.read_folder` reads a transformer folder as a checkpoint file is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .experts import check_boundary
from .stored import StoredTensor, stored_tensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_CONFIG = "model_index.json"
EXPERT_PARTS = {"high": "transformer", "low": "transformer_2"}
BOUNDARY_KEY = "boundary_ratio"  # model_index.json's boundary sigma (diffusers' WanPipeline)


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a transformer folder's weights: its one file, or the shards its index names.
    A missing one is named with the fix, before any is read."""
    folder = Path(folder)
    index = folder / f"{WEIGHTS}.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {missing[0]} ({len(missing)} of its {len(names)} weight files "
                                f"missing): a diffusers folder holds safetensors weights ({WEIGHTS} or the shards "
                                "its .index.json names); download the missing files")
    return [folder / name for name in names]


def folder_tensors(folder: str | Path) -> dict[str, StoredTensor]:
    """Every weight of a transformer folder by its (diffusers) name, located in its files but not read."""
    return {name: stored for file in weight_files(folder) for name, stored in stored_tensors(file).items()}


@dataclass(frozen=True)
class ExpertPaths:
    """Where a two-expert model's experts are (a transformer folder or a file each), and the boundary sigma."""
    high: Path
    low: Path
    boundary: float

    def path(self, expert: str) -> Path:
        return self.high if expert == "high" else self.low


def folder_experts(root: str | Path) -> ExpertPaths:
    """The experts of a downloaded two-expert pipeline folder; a folder that is not one (no model_index.json, no
    transformer_2/, no boundary_ratio, missing weight files) is named with its fix before any weight is read."""
    root = Path(root)
    index = root / PIPELINE_CONFIG
    if not index.is_file():
        raise FileNotFoundError(f"{root} holds no {PIPELINE_CONFIG}: choose the pipeline's root folder as downloaded "
                                "(e.g. Wan2.2-T2V-A14B-Diffusers, holding model_index.json, transformer/ and "
                                "transformer_2/)")
    for part in EXPERT_PARTS.values():
        if not (root / part / "config.json").is_file():
            raise FileNotFoundError(f"{root} has no {part}/ with its config.json: a two-expert model (Wan 2.2 A14B) "
                                    "keeps its high-noise expert in transformer/ and its low-noise one in "
                                    "transformer_2/; download the whole folder (a one-expert model loads with "
                                    "the stock Diffusers Loader or Load FastLightGen Checkpoint)")
    boundary = json.loads(index.read_text()).get(BOUNDARY_KEY)
    if not boundary:
        raise ValueError(f"{index} names no boundary_ratio, the sigma where the low-noise expert takes over: "
                         "download the pipeline's model_index.json again (Wan2.2-T2V-A14B: 0.875, I2V-A14B: 0.9), "
                         "or load the experts' files with Load FastLightGen Expert Pair and set its boundary")
    experts = ExpertPaths(root / EXPERT_PARTS["high"], root / EXPERT_PARTS["low"], check_boundary(float(boundary)))
    for part in EXPERT_PARTS:
        weight_files(experts.path(part))
    return experts
