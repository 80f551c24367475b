"""Two-expert models (Wan 2.2 A14B) in the pack, in process (CPU): the pair loader, the boundary routing, the
checks of a pair before sampling, Block Importance of both experts, and a LoRA pair on two pruned experts.

The experts are tiny random Wan 2.1 T2V-shaped models (ComfyUI detects A14B's experts as that; I2V-A14B's with
36 input channels), in the files a two-expert export writes (students with expert metadata) and as ComfyUI
distributes the A14B teacher (fp8_scaled, no metadata, the expert in the name): tests/tiny_models.py. I2V's
conditioning is the stock WanImageToVideo's, made with a tiny random Wan 2.1 VAE.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from tiny_models import save_a14b_pair, save_a14b_teacher_files, save_random_wan21_vae, tiny_wan_a14b_folder

SEED = 3
LAYERS = 4
KEPT = {"high": [0, 2, 3], "low": [0, 1, 3]}  # each expert keeps other blocks


@pytest.fixture(scope="module")
def pack(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import adapter, expert_importance, importance, loader, lora, plan, sampling, toy

    return {"adapter": adapter, "expert_importance": expert_importance, "importance": importance, "loader": loader,
            "lora": lora, "plan": plan, "sampling": sampling, "toy": toy}


@pytest.fixture(scope="module")
def folder(pack, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("a14b")
    save_a14b_pair(folder, KEPT)
    save_a14b_pair(folder, KEPT, boundary=0.95, prefix="late")  # a pair whose metadata names another boundary
    save_a14b_pair(folder, KEPT, boundary=0.9, prefix="i2v")
    save_a14b_teacher_files(folder)
    save_a14b_pair(folder, KEPT, boundary=0.9, prefix="i2v_a14b", variant="i2v")  # 36 input channels
    save_a14b_teacher_files(folder, variant="i2v")
    folder_paths.add_model_folder_path("fastlightgen", str(folder))
    return folder


@pytest.fixture(scope="module")
def inputs(pack):
    g = torch.Generator().manual_seed(0)
    positive = pack["toy"].ToyTextEncode.execute("a red circle moving right on a plain background").args[0]
    return {"latent": {"samples": torch.zeros(1, 16, 2, 8, 8)}, "videos": {"samples": torch.randn(2, 16, 2, 8, 8,
                                                                                                   generator=g)},
            "positive": positive}


@pytest.fixture(scope="module")
def start_image(pack, inputs, tmp_path_factory):
    """What WanImageToVideo makes of the prompt and a start image: {start image colour: (positive, latent)}."""
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_wan import WanImageToVideo

    path = tmp_path_factory.mktemp("vae") / "wan21_vae.safetensors"
    save_random_wan21_vae(path)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    positive, made = inputs["positive"], {}
    for colour, value in (("red", (0.9, 0.1, 0.1)), ("blue", (0.1, 0.1, 0.9))):
        image = torch.tensor(value).expand(1, 64, 64, 3).clone()
        conditioned, _, latent = WanImageToVideo.execute(positive, positive, vae, 64, 64, 5, 1, start_image=image).args
        made[colour] = conditioned, latent
    return made


def _pair(pack, high="student_high.safetensors", low="student_low.safetensors", boundary=0.875, dtype="default"):
    return pack["loader"].LoadExpertPair.execute(high, low, dtype, boundary).args


def _sample(pack, inputs, high, low, sigmas, boundary=0.875):
    with torch.inference_mode():  # as ComfyUI runs a prompt
        return pack["sampling"].FastLightGenSampler.execute(high, inputs["positive"], inputs["latent"], SEED, sigmas,
                                                            low, boundary).args[0]["samples"]


def _recording(model, calls: list, name: str):
    """A clone of `model` that records the sigma of each of its model calls under `name`."""
    clone = model.clone()

    def wrapper(apply_model, args):
        calls.append((name, round(float(args["timestep"][0]), 4)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


# ---------------------------------------------------------------- routing and the boundary


@pytest.mark.parametrize("prefix, routed", [
    ("student", [("high", 1.0), ("high", 0.9375), ("low", 0.8333), ("low", 0.625)]),  # T2V boundary 0.875
    ("i2v", [("high", 1.0), ("high", 0.9375), ("low", 0.8333), ("low", 0.625)]),  # I2V 0.9: the same split
    ("late", [("high", 1.0), ("low", 0.9375), ("low", 0.8333), ("low", 0.625)]),  # 0.95: 0.9375 is below it
])
def test_each_step_reaches_the_expert_whose_range_holds_its_sigma(pack, folder, inputs, prefix, routed):
    """The boundary comes from the students' metadata (the sampler's own boundary input, 0.5 here, is unused)."""
    high, low, sigmas, info = _pair(pack, f"{prefix}_high.safetensors", f"{prefix}_low.safetensors", boundary=0.5)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625, 0.0]), atol=1e-6)
    calls: list = []
    out = _sample(pack, inputs, _recording(high, calls, "high"), _recording(low, calls, "low"), sigmas, boundary=0.5)
    assert calls == routed
    assert torch.isfinite(out).all()
    assert "high-noise expert of two" in info and "low-noise expert of two" in info


def test_teacher_files_take_the_boundary_set_on_the_loader(pack, folder, inputs):
    high, low, sigmas, info = _pair(pack, "toy_t2v_high_noise_14B_fp8_scaled.safetensors",
                                    "toy_t2v_low_noise_14B_fp8_scaled.safetensors", boundary=0.95)
    calls: list = []
    _sample(pack, inputs, _recording(high, calls, "high"), _recording(low, calls, "low"), sigmas, boundary=0.5)
    assert [name for name, _ in calls] == ["high", "low", "low", "low"]
    assert "fp8_scaled (fp8_e4m3fn)" in info and "boundary 0.95" in info


def _stock(folder, variant: str):
    """The teacher pair of `variant` from the stock Load Diffusion Model: MODELs without a FastLightGen tag."""
    import comfy.sd

    return [comfy.sd.load_diffusion_model(str(folder / f"toy_{variant}_{e}_noise_14B_fp8_scaled.safetensors"))
            for e in ("high", "low")]


@pytest.mark.parametrize("variant, boundary", [("t2v", 0.875), ("i2v", 0.9)])
def test_teacher_files_without_a_boundary_take_the_one_of_their_kind(pack, folder, variant, boundary):
    """The default boundary input (0) is automatic: I2V-A14B's teacher (36 input channels) gets 0.9, T2V's
    0.875, from the headers in the loader; an explicit value still wins for files that name none."""
    names = (f"toy_{variant}_high_noise_14B_fp8_scaled.safetensors",
             f"toy_{variant}_low_noise_14B_fp8_scaled.safetensors")
    assert f"boundary {boundary:g}:" in _pair(pack, *names, boundary=0)[3]
    assert "boundary 0.95:" in _pair(pack, *names, boundary=0.95)[3]


def test_experts_of_two_models_are_refused_by_the_loader(pack, folder):
    with pytest.raises(ValueError, match=r"Load FastLightGen Expert Pair: toy_t2v_high_noise_14B_fp8_scaled.safetensors "
                                         r"takes 16 input channels but toy_i2v_low_noise_14B_fp8_scaled.safetensors "
                                         r"takes 36: they are experts of two different models"):
        _pair(pack, "toy_t2v_high_noise_14B_fp8_scaled.safetensors", "toy_i2v_low_noise_14B_fp8_scaled.safetensors",
              boundary=0)


@pytest.mark.parametrize("variant, boundary, routed", [
    ("i2v", 0, ["high", "high", "low", "low"]),  # I2V-A14B's 0.9
    ("t2v", 0, ["high", "high", "high", "low"]),  # T2V-A14B's 0.875
    ("i2v", 0.875, ["high", "high", "high", "low"]),  # an explicit boundary wins
])
def test_a_stock_loaded_pair_hands_over_at_the_boundary_of_its_kind(pack, folder, inputs, start_image, variant,
                                                                    boundary, routed):
    """A step at sigma 0.88 (in [0.875, 0.9)) belongs to I2V-A14B's low-noise expert and to T2V-A14B's high-noise
    one: T2V's 0.875 for both, the old default, gave it to I2V's high-noise expert."""
    positive, latent = start_image["red"] if variant == "i2v" else (inputs["positive"], inputs["latent"])
    high, low = _stock(folder, variant)
    calls: list = []
    with torch.inference_mode():
        pack["sampling"].FastLightGenSampler.execute(_recording(high, calls, "high"), positive, latent, SEED,
                                                     torch.tensor([1.0, 0.95, 0.88, 0.5, 0.0]),
                                                     _recording(low, calls, "low"), boundary)
    assert [name for name, _ in calls] == routed


@pytest.mark.parametrize("variant, boundary", [("t2v", 0.875), ("i2v", 0.9)])
def test_block_importance_of_a_stock_loaded_pair_takes_the_boundary_of_its_kind(pack, folder, inputs, start_image,
                                                                                variant, boundary):
    positive = inputs["positive"] if variant == "t2v" else start_image["red"][0]
    plans = pack["expert_importance"].ExpertBlockImportance.execute(*_stock(folder, variant), inputs["videos"],
                                                                    positive, 1, 1, SEED, 0.5, 0.5, True,
                                                                    0).args[1]
    assert plans.boundary == boundary


def test_fp8_scaled_pairs_load_as_the_stock_loader_loads_them(pack, folder, tmp_path):
    """The A14B teacher files as ComfyUI ships them, and a student pair exported as fp8_scaled: each expert is the
    stock Load Diffusion Model's MODEL (the pack's loader keeps only the blocks it holds)."""
    import comfy.sd

    save_a14b_pair(folder, KEPT, prefix="fp8", dtype="fp8_scaled")
    for high_name, low_name in (("toy_t2v_high_noise_14B_fp8_scaled.safetensors",
                                 "toy_t2v_low_noise_14B_fp8_scaled.safetensors"),
                                ("fp8_high.safetensors", "fp8_low.safetensors")):
        pair = _pair(pack, high_name, low_name)
        for model, name in zip(pair[:2], (high_name, low_name)):
            stock = comfy.sd.load_diffusion_model(str(folder / name)).model.state_dict()
            ours = model.model.state_dict()
            assert sorted(ours) == sorted(stock)
            assert all(ours[k].dtype == stock[k].dtype and torch.equal(ours[k].float(), stock[k].float())
                       for k in ours)
        assert pair[0].model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn


# ---------------------------------------------------------------- the diffusers folder (models/diffusers)


@pytest.fixture(scope="module")
def diffusers_folders(pack, folder, tmp_path_factory):
    """models/diffusers holding tiny A14B pipeline folders as Hugging Face distributes them (T2V, I2V, T2V with
    sharded experts) and broken copies; each pipeline's experts also as ComfyUI-layout files in models/fastlightgen
    (dfolder_<name>_<expert>_noise.safetensors). {name: pipeline}."""
    import json
    import shutil

    import folder_paths
    from safetensors.torch import save_file

    from fastlightgen.wan_keys import diffusers_to_original

    root = tmp_path_factory.mktemp("diffusers")
    pipes = {variant: tiny_wan_a14b_folder(root / variant, variant, LAYERS, comfy=True) for variant in ("t2v", "i2v")}
    pipes["t2v"].save_pretrained(str(root / "t2v_sharded"), max_shard_size="1MB")
    for name, pipe in pipes.items():
        for expert, transformer in (("high", pipe.transformer), ("low", pipe.transformer_2)):
            save_file({k: v.contiguous() for k, v in diffusers_to_original(transformer.state_dict()).items()},
                      str(folder / f"dfolder_{name}_{expert}_noise.safetensors"))
    shutil.copytree(root / "t2v", root / "one_expert", ignore=shutil.ignore_patterns("transformer_2"))
    shutil.copytree(root / "t2v", root / "no_boundary")
    index = json.loads((root / "no_boundary" / "model_index.json").read_text())
    (root / "no_boundary" / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    shutil.copytree(root / "t2v_sharded", root / "missing_shard")
    next((root / "missing_shard" / "transformer_2").glob("*-00002-of-*.safetensors")).unlink()
    folder_paths.add_model_folder_path("diffusers", str(root))
    return pipes


def _folder_pair(pack, name):
    return pack["loader"].LoadExpertPairFolder.execute(name, "default").args


def _predictions(model, pipe) -> torch.Tensor:
    """The MODEL's diffusion model on a fixed input of `pipe`'s shapes."""
    config = pipe.transformer.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.in_channels, 2, 8, 8, generator=g)
    context = torch.randn(1, 6, config.text_dim, generator=g)
    with torch.inference_mode():
        return model.model.diffusion_model(x, torch.tensor([700.0]), context)


@pytest.mark.parametrize("name, pipe, boundary", [("t2v", "t2v", 0.875), ("i2v", "i2v", 0.9),
                                                  ("t2v_sharded", "t2v", 0.875)])
def test_a_diffusers_folder_loads_as_the_experts_files_load(pack, diffusers_folders, name, pipe, boundary):
    """Both experts predict as the same weights loaded from ComfyUI-layout files, tagged with their expert and the
    boundary of model_index.json; a sharded folder loads as a single-file one."""
    from FastLightGen.nodes.experts import expert_tag

    from fastlightgen.sampling import FEW_STEP

    if name == "t2v_sharded":
        assert len(list((pack["loader"].pipeline_path(name) / "transformer").glob("*.safetensors"))) > 1
    high, low, sigmas, info = _folder_pair(pack, name)
    files = _pair(pack, f"dfolder_{pipe}_high_noise.safetensors", f"dfolder_{pipe}_low_noise.safetensors", 0)
    for expert, model, from_file in (("high", high, files[0]), ("low", low, files[1])):
        assert (expert_tag(model).expert, expert_tag(model).boundary) == (expert, boundary)
        assert torch.equal(_predictions(model, diffusers_folders[pipe]), _predictions(from_file, diffusers_folders[pipe]))
    assert not torch.equal(_predictions(high, diffusers_folders[pipe]), _predictions(low, diffusers_folders[pipe]))
    assert torch.equal(sigmas, FEW_STEP.sigmas)
    assert f"boundary {boundary:g}" in info and f"{name}/transformer_2" in info


@pytest.mark.parametrize("name, message", [
    ("one_expert", "has no transformer_2/ with its config.json"),
    ("no_boundary", "names no boundary_ratio"),
    ("missing_shard", "no diffusion_pytorch_model-00002-of-"),
])
def test_bad_diffusers_folders_are_refused_before_any_weight_is_read(pack, diffusers_folders, monkeypatch, name,
                                                                     message):
    def unread(folder):
        raise AssertionError(f"{folder} was read")

    monkeypatch.setattr(pack["loader"], "read_folder", unread)
    with pytest.raises(ValueError, match=message):
        _folder_pair(pack, name)


def test_the_folder_choice_lists_pipeline_folders_and_names_the_fix(pack, diffusers_folders):
    node = pack["loader"].LoadExpertPairFolder
    assert {"t2v", "i2v", "t2v_sharded"} <= set(pack["loader"].pipeline_folders())
    assert node.validate_inputs("t2v") is True
    assert "in models/diffusers and press R" in node.validate_inputs("Wan2.2-T2V-A14B-Diffusers")


# ---------------------------------------------------------------- bad pairs, refused before sampling


@pytest.mark.parametrize("high, low, message", [
    ("student_high.safetensors", "late_high.safetensors", "are the high-noise expert; connect the low-noise "
                                                         "expert's file to the low-noise input"),
    ("student_low.safetensors", "student_high.safetensors", "the experts are swapped"),
    ("toy_t2v_low_noise_14B_fp8_scaled.safetensors", "toy_t2v_high_noise_14B_fp8_scaled.safetensors",
     "the experts are swapped"),
    ("student_high.safetensors", "late_low.safetensors", "names the boundary 0.875 but late_low.safetensors names "
                                                        "0.95"),
])
def test_bad_pairs_are_refused_by_the_loader_and_the_sampler(pack, folder, inputs, monkeypatch, high, low, message):
    with pytest.raises(ValueError, match="Load FastLightGen Expert Pair: .*" + message):
        _pair(pack, high, low)
    # the same pair loaded one file at a time reaches the sampler, which refuses it before its first step
    load = pack["loader"].LoadCheckpoint.execute
    models = load(high).args[0], load(low).args[0]
    monkeypatch.setattr(pack["sampling"], "sample_lcm", lambda *a, **k: pytest.fail("sampled a bad pair"))
    with pytest.raises(ValueError, match="FastLightGen Sampler: .*" + message):
        _sample(pack, inputs, *models, torch.tensor([1.0, 0.9375, 0.8333, 0.625, 0.0]))


def test_a_file_with_unreadable_metadata_is_refused_from_its_header(pack, folder):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / "broken_low.safetensors"), metadata={"fastlightgen": "{expert: low"})
    with pytest.raises(ValueError, match="Expert Pair: .*broken_low.safetensors: FastLightGen metadata is unreadable"):
        _pair(pack, "student_high.safetensors", "broken_low.safetensors")


def test_one_expert_alone_is_refused(pack, folder, inputs, monkeypatch):
    model = pack["loader"].LoadCheckpoint.execute("student_low.safetensors").args[0]
    monkeypatch.setattr(pack["sampling"], "sample_lcm", lambda *a, **k: pytest.fail("sampled one expert"))
    with pytest.raises(ValueError, match="the low-noise expert of a two-expert model .* connect the high-noise "
                                         "expert to 'model'"):
        pack["sampling"].FastLightGenSampler.execute(model, inputs["positive"], inputs["latent"], SEED)


def test_experts_exported_with_other_schedules_are_refused(pack, folder):
    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from fastlightgen.sampling import Sampling
    from tiny_models import tiny_a14b_expert

    meta = CheckpointMeta(LAYERS, list(range(LAYERS)), recommended=Sampling.few_step((1000, 500)), expert="low",
                          boundary=0.875)
    save_checkpoint(folder / "two_step_low.safetensors", adapt(tiny_a14b_expert(1)).pruned_model(meta.kept_blocks),
                    meta)
    with pytest.raises(ValueError, match="the experts come from different exports"):
        _pair(pack, "student_high.safetensors", "two_step_low.safetensors")


# ---------------------------------------------------------------- Block Importance of both experts


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_block_importance_scores_each_expert_on_its_part_of_the_schedule(pack, folder, inputs, start_image, variant):
    """I2V-A14B's experts (36 input channels) take WanImageToVideo's conditioning, and its start image reaches
    both of them: another start image gives other scores."""
    from fastlightgen.plan import ExpertPlans

    positive = inputs["positive"] if variant == "t2v" else start_image["red"][0]
    high, low, _, _ = _pair(pack, f"toy_{variant}_high_noise_14B_fp8_scaled.safetensors",
                            f"toy_{variant}_low_noise_14B_fp8_scaled.safetensors", boundary=0.9)
    node = pack["expert_importance"].ExpertBlockImportance
    plot, plans, plan_high, plan_low, table = node.execute(high, low, inputs["videos"], positive, 2, 1,
                                                           SEED, 0.5, 0.75, True, 0.5).args
    single = pack["importance"].BlockImportance.execute
    for model, ratio, plan, (low_sigma, high_sigma) in ((high, 0.5, plan_high, (0.9, 1.0)),
                                                        (low, 0.75, plan_low, (0.0, 0.9))):
        alone = single(model, inputs["videos"], positive, 2, 1, SEED, ratio, True, low_sigma, high_sigma).args[1]
        assert plan.scores == alone.scores and plan.kept == alone.kept
    assert (len(plan_high.kept), len(plan_low.kept)) == (2, 3)  # a keep ratio per expert
    assert plans.boundary == 0.9 and plans.plans == {"high": plan_high, "low": plan_low}
    assert ExpertPlans.from_dict(plans.to_dict()).plans["low"].kept == plan_low.kept
    assert plot.shape[1] == 2 * 360 and plot.shape[-1] == 3  # one chart per expert
    assert "high-noise expert, sigma in [0.9, 1.0]" in table and "low-noise expert, sigma in [0.0, 0.9]" in table
    if variant == "i2v":
        other = node.execute(high, low, inputs["videos"], start_image["blue"][0], 2, 1, SEED, 0.5, 0.75, True,
                             0.5).args[1]
        assert all(other.plans[name].scores != plans.plans[name].scores for name in ("high", "low"))


def test_one_expert_is_scored_only_on_its_part_of_the_schedule(pack, folder, inputs, monkeypatch):
    """Block Importance on one expert: its range, from its file's boundary (a teacher file without metadata: the
    wider part of T2V's and I2V's); anything else is refused before Stage I."""
    load = pack["loader"].LoadCheckpoint.execute
    high, late_low = load("student_high.safetensors").args[0], load("late_low.safetensors").args[0]
    teacher_low = load("toy_t2v_low_noise_14B_fp8_scaled.safetensors").args[0]
    monkeypatch.setattr(pack["importance"], "run_stage1", lambda *a, **k: pytest.fail("ran Stage I"))
    node = pack["importance"].BlockImportance.execute
    for model, (low, high_sigma), fix in ((high, (0.0, 1.0), "0.875 / 1"), (high, (0.8, 1.0), "0.875 / 1"),
                                          (late_low, (0.0, 1.0), "0 / 0.95"), (teacher_low, (0.0, 0.95), "0 / 0.9")):
        with pytest.raises(ValueError, match=f"is the .*-noise expert .* set them to {fix}"):
            node(model, inputs["videos"], inputs["positive"], 1, 1, SEED, 0.5, True, low, high_sigma)
    monkeypatch.undo()
    for model, sigma_range in ((high, (0.875, 1.0)), (late_low, (0.0, 0.95)), (teacher_low, (0.0, 0.9))):
        assert node(model, inputs["videos"], inputs["positive"], 1, 1, SEED, 0.5, True, *sigma_range).args[1].scores


def test_block_importance_refuses_a_swapped_pair_before_stage1(pack, folder, inputs, monkeypatch):
    high, low, _, _ = _pair(pack)
    monkeypatch.setattr(pack["expert_importance"], "score_blocks", lambda *a, **k: pytest.fail("ran Stage I"))
    with pytest.raises(ValueError, match="Block Importance \\(two experts\\): the experts are swapped"):
        pack["expert_importance"].ExpertBlockImportance.execute(low, high, inputs["videos"], inputs["positive"], 2,
                                                                1, SEED, 0.7, 0.7, True, 0.875)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        pack["expert_importance"].ExpertBlockImportance.execute(high, low, inputs["videos"], inputs["positive"], 2,
                                                                1, SEED, 0.7, 0.0, True, 0.875)


# ---------------------------------------------------------------- I2V-A14B: the start image


def test_an_i2v_pair_samples_from_the_start_image_wan_image_to_video_gives_it(pack, folder, start_image):
    high, low, sigmas, info = _pair(pack, "i2v_a14b_high.safetensors", "i2v_a14b_low.safetensors")
    assert "boundary 0.9" in info
    latents = {colour: _sample(pack, {"positive": positive, "latent": latent}, high, low, sigmas)
               for colour, (positive, latent) in start_image.items()}
    assert latents["red"].shape == (1, 16, 2, 8, 8) and torch.isfinite(latents["red"]).all()
    assert not torch.equal(latents["red"], latents["blue"])


def test_an_i2v_model_without_a_start_image_is_refused_before_any_pass(pack, folder, inputs, monkeypatch):
    """A prompt not passed through WanImageToVideo would make ComfyUI sample from a blank (all-zero) image."""
    high, low, sigmas, _ = _pair(pack, "i2v_a14b_high.safetensors", "i2v_a14b_low.safetensors")
    monkeypatch.setattr(pack["sampling"], "sample_lcm", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(pack["expert_importance"], "score_blocks", lambda *a, **k: pytest.fail("ran Stage I"))
    monkeypatch.setattr(pack["importance"].ImportanceProbe, "sample", lambda *a, **k: pytest.fail("ran Stage I"))
    message = ("image-to-video model \\(20 of its input channels are the start image.* the positive conditioning "
               "carries no start image; connect the prompts through WanImageToVideo with a start_image")
    with pytest.raises(ValueError, match="FastLightGen Sampler: this is an " + message):
        _sample(pack, inputs, high, low, sigmas)
    with pytest.raises(ValueError, match="Block Importance \\(two experts\\): this is an " + message):
        pack["expert_importance"].ExpertBlockImportance.execute(high, low, inputs["videos"], inputs["positive"], 1,
                                                                1, SEED, 0.5, 0.5, True, 0.9)
    with pytest.raises(ValueError, match="Block Importance: this is an " + message):
        pack["importance"].BlockImportance.execute(low, inputs["videos"], inputs["positive"], 1, 1, SEED, 0.5,
                                                   True, 0.0, 0.9)


def test_load_prune_plan_gives_the_chosen_experts_plan_of_a_two_expert_file(pack, folder, tmp_path):
    """The file Save Prune Plan writes from Block Importance (two experts) (and train.stage1 of A14B): one
    expert's plan, for Apply Prune Plan on that expert."""
    import folder_paths
    from FastLightGen.nodes.dit import skipped_blocks

    from fastlightgen.plan import ExpertPlans, PrunePlan

    high, low, _, _ = _pair(pack, "toy_t2v_high_noise_14B_fp8_scaled.safetensors",
                            "toy_t2v_low_noise_14B_fp8_scaled.safetensors", boundary=0.9)
    fingerprint = pack["plan"].fingerprint(high)
    plans = ExpertPlans(0.9, {"high": PrunePlan.from_blocks(fingerprint, [1]),
                              "low": PrunePlan.from_blocks(fingerprint, [2, 3])})
    folder_paths.add_model_folder_path(pack["plan"].PLAN_FOLDER, str(tmp_path), is_default=True)
    try:
        pack["plan"].SavePrunePlan.execute(plans, "a14b_plans", False)
        load = pack["plan"].LoadPrunePlan.execute
        for expert, model in (("high", high), ("low", low)):
            plan, info = load("a14b_plans.json", "", f"{expert}_noise").args
            assert plan == plans.plans[expert] == load(pack["plan"].PASTED, plans.to_json(), f"{expert}_noise").args[0]
            assert info.startswith(f"the {expert}-noise expert's plan of two (boundary 0.9): ")
            assert f"drops {plan.dropped}" in info
            pruned = pack["plan"].ApplyPrunePlan.execute(model, plan).args[0]
            assert pruned is not model and skipped_blocks(pruned) == plans.plans[expert].dropped
    finally:
        folder_paths.folder_names_and_paths[pack["plan"].PLAN_FOLDER][0].remove(str(tmp_path))


# ---------------------------------------------------------------- a LoRA pair on two pruned experts


def _lora_pair(folder) -> dict[str, dict[str, torch.Tensor]]:
    """One LoRA per expert, made for the full 4-block expert (ComfyUI keys, ORIGINAL block numbers), rank 2."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    loras = {}
    for expert in ("high", "low"):
        lora = {}
        for block in range(LAYERS):
            for module, (out_dim, in_dim) in (("self_attn.q", (256, 256)), ("ffn.0", (768, 256))):
                key = f"diffusion_model.blocks.{block}.{module}"
                lora[f"{key}.lora_down.weight"] = torch.randn(2, in_dim, generator=g)
                lora[f"{key}.lora_up.weight"] = torch.randn(out_dim, 2, generator=g)
                lora[f"{key}.alpha"] = torch.tensor(1.0)
        save_file(lora, str(folder / f"pair_{expert}.safetensors"))
        loras[expert] = lora
    return loras


def test_a_lora_pair_lands_on_each_pruned_experts_own_blocks(pack, folder, tmp_path):
    """W + strength * alpha / rank * up @ down on each expert's renumbered block, computed here by hand."""
    import folder_paths

    loras = _lora_pair(tmp_path)
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    high, low, _, _ = _pair(pack)
    strength = 0.8
    for expert, model in (("high", high), ("low", low)):
        before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
        patched, report = pack["lora"].StudentLoRA.execute(model, f"pair_{expert}.safetensors", strength,
                                                           "full model", "(from the model)").args
        (dropped,) = set(range(LAYERS)) - set(KEPT[expert])
        assert f"blocks the student dropped): {dropped}: 25.0% of the LoRA's parameters" in report
        patched.patch_model()
        try:
            weights = patched.model.diffusion_model.state_dict()
            for student_block, original in enumerate(KEPT[expert]):
                for module in ("self_attn.q", "ffn.0"):
                    key = f"diffusion_model.blocks.{original}.{module}"
                    delta = strength * 1.0 / 2 * loras[expert][f"{key}.lora_up.weight"] @ \
                        loras[expert][f"{key}.lora_down.weight"]
                    name = f"blocks.{student_block}.{module}.weight"
                    torch.testing.assert_close(weights[name].float(), before[name].float() + delta, rtol=1e-4,
                                               atol=1e-4)
        finally:
            patched.unpatch_model()
        assert all(torch.equal(v, before[k]) for k, v in model.model.diffusion_model.state_dict().items())


def test_an_adapter_pair_turns_the_teacher_pair_into_the_student_pair(pack, folder, inputs, tmp_path):
    """One adapter per expert (train.export_adapter per expert file) on the fp8_scaled teacher pair: each expert
    keeps its own blocks, and the students stay the experts they were (routing and wiring checks still apply)."""
    import folder_paths

    from fastlightgen.adapters import adapt
    from fastlightgen.student_adapter import make_adapter, save_adapter
    from tiny_models import tiny_a14b_expert

    for seed, expert in enumerate(("high", "low")):
        teacher = tiny_a14b_expert(seed)
        student = adapt(teacher).pruned_model(KEPT[expert])
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.001 * torch.randn_like(p))
        save_adapter(tmp_path / f"adapter_{expert}.safetensors", make_adapter(teacher, student, KEPT[expert], rank=8))
    folder_paths.add_model_folder_path(pack["adapter"].ADAPTER_FOLDER, str(tmp_path))
    high, low, _, _ = _pair(pack, "toy_t2v_high_noise_14B_fp8_scaled.safetensors",
                            "toy_t2v_low_noise_14B_fp8_scaled.safetensors", boundary=0.95)
    apply = pack["adapter"].ApplyStudentAdapter.execute
    students = {name: apply(model, f"adapter_{name}.safetensors").args for name, model in (("high", high),
                                                                                           ("low", low))}
    assert [len(students[name][0].model.diffusion_model.blocks) for name in ("high", "low")] == [3, 3]
    assert "WARNING" not in students["high"][2] + students["low"][2]
    calls: list = []
    _sample(pack, inputs, _recording(students["high"][0], calls, "high"), _recording(students["low"][0], calls, "low"),
            students["high"][1], boundary=0.5)
    assert [name for name, _ in calls] == ["high", "low", "low", "low"]  # the teacher pair's boundary, 0.95
    with pytest.raises(ValueError, match="the experts are swapped"):
        _sample(pack, inputs, students["low"][0], students["high"][0], students["high"][1])
    # an expert's adapter on the other expert's teacher: its sampled weights differ, and the node says so
    assert "WARNING" in apply(low, "adapter_high.safetensors").args[2]


# ---------------------------------------------------------------- cached MODELs


def test_no_node_changes_the_experts_it_received_and_a_rerun_equals_a_fresh_run(pack, folder, inputs):
    high, low, sigmas, _ = _pair(pack)
    snapshot = [({k: v.clone() for k, v in m.model.diffusion_model.state_dict().items()}, dict(m.patches),
                 repr(m.model_options), m.attachments.copy()) for m in (high, low)]
    first = _sample(pack, inputs, high, low, sigmas)
    pack["expert_importance"].ExpertBlockImportance.execute(high, low, inputs["videos"], inputs["positive"], 1, 1,
                                                            SEED, 0.5, 0.5, True, 0.875)
    assert torch.equal(_sample(pack, inputs, high, low, sigmas), first)
    fresh_high, fresh_low, _, _ = _pair(pack)
    assert torch.equal(_sample(pack, inputs, fresh_high, fresh_low, sigmas), first)
    for model, (weights, patches, options, attachments) in zip((high, low), snapshot):
        assert all(torch.equal(v, weights[k]) for k, v in model.model.diffusion_model.state_dict().items())
        assert (dict(model.patches), repr(model.model_options), model.attachments) == (patches, options, attachments)
