"""A small LoRA for the nn.Linear layers of chosen DiT blocks, with an on/off switch.

Stage III keeps one set of teacher weights for two scores: the real score reads them with the LoRA off,
the fake score with the LoRA on (paper sec. 3.4: both start from the pruned path, only the fake one
trains). `LoRALinear` subclasses nn.Linear and shares the base layer's weight and bias Parameters, so the
base keys of the state dict are unchanged and the low-rank factors add `lora_down.weight` and
`lora_up.weight`. The up factor starts at zero: with the LoRA on, the model initially equals its base.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the very same Parameters: no copy
        # Drawn in float32 where the generator lives, then given the base weight's device and dtype: a seeded
        # LoRA is the same whether the base is a float32 CPU model or a bf16 ZeRO-3 partition on a GPU.
        draw = {"device": base.weight.device if generator is None else generator.device, "dtype": torch.float32}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **draw)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **draw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5, generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.to(base.weight.device, base.weight.dtype)
        self.lora_up.to(base.weight.device, base.weight.dtype)
        self.scale = alpha / rank
        self.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.enabled:
            # Called as modules (not by reading .weight) so ZeRO-3 gathers the factors by its hooks.
            out = out + self.scale * self.lora_up(self.lora_down(x))
        return out


def add_lora(blocks: Iterable[nn.Module], rank: int, alpha: float,
             generator: torch.Generator | None = None) -> list[LoRALinear]:
    """Replace every nn.Linear inside `blocks` by a LoRALinear (off); returns the new layers.

    Pass a seeded `generator` where the initialization must be reproducible (and equal on every rank).
    """
    added = []
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    lora = LoRALinear(child, rank, alpha, generator)
                    setattr(parent, name, lora)
                    added.append(lora)
    if not added:
        raise ValueError("add_lora found no nn.Linear layer in the given blocks")
    return added


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model) for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_down." in k or ".lora_up." in k}


@contextmanager
def lora_enabled(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Switch every LoRA of `model` on (or off) inside the block, restoring the previous state after.

    Under gradient checkpointing the blocks are recomputed during backward, so a backward through a
    LoRA-on forward must run inside the same `with`.
    """
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = on
    try:
        yield
    finally:
        for m, state in zip(layers, before):
            m.enabled = state
