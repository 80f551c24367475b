"""Adapter over diffusers `HunyuanVideoTransformer3DModel`.

Blocks are indexed across both lists: 0..D-1 are the double (MM-DiT) blocks, D..D+S-1 the single
blocks, which is the order the model runs them in (paper Fig. 4 indexes them the same way).
The split mirrors the model's own forward (diffusers 0.42 transformer_hunyuan_video.py). Sequence parallelism
splits the video tokens and their rotary table; the text stream stays whole on every rank (its output slices
are gathered in each attention, `SequenceShards.joint_attention`); `end` gathers after `proj_out`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..flow import sigma_to_timestep
from ..sequence import SequenceShards
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
        first_frame_tokens = (x.shape[3] // p) * (x.shape[4] // p)
        if self.shards is not None:
            hidden, rotary = self.shards.split(hidden), tuple(self.shards.split(r, dim=0) for r in rotary)
            first_frame_tokens = self.shards.first_tokens(first_frame_tokens, hidden.shape[1])
        ctx = {"temb": temb, "mask": mask[:, None, None, :], "rotary": rotary, "token_replace": token_replace,
               "first_frame_tokens": first_frame_tokens, "shape": x.shape}
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
        if self.shards is not None:
            hidden = self.shards.gather(hidden)
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

    def _self_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.blocks()]

    def _sharded_processor(self, shards: SequenceShards) -> "ShardedJointAttention":
        return ShardedJointAttention(shards)


class ShardedJointAttention:
    """Processor of a HunyuanVideo block's attention on this rank's slice of the video tokens and the whole text.
    A double block projects the text with its own weights (`add_q_proj`...), a single block with the video's;
    the rotary embedding turns the video tokens only."""

    def __init__(self, shards: SequenceShards):
        self.shards = shards

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        text = encoder_hidden_states
        video_q, video_k, video_v = _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                                           (attn.norm_q, attn.norm_k))
        video_q, video_k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (video_q, video_k))
        double = attn.add_q_proj is not None
        text_q, text_k, text_v = _heads(
            attn, text, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if double else (attn.to_q, attn.to_k,
                                                                                          attn.to_v),
            (attn.norm_added_q, attn.norm_added_k) if double else (attn.norm_q, attn.norm_k))
        q, k, v = (torch.cat(pair, dim=1) for pair in ((video_q, text_q), (video_k, text_k), (video_v, text_v)))
        text_mask = None if attention_mask is None else attention_mask[:, 0, 0, -text.shape[1]:]
        video, text = self.shards.joint_attention(q, k, v, text.shape[1], text_mask)
        video, text = video.flatten(2, 3).to(q.dtype), text.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def _heads(attn: nn.Module, x: torch.Tensor, projections, norms) -> tuple[torch.Tensor, ...]:
    """q, k, v of `x` as (B, L, heads, d), q and k normalized per head when the block has norms."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    norm_q, norm_k = norms
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v
