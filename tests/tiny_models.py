"""Tiny configs of the real diffusers model classes, shared by the library tests."""
from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

from fastlightgen.adapters import Conditioning


def tiny_wan(variant: str = "ti2v", layers: int = 6, seed: int = 0, heads: int = 2,
             head_dim: int = 32) -> WanTransformer3DModel:
    """Wan 2.1 T2V ('t2v'), Wan 2.1 I2V ('i2v') or Wan 2.2 TI2V-5B ('ti2v') at toy width."""
    torch.manual_seed(seed)
    channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[variant]
    extra = {"image_dim": 24, "added_kv_proj_dim": heads * head_dim} if variant == "i2v" else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=channels[0], out_channels=channels[1], text_dim=64,
                                  freq_dim=32, ffn_dim=96, num_layers=layers, rope_max_seq_len=64, **extra)
    # diffusers zero-inits nothing we depend on, but randomize the tables so blocks differ visibly
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def wan_inputs(model: WanTransformer3DModel, batch: int = 2, frames: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, frames, 8, 8, generator=g)
    cond = Conditioning(text=torch.randn(batch, 7, cfg.text_dim, generator=g))
    if cfg.image_dim:
        cond.image = torch.randn(batch, 5, cfg.image_dim, generator=g)
    return x, cond


def tiny_hunyuan(double: int = 2, single: int = 3, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=double, num_single_layers=single,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                           text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6))
    return model.eval()


def hunyuan_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 4, 4, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False
    cond = Conditioning(text=torch.randn(batch, 6, 24, generator=g), text_mask=mask,
                        pooled=torch.randn(batch, 12, generator=g))
    return x, cond
