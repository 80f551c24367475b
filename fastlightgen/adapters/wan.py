"""Adapter over diffusers `WanTransformer3DModel` (Wan 2.1 T2V/I2V, Wan 2.2 TI2V-5B).

The split mirrors the model's own forward (diffusers 0.42 transformer_wan.py); a test checks that
begin/blocks/end with nothing skipped equals `model(...)` exactly.
Per-frame sigmas (B, F) become Wan 2.2's per-token timesteps (B, seq_len): that is how TI2V keeps
the given first latent frame at t = 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..flow import sigma_to_timestep
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
        hidden = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        timestep = self._timesteps(sigma, x)
        seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, proj, context, image = m.condition_embedder(
            timestep.flatten(), cond.text, cond.image, timestep_seq_len=seq_len)
        proj = proj.unflatten(2, (6, -1)) if seq_len is not None else proj.unflatten(1, (6, -1))
        if image is not None:
            context = torch.cat([image, context], dim=1)
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
