"""Sequence-parallel groups for the trainers: DeepSpeed-Ulysses under ZeRO-3 (`dist.sequence_parallel`).

`dist.sequence_parallel` = n makes groups of n consecutive ranks (on one node when n divides the GPUs per node,
where the all-to-alls are fastest). A group shares one sample: its ranks draw the same batch, noise and sigmas
(`Dist.data_rank`) and each runs 1/n of the video tokens (`fastlightgen.sequence`). ZeRO-3 still partitions
every model over all ranks and averages gradients over all of them, which the library's gradient rule makes the
data-parallel mean. The attention exchange is DeepSpeed's `DistributedAttention` (the Ulysses all-to-all, heads
scattered, sequence gathered, and back); `Gather` concatenates the group's slices (backward: summed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from fastlightgen.sequence import Attend, SequenceShards, check_divides


class Gather(torch.autograd.Function):
    """The group's slices concatenated along a dimension; backward: each rank gets the group's sum of the
    gradients of its slice (a reduce-scatter, as an all-to-all: gloo has none). torch's own autograd all-gather
    receives its backward into tensors shaped like the incoming gradient, which on gloo scrambles a
    non-contiguous one (a permuted output head's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: tdist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = tdist.get_world_size(ctx.group)
        sent = torch.stack(grad.chunk(n, dim=ctx.dim)).contiguous()
        received = torch.empty_like(sent)
        tdist.all_to_all_single(received, sent, group=ctx.group)
        return received.sum(dim=0), None, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend, mask) -> torch.Tensor:
    return attend(q, k, v, mask)


@dataclass
class UlyssesExchange:
    """The collectives of one group (fastlightgen.sequence.Exchange) over a torch process group."""

    rank: int
    size: int
    group: tdist.ProcessGroup
    ulysses: torch.nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        from deepspeed.sequence.layer import DistributedAttention

        # inputs (B, L/n, H, d): heads (dim 2) are scattered and the sequence (dim 1) gathered
        self.ulysses = DistributedAttention(_attend, self.group, scatter_idx=2, gather_idx=1)

    def attention(self, attend: Attend, q, k, v, mask) -> torch.Tensor:
        return self.ulysses(q, k, v, 0, None, attend, mask)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return Gather.apply(x, dim, self.group)


def sequence_shards(size: int) -> SequenceShards | None:
    """This rank's shards of a sequence-parallel group of `size` consecutive ranks (None for size 1). Every rank
    makes every group, as torch requires, and keeps its own."""
    if size == 1:
        return None
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if world % size:
        raise SystemExit(f"dist.sequence_parallel={size} does not divide the {world} processes launched; "
                         f"launch a multiple of {size} processes or choose a divisor of {world}")
    mine = None
    for first in range(0, world, size):
        group = tdist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceShards(UlyssesExchange(rank % size, size, mine))


def check_setting(cfg, arch: dict) -> None:
    """dist.sequence_parallel against the teacher's heads and one sample of the data, before any model loads."""
    from ..data.batches import batch_source
    from ..models.memory import block_shape
    from .processes import step_generator

    size = cfg.dist.sequence_parallel
    if size == 1:
        return
    batch = batch_source(cfg)(step_generator(cfg.run.seed, "check", 0, None), 1)
    _, _, frames, height, width = batch.x0.shape
    shape = block_shape(arch)
    pt, ph, pw = shape["patch"]
    if cfg.model.family == "hunyuanvideo":  # its text joins the exchange (fastlightgen.sequence.joint_attention)
        check_divides(size, batch.cond.text.shape[1], "text tokens")
    check_divides(size, shape["heads"], "attention heads")
    check_divides(size, frames // pt * (height // ph) * (width // pw), "video tokens")
