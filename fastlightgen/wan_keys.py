"""Exact key renaming between two layouts of the same Wan 2.x DiT weights.

* "diffusers": `diffusers.WanTransformer3DModel` (what FastLightGen trains).
* "original":  the Wan release checkpoints, which ComfyUI's `comfy.ldm.wan.model.WanModel`
               loads as-is (ComfyUI files may carry a `model.diffusion_model.` prefix).

The mapping is an explicit table of full parameter names, not substring replacement, so that
it is a bijection we can check at import time and so that any key it does not know (VACE,
Animate, S2V heads, a stray VAE tensor in an all-in-one file, ...) is a loud error instead of
a silently mis-renamed or dropped tensor. Tensors are never copied, cast or reshaped. The per-tensor fp8
scales of ComfyUI's fp8_scaled and mixed-precision files are leaves of their Linear layer and move with it.

Names were checked against diffusers' `transformer_wan.py` and `convert_wan_transformer_to_diffusers`
and against ComfyUI's `comfy/ldm/wan/model.py`. The one trap: the cross-attention LayerNorm is
`norm2` in diffusers but `norm3` in the original (the original's `norm2` is the affine-free
pre-FFN norm, which like diffusers' `norm1`/`norm3` has no weights and so no keys).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar

Layout = Literal["diffusers", "original"]
T = TypeVar("T")

COMFY_PREFIX = "model.diffusion_model."

# Which parameter names a module owns: Linear / Conv3d / affine LayerNorm, RMSNorm, or a bare
# nn.Parameter that is itself the key (marked by the empty leaf).
_WEIGHT_AND_BIAS = ("weight", "bias")
_WEIGHT_ONLY = ("weight",)
_BARE = ("",)
# The per-tensor fp8 scales ComfyUI stores beside a Linear weight (`scale_weight`/`scale_input` in fp8_scaled
# files, `weight_scale`/`input_scale` in mixed-precision files). Only Linear layers may carry them: a scale on
# a norm or the patch Conv3d would be ignored by ComfyUI, so it is an unknown key here.
WEIGHT_SCALES = ("scale_weight", "weight_scale")
INPUT_SCALES = ("scale_input", "input_scale")
_LINEAR = (*_WEIGHT_AND_BIAS, *WEIGHT_SCALES, *INPUT_SCALES)

# (diffusers name, original name, leaves) for everything outside the transformer blocks.
_TOP_LEVEL_MODULES = (
    ("patch_embedding", "patch_embedding", _WEIGHT_AND_BIAS),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0", _LINEAR),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2", _LINEAR),
    ("condition_embedder.time_proj", "time_projection.1", _LINEAR),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0", _LINEAR),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2", _LINEAR),
    # Wan 2.1 I2V / FLF2V CLIP-image projector (MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm).
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0", _WEIGHT_AND_BIAS),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1", _LINEAR),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3", _LINEAR),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4", _WEIGHT_AND_BIAS),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos", _BARE),  # FLF2V only
    ("proj_out", "head.head", _LINEAR),
    ("scale_shift_table", "head.modulation", _BARE),
)


def _attention_modules(diffusers_attn: str, original_attn: str) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (f"{diffusers_attn}.to_q", f"{original_attn}.q", _LINEAR),
        (f"{diffusers_attn}.to_k", f"{original_attn}.k", _LINEAR),
        (f"{diffusers_attn}.to_v", f"{original_attn}.v", _LINEAR),
        (f"{diffusers_attn}.to_out.0", f"{original_attn}.o", _LINEAR),
        (f"{diffusers_attn}.norm_q", f"{original_attn}.norm_q", _WEIGHT_ONLY),
        (f"{diffusers_attn}.norm_k", f"{original_attn}.norm_k", _WEIGHT_ONLY),
    ]


# (diffusers name, original name, leaves) relative to `blocks.N.`.
_BLOCK_MODULES = (
    *_attention_modules("attn1", "self_attn"),
    *_attention_modules("attn2", "cross_attn"),
    # I2V image branch of the cross-attention.
    ("attn2.add_k_proj", "cross_attn.k_img", _LINEAR),
    ("attn2.add_v_proj", "cross_attn.v_img", _LINEAR),
    ("attn2.norm_added_k", "cross_attn.norm_k_img", _WEIGHT_ONLY),
    ("norm2", "norm3", _WEIGHT_AND_BIAS),  # cross-attention norm, present iff cross_attn_norm
    ("ffn.net.0.proj", "ffn.0", _LINEAR),
    ("ffn.net.2", "ffn.2", _LINEAR),
    ("scale_shift_table", "modulation", _BARE),
)


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def _expand(modules: Iterable[tuple[str, str, tuple[str, ...]]]) -> dict[str, str]:
    return {_join(d, leaf): _join(o, leaf) for d, o, leaves in modules for leaf in leaves}


def _invert(mapping: dict[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in mapping.items()}
    if len(inverse) != len(mapping):  # guards future edits of the tables: renaming must stay bijective
        raise AssertionError("Wan key table maps two names onto one")
    return inverse


_TOP_D2O = _expand(_TOP_LEVEL_MODULES)
_BLOCK_D2O = _expand(_BLOCK_MODULES)
_TOP_O2D = _invert(_TOP_D2O)
_BLOCK_O2D = _invert(_BLOCK_D2O)

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _lookup(key: str, top: Mapping[str, str], per_block: Mapping[str, str]) -> str | None:
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return top.get(key)
    renamed = per_block.get(match.group(2))
    return None if renamed is None else f"blocks.{match.group(1)}.{renamed}"


def _strip_comfy_prefix(key: str) -> str:
    return key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key


def _rename_all(
    state_dict: Mapping[str, T],
    top: Mapping[str, str],
    per_block: Mapping[str, str],
    source: Layout,
    strip_prefix: bool,
) -> dict[str, T]:
    renamed: dict[str, T] = {}
    for key, tensor in state_dict.items():
        bare = _strip_comfy_prefix(key) if strip_prefix else key
        new_key = _lookup(bare, top, per_block)
        if new_key is None:
            raise ValueError(
                f"unknown key {key!r} for a {source}-layout Wan transformer state dict "
                "(only the Wan 2.1/2.2 T2V, I2V, FLF2V and TI2V DiT weights are supported)"
            )
        if new_key in renamed:  # only reachable when both `x` and `model.diffusion_model.x` are present
            raise ValueError(f"key {key!r} duplicates another key once the {COMFY_PREFIX!r} prefix is stripped")
        renamed[new_key] = tensor
    return renamed


def diffusers_to_original(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename diffusers `WanTransformer3DModel` keys to the original Wan / ComfyUI names (no prefix)."""
    return _rename_all(state_dict, _TOP_D2O, _BLOCK_D2O, "diffusers", strip_prefix=False)


def original_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename original Wan / ComfyUI keys (optionally `model.diffusion_model.`-prefixed) to diffusers names."""
    return _rename_all(state_dict, _TOP_O2D, _BLOCK_O2D, "original", strip_prefix=True)


def detect_layout(state_dict: Mapping[str, object]) -> Layout:
    """Tell the layout from the keys that exist in only one of the two (e.g. `proj_out` vs `head.head`).

    Keys unknown to both layouts are ignored here; the conversion itself reports them by name.
    """
    diffusers_only = original_only = 0
    for key in state_dict:
        in_diffusers = _lookup(key, _TOP_D2O, _BLOCK_D2O) is not None
        in_original = _lookup(_strip_comfy_prefix(key), _TOP_O2D, _BLOCK_O2D) is not None
        diffusers_only += in_diffusers and not in_original
        original_only += in_original and not in_diffusers
    if diffusers_only and not original_only:
        return "diffusers"
    if original_only and not diffusers_only:
        return "original"
    if diffusers_only and original_only:
        raise ValueError(f"the file mixes diffusers-layout and original-layout Wan keys ({diffusers_only} and "
                         f"{original_only}); it was merged from two sources: export or download it again")
    raise ValueError(f"this is not a Wan 2.x diffusion model: its keys look like {_guess_model(state_dict)} (first "
                     f"keys: {list(state_dict)[:3]}). FastLightGen reads Wan 2.1/2.2 transformer files, e.g. "
                     "wan2.1_t2v_1.3B_fp16.safetensors or wan2.2_ti2v_5B_fp16.safetensors as ComfyUI distributes "
                     "them; load other models with ComfyUI's own loaders")


# Key fragments that name the other model families a creator's models folder holds.
_OTHER_MODELS = (("input_blocks.", "a Stable Diffusion 1.x/2.x/XL UNet"), ("down_blocks.", "a diffusers UNet"), ("joint_blocks.", "Stable Diffusion 3"),
                 ("double_blocks.", "a Flux or HunyuanVideo DiT"), ("transformer_blocks.", "a diffusers DiT of "
                 "another family"), ("encoder.", "a VAE or text encoder"))


def _guess_model(state_dict: Mapping[str, object]) -> str:
    return next((name for fragment, name in _OTHER_MODELS if any(fragment in k for k in state_dict)),
                "no model FastLightGen knows")


def to_diffusers_layout(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Diffusers-named view of a state dict of either layout (tensors shared, never copied)."""
    if detect_layout(state_dict) == "original":
        return original_to_diffusers(state_dict)
    diffusers_to_original(state_dict)  # run for its check: unknown keys must fail here too
    return dict(state_dict)
