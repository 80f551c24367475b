"""The toy teacher: a genuine Wan 2.2 TI2V-style diffusers `WanTransformer3DModel` at toy width.

48 latent channels in and out and a 4096-wide text context, like Wan 2.2 TI2V-5B, so ComfyUI's stock
loader detects the exported file as a Wan 2.2 model. Width 256 = 2 heads of 128 (ComfyUI infers heads as
width / 128) and it must exceed a token's 48 x 2 x 2 = 192 input features (at width 128, narrower than a
token, the trained teacher's samples kept their noise).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from diffusers import WanTransformer3DModel

from ..adapters import Conditioning
from .codec import LATENT_CHANNELS, encode_video
from .text import TEXT_DIM
from .text import encode as encode_text
from .world import ToyBatch


@dataclass(frozen=True)
class ToyTeacherShape:
    num_layers: int = 12
    num_attention_heads: int = 2
    attention_head_dim: int = 128
    ffn_dim: int = 768

    def diffusers_config(self) -> dict:
        return {**asdict(self), "patch_size": (1, 2, 2), "in_channels": LATENT_CHANNELS,
                "out_channels": LATENT_CHANNELS, "text_dim": TEXT_DIM, "freq_dim": 256,
                "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads"}


TOY_TEACHER = ToyTeacherShape()


def build_toy_teacher(shape: ToyTeacherShape = TOY_TEACHER, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**shape.diffusers_config())


def conditioning(captions: list[str]) -> Conditioning:
    return Conditioning(text=encode_text(captions))


def null_like(cond: Conditioning) -> Conditioning:
    """The toy encoder's encoding of "" for `cond`'s batch: zeroed text (and pooled), image tokens kept. Also the
    null of the benches' random conditioning. A real text encoder's null is its encoding of the null prompt
    (train.preprocess stores it with the shards), never zeros."""
    return replace(cond, text=torch.zeros_like(cond.text),
                   pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled))


def batch_latents(batch: ToyBatch) -> torch.Tensor:
    """Model-space latents (B, 48, F, H/4, W/4) of a batch of toy videos."""
    return encode_video(batch.videos)
