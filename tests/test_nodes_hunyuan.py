"""FastLightGen's nodes on ComfyUI's own HunyuanVideo DiT (in process, CPU, fp32): the block list, the
fingerprint, block skipping through patches_replace, Apply Prune Plan and Stage I block importance.

The model is a randomly initialised HunyuanVideo (width 64, 2 double + 2 single blocks) built from ComfyUI's
model config as its loader builds one, so the nodes receive a real ModelPatcher. The reference for a skipped
block is the same model with that block's adaLN modulation zeroed: ComfyUI's DoubleStreamBlock and
SingleStreamBlock add every branch as `stream += branch * gate`, gates come from the modulation, and zero
gates make the block return its input streams bit for bit (zero shift and scale only change the branch).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

WIDTH = 64
SEED = 3
DOUBLE, SINGLE = 1, 2  # the blocks skipped below: double block 1 and single block 0
# head_dim 32 = sum(axes_dim); the VAE's 16 latent channels so the latent format's scaling applies as is
CONFIG = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=12,
              hidden_size=WIDTH, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
              theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
              use_cond_type_embedding=False, vision_in_dim=None)


@pytest.fixture(scope="module")
def pack(pack_package):
    from FastLightGen.nodes import dit, importance, plan, sampling

    return SimpleNamespace(dit=dit, importance=importance, plan=plan, sampling=sampling)


def _patcher(base):
    from comfy.model_patcher import ModelPatcher

    cpu = torch.device("cpu")
    return ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def model(pack):
    import comfy.supported_models

    config = comfy.supported_models.HunyuanVideo(CONFIG)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    torch.manual_seed(SEED)
    with torch.no_grad():  # ComfyUI's layers leave weights uninitialised for the loader to fill
        for p in base.parameters():
            p.normal_(0.0, 0.1)
    return _patcher(base)


def _zeroed_modulation(model, slots):
    """A deep copy of `model` whose given blocks have all-zero adaLN modulation (weights and biases)."""
    ref = _patcher(copy.deepcopy(model.model))
    dit = ref.model.diffusion_model
    with torch.no_grad():
        for kind, i in slots:
            block = dit.double_blocks[i] if kind == "double_block" else dit.single_blocks[i]
            for lin in ([block.img_mod.lin, block.txt_mod.lin] if kind == "double_block" else [block.modulation.lin]):
                lin.weight.zero_()
                lin.bias.zero_()
    return ref


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(SEED)
    return {"x": torch.randn(1, 16, 3, 4, 4, generator=g), "context": torch.randn(1, 5, 12, generator=g),
            "y": torch.randn(1, 8, generator=g)}


def _forward(model, inputs, transformer_options):
    return model.model.diffusion_model(inputs["x"], torch.tensor([600.0]), inputs["context"], y=inputs["y"],
                                       transformer_options=transformer_options)


def test_block_list_and_fingerprint(pack, model):
    from fastlightgen.plan import ModelFingerprint

    assert pack.dit.block_slots(model) == [("double_block", 0), ("double_block", 1),
                                           ("single_block", 0), ("single_block", 1)]
    assert pack.dit.fingerprint(model) == ModelFingerprint("hunyuanvideo", 4, WIDTH)


@pytest.mark.parametrize("block", [DOUBLE, SINGLE])
def test_skipping_a_block_equals_zeroing_its_modulation(pack, model, inputs, block):
    dit = pack.dit
    options = dit.with_block_patches(model.model_options, dit.skip_patches(model, {block}))
    skipped = _forward(model, inputs, options["transformer_options"])
    reference = _forward(_zeroed_modulation(model, [dit.block_slots(model)[block]]), inputs, {})
    full = _forward(model, inputs, {})
    assert torch.isfinite(skipped).all()
    assert torch.equal(skipped, reference)
    assert (skipped - full).abs().max() > 1e-3
    assert "patches_replace" not in model.model_options["transformer_options"]


def _latent_and_positive(inputs):
    return {"samples": inputs["x"]}, [[inputs["context"], {"pooled_output": inputs["y"]}]]


def test_apply_prune_plan_equals_zeroed_modulation_under_the_sampler(pack, model, inputs):
    latent, positive = _latent_and_positive(inputs)
    plan = pack.plan.PrunePlanNode.execute(model, "drop listed blocks", f"{DOUBLE}, {SINGLE}", 0.7, "", "").args[0]
    pruned = pack.plan.ApplyPrunePlan.execute(model, plan).args[0]
    reference = _zeroed_modulation(model, [pack.dit.block_slots(model)[i] for i in (DOUBLE, SINGLE)])
    run = lambda m: pack.sampling.FastLightGenSampler.execute(  # noqa: E731
        m, positive, latent, SEED).args[0]["samples"]
    ours = run(pruned)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, run(reference))
    assert (ours - run(model)).abs().max() > 1e-3


def test_block_importance_with_prefix_reuse_equals_naive(pack, model, inputs):
    latent, positive = _latent_and_positive(inputs)
    _, plan, _ = pack.importance.BlockImportance.execute(model, latent, positive, 2, 1, SEED, 0.5, True).args
    naive = pack.importance.run_stage1(model, latent, positive, 2, 1, SEED, prefix_reuse=False)
    assert plan.fingerprint == pack.dit.fingerprint(model) and len(plan.kept) == 2
    assert all(math.isfinite(s) for s in plan.scores) and len(plan.scores) == 4
    assert all(s != naive.reference_error for s in naive.scores)  # every skip changes the prediction
    assert torch.allclose(torch.tensor(plan.scores), torch.tensor(naive.scores), rtol=1e-5), \
        (plan.scores, naive.scores)
    assert plan.reference_error == pytest.approx(naive.reference_error, rel=1e-5)
