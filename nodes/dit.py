"""ComfyUI's DiTs seen as FastLightGen's ordered block list, and block skipping through patches_replace.

ComfyUI's Wan and HunyuanVideo forwards look up `transformer_options["patches_replace"]["dit"]` per block
and call our function instead of the block; returning the block's input streams skips it. No weights
are copied or moved: the patch lives in the model options of a ModelPatcher clone or of one call.
"""
from __future__ import annotations

from typing import Any, Callable

import comfy.model_patcher
from comfy.model_patcher import ModelPatcher

from fastlightgen.plan import ModelFingerprint, PrunePlan

Slot = tuple[str, int]  # ("double_block", i) or ("single_block", i), the key ComfyUI's forward looks up
BlockPatch = Callable[[dict, dict], dict]
STREAMS = ("img", "txt")  # what a block changes; everything else in its args is per-call context


def _diffusion_model(model: ModelPatcher) -> Any:
    return model.model.diffusion_model


def block_slots(model: ModelPatcher) -> list[Slot]:
    """The model's blocks in execution order, indexed as FastLightGen plans index them."""
    dit = _diffusion_model(model)
    family = _family(dit)
    if family == "wan":
        return [("double_block", i) for i in range(len(dit.blocks))]
    return ([("double_block", i) for i in range(len(dit.double_blocks))]
            + [("single_block", i) for i in range(len(dit.single_blocks))])


def family(model: ModelPatcher) -> str:
    """'wan' or 'hunyuanvideo'; an error naming the fix for any other model."""
    return _family(_diffusion_model(model))


def _family(dit: Any) -> str:
    # Class names, not isinstance: ComfyUI's model classes are imported lazily per architecture.
    name = type(dit).__name__
    if name == "WanModel" and hasattr(dit, "blocks"):
        return "wan"
    if name == "HunyuanVideo":
        return "hunyuanvideo"
    raise ValueError(f"FastLightGen works on Wan 2.x and HunyuanVideo DiTs, but this MODEL's diffusion model "
                     f"is a {name}; load a Wan or HunyuanVideo diffusion model")


def fingerprint(model: ModelPatcher) -> ModelFingerprint:
    """The fingerprint a prune plan must match; same fields as the library adapters compute."""
    dit = _diffusion_model(model)
    family = _family(dit)
    width = dit.dim if family == "wan" else dit.hidden_size
    return ModelFingerprint(family, len(block_slots(model)), int(width))


def check_plan(model: ModelPatcher, plan: PrunePlan) -> None:
    """Raises fastlightgen.plan.PlanMismatchError (a ValueError naming the fix) for a foreign plan."""
    plan.check(fingerprint(model))


def skip_block(args: dict, extra: dict) -> dict:
    """A replacement that passes the block's input streams through unchanged."""
    return {k: args[k] for k in STREAMS if k in args}


def with_block_patches(model_options: dict, patches: dict[Slot, BlockPatch]) -> dict:
    """A copy of `model_options` whose forward replaces the given blocks (the caller's dict is untouched)."""
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})
    for (kind, index), patch in patches.items():
        options = comfy.model_patcher.set_model_options_patch_replace(options, patch, "dit", kind, index)
    return options


def skip_patches(model: ModelPatcher, skip: set[int] | frozenset[int]) -> dict[Slot, BlockPatch]:
    slots = block_slots(model)
    return {slots[i]: skip_block for i in sorted(skip)}


def block_patches(model_options: dict) -> dict[Slot, BlockPatch]:
    """The block replacements `model_options` already holds (Apply Prune Plan's skips, other packs' patches)."""
    return dict(model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))


def skipped_blocks(model: ModelPatcher) -> list[int]:
    """Blocks the MODEL skips (Apply Prune Plan): their replacement is `skip_block`."""
    patches = block_patches(model.model_options)
    return [i for i, slot in enumerate(block_slots(model)) if patches.get(slot) is skip_block]
