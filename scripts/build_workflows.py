"""Write the shipped workflows (workflows/*.json, UI format) and their thumbnails (workflows/*.jpg).

Graphs are declared below as nodes with widget values and links; the node definitions of a running
ComfyUI (/object_info) give each node's sockets, outputs and widget order, so the files are exactly what
the editor would save. The frontend shows a custom-node template's thumbnail from <name>.jpg next to it.

    python scripts/build_workflows.py                 # starts a ComfyUI from .comfyui/ for /object_info
    python scripts/build_workflows.py --url http://127.0.0.1:8188
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file: the repository's packages (research) are importable

from workflow_to_prompt import widget_names  # noqa: E402

from fastlightgen.experts import AUTO_BOUNDARY  # noqa: E402

OUT_DIR = REPO / "workflows"
STUDENT = "toy_student.safetensors"
TEACHER = "toy_teacher.safetensors"
TOY_EXPERTS = {"high": "toy_teacher_high.safetensors", "low": "toy_teacher_low.safetensors"}  # scripts/train_toy_experts.sh
STUDENT_ADAPTER = "toy_student_adapter.safetensors"
DEMO_LORA = "toy_teacher_demo_lora.safetensors"  # scripts/make_toy_lora.py
# the Wan 2.2 tiny decoder under the name ComfyUI's Load VAE takes from models/vae_approx (nodes.py, video_taes)
WAN22_TINY_VAE = "lighttaew2_2.safetensors"
# Wan 2.2 A14B, T2V and I2V, with their boundaries: the files ComfyUI's own Wan 2.2 14B templates load, and the
# student's two files as `python -m train.export -c configs/wan2.2-<variant>-a14b.yaml` writes them
# (train.export.expert_out)
A14B_VARIANTS = ("t2v", "i2v")
A14B_TEACHER = {variant: {expert: f"wan2.2_{variant}_{expert}_noise_14B_fp8_scaled.safetensors"
                          for expert in ("high", "low")} for variant in A14B_VARIANTS}
A14B_STUDENT = {variant: {expert: f"wan2.2-{variant}-a14b-fastlightgen_{expert}_noise.safetensors"
                          for expert in ("high", "low")} for variant in A14B_VARIANTS}
A14B_SIZE = {"width": 1280, "height": 720, "length": 81, "batch_size": 1}  # 81 frames at 720p, as the configs
A14B_START_IMAGE = "example.png"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
A14B_PROMPT = "a red fox running through fresh snow, morning light"
COLUMN_WIDTH, ROW_GAP = 380, 40


@dataclass
class Node:
    key: str
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)  # input name -> (source key, output slot)
    title: str | None = None


@dataclass
class Note:
    """A note for the reader (a frontend-only MarkdownNote), below the nodes of the column of node `beside`."""
    title: str
    text: str
    beside: str


@dataclass
class Workflow:
    name: str
    note: str
    nodes: list[Node]
    notes: list[Note] = field(default_factory=list)


def _first_frame(key: str = "latent", **widgets: Any) -> Node:
    return Node(key, "FastLightGenToyFirstFrameLatent",
                {"color": "red", "shape": "circle", "direction": "right", "background": "plain", "seed": 3,
                 "caption": "", "batch_size": 1, "speed": "quickly", "turning": "none", "mode": "TI2V", **widgets})


def _teacher_plan() -> list[Node]:
    """The toy teacher and a Stage I plan keeping 70% of its blocks."""
    return [
        Node("teacher", "FastLightGenLoadCheckpoint", {"ckpt_name": TEACHER}),
        Node("data", "FastLightGenToyDatasetLatents", {"split": "train", "count": 4, "seed": 0}),
        Node("data_text", "FastLightGenToyTextEncode", links={"prompt": ("data", 1)}),
        Node("importance", "FastLightGenBlockImportance",
             {"num_timesteps": 2, "num_samples": 1, "seed": 0, "keep_ratio": 0.7, "prefix_reuse": True},
             {"model": ("teacher", 0), "latent": ("data", 0), "positive": ("data_text", 0)}),
    ]


def _prompts(first_frame: str = "latent") -> list[Node]:
    return [
        Node("positive", "FastLightGenToyTextEncode", links={"prompt": (first_frame, 1)}),
        Node("negative", "FastLightGenToyTextEncode", {"prompt": ""}, title="Null prompt (negative)"),
    ]


def _a14b_text() -> list[Node]:
    """UMT5 (CLIPLoader type wan) and the prompt, as ComfyUI's Wan 2.2 templates load them."""
    return [
        Node("clip", "CLIPLoader", {"clip_name": UMT5, "type": "wan", "device": "default"}),
        Node("positive", "CLIPTextEncode", {"text": A14B_PROMPT}, {"clip": ("clip", 0)}),
    ]


def _a14b_start(variant: str) -> tuple[list[Node], dict[str, tuple[str, int]]]:
    """The 81-frame 720p start latent of an A14B workflow, and where its samplers take positive, negative and
    latent_image: for T2V an empty latent and the prompts; for I2V WanImageToVideo's, which encodes the start image
    with the Wan 2.1 VAE into both prompts (what fills I2V-A14B's 36 input channels beside the latent)."""
    if variant == "t2v":
        return [Node("latent", "EmptyHunyuanLatentVideo", A14B_SIZE)], {
            "positive": ("positive", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)}
    return [Node("image", "LoadImage", {"image": A14B_START_IMAGE}, title="Load Image (the first frame)"),
            Node("latent", "WanImageToVideo", A14B_SIZE, {"positive": ("positive", 0), "negative": ("negative", 0),
                                                          "vae": ("vae", 0), "start_image": ("image", 0)})], {
        "positive": ("latent", 0), "negative": ("latent", 1), "latent_image": ("latent", 2)}


def _a14b_video(sampler: str, start: list[Node]) -> list[Node]:
    """The `start` latent's nodes in, the Wan 2.1 VAE's decode of `sampler`'s latent out, as a video."""
    return [
        *start,
        Node("vae", "VAELoader", {"vae_name": WAN21_VAE}),
        Node("decode", "VAEDecode", links={"samples": (sampler, 0), "vae": ("vae", 0)}),
        Node("video", "CreateVideo", {"fps": 16.0}, {"images": ("decode", 0)}),
        Node("save_video", "SaveVideo", {"filename_prefix": "fastlightgen/a14b_4step", "format": "auto",
                                         "codec": "auto"}, {"video": ("video", 0)}),
    ]


def _expert_pair(files: dict[str, str]) -> Node:
    """The pair's boundary from its files' metadata, else from the model (T2V-A14B's or I2V-A14B's)."""
    return Node("experts", "FastLightGenLoadExpertPair", {"high_noise_name": files["high"],
                                                          "low_noise_name": files["low"], "weight_dtype": "default",
                                                          "boundary": AUTO_BOUNDARY})


def _a14b_stock_expert(variant: str, expert: str, steps: tuple[int, int], first: bool) -> list[Node]:
    """One expert in stock nodes: Load Diffusion Model, shift 5, KSamplerAdvanced on its steps of the 4 (lcm,
    simple, CFG 1: the student's schedule [1, 0.9375, 0.833, 0.625]); the first adds the noise and hands its
    noisy latent on, the second continues it."""
    loader, shift, sampler = f"{expert}_model", f"{expert}_shift", f"{expert}_sampler"
    inputs = _a14b_start(variant)[1]
    return [
        Node(loader, "UNETLoader", {"unet_name": A14B_STUDENT[variant][expert], "weight_dtype": "default"},
             title=f"Load Diffusion Model ({expert}-noise)"),
        Node(shift, "ModelSamplingSD3", {"shift": 5.0}, {"model": (loader, 0)}),
        Node(sampler, "KSamplerAdvanced",
             {"add_noise": "enable" if first else "disable", "noise_seed": 0, "steps": 4, "cfg": 1.0,
              "sampler_name": "lcm", "scheduler": "simple", "start_at_step": steps[0], "end_at_step": steps[1],
              "return_with_leftover_noise": "enable" if first else "disable"},
             {"model": (shift, 0), **inputs, **({} if first else {"latent_image": ("high_sampler", 0)})},
             title=f"KSampler (Advanced) {expert}: {steps[0]}-{steps[1]}"),
    ]


def _a14b_files(variant: str, folders: str) -> str:
    """Where an A14B student workflow's files go, for its note."""
    files = (f"The student's two expert files in {folders} (python -m train.export), {UMT5} in "
             f"models/text_encoders, {WAN21_VAE} in models/vae")
    return files + (f", the start image in input/ ({A14B_START_IMAGE})." if variant == "i2v" else ".")


def _a14b_stock(variant: str) -> Workflow:
    """The 4-step student of `variant` in stock nodes only: ComfyUI's own two-expert graph."""
    model = f"{variant.upper()}-A14B"
    start, _ = _a14b_start(variant)
    return Workflow(
        f"fastlightgen_wan22_{variant}_a14b_4step_stock",
        f"# FastLightGen: 4-step Wan 2.2 {model} student in stock nodes only (not run in tests)\n"
        f"{_a14b_files(variant, 'models/diffusion_models')} Each expert: Load Diffusion Model + "
        "ModelSamplingSD3 (shift 5) + KSampler (Advanced) with lcm, simple, CFG 1 over 4 steps: the "
        "high-noise expert takes steps 0-2 (sigmas 1, 0.9375) and hands its noisy latent on, the low-noise "
        f"one steps 2-4 (0.833, 0.625). FastLightGen's template `fastlightgen_wan22_{variant}_a14b_4step` does the "
        "same in fewer nodes.", [
            *_a14b_text(),
            Node("negative", "CLIPTextEncode", {"text": ""}, {"clip": ("clip", 0)},
                 title="Negative (unused at CFG 1)"),
            *_a14b_stock_expert(variant, "high", (0, 2), first=True),
            *_a14b_stock_expert(variant, "low", (2, 4), first=False),
            *_a14b_video("low_sampler", start),
        ])


def _a14b_pack(variant: str) -> Workflow:
    """The 4-step student of `variant` in the pack's nodes: Load FastLightGen Expert Pair -> FastLightGen Sampler."""
    model = f"{variant.upper()}-A14B"
    start, inputs = _a14b_start(variant)
    negative = [Node("negative", "CLIPTextEncode", {"text": ""}, {"clip": ("clip", 0)},
                     title="Negative (WanImageToVideo takes one; unused at CFG 1)")] if variant == "i2v" else []
    return Workflow(
        f"fastlightgen_wan22_{variant}_a14b_4step",
        f"# FastLightGen: 4-step Wan 2.2 {model} student (not run in tests)\n"
        f"{_a14b_files(variant, 'models/diffusion_models or models/fastlightgen')} Load FastLightGen Expert Pair "
        "reads both experts, the boundary and the recommended 4 steps from their metadata (a swapped or mixed pair "
        "is refused); FastLightGen Sampler gives each step to the expert whose range holds its sigma, as the stock "
        f"template `fastlightgen_wan22_{variant}_a14b_4step_stock` does with two KSamplerAdvanced.", [
            _expert_pair(A14B_STUDENT[variant]),
            *_a14b_text(),
            *negative,
            Node("sampler", "FastLightGenSampler", {"seed": 0, "boundary": AUTO_BOUNDARY},
                 {"model": ("experts", 0), "model_low_noise": ("experts", 1), "positive": inputs["positive"],
                  "latent_image": inputs["latent_image"], "sigmas": ("experts", 2)}),
            *_a14b_video("sampler", start),
        ])


WORKFLOWS = [
    Workflow("fastlightgen_toy_student_4step",
             "# FastLightGen: 4-step TI2V with the toy student\nFirst frame + caption -> 4 steps, CFG off. "
             "The loader returns the schedule the checkpoint recommends. Set `mode` on the First-Frame Latent "
             "to T2V to generate from the caption alone.", [
                 Node("student", "FastLightGenLoadCheckpoint", {"ckpt_name": STUDENT}),
                 _first_frame(turning="blue"),
                 Node("positive", "FastLightGenToyTextEncode", links={"prompt": ("latent", 1)}),
                 Node("sampler", "FastLightGenSampler", {"seed": 0},
                      {"model": ("student", 0), "positive": ("positive", 0), "latent_image": ("latent", 0),
                       "sigmas": ("student", 1)}),
                 Node("decode", "FastLightGenToyDecode", links={"samples": ("sampler", 0)}),
                 Node("frames", "SaveImage", {"filename_prefix": "fastlightgen/student_frames"},
                      {"images": ("decode", 0)}),
                 Node("video", "CreateVideo", {"fps": 6.0}, {"images": ("decode", 0)}),
                 Node("save_video", "SaveVideo", {"filename_prefix": "fastlightgen/student", "format": "auto",
                                                  "codec": "auto"}, {"video": ("video", 0)}),
             ]),
    Workflow("fastlightgen_block_importance",
             "# FastLightGen: Stage I block importance\nScores each block of the toy teacher by the x0 error "
             "when it is skipped, plots them and makes a 70% prune plan.", [
                 *_teacher_plan(),
                 Node("plot", "SaveImage", {"filename_prefix": "fastlightgen/importance"},
                      {"images": ("importance", 0)}),
                 Node("table", "PreviewAny", links={"source": ("importance", 2)}),
             ]),
    Workflow("fastlightgen_toy_two_experts_block_importance",
             "# FastLightGen: Stage I of a two-expert model (the toy teacher's two experts)\nLoad FastLightGen "
             "Expert Pair reads both experts and the boundary (0.875) from their metadata; each expert is scored on "
             "its own part of the schedule (the high-noise one on sigmas above the boundary, the low-noise one "
             "below), both charts in one plot, a 70% plan per expert: what Save Prune Plan would save for "
             "train.stage2. The same graph as `fastlightgen_wan22_t2v_a14b_block_importance`, on the toy world.", [
                 _expert_pair(TOY_EXPERTS),
                 Node("data", "FastLightGenToyDatasetLatents", {"split": "train", "count": 4, "seed": 0}),
                 Node("data_text", "FastLightGenToyTextEncode", links={"prompt": ("data", 1)}),
                 Node("importance", "FastLightGenExpertBlockImportance",
                      {"num_timesteps": 2, "num_samples": 1, "seed": 0, "keep_ratio_high_noise": 0.7,
                       "keep_ratio_low_noise": 0.7, "prefix_reuse": True, "boundary": AUTO_BOUNDARY},
                      {"model_high_noise": ("experts", 0), "model_low_noise": ("experts", 1), "latent": ("data", 0),
                       "positive": ("data_text", 0)}),
                 Node("plot", "SaveImage", {"filename_prefix": "fastlightgen/two_experts_importance"},
                      {"images": ("importance", 0)}),
                 Node("table", "PreviewAny", links={"source": ("importance", 4)}),
             ]),
    Workflow("fastlightgen_teacher_mix",
             "# FastLightGen: well-guided teacher preview and (beta1, beta2) sweep\nEq. 9 on the toy teacher "
             "with its Stage I plan: one preview with SamplerCustomAdvanced, and a sweep grid (last frames).", [
                 *_teacher_plan(),
                 _first_frame(),
                 *_prompts(),
                 Node("shift", "ModelSamplingSD3", {"shift": 5.0}, {"model": ("teacher", 0)}),
                 Node("schedule", "BasicScheduler", {"scheduler": "simple", "steps": 12, "denoise": 1.0},
                      {"model": ("shift", 0)}),
                 Node("euler", "KSamplerSelect", {"sampler_name": "euler"}),
                 Node("guider", "FastLightGenWellGuidedTeacher", {"beta1": 3.5, "beta2": 0.25},
                      {"model": ("teacher", 0), "prune_plan": ("importance", 1), "positive": ("positive", 0),
                       "negative": ("negative", 0)}),
                 Node("noise", "RandomNoise", {"noise_seed": 0}),
                 Node("sample", "SamplerCustomAdvanced", links={
                     "noise": ("noise", 0), "guider": ("guider", 0), "sampler": ("euler", 0),
                     "sigmas": ("schedule", 0), "latent_image": ("latent", 0)}),
                 Node("decode", "FastLightGenToyDecode", links={"samples": ("sample", 0)}),
                 Node("preview", "SaveImage", {"filename_prefix": "fastlightgen/teacher_frames"},
                      {"images": ("decode", 0)}),
                 Node("sweep", "FastLightGenTeacherMixSweep",
                      {"seed": 0, "beta1_values": "2.5, 3.5, 4.5", "beta2_values": "0, 0.25, 0.5"},
                      {"model": ("teacher", 0), "prune_plan": ("importance", 1), "positive": ("positive", 0),
                       "negative": ("negative", 0), "latent_image": ("latent", 0), "sampler": ("euler", 0),
                       "sigmas": ("schedule", 0)}),
                 Node("sweep_decode", "FastLightGenToyDecode", links={"samples": ("sweep", 0)}),
                 Node("grid", "FastLightGenVideoGrid", {"videos": 9, "mode": "last frame", "scale": 4, "columns": 3},
                      {"images": ("sweep_decode", 0), "labels": ("sweep", 1)}),
                 Node("save_grid", "SaveImage", {"filename_prefix": "fastlightgen/teacher_sweep"},
                      {"images": ("grid", 0)}),
             ]),
    Workflow("fastlightgen_pruned_ksampler",
             "# FastLightGen: the pruned teacher in the stock KSampler\nApply Prune Plan skips the dropped "
             "blocks on a clone of the model (weights shared); KSampler samples it with CFG.", [
                 *_teacher_plan(),
                 Node("pruned", "FastLightGenApplyPrunePlan", links={"model": ("teacher", 0),
                                                                     "prune_plan": ("importance", 1)}),
                 Node("shift", "ModelSamplingSD3", {"shift": 5.0}, {"model": ("pruned", 0)}),
                 _first_frame(),
                 *_prompts(),
                 Node("ksampler", "KSampler", {"seed": 0, "steps": 12, "cfg": 3.5, "sampler_name": "euler",
                                               "scheduler": "simple", "denoise": 1.0},
                      {"model": ("shift", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                       "latent_image": ("latent", 0)}),
                 Node("decode", "FastLightGenToyDecode", links={"samples": ("ksampler", 0)}),
                 Node("frames", "SaveImage", {"filename_prefix": "fastlightgen/pruned_frames"},
                      {"images": ("decode", 0)}),
             ]),
    Workflow("fastlightgen_student_lora",
             "# FastLightGen: a LoRA made for the full model on the pruned student\nFastLightGen LoRA moves each "
             "block's LoRA to the student block that was that original block and reports what the dropped "
             "blocks leave out (the stock Load LoRA would put it on the wrong blocks). The demo LoRA is random.", [
                 Node("student", "FastLightGenLoadCheckpoint", {"ckpt_name": STUDENT}),
                 Node("lora", "FastLightGenStudentLoRA", {"lora_name": DEMO_LORA, "strength_model": 1.0},
                      {"model": ("student", 0)}),
                 _first_frame(),
                 Node("positive", "FastLightGenToyTextEncode", links={"prompt": ("latent", 1)}),
                 Node("sampler", "FastLightGenSampler", {"seed": 0},
                      {"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0),
                       "sigmas": ("student", 1)}),
                 Node("decode", "FastLightGenToyDecode", links={"samples": ("sampler", 0)}),
                 Node("frames", "SaveImage", {"filename_prefix": "fastlightgen/student_lora_frames"},
                      {"images": ("decode", 0)}),
             ]),
    Workflow("fastlightgen_student_adapter_ksampler",
             "# FastLightGen: the student from the teacher plus a small adapter, in the stock KSampler\n"
             "The stock Load Diffusion Model reads the full teacher (any format, fp8 too); Apply Student Adapter "
             "removes the plan's blocks and adds the student's low-rank deltas. KSampler runs the student's "
             "4-step contract: shift 5, the simple schedule, lcm (predict x0, re-noise), CFG 1.", [
                 Node("teacher", "UNETLoader", {"unet_name": TEACHER, "weight_dtype": "default"}),
                 Node("student", "FastLightGenApplyStudentAdapter", {"adapter_name": STUDENT_ADAPTER},
                      {"model": ("teacher", 0)}),
                 Node("shift", "ModelSamplingSD3", {"shift": 5.0}, {"model": ("student", 0)}),
                 _first_frame(),
                 *_prompts(),
                 Node("ksampler", "KSampler", {"seed": 0, "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                                               "scheduler": "simple", "denoise": 1.0},
                      {"model": ("shift", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                       "latent_image": ("latent", 0)}),
                 Node("decode", "FastLightGenToyDecode", links={"samples": ("ksampler", 0)}),
                 Node("frames", "SaveImage", {"filename_prefix": "fastlightgen/adapter_frames"},
                      {"images": ("decode", 0)}),
             ]),
    Workflow("fastlightgen_wan22_ti2v_5b_4step",
             "# FastLightGen: 4-step Wan 2.2 TI2V-5B (not run in tests)\nPut the FastLightGen student of "
             "Wan 2.2 TI2V-5B in models/fastlightgen, umt5_xxl_fp8_e4m3fn_scaled.safetensors in "
             "models/text_encoders, wan2.2_vae.safetensors in models/vae and a start image in input/ "
             f"({WAN22_TINY_VAE} in models/vae_approx for the draft branch: see its note). "
             "Same graph as the toy one with the stock UMT5, Wan VAE and Wan22ImageToVideoLatent.", [
                 Node("student", "FastLightGenLoadCheckpoint",
                      {"ckpt_name": "wan2.2_ti2v_5B_fastlightgen.safetensors"}),
                 Node("clip", "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                             "device": "default"}),
                 Node("vae", "VAELoader", {"vae_name": "wan2.2_vae.safetensors"}),
                 Node("image", "LoadImage", {"image": "example.png"}),
                 Node("positive", "CLIPTextEncode", {"text": "a red fox running through fresh snow, morning light"},
                      {"clip": ("clip", 0)}),
                 Node("latent", "Wan22ImageToVideoLatent", {"width": 1280, "height": 704, "length": 121,
                                                            "batch_size": 1},
                      {"vae": ("vae", 0), "start_image": ("image", 0)}),
                 Node("sampler", "FastLightGenSampler", {"seed": 0},
                      {"model": ("student", 0), "positive": ("positive", 0), "latent_image": ("latent", 0),
                       "sigmas": ("student", 1)}),
                 Node("decode", "VAEDecode", links={"samples": ("sampler", 0), "vae": ("vae", 0)}),
                 Node("video", "CreateVideo", {"fps": 24.0}, {"images": ("decode", 0)}),
                 Node("save_video", "SaveVideo", {"filename_prefix": "fastlightgen/wan22_4step", "format": "auto",
                                                  "codec": "auto"}, {"video": ("video", 0)}),
                 Node("tiny_vae", "VAELoader", {"vae_name": WAN22_TINY_VAE}, title="Load VAE (tiny decoder, drafts)"),
                 Node("tiny_decode", "VAEDecode", links={"samples": ("sampler", 0), "vae": ("tiny_vae", 0)},
                      title="VAE Decode (tiny, drafts)"),
                 Node("tiny_video", "CreateVideo", {"fps": 24.0}, {"images": ("tiny_decode", 0)}),
                 Node("save_tiny_video", "SaveVideo", {"filename_prefix": "fastlightgen/wan22_4step_tiny_draft",
                                                       "format": "auto", "codec": "auto"},
                      {"video": ("tiny_video", 0)}, title="Save Video (tiny decoder draft)"),
             ], [
                 Note("Tiny decoder: drafts and previews",
                      "The draft branch decodes the same latent with a tiny video decoder instead of the Wan 2.2 "
                      "VAE. It is a distilled approximation of the VAE: a much faster decode (the full VAE is "
                      "over half of the 4-step student's time), softer detail and some color shift. Use it for "
                      "previews and drafts, the full VAE for finals; mute the branch you do not need.\n\n"
                      f"File: `{WAN22_TINY_VAE}` in `models/vae_approx/`, the name ComfyUI's Load VAE lists "
                      "for the Wan 2.2 tiny decoder (LightX2V's, Hugging Face `lightx2v/Autoencoders`). "
                      "madebyollin's original `taew2_2.safetensors` (GitHub `madebyollin/taehv`, folder "
                      "`safetensors/`) has the same architecture; Load VAE lists it from `models/vae/` under its "
                      "own name. Decode only: these files do not encode.", beside="tiny_vae"),
             ]),
    *(workflow for variant in A14B_VARIANTS for workflow in (_a14b_stock(variant), _a14b_pack(variant))),
    Workflow("fastlightgen_wan22_t2v_a14b_block_importance",
             "# FastLightGen: Stage I of both Wan 2.2 T2V-A14B experts (not run in tests)\nThe A14B teacher "
             f"as ComfyUI's own template loads it ({A14B_TEACHER['t2v']['high']} and {A14B_TEACHER['t2v']['low']} in "
             f"models/diffusion_models), {UMT5}, {WAN21_VAE}, and a real video clip in input/ with its caption. "
             "Each expert is scored on its part of the schedule (the high-noise one on sigmas above the boundary, "
             "T2V-A14B's 0.875 since the files name none, the low-noise one below) at 480p, 17 frames; the expert "
             "plans are saved for `python -m train.stage2 --set stage2.plan=PATH stage2.expert=high` (and low).", [
                 _expert_pair(A14B_TEACHER["t2v"]),
                 Node("clip", "CLIPLoader", {"clip_name": UMT5, "type": "wan", "device": "default"}),
                 Node("positive", "CLIPTextEncode", {"text": "a dog running on a beach at sunset"},
                      {"clip": ("clip", 0)}, title="CLIP Text Encode (the clip's caption)"),
                 Node("clip_video", "LoadVideo", {"file": "example.mp4"}),
                 Node("frames", "GetVideoComponents", links={"video": ("clip_video", 0)}),
                 Node("first_frames", "ImageFromBatch", {"batch_index": 0, "length": 17}, {"image": ("frames", 0)}),
                 Node("resize", "ImageScale", {"upscale_method": "bilinear", "width": 832, "height": 480,
                                               "crop": "center"}, {"image": ("first_frames", 0)}),
                 Node("vae", "VAELoader", {"vae_name": WAN21_VAE}),
                 Node("encode", "VAEEncode", links={"pixels": ("resize", 0), "vae": ("vae", 0)}),
                 Node("importance", "FastLightGenExpertBlockImportance",
                      {"num_timesteps": 4, "num_samples": 1, "seed": 0, "keep_ratio_high_noise": 0.7,
                       "keep_ratio_low_noise": 0.7, "prefix_reuse": True, "boundary": AUTO_BOUNDARY},
                      {"model_high_noise": ("experts", 0), "model_low_noise": ("experts", 1),
                       "latent": ("encode", 0), "positive": ("positive", 0)}),
                 Node("plot", "SaveImage", {"filename_prefix": "fastlightgen/a14b_importance"},
                      {"images": ("importance", 0)}),
                 Node("table", "PreviewAny", links={"source": ("importance", 4)}),
                 Node("save_plans", "FastLightGenSavePrunePlan", {"filename": "wan2.2_t2v_a14b_plans",
                                                                  "overwrite": False},
                      {"prune_plan": ("importance", 1)}),
             ]),
]


def _spec(info: dict, name: str) -> list:
    inputs = info.get("input", {})
    return inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)


def _default(spec: list) -> Any:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return (options.get("options") or [""])[0] if kind == "COMBO" else {"INT": 0, "FLOAT": 0.0, "STRING": "",
                                                                       "BOOLEAN": False}[kind]


def _depths(wf: Workflow) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(key: str) -> int:
        if key not in depth:
            node = next(n for n in wf.nodes if n.key == key)
            depth[key] = 1 + max((of(src) for src, _ in node.links.values()), default=-1)
        return depth[key]

    for n in wf.nodes:
        of(n.key)
    return depth


def _markdown_note(node_id: int, pos: list[float], width: float, text: str, title: str) -> dict:
    return {"id": node_id, "type": "MarkdownNote", "pos": pos, "size": [width, 200], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text], "title": title}


def to_ui(wf: Workflow, object_info: dict) -> dict:
    ids = {n.key: i + 2 for i, n in enumerate(wf.nodes)}  # id 1 is the note; wf.notes come after the nodes
    depth = _depths(wf)
    column_y: dict[int, float] = {}
    ui_nodes = [_markdown_note(1, [0, -260], 520, wf.note, "About this workflow")]
    links: list[list] = []
    outputs_of: dict[str, list[dict]] = {}
    for order, n in enumerate(sorted(wf.nodes, key=lambda n: depth[n.key]), start=1):
        info = object_info.get(n.type)
        if info is None:
            raise SystemExit(f"{wf.name}: node type {n.type} is not in /object_info")
        widgets = widget_names(info)
        unknown = set(n.widgets) - {name for name, _ in widgets}
        if unknown:
            raise SystemExit(f"{wf.name}: {n.type} has no widgets {sorted(unknown)}")
        values: list[Any] = []
        for name, control in widgets:
            values.append(n.widgets.get(name, _default(_spec(info, name))))
            if control:
                values.append("fixed")  # reproducible templates: do not re-roll the seed
        inputs = []
        for section in ("required", "optional"):
            for name in (info.get("input_order") or {}).get(section, []):
                spec = _spec(info, name)
                is_widget = any(name == w for w, _ in widgets)
                if is_widget and name not in n.links:
                    continue
                entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
                if is_widget:
                    entry["widget"] = {"name": name}
                if name in n.links:
                    src, slot = n.links[name]
                    link_id = len(links) + 1
                    links.append([link_id, ids[src], slot, ids[n.key], len(inputs), entry["type"]])
                    entry["link"] = link_id
                inputs.append(entry)
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (kind, name) in enumerate(zip(info["output"], info["output_name"]))]
        outputs_of[n.key] = outputs
        height = 60 + 26 * (len(inputs) + len(values)) + (120 if n.type in ("SaveImage", "PreviewAny") else 0)
        x = depth[n.key] * COLUMN_WIDTH
        y = column_y.get(depth[n.key], 0.0)
        column_y[depth[n.key]] = y + height + ROW_GAP
        node = {"id": ids[n.key], "type": n.type, "pos": [x, y], "size": [COLUMN_WIDTH - 40, height], "flags": {},
                "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type}, "widgets_values": values}
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    for i, note in enumerate(wf.notes, start=len(wf.nodes) + 2):
        column = depth[note.beside]
        ui_nodes.append(_markdown_note(i, [column * COLUMN_WIDTH, column_y.get(column, 0.0)], COLUMN_WIDTH - 40,
                                       note.text, note.title))
        column_y[column] = column_y.get(column, 0.0) + 200 + ROW_GAP
    by_id = {ids[k]: k for k in ids}
    for link_id, src, slot, *_ in links:
        outputs_of[by_id[src]][slot]["links"].append(link_id)
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "fastlightgen/" + wf.name)), "revision": 0,
            "last_node_id": len(wf.nodes) + len(wf.notes) + 1, "last_link_id": len(links), "nodes": ui_nodes,
            "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 300]}}, "version": 0.4}


def thumbnail(workflow: dict, path: Path) -> None:
    """A diagram of the graph: node boxes at their editor positions, links as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    fig = Figure(figsize=(4, 3), dpi=100, facecolor="#202020")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1), facecolor="#202020")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for _, src, _, dst, *_ in workflow["links"]:
        (x0, y0), (w0, _) = nodes[src]["pos"], nodes[src]["size"]
        (x1, y1) = nodes[dst]["pos"]
        ax.plot([x0 + w0, x1], [y0 + 20, y1 + 20], color="#8aa", linewidth=0.8)
    for n in workflow["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        ours = n["type"].startswith("FastLightGen")
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=4", linewidth=0.8,
                                    facecolor="#335" if ours else "#353535", edgecolor="#aaa"))
        ax.text(x + 8, y + 24, n.get("title") or n["type"].replace("FastLightGen", ""), color="white", fontsize=4.5)
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n["size"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()] + [n["pos"][1] + n["size"][1] for n in nodes.values()]
    ax.set_xlim(min(xs) - 20, max(xs) + 20)
    ax.set_ylim(max(ys) + 20, min(ys) - 20)
    ax.axis("off")
    fig.savefig(path, format="jpg", facecolor=fig.get_facecolor())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running ComfyUI; default: start one from .comfyui/")
    args = parser.parse_args(argv)
    if args.url:
        import urllib.request

        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=120) as resp:
            object_info = json.load(resp)
    else:
        from research import comfyui_harness

        with comfyui_harness.start_server() as server:
            object_info = server.object_info()
    OUT_DIR.mkdir(exist_ok=True)
    for wf in WORKFLOWS:
        ui = to_ui(wf, object_info)
        (OUT_DIR / f"{wf.name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        thumbnail(ui, OUT_DIR / f"{wf.name}.jpg")
        print(f"wrote workflows/{wf.name}.json (+ .jpg), {len(wf.nodes)} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
