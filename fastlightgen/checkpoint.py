"""The FastLightGen checkpoint: one safetensors file in the original/ComfyUI Wan layout plus JSON metadata.

Weights are stored with original Wan key names and blocks renumbered 0..K-1, so ComfyUI's stock
diffusion-model loader reads a pruned student as a smaller Wan. The safetensors header's
`__metadata__["fastlightgen"]` holds a JSON `CheckpointMeta`: format version, family, the original
block count and which original blocks were kept, the recommended `Sampling`, training provenance, and for one
expert of a two-expert model (Wan 2.2 A14B, one file per expert) the expert and the boundary.

`read_checkpoint` also reads every Wan DiT file ComfyUI's stock loader reads: diffusers or original layout,
fp32/fp16/bf16, fp8 (e4m3fn, e5m2), ComfyUI's fp8_scaled files (per-Linear `scale_weight`/`scale_input`
tensors plus a `scaled_fp8` marker tensor whose dtype is the weights' fp8 type), ComfyUI's mixed-precision
files (`weight_scale`/`input_scale` tensors, per-layer formats in the header's `_quantization_metadata`), and
all-in-one files whose DiT keys carry the `model.diffusion_model.` prefix (the other components are left out,
as ComfyUI's loader does). The scales stay beside the stored weights: `comfy_state_dict` gives ComfyUI the
file as it is, `weights(dtype)` dequantizes (stored weight * scale, in float32, then `dtype`).
`save_checkpoint` writes bf16/fp16/fp32, or fp8_scaled as ComfyUI distributes Wan (fastlightgen/fp8.py).
`read_folder` reads a diffusers transformer folder (one or several safetensors files) the same way.
Every failure is a `CheckpointError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .diffusers_folder import folder_tensors, weight_files
from .experts import EXPERTS, check_boundary
from .fp8 import FP8_SCALED, fp8_scaled_state_dict, marker
from .io_utils import atomic_path
from .plan import PrunePlan
from .sampling import FEW_STEP, Sampling
from .stored import StoredTensor, dequantized
from .wan_config import DEFAULT_HEAD_DIM, build_wan_from_state_dict, infer_wan_config
from .wan_keys import COMFY_PREFIX, INPUT_SCALES, WEIGHT_SCALES, diffusers_to_original, to_diffusers_layout

FORMAT_VERSION = 1
METADATA_KEY = "fastlightgen"
ADAPTER_METADATA_KEY = "fastlightgen_adapter"  # fastlightgen.student_adapter's files
FAMILIES = ("wan",)
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's model_detection reads the fp8 type of the weights from its dtype
QUANT_METADATA_KEY = "_quantization_metadata"  # ComfyUI's mixed precision: {"layers": {name: {"format": ..}}}
MIXED_FORMATS = ("float8_e4m3fn",)  # per-tensor scaled formats `weights` can dequantize
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_COMPUTE_DTYPE = torch.bfloat16  # what fp8 files are dequantized to when no dtype is asked for (Wan's own)
FP8_STORED = ("F8_E4M3", "F8_E5M2")  # FP8_DTYPES as a safetensors header names them
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, the problem and the fix."""


@dataclass
class CheckpointMeta:
    original_num_blocks: int
    kept_blocks: list[int]
    family: str = "wan"
    head_dim: int = DEFAULT_HEAD_DIM
    recommended: Sampling = FEW_STEP  # how the checkpoint is meant to be sampled
    provenance: dict[str, Any] = field(default_factory=dict)
    # one expert of a two-expert model (Wan 2.2 A14B): "high" or "low" (fastlightgen.experts), and the sigma where
    # the low-noise expert takes over; None for a one-expert model
    expert: str | None = None
    boundary: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if (self.expert is None) != (self.boundary is None):
            raise CheckpointError("an expert's checkpoint names both its expert and the boundary, got "
                                  f"expert={self.expert!r}, boundary={self.boundary!r}")
        if self.expert is not None:
            if self.expert not in EXPERTS:
                raise CheckpointError(f"unknown expert {self.expert!r}; the experts are {', '.join(EXPERTS)}")
            check_boundary(self.boundary)

    def to_json(self) -> str:
        # a one-expert file's metadata leaves the expert fields out: as written before they existed
        d = {k: v for k, v in asdict(self).items() if v is not None or k not in ("expert", "boundary")}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        d = json.loads(text)
        d["recommended"] = Sampling.from_dict(d["recommended"]) if "recommended" in d else FEW_STEP
        return cls(**d)


@dataclass
class LoadedCheckpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]  # diffusers layout, as stored (fp8 weights stay fp8 and unscaled)
    meta: CheckpointMeta | None
    config: dict[str, Any]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # fp8 scales, diffusers names
    marker: torch.Tensor | None = None  # the `scaled_fp8` tensor of an fp8_scaled file
    file_metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__
    left_out: list[str] = field(default_factory=list)  # non-DiT tensors of an all-in-one checkpoint

    @property
    def weight_format(self) -> str:
        """'bf16', 'fp8_e4m3fn', 'fp8_scaled (fp8_e4m3fn)', ...: the dtype holding most parameters, as ComfyUI
        picks it, and the scaling scheme."""
        counts: dict[torch.dtype, int] = {}
        for t in self.state_dict.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        top = max(counts, key=counts.get)
        name = _DTYPE_NAMES.get(top, str(top))
        if self.marker is not None:
            return f"fp8_scaled ({name})"
        return f"fp8 mixed precision ({name})" if self.scales else name

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        """Original layout, with the scales and the marker: the tensors ComfyUI's loader would read from the file."""
        out = diffusers_to_original({**self.state_dict, **self.scales})
        if self.marker is not None:
            out[SCALED_FP8_MARKER] = self.marker
        return out

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Diffusers-layout weights in `dtype`: fp8 weights times their scale (in float32). dtype None keeps an
        unquantized file's dtypes and gives an fp8 file in bfloat16 (fp8 cannot compute in diffusers)."""
        if dtype is None and any(t.dtype in FP8_DTYPES for t in self.state_dict.values()):
            dtype = FP8_COMPUTE_DTYPE
        return {key: dequantized(tensor, _weight_scale(self.scales, key), dtype)
                for key, tensor in self.state_dict.items()}

    def build_model(self, dtype: torch.dtype | None = None):
        return build_wan_from_state_dict(self.weights(dtype), self.meta.head_dim if self.meta else DEFAULT_HEAD_DIM)


def _weight_scale(scales: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The fp8 scale of weight `key` (diffusers names), if it has one."""
    if not key.endswith(".weight"):
        return None
    module = key[: -len("weight")]
    return next((scales[module + leaf] for leaf in WEIGHT_SCALES if module + leaf in scales), None)


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: CheckpointMeta,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` (a diffusers Wan, already physically pruned) with `meta`, atomically. `dtype`: a torch dtype
    for every floating tensor (None: as they are), or FP8_SCALED for ComfyUI's fp8_scaled (fastlightgen.fp8).
    Every check runs before the file is opened: a refused model leaves no file."""
    path = Path(path)
    if meta.family not in FAMILIES:
        raise CheckpointError(f"{path}: family {meta.family!r} cannot be saved; supported: {FAMILIES}")
    if len(meta.kept_blocks) != len(model.blocks):
        raise CheckpointError(f"{path}: metadata keeps {len(meta.kept_blocks)} blocks but the model has "
                              f"{len(model.blocks)}; save the physically pruned model")
    tensors = {k: v.detach().contiguous() for k, v in diffusers_to_original(_stored(path, model, dtype)).items()}
    if dtype == FP8_SCALED:
        tensors[SCALED_FP8_MARKER] = marker()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: meta.to_json()})
    return path


def _stored(path: Path, model: torch.nn.Module, dtype: torch.dtype | str | None) -> dict[str, torch.Tensor]:
    """`model`'s state dict (diffusers names) in the format `dtype` names."""
    if dtype == FP8_SCALED:
        try:
            return fp8_scaled_state_dict(model)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
    if isinstance(dtype, str):
        raise CheckpointError(f"{path}: unknown dtype {dtype!r}; pass a torch dtype or {FP8_SCALED!r}")
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def read_checkpoint(path: str | Path, plan: PrunePlan | None = None) -> LoadedCheckpoint:
    """Validate and read a Wan DiT safetensors file: FastLightGen, original or diffusers layout, any of the
    weight formats above."""
    path = Path(path)
    _, file_metadata, meta, config = _checked_header(path, plan)
    state_dict, scales, marker, left_out = _split(path, load_file(str(path)))
    _check_scales(path, scales)
    return LoadedCheckpoint(path, state_dict, meta, config, scales, marker, file_metadata, left_out)


def read_folder(folder: str | Path) -> LoadedCheckpoint:
    """Read a diffusers transformer folder (config.json and one or several safetensors files, fastlightgen.
    diffusers_folder) as `read_checkpoint` reads a file; its names and shapes are checked before any weight is read."""
    folder = Path(folder)
    layout, _, _, _ = _split(folder, {name: torch.empty(t.shape, device="meta")
                                      for name, t in folder_tensors(folder).items()})
    # the width of a head is not in the tensors' shapes: the folder's config.json names it
    head_dim = json.loads((folder / "config.json").read_text()).get("attention_head_dim", DEFAULT_HEAD_DIM)
    config = _config(folder, layout, head_dim)
    _check_complete(folder, layout, config)
    tensors = {key: tensor for file in weight_files(folder) for key, tensor in load_file(str(file)).items()}
    state_dict, _, _, _ = _split(folder, tensors)
    return LoadedCheckpoint(folder, state_dict, None, config)


def read_meta(path: str | Path) -> CheckpointMeta | None:
    """A file's FastLightGen metadata (None for a file without) from its header alone, checked as
    `read_checkpoint` checks it: what a loader decides before gigabytes of weights are read."""
    path = Path(path)
    return _parse_meta(path, dict(read_safetensors_header(path).get("__metadata__") or {}))


def checkpoint_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """Every weight of a Wan DiT file by its diffusers name, located but not read (the fp8 scales are): each
    reads as `read_checkpoint(path).weights()` gives it. The file is checked as `read_checkpoint` checks it."""
    path = Path(path)
    header, _, _, _ = _checked_header(path, None)
    keys, scale_keys, _, _ = _split(path, {key: key for key in header})  # the values: each tensor's key in the file
    with safe_open(path, "pt") as f:
        scales = {name: f.get_tensor(key) for name, key in scale_keys.items()}
    _check_scales(path, scales)
    fp8 = any(header[key]["dtype"] in FP8_STORED for key in keys.values())
    return {name: StoredTensor(path, key, tuple(header[key]["shape"]), _weight_scale(scales, name),
                               FP8_COMPUTE_DTYPE if fp8 else None) for name, key in keys.items()}


def _checked_header(path: Path, plan: PrunePlan | None) -> tuple[dict, dict, CheckpointMeta | None, dict]:
    """(tensor entries, `__metadata__`, FastLightGen metadata, diffusers config) of a Wan DiT file whose names,
    shapes, quantization and metadata (and fit to `plan`) are checked: from its header, before any weight is read."""
    header = read_safetensors_header(path)
    file_metadata = dict(header.pop("__metadata__", None) or {})
    if ADAPTER_METADATA_KEY in file_metadata:
        raise CheckpointError(f"{path}: a FastLightGen student adapter, not a checkpoint: load its teacher with the "
                              "stock Load Diffusion Model and apply it with 'FastLightGen Apply Student Adapter' "
                              "(in Python: fastlightgen.student_adapter.apply_adapter)")
    meta = _parse_meta(path, file_metadata)
    # Every check of names and shapes runs on the header, before gigabytes of weights are read.
    layout, scale_shapes, marker, _ = _split(path, _meta_tensors(header))
    config = _config(path, layout, _head_dim(meta))
    _check_complete(path, layout, config)
    _check_quantization(path, layout, scale_shapes, marker is not None, file_metadata)
    if meta is not None and len(meta.kept_blocks) != config["num_layers"]:
        raise CheckpointError(f"{path}: metadata lists {len(meta.kept_blocks)} kept blocks but the file holds "
                              f"{config['num_layers']}; the file was altered after export, re-export it")
    if plan is not None:
        _check_plan(path, plan, meta, config)
    return header, file_metadata, meta, config


def header_config(path: str | Path, header: dict) -> dict:
    """The diffusers config of a Wan DiT file from its safetensors header alone (tensor names and shapes, and
    `__metadata__`; the tensor data may be absent): the model `read_checkpoint` would build."""
    path, header = Path(path), dict(header)
    meta = _parse_meta(path, dict(header.pop("__metadata__", None) or {}))
    layout, _, _, _ = _split(path, _meta_tensors(header))
    return _config(path, layout, _head_dim(meta))


def _meta_tensors(header: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}


def _head_dim(meta: CheckpointMeta | None) -> int:
    return meta.head_dim if meta else DEFAULT_HEAD_DIM


def _config(path: Path, layout: dict[str, torch.Tensor], head_dim: int) -> dict:
    try:
        return infer_wan_config(layout, head_dim)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_scales(path: Path, scales: dict[str, torch.Tensor]) -> None:
    bad = [f"{k} is {v.item()}" for k, v in scales.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise CheckpointError(f"{path}: fp8 scale {bad[0]}; the file is damaged, download it again")


def load_wan(path: str | Path, plan: PrunePlan | None = None, dtype: torch.dtype | None = None):
    """(diffusers WanTransformer3DModel, CheckpointMeta or None) from a checkpoint file; fp8 weights are
    dequantized to `dtype` (default bfloat16), other files keep their dtype unless `dtype` is given."""
    ckpt = read_checkpoint(path, plan)
    return ckpt.build_model(dtype).eval(), ckpt.meta


def _is_scale(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in (*WEIGHT_SCALES, *INPUT_SCALES)


def _split(path: Path, tensors: dict[str, torch.Tensor]):
    """(diffusers-layout weights, fp8 scales, `scaled_fp8` marker or None, names left out) of a file's tensors.

    In a file with `model.diffusion_model.` keys only those are the DiT (the rest is the VAE, text encoder, ...
    of an all-in-one checkpoint), as ComfyUI's loader decides."""
    left_out = []
    if any(k.startswith(COMFY_PREFIX) for k in tensors):
        left_out = sorted(k for k in tensors if not k.startswith(COMFY_PREFIX))
        tensors = {k[len(COMFY_PREFIX):]: v for k, v in tensors.items() if k.startswith(COMFY_PREFIX)}
    tensors = dict(tensors)
    marker = tensors.pop(SCALED_FP8_MARKER, None)
    try:
        renamed = to_diffusers_layout(tensors)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    weights = {k: v for k, v in renamed.items() if not _is_scale(k)}
    return weights, {k: v for k, v in renamed.items() if _is_scale(k)}, marker, left_out


def _check_quantization(path: Path, state_dict: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                        has_marker: bool, metadata: dict) -> None:
    """A scale ComfyUI would ignore (no marker / no quantization metadata) means wrong weights there: refuse."""
    leaves = {k.rsplit(".", 1)[-1] for k in scales}
    mixed = QUANT_METADATA_KEY in metadata
    if has_marker and mixed:
        raise CheckpointError(f"{path}: both a {SCALED_FP8_MARKER!r} marker and {QUANT_METADATA_KEY!r} metadata; "
                              "a file holds one fp8 scheme, re-save it from ComfyUI")
    legacy, new = leaves & {"scale_weight", "scale_input"}, leaves & {"weight_scale", "input_scale"}
    if legacy and not has_marker:
        raise CheckpointError(f"{path}: fp8 scales {sorted(legacy)} but no {SCALED_FP8_MARKER!r} marker tensor, so "
                              "ComfyUI would ignore the scales and run wrong weights; add the marker (an empty tensor "
                              "of the weights' fp8 dtype) or use an fp16/bf16 file")
    if new and not mixed:
        raise CheckpointError(f"{path}: fp8 scales {sorted(new)} but no {QUANT_METADATA_KEY!r} in the header, so "
                              "ComfyUI would ignore the scales and run wrong weights; use the file as ComfyUI saved it")
    if mixed:
        _check_mixed_formats(path, metadata[QUANT_METADATA_KEY])
    for key, scale in scales.items():
        module = key.rsplit(".", 1)[0]
        if module + ".weight" not in state_dict:
            raise CheckpointError(f"{path}: fp8 scale {key} has no weight {module}.weight beside it")
        if scale.numel() != 1:
            raise CheckpointError(f"{path}: fp8 scale {key} has shape {tuple(scale.shape)}; only per-tensor "
                                  "scales (one number) are supported")


def _check_mixed_formats(path: Path, text: str) -> None:
    try:
        layers = json.loads(text)["layers"]
        formats = {str(spec.get("format")) for spec in layers.values()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"{path}: the header's {QUANT_METADATA_KEY!r} is not ComfyUI's "
                              "{\"layers\": {name: {\"format\": ...}}}; re-save it from ComfyUI") from None
    unknown = sorted(formats - set(MIXED_FORMATS))
    if unknown:
        raise CheckpointError(f"{path}: quantization formats {unknown} cannot be dequantized here (supported: "
                              f"{list(MIXED_FORMATS)}); use the fp16, bf16 or fp8_scaled release of this model")


def read_safetensors_header(path: Path) -> dict:
    """The header of a complete safetensors file; an error naming the fix for anything else (a pickle never loads)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); export it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (no valid header; is it a pickle .pt/.ckpt? "
                                  "convert it to .safetensors first)")
        raw = f.read(length)
    if len(raw) < length:
        raise CheckpointError(f"{path}: truncated: the header wants {length} bytes but the file has {size}; "
                              "the download or copy was cut short, copy it again")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON); "
                              "convert it to .safetensors first") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + data_end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + length + data_end} bytes but the file has "
                              f"{size}; the download or copy was cut short, copy it again")
    return header


def _parse_meta(path: Path, metadata: dict) -> CheckpointMeta | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        meta = CheckpointMeta.from_json(metadata[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: FastLightGen metadata is unreadable ({err}); re-export the checkpoint")
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.format_version} is newer than this FastLightGen "
                              f"({FORMAT_VERSION}); upgrade FastLightGen")
    if meta.family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model family {meta.family!r}; this loader reads {FAMILIES}")
    return meta


def _check_complete(path: Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        expected = WanTransformer3DModel(**config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) for a {config['num_layers']}-block Wan; the file is incomplete")
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape: {wrong[:4]}")


def _check_plan(path: Path, plan: PrunePlan, meta: CheckpointMeta | None, config: dict) -> None:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if width != plan.fingerprint.hidden_size or config["num_layers"] != len(plan.kept):
        raise CheckpointError(f"{path}: shape mismatch with the prune plan: the file holds {config['num_layers']} "
                              f"blocks of width {width}, the plan keeps {len(plan.kept)} of a "
                              f"{plan.fingerprint}; use the checkpoint exported with this plan")
    if meta is not None and (meta.kept_blocks != plan.kept
                             or meta.original_num_blocks != plan.fingerprint.num_blocks):
        raise CheckpointError(f"{path}: kept blocks {meta.kept_blocks} of {meta.original_num_blocks} differ from "
                              f"the plan's {plan.kept} of {plan.fingerprint.num_blocks}")
