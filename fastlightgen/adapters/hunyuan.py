"""Adapter over diffusers `HunyuanVideoTransformer3DModel`.

Blocks are indexed across both lists: 0..D-1 are the double (MM-DiT) blocks, D..D+S-1 the single
blocks, which is the order the model runs them in (paper Fig. 4 indexes them the same way).
The split mirrors the model's own forward (diffusers 0.42 transformer_hunyuan_video.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..flow import sigma_to_timestep
from .base import BlockState, Conditioning, DiTAdapter


class HunyuanVideoAdapter(DiTAdapter):
    family = "hunyuanvideo"
    batched_ctx = ("temb", "mask", "token_replace")

    def __init__(self, model, embedded_guidance: float = 6.0):
        super().__init__(model)
        # Guidance-distilled HunyuanVideo embeds the CFG scale it imitates (x1000, as its pipeline does).
        self.embedded_guidance = embedded_guidance

    @property
    def num_double(self) -> int:
        return len(self.model.transformer_blocks)

    def blocks(self):
        return list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return cfg.num_attention_heads * cfg.attention_head_dim

    def begin(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> BlockState:
        if sigma.ndim != 1:
            raise ValueError("HunyuanVideo takes one sigma per sample, not per-frame sigmas")
        if cond.pooled is None or cond.text_mask is None:
            raise ValueError("HunyuanVideo needs Conditioning.pooled and Conditioning.text_mask")
        m = self.model
        timestep = sigma_to_timestep(sigma)
        rotary = m.rope(x)
        guidance = None
        if getattr(m.config, "guidance_embeds", False):
            guidance = torch.full_like(timestep, self.embedded_guidance * 1000.0)
        temb, token_replace = m.time_text_embed(timestep, cond.pooled, guidance)
        hidden = m.x_embedder(x)
        context = m.context_embedder(cond.text, timestep, cond.text_mask)
        n_latent, n_text = hidden.shape[1], context.shape[1]
        valid = n_latent + cond.text_mask.sum(dim=1, dtype=torch.int)
        mask = torch.arange(n_latent + n_text, device=x.device).unsqueeze(0) < valid.unsqueeze(1)
        p = m.config.patch_size
        ctx = {"temb": temb, "mask": mask[:, None, None, :], "rotary": rotary, "token_replace": token_replace,
               "first_frame_tokens": (x.shape[3] // p) * (x.shape[4] // p), "shape": x.shape}
        return BlockState((hidden, context), ctx)

    def _block_forward(self, index: int, state: BlockState) -> BlockState:
        c = state.ctx
        block = self.blocks()[index]
        hidden, context = block(state.streams[0], state.streams[1], c["temb"], c["mask"], c["rotary"],
                                c["token_replace"], c["first_frame_tokens"])
        return BlockState((hidden, context), c)

    def end(self, state: BlockState) -> torch.Tensor:
        m, c = self.model, state.ctx
        hidden = m.proj_out(m.norm_out(state.streams[0], c["temb"]))
        _, _, f, h, w = c["shape"]
        p, p_t = m.config.patch_size, m.config.patch_size_t
        hidden = hidden.reshape(hidden.shape[0], f // p_t, h // p, w // p, -1, p_t, p, p)
        return hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def block_key_prefix(self, index: int) -> str:
        d = self.num_double
        return f"transformer_blocks.{index}." if index < d else f"single_transformer_blocks.{index - d}."

    def renumbered_prefix(self, index: int, keep: Sequence[int]) -> str:
        d = self.num_double
        same_list = [i for i in sorted(keep) if (i < d) == (index < d)]
        name = "transformer_blocks" if index < d else "single_transformer_blocks"
        return f"{name}.{same_list.index(index)}."

    def pruned_config(self, keep: Sequence[int]) -> dict:
        d = self.num_double
        keep = set(keep)
        return {**dict(self.model.config), "num_layers": sum(i < d for i in keep),
                "num_single_layers": sum(i >= d for i in keep)}
