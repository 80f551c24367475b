"""fastlightgen.lora_remap: LoRAs for the full Wan moved onto a pruned student, with the report and errors.

The equivalence checked here is the library's contract: merging a LoRA into the teacher and then pruning
gives the same weights as pruning and then merging the remapped LoRA (tests/test_nodes_lora.py checks the
same through ComfyUI's own weight patching, for every key form).
"""
import pytest
import torch
from tiny_models import tiny_wan

from fastlightgen.adapters import adapt
from fastlightgen.lora_remap import (LoRAKeyError, check_fit, diffusers_lora_names, lora_modules, parse_key,
                                     remap_lora)
from fastlightgen.wan_keys import diffusers_to_original, original_to_diffusers

BLOCKS, KEPT = 6, [0, 2, 3, 5]  # student block i is original block KEPT[i]
RANK, ALPHA = 2, 3.0


def _pair(gen: torch.Generator, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, RANK, generator=gen), torch.randn(RANK, inp, generator=gen)


def _comfy_lora(original: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A ComfyUI-form LoRA (lora_A/lora_B, alpha) on every Linear of every block and on the head, plus
    .diff/.diff_b full deltas on a norm, the block modulation and a bias."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, w in original.items():
        if w.ndim == 2 and key.endswith(".weight") and not key.startswith(("time_", "text_")):
            module = "diffusion_model." + key[:-len(".weight")]
            lora[f"{module}.lora_B.weight"], lora[f"{module}.lora_A.weight"] = _pair(gen, *w.shape)
            lora[f"{module}.alpha"] = torch.tensor(ALPHA)
    for block in range(BLOCKS):
        prefix = f"diffusion_model.blocks.{block}."
        lora[prefix + "norm3.diff"] = torch.randn(original[f"blocks.{block}.norm3.weight"].shape, generator=gen)
        lora[prefix + "modulation.diff"] = torch.randn(original[f"blocks.{block}.modulation"].shape, generator=gen)
        lora[prefix + "ffn.0.diff_b"] = torch.randn(original[f"blocks.{block}.ffn.0.bias"].shape, generator=gen)
    return lora


def _merge(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout weights with a ComfyUI-form LoRA merged in at strength 1 (written out, no ComfyUI)."""
    merged = {k: v.clone() for k, v in original.items()}
    for key, t in lora.items():
        module = key[len("diffusion_model."):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        if key.endswith(".lora_B.weight"):
            down = lora[key.replace("lora_B", "lora_A")]
            merged[module + ".weight"] += ALPHA / RANK * (t @ down)
        elif key.endswith(".diff"):
            merged[module if module.endswith("modulation") else module + ".weight"] += t
        elif key.endswith(".diff_b"):
            merged[module + ".bias"] += t
    return merged


@pytest.fixture(scope="module")
def teacher():
    return tiny_wan("ti2v", layers=BLOCKS)


def test_merge_then_prune_equals_prune_then_merge_remapped(teacher):
    original = diffusers_to_original(teacher.state_dict())
    lora = _comfy_lora(original)
    merged_teacher = teacher.__class__.from_config(teacher.config)
    merged_teacher.load_state_dict(original_to_diffusers(_merge(original, lora)))
    expected = diffusers_to_original(adapt(merged_teacher).pruned_model(KEPT).state_dict())
    student = diffusers_to_original(adapt(teacher).pruned_model(KEPT).state_dict())
    remapped, report = remap_lora(lora, KEPT, BLOCKS)
    got = _merge(student, remapped)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert report.dropped == (1, 4) and report.lora_blocks == tuple(range(BLOCKS))


@pytest.mark.parametrize("key, renamed", [
    ("diffusion_model.blocks.3.self_attn.q.lora_A.weight", "diffusion_model.blocks.2.self_attn.q.lora_A.weight"),
    ("diffusion_model.blocks.5.ffn.0.lora_down.weight", "diffusion_model.blocks.3.ffn.0.lora_down.weight"),
    ("diffusion_model.blocks.2.cross_attn.o.alpha", "diffusion_model.blocks.1.cross_attn.o.alpha"),
    ("transformer.blocks.3.attn1.to_q.lora_B.weight", "transformer.blocks.2.attn1.to_q.lora_B.weight"),
    ("transformer.blocks.5.attn2.to_out.0.lora_A.weight", "transformer.blocks.3.attn2.to_out.0.lora_A.weight"),
    ("lora_unet_blocks_3_self_attn_q.lora_down.weight", "lora_unet_blocks_2_self_attn_q.lora_down.weight"),
    ("lora_unet_blocks_5_ffn_2.alpha", "lora_unet_blocks_3_ffn_2.alpha"),
    ("lora_unet__blocks_2_cross_attn_k.lora_up.weight", "lora_unet__blocks_1_cross_attn_k.lora_up.weight"),
    ("diffusion_model.blocks.3.norm3.diff", "diffusion_model.blocks.2.norm3.diff"),
    ("diffusion_model.blocks.5.self_attn.q.diff_b", "diffusion_model.blocks.3.self_attn.q.diff_b"),
    ("diffusion_model.blocks.0.modulation.diff", "diffusion_model.blocks.0.modulation.diff"),
    ("diffusion_model.head.head.lora_A.weight", "diffusion_model.head.head.lora_A.weight"),
    ("transformer.proj_out.lora_B.weight", "transformer.proj_out.lora_B.weight"),
    ("lora_unet_text_embedding_0.lora_down.weight", "lora_unet_text_embedding_0.lora_down.weight"),
    ("diffusion_model.blocks.4.self_attn.q.lora_A.weight", None),
    ("lora_unet_blocks_1_ffn_0.lora_up.weight", None),
    ("transformer.blocks.4.ffn.net.2.diff", None),
])
def test_every_key_form_is_renumbered_or_left_out(key, renamed):
    suffix = parse_key(key).suffix
    tensor = {"alpha": torch.tensor(1.0), "diff_b": torch.ones(1)}.get(suffix, torch.ones(1, 1))
    partner = {"lora_A.weight": "lora_B.weight", "lora_B.weight": "lora_A.weight", "lora_down.weight":
               "lora_up.weight", "lora_up.weight": "lora_down.weight", "alpha": "lora_up.weight"}.get(suffix)
    lora = {key: tensor}
    if partner:
        lora[key[:-len(suffix)] + partner] = torch.ones(1, 1)
        if suffix == "alpha":
            lora[key[:-len(suffix)] + "lora_down.weight"] = torch.ones(1, 1)
    out, _ = remap_lora(lora, KEPT, BLOCKS)
    if renamed is None:
        assert not out
    else:
        assert out[renamed] is tensor  # shared, not copied


def test_report_counts_parameters_and_squared_norm():
    lora = {
        "diffusion_model.blocks.1.self_attn.q.lora_B.weight": torch.full((4, 1), 2.0),  # dropped block
        "diffusion_model.blocks.1.self_attn.q.lora_A.weight": torch.full((1, 4), 1.0),
        "diffusion_model.blocks.1.self_attn.q.alpha": torch.tensor(0.5),  # delta 0.5 * 2 = 1 everywhere: 16
        "diffusion_model.blocks.2.norm3.diff": torch.full((8,), 2.0),  # kept: 32
        "diffusion_model.blocks.4.ffn.0.diff_b": torch.full((16,), 1.0),  # dropped: 16
        "diffusion_model.head.head.diff": torch.full((4, 4), 1.0),  # outside the blocks: 16
    }
    out, report = remap_lora(lora, KEPT, BLOCKS)
    assert sorted(out) == ["diffusion_model.blocks.1.norm3.diff", "diffusion_model.head.head.diff"]
    assert report.dropped == (1, 4) and report.lora_blocks == (1, 2, 4) and report.non_block_modules == 1
    assert report.forms == ("ComfyUI/original",)
    assert (report.params_total, report.params_dropped) == (8 + 8 + 16 + 16, 8 + 16)
    assert report.param_share_dropped == pytest.approx(0.5)
    assert (report.norm_total, report.norm_dropped) == (pytest.approx(80.0), pytest.approx(32.0))
    assert report.norm_share_dropped == pytest.approx(0.4)
    assert report.moved == {2: 1}
    text = report.text()
    assert "Left out (blocks the student dropped): 1, 4: 50.0% of the LoRA's parameters, 40.0%" in text
    assert "2->1" in text and "[0, 2, 3, 5]" in text and "6-block model" in text


def test_squared_norm_equals_the_explicit_delta():
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(12, 3, generator=gen), torch.randn(3, 7, generator=gen)
    lora = {"lora_unet_blocks_0_ffn_0.lora_up.weight": up, "lora_unet_blocks_0_ffn_0.lora_down.weight": down,
            "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(1.5)}
    (module,) = lora_modules(lora).values()
    assert module.squared_norm() == pytest.approx((1.5 / 3 * up @ down).double().pow(2).sum().item())


def test_nothing_left_out_when_the_student_has_every_block():
    lora = {"transformer.blocks.2.attn1.to_q.diff": torch.ones(2, 2)}
    out, report = remap_lora(lora, KEPT, BLOCKS)
    assert list(out) == ["transformer.blocks.1.attn1.to_q.diff"]
    assert report.dropped == () and report.norm_share_dropped == 0.0
    assert "Nothing left out" in report.text() and report.forms == ("diffusers/PEFT",)


def test_lora_for_a_deeper_model_names_both_block_counts():
    lora = {"diffusion_model.blocks.39.self_attn.q.diff": torch.ones(2, 2)}
    with pytest.raises(LoRAKeyError, match="block 39, so it was made for a model of at least 40 blocks, but the "
                                           "student was pruned from a model of 30 blocks"):
        remap_lora(lora, list(range(0, 30, 2)), 30)
    with pytest.raises(LoRAKeyError, match="at least 40 blocks, but the model has 15 blocks"):
        remap_lora(lora, range(15), 15)


@pytest.mark.parametrize("key, message", [
    ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "is not one of the Wan LoRA key forms"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "diffusers/PEFT"),
    ("diffusion_model.blocks.0.self_attn.q.hada_w1_a", "LoHa/LoKr/DoRA"),
    ("blocks.0.self_attn.q.lora_A.weight", "add 'diffusion_model.'"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "has no matching"),
    ("diffusion_model.blocks.0.self_attn.q.alpha", "has no lora_up/lora_down"),
])
def test_unknown_or_incomplete_keys_fail_clearly(key, message):
    with pytest.raises(LoRAKeyError, match=message.replace(".", r"\.").replace("(", r"\(")):
        remap_lora({key: torch.ones(1, 1)}, KEPT, BLOCKS)


def test_bad_kept_blocks_and_empty_lora():
    with pytest.raises(LoRAKeyError, match="not distinct blocks of a 6-block model"):
        remap_lora({"diffusion_model.head.head.diff": torch.ones(1)}, [0, 6], BLOCKS)
    with pytest.raises(LoRAKeyError, match="holds no tensors"):
        remap_lora({}, KEPT, BLOCKS)


def test_check_fit_names_keys_without_target_and_of_the_wrong_shape():
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(8, 2),
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 8),
            "diffusion_model.blocks.0.norm3.diff_b": torch.ones(8)}
    targets = {"diffusion_model.blocks.0.self_attn.q": (8, 8), "diffusion_model.blocks.0.norm3": (8,)}
    check_fit(lora, targets)
    with pytest.raises(LoRAKeyError, match="match no weight of this model"):
        check_fit(lora, {"diffusion_model.blocks.0.self_attn.q": (8, 8)})
    with pytest.raises(LoRAKeyError, match=r"another width.*|wrong shape"):
        check_fit(lora, {**targets, "diffusion_model.blocks.0.self_attn.q": (16, 16)})


def test_diffusers_names_cover_every_weight_of_a_wan(teacher):
    keys = ["diffusion_model." + k for k in diffusers_to_original(teacher.state_dict())]
    names = diffusers_lora_names(keys)
    weights = [k for k in keys if not k.endswith(".bias")]
    assert sorted(names.values()) == sorted(weights)
    assert names["transformer.blocks.3.attn2.to_out.0"] == "diffusion_model.blocks.3.cross_attn.o.weight"
    assert names["transformer.blocks.3.norm2"] == "diffusion_model.blocks.3.norm3.weight"
    assert names["transformer.scale_shift_table"] == "diffusion_model.head.modulation"
