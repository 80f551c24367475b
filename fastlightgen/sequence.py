"""Sequence parallelism (Ulysses): one sample's video tokens spread over the ranks of a group.

Every rank of a group holds the same sample and one contiguous slice of its video tokens (rank r the r-th of
`size` equal slices). Per-token layers (projections, norms, MLPs, modulation, cross-attention to the text) run
on the slice alone. Self-attention needs every token: the `Exchange` turns (B, L/n, H, d) slices of q, k, v
into (B, L, H/n, d) head groups, attends, and turns the result back (an all-to-all each way). The adapter
gathers the tokens after the output head, so every rank of a group sees the whole prediction and computes the
same loss.

Gradients: every collective's backward is its exact adjoint (a gather's backward sums the group's gradients),
so the group's summed gradient is `size` times the gradient of the whole sample. A data-parallel average over
all ranks (data parallel x sequence parallel, what ZeRO does) divides that by `size` again: the optimizer sees
the data-parallel mean of whole-sample gradients, with no special case. The library only states the rule; the
trainer supplies the collectives (DeepSpeed's Ulysses attention, `train/distributed/sequence.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

Attend = Callable[..., torch.Tensor]  # (q, k, v, mask) in (B, L, H, d) -> (B, L, H, d)


class Exchange(Protocol):
    """The collectives of one sequence-parallel group."""

    rank: int
    size: int

    def attention(self, attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """`attend` over the group's whole sequence: q, k, v are this rank's (B, L/n, H, d) slices; returns this
        rank's slice of the output."""

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The group's slices of `x` concatenated along `dim` in rank order; the backward sums over the group."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over (B, L, H, d) tensors; `mask` (B, 1, 1, L) boolean over the keys, or None."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def check_divides(size: int, count: int, what: str) -> None:
    if count % size:
        raise ValueError(f"the sequence-parallel size {size} does not divide the {what} ({count}); choose "
                         f"dist.sequence_parallel among the common divisors of the heads and the tokens")


@dataclass(frozen=True)
class SequenceShards:
    """This rank's place in its sequence-parallel group and the group's collectives."""

    exchange: Exchange

    @property
    def rank(self) -> int:
        return self.exchange.rank

    @property
    def size(self) -> int:
        return self.exchange.size

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a tensor every rank of the group holds whole (tokens along `dim`)."""
        check_divides(self.size, x.shape[dim], "video tokens")
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.exchange.gather(x, dim)

    def first_tokens(self, count: int, local: int) -> int:
        """How many of the sequence's first `count` tokens lie in this rank's slice of `local` tokens."""
        return max(0, min(local, count - self.rank * local))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of the video tokens (Wan)."""
        check_divides(self.size, q.shape[2], "attention heads")
        return self.exchange.attention(sdpa, q, k, v, None)

    def joint_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_tokens: int,
                        text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over video and text tokens together (HunyuanVideo): q, k, v hold this rank's video slice
        followed by the whole text (every rank holds it); returns (this rank's video output, the whole text's).

        Each rank takes its own 1/n of the text, so the exchange sees one slice of both per rank, and the keys
        arrive as [video_0, text_0, video_1, text_1, ...]: the text's key mask is laid out the same way. The
        text's output slices are gathered back, so the text stream stays whole on every rank."""
        check_divides(self.size, q.shape[2], "attention heads")
        check_divides(self.size, text_tokens, "text tokens")
        video = q.shape[1] - text_tokens
        t = text_tokens // self.size
        mine = slice(video + self.rank * t, video + (self.rank + 1) * t)
        local = [torch.cat([a[:, :video], a[:, mine]], dim=1) for a in (q, k, v)]
        mask = None
        if text_mask is not None:
            video_keys = text_mask.new_ones(text_mask.shape[0], self.size, video)
            mask = torch.cat([video_keys, text_mask.unflatten(1, (self.size, t))], dim=2).flatten(1)
            mask = mask[:, None, None, :]
        out = self.exchange.attention(sdpa, *local, mask)
        return out[:, :video], self.gather(out[:, video:], dim=1)
