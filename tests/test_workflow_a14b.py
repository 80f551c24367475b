"""The shipped Wan 2.2 A14B workflows (T2V and I2V) in a real ComfyUI server (CPU), on tiny stand-ins under the
real names.

The workflows name the real files (each variant's student's two experts, ComfyUI's fp8_scaled T2V-A14B teacher,
UMT5, the Wan 2.1 VAE); here each name holds a tiny random stand-in the stock loaders read the same way:

* the experts: Wan 2.1 T2V-shaped DiTs (what ComfyUI detects A14B's experts as; I2V's with 36 input channels),
  4 blocks at the toy teacher's width; the students physically pruned with expert metadata, the teacher
  fp8_scaled without metadata (tests/tiny_models.py);
* the Wan 2.1 VAE: comfy.ldm.wan.vae.WanVAE at width 8 (sd.py reads the width from `decoder.head.0.gamma`), random;
* UMT5 cannot be tiny (test_workflow_wan22.py says why): CLIPLoader + CLIP Text Encode become Toy Text Encode,
  whose CONDITIONING is UMT5-XXL's shape per token;
* the Block Importance workflow's clip: a small mp4 written to input/; the I2V workflows' start image: a png.

For each variant the stock graph (two Load Diffusion Model, two KSamplerAdvanced on steps 0-2 and 2-4; for I2V
both fed by the stock WanImageToVideo) and the pack's graph (Load FastLightGen Expert Pair -> FastLightGen
Sampler) must give the same latent bit for bit, and the pack's graph run again after another seed must give its
first latent (the cached experts are unchanged by sampling).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_a14b_pair, save_a14b_teacher_files, save_random_wan21_vae

from fastlightgen.experts import AUTO_BOUNDARY, I2V_BOUNDARY, T2V_BOUNDARY
from research import comfyui_harness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from build_workflows import A14B_START_IMAGE, A14B_STUDENT, A14B_TEACHER, A14B_VARIANTS, WAN21_VAE  # noqa: E402
from workflow_to_prompt import workflow_to_prompt  # noqa: E402

VARIANTS = list(A14B_VARIANTS)
BOUNDARY = {"t2v": T2V_BOUNDARY, "i2v": I2V_BOUNDARY}  # what each variant's export writes in the students' metadata
IMPORTANCE = "fastlightgen_wan22_t2v_a14b_block_importance"
KEPT = {"high": [0, 2, 3], "low": [0, 1, 3]}
SIZE, LENGTH = 64, 5  # pixels, frames: an 8x8 latent of 2 frames


def _clip(path: Path) -> None:
    """A 9-frame 64x64 mp4 of a square moving right."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for t in range(9):
            frame = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
            frame[24:40, 4 + 5 * t:20 + 5 * t] = (220, 60, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _start_image(path: Path) -> None:
    """A 64x64 png: a red square on grey."""
    from PIL import Image

    image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
    image[24:40, 4:20] = (220, 60, 30)
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def server(comfy_in_process, tmp_path_factory):
    models = tmp_path_factory.mktemp("a14b_models")
    files = [(A14B_STUDENT[variant], save_a14b_pair(models, KEPT, BOUNDARY[variant], prefix=variant,
                                                   variant=variant)) for variant in VARIANTS]
    for names, paths in (*files, (A14B_TEACHER["t2v"], save_a14b_teacher_files(models))):
        for expert, path in paths.items():
            path.rename(models / names[expert])
    (models / "vae").mkdir()
    save_random_wan21_vae(models / "vae" / WAN21_VAE)
    config = models / "extra_model_paths.yaml"
    config.write_text(f"fastlightgen_a14b_tests:\n  base_path: /\n  diffusion_models: {models}\n"
                      f"  vae: {models / 'vae'}\n  fastlightgen_plans: {models / 'plans'}\n")
    handle = comfyui_harness.start_server(extra_args=["--extra-model-paths-config", str(config)])
    handle.models_dir = models
    try:
        _clip(handle.input_dir / "example.mp4")
        _start_image(handle.input_dir / A14B_START_IMAGE)
        yield handle
    finally:
        handle.stop()


def _shipped(name: str, server) -> dict:
    return workflow_to_prompt(json.loads((REPO / "workflows" / f"{name}.json").read_text()), server.object_info())


def _toy_prompt(name: str, server) -> dict:
    """The shipped workflow with the text encoder replaced by Toy Text Encode, at 64x64 and 5 frames."""
    prompt = _shipped(name, server)
    for key, node in list(prompt.items()):
        if node["class_type"] == "CLIPLoader":
            del prompt[key]
        elif node["class_type"] == "CLIPTextEncode":
            prompt[key] = {"class_type": "FastLightGenToyTextEncode", "inputs": {"prompt": node["inputs"]["text"]}}
        elif node["class_type"] in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "ImageScale"):
            node["inputs"].update(width=SIZE, height=SIZE, **({"length": LENGTH} if "length" in node["inputs"] else {}))
        elif node["class_type"] == "ImageFromBatch":
            node["inputs"]["length"] = LENGTH
    return prompt


def _by_class(prompt: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in prompt.items() if v["class_type"] == class_type), key=int)


def _sampled(server, prompt: dict, sampler: str) -> torch.Tensor:
    """The latent `sampler` (a node id) makes when `prompt` runs, saved by a SaveLatent added to it."""
    from safetensors.torch import load_file

    prompt = {**prompt, "990": {"class_type": "SaveLatent",
                                "inputs": {"samples": [sampler, 0], "filename_prefix": "a14b/latent"}}}
    entry = server.run_prompt(prompt, timeout=600)
    (item,) = entry["outputs"]["990"]["latents"]
    return load_file(str(server.output_path(item)))["latent_tensor"]


def _names(variant: str) -> tuple[str, str]:
    """The stock and the pack's workflow of the 4-step `variant`-A14B student."""
    return f"fastlightgen_wan22_{variant}_a14b_4step_stock", f"fastlightgen_wan22_{variant}_a14b_4step"


def _assert_stock_text_encoder_and_vae(prompt: dict) -> None:
    encoders = {v["inputs"]["clip_name"]: v["inputs"]["type"] for v in prompt.values()
                if v["class_type"] == "CLIPLoader"}
    assert encoders == {"umt5_xxl_fp8_e4m3fn_scaled.safetensors": "wan"}
    assert {v["inputs"]["vae_name"] for v in prompt.values() if v["class_type"] == "VAELoader"} == {WAN21_VAE}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_workflows_use_the_real_file_names_and_only_stock_nodes_where_promised(server, variant):
    stock_name, pack_name = _names(variant)
    stock = _shipped(stock_name, server)
    assert not [v["class_type"] for v in stock.values() if v["class_type"].startswith("FastLightGen")]
    assert sorted(v["inputs"]["unet_name"] for v in stock.values() if v["class_type"] == "UNETLoader") == \
        sorted(A14B_STUDENT[variant].values())
    samplers = [v["inputs"] for v in stock.values() if v["class_type"] == "KSamplerAdvanced"]
    steps = sorted((v["start_at_step"], v["end_at_step"], v["add_noise"]) for v in samplers)
    assert steps == [(0, 2, "enable"), (2, 4, "disable")]
    pack = _shipped(pack_name, server)
    assert len(pack) < len(stock)
    (pair,) = [v["inputs"] for v in pack.values() if v["class_type"] == "FastLightGenLoadExpertPair"]
    assert (pair["high_noise_name"], pair["low_noise_name"]) == (A14B_STUDENT[variant]["high"],
                                                                 A14B_STUDENT[variant]["low"])
    (sampler,) = [v["inputs"] for v in pack.values() if v["class_type"] == "FastLightGenSampler"]
    assert pair["boundary"] == sampler["boundary"] == AUTO_BOUNDARY  # from the files, else the model: either variant
    for prompt in (stock, pack):
        _assert_stock_text_encoder_and_vae(prompt)
        latent = {v["class_type"]: k for k, v in prompt.items()
                  if v["class_type"] in ("EmptyHunyuanLatentVideo", "WanImageToVideo")}
        assert list(latent) == [{"t2v": "EmptyHunyuanLatentVideo", "i2v": "WanImageToVideo"}[variant]]
        (key,) = latent.values()
        assert {k: prompt[key]["inputs"][k] for k in ("width", "height", "length")} == \
            {"width": 1280, "height": 720, "length": 81}
    if variant == "i2v":  # the start image reaches every sampler through WanImageToVideo's outputs
        (i2v,) = _by_class(stock, "WanImageToVideo")
        assert stock[stock[i2v]["inputs"]["start_image"][0]]["inputs"]["image"] == A14B_START_IMAGE
        assert all((v["positive"], v["negative"]) == ([i2v, 0], [i2v, 1]) for v in samplers)
        (i2v,) = _by_class(pack, "WanImageToVideo")
        assert (sampler["positive"], sampler["latent_image"]) == ([i2v, 0], [i2v, 2])


def test_the_block_importance_workflow_loads_comfyuis_t2v_teacher_files(server):
    importance = _shipped(IMPORTANCE, server)
    (pair,) = [v["inputs"] for v in importance.values() if v["class_type"] == "FastLightGenLoadExpertPair"]
    assert (pair["high_noise_name"], pair["low_noise_name"]) == (A14B_TEACHER["t2v"]["high"],
                                                                 A14B_TEACHER["t2v"]["low"])
    _assert_stock_text_encoder_and_vae(importance)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_stock_graph_equals_the_packs_sampler_bit_for_bit(server, variant):
    stock_name, pack_name = _names(variant)
    stock = _toy_prompt(stock_name, server)
    ours = _toy_prompt(pack_name, server)
    (low_sampler,) = [k for k in _by_class(stock, "KSamplerAdvanced")
                      if stock[k]["inputs"]["start_at_step"] == 2]
    (sampler,) = _by_class(ours, "FastLightGenSampler")
    expected = _sampled(server, stock, low_sampler)
    got = _sampled(server, ours, sampler)
    assert got.shape == (1, 16, 2, SIZE // 8, SIZE // 8) and torch.isfinite(got).all() and got.std() > 0
    assert torch.equal(got, expected)

    # the cached experts are unchanged by sampling: another seed, then the first seed again, gives the first latent
    ours[sampler]["inputs"]["seed"] = 1
    assert not torch.equal(_sampled(server, ours, sampler), expected)
    ours[sampler]["inputs"]["seed"] = 0
    assert torch.equal(_sampled(server, ours, sampler), expected)

    # the whole workflow runs to its video
    entry = server.run_prompt(_toy_prompt(pack_name, server), timeout=600)
    (video,) = [item for v in entry["outputs"].values() for item in v.get("images", [])
                if item["filename"].endswith(".mp4")]
    assert server.output_path(video).stat().st_size > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_saved_with_the_variants_own_boundary_still_give_the_same_latent(server, variant):
    """Before the boundary input was automatic (0), the templates set each variant's own: 0.875, 0.9."""
    ours = _toy_prompt(_names(variant)[1], server)
    (sampler,) = _by_class(ours, "FastLightGenSampler")
    expected = _sampled(server, ours, sampler)
    for key in (*_by_class(ours, "FastLightGenLoadExpertPair"), sampler):
        ours[key]["inputs"]["boundary"] = BOUNDARY[variant]
    assert torch.equal(_sampled(server, ours, sampler), expected)


def test_a_swapped_pair_is_refused_before_sampling(server):
    prompt = _toy_prompt(_names("t2v")[1], server)
    (loader,) = _by_class(prompt, "FastLightGenLoadExpertPair")
    prompt[loader]["inputs"].update(high_noise_name=A14B_STUDENT["t2v"]["low"],
                                    low_noise_name=A14B_STUDENT["t2v"]["high"])
    with pytest.raises(comfyui_harness.PromptError, match="the experts are swapped"):
        server.run_prompt(prompt, timeout=600)


def test_block_importance_of_both_teacher_experts_saves_the_expert_plans(server):
    from PIL import Image

    from fastlightgen.plan import read_plan

    prompt = _toy_prompt(IMPORTANCE, server)
    (save,) = _by_class(prompt, "FastLightGenSavePrunePlan")
    prompt[save]["inputs"]["overwrite"] = True
    entry = server.run_prompt(prompt, timeout=600)
    message = entry["outputs"][save]["text"][0]
    path = Path(message.splitlines()[0].removeprefix("saved "))
    assert path.parent == server.models_dir / "plans" and "stage2.expert=high" in message
    plans = {expert: read_plan(path, expert) for expert in ("high", "low")}  # what train.stage2 reads
    assert all(plan.fingerprint.num_blocks == 4 and len(plan.kept) == 3 for plan in plans.values())
    assert plans["high"].scores != plans["low"].scores
    (plot,) = [item for k in _by_class(prompt, "SaveImage") for item in entry["outputs"][k]["images"]]
    assert Image.open(server.output_path(plot)).height == 2 * 360  # a chart per expert
    table = next(v["text"][0] for k, v in entry["outputs"].items() if prompt[k]["class_type"] == "PreviewAny")
    assert "high-noise expert, sigma in [0.875, 1.0]" in table and "low-noise expert" in table
