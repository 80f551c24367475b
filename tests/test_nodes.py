"""FastLightGen's nodes inside ComfyUI's own modules (in process, CPU): equivalences and errors.

A randomly initialised 4-block toy teacher is exported in the project's checkpoint format; nothing here
needs the trained toy models.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

BLOCKS = 4
SEED = 7


@pytest.fixture(scope="module")
def pack(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import guidance, importance, loader, plan, preview, sampling, toy

    return {"nodes": node_list, "guidance": guidance, "importance": importance, "loader": loader, "plan": plan,
            "preview": preview, "sampling": sampling, "toy": toy}


@pytest.fixture(scope="module")
def teacher_files(pack, tmp_path_factory):
    """A random toy teacher, its physically pruned version (blocks 1, 2 dropped) and a diffusers-layout copy."""
    import folder_paths
    from safetensors.torch import save_file

    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher

    folder = tmp_path_factory.mktemp("fastlightgen_models")
    teacher = build_toy_teacher(ToyTeacherShape(num_layers=BLOCKS), seed=1)
    save_checkpoint(folder / "t_full.safetensors", teacher, CheckpointMeta(BLOCKS, list(range(BLOCKS))))
    kept = [0, 3]
    save_checkpoint(folder / "t_pruned.safetensors", adapt(teacher).pruned_model(kept), CheckpointMeta(BLOCKS, kept))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(folder / "t_diffusers.safetensors"))
    folder_paths.add_model_folder_path("fastlightgen", str(folder))
    return {"dir": folder, "teacher": teacher, "kept": kept}


@pytest.fixture(scope="module")
def loaded(pack, teacher_files):
    model, sigmas, _ = pack["loader"].LoadCheckpoint.execute("t_full.safetensors").args
    return model, sigmas


@pytest.fixture(scope="module")
def toy_inputs(pack):
    toy = pack["toy"]
    latent, caption, first_frame = toy.ToyFirstFrameLatent.execute("blue", "square", "up", "textured", 5, "", 1).args
    positive = toy.ToyTextEncode.execute(caption).args[0]
    negative = toy.ToyTextEncode.execute("").args[0]
    return {"latent": latent, "caption": caption, "first_frame": first_frame, "positive": positive,
            "negative": negative}


def _plan(pack, model, dropped):
    return pack["plan"].PrunePlanNode.execute(model, "drop listed blocks", ", ".join(map(str, dropped)), 0.7, "",
                                              "").args[0]


# ---------------------------------------------------------------- schemas


def test_every_node_has_prefix_description_and_tooltips(pack):
    assert len(pack["nodes"]) == 13
    for node in pack["nodes"]:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("FastLightGen"), schema.node_id
        assert schema.description, schema.node_id
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{schema.node_id}: inputs without tooltip {missing}"
        assert all(o.io_type.startswith("FASTLIGHTGEN") for o in schema.outputs
                   if isinstance(o.io_type, str) and "PRUNE" in o.io_type)


# ---------------------------------------------------------------- equivalences


def test_sampler_equals_stock_sampler_custom_lcm(pack, loaded, toy_inputs):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, sigmas = loaded
    ours = pack["sampling"].FastLightGenSampler.execute(model, toy_inputs["positive"], toy_inputs["latent"], SEED,
                                                       sigmas).args[0]["samples"]
    stock = SamplerCustom.execute(model, True, SEED, 1.0, toy_inputs["positive"], toy_inputs["negative"],
                                  comfy.samplers.sampler_object("lcm"), sigmas, toy_inputs["latent"]).args[0]["samples"]
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, stock)
    # TI2V: the first frame is kept exactly
    assert torch.allclose(ours[:, :, 0], toy_inputs["latent"]["samples"][:, :, 0], atol=1e-6)


def test_few_step_sigmas_equal_stock_shift5_simple(pack, loaded):
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    model, loader_sigmas = loaded
    ours = pack["sampling"].FewStepSigmas.execute("1000, 750, 500, 250", 5.0).args[0]
    shifted = ModelSamplingSD3().patch(model, 5.0)[0]
    stock = BasicScheduler.execute(shifted, "simple", 4, 1.0).args[0]
    assert torch.allclose(ours, torch.tensor([1.0, 0.9375, 0.8333333, 0.625, 0.0]), atol=1e-6)
    assert torch.allclose(ours, stock, atol=1e-6)
    assert torch.equal(ours, loader_sigmas)


def test_apply_prune_plan_equals_physically_pruned_checkpoint(pack, loaded, teacher_files, toy_inputs):
    model, sigmas = loaded
    dropped = [i for i in range(BLOCKS) if i not in teacher_files["kept"]]
    skipped = pack["plan"].ApplyPrunePlan.execute(model, _plan(pack, model, dropped)).args[0]
    physical, _, info = pack["loader"].LoadCheckpoint.execute("t_pruned.safetensors").args
    assert "2 of 4 blocks kept [0, 3]" in info
    assert len(physical.model.diffusion_model.blocks) == 2
    run = lambda m: pack["sampling"].FastLightGenSampler.execute(  # noqa: E731
        m, toy_inputs["positive"], toy_inputs["latent"], SEED, sigmas).args[0]["samples"]
    a, b, full = run(skipped), run(physical), run(model)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, full, atol=1e-3)  # the skip really changed the model
    assert skipped.model is model.model  # a clone: weights shared, the original stays unpatched
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def _guided_sample(guider, latent, sigmas):
    import comfy.sample
    import comfy.samplers

    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    return guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas,
                         denoise_mask=latent.get("noise_mask"), seed=SEED)


def test_well_guided_teacher_with_beta2_zero_equals_cfg_on_pruned_model(pack, loaded, toy_inputs):
    import comfy.samplers

    model, _ = loaded
    sigmas = torch.linspace(1, 0, 5)
    plan = _plan(pack, model, [1])
    guider = pack["guidance"].WellGuidedTeacher.execute(model, plan, toy_inputs["positive"], toy_inputs["negative"],
                                                         3.0, 0.0).args[0]
    cfg = comfy.samplers.CFGGuider(pack["plan"].ApplyPrunePlan.execute(model, plan).args[0])
    cfg.set_conds(toy_inputs["positive"], toy_inputs["negative"])
    cfg.set_cfg(3.0)
    ours, stock = _guided_sample(guider, toy_inputs["latent"], sigmas), _guided_sample(cfg, toy_inputs["latent"], sigmas)
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()


def test_well_guided_teacher_betas_one_is_the_unpruned_conditional(pack, loaded, toy_inputs):
    import comfy.samplers

    model, _ = loaded
    sigmas = torch.linspace(1, 0, 4)
    guider = pack["guidance"].WellGuidedTeacher.execute(model, _plan(pack, model, [2]), toy_inputs["positive"],
                                                         toy_inputs["negative"], 1.0, 1.0).args[0]
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(toy_inputs["positive"], toy_inputs["negative"])
    plain.set_cfg(1.0)
    ours, stock = _guided_sample(guider, toy_inputs["latent"], sigmas), _guided_sample(plain, toy_inputs["latent"], sigmas)
    assert torch.allclose(ours, stock, atol=1e-4), (ours - stock).abs().max()


def test_block_importance_matches_library_stage1(pack, loaded, teacher_files):
    from fastlightgen.adapters import Conditioning, adapt
    from fastlightgen.importance import block_importance, stage1_sigmas
    from fastlightgen.toy import codec

    model, _ = loaded
    toy = pack["toy"]
    latent, captions = toy.ToyDatasetLatents.execute("train", 2, 3).args
    positive = toy.ToyTextEncode.execute(captions).args[0]
    plot, plan, table = pack["importance"].BlockImportance.execute(model, latent, positive, 2, 1, SEED, 0.5, True).args
    naive = pack["importance"].run_stage1(model, latent, positive, 2, 1, SEED, prefix_reuse=False)
    x0 = codec.from_comfy_latent(latent["samples"])
    library = block_importance(adapt(teacher_files["teacher"]), [(x0, Conditioning(text=positive[0][0]))],
                               stage1_sigmas(2), seed=SEED, pin_first_frame=True)
    assert torch.allclose(torch.tensor(plan.scores), torch.tensor(naive.scores), rtol=1e-5)
    assert torch.allclose(torch.tensor(plan.scores), torch.tensor(library.scores), rtol=2e-3)
    assert plan.reference_error == pytest.approx(library.reference_error, rel=2e-3)
    assert len(plan.kept) == 2 and plan.method == "scores"
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and "full model" in table


def test_prune_plan_from_scores_and_teacher_sweep_grid(pack, loaded, toy_inputs):
    model, _ = loaded
    plan = pack["plan"].PrunePlanNode.execute(model, "keep ratio over scores", "", 0.5, "0.1, 0.4, 0.3, 0.2",
                                              "0").args[0]
    assert plan.kept == [0, 1]
    import comfy.samplers

    latents, labels = pack["guidance"].TeacherMixSweep.execute(
        model, plan, toy_inputs["positive"], toy_inputs["negative"], toy_inputs["latent"], SEED,
        comfy.samplers.sampler_object("euler"), torch.linspace(1, 0, 3), "2, 4", "0, 0.5").args
    assert latents["samples"].shape[0] == 4 and labels.splitlines()[1] == "b1=2 b2=0.5"
    frames = pack["toy"].ToyDecode.execute(latents).args[0]
    grid = pack["preview"].VideoGrid.execute(frames, 1, "last frame", 2, 0, labels).args[0]
    assert grid.shape == (1, 2 * 64, 2 * 64, 3)


# ---------------------------------------------------------------- toy nodes


def test_toy_nodes_round_trip(pack, toy_inputs):
    from fastlightgen.toy import TEXT_DIM, TEXT_LEN, world

    cond = toy_inputs["positive"][0][0]
    assert cond.shape == (1, TEXT_LEN, TEXT_DIM)
    assert not toy_inputs["negative"][0][0].any()
    latent = toy_inputs["latent"]
    assert latent["samples"].shape == (1, 48, world.TOY_WORLD.frames, 8, 8)
    assert latent["noise_mask"][:, :, 0].eq(0).all() and latent["noise_mask"][:, :, 1:].eq(1).all()
    frames = pack["toy"].ToyDecode.execute(latent).args[0]
    assert frames.shape == (world.TOY_WORLD.frames, 32, 32, 3)
    assert torch.allclose(frames[0], toy_inputs["first_frame"][0], atol=1e-5)
    by_caption = pack["toy"].ToyFirstFrameLatent.execute("red", "circle", "right", "plain", 5,
                                                         toy_inputs["caption"], 1).args
    assert torch.equal(by_caption[0]["samples"], latent["samples"]) and by_caption[1] == toy_inputs["caption"]


# ---------------------------------------------------------------- loader and bad inputs


def test_loader_reads_diffusers_layout(pack, loaded, toy_inputs):
    model, sigmas = loaded
    other, _, info = pack["loader"].LoadCheckpoint.execute("t_diffusers.safetensors").args
    assert "no FastLightGen metadata" in info
    run = lambda m: pack["sampling"].FastLightGenSampler.execute(  # noqa: E731
        m, toy_inputs["positive"], toy_inputs["latent"], SEED, sigmas).args[0]["samples"]
    assert torch.equal(run(model), run(other))


def test_bad_inputs_fail_with_clear_messages(pack, loaded, teacher_files, toy_inputs):
    from safetensors.torch import load_file, save_file

    from fastlightgen.checkpoint import CheckpointError
    from fastlightgen.plan import PlanMismatchError

    model, _ = loaded
    physical = pack["loader"].LoadCheckpoint.execute("t_pruned.safetensors").args[0]
    with pytest.raises(PlanMismatchError, match="run Stage I on this model"):
        pack["plan"].ApplyPrunePlan.execute(physical, _plan(pack, model, [1]))
    tensors = {k: v for k, v in load_file(str(teacher_files["dir"] / "t_full.safetensors")).items()
               if not k.startswith("blocks.1.")}
    save_file(tensors, str(teacher_files["dir"] / "t_gap.safetensors"))
    with pytest.raises(CheckpointError, match="t_gap.safetensors"):
        pack["loader"].LoadCheckpoint.execute("t_gap.safetensors")
    empty = {"samples": toy_inputs["latent"]["samples"][:0]}
    with pytest.raises(ValueError, match="empty"):
        pack["sampling"].FastLightGenSampler.execute(model, toy_inputs["positive"], empty, 0)
    with pytest.raises(ValueError, match="out of range"):
        pack["guidance"].parse_betas("3.5, -1", "beta1_values")
    with pytest.raises(ValueError, match="do not exist"):
        _plan(pack, model, [9])
    with pytest.raises(ValueError, match="strictly decreasing"):
        pack["sampling"].FewStepSigmas.execute("250, 500", 5.0)
