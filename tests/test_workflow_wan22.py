"""The shipped Wan 2.2 TI2V-5B workflow (workflows/fastlightgen_wan22_ti2v_5b_4step.json) in a real ComfyUI server.

Its four model files go through four stock loaders, and only the diffusion model's size and the tiny
decoder's latent width are read from the files:

* the DiT (Load FastLightGen Checkpoint -> comfy.sd.load_diffusion_model_state_dict): model_detection.py infers
  Wan's width, depth, heads and the TI2V-5B variant (48 latent channels) from the weights, so the random toy
  student, which has Wan 2.2 TI2V-5B's exact key layout at toy width and 4096-wide text input, stands in for it;
* the VAE (VAELoader -> comfy.sd.VAE): a file is the Wan 2.2 VAE when it has
  `decoder.upsamples.0.upsamples.0.residual.2.weight` (and `decoder.middle.0.residual.0.gamma`), and then sd.py
  builds it at a fixed size (dim 160, decoder dim 256, z 48, dim_mult [1, 2, 4, 4]); unlike the Wan 2.1 VAE
  (width from `decoder.head.0.gamma`) nothing is inferred, so a tiny file cannot load. The test writes a
  random VAE at the real size instead (705M parameters, 1.4 GB in bf16, about a minute on a CPU);
* the text encoder (CLIPLoader type wan -> sd.py detect_te_model / t5xxl_detect): a file is UMT5-XXL only when
  `encoder.block.23.layer.1.DenseReluDense.wi_1.weight` exists and is 4096 wide, and text_encoders/wan.py then
  builds the model from the fixed text_encoders/umt5_config_xxl.json (24 layers, width 4096, vocabulary 256384:
  5.7B parameters, 11 GB in bf16), so neither a tiny UMT5 nor a random full one fits a test. The graph run here
  replaces CLIPLoader + CLIP Text Encode by the pack's Toy Text Encode, whose CONDITIONING has UMT5-XXL's shape
  per token (4096 wide); test_a_tiny_umt5_is_not_detected pins that the stock detection refuses a tiny UMT5;
* the tiny decoder of the draft branch (VAELoader from models/vae_approx -> comfy.sd.VAE): a file is one when it
  has `decoder.22.bias`, and its latent width (48: Wan 2.2) is read from `decoder.1.weight`; the test writes
  comfy.taesd.taehv.TAEHV with random weights (research.bench.e2e.random_taehv, 11M parameters) under the
  workflow's file name.

Everything else is the shipped graph as it stands: LoadImage -> Wan22ImageToVideoLatent (stock VAE encode of the
start image) -> FastLightGen Sampler with the checkpoint's SIGMAS -> VAE Decode -> Create Video -> Save Video,
and the same latent through the tiny decoder's branch, at a reduced size (64x64, 5 frames).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from research import comfyui_harness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from workflow_to_prompt import workflow_to_prompt  # noqa: E402

NAME = "fastlightgen_wan22_ti2v_5b_4step"
VAE, TINY_VAE = "wan2.2_vae.safetensors", "lighttaew2_2.safetensors"  # the workflow's own file names
SIZE, LENGTH = 64, 5  # pixels, frames: a 4x4 latent of 2 frames


def _random_wan22_vae(path: Path) -> None:
    """A random Wan 2.2 VAE of the real size and keys, as comfy.sd.VAE builds it (ComfyUI's modules leave
    weights uninitialised, so each tensor is drawn here: weights ~ N(0, 1/fan_in), norms 1, biases 0)."""
    import comfy.ldm.wan.vae2_2
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                            attn_scales=[], temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, meta in model.state_dict().items():
        if key.endswith("gamma"):
            tensors[key] = torch.ones(meta.shape, dtype=torch.bfloat16)
        elif key.endswith("bias") or meta.ndim < 2:
            tensors[key] = torch.zeros(meta.shape, dtype=torch.bfloat16)
        else:
            fan_in = meta[0].numel()
            tensors[key] = (torch.randn(meta.shape, generator=g) / fan_in ** 0.5).to(torch.bfloat16)
    assert "decoder.upsamples.0.upsamples.0.residual.2.weight" in tensors  # what sd.py detects
    save_file(tensors, str(path))


def _random_tiny_vae(path: Path) -> None:
    from safetensors.torch import save_file

    from research.bench.e2e import random_taehv

    path.parent.mkdir()
    save_file(random_taehv(48).state_dict(), str(path))


@pytest.fixture(scope="module")
def server(comfy_in_process, tmp_path_factory):
    from test_workflows import _export_stand_ins

    models = tmp_path_factory.mktemp("wan22_models")
    _export_stand_ins(models)
    (models / "vae").mkdir()
    _random_wan22_vae(models / "vae" / VAE)
    _random_tiny_vae(models / "vae_approx" / TINY_VAE)
    config = models / "extra_model_paths.yaml"
    config.write_text("fastlightgen_wan22_tests:\n  base_path: /\n  fastlightgen: |\n"
                      f"    {REPO / 'models' / 'fastlightgen'}\n    {models}\n"
                      f"  vae: {models / 'vae'}\n  vae_approx: {models / 'vae_approx'}\n")
    handle = comfyui_harness.start_server(extra_args=["--extra-model-paths-config", str(config)])
    try:
        yield handle
    finally:
        handle.stop()
        (models / "vae" / VAE).unlink()  # 1.4 GB: not kept in pytest's tmp folders


def test_a_tiny_umt5_is_not_detected(comfy_in_process):
    """Why the text encoder is replaced: the stock detection takes only a 24-layer, 4096-wide UMT5."""
    import comfy.sd

    tiny = {f"encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight": torch.zeros(96, 64) for i in range(24)}
    assert comfy.sd.detect_te_model(tiny) != comfy.sd.TEModel.T5_XXL
    assert comfy.sd.detect_te_model({"encoder.block.23.layer.1.DenseReluDense.wi_1.weight":
                                     torch.zeros(1, 4096)}) == comfy.sd.TEModel.T5_XXL
    config = json.loads((Path(comfy.sd.__file__).parent / "text_encoders" / "umt5_config_xxl.json").read_text())
    assert (config["d_model"], config["num_layers"]) == (4096, 24)


def test_the_wan22_workflow_runs_with_the_stock_vae_and_a_toy_text_encoder(server):
    import av

    prompt = workflow_to_prompt(json.loads((REPO / "workflows" / f"{NAME}.json").read_text()), server.object_info())
    by_class = {v["class_type"]: k for k, v in prompt.items()}  # of the classes the graph holds once
    assert sorted(v["inputs"]["vae_name"] for v in prompt.values() if v["class_type"] == "VAELoader") == [TINY_VAE, VAE]
    assert prompt[by_class["LoadImage"]]["inputs"]["image"] == "example.png"  # the harness copies it to input/
    # the one replaced part: UMT5 (CLIPLoader + CLIP Text Encode) -> Toy Text Encode, in the encoder's place
    del prompt[by_class["CLIPLoader"]]
    prompt[by_class["CLIPTextEncode"]] = {"class_type": "FastLightGenToyTextEncode",
                                          "inputs": {"prompt": "a red circle moving right on a plain background"}}
    prompt[by_class["FastLightGenLoadCheckpoint"]]["inputs"]["ckpt_name"] = "toy_student.safetensors"
    prompt[by_class["Wan22ImageToVideoLatent"]]["inputs"].update(width=SIZE, height=SIZE, length=LENGTH)

    entry = server.run_prompt(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success"
    videos = {}  # the full VAE's and the tiny decoder's, by their Save Video's prefix
    for k, v in entry["outputs"].items():
        (item,) = [item for item in v.get("images", []) if item["filename"].endswith(".mp4")]
        with av.open(str(server.output_path(item))) as container:
            videos[prompt[k]["inputs"]["filename_prefix"]] = np.stack(
                [f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert sorted(videos) == ["fastlightgen/wan22_4step", "fastlightgen/wan22_4step_tiny_draft"]
    for frames in videos.values():
        assert frames.shape == (LENGTH, SIZE, SIZE, 3) and np.std(frames) > 0
    assert not np.array_equal(*videos.values())  # two decoders, not one video saved twice
