"""LoRAs made for the full Wan model, moved onto a pruned student whose blocks are renumbered 0..k-1.

A student keeps the original blocks `kept_blocks` (its `CheckpointMeta`) and stores them as blocks 0..k-1,
so a LoRA key on original block `kept_blocks[i]` belongs on block i, and keys on dropped blocks have no
target. `remap_lora` renumbers the block index of every key and changes nothing else in its spelling, drops
the keys of dropped blocks, keeps the keys outside the blocks, and reports what was left out.

Key forms (a prefix, the block part for block keys, the module name, then one of `SUFFIXES`):

* ComfyUI / original Wan names: `diffusion_model.blocks.N.self_attn.q.lora_A.weight`
* diffusers / PEFT names:       `transformer.blocks.N.attn1.to_q.lora_A.weight`
* kohya:                        `lora_unet_blocks_N_self_attn_q.lora_down.weight` (Wan Fun: `lora_unet__`)

Suffixes: `lora_A.weight`/`lora_B.weight` or `lora_down.weight`/`lora_up.weight` (the pair, optionally with
`.alpha`: delta = alpha / rank * up @ down), and the full deltas `.diff` (weight) and `.diff_b` (bias).
Any other key is a `LoRAKeyError` naming the forms accepted: a key this module does not understand is never
silently passed on or dropped.

The share left out is reported twice: by parameter count (every tensor but `.alpha`) and by the squared
Frobenius norm of the weight change each module makes (`sum ||delta W||^2`, the change at strength 1).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .wan_keys import original_to_diffusers

PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))  # (up, down)
SUFFIXES = tuple(s for pair in PAIRS for s in pair) + ("alpha", "diff", "diff_b")
DIFFUSERS_PREFIX = "transformer."
COMFY_MODEL_PREFIX = "diffusion_model."


class LoRAKeyError(ValueError):
    """A LoRA that cannot be moved onto the student; the message names the key, what is wrong and the fix."""


@dataclass(frozen=True)
class KeyForm:
    name: str
    example: str
    pattern: re.Pattern  # groups: prefix, block index (None outside the blocks), rest
    block_part: str  # how the block index is spelled, with {} for the index


FORMS = (
    KeyForm("ComfyUI/original", "diffusion_model.blocks.N.self_attn.q.lora_A.weight",
            re.compile(r"(diffusion_model\.)(?:blocks\.(\d+)\.)?(.+)"), "blocks.{}."),
    KeyForm("diffusers/PEFT", "transformer.blocks.N.attn1.to_q.lora_A.weight",
            re.compile(r"(transformer\.)(?:blocks\.(\d+)\.)?(.+)"), "blocks.{}."),
    KeyForm("kohya", "lora_unet_blocks_N_self_attn_q.lora_down.weight",
            re.compile(r"(lora_unet__?)(?:blocks_(\d+)_)?([^.]+\..+)"), "blocks_{}_"),
)


def expected_forms() -> str:
    return ("one of the Wan LoRA key forms " + ", ".join(f"{f.name} ({f.example})" for f in FORMS)
            + f", ending in {', '.join('.' + s for s in SUFFIXES)}")


@dataclass(frozen=True)
class LoRAKey:
    key: str
    form: KeyForm
    prefix: str
    block: int | None  # original block index; None for keys outside the blocks
    module: str  # the module name after the block part, e.g. "self_attn.q" or "self_attn_q"
    suffix: str

    @property
    def module_name(self) -> str:
        """The name ComfyUI's LoRA key map looks up: the key without its suffix."""
        return self.key[:-len(self.suffix) - 1]

    def on_block(self, block: int) -> str:
        return f"{self.prefix}{self.form.block_part.format(block)}{self.module}.{self.suffix}"


def parse_key(key: str) -> LoRAKey:
    for form in FORMS:
        match = form.pattern.fullmatch(key)
        if match is None:
            continue
        prefix, block, rest = match.groups()
        suffix = next((s for s in SUFFIXES if rest.endswith("." + s)), None)
        if suffix is None or len(rest) == len(suffix) + 1:
            break
        return LoRAKey(key, form, prefix, None if block is None else int(block), rest[:-len(suffix) - 1], suffix)
    hint = ""
    if re.match(r"blocks[._]\d+", key):
        hint = (" (a key without prefix: add 'diffusion_model.' to keys with original Wan names or "
                "'transformer.' to keys with diffusers names)")
    raise LoRAKeyError(f"LoRA key {key!r} is not {expected_forms()}{hint}; LoHa/LoKr/DoRA and text-encoder "
                       "keys cannot be moved onto a pruned student")


@dataclass
class LoRAModule:
    """The tensors of one LoRA module (one patched weight), grouped from their keys."""

    name: str  # LoRAKey.module_name of its keys
    form: KeyForm
    block: int | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # suffix -> tensor

    def pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        for up, down in PAIRS:
            if up in self.tensors or down in self.tensors:
                if up not in self.tensors or down not in self.tensors:
                    have, lacks = (up, down) if up in self.tensors else (down, up)
                    raise LoRAKeyError(f"LoRA key {self.name}.{have} has no matching {self.name}.{lacks}; "
                                       "the LoRA file is incomplete")
                if self.tensors[up].ndim < 2 or self.tensors[down].ndim < 2:
                    raise LoRAKeyError(f"LoRA module {self.name}: {up} and {down} must be matrices, got shapes "
                                       f"{tuple(self.tensors[up].shape)} and {tuple(self.tensors[down].shape)}")
                return self.tensors[up], self.tensors[down]
        return None

    @property
    def params(self) -> int:
        return sum(t.numel() for s, t in self.tensors.items() if s != "alpha")

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the module can patch a weight of `shape` (the pair: out and the flat in size match)."""
        shape = tuple(shape)
        pair = self.pair()
        if pair is not None and (pair[0].shape[0], pair[1][0].numel()) != (shape[0], math.prod(shape[1:])):
            return False
        if "diff" in self.tensors and tuple(self.tensors["diff"].shape) != shape:
            return False
        return "diff_b" not in self.tensors or tuple(self.tensors["diff_b"].shape) == shape[:1]

    def squared_norm(self) -> float:
        """||delta W||_F^2 + ||delta b||^2 at strength 1, as ComfyUI applies the module."""
        total = 0.0
        pair = self.pair()
        if pair is not None:
            up, down = (t.double().flatten(1) for t in pair)
            rank = down.shape[0]
            scale = self.tensors["alpha"].item() / rank if "alpha" in self.tensors else 1.0
            # ||up @ down||^2 = sum((up^T up) * (down down^T)): rank x rank products instead of out x in
            total += scale ** 2 * ((up.T @ up) * (down @ down.T)).sum().item()
        for suffix in ("diff", "diff_b"):
            if suffix in self.tensors:
                total += self.tensors[suffix].double().pow(2).sum().item()
        return total


def lora_modules(lora: Mapping[str, torch.Tensor]) -> dict[str, LoRAModule]:
    """The LoRA's modules by name, every key parsed (a `LoRAKeyError` for any key not understood)."""
    modules: dict[str, LoRAModule] = {}
    for key, tensor in lora.items():
        parsed = parse_key(key)
        module = modules.get(parsed.module_name)
        if module is None:
            module = modules[parsed.module_name] = LoRAModule(parsed.module_name, parsed.form, parsed.block)
        module.tensors[parsed.suffix] = tensor
    for module in modules.values():
        if module.pair() is None and set(module.tensors) == {"alpha"}:
            raise LoRAKeyError(f"LoRA key {module.name}.alpha has no lora_up/lora_down (or lora_B/lora_A) "
                               "weights; the LoRA file is incomplete")
    return modules


@dataclass(frozen=True)
class RemapReport:
    forms: tuple[str, ...]
    original_num_blocks: int
    kept_blocks: tuple[int, ...]  # original index of each student block
    lora_blocks: tuple[int, ...]  # original blocks the LoRA changes
    dropped: tuple[int, ...]  # of those, the ones the student does not have
    non_block_modules: int
    params_total: int
    params_dropped: int
    norm_total: float  # sum of ||delta W||^2 over all modules
    norm_dropped: float

    @property
    def param_share_dropped(self) -> float:
        return self.params_dropped / self.params_total if self.params_total else 0.0

    @property
    def norm_share_dropped(self) -> float:
        return self.norm_dropped / self.norm_total if self.norm_total else 0.0

    @property
    def moved(self) -> dict[int, int]:
        """Original block -> student block, for the LoRA's blocks whose index changes."""
        index = {b: i for i, b in enumerate(self.kept_blocks)}
        return {b: index[b] for b in self.lora_blocks if b in index and index[b] != b}

    def text(self) -> str:
        lines = [f"LoRA ({', '.join(self.forms)} keys) on {len(self.lora_blocks)} blocks of a "
                 f"{self.original_num_blocks}-block model"
                 + (f" and {self.non_block_modules} module{'s' * (self.non_block_modules > 1)} outside the blocks"
                    if self.non_block_modules else "")
                 + f"; the student keeps {len(self.kept_blocks)} blocks {list(self.kept_blocks)}."]
        if self.moved:
            lines.append("Moved to the student's blocks: " + ", ".join(f"{a}->{b}" for a, b in self.moved.items()))
        if self.dropped:
            lines.append(f"Left out (blocks the student dropped): {', '.join(map(str, self.dropped))}: "
                         f"{self.param_share_dropped:.1%} of the LoRA's parameters, {self.norm_share_dropped:.1%} "
                         "of its weight change (squared norm).")
        else:
            lines.append("Nothing left out: the student has every block this LoRA changes.")
        return "\n".join(lines)


def remap_lora(lora: Mapping[str, torch.Tensor], kept_blocks: Sequence[int],
               original_num_blocks: int) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """The LoRA for the student that keeps `kept_blocks` (original indices, in student order) of a model of
    `original_num_blocks` blocks, and a report of what was left out. Tensors are shared, never copied."""
    kept = list(kept_blocks)
    if len(set(kept)) != len(kept) or any(not 0 <= b < original_num_blocks for b in kept):
        raise LoRAKeyError(f"kept blocks {kept} are not distinct blocks of a {original_num_blocks}-block model")
    if not lora:
        raise LoRAKeyError("the LoRA holds no tensors")
    modules = lora_modules(lora)
    blocks = sorted({m.block for m in modules.values() if m.block is not None})
    if blocks and blocks[-1] >= original_num_blocks:
        target = ("the model has" if kept == list(range(original_num_blocks))
                  else "the student was pruned from a model of")
        raise LoRAKeyError(f"this LoRA changes block {blocks[-1]}, so it was made for a model of at least "
                           f"{blocks[-1] + 1} blocks, but {target} {original_num_blocks} blocks; use a LoRA made "
                           "for that model")
    index = {b: i for i, b in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora.items():
        parsed = parse_key(key)
        if parsed.block is None:
            out[key] = tensor
        elif parsed.block in index:
            out[parsed.on_block(index[parsed.block])] = tensor
    left_out = [m for m in modules.values() if m.block is not None and m.block not in index]
    norms = {name: m.squared_norm() for name, m in modules.items()}
    report = RemapReport(
        forms=tuple(f.name for f in FORMS if any(m.form is f for m in modules.values())),
        original_num_blocks=original_num_blocks, kept_blocks=tuple(kept), lora_blocks=tuple(blocks),
        dropped=tuple(b for b in blocks if b not in index),
        non_block_modules=sum(m.block is None for m in modules.values()),
        params_total=sum(m.params for m in modules.values()), params_dropped=sum(m.params for m in left_out),
        norm_total=sum(norms.values()), norm_dropped=sum(norms[m.name] for m in left_out))
    return out, report


def check_fit(lora: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Size | Sequence[int]]) -> None:
    """Every module of `lora` must have a target (`targets`: LoRA module name -> shape of the weight it
    patches) of its shape; else a `LoRAKeyError` listing the keys without one or of the wrong shape."""
    missing, wrong = [], []
    for name, module in lora_modules(lora).items():
        if name not in targets:
            missing.append(name)
        elif not module.fits(targets[name]):
            shapes = {s: tuple(t.shape) for s, t in module.tensors.items() if s != "alpha"}
            wrong.append(f"{name} {shapes} for a weight of {tuple(targets[name])}")
    if missing:
        raise LoRAKeyError(f"{len(missing)} LoRA modules match no weight of this model ({missing[:4]}"
                           f"{' ...' if len(missing) > 4 else ''}); is the LoRA made for this model family?")
    if wrong:
        raise LoRAKeyError(f"LoRA modules of the wrong shape for this model: {wrong[:4]}"
                           f"{' ...' if len(wrong) > 4 else ''}; the LoRA was made for a model of another width")


def diffusers_lora_names(model_keys: Iterable[str], prefix: str = COMFY_MODEL_PREFIX) -> dict[str, str]:
    """diffusers/PEFT LoRA module names (`transformer.blocks.0.attn1.to_q`) -> the model key they patch
    (`diffusion_model.blocks.0.self_attn.q.weight`), for the Wan keys among `model_keys`."""
    names = {}
    for key in model_keys:
        if not key.startswith(prefix):
            continue
        try:
            (renamed,) = original_to_diffusers({key[len(prefix):]: None})
        except ValueError:
            continue
        if not renamed.endswith(".bias"):
            names[DIFFUSERS_PREFIX + renamed.removesuffix(".weight")] = key
    return names
