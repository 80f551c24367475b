"""FastLightGen's nodes inside ComfyUI's own modules (in process, CPU): equivalences and errors.

A randomly initialised 4-block toy teacher is exported in the project's checkpoint format; nothing here
needs the trained toy models.
"""
from __future__ import annotations

import asyncio
import re

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
def nan_model(pack, teacher_files):
    """The teacher with NaN in its output head, as a damaged download or an fp16 overflow leaves it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(teacher_files["dir"] / "t_full.safetensors"))
    tensors["head.head.bias"] = torch.full_like(tensors["head.head.bias"], float("nan"))
    save_file(tensors, str(teacher_files["dir"] / "t_nan.safetensors"))
    return pack["loader"].LoadCheckpoint.execute("t_nan.safetensors").args[0]


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
    import inspect
    import sys

    from comfy_api.latest import io

    registered = {node.GET_SCHEMA().node_id for node in pack["nodes"]}
    defined = {cls.GET_SCHEMA().node_id for name, module in list(sys.modules.items())
               if name.startswith("FastLightGen.nodes.") for cls in vars(module).values()
               if inspect.isclass(cls) and issubclass(cls, io.ComfyNode) and cls.__module__ == name}
    assert len(registered) == len(pack["nodes"]) and registered == defined, defined ^ registered
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


@pytest.mark.parametrize("boundary", [0.875, 0.95, 0.5])
def test_two_experts_equal_the_stock_graph_of_two_samplers(pack, loaded, teacher_files, toy_inputs, boundary):
    """A14B's graph: SplitSigmas at the boundary, SamplerCustom on the high-noise expert, then SamplerCustom
    without new noise on the low-noise one. The toy teacher and its pruned copy stand in for the experts."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    from fastlightgen.experts import split_sigmas

    high_model, sigmas = loaded
    low_model = pack["loader"].LoadCheckpoint.execute("t_pruned.safetensors").args[0]
    ours = pack["sampling"].FastLightGenSampler.execute(high_model, toy_inputs["positive"], toy_inputs["latent"],
                                                       SEED, sigmas, low_model, boundary).args[0]["samples"]
    high, low = split_sigmas(sigmas, boundary)
    latent, noise = toy_inputs["latent"], True
    for model, part in ((high_model, high), (low_model, low)):
        if len(part):
            latent = SamplerCustom.execute(model, noise, SEED, 1.0, toy_inputs["positive"], toy_inputs["negative"],
                                           comfy.samplers.sampler_object("lcm"), part, latent).args[0]
            noise = False
    assert torch.equal(ours, latent["samples"])
    one_expert = pack["sampling"].FastLightGenSampler.execute(high_model, toy_inputs["positive"],
                                                             toy_inputs["latent"], SEED, sigmas).args[0]["samples"]
    assert torch.equal(ours, one_expert) == (len(low) == 0)  # the low-noise expert really took its steps


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
    latent = toy_inputs["latent"]
    ours, stock = _guided_sample(guider, latent, sigmas), _guided_sample(cfg, latent, sigmas)
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
    latent = toy_inputs["latent"]
    ours, stock = _guided_sample(guider, latent, sigmas), _guided_sample(plain, latent, sigmas)
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


def test_block_importance_scores_one_expert_on_its_part_of_the_schedule(pack, loaded, teacher_files):
    from fastlightgen.adapters import Conditioning, adapt
    from fastlightgen.importance import block_importance, stage1_sigmas
    from fastlightgen.toy import codec

    model, _ = loaded
    latent, captions = pack["toy"].ToyDatasetLatents.execute("train", 2, 3).args
    positive = pack["toy"].ToyTextEncode.execute(captions).args[0]
    node = pack["importance"].BlockImportance
    _, plan, table = node.execute(model, latent, positive, 2, 1, SEED, 0.5, True, 0.875, 1.0).args
    library = block_importance(adapt(teacher_files["teacher"]),
                               [(codec.from_comfy_latent(latent["samples"]), Conditioning(text=positive[0][0]))],
                               stage1_sigmas(2, 0.875, 1.0), seed=SEED, pin_first_frame=True)
    assert stage1_sigmas(2, 0.875, 1.0) == [0.90625, 0.96875]
    assert torch.allclose(torch.tensor(plan.scores), torch.tensor(library.scores), rtol=2e-3)
    whole = node.execute(model, latent, positive, 2, 1, SEED, 0.5, True).args[1]
    assert not torch.allclose(torch.tensor(plan.scores), torch.tensor(whole.scores), rtol=1e-2)
    with pytest.raises(ValueError, match=r"sigma range must be 0 <= low < high <= 1, got \[0.9, 0.5\]"):
        node.execute(model, latent, positive, 2, 1, SEED, 0.5, True, 0.9, 0.5)


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
    # the inputs added later default to what the node did before them: quickly, no color change, TI2V
    assert toy_inputs["caption"] == "a blue square moving up quickly on a textured background"
    by_caption = pack["toy"].ToyFirstFrameLatent.execute("red", "circle", "right", "plain", 5,
                                                         toy_inputs["caption"], 1).args
    assert torch.equal(by_caption[0]["samples"], latent["samples"]) and by_caption[1] == toy_inputs["caption"]
    inputs = {i.id: i for i in pack["toy"].ToyFirstFrameLatent.GET_SCHEMA().inputs}
    assert list(inputs)[-3:] == ["speed", "turning", "mode"]  # last: saved widget values keep their places
    assert all(inputs[name].optional for name in ("speed", "turning", "mode"))  # saved API prompts validate


def test_toy_first_frame_latent_speed_turning_and_t2v(pack):
    from fastlightgen.toy import codec, world

    node = pack["toy"].ToyFirstFrameLatent
    caption = "a green triangle moving down slowly and turning magenta on a plain background"
    latent, said, first = node.execute("green", "triangle", "down", "plain", 2, "", 1, "slowly", "magenta").args
    assert said == caption
    video = codec.decode_video(codec.from_comfy_latent(latent["samples"]))
    assert torch.allclose(video[0, :, 0], first[0].permute(2, 0, 1) * 2 - 1, atol=1e-5)
    by_caption = node.execute("red", "circle", "right", "textured", 2, caption, 1, "quickly", "none").args
    assert torch.equal(by_caption[0]["samples"], latent["samples"]) and by_caption[1] == caption
    factors = pack["toy"].toy_factors("green", "triangle", "down", "plain", 2, "slowly", "magenta")
    assert factors.speed == "slowly" and factors.end_color == "magenta"
    for seed in range(20):  # the object stays inside the frame at either speed
        for speed in world.SPEEDS:
            f = pack["toy"].toy_factors("red", "square", "right", "textured", seed, speed)
            left, right, _, _ = world.shape_extent("square")
            xs = world.trajectory(f)[:, 0]
            assert xs.min() >= left and xs.max() <= world.TOY_WORLD.width - right and f.texture is not None

    t2v, said, first = node.execute("blue", "circle", "left", "plain", 0, "", 3, "quickly", "yellow", "T2V").args
    assert said == "a blue circle moving left quickly and turning yellow on a plain background"
    w = world.TOY_WORLD
    assert set(t2v) == {"samples"}  # no noise_mask: every frame is generated
    assert t2v["samples"].shape == (3, codec.LATENT_CHANNELS, w.frames, w.height // 4, w.width // 4)
    assert not t2v["samples"].any()
    assert first.shape == (1, w.height, w.width, 3)  # the reference frame is still there
    with pytest.raises(ValueError, match="mode must be one of"):
        node.execute("blue", "circle", "left", "plain", 0, "", 1, "quickly", "none", "I2V")
    with pytest.raises(ValueError, match="turning is 'blue', the object's own color"):
        node.execute("blue", "circle", "left", "plain", 0, "", 1, "quickly", "blue")


def test_toy_captions_name_speed_and_color_change(pack):
    from fastlightgen.toy import world

    parse = pack["toy"].factors_from_caption
    assert parse("a red circle moving right quickly and turning blue on a plain background") == {
        "color": "red", "shape": "circle", "direction": "right", "speed": "quickly", "background": "plain",
        "turning": "blue"}
    assert parse("A Cyan square, moving up SLOWLY on a textured background.") == {
        "color": "cyan", "shape": "square", "direction": "up", "speed": "slowly", "background": "textured",
        "turning": "none"}
    for seed in range(40):  # every caption the world writes reads back as its factors
        f = world.sample_factors(seed)
        assert parse(world.caption(f)) == {"color": f.color, "shape": f.shape, "direction": f.direction,
                                           "speed": f.speed, "background": f.background,
                                           "turning": f.end_color or "none"}
    example = re.escape("e.g. 'a red circle moving right quickly and turning blue on a plain background'")
    bad = {
        "a red circle moving right on a plain background": r"must name exactly one speed of \['slowly', 'quickly'\], "
                                                            r"but names none",
        "a red circle moving right slowly quickly on a plain background": "exactly one speed",
        "a circle moving right quickly on a plain background": "must name exactly one object color .* but names none",
        "a red green circle moving right quickly on a plain background": r"names \['red', 'green'\]",
        "a red circle moving right quickly and turning on a plain background": "must follow 'turning' with the color",
        "a red circle moving right quickly on a plain background and turning": "must follow 'turning' with the",
        "a red circle moving right quickly and turning red on a plain background": "its own color",
        "a red circle turning blue moving right quickly and turning green on a plain background": "more than once",
        "a red moving right quickly on a plain background": "exactly one shape",
    }
    for caption, message in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            parse(caption)
        assert re.search(example, str(err.value)), str(err.value)


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


# ---------------------------------------------------------------- no silent NaN, no raw torch errors


def test_every_float_input_of_every_node_refuses_nan_first(pack):
    from comfy_api.latest import io

    checked = []
    for node in pack["nodes"]:
        schema = node.GET_SCHEMA()
        floats = [i.id for i in schema.inputs if isinstance(i, io.Float.Input)]
        for name in floats:
            # nothing else is read before the check, so the other inputs may be anything
            kwargs = {i.id: (1.0 if i.id in floats else None) for i in schema.inputs}
            for bad in (float("nan"), float("inf")):
                with pytest.raises(ValueError, match=re.escape(f"{schema.display_name}: {name} is {bad}; every "
                                                               "number must be finite")):
                    node.execute(**{**kwargs, name: bad})
            checked.append(f"{schema.node_id}.{name}")
    assert sorted(checked) == ["FastLightGenApplyStudentAdapter.strength",
                               "FastLightGenBlockImportance.keep_ratio", "FastLightGenBlockImportance.sigma_max",
                               "FastLightGenBlockImportance.sigma_min", "FastLightGenExpertBlockImportance.boundary",
                               "FastLightGenExpertBlockImportance.keep_ratio_high_noise",
                               "FastLightGenExpertBlockImportance.keep_ratio_low_noise",
                               "FastLightGenFewStepSigmas.shift", "FastLightGenLoadExpertPair.boundary",
                               "FastLightGenPrunePlan.keep_ratio", "FastLightGenSampler.boundary",
                               "FastLightGenStudentLoRA.strength_model",
                               "FastLightGenWellGuidedTeacher.beta1", "FastLightGenWellGuidedTeacher.beta2"]


def test_numbers_in_text_inputs_must_be_finite(pack, loaded, toy_inputs):
    import comfy.samplers

    model, _ = loaded
    with pytest.raises(ValueError, match=r"scores: \['nan'\] are not finite numbers"):
        pack["plan"].PrunePlanNode.execute(model, "keep ratio over scores", "", 0.5, "nan, 1, 2, 3", "")
    with pytest.raises(ValueError, match=r"beta2_values: \['inf'\] are not finite numbers"):
        pack["guidance"].TeacherMixSweep.execute(
            model, _plan(pack, model, [1]), toy_inputs["positive"], toy_inputs["negative"], toy_inputs["latent"],
            SEED, comfy.samplers.sampler_object("euler"), torch.linspace(1, 0, 3), "2", "0, inf")


def test_nan_during_sampling_is_an_error_not_a_success(pack, loaded, nan_model, toy_inputs):
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    model, sigmas = loaded
    with pytest.raises(ValueError, match=r"FastLightGen Sampler: sampling produced NaN or inf values \(100% of the "
                                         r"latent\).*load it in a wider weight dtype"):
        pack["sampling"].FastLightGenSampler.execute(nan_model, toy_inputs["positive"], toy_inputs["latent"], SEED)
    guider = pack["guidance"].WellGuidedTeacher.execute(nan_model, _plan(pack, model, [1]), toy_inputs["positive"],
                                                         toy_inputs["negative"], 3.5, 0.25).args[0]

    class Noise:
        seed = SEED

        def generate_noise(self, latent):
            return comfy.sample.prepare_noise(latent["samples"], SEED)

    with pytest.raises(ValueError, match="FastLightGen Well-Guided Teacher: sampling produced NaN"):
        SamplerCustomAdvanced.execute(Noise(), guider, comfy.samplers.sampler_object("euler"),
                                      torch.linspace(1, 0, 3), toy_inputs["latent"])
    toy = pack["toy"]
    latent, captions = toy.ToyDatasetLatents.execute("train", 1, 3).args
    with pytest.raises(ValueError, match=r"Stage I: the x0 error \(the full model\) is nan at sigma 0.25"):
        pack["importance"].BlockImportance.execute(nan_model, latent, toy.ToyTextEncode.execute(captions).args[0],
                                                   2, 1, SEED, 0.5, True)


def test_latents_and_conditioning_that_do_not_fit_the_model_name_the_stock_nodes(pack, loaded, toy_inputs):
    import comfy.samplers

    model, _ = loaded
    wan21_latent = {"samples": torch.randn(1, 16, 6, 8, 8)}  # e.g. VAE Encode with the Wan 2.1 VAE
    clip_l = [[torch.randn(1, 77, 768), {}]]  # e.g. a CLIPLoader of another type
    latent_error = (r"the LATENT has shape \(1, 16, 6, 8, 8\), but this model takes Wan 2.2 TI2V latents "
                    r"\(48 channels\): use Wan22ImageToVideoLatent \(Wan 2.2 VAE\) or EmptyHunyuanLatentVideo")
    text_error = (r"conditioning is 768 wide, but this model takes UMT5 conditioning \(4096 wide\): use "
                  r"CLIPLoader type wan \(umt5_xxl\)")
    sampler = pack["sampling"].FastLightGenSampler
    with pytest.raises(ValueError, match="FastLightGen Sampler: " + latent_error):
        sampler.execute(model, toy_inputs["positive"], wan21_latent, SEED)
    with pytest.raises(ValueError, match="FastLightGen Sampler: the positive " + text_error):
        sampler.execute(model, clip_l, toy_inputs["latent"], SEED)
    plan = _plan(pack, model, [1])
    with pytest.raises(ValueError, match="Well-Guided Teacher: the negative " + text_error):
        pack["guidance"].WellGuidedTeacher.execute(model, plan, toy_inputs["positive"], clip_l, 3.5, 0.25)
    with pytest.raises(ValueError, match="Teacher Mix Sweep: " + latent_error):
        pack["guidance"].TeacherMixSweep.execute(model, plan, toy_inputs["positive"], toy_inputs["negative"],
                                                 wan21_latent, SEED, comfy.samplers.sampler_object("euler"),
                                                 torch.linspace(1, 0, 3), "2", "0")
    with pytest.raises(ValueError, match=r"Block Importance: the LATENT has shape \(1, 16, 6, 8, 8\), but Stage I on "
                                         r"this model needs clean videos encoded by the Wan 2.2 VAE \(48 channels\): "
                                         r".*VAE Encode"):
        pack["importance"].BlockImportance.execute(model, wan21_latent, toy_inputs["positive"], 2, 1, SEED, 0.5, True)
    # an empty latent of another width is widened by ComfyUI, as in the stock samplers (EmptyHunyuanLatentVideo)
    empty = {"samples": torch.zeros(1, 16, 6, 8, 8)}
    assert sampler.execute(model, toy_inputs["positive"], empty, SEED).args[0]["samples"].shape[1] == 48


def test_block_importance_checks_its_inputs_before_stage1(pack, loaded, toy_inputs, monkeypatch):
    model, _ = loaded

    def stage1_ran(*args, **kwargs):
        raise AssertionError("Stage I ran before the inputs were checked")

    monkeypatch.setattr(pack["importance"].ImportanceProbe, "sample", stage1_ran)
    node = pack["importance"].BlockImportance
    with pytest.raises(ValueError, match="keep_ratio is nan"):
        node.execute(model, toy_inputs["latent"], toy_inputs["positive"], 2, 1, SEED, float("nan"), True)
    videos = pack["toy"].ToyDatasetLatents.execute("train", 1, 3).args[0]
    with pytest.raises(ValueError, match="the positive conditioning is 768 wide"):
        node.execute(model, videos, [[torch.randn(1, 7, 768), {}]], 2, 1, SEED, 0.5, True)
    for empty in ({"samples": torch.zeros(1, 48, 6, 8, 8)}, {"samples": torch.zeros(1, 16, 6, 8, 8)}):  # empty latents
        with pytest.raises(ValueError, match="VAE Encode.*Toy Dataset Latents.*empty-latent"):
            node.execute(model, empty, toy_inputs["positive"], 2, 1, SEED, 0.5, True)
    first_frame_only = videos["samples"].clone()
    first_frame_only[:, :, 1:] = 0  # as an image-to-video latent node leaves the frames after the image
    with pytest.raises(ValueError, match=r"constant frames \(video 0 frame 1, video 0 frame 2"):
        node.execute(model, {"samples": first_frame_only}, toy_inputs["positive"], 2, 1, SEED, 0.5, True)
    huge = {"samples": torch.randn(1, 48, 1, 1, 1).expand(1, 48, 1, 1120, 1120)}  # 313600 tokens, no memory
    with pytest.raises(ValueError, match="313600 tokens .*more than 302400 .*720p or below"):
        node.execute(model, huge, toy_inputs["positive"], 2, 1, SEED, 0.5, True)


# ---------------------------------------------------------------- a model that already skips blocks


def test_block_importance_scores_a_pruned_model_as_it_runs(pack, loaded, teacher_files):
    model, _ = loaded
    toy, stage1 = pack["toy"], pack["importance"]
    latent, captions = toy.ToyDatasetLatents.execute("train", 2, 3).args
    positive = toy.ToyTextEncode.execute(captions).args[0]
    patched = pack["plan"].ApplyPrunePlan.execute(model, _plan(pack, model, [1, 2])).args[0]
    _, plan, table = stage1.BlockImportance.execute(patched, latent, positive, 2, 1, SEED, 0.5, True).args
    naive = stage1.run_stage1(patched, latent, positive, 2, 1, SEED, prefix_reuse=False)
    physical = pack["loader"].LoadCheckpoint.execute("t_pruned.safetensors").args[0]  # blocks 0 and 3 kept
    alone = stage1.run_stage1(physical, latent, positive, 2, 1, SEED)
    # prefix reuse and plain passes agree, and both score the model as patched: it is the pruned model
    assert plan.scores == pytest.approx(naive.scores, rel=1e-5)
    assert plan.reference_error == pytest.approx(alone.reference_error, rel=1e-4)
    assert [plan.scores[0], plan.scores[3]] == pytest.approx(alone.scores, rel=1e-4)
    assert plan.scores[1] == plan.scores[2] == pytest.approx(plan.reference_error)  # skipping them changes nothing
    # the new plan keeps half of the blocks the model still runs, never one it already skips
    assert plan.already_dropped == [1, 2] and len(plan.kept) == 1 and set(plan.kept) <= {0, 3}
    assert "already skipped by the MODEL: [1, 2]" in table
    rescored = pack["plan"].PrunePlanNode.execute(model, "keep ratio over scores", "", 1.0, "", "", plan).args[0]
    assert rescored.kept == [0, 3]
    assert pack["importance"].BlockImportance.execute(model, latent, positive, 2, 1, SEED, 0.5,
                                                      True).args[1].already_dropped == []


# ---------------------------------------------------------------- plans travel


@pytest.fixture()
def plans_folder(pack, tmp_path):
    import folder_paths

    folder = tmp_path / "plans"
    folder.mkdir()
    folder_paths.add_model_folder_path("fastlightgen_plans", str(folder), is_default=True)  # Save writes here
    yield folder
    folder_paths.folder_names_and_paths["fastlightgen_plans"][0].remove(str(folder))


def test_plan_travels_from_stage1_into_a_graph_and_back_to_training(pack, loaded, teacher_files, plans_folder):
    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan
    from train.models.loading import load_plan

    model, _ = loaded
    nodes = pack["plan"]
    teacher = teacher_files["teacher"]
    stage1 = PrunePlan.from_scores(adapt(teacher).fingerprint(), [0.3, 0.1, 0.2, 0.4], keep_ratio=0.5,
                                   reference_error=0.05)
    stage1.save(plans_folder / "cluster.json")  # what train.stage1 writes
    options = next(i for i in nodes.LoadPrunePlan.GET_SCHEMA().inputs if i.id == "plan_name").options
    assert options[0] == nodes.PASTED and "cluster.json" in options
    from_file, info = nodes.LoadPrunePlan.execute("cluster.json", "").args
    pasted = nodes.LoadPrunePlan.execute(nodes.PASTED, (plans_folder / "cluster.json").read_text()).args[0]
    assert from_file == stage1 == pasted and "keeps 2 blocks [0, 3], drops [1, 2]" in info
    assert nodes.ApplyPrunePlan.execute(model, from_file).args[0] is not model
    run_json = '{"stage": "stage2", "plan": ' + stage1.to_json() + "}"  # a stage's run.json carries its plan
    assert nodes.LoadPrunePlan.execute(nodes.PASTED, run_json).args[0] == stage1

    made = _plan(pack, model, [1])  # a plan made in the graph
    saved = nodes.SavePrunePlan.execute(made, "from_graph", False)
    path = saved.args[0]
    assert path == str(plans_folder / "from_graph.json") and "--set stage2.plan=" + path in saved.ui.value
    assert load_plan(None, path, teacher) == made  # what `train.stage2 --set stage2.plan=PATH` reads
    nodes.SavePrunePlan.execute(made, "from_graph.json", False)  # the same plan again: fine
    with pytest.raises(ValueError, match="already holds another plan; choose another filename or turn on overwrite"):
        nodes.SavePrunePlan.execute(stage1, "from_graph", False)
    assert PrunePlan.load(path) == made  # refused: the file is untouched
    nodes.SavePrunePlan.execute(stage1, "from_graph", True)
    assert PrunePlan.load(path) == stage1
    assert sorted(p.name for p in plans_folder.iterdir()) == ["cluster.json", "from_graph.json"]  # no temp left


def test_bad_plans_fail_clearly(pack, loaded, plans_folder):
    model, _ = loaded
    nodes = pack["plan"]
    good = _plan(pack, model, [1]).to_json()
    cases = {
        "": re.escape("plan_name is '(pasted JSON below)' but plan_json is empty"),
        "{kept: [0]": r"plan_json is not JSON \(Expecting property name",
        "[1, 2]": "plan_json is a JSON list, not a prune plan object",
        '{"kept": [0]}': "plan_json: not a FastLightGen prune plan",
        good.replace('"scores": null', '"scores": [NaN, 1, 2, 3]'): r"the prune plan's scores must be finite, but "
                                                                    r"entries \[0\] are \[nan\]",
        good.replace('"kept": [', '"kept": ["zero", '): "kept must be a list of block numbers",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message):
            nodes.LoadPrunePlan.execute(nodes.PASTED, text)
    for name in ("../escape", "sub/plan", ""):
        with pytest.raises(ValueError, match="must be a plain file name"):
            nodes.SavePrunePlan.execute(_plan(pack, model, [1]), name, False)
    assert not list(plans_folder.iterdir())


# ---------------------------------------------------------------- cached MODELs


def _snapshot(model) -> tuple:
    """What a later prompt would see of a cached MODEL: its modules' weights now, its patches and options."""
    weights = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    return weights, dict(model.patches), dict(model.object_patches), repr(model.model_options)


def test_no_node_changes_the_model_it_received(pack, teacher_files, toy_inputs):
    import comfy.samplers

    model = pack["loader"].LoadCheckpoint.execute("t_full.safetensors").args[0]
    toy = pack["toy"]
    videos, captions = toy.ToyDatasetLatents.execute("train", 1, 3).args
    before = _snapshot(model)
    plan = _plan(pack, model, [1])
    pruned = pack["plan"].ApplyPrunePlan.execute(model, plan).args[0]
    pack["sampling"].FastLightGenSampler.execute(pruned, toy_inputs["positive"], toy_inputs["latent"], SEED)
    pack["sampling"].FastLightGenSampler.execute(model, toy_inputs["positive"], toy_inputs["latent"], SEED)
    guider = pack["guidance"].WellGuidedTeacher.execute(model, plan, toy_inputs["positive"], toy_inputs["negative"],
                                                         3.0, 0.5).args[0]
    _guided_sample(guider, toy_inputs["latent"], torch.linspace(1, 0, 3))
    pack["guidance"].TeacherMixSweep.execute(model, plan, toy_inputs["positive"], toy_inputs["negative"],
                                             toy_inputs["latent"], SEED, comfy.samplers.sampler_object("euler"),
                                             torch.linspace(1, 0, 3), "2", "0, 0.5")
    pack["importance"].BlockImportance.execute(model, videos, toy.ToyTextEncode.execute(captions).args[0], 1, 1,
                                               SEED, 0.5, True)
    after = _snapshot(model)
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    assert after[1:] == before[1:]
