"""One tensor of a safetensors file, located by its header and read whole or a flat range of its elements.

A ZeRO-3 rank keeps 1/W of every parameter: `StoredTensor.read(start, stop)` reads only the rows of the
stored tensor that hold elements [start, stop) of its flattened form, so a rank's share of a model is read
without the rest of any tensor. `scale` and `dtype` turn the stored values into those a model computes with
(fp8 dequantization, as `checkpoint.LoadedCheckpoint.weights` gives them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


def dequantized(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` times its fp8 `scale` (in float32), then in `dtype` (None: as it is)."""
    if scale is not None:
        tensor = tensor.float() * scale.float()
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    key: str  # its name in the file
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None  # an fp8 weight's per-tensor scale
    dtype: torch.dtype | None = None  # what the (scaled) values are cast to; None: the stored dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor (all of it by default), dequantized. Reads the rows
        of the first dimension that hold them: at most two rows more than asked for."""
        stop = self.numel if stop is None else stop
        with safe_open(self.file, "pt") as f:
            if not self.shape:  # a 0-d tensor cannot be sliced
                flat = f.get_tensor(self.key).reshape(-1)[start:stop]
            else:
                row = max(1, self.numel // self.shape[0])
                first = start // row
                last = max(first, -(-stop // row))  # an empty range reads no row
                flat = f.get_slice(self.key)[first:last].reshape(-1)[start - first * row:stop - first * row]
        return dequantized(flat, self.scale, self.dtype)


def stored_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file by its key; only the header is read."""
    path = Path(path)
    with safe_open(path, "pt") as f:
        return {key: StoredTensor(path, key, tuple(f.get_slice(key).get_shape())) for key in f.keys()}
