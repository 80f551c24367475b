"""Load FastLightGen Checkpoint: a (physically pruned) Wan file -> MODEL plus its recommended SIGMAS.

Files come from `models/fastlightgen` (registered here with ComfyUI's folder_paths) or `diffusion_models`.
`fastlightgen.checkpoint.read_checkpoint` validates the file (gaps in the block numbering, another family,
truncation, ...) and reads diffusers- or original-layout weights; ComfyUI then builds its own Wan from the
original-layout keys, with only the kept blocks, so memory really drops.
"""
from __future__ import annotations

import os

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from fastlightgen.checkpoint import CheckpointMeta, Recommended, read_checkpoint
from fastlightgen.flow import denoising_list_sigmas, euler_sigmas
from fastlightgen.wan_keys import diffusers_to_original

FOLDER = "fastlightgen"
SEARCHED = (FOLDER, "diffusion_models")


def register_model_folder() -> None:
    """models/fastlightgen, holding .safetensors only (extra_model_paths.yaml may add more paths)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


def checkpoint_names() -> list[str]:
    names = {n for folder in SEARCHED for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors")}
    return sorted(names)


def checkpoint_path(name: str) -> str:
    for folder in SEARCHED:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise ValueError(f"checkpoint {name!r} is in neither models/{FOLDER} nor models/diffusion_models")


def recommended_sigmas(rec: Recommended) -> torch.Tensor:
    """A few-step student lists its timesteps; a teacher gives only a step count (uniform Euler, shifted)."""
    if rec.denoising_step_list:
        return denoising_list_sigmas(rec.denoising_step_list, rec.shift)
    return euler_sigmas(rec.steps, rec.shift)


def describe(meta: CheckpointMeta | None, num_blocks: int) -> str:
    if meta is None:
        return f"plain Wan checkpoint, {num_blocks} blocks, no FastLightGen metadata: default few-step sampling"
    rec = meta.recommended
    return (f"{meta.family}: {len(meta.kept_blocks)} of {meta.original_num_blocks} blocks kept "
            f"{meta.kept_blocks}; recommended {rec.steps} steps {rec.denoising_step_list or ''} shift {rec.shift:g} "
            f"cfg {rec.cfg_scale:g}")


class LoadCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenLoadCheckpoint",
            display_name="Load FastLightGen Checkpoint",
            category="FastLightGen",
            description="Loads a FastLightGen checkpoint (a physically pruned, few-step Wan) or a plain Wan file in "
                        "diffusers or original layout, and returns the model with the sampling schedule its "
                        "metadata recommends.",
            inputs=[io.Combo.Input("ckpt_name", options=checkpoint_names(),
                                   tooltip="A .safetensors file in models/fastlightgen or models/diffusion_models.")],
            outputs=[
                io.Model.Output(),
                io.Sigmas.Output(tooltip="The recommended few-step schedule (defaults when the file has none)."),
                io.String.Output(display_name="info", tooltip="What the metadata says."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        ckpt = read_checkpoint(checkpoint_path(ckpt_name))
        model = comfy.sd.load_diffusion_model_state_dict(diffusers_to_original(ckpt.state_dict))
        if model is None:
            raise ValueError(f"ComfyUI could not detect the model in {ckpt.path}; is it a Wan 2.x DiT?")
        rec = ckpt.meta.recommended if ckpt.meta is not None else Recommended()
        return io.NodeOutput(model, recommended_sigmas(rec), describe(ckpt.meta, ckpt.config["num_layers"]))
