"""Adapter over diffusers `WanTransformer3DModel` (Wan 2.1 T2V/I2V, Wan 2.2 TI2V-5B).

The split mirrors the model's own forward (diffusers 0.42 transformer_wan.py); a test checks that
begin/blocks/end with nothing skipped equals `model(...)` exactly.
Per-frame sigmas (B, F) become Wan 2.2's per-token timesteps (B, seq_len): that is how TI2V keeps
the given first latent frame at t = 0. Sequence parallelism splits every per-token tensor `begin` makes (the
tokens, their rotary table and, with per-token timesteps, their modulation) and gathers after `proj_out`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..flow import sigma_to_timestep
from ..image_condition import model_input
from ..sequence import SequenceShards
from .base import BlockState, Conditioning, DiTAdapter


class WanAdapter(DiTAdapter):
    family = "wan"
    batched_ctx = ("context", "proj", "temb")  # the rotary table is per position, not per sample

    def blocks(self):
        return list(self.model.blocks)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return cfg.num_attention_heads * cfg.attention_head_dim

    def _timesteps(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma)
        if t.ndim == 1:
            return t
        p_t, p_h, p_w = self.model.config.patch_size
        frames = t.shape[1]
        if frames != x.shape[2]:
            raise ValueError(f"per-frame sigma has {frames} frames but the latent has {x.shape[2]}")
        tokens_per_frame = (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return t[:, ::p_t].repeat_interleave(tokens_per_frame, dim=1)

    def begin(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> BlockState:
        m = self.model
        rotary = m.rope(x)
        hidden = m.patch_embedding(model_input(x, cond.latent_condition)).flatten(2).transpose(1, 2).contiguous()
        timestep = self._timesteps(sigma, x)
        seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, proj, context, image = m.condition_embedder(
            timestep.flatten(), cond.text, cond.image, timestep_seq_len=seq_len)
        proj = proj.unflatten(2, (6, -1)) if seq_len is not None else proj.unflatten(1, (6, -1))
        if image is not None:
            context = torch.cat([image, context], dim=1)
        if self.shards is not None:
            hidden, rotary = self.shards.split(hidden), tuple(self.shards.split(r) for r in rotary)
            if seq_len is not None:
                temb, proj = self.shards.split(temb), self.shards.split(proj)
        return BlockState((hidden,), {"context": context, "proj": proj, "rotary": rotary, "temb": temb,
                                      "shape": x.shape})

    def _block_forward(self, index: int, state: BlockState) -> BlockState:
        c = state.ctx
        hidden = self.model.blocks[index](state.streams[0], c["context"], c["proj"], c["rotary"])
        return BlockState((hidden,), c)

    def end(self, state: BlockState) -> torch.Tensor:
        m, c = self.model, state.ctx
        hidden, temb = state.streams[0], c["temb"]
        table = m.scale_shift_table.to(temb.device)
        if temb.ndim == 3:
            shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (m.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = m.proj_out(hidden)
        if self.shards is not None:
            hidden = self.shards.gather(hidden)
        _, _, f, h, w = c["shape"]
        p_t, p_h, p_w = m.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def block_key_prefix(self, index: int) -> str:
        return f"blocks.{index}."

    def renumbered_prefix(self, index: int, keep: Sequence[int]) -> str:
        return f"blocks.{sorted(keep).index(index)}."

    def pruned_config(self, keep: Sequence[int]) -> dict:
        return {**dict(self.model.config), "num_layers": len(set(keep))}

    def _self_attention_modules(self) -> list[nn.Module]:
        return [block.attn1 for block in self.model.blocks]

    def _sharded_processor(self, shards: SequenceShards) -> "ShardedSelfAttention":
        return ShardedSelfAttention(shards)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: channel pairs (2i, 2i+1) of each head turned by the position's angle (the tables
    repeat each angle for both channels of its pair)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


class ShardedSelfAttention:
    """Processor of a Wan block's self-attention (`attn1`) on this rank's slice of the tokens: the projections,
    q/k norms and rotary embedding per token, the attention itself over the group's whole sequence."""

    def __init__(self, shards: SequenceShards):
        self.shards = shards

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the sequence-parallel processor serves self-attention without a mask only")
        heads = lambda t: t.unflatten(2, (attn.heads, -1))  # noqa: E731
        q = heads(attn.norm_q(attn.to_q(hidden_states)))
        k = heads(attn.norm_k(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        out = self.shards.attention(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))
