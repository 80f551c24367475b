"""Adapters: one interface over the DiT families FastLightGen prunes and distills."""
from __future__ import annotations

from torch import nn

from .base import BlockState, Conditioning, DiTAdapter, ModelFingerprint
from .hunyuan import HunyuanVideoAdapter
from .wan import WanAdapter

_BY_CLASS = {"WanTransformer3DModel": WanAdapter, "HunyuanVideoTransformer3DModel": HunyuanVideoAdapter}


def adapt(model: nn.Module) -> DiTAdapter:
    """Wrap a supported diffusers model; a clear error for anything else."""
    if isinstance(model, DiTAdapter):
        return model
    cls = _BY_CLASS.get(type(model).__name__)
    if cls is None:
        raise TypeError(f"{type(model).__name__} is not a supported DiT; FastLightGen adapts "
                        f"{', '.join(sorted(_BY_CLASS))}")
    return cls(model)


__all__ = ["adapt", "BlockState", "Conditioning", "DiTAdapter", "ModelFingerprint", "WanAdapter",
           "HunyuanVideoAdapter"]
