"""The model-adapter seam: a DiT seen as  g2 . B_{N-1} . ... . B_0 . g1  (paper eq. 2).

An adapter splits a model's forward into `begin` (g1: embeddings), `run_block` (one block of the
ordered list) and `end` (g2: output head), so that skipping blocks is written once here, for every family;
`run_blocks` and `take_rows` are what the shared-prefix engine (`fastlightgen.branches`) builds on.
Nothing here copies weights or mutates the wrapped model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..sequence import SequenceShards


@dataclass(frozen=True)
class ModelFingerprint:
    """What a prune plan must agree with before it may be applied to a model."""

    family: str
    num_blocks: int
    hidden_size: int

    def to_dict(self) -> dict:
        return {"family": self.family, "num_blocks": self.num_blocks, "hidden_size": self.hidden_size}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        return cls(family=str(d["family"]), num_blocks=int(d["num_blocks"]), hidden_size=int(d["hidden_size"]))

    def __str__(self) -> str:
        return f"{self.family} with {self.num_blocks} blocks of width {self.hidden_size}"


@dataclass
class Conditioning:
    """Conditioning of one batch. `text` is the encoder's sequence (B, L, D); the rest is family-specific."""

    text: torch.Tensor
    image: torch.Tensor | None = None  # Wan 2.1 I2V CLIP image tokens
    text_mask: torch.Tensor | None = None  # HunyuanVideo attention mask over text tokens
    pooled: torch.Tensor | None = None  # HunyuanVideo pooled text projection
    # Wan I2V (2.2 A14B): the mask and image latents put beside the noisy input (fastlightgen.image_condition)
    latent_condition: torch.Tensor | None = None

    def repeat(self, n: int) -> "Conditioning":
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731
        return Conditioning(rep(self.text), rep(self.image), rep(self.text_mask), rep(self.pooled),
                            rep(self.latent_condition))

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Both batches in one, self's rows first (eq. 9 runs [c; null] as one batch)."""
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Conditioning(join(self.text, other.text), join(self.image, other.image),
                            join(self.text_mask, other.text_mask), join(self.pooled, other.pooled),
                            join(self.latent_condition, other.latent_condition))


@dataclass
class BlockState:
    """What flows between blocks: the evolving streams plus per-call constants (time embedding, rope...)."""

    streams: tuple[torch.Tensor, ...]
    ctx: dict[str, Any] = field(default_factory=dict)


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """A sigma per sample of `x` (or per frame, as given) from a number or a tensor."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s


def _as_skip(skip: Iterable[int] | None) -> frozenset[int]:
    return frozenset(int(i) for i in (skip or ()))


class DiTAdapter(ABC):
    """A DiT with an ordered block list. Subclasses implement begin/run_block/end and the naming."""

    family: str
    batched_ctx: tuple[str, ...]  # BlockState.ctx entries with a batch dimension (the rest are shared)

    def __init__(self, model: nn.Module):
        self.model = model
        self.block_evaluations = 0  # counted so tests and benchmarks can prove prefix sharing
        self.gradient_checkpointing = False

    # ---- family-specific -------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """All blocks in execution order (HunyuanVideo: double blocks then single blocks)."""

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def begin(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> BlockState: ...

    @abstractmethod
    def _block_forward(self, index: int, state: BlockState) -> BlockState: ...

    @abstractmethod
    def end(self, state: BlockState) -> torch.Tensor: ...

    @abstractmethod
    def block_key_prefix(self, index: int) -> str:
        """State-dict prefix of block `index`, e.g. 'blocks.7.'."""

    @abstractmethod
    def pruned_config(self, keep: Sequence[int]) -> dict: ...

    @abstractmethod
    def renumbered_prefix(self, index: int, keep: Sequence[int]) -> str:
        """Prefix that block `index` gets in the physically pruned model keeping `keep`."""

    @abstractmethod
    def _self_attention_modules(self) -> list[nn.Module]:
        """The attention modules that attend over the video tokens (the ones sequence parallelism splits)."""

    @abstractmethod
    def _sharded_processor(self, shards: SequenceShards) -> Any:
        """The attention processor that runs those modules on this rank's slice of the tokens."""

    def shard_sequence(self, shards: SequenceShards) -> None:
        """From now on `begin` keeps this rank's slice of the video tokens, self-attention exchanges them with
        the group (`fastlightgen.sequence`), and `end` returns the whole prediction on every rank. This sets the
        model's self-attention processors, which hold the shards, so every adapter of the model splits alike:
        only for a trainer's own model, never one a caller still uses whole."""
        processor = self._sharded_processor(shards)
        for module in self._self_attention_modules():
            module.set_processor(processor)

    # ---- shared machinery ------------------------------------------------------------------
    @property
    def shards(self) -> SequenceShards | None:
        """The sequence-parallel shards the model's self-attention runs on (`shard_sequence`), or None."""
        modules = self._self_attention_modules()
        return getattr(modules[0].processor, "shards", None) if modules else None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(self.family, self.num_blocks, self.hidden_size)

    def check_skip(self, skip: Iterable[int] | None) -> frozenset[int]:
        s = _as_skip(skip)
        bad = sorted(i for i in s if not 0 <= i < self.num_blocks)
        if bad:
            raise ValueError(f"block indices {bad} are out of range for a model with {self.num_blocks} blocks")
        return s

    def run_block(self, index: int, state: BlockState) -> BlockState:
        self.block_evaluations += 1
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Recompute each block in backward: activation memory stays O(one block) on big models.
            streams = torch.utils.checkpoint.checkpoint(
                lambda *s: self._block_forward(index, BlockState(s, state.ctx)).streams,
                *state.streams, use_reentrant=False)
            return BlockState(tuple(streams), state.ctx)
        return self._block_forward(index, state)

    def run_blocks(self, state: BlockState, start: int, stop: int, skip: frozenset[int]) -> BlockState:
        for i in range(start, stop):
            if i not in skip:
                state = self.run_block(i, state)
        return state

    def forward(self, x: torch.Tensor, sigma, cond: Conditioning, skip: Iterable[int] | None = None) -> torch.Tensor:
        """Velocity with the blocks in `skip` bypassed (identity), no weight copy."""
        skip = self.check_skip(skip)
        state = self.begin(x, batch_sigma(sigma, x), cond)
        return self.end(self.run_blocks(state, 0, self.num_blocks, skip))

    __call__ = forward

    def take_rows(self, state: BlockState, rows: slice) -> BlockState:
        """The state of a sub-batch, to continue only some rows of a batched pass."""
        ctx = {k: v[rows] if k in self.batched_ctx and v is not None else v for k, v in state.ctx.items()}
        return BlockState(tuple(s[rows] for s in state.streams), ctx)

    # ---- physical pruning -------------------------------------------------------------------
    def pruned_keys(self, keep: Sequence[int]) -> dict[str, str]:
        """{key in the physically pruned model: key in this model}: the dropped blocks left out, the kept
        blocks renumbered 0..K-1 in each list. Names only: a model whose weights are elsewhere (ZeRO-3
        partitions) gives them too."""
        keep = sorted(set(int(i) for i in keep))
        self.check_skip(keep)
        dropped = [self.block_key_prefix(i) for i in range(self.num_blocks) if i not in keep]
        renames = {self.block_key_prefix(i): self.renumbered_prefix(i, keep) for i in keep}
        out = {}
        for key in self.model.state_dict():
            if any(key.startswith(p) for p in dropped):
                continue
            prefix = next((p for p in renames if key.startswith(p)), None)
            out[key if prefix is None else renames[prefix] + key[len(prefix):]] = key
        return out

    def pruned_state_dict(self, keep: Sequence[int]) -> dict[str, torch.Tensor]:
        """State dict without the dropped blocks, kept blocks renumbered 0..K-1 in each list."""
        state = self.model.state_dict()
        return {new: state[old] for new, old in self.pruned_keys(keep).items()}

    def pruned_model(self, keep: Sequence[int]) -> nn.Module:
        """A new, smaller model of the same class holding copies of the kept blocks (dtype/device kept)."""
        model = type(self.model).from_config(self.pruned_config(keep))
        weights = {k: v.detach().clone() for k, v in self.pruned_state_dict(keep).items()}
        model.load_state_dict(weights, strict=True, assign=True)
        # buffers outside the state dict (Wan's rotary tables) are built on the CPU: follow the weights
        device = next(self.model.parameters()).device
        return model.to(device).train(self.model.training)
