"""FastLightGen LoRA (pruned student): a LoRA made for the full model, on the right blocks of a student.

`fastlightgen.lora_remap.remap_lora` moves the LoRA's keys from the original block numbers to the
student's (keys of dropped blocks are left out and reported); ComfyUI's own `comfy.lora.load_lora` and
`ModelPatcher.add_patches` then apply it, as the stock Load LoRA does, so fp8 bases work like any LoRA.
Besides ComfyUI's key map, diffusers/PEFT module names (`transformer.blocks.N.attn1.to_q`) are mapped
onto the Wan weights. Every module must find a weight of its shape: no LoRA key is dropped silently.

The kept blocks come from the model when Load FastLightGen Checkpoint loaded it (see `student`), else from
the student file named in `student_checkpoint` (a student loaded by the stock Load Diffusion Model).
"""
from __future__ import annotations

from pathlib import Path

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui
from safetensors import safe_open

from fastlightgen.checkpoint import METADATA_KEY, CheckpointMeta, read_safetensors_header
from fastlightgen.lora_remap import check_fit, diffusers_lora_names, remap_lora

from .dit import fingerprint
from .loader import MISSING_CHECKPOINT, checkpoint_names, checkpoint_path
from .student import approve_patches, mark_student, student_mark
from .validate import check_finite, file_choice

FROM_MODEL = "(from the model)"
FULL_MODEL = "full model"
THIS_STUDENT = "this student"


def student_blocks(model: ModelPatcher, student_checkpoint: str) -> tuple[list[int], int]:
    """(kept blocks, original block count) of the student `model`, from its mark or its file's metadata."""
    fp = fingerprint(model)
    if fp.family != "wan":
        raise ValueError(f"FastLightGen LoRA works on Wan students; this MODEL is a {fp.family}")
    if student_checkpoint == FROM_MODEL:
        mark = student_mark(model)
        if mark is None:
            raise ValueError("this MODEL carries no FastLightGen student metadata (was it loaded with the stock "
                             "Load Diffusion Model?): pick its file in 'student_checkpoint', or load it with "
                             "Load FastLightGen Checkpoint; for a model that is not pruned use the stock Load LoRA")
        kept, total, source = list(mark.kept_blocks), mark.original_num_blocks, "its FastLightGen metadata"
    else:
        with safe_open(checkpoint_path(student_checkpoint), "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
        if text is None:
            raise ValueError(f"{student_checkpoint} has no FastLightGen metadata, so its kept blocks are unknown; "
                             "pick the student checkpoint the MODEL was loaded from")
        meta = CheckpointMeta.from_json(text)
        kept, total, source = meta.kept_blocks, meta.original_num_blocks, student_checkpoint
    if len(kept) != fp.num_blocks:
        raise ValueError(f"the MODEL has {fp.num_blocks} blocks but {source} keeps {len(kept)} ({kept}); "
                         "pick the student checkpoint the MODEL was loaded from")
    return kept, total


def apply_student_lora(model: ModelPatcher, lora: dict, strength: float, kept: list[int],
                       total: int) -> ModelPatcher:
    """A clone of the student `model` with the (already remapped) `lora` added as ComfyUI weight patches."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    key_map.update(diffusers_lora_names(weights))
    check_fit(lora, {name: weights[key].shape for name, key in key_map.items()
                     if isinstance(key, str) and key in weights})
    patched = model.clone()
    if student_mark(patched) is None or list(student_mark(patched).kept_blocks) != kept:
        mark_student(patched, kept, total)
    if strength != 0:
        patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
        patched.add_patches(patches, strength)
        approve_patches(patched, patches.values())
    return patched


class StudentLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenStudentLoRA",
            display_name="FastLightGen LoRA (pruned student)",
            category="FastLightGen",
            description="Applies a LoRA made for the full Wan model to a FastLightGen student, whose blocks are "
                        "renumbered: each LoRA block goes to the student block that was that original block, "
                        "LoRA parts on dropped blocks are left out, and the report says which and how much. "
                        "Use it instead of the stock Load LoRA on a student (the stock loader would put block 4's "
                        "LoRA on the student's block 4, another block). ComfyUI, diffusers/PEFT and kohya keys.",
            inputs=[
                io.Model.Input("model", tooltip="A FastLightGen student, loaded by Load FastLightGen Checkpoint "
                                                "(or by Load Diffusion Model: then name its file below)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA from models/loras, made for the full (unpruned) model."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to modify the model, as in the stock Load LoRA."),
                io.Combo.Input("made_for", options=[FULL_MODEL, THIS_STUDENT], default=FULL_MODEL,
                               tooltip="'full model': move the LoRA onto the student's blocks. 'this student': "
                                       "a LoRA trained on the student itself, applied as is."),
                io.Combo.Input("student_checkpoint", options=[FROM_MODEL, *checkpoint_names()], default=FROM_MODEL,
                               tooltip="Where the kept blocks come from: the model (Load FastLightGen Checkpoint "
                                       "records them) or the student file the model was loaded from."),
            ],
            outputs=[
                io.Model.Output(tooltip="The student with the LoRA on its blocks."),
                io.String.Output(display_name="report", tooltip="Dropped blocks and the share of the LoRA "
                                                                "left out."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str, student_checkpoint: str) -> bool | str:
        lora = file_choice(lora_name, folder_paths.get_filename_list("loras"), "LoRA", "put it in models/loras and "
                           "press R to refresh")
        return lora if lora is not True else file_choice(student_checkpoint, [FROM_MODEL, *checkpoint_names()],
                                                         "student checkpoint", MISSING_CHECKPOINT)

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float, made_for: str,
                student_checkpoint: str) -> io.NodeOutput:
        check_finite("FastLightGen LoRA (pruned student)", strength_model=strength_model)
        kept, total = student_blocks(model, student_checkpoint)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        read_safetensors_header(Path(path))  # a renamed pickle or a cut-short download: an error with the fix
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        lora = comfy.lora_convert.convert_lora(lora)
        if made_for == THIS_STUDENT:
            remapped, report = remap_lora(lora, range(len(kept)), len(kept))
        else:
            remapped, report = remap_lora(lora, kept, total)
        patched = apply_student_lora(model, remapped, strength_model, kept, total)
        text = (f"{lora_name} at strength {strength_model:g}, made for {made_for}"
                f"{'' if strength_model else ' (strength 0: not applied)'}\n{report.text()}")
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))
