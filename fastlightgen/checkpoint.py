"""The FastLightGen checkpoint: one safetensors file in the original/ComfyUI Wan layout plus JSON metadata.

Weights are stored with original Wan key names and blocks renumbered 0..K-1, so ComfyUI's stock
diffusion-model loader reads a pruned student as a smaller Wan. The safetensors header's
`__metadata__["fastlightgen"]` holds a JSON `CheckpointMeta`: format version, family, the original
block count and which original blocks were kept, the recommended sampling, and training provenance.

`read_checkpoint` also accepts plain diffusers-layout or original-layout Wan files without metadata.
Every failure is a `CheckpointError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .io_utils import atomic_path
from .plan import PrunePlan
from .wan_config import DEFAULT_HEAD_DIM, build_wan_from_state_dict, infer_wan_config
from .wan_keys import diffusers_to_original, to_diffusers_layout

FORMAT_VERSION = 1
METADATA_KEY = "fastlightgen"
FAMILIES = ("wan",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, the problem and the fix."""


@dataclass
class Recommended:
    """How the checkpoint is meant to be sampled (the few-step contract by default)."""

    steps: int = 4
    denoising_step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    shift: float = 5.0
    cfg_scale: float = 1.0


@dataclass
class CheckpointMeta:
    original_num_blocks: int
    kept_blocks: list[int]
    family: str = "wan"
    head_dim: int = DEFAULT_HEAD_DIM
    recommended: Recommended = field(default_factory=Recommended)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        d = json.loads(text)
        d["recommended"] = Recommended(**d.get("recommended", {}))
        return cls(**d)


@dataclass
class LoadedCheckpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]  # diffusers layout
    meta: CheckpointMeta | None
    config: dict[str, Any]

    def build_model(self):
        return build_wan_from_state_dict(self.state_dict, self.meta.head_dim if self.meta else DEFAULT_HEAD_DIM)


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: CheckpointMeta,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a diffusers Wan, already physically pruned) with `meta`, atomically."""
    path = Path(path)
    if meta.family not in FAMILIES:
        raise CheckpointError(f"{path}: family {meta.family!r} cannot be saved; supported: {FAMILIES}")
    if len(meta.kept_blocks) != len(model.blocks):
        raise CheckpointError(f"{path}: metadata keeps {len(meta.kept_blocks)} blocks but the model has "
                              f"{len(model.blocks)}; save the physically pruned model")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
               for k, v in diffusers_to_original(model.state_dict()).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: meta.to_json()})
    return path


def read_checkpoint(path: str | Path, plan: PrunePlan | None = None) -> LoadedCheckpoint:
    """Validate and read a FastLightGen, original-layout or diffusers-layout Wan safetensors file."""
    path = Path(path)
    header = _read_header(path)
    meta = _parse_meta(path, header.get("__metadata__") or {})
    try:
        state_dict = to_diffusers_layout(load_file(str(path)))
        config = infer_wan_config(state_dict, meta.head_dim if meta else DEFAULT_HEAD_DIM)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    _check_complete(path, state_dict, config)
    if meta is not None and len(meta.kept_blocks) != config["num_layers"]:
        raise CheckpointError(f"{path}: metadata lists {len(meta.kept_blocks)} kept blocks but the file holds "
                              f"{config['num_layers']}; the file was altered after export, re-export it")
    if plan is not None:
        _check_plan(path, plan, meta, config)
    return LoadedCheckpoint(path, state_dict, meta, config)


def load_wan(path: str | Path, plan: PrunePlan | None = None):
    """(diffusers WanTransformer3DModel, CheckpointMeta or None) from a checkpoint file."""
    ckpt = read_checkpoint(path, plan)
    return ckpt.build_model().eval(), ckpt.meta


def _read_header(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); export it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (no valid header; is it a pickle .pt/.ckpt? "
                                  "convert it to .safetensors first)")
        raw = f.read(length)
    if len(raw) < length:
        raise CheckpointError(f"{path}: truncated: the header wants {length} bytes but the file has {size}; "
                              "the download or copy was cut short, copy it again")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON); "
                              "convert it to .safetensors first") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + data_end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + length + data_end} bytes but the file has "
                              f"{size}; the download or copy was cut short, copy it again")
    return header


def _parse_meta(path: Path, metadata: dict) -> CheckpointMeta | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        meta = CheckpointMeta.from_json(metadata[METADATA_KEY])
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: FastLightGen metadata is unreadable ({err}); re-export the checkpoint")
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.format_version} is newer than this FastLightGen "
                              f"({FORMAT_VERSION}); upgrade FastLightGen")
    if meta.family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model family {meta.family!r}; this loader reads {FAMILIES}")
    return meta


def _check_complete(path: Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        expected = WanTransformer3DModel(**config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) for a {config['num_layers']}-block Wan; the file is incomplete")
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape: {wrong[:4]}")


def _check_plan(path: Path, plan: PrunePlan, meta: CheckpointMeta | None, config: dict) -> None:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if width != plan.fingerprint.hidden_size or config["num_layers"] != len(plan.kept):
        raise CheckpointError(f"{path}: shape mismatch with the prune plan: the file holds {config['num_layers']} "
                              f"blocks of width {width}, the plan keeps {len(plan.kept)} of a "
                              f"{plan.fingerprint}; use the checkpoint exported with this plan")
    if meta is not None and (meta.kept_blocks != plan.kept
                             or meta.original_num_blocks != plan.fingerprint.num_blocks):
        raise CheckpointError(f"{path}: kept blocks {meta.kept_blocks} of {meta.original_num_blocks} differ from "
                              f"the plan's {plan.kept} of {plan.fingerprint.num_blocks}")
