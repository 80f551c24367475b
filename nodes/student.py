"""A FastLightGen student's block numbering on its MODEL, and the guard against LoRAs misapplied to it.

A student's blocks are renumbered 0..k-1, so the stock LoRA loaders put a LoRA made for the full model on
the wrong blocks, silently. Load FastLightGen Checkpoint calls `mark_student`: the ModelPatcher carries a
`StudentMark` attachment (kept blocks, original block count; clones keep it) and, when the blocks were
renumbered, an OUTER_SAMPLE wrapper. That wrapper runs in every sampler that samples through a ComfyUI
guider (KSampler, SamplerCustom, SamplerCustomAdvanced, FastLightGen Sampler) and stops the run with an
error naming the blocks when the model carries LoRA weight patches on its blocks that FastLightGen LoRA
(pruned student) did not make: the UI shows it, not only the console.

What counts as a LoRA patch: the weight adapters (LoRA, LoHa, LoKr, ...) and the ("diff", ...) /
("set", ...) patches of `comfy.lora.load_lora`; model merges (list patches) are not LoRAs and pass.
Not covered: a student loaded with the stock Load Diffusion Model (nothing marks it, unless it went
through FastLightGen LoRA), and hook LoRAs (Create Hook LoRA), which patch at sampling time.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import WrappersMP
from comfy.weight_adapter import WeightAdapterBase

MARK = "fastlightgen_student"
_BLOCK_KEY = re.compile(r"diffusion_model\.blocks\.(\d+)\.")


class MisappliedLoRAError(ValueError):
    """Stock-loaded LoRA patches on the renumbered blocks of a FastLightGen student."""


@dataclass(frozen=True)
class StudentMark:
    kept_blocks: tuple[int, ...]  # original index of each block of the model
    original_num_blocks: int
    approved: tuple = ()  # the weight patches FastLightGen LoRA made, compared by identity

    @property
    def renumbered(self) -> bool:
        return self.kept_blocks != tuple(range(self.original_num_blocks))

    def describe(self) -> str:
        return f"{len(self.kept_blocks)} of {self.original_num_blocks} blocks kept: {list(self.kept_blocks)}"


def student_mark(model: ModelPatcher) -> StudentMark | None:
    return model.get_attachment(MARK)


def mark_student(model: ModelPatcher, kept_blocks: Iterable[int], original_num_blocks: int) -> None:
    """Mark `model` (in place: call it on a fresh model or a clone) as a student with these blocks."""
    mark = StudentMark(tuple(kept_blocks), original_num_blocks)
    model.set_attachments(MARK, mark)
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, MARK)
    if mark.renumbered:
        model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, MARK, _guard_sampling)


def approve_patches(model: ModelPatcher, patches: Iterable) -> None:
    """Record (in place, on a clone) the weight patches FastLightGen LoRA added, so the guard lets them pass."""
    mark = student_mark(model)
    model.set_attachments(MARK, replace(mark, approved=mark.approved + tuple(patches)))


def _is_lora(patch) -> bool:
    return isinstance(patch, WeightAdapterBase) or (isinstance(patch, tuple) and len(patch) == 2
                                                     and patch[0] in ("diff", "set"))


def misapplied_blocks(model: ModelPatcher) -> list[int]:
    """Blocks of a renumbered student that carry LoRA patches FastLightGen LoRA did not make."""
    mark = student_mark(model)
    if mark is None or not mark.renumbered:
        return []
    approved = {id(p) for p in mark.approved}  # the mark holds them, so their ids stay theirs
    blocks = set()
    for key, entries in model.patches.items():
        match = _BLOCK_KEY.match(key)
        if match and any(_is_lora(entry[1]) and id(entry[1]) not in approved for entry in entries):
            blocks.add(int(match.group(1)))
    return sorted(blocks)


def check_no_misapplied_lora(model: ModelPatcher) -> None:
    blocks = misapplied_blocks(model)
    if blocks:
        mark = student_mark(model)
        raise MisappliedLoRAError(
            f"This FastLightGen student ({mark.describe()}) carries LoRA patches on its blocks "
            f"{', '.join(map(str, blocks))} from a loader that does not know the blocks were renumbered (e.g. "
            "the stock Load LoRA): a LoRA made for the full model lands on the wrong blocks there. Load the "
            "LoRA with 'FastLightGen LoRA (pruned student)' instead; for a LoRA trained on this student, set "
            "its 'made_for' to 'this student'.")


def _guard_sampling(executor, *args, **kwargs):
    check_no_misapplied_lora(executor.class_obj.model_patcher)
    return executor(*args, **kwargs)
