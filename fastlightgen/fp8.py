"""Writing ComfyUI's fp8_scaled format: every Linear layer in float8_e4m3fn, each weight with a per-tensor scale.

Which tensors are quantized follows what ComfyUI's loader does with such a file (comfy/model_detection.py,
comfy/ops.py `scaled_fp8_ops`): the `scaled_fp8` marker makes it build every Linear layer of its Wan, in the
blocks and outside them (text and time embeddings, time projection, head), with an fp8 weight, a `scale_weight`
parameter that defaults to 1 and an fp8 bias (no scale); the rest (norms, modulation, the patch Conv3d) it keeps
in its compute dtype. So every Linear weight is quantized here, each with its own scale (one left in bf16 would be
cast to fp8 by ComfyUI anyway, unscaled: weights below fp8's smallest step flush to zero), and every Linear bias is
stored as the fp8 value ComfyUI's loader would cast it to: the file holds the model ComfyUI runs, and
`read_checkpoint` rebuilds that same model rather than a better one nobody runs. The other tensors stay bf16.

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
OTHER_DTYPE = torch.bfloat16  # norms, modulation, patch embedding: Wan's own (ComfyUI holds them in its compute dtype)
_MAX = torch.finfo(WEIGHT_DTYPE).max  # 448
_SCALE = WEIGHT_SCALES[0]  # "scale_weight", fp8_scaled's spelling (mixed-precision files use "weight_scale")


def marker() -> torch.Tensor:
    """The `scaled_fp8` tensor: its dtype names the weights' fp8 type, its two elements turn fp8 matmul off."""
    return torch.zeros(2, dtype=WEIGHT_DTYPE)


def linear_modules(model: torch.nn.Module) -> set[str]:
    """Names of the modules ComfyUI holds in fp8 under the marker: every Linear layer."""
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale of shape ()) with weight ~ fp8.float() * scale; shape () is the shape of
    ComfyUI's scale_weight parameter, which it loads by copy."""
    w = weight.detach().float()
    amax = w.abs().amax()
    # an all-zero weight has no range to map; any positive scale stores it exactly
    scale = amax / _MAX if amax > 0 else torch.tensor(1.0)
    return _to_fp8(w / scale), scale.reshape(())


def _to_fp8(values: torch.Tensor) -> torch.Tensor:
    # clamped: w / scale can land a hair above 448, and older torch versions cast what lies past 448 to NaN
    # (e4m3fn has no infinity; newer ones saturate)
    return values.float().clamp(-_MAX, _MAX).to(WEIGHT_DTYPE)


def fp8_scaled_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict (its own key names) as an fp8_scaled file holds it: each Linear weight quantized with
    its `scale_weight` beside it, each Linear bias in fp8, the other floating tensors in OTHER_DTYPE. Raises
    ValueError naming the first tensor holding NaN or inf: its scale would be NaN or inf, and with it the layer."""
    state = model.state_dict()
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{bad} holds NaN or inf values: a model with non-finite weights cannot be quantized "
                         "(nor run); export a checkpoint from before the training diverged")
    linear = linear_modules(model)
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in linear and leaf == "weight":
            out[key], out[f"{module}.{_SCALE}"] = quantize(tensor)
        elif module in linear:  # the bias: the value ComfyUI's loader casts it to
            out[key] = _to_fp8(tensor.detach())
        else:
            out[key] = tensor.to(OTHER_DTYPE) if tensor.is_floating_point() else tensor
    return out
