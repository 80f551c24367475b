"""The one shared-prefix engine: several predictions of one input, each block run once for every branch that runs it
from the same state.

A branch is a path through the blocks (the ones it skips), whether it records gradients, whether the fake score's
LoRA is on, and how many of the batch's rows it needs. Branches agree on a block when none or all of them skip it;
`run_branches` runs such a stretch once for all of them and splits them where they first disagree, depth first,
the skipping group before the running one, so only the states of the open forks are held. This one engine serves:
  Stage I     the full pass and every one-block-skipped pass (N + 1 branches; block i's pass leaves the full pass
              at block i), holding one state per open fork rather than every block's input;
  Stage II    the pruned path with gradients and the unpruned path from the same prefix;
  eq. 9       [c; null] as one batch through the pruned path, the unpruned path on the c rows alone (`rows`);
  Stage III   the fake score (LoRA on) on the pruned path.
A stretch runs with gradients when some branch through it records them, with the LoRA on only when every branch
through it wants it (branches that differ may not share a block that carries a LoRA: checked).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters.base import BlockState, Conditioning, DiTAdapter
from .lora import LoRALinear, lora_enabled


@dataclass(frozen=True)
class Branch:
    """One prediction: the blocks it skips, whether it records gradients, LoRA on or off, and the first `rows`
    samples of the batch it needs (None: all)."""

    skip: frozenset[int] = frozenset()
    grad: bool = False
    lora: bool = False
    rows: int | None = None


def run_branches(adapter: DiTAdapter, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 branches: Sequence[Branch], lora_model: nn.Module | None = None) -> list[torch.Tensor]:
    """The velocity of every branch, in order (each of its own rows)."""
    branches = [Branch(adapter.check_skip(b.skip), b.grad, b.lora, b.rows) for b in branches]
    outs: list[torch.Tensor | None] = [None] * len(branches)
    group = _Group(adapter, branches, lora_model)
    with group.switches(list(range(len(branches))), 0, 0):
        state = adapter.begin(x, sigma, cond)
    group.descend(state, 0, list(range(len(branches))), outs)
    return outs


@dataclass
class _Group:
    adapter: DiTAdapter
    branches: list[Branch]
    lora_model: nn.Module | None

    def descend(self, state: BlockState, start: int, members: list[int], outs: list) -> None:
        n = self.adapter.num_blocks
        fork = next((i for i in range(start, n) if len({i in self.branches[m].skip for m in members}) > 1), n)
        state = self._rows(state, members)
        common = self.branches[members[0]].skip  # on start..fork-1 every member skips the same blocks
        with self.switches(members, start, fork):
            state = self.adapter.run_blocks(state, start, fork, common)
            if fork == n:
                v = self.adapter.end(state)
        if fork == n:
            for m in members:
                rows = self.branches[m].rows
                outs[m] = v if rows is None or rows >= v.shape[0] else v[:rows]
            return
        skipping = [m for m in members if fork in self.branches[m].skip]
        self.descend(state, fork + 1, skipping, outs)
        self.descend(state, fork, [m for m in members if m not in skipping], outs)

    def _rows(self, state: BlockState, members: list[int]) -> BlockState:
        """The state cut to the rows its members need, when they need fewer than it holds."""
        wanted = [self.branches[m].rows for m in members]
        have = state.streams[0].shape[0]
        need = have if None in wanted else max(wanted)
        return state if need >= have else self.adapter.take_rows(state, slice(0, need))

    @contextmanager
    def switches(self, members: list[int], start: int, stop: int) -> Iterator[None]:
        """Gradients and LoRA for blocks start..stop-1 (and `begin`/`end`) run once for `members`."""
        grad = torch.is_grad_enabled() and any(self.branches[m].grad for m in members)
        lora = [self.branches[m].lora for m in members]
        if self.lora_model is not None and len(set(lora)) > 1:
            self._check_no_lora(start, stop)
        switch = nullcontext() if self.lora_model is None else lora_enabled(self.lora_model, all(lora))
        with torch.set_grad_enabled(grad), switch:
            yield

    def _check_no_lora(self, start: int, stop: int) -> None:
        blocks = self.adapter.blocks()
        for i in range(start, stop):
            if any(isinstance(m, LoRALinear) for m in blocks[i].modules()):
                raise ValueError(f"block {i} carries a LoRA but is shared by branches with the LoRA on and off; put "
                                 "LoRAs only on blocks where those branches have parted")
