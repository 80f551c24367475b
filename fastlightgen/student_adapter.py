"""A student as a small adapter: its prune plan plus low-rank deltas to the teacher weights a creator has.

File: safetensors in ComfyUI LoRA form, keys in ORIGINAL block numbering (only kept blocks, plus the modules
outside the blocks): `diffusion_model.blocks.N.self_attn.q.lora_A.weight` (rank x in) / `.lora_B.weight`
(out x rank), delta = lora_B @ lora_A (no alpha, strength 1); `.diff` (the whole weight delta) where the tensor
is small (norms, modulation, 1-D, Conv3d) or a rank-r pair would not be smaller than the delta; `.diff_b` for
biases. A delta that is exactly zero is not stored. The header's `__metadata__["fastlightgen_adapter"]` holds
JSON `AdapterMeta`: the plan (kept original blocks, original block count), recommended `Sampling`, the rank
or energy setting with the rank each linear layer kept (`ranks`), and the base fingerprint (family, block
count, width) with a sampled-weights signature.
Rank per layer: a fixed `rank`, or with `energy` E the smallest r whose singular values hold share E of the
delta's squared singular values (its squared Frobenius norm); either way a layer whose rank-r factors would
not be smaller than the delta is stored whole.

Applying: `fastlightgen.lora_remap.remap_lora` renumbers the keys onto the student's blocks, the same
mechanism that moves style LoRAs; ComfyUI applies the result with its own weight patching (nodes/adapter.py),
the library with `apply_adapter` on a diffusers `WanTransformer3DModel`.
A base of another family/block count/width is refused (`AdapterError` naming both); sampled base weights that
differ beyond fp8 quantization error give a warning (`signature_error` > `SIGNATURE_TOLERANCE`).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapters import adapt
from .adapters.base import ModelFingerprint
from .checkpoint import ADAPTER_METADATA_KEY as METADATA_KEY
from .io_utils import atomic_path
from .lora_remap import LoRAKeyError, lora_modules, remap_lora
from .sampling import FEW_STEP, Sampling
from .wan_keys import diffusers_to_original

ADAPTER_FORMAT = "fastlightgen.student_adapter/1"
PREFIX = "diffusion_model."
SIGNATURE_SAMPLES = 256
# Relative L2 error of the sampled base weights: fp8_e4m3fn rounding stays near 0.03; another model is ~1.4.
SIGNATURE_TOLERANCE = 0.1
MIN_LOWRANK_SIDE = 32  # weights with a side below this are stored whole (.diff)


class AdapterError(ValueError):
    """An adapter file or base model that cannot be used; the message names the problem and the fix."""


@dataclass
class AdapterMeta:
    base: ModelFingerprint
    kept_blocks: list[int]
    rank: int  # 0: every delta whole (the exact student)
    energy: float | None = None  # when set, each layer's rank keeps this share of its delta's squared norm
    head_dim: int = 128
    signature: dict[str, list[float]] = field(default_factory=dict)  # original key -> sampled base values
    recommended: Sampling = FEW_STEP
    provenance: dict[str, Any] = field(default_factory=dict)
    # linear layer (module of the tensor keys, original numbering) -> rank kept; 0: its delta is stored whole
    ranks: dict[str, int] = field(default_factory=dict)
    format: str = ADAPTER_FORMAT

    @property
    def original_num_blocks(self) -> int:
        return self.base.num_blocks

    def to_json(self) -> str:
        d = asdict(self)
        d["base"] = self.base.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterMeta:
        d = json.loads(text)
        d["base"] = ModelFingerprint.from_dict(d["base"])
        d["recommended"] = Sampling.from_dict(d["recommended"])
        return cls(**d)


@dataclass
class Adapter:
    meta: AdapterMeta
    tensors: dict[str, torch.Tensor]  # original block numbering, ComfyUI LoRA keys
    path: Path | None = None

    def student_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors with block keys renumbered onto the student's blocks 0..k-1 (as style LoRAs are)."""
        out, _ = remap_lora(self.tensors, self.meta.kept_blocks, self.meta.original_num_blocks)
        return out


# ---- base fingerprint ---------------------------------------------------------------------------

def signature_keys(num_blocks: int) -> list[str]:
    """Original-layout weights sampled for the signature: first and last block, text embedding and head."""
    return ["blocks.0.self_attn.q.weight", f"blocks.{num_blocks - 1}.ffn.2.weight", "text_embedding.0.weight",
            "head.head.weight"]


def sample_weight(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SIGNATURE_SAMPLES, flat.numel())).round().long()
    return flat[index.to(flat.device)].float().cpu()


def signature(weights: Callable[[str], torch.Tensor], num_blocks: int) -> dict[str, list[float]]:
    """`weights(original key)` -> dequantized weight; the sampled values, rounded to 6 significant digits."""
    return {k: [float(f"{v:.6g}") for v in sample_weight(weights(k)).tolist()] for k in signature_keys(num_blocks)}


def signature_error(meta: AdapterMeta, weights: Callable[[str], torch.Tensor]) -> float:
    """Largest relative L2 error between the base's sampled weights and the adapter's record of its teacher's."""
    worst = 0.0
    for key, values in meta.signature.items():
        ref = torch.tensor(values)
        got = sample_weight(weights(key))
        worst = max(worst, ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item())
    return worst


def check_base(meta: AdapterMeta, base: ModelFingerprint, weights: Callable[[str], torch.Tensor],
               where: str = "the adapter") -> float:
    """Refuse a base of another shape; warn when its sampled weights are not the teacher's. Returns the error."""
    if base != meta.base:
        raise AdapterError(f"{where} was made for a {meta.base} but the base model is a {base}; load the teacher "
                           f"the adapter was exported from (a {meta.base})")
    err = signature_error(meta, weights)
    if err > SIGNATURE_TOLERANCE:
        warnings.warn(f"{where}: the base model's sampled weights differ from the adapter's teacher by "
                      f"{err:.3f} (relative; fp8 rounding stays below {SIGNATURE_TOLERANCE}): this is probably "
                      "another checkpoint of the same shape, and the student built on it will be wrong; load the "
                      "teacher the adapter was exported from", stacklevel=2)
    return err


# ---- making an adapter --------------------------------------------------------------------------

def check_setting(rank: int, energy: float | None) -> None:
    """Refuse a rank or energy setting that makes no adapter (before any model or file is read)."""
    if rank < 0:
        raise AdapterError(f"adapter rank must be >= 0 (0 = whole deltas), got {rank}")
    if energy is None:
        return
    if not 0 < energy <= 1:  # also NaN
        raise AdapterError(f"adapter energy must be a share in (0, 1] (0.99: each layer keeps the fewest singular "
                           f"values holding 99% of its delta's squared norm; 1: the exact student), got {energy!r}")
    if rank:
        raise AdapterError(f"give an adapter rank ({rank}) or an energy ({energy}), not both: the energy chooses "
                           "each layer's rank")


def layer_rank(singular: torch.Tensor, rank: int, energy: float | None) -> int:
    """Rank kept for one delta from its singular values: the setting (0: all), or with `energy` the smallest r
    whose r largest squared singular values hold share `energy` of their sum."""
    if energy is not None:
        power = singular.double().pow(2)
        total = power.sum()
        if total == 0:
            return 0
        kept = int(torch.searchsorted(power.cumsum(0) / total, torch.tensor(energy, dtype=torch.float64)).item()) + 1
        return min(kept, singular.numel())
    return singular.numel() if rank == 0 else min(rank, singular.numel())


def delta_tensors(delta: torch.Tensor, module: str, leaf: str, rank: int, energy: float | None,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter tensors for one parameter's delta (`module` in original names, with `diffusion_model.`)."""
    if not delta.any():
        return {}
    cast = lambda t: t.to(dtype).contiguous()
    if leaf == "bias":
        return {f"{module}.diff_b": cast(delta)}
    whole = {f"{module}.diff": cast(delta)}
    if delta.ndim != 2 or min(delta.shape) < MIN_LOWRANK_SIDE or (rank == 0 and energy is None):
        return whole
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = layer_rank(s, rank, energy)
    if r * sum(delta.shape) >= delta.numel():
        return whole
    return {f"{module}.lora_B.weight": cast(u[:, :r] * s[:r]), f"{module}.lora_A.weight": cast(vh[:r])}


def make_adapter(teacher: torch.nn.Module, student: torch.nn.Module, kept_blocks: list[int], *, rank: int = 0,
                 energy: float | None = None, recommended: Sampling = FEW_STEP, dtype: torch.dtype = torch.bfloat16,
                 provenance: dict | None = None) -> Adapter:
    """The adapter turning diffusers Wan `teacher` into `student` (physically pruned, keeping `kept_blocks`)."""
    check_setting(rank, energy)
    kept = list(kept_blocks)
    fp = adapt(teacher).fingerprint()
    if len(kept) != len(student.blocks):
        raise AdapterError(f"the student has {len(student.blocks)} blocks but kept_blocks lists {len(kept)} ({kept})")
    expected = adapt(teacher).pruned_state_dict(kept)
    got = student.state_dict()
    if set(expected) != set(got) or any(expected[k].shape != got[k].shape for k in got):
        raise AdapterError(f"the student is not the teacher ({fp}) pruned to blocks {kept}: its weights differ "
                           "in names or shapes; pass the teacher it was distilled from")
    # student (renumbered) names -> teacher (original) names, in the original layout
    renumber = {f"blocks.{i}.": f"blocks.{b}." for i, b in enumerate(kept)}
    tensors: dict[str, torch.Tensor] = {}
    for key, original in diffusers_to_original({k: k for k in got}).items():
        delta = got[original].detach().float() - expected[original].detach().float()
        if key.startswith("blocks."):
            head, rest = key.split(".", 2)[1], key.split(".", 2)[2]
            key = renumber[f"blocks.{head}."] + rest
        module, _, leaf = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        tensors.update(delta_tensors(delta.cpu(), PREFIX + module, leaf, rank, energy, dtype))
    teacher_sd = diffusers_to_original(teacher.state_dict())
    meta = AdapterMeta(fp, kept, rank, energy, teacher.config.attention_head_dim,
                       signature(lambda k: teacher_sd[k], fp.num_blocks), recommended, dict(provenance or {}),
                       layer_ranks(tensors))
    return Adapter(meta, tensors)


def layer_ranks(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Linear layer -> rank kept (0: stored whole, `.diff` of a matrix), from an adapter's tensors."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            out[key[:-len(".lora_A.weight")]] = t.shape[0]
        elif key.endswith(".diff") and t.ndim == 2:
            out[key[:-len(".diff")]] = 0
    return dict(sorted(out.items()))


def ranks_summary(ranks: Mapping[str, int]) -> str:
    """`AdapterMeta.ranks` in a few words: how many layers are low-rank (rank range, median) and how many whole."""
    low = sorted(r for r in ranks.values() if r)
    whole = len(ranks) - len(low)
    if not low:
        return f"all {whole} linear layers whole"
    return f"{len(low)} linear layers low-rank (ranks {low[0]}..{low[-1]}, median {low[len(low) // 2]}), {whole} whole"


def describe_ranks(meta: AdapterMeta) -> str:
    """The setting and the ranks the linear layers kept, in one line."""
    setting = (f"energy {meta.energy}" if meta.energy is not None else
               f"rank {meta.rank}" if meta.rank else "whole deltas")
    return f"{setting}: {ranks_summary(meta.ranks)}"


def save_adapter(path: str | Path, adapter: Adapter) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(adapter.tensors, str(tmp), metadata={METADATA_KEY: adapter.meta.to_json()})
    return path


# ---- reading and applying -----------------------------------------------------------------------

def read_adapter(path: str | Path) -> Adapter:
    """Validate and read an adapter file; any problem is an `AdapterError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
            if text is None:
                raise AdapterError(f"{path}: not a FastLightGen student adapter (no {METADATA_KEY!r} metadata); a "
                                   "style LoRA goes to 'FastLightGen LoRA (pruned student)', a student checkpoint "
                                   "to 'Load FastLightGen Checkpoint'")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({err}); the file is damaged or cut short, "
                           "export or copy it again") from None
    try:
        meta = AdapterMeta.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise AdapterError(f"{path}: adapter metadata is unreadable ({err}); export the adapter again") from None
    if meta.format != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: adapter format {meta.format!r}, this FastLightGen reads {ADAPTER_FORMAT!r}; "
                           "upgrade FastLightGen or export the adapter again")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterError(f"{path}: tensor {bad[0]} holds NaN or inf; the file is damaged, export it again")
    try:
        lora_modules(tensors)
        remap_lora(tensors, meta.kept_blocks, meta.original_num_blocks)
    except LoRAKeyError as err:
        raise AdapterError(f"{path}: {err}") from None
    stray = sorted({m.block for m in lora_modules(tensors).values() if m.block is not None} - set(meta.kept_blocks))
    if stray:
        raise AdapterError(f"{path}: deltas on blocks {stray} that the plan drops; the file was altered, export it "
                           "again")
    return Adapter(meta, tensors, path)


def module_delta(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight delta, bias delta) of one module's adapter tensors (suffix -> tensor), in float32."""
    weight = None
    if "lora_B.weight" in tensors:
        weight = tensors["lora_B.weight"].float() @ tensors["lora_A.weight"].float()
    if "diff" in tensors:
        weight = tensors["diff"].float() if weight is None else weight + tensors["diff"].float()
    return weight, tensors["diff_b"].float() if "diff_b" in tensors else None


def apply_adapter(teacher: torch.nn.Module, adapter: Adapter) -> torch.nn.Module:
    """The student: a new pruned diffusers Wan with the deltas merged; `teacher` is left unchanged."""
    meta = adapter.meta
    where = str(adapter.path or "the adapter")
    state = diffusers_to_original(teacher.state_dict())
    check_base(meta, adapt(teacher).fingerprint(), lambda k: state[k].float(), where)
    student = adapt(teacher).pruned_model(meta.kept_blocks)
    params = diffusers_to_original(dict(student.named_parameters()))
    with torch.no_grad():
        for name, module in lora_modules(adapter.student_tensors()).items():
            weight, bias = module_delta(module.tensors)
            base = name[len(PREFIX):]
            for leaf, delta in (("weight", weight), ("bias", bias)):
                if delta is None:
                    continue
                key = base if base in params and leaf == "weight" else f"{base}.{leaf}"
                if key not in params or params[key].shape != delta.shape:
                    raise AdapterError(f"{where}: delta {name} ({tuple(delta.shape)}) matches no weight of the "
                                       "student; the file was altered, export it again")
                p = params[key]
                p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
    return student


def adapter_bytes(shapes: Mapping[str, tuple[int, ...]], rank: int, bytes_per_value: int = 2) -> int:
    """Tensor bytes of an adapter at `rank` (0: whole) over weights `shapes` (original name -> shape), every
    delta assumed nonzero: the size formula `make_adapter` follows, for shapes without weights."""
    total = 0
    for shape in shapes.values():
        n = math.prod(shape)
        lowrank = rank and len(shape) == 2 and min(shape) >= MIN_LOWRANK_SIDE and rank * sum(shape) < n
        total += rank * sum(shape) if lowrank else n
    return total * bytes_per_value

