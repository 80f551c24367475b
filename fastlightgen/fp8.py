"""Writing ComfyUI's fp8_scaled format: every Linear weight in float8_e4m3fn with a per-tensor float32 scale.

Which tensors are quantized follows what ComfyUI's loader does with such a file (comfy/model_detection.py,
comfy/ops.py `scaled_fp8_ops`): the `scaled_fp8` marker makes it build every Linear layer of its Wan, in the
blocks and outside them (text and time embeddings, time projection, head), with an fp8 weight and a
`scale_weight` parameter that defaults to 1; everything else (norms, biases, modulation, the patch Conv3d) it
keeps in its compute dtype. So every Linear weight is quantized here, each with its own scale: a Linear weight
left in bf16 would be cast to fp8 by ComfyUI anyway, unscaled (weights below fp8's smallest step flush to zero),
and the file would then be another model in ComfyUI than in `read_checkpoint`. The other tensors stay bf16.

Scale = amax / 448, e4m3fn's largest finite value: the largest weight lands on the top of the fp8 range.
The marker has two elements, which ComfyUI's model_detection reads as "fp8 matrix multiplication off": every
device then computes with weight * scale in its compute dtype, the model `read_checkpoint` rebuilds and the one
whose accuracy reports/fp8_export.md measures. (An empty marker would turn on fp8 activations, unscaled, on GPUs
that have fp8 matmul; a creator can still choose that with the loader's weight_dtype fp8_e4m3fn_fast.)
"""
from __future__ import annotations

import torch

from .wan_keys import WEIGHT_SCALES

FP8_SCALED = "fp8_scaled"  # the name export settings and save_checkpoint use for this format
WEIGHT_DTYPE = torch.float8_e4m3fn
OTHER_DTYPE = torch.bfloat16  # norms, biases, modulation, patch embedding: as ComfyUI's Wan fp8_scaled files
_MAX = torch.finfo(WEIGHT_DTYPE).max  # 448
_SCALE = WEIGHT_SCALES[0]  # "scale_weight", fp8_scaled's spelling (mixed-precision files use "weight_scale")


def marker() -> torch.Tensor:
    """The `scaled_fp8` tensor: its dtype names the weights' fp8 type, its two elements turn fp8 matmul off."""
    return torch.zeros(2, dtype=WEIGHT_DTYPE)


def linear_weight_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the weights ComfyUI holds in fp8 under the marker: every Linear layer's."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale of shape ()) with weight ~ fp8.float() * scale; shape () is the shape of
    ComfyUI's scale_weight parameter, which it loads by copy."""
    w = weight.detach().float()
    amax = w.abs().amax()
    # an all-zero weight has no range to map; any positive scale stores it exactly
    scale = amax / _MAX if amax > 0 else torch.tensor(1.0)
    # the division can land a hair above 448, which e4m3fn (no infinity) would turn into NaN
    return (w / scale).clamp(-_MAX, _MAX).to(WEIGHT_DTYPE), scale.reshape(())


def fp8_scaled_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict (its own key names) as an fp8_scaled file holds it: each Linear weight quantized with
    its `scale_weight` beside it, the other floating tensors in OTHER_DTYPE. Raises ValueError naming the first
    tensor holding NaN or inf: its scale would be NaN or inf, and with it the whole layer."""
    state = model.state_dict()
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{bad} holds NaN or inf values: a model with non-finite weights cannot be quantized "
                         "(nor run); export a checkpoint from before the training diverged")
    linear = linear_weight_keys(model)
    out = {}
    for key, tensor in state.items():
        if key in linear:
            out[key], out[key[: -len("weight")] + _SCALE] = quantize(tensor)
        else:
            out[key] = tensor.to(OTHER_DTYPE) if tensor.is_floating_point() else tensor
    return out
