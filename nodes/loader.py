"""Load FastLightGen Checkpoint: a (physically pruned) Wan file -> MODEL plus its recommended SIGMAS; the two-expert
loaders: both experts' files, or a downloaded diffusers pipeline folder (models/diffusers), -> two tagged MODELs.

Files come from `models/fastlightgen` (registered here with ComfyUI's folder_paths) or `diffusion_models`.
`fastlightgen.checkpoint.read_checkpoint` validates the file (gaps in the block numbering, another family,
truncation, ...) and reads every Wan weight format the stock Load Diffusion Model reads (diffusers or original
layout, fp16/bf16/fp32, fp8, ComfyUI's fp8_scaled and mixed-precision files, `model.diffusion_model.`
prefixes); ComfyUI then builds its own Wan from the original-layout tensors with the file's scales and
metadata and the stock weight_dtype options, so the MODEL is the stock loader's, with only the kept blocks. A
diffusers folder's transformers are read by `fastlightgen.checkpoint.read_folder` and built the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from fastlightgen.checkpoint import (LoadedCheckpoint, header_config, read_checkpoint, read_folder, read_meta,
                                     read_safetensors_header)
from fastlightgen.diffusers_folder import PIPELINE_CONFIG, folder_experts
from fastlightgen.expert_files import ExpertTag, meta_tag, pair_boundary, pair_channels, pair_sampling
from fastlightgen.experts import EXPERTS, requested_boundary
from fastlightgen.sampling import FEW_STEP

from .experts import boundary_input, tag_expert
from .student import mark_student
from .validate import check_finite, file_choice

FOLDER = "fastlightgen"
SEARCHED = (FOLDER, "diffusion_models")
PAIR = "Load FastLightGen Expert Pair"
FOLDER_PAIR = "Load FastLightGen Expert Pair (diffusers folder)"
DIFFUSERS = "diffusers"  # the folder type of the stock Diffusers Loader: models/diffusers
MISSING_FOLDER = ("put the downloaded pipeline folder (e.g. Wan2.2-T2V-A14B-Diffusers, holding model_index.json, "
                  "transformer/ and transformer_2/) in models/diffusers and press R to refresh")
MISSING_CHECKPOINT = (f"put the .safetensors file in models/{FOLDER} or models/diffusion_models and press R to "
                      "refresh; a student of a real model is made with python -m train.export (README, 'For "
                      "creators')")
# The stock UNETLoader's weight_dtype choices and the model_options each one means.
WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def register_model_folder() -> None:
    """models/fastlightgen, holding .safetensors only (extra_model_paths.yaml may add more paths); made on first
    start, so a creator finds where a student goes."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    os.makedirs(default, exist_ok=True)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
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


def pipeline_folders() -> list[str]:
    """The folders under models/diffusers holding a model_index.json, as the stock Diffusers Loader lists them."""
    found = {os.path.relpath(root, base) for base in folder_paths.get_folder_paths(DIFFUSERS)
             for root, _, files in os.walk(base, followlinks=True) if PIPELINE_CONFIG in files}
    return sorted(found)


def pipeline_path(name: str) -> Path:
    for base in folder_paths.get_folder_paths(DIFFUSERS):
        if (Path(base) / name).is_dir():
            return Path(base) / name
    raise ValueError(f"folder {name!r} is not in models/diffusers: {MISSING_FOLDER}")


def file_channels(name: str) -> tuple[int, int]:
    """(input, output) channels of a file's DiT, from its header: an I2V-A14B expert's 36 tell its boundary."""
    path = Path(checkpoint_path(name))
    config = header_config(path, read_safetensors_header(path))
    return config["in_channels"], config["out_channels"]


def describe(ckpt: LoadedCheckpoint) -> str:
    meta, num_blocks = ckpt.meta, ckpt.config["num_layers"]
    if meta is None:
        text = f"plain Wan checkpoint, {num_blocks} blocks, no FastLightGen metadata: default few-step sampling"
    else:
        rec = meta.recommended
        steps = list(rec.denoising_step_list) if rec.is_few_step else ""
        text = (f"{meta.family}: {len(meta.kept_blocks)} of {meta.original_num_blocks} blocks kept "
                f"{meta.kept_blocks}; recommended {rec.steps} steps {steps} shift {rec.shift:g} "
                f"cfg {rec.cfg_scale:g}")
        if meta.expert is not None:
            text += f"; the {meta.expert}-noise expert of two, boundary {meta.boundary:g}"
    text += f"; weights {ckpt.weight_format}"
    if ckpt.left_out:
        text += f"; {len(ckpt.left_out)} tensors of other components left out (e.g. {ckpt.left_out[0]})"
    return text


def load_model(ckpt_name: str, weight_dtype: str):
    """(ComfyUI MODEL with only the kept blocks, the checkpoint read) of a file of the model folders."""
    ckpt = read_checkpoint(checkpoint_path(ckpt_name))
    return comfy_model(ckpt, weight_dtype), ckpt


def comfy_model(ckpt: LoadedCheckpoint, weight_dtype: str):
    """The ComfyUI MODEL of a checkpoint read (a file's or a diffusers folder's), with only its kept blocks."""
    model = comfy.sd.load_diffusion_model_state_dict(ckpt.comfy_state_dict(), dict(WEIGHT_DTYPES[weight_dtype]),
                                                     metadata=dict(ckpt.file_metadata))
    if model is None:
        raise ValueError(f"ComfyUI could not detect the model in {ckpt.path}; is it a Wan 2.x DiT?")
    if ckpt.meta is not None:  # the kept blocks, for FastLightGen LoRA and the misapplied-LoRA guard
        mark_student(model, ckpt.meta.kept_blocks, ckpt.meta.original_num_blocks)
    return model


def load_pair(read, weight_dtype: str, boundary: float, sigmas: torch.Tensor) -> io.NodeOutput:
    """Both experts as MODELs tagged with their expert and the boundary, then `sigmas` and the info:
    `read(expert)` gives (the expert's name for messages, its checkpoint read), one expert at a time."""
    models, lines = [], []
    for expert in EXPERTS:
        name, ckpt = read(expert)
        model = comfy_model(ckpt, weight_dtype)
        tag_expert(model, ExpertTag(expert, boundary, name))
        models.append(model)
        lines.append(f"{expert}-noise expert {name}: {describe(ckpt)}")
    lines.append(f"boundary {boundary:g}: steps from a sigma at or above it go to the high-noise expert")
    return io.NodeOutput(*models, sigmas, "\n".join(lines))


class LoadCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenLoadCheckpoint",
            display_name="Load FastLightGen Checkpoint",
            category="FastLightGen",
            description="Loads a FastLightGen checkpoint (a physically pruned, few-step Wan) or any Wan file the "
                        "stock Load Diffusion Model reads (diffusers or original layout; fp16, bf16, fp8, ComfyUI's "
                        "fp8_scaled), and returns the model with the sampling schedule its metadata recommends.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_names(),
                               tooltip="A .safetensors file in models/fastlightgen or models/diffusion_models."),
                # optional: API prompts written before this input existed still validate
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", optional=True,
                               tooltip="As in the stock Load Diffusion Model: 'default' keeps the file's format; "
                                       "the fp8 choices store the weights in fp8 to save memory (_fast also "
                                       "computes in fp8 on GPUs that support it)."),
            ],
            outputs=[
                io.Model.Output(),
                io.Sigmas.Output(tooltip="The recommended few-step schedule (defaults when the file has none)."),
                io.String.Output(display_name="info", tooltip="What the metadata says, and the weight format."),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str) -> bool | str:
        return file_choice(ckpt_name, checkpoint_names(), "checkpoint", MISSING_CHECKPOINT)

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        model, ckpt = load_model(ckpt_name, weight_dtype)
        tag_expert(model, meta_tag(ckpt.meta, ckpt_name))  # one expert of two: the samplers check the wiring
        rec = ckpt.meta.recommended if ckpt.meta is not None else FEW_STEP
        return io.NodeOutput(model, rec.sigmas, describe(ckpt))


def pair_dtype_input() -> io.Combo.Input:
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                          tooltip="As in the stock Load Diffusion Model, for both experts.")


def pair_outputs(sigmas: str) -> list:
    """The two-expert loaders' outputs (`load_pair`'s), with what their SIGMAS are."""
    return [io.Model.Output(display_name="model_high_noise"), io.Model.Output(display_name="model_low_noise"),
            io.Sigmas.Output(tooltip=sigmas),
            io.String.Output(display_name="info", tooltip="Both experts' metadata, weight formats and the boundary.")]


class LoadExpertPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenLoadExpertPair",
            display_name="Load FastLightGen Expert Pair",
            category="FastLightGen",
            description="Loads both experts of a two-expert model (Wan 2.2 A14B: a FastLightGen student's two "
                        "files, or the teacher's high- and low-noise files, fp8_scaled included) as two MODELs, "
                        "with the recommended SIGMAS. The boundary comes from the students' metadata, else from "
                        "the model (0.9 for I2V-A14B's image-conditioned experts, 0.875 for T2V-A14B's); a pair of "
                        "one expert, a swapped pair or two boundaries are refused before anything loads. Connect "
                        "both to FastLightGen Sampler (model, model_low_noise).",
            inputs=[
                io.Combo.Input("high_noise_name", options=checkpoint_names(),
                               tooltip="The high-noise expert's file (e.g. ..._high_noise_14B_fp8_scaled, or the "
                                       "student's high expert), in models/fastlightgen or models/diffusion_models."),
                io.Combo.Input("low_noise_name", options=checkpoint_names(),
                               tooltip="The low-noise expert's file (e.g. ..._low_noise_14B_fp8_scaled)."),
                pair_dtype_input(),
                boundary_input(),
            ],
            outputs=pair_outputs("The recommended few-step schedule (defaults when the files name none)."),
        )

    @classmethod
    def validate_inputs(cls, high_noise_name: str, low_noise_name: str) -> bool | str:
        high = file_choice(high_noise_name, checkpoint_names(), "checkpoint", MISSING_CHECKPOINT)
        return high if high is not True else file_choice(low_noise_name, checkpoint_names(), "checkpoint",
                                                         MISSING_CHECKPOINT)

    @classmethod
    def execute(cls, high_noise_name: str, low_noise_name: str, weight_dtype: str, boundary: float) -> io.NodeOutput:
        check_finite(PAIR, boundary=boundary)
        names = (high_noise_name, low_noise_name)
        try:  # from the headers, before gigabytes of weights are read
            metas = [read_meta(checkpoint_path(name)) for name in names]
            channels = pair_channels(*(file_channels(name) for name in names), names)
            boundary = pair_boundary(*(meta_tag(meta, name) for meta, name in zip(metas, names)),
                                     requested_boundary(boundary, *channels))
            sampling = pair_sampling(*metas, names)
        except ValueError as err:
            raise ValueError(f"{PAIR}: {err}") from None
        files = dict(zip(EXPERTS, names))
        return load_pair(lambda expert: (files[expert], read_checkpoint(checkpoint_path(files[expert]))),
                         weight_dtype, boundary, sampling.sigmas)


class LoadExpertPairFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenLoadExpertPairFolder",
            display_name=FOLDER_PAIR,
            category="FastLightGen",
            description="Loads both experts of a two-expert model downloaded as a Hugging Face diffusers folder (e.g. "
                        "Wan2.2-T2V-A14B-Diffusers in models/diffusers: the high-noise expert in transformer/, the "
                        "low-noise one in transformer_2/, single or sharded safetensors) as two MODELs, with the "
                        "default few-step SIGMAS. The boundary is the folder's model_index.json boundary_ratio "
                        "(0.875 for T2V-A14B, 0.9 for I2V-A14B). Connect both to FastLightGen Sampler (model, "
                        "model_low_noise).",
            inputs=[
                io.Combo.Input("folder_name", options=pipeline_folders(),
                               tooltip="A pipeline folder in models/diffusers holding model_index.json, transformer/ "
                                       "and transformer_2/."),
                pair_dtype_input(),
            ],
            outputs=pair_outputs("The default few-step schedule (a teacher's folder recommends none)."),
        )

    @classmethod
    def validate_inputs(cls, folder_name: str) -> bool | str:
        return file_choice(folder_name, pipeline_folders(), "diffusers folder", MISSING_FOLDER)

    @classmethod
    def execute(cls, folder_name: str, weight_dtype: str) -> io.NodeOutput:
        try:  # every part, the boundary and every weight file, before gigabytes of weights are read
            experts = folder_experts(pipeline_path(folder_name))
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{FOLDER_PAIR}: {err}") from None
        return load_pair(lambda expert: (f"{folder_name}/{experts.path(expert).name}",
                                         read_folder(experts.path(expert))),
                         weight_dtype, experts.boundary, FEW_STEP.sigmas)
