"""Build a diffusers `WanTransformer3DModel` from nothing but a state dict (either key layout).

Pruned students change depth and widths, so their config cannot be taken from the teacher's
`config.json`; every field that shapes a tensor is read back from the tensors themselves.
Fields that shape no tensor (eps, rope_max_seq_len) keep the diffusers defaults, which are the
values of every Wan 2.1/2.2 release.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from fastlightgen.wan_keys import to_diffusers_layout

# The original Wan code and ComfyUI fix the head width and derive heads = dim // 128.
DEFAULT_HEAD_DIM = 128

_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")
_IMAGE_NORM = "condition_embedder.image_embedder.norm1.weight"
_FLF_POS_EMBED = "condition_embedder.image_embedder.pos_embed"


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"cannot infer the Wan config: the state dict has no {key!r} (diffusers name)")
    return state_dict[key]


def count_blocks(keys: list[str]) -> int:
    """Number of transformer blocks, insisting on the contiguous numbering 0..K-1.

    A pruned checkpoint that kept its teacher's block indices (e.g. 0, 2, 5) must be renumbered:
    ComfyUI's loader counts `blocks.N.` upwards from 0 and stops at the first missing N, so it
    would silently build a shallower model and drop every block after the gap.
    """
    indices = sorted({int(m.group(1)) for k in keys if (m := _BLOCK_INDEX.match(k))})
    if not indices:
        raise ValueError("cannot infer the Wan config: the state dict has no `blocks.N.` keys")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise ValueError(
            f"the checkpoint's transformer blocks are numbered with gaps: present {indices}, missing {missing}; "
            f"renumber them 0..{len(indices) - 1} (ComfyUI would otherwise silently build a "
            f"{missing[0]}-layer model)"
        )
    return len(indices)


def _qk_norm(state_dict: Mapping[str, torch.Tensor]) -> str:
    # diffusers' WanAttention always owns norm_q/norm_k whatever `qk_norm` says, so a checkpoint
    # without them (original qk_norm=False, used by no Wan release) has no diffusers equivalent.
    if "blocks.0.attn1.norm_q.weight" not in state_dict:
        raise ValueError("Wan checkpoint without q/k RMSNorm (qk_norm=False) cannot be built as a diffusers model")
    return "rms_norm_across_heads"


def _image_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """I2V / FLF2V conditioning. Wan 2.2 I2V-A14B has no image projector, so these stay unset there."""
    fields: dict[str, Any] = {"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}
    if _IMAGE_NORM in state_dict:
        fields["image_dim"] = state_dict[_IMAGE_NORM].shape[0]
    if "blocks.0.attn2.add_k_proj.weight" in state_dict:
        fields["added_kv_proj_dim"] = state_dict["blocks.0.attn2.add_k_proj.weight"].shape[1]
    if _FLF_POS_EMBED in state_dict:
        fields["pos_embed_seq_len"] = state_dict[_FLF_POS_EMBED].shape[1]
    return fields


def infer_wan_config(state_dict: Mapping[str, torch.Tensor], head_dim: int = DEFAULT_HEAD_DIM) -> dict[str, Any]:
    """Keyword arguments for `WanTransformer3DModel(**config)` that fit `state_dict` (either layout).

    `head_dim` is not recoverable from the tensors (heads only split the q/k/v width); real Wan
    models use 128, tiny test models may need less.
    """
    sd = to_diffusers_layout(state_dict)
    patch = _tensor(sd, "patch_embedding.weight")  # Conv3d: (dim, in_channels, *patch_size)
    dim, in_channels, patch_size = patch.shape[0], patch.shape[1], tuple(patch.shape[2:])
    if dim % head_dim:
        raise ValueError(f"inner dim {dim} is not a multiple of head_dim {head_dim}")
    return {
        "patch_size": patch_size,
        "num_attention_heads": dim // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": _tensor(sd, "proj_out.weight").shape[0] // math.prod(patch_size),
        "text_dim": _tensor(sd, "condition_embedder.text_embedder.linear_1.weight").shape[1],
        "freq_dim": _tensor(sd, "condition_embedder.time_embedder.linear_1.weight").shape[1],
        "ffn_dim": _tensor(sd, "blocks.0.ffn.net.0.proj.weight").shape[0],
        "num_layers": count_blocks(list(sd)),
        "cross_attn_norm": "blocks.0.norm2.weight" in sd,
        "qk_norm": _qk_norm(sd),
        **_image_fields(sd),
    }


def build_wan_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], head_dim: int = DEFAULT_HEAD_DIM
) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` holding exactly `state_dict` (strict: no missing or extra key).

    The model is created on the meta device and the tensors are assigned, not copied: no time is
    spent on a random init of 14B parameters and no second copy is held. The model therefore
    shares storage with `state_dict` and takes its dtypes and device.
    """
    sd = to_diffusers_layout(state_dict)
    config = infer_wan_config(sd, head_dim)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model.load_state_dict(sd, strict=True, assign=True)
    # The RoPE tables are non-persistent buffers (not in any checkpoint), so they were left on
    # meta: compute them for real.
    device = next(iter(sd.values())).device
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(head_dim, config["patch_size"], model.config.rope_max_seq_len)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a future diffusers could add another non-persistent buffer
        raise RuntimeError(f"tensors left uninitialised after loading the Wan state dict: {still_meta}")
    return model
