"""Key conversion diffusers <-> original/ComfyUI Wan layout, and building models from either layout.

All models are tiny instances of the real `diffusers.WanTransformer3DModel`, shaped like the
Wan releases they stand for (channel counts, text width, I2V image branch, TI2V per-token time).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from fastlightgen.wan_config import build_wan_from_state_dict, infer_wan_config
from fastlightgen.wan_keys import (
    COMFY_PREFIX,
    detect_layout,
    diffusers_to_original,
    original_to_diffusers,
    to_diffusers_layout,
)

_T2V = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
)
CONFIGS = {
    "wan21_t2v": _T2V,
    "wan21_t2v_no_cross_norm": {**_T2V, "cross_attn_norm": False},
    # diffusers' Wan 2.1 I2V: CLIP image features of width 1280, added k/v projections from the inner dim.
    "wan21_i2v": {**_T2V, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 32},
    "wan21_flf2v": {**_T2V, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 32, "pos_embed_seq_len": 8},
    # Wan 2.2 TI2V-5B: 48-channel latents, umT5 width 4096; tiny hidden size.
    "wan22_ti2v": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48,
        text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=3, cross_attn_norm=True,
    ),
}
# FLF2V's image embedder folds the batch into pairs of frames, so it gets no forward test.
FORWARD_CONFIGS = ["wan21_t2v", "wan21_t2v_no_cross_norm", "wan21_i2v", "wan22_ti2v"]
TEXT_TOKENS_I2V = 512  # diffusers' I2V attention splits image/text context at a hard-coded 512 text tokens


def make_model(name: str) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIGS[name]).eval()
    # Norm weights start at 1 and biases at 0; randomise everything so that a tensor routed to
    # the wrong parameter (q/k norm swapped, ...) changes the output.
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.5, 0.5)
    return model


def head_dim(name: str) -> int:
    return CONFIGS[name]["attention_head_dim"]


def cloned(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state_dict.items()}


def forward_inputs(name: str, per_token_time: bool = False) -> dict[str, torch.Tensor]:
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(1)
    batch, frames, height, width = 2, 3, 4, 4
    is_i2v = cfg.get("image_dim") is not None
    inputs = {
        "hidden_states": torch.randn(batch, cfg["in_channels"], frames, height, width, generator=gen),
        "timestep": torch.tensor([250.0, 900.0]),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS_I2V if is_i2v else 7, cfg["text_dim"], generator=gen),
    }
    if is_i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 5, cfg["image_dim"], generator=gen)
    if per_token_time:
        # TI2V pins the first latent frame (its 2x2 tokens) at t = 0 while the rest is noisy.
        seq_len = frames * (height // 2) * (width // 2)
        timestep = torch.full((batch, seq_len), 700.0)
        timestep[:, : seq_len // frames] = 0.0
        inputs["timestep"] = timestep
    return inputs


def run(model: WanTransformer3DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_exact(name):
    source = make_model(name).state_dict()
    back = original_to_diffusers(diffusers_to_original(source))
    assert list(back) == list(source)
    assert all(back[k] is source[k] for k in source)  # renamed, never copied


@pytest.mark.parametrize("name", CONFIGS)
def test_original_names_agree_with_diffusers_own_converter(name):
    # Independent oracle: diffusers' loader for original Wan checkpoints (it pops from its input).
    source = make_model(name).state_dict()
    prefixed = {COMFY_PREFIX + k: v for k, v in diffusers_to_original(source).items()}
    converted = convert_wan_transformer_to_diffusers(prefixed)
    # That loader forgets FLF2V's pos embed (diffusers' scripts/convert_wan_to_diffusers.py maps
    # it to image_embedder.pos_embed, as we do): rename it here so the rest is still compared.
    if "img_emb.emb_pos" in converted:
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    assert set(converted) == set(source)
    assert all(converted[k] is source[k] for k in source)


COMFY_NAMES = [
    "patch_embedding.weight", "time_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight",
    "text_embedding.0.weight", "text_embedding.2.bias", "head.head.weight", "head.modulation",
    "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias",
    "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.k.weight", "blocks.0.cross_attn.norm_k.weight",
    "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "blocks.1.cross_attn.v.bias",
]
I2V_NAMES = [
    "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.v_img.bias", "blocks.0.cross_attn.norm_k_img.weight",
    "img_emb.proj.0.weight", "img_emb.proj.1.weight", "img_emb.proj.3.bias", "img_emb.proj.4.bias",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_original_layout_uses_comfyui_names(name):
    cfg = CONFIGS[name]
    keys = set(diffusers_to_original(make_model(name).state_dict()))
    expected = set(COMFY_NAMES)
    if cfg.get("image_dim"):
        expected |= set(I2V_NAMES)
    if cfg.get("pos_embed_seq_len"):
        expected.add("img_emb.emb_pos")
    assert expected <= keys
    # ComfyUI's cross-attention LayerNorm is norm3; its norm2 (pre-FFN) has no weights.
    assert ("blocks.0.norm3.weight" in keys) == cfg["cross_attn_norm"]
    assert not any(".norm1." in k or ".norm2." in k for k in keys)
    diffusers_only = ("condition_embedder", "attn1", "attn2", "proj_out", "scale_shift_table", ".net.", "to_")
    assert not [k for k in keys if any(part in k for part in diffusers_only)]


@pytest.mark.parametrize("name", CONFIGS)
def test_infer_config_matches_source(name):
    model = make_model(name)
    for state_dict in (model.state_dict(), diffusers_to_original(model.state_dict())):
        config = infer_wan_config(state_dict, head_dim=head_dim(name))
        expected = {k: model.config[k] for k in config}
        expected["patch_size"] = tuple(expected["patch_size"])
        assert config == expected


@pytest.mark.parametrize("name", FORWARD_CONFIGS)
def test_model_rebuilt_from_original_layout_is_bit_identical(name):
    source = make_model(name)
    rebuilt = build_wan_from_state_dict(cloned(diffusers_to_original(source.state_dict())), head_dim(name)).eval()
    inputs = forward_inputs(name)
    assert torch.equal(run(rebuilt, inputs), run(source, inputs))


def test_ti2v_rebuilt_model_is_bit_identical_with_per_token_timesteps():
    source = make_model("wan22_ti2v")
    rebuilt = build_wan_from_state_dict(cloned(diffusers_to_original(source.state_dict())), 32).eval()
    inputs = forward_inputs("wan22_ti2v", per_token_time=True)
    out = run(rebuilt, inputs)
    assert torch.equal(out, run(source, inputs))
    # The per-token path must really be taken: a scalar-per-sample timestep gives something else.
    assert not torch.equal(out, run(source, forward_inputs("wan22_ti2v")))


def test_build_from_flf2v_state_dict_is_strict_and_complete():
    source = make_model("wan21_flf2v")
    rebuilt = build_wan_from_state_dict(diffusers_to_original(source.state_dict()), 16)
    assert rebuilt.condition_embedder.image_embedder.pos_embed.shape == (1, 8, 1280)
    assert set(rebuilt.state_dict()) == set(source.state_dict())
    assert torch.equal(rebuilt.rope.freqs_cos, source.rope.freqs_cos)


def test_build_rejects_a_missing_tensor():
    original = diffusers_to_original(make_model("wan21_t2v").state_dict())
    del original["blocks.1.self_attn.v.bias"]
    with pytest.raises(RuntimeError, match="attn1.to_v.bias"):
        build_wan_from_state_dict(original, 16)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_block_numbering_gap_is_an_error(layout):
    state_dict = make_model("wan22_ti2v").state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("blocks.1.")}
    if layout == "original":
        state_dict = diffusers_to_original(state_dict)
    with pytest.raises(ValueError, match=r"numbered with gaps: present \[0, 2\], missing \[1\].*renumber them 0\.\.1"):
        infer_wan_config(state_dict, head_dim=32)
    with pytest.raises(ValueError, match="numbered with gaps"):
        build_wan_from_state_dict(state_dict, head_dim=32)


@pytest.mark.parametrize(
    "convert, key",
    [
        (diffusers_to_original, "blocks.0.attn1.to_q.alpha"),
        (diffusers_to_original, "blocks.0.self_attn.q.weight"),  # original name fed to the wrong direction
        (diffusers_to_original, "blocks.0.attn1.norm_q.bias"),  # RMSNorm has no bias
        (original_to_diffusers, "vace_blocks.0.after_proj.weight"),
        (original_to_diffusers, "first_stage_model.decoder.conv_in.weight"),
        (original_to_diffusers, COMFY_PREFIX + "blocks.0.cross_attn.alpha"),
    ],
)
def test_unknown_key_is_an_error_naming_it(convert, key):
    source = make_model("wan21_t2v").state_dict()
    state_dict = source if convert is diffusers_to_original else diffusers_to_original(source)
    state_dict = {**state_dict, key: torch.zeros(1)}
    with pytest.raises(ValueError, match=f"unknown key '{key}'"):
        convert(state_dict)


def test_comfy_prefix_is_stripped():
    source = make_model("wan21_i2v")
    prefixed = {COMFY_PREFIX + k: v for k, v in diffusers_to_original(source.state_dict()).items()}
    assert detect_layout(prefixed) == "original"
    back = original_to_diffusers(prefixed)
    assert list(back) == list(source.state_dict())
    rebuilt = build_wan_from_state_dict(prefixed, 16).eval()
    inputs = forward_inputs("wan21_i2v")
    assert torch.equal(run(rebuilt, inputs), run(source, inputs))


def test_key_present_with_and_without_prefix_is_an_error():
    original = diffusers_to_original(make_model("wan21_t2v").state_dict())
    original[COMFY_PREFIX + "head.modulation"] = original["head.modulation"]
    with pytest.raises(ValueError, match="duplicates another key"):
        original_to_diffusers(original)


def test_detect_layout():
    source = make_model("wan21_t2v").state_dict()
    assert detect_layout(source) == "diffusers"
    assert detect_layout(diffusers_to_original(source)) == "original"
    assert detect_layout({"blocks.3.ffn.0.weight": None}) == "original"  # blocks alone suffice
    with pytest.raises(ValueError, match="not a Wan 2.x diffusion model: its keys look like no model"):
        detect_layout({"patch_embedding.weight": None, "unet.conv_in.weight": None})
    with pytest.raises(ValueError, match="mixes diffusers-layout and original-layout Wan keys"):  # a half-converted mix
        detect_layout({"proj_out.weight": None, "head.modulation": None})


def test_to_diffusers_layout_checks_diffusers_input_too():
    source = make_model("wan21_t2v").state_dict()
    assert to_diffusers_layout(source) == source
    with pytest.raises(ValueError, match="unknown key 'blocks.0.attn1.lora_A.weight'"):
        to_diffusers_layout({**source, "blocks.0.attn1.lora_A.weight": torch.zeros(1)})


def test_head_dim_must_divide_inner_dim():
    with pytest.raises(ValueError, match="not a multiple of head_dim 128"):
        infer_wan_config(make_model("wan21_t2v").state_dict())  # inner dim 32, default head_dim 128


def test_checkpoint_without_qk_norm_is_rejected():
    state_dict = {k: v for k, v in make_model("wan21_t2v").state_dict().items() if ".norm_q." not in k and ".norm_k." not in k}
    with pytest.raises(ValueError, match="qk_norm=False"):
        infer_wan_config(state_dict, head_dim=16)
