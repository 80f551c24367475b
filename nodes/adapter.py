"""FastLightGen Apply Student Adapter: a teacher MODEL from any stock loader + an adapter file -> the student.

The adapter (`fastlightgen.student_adapter`) holds a prune plan and low-rank deltas in ComfyUI LoRA form.
The output MODEL is a new ModelPatcher over a new Wan whose `blocks` ModuleList holds only the kept blocks,
renumbered 0..k-1 exactly as in a student checkpoint, so the dropped blocks never reach the GPU. Its modules
and Parameters are new objects over the teacher's tensors (no weight copied), so nothing ComfyUI does to the
student (patching, moving, unloading) reaches the teacher MODEL it keeps cached. The deltas are remapped
onto the new numbers by `remap_lora` and applied by ComfyUI's own `comfy.lora.load_lora` + `add_patches`,
so fp8 and fp8_scaled bases work as with any LoRA; the modulation tables, which ComfyUI's loader does not patch, become object
patches. The MODEL is marked as a student (kept blocks, original count), so FastLightGen LoRA puts
full-model style LoRAs on the right blocks and the misapplied-LoRA guard covers it.
A MODEL that already carries weight patches is refused: apply style LoRAs after the adapter.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui

from fastlightgen.student_adapter import Adapter, AdapterError, check_base, read_adapter

from .dit import fingerprint
from .experts import expert_tag, tag_expert
from .student import approve_patches, mark_student
from .validate import check_finite, file_choice

ADAPTER_FOLDER = "fastlightgen_adapters"
LOG = logging.getLogger(__name__)


def register_adapter_folder() -> None:
    """models/fastlightgen_adapters, holding .safetensors adapters; made on first start, so a creator finds where
    an adapter goes (ComfyUI lists no files of a folder that does not exist)."""
    default = os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)
    os.makedirs(default, exist_ok=True)
    folder_paths.add_model_folder_path(ADAPTER_FOLDER, default)
    paths, _ = folder_paths.folder_names_and_paths[ADAPTER_FOLDER]
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, {".safetensors"})


def adapter_names() -> list[str]:
    return sorted(folder_paths.get_filename_list(ADAPTER_FOLDER))


def base_weight(dit: torch.nn.Module, key: str) -> torch.Tensor:
    """A dequantized float32 weight of ComfyUI's Wan (original name), whatever format the loader kept."""
    module_name, leaf = key.rsplit(".", 1)
    module = dit.get_submodule(module_name)
    weight = getattr(module, leaf)
    if type(weight).__name__ == "QuantizedTensor":  # ComfyUI's mixed-precision layout
        weight = weight.dequantize()
    weight = weight.detach().float()
    scale = getattr(module, "scale_weight", None)  # fp8_scaled files
    return weight * scale.detach().float().to(weight.device) if scale is not None else weight


def _alias(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same tensors: new module and Parameter objects, no storage copied.

    ComfyUI patches a weight by replacing the module's Parameter, moves one by replacing its `.data`, and keeps
    per-module lists of weight functions; a tree sharing any of those objects with the teacher would carry the
    student's deltas and devices into the cached teacher MODEL.
    """
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, list)) else v for k, v in module.__dict__.items()}
    new._modules = {k: None if m is None else _alias(m) for k, m in module._modules.items()}
    new._parameters = {k: None if p is None else torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                       for k, p in module._parameters.items()}
    return new


def pruned_patcher(model: ModelPatcher, kept: list[int]) -> ModelPatcher:
    """A ModelPatcher over a Wan holding only `kept` blocks (renumbered 0..k-1); `model` is left unchanged."""
    base = model.model
    if any(lm.model is not None and lm.model.model is base for lm in comfy.model_management.current_loaded_models):
        comfy.model_management.unload_all_models()  # the aliased weights must be the unpatched, offloaded ones
    student = _alias(base)
    dit = student.diffusion_model
    dit.blocks = torch.nn.ModuleList([dit.blocks[i] for i in kept])
    dit.num_layers = len(kept)
    student.model_config = copy.copy(base.model_config)
    student.model_config.unet_config = {**base.model_config.unet_config, "num_layers": len(kept)}
    student.device = model.offload_device
    student.current_patcher, student.current_weight_patches_uuid = None, None
    student.model_loaded_weight_memory, student.model_lowvram, student.lowvram_patch_counter = 0, False, 0
    patcher = ModelPatcher(student, load_device=model.load_device, offload_device=model.offload_device)
    patcher.model_options = comfy.model_patcher.create_model_options_clone(model.model_options)
    # e.g. ModelSamplingSD3's model_sampling; a patch on a numbered block would land on another block
    patcher.object_patches = {k: v for k, v in model.object_patches.items() if ".blocks." not in k}
    return patcher


def apply_student_adapter(model: ModelPatcher, adapter: Adapter, strength: float = 1.0) -> tuple[ModelPatcher, float]:
    """(the student MODEL, the base's signature error) from teacher `model` and `adapter`."""
    meta, where = adapter.meta, str(adapter.path or "the adapter")
    if model.patches:
        raise AdapterError("this MODEL already carries weight patches (a LoRA?): connect 'FastLightGen Apply "
                           "Student Adapter' straight to the loader and apply LoRAs after it, with 'FastLightGen "
                           "LoRA (pruned student)'")
    dit = model.model.diffusion_model
    err = check_base(meta, fingerprint(model), lambda k: base_weight(dit, k), where)
    patcher = pruned_patcher(model, meta.kept_blocks)
    mark_student(patcher, meta.kept_blocks, meta.original_num_blocks)
    tag_expert(patcher, expert_tag(model))  # one expert of two stays that expert: the samplers check the wiring
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    tensors = adapter.student_tensors()
    missing = sorted({k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in tensors} - set(key_map))
    if missing:
        raise AdapterError(f"{where}: deltas {missing[:4]} match no weight of this MODEL; is it the teacher's "
                           "architecture (Wan 2.x T2V/TI2V)? export the adapter again")
    if strength != 0:
        patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
        for key in [k for k in patches if not k.endswith((".weight", ".bias"))]:
            # ComfyUI's loader never patches a bare parameter of a module with children (the modulation
            # tables), so those few small tensors are replaced as object patches instead
            _, (diff,) = patches.pop(key)
            old = comfy.utils.get_attr(patcher.model, key)
            new = (old.detach().float() + strength * diff.float().to(old.device)).to(old.dtype)
            patcher.add_object_patch(key, torch.nn.Parameter(new, requires_grad=False))
        patcher.add_patches(patches, strength)
        approve_patches(patcher, patches.values())
    return patcher, err


class ApplyStudentAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenApplyStudentAdapter",
            display_name="FastLightGen Apply Student Adapter",
            category="FastLightGen",
            description="Turns the full Wan model (from the stock Load Diffusion Model, any format: fp16, bf16, "
                        "fp8, fp8_scaled) into a FastLightGen student with a small adapter file: the plan's "
                        "blocks are removed (they never load to the GPU) and the student's weight deltas are "
                        "applied like a LoRA. Outputs the recommended few-step SIGMAS. Apply style LoRAs after "
                        "it with 'FastLightGen LoRA (pruned student)'.",
            inputs=[
                io.Model.Input("model", tooltip="The full teacher model the adapter was exported from."),
                io.Combo.Input("adapter_name", options=adapter_names(),
                               tooltip="A student adapter (.safetensors) in models/fastlightgen_adapters."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                               tooltip="Strength of the weight deltas; 1 is the trained student."),
            ],
            outputs=[
                io.Model.Output(tooltip="The student: the kept blocks with their deltas."),
                io.Sigmas.Output(tooltip="The schedule the student is meant to be sampled with."),
                io.String.Output(display_name="info", tooltip="The plan, rank and base check."),
            ],
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str) -> bool | str:
        return file_choice(adapter_name, adapter_names(), "adapter", f"put it in models/{ADAPTER_FOLDER} and press "
                           "R to refresh; an adapter is made with python -m train.export_adapter")

    @classmethod
    def execute(cls, model, adapter_name: str, strength: float = 1.0) -> io.NodeOutput:
        check_finite("FastLightGen Apply Student Adapter", strength=strength)
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name)
        if path is None:
            raise ValueError(f"adapter {adapter_name!r} is not in models/{ADAPTER_FOLDER}; put it there")
        adapter = read_adapter(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            student, err = apply_student_adapter(model, adapter, strength)
        meta, rec = adapter.meta, adapter.meta.recommended
        rank = "whole deltas" if meta.rank == 0 and meta.energy is None else (
            f"rank {meta.rank}" if meta.energy is None else f"{meta.energy:.1%} of each delta's energy")
        text = (f"{adapter_name}: {len(meta.kept_blocks)} of {meta.original_num_blocks} blocks kept "
                f"{meta.kept_blocks}; {rank}; base sampled-weight error {err:.4f}; recommended {rec.steps} steps "
                f"shift {rec.shift:g} cfg {rec.cfg_scale:g}")
        for w in caught:
            LOG.warning("FastLightGen Apply Student Adapter: %s", w.message)
            text += f"\nWARNING: {w.message}"
        return io.NodeOutput(student, rec.sigmas, text, ui=ui.PreviewText(text))
