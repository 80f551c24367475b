"""FastLightGen LoRA (pruned student) inside ComfyUI's own modules (in process, CPU).

For every key form, the student patched by the node equals the teacher patched by the stock Load LoRA
and then pruned, exactly (this ComfyUI's stock loader reads no diffusers-named Wan LoRA, so for that form
the teacher gets the same tensors under ComfyUI names). The stock loader on a student is refused at sampling (the UI shows the error).
A random 6-block toy teacher and its student keeping blocks 0, 2, 3, 5 are exported for the tests.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

BLOCKS, KEPT = 6, [0, 2, 3, 5]
RANK, STRENGTH, SEED = 2, 0.7, 7
BLOCK_MODULES = (("self_attn.q", "attn1.to_q"), ("self_attn.o", "attn1.to_out.0"), ("cross_attn.k", "attn2.to_k"),
                 ("cross_attn.o", "attn2.to_out.0"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"))
TOP_MODULES = (("head.head", "proj_out"), ("text_embedding.0", "condition_embedder.text_embedder.linear_1"))
FORMS = ("comfy_lora_AB", "comfy_up_down", "diffusers", "kohya", "diff")


@pytest.fixture(scope="module")
def pack(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import loader, lora, sampling, student, toy

    return {"loader": loader, "lora": lora, "sampling": sampling, "student": student, "toy": toy}


@pytest.fixture(scope="module")
def files(pack, tmp_path_factory):
    """Teacher and student checkpoints (also as diffusion_models) and one LoRA per form plus its ComfyUI twin."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher

    models, loras = tmp_path_factory.mktemp("lora_models"), tmp_path_factory.mktemp("loras")
    teacher = build_toy_teacher(ToyTeacherShape(num_layers=BLOCKS), seed=2)
    save_checkpoint(models / "lt_full.safetensors", teacher, CheckpointMeta(BLOCKS, list(range(BLOCKS))))
    save_checkpoint(models / "lt_student.safetensors", adapt(teacher).pruned_model(KEPT), CheckpointMeta(BLOCKS, KEPT))
    folder_paths.add_model_folder_path("fastlightgen", str(models))
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    folder_paths.add_model_folder_path("loras", str(loras))
    shapes = {k: v.shape for k, v in load_file(str(models / "lt_full.safetensors")).items()}
    for form in FORMS:
        lora, twin = _lora(form, shapes, seed=FORMS.index(form))
        save_file(lora, str(loras / f"{form}.safetensors"))
        save_file(twin, str(loras / f"{form}_comfy_twin.safetensors"))
    return {"models": models, "loras": loras, "shapes": shapes}


def _lora(form: str, shapes: dict, seed: int) -> tuple[dict, dict]:
    """(LoRA in `form`, the same tensors keyed in ComfyUI form, which the stock loader applies to the teacher)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.05 * torch.randn(*shape, generator=gen)  # noqa: E731
    modules = [(f"blocks.{b}.{o}", f"blocks.{b}.{d}") for b in range(BLOCKS) for o, d in BLOCK_MODULES]
    modules += list(TOP_MODULES)
    lora, twin = {}, {}
    if form == "diff":
        for b in range(BLOCKS):
            for name, suffix, key in ((f"blocks.{b}.norm3", "diff", "norm3.weight"),
                                      (f"blocks.{b}.modulation", "diff", "modulation"),
                                      (f"blocks.{b}.ffn.2", "diff", "ffn.2.weight"),
                                      (f"blocks.{b}.self_attn.q", "diff_b", "self_attn.q.bias")):
                lora[f"diffusion_model.{name}.{suffix}"] = rand(*shapes[f"blocks.{b}.{key}"])
        lora["diffusion_model.head.head.diff_b"] = rand(*shapes["head.head.bias"])
        return lora, dict(lora)
    for original, diffusers in modules:
        out, inp = shapes[original + ".weight"]
        up, down, alpha = rand(out, RANK), rand(RANK, inp), torch.tensor(float(seed + 1))
        comfy = f"diffusion_model.{original}"
        if form == "comfy_lora_AB":
            lora.update({f"{comfy}.lora_B.weight": up, f"{comfy}.lora_A.weight": down, f"{comfy}.alpha": alpha})
        elif form == "comfy_up_down":
            lora.update({f"{comfy}.lora_up.weight": up, f"{comfy}.lora_down.weight": down})
        elif form == "diffusers":
            lora.update({f"transformer.{diffusers}.lora_B.weight": up, f"transformer.{diffusers}.lora_A.weight": down})
            twin.update({f"{comfy}.lora_B.weight": up, f"{comfy}.lora_A.weight": down})
        elif form == "kohya":
            kohya = "lora_unet_" + original.replace(".", "_")
            lora.update({f"{kohya}.lora_up.weight": up, f"{kohya}.lora_down.weight": down, f"{kohya}.alpha": alpha})
    if form == "kohya":  # a conv LoRA on the patch embedding, its down factor shaped like the kernel
        out, inp, *kernel = shapes["patch_embedding.weight"]
        lora.update({"lora_unet_patch_embedding.lora_up.weight": rand(out, RANK, 1, 1, 1),
                     "lora_unet_patch_embedding.lora_down.weight": rand(RANK, inp, *kernel)})
    return lora, (twin or dict(lora))


def _weights(model) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with the ModelPatcher's patches applied (ComfyUI's own patching)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # no clone sharing these weights stays patched by a sampler
    model.patch_model()
    try:
        return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    finally:
        model.unpatch_model()


def _pruned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's weights as the student holds them: kept blocks renumbered, dropped ones gone."""
    out = {}
    for key, value in weights.items():
        if key.startswith("blocks."):
            _, block, rest = key.split(".", 2)
            if int(block) in KEPT:
                out[f"blocks.{KEPT.index(int(block))}.{rest}"] = value
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def models(pack, files):
    load = lambda name: pack["loader"].LoadCheckpoint.execute(name).args[0]  # noqa: E731
    return {"teacher": load("lt_full.safetensors"), "student": load("lt_student.safetensors")}


def _apply(pack, model, lora_name, made_for=None, student_checkpoint=None, strength=STRENGTH):
    lora = pack["lora"]
    return lora.StudentLoRA.execute(model, lora_name, strength, made_for or lora.FULL_MODEL,
                                    student_checkpoint or lora.FROM_MODEL)


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("form", FORMS)
def test_student_lora_equals_teacher_lora_then_pruned(pack, files, models, form):
    import nodes

    teacher = nodes.LoraLoaderModelOnly().load_lora_model_only(models["teacher"], f"{form}_comfy_twin.safetensors",
                                                               STRENGTH)[0]
    expected = _pruned(_weights(teacher))
    out = _apply(pack, models["student"], f"{form}.safetensors")
    got = _weights(out.args[0])
    plain = _weights(models["student"])
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    changed = [k for k in got if not torch.equal(got[k], plain[k])]
    # the LoRA really landed, on every kept block (ComfyUI does not patch the blocks' bare `modulation` tables)
    assert len(changed) >= 3 * len(KEPT) + 1, changed
    assert all(("blocks." not in k) or int(k.split(".")[1]) < len(KEPT) for k in changed)
    assert out.args[0].model is models["student"].model  # a clone: weights shared, the input stays unpatched
    assert not models["student"].patches


def test_stock_loader_misapplies_where_the_node_does_not(pack, models):
    """The bug this node fixes: the stock loader puts original block 2's LoRA on student block 2 (original 3)."""
    import nodes

    stock = _weights(nodes.LoraLoaderModelOnly().load_lora_model_only(models["student"], "diff.safetensors", 1.0)[0])
    ours = _weights(_apply(pack, models["student"], "diff.safetensors", strength=1.0).args[0])
    teacher = _pruned(_weights(nodes.LoraLoaderModelOnly().load_lora_model_only(models["teacher"], "diff.safetensors",
                                                                                1.0)[0]))
    key = "blocks.2.norm3.weight"
    assert torch.equal(ours[key], teacher[key]) and not torch.equal(stock[key], teacher[key])


# ---------------------------------------------------------------- report


def test_report_names_dropped_blocks_and_share(pack, files, models):
    from safetensors.torch import load_file

    from fastlightgen.lora_remap import remap_lora

    out = _apply(pack, models["student"], "comfy_lora_AB.safetensors")
    text = out.args[1]
    assert out.ui.as_dict()["text"] == (text,)  # shown on the node
    _, report = remap_lora(load_file(str(files["loras"] / "comfy_lora_AB.safetensors")), KEPT, BLOCKS)
    assert report.dropped == (1, 4)
    assert f"Left out (blocks the student dropped): 1, 4: {report.param_share_dropped:.1%} of the LoRA's " in text
    assert f"{report.norm_share_dropped:.1%} of its weight change" in text
    assert "2->1, 3->2, 5->3" in text and "at strength 0.7, made for full model" in text
    assert 0.2 < report.param_share_dropped < 1 / 3  # 2 of 6 blocks, diluted by the head and text LoRAs


# ---------------------------------------------------------------- where the kept blocks come from


def test_stock_loaded_student_needs_its_file_and_then_matches(pack, models):
    import nodes

    stock = nodes.UNETLoader().load_unet("lt_student.safetensors", "default")[0]
    with pytest.raises(ValueError, match="pick its file in 'student_checkpoint'"):
        _apply(pack, stock, "kohya.safetensors")
    patched = _apply(pack, stock, "kohya.safetensors", student_checkpoint="lt_student.safetensors").args[0]
    reference = _apply(pack, models["student"], "kohya.safetensors").args[0]
    got, expected = _weights(patched), _weights(reference)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert pack["student"].student_mark(patched).kept_blocks == tuple(KEPT)  # marked from here on
    with pytest.raises(ValueError, match="MODEL has 4 blocks but lt_full.safetensors keeps 6"):
        _apply(pack, stock, "kohya.safetensors", student_checkpoint="lt_full.safetensors")


def test_made_for_this_student_applies_as_is(pack, files, models):
    import nodes
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files["loras"] / "diff.safetensors"))
    extra_blocks = ("diffusion_model.blocks.4.", "diffusion_model.blocks.5.")
    save_file({k: v for k, v in tensors.items() if not k.startswith(extra_blocks)},
              str(files["loras"] / "for_student.safetensors"))
    made_for = pack["lora"].THIS_STUDENT
    ours = _weights(_apply(pack, models["student"], "for_student.safetensors", made_for=made_for).args[0])
    stock = nodes.LoraLoaderModelOnly().load_lora_model_only(models["student"], "for_student.safetensors", STRENGTH)[0]
    assert all(torch.equal(ours[k], v) for k, v in _weights(stock).items())
    with pytest.raises(ValueError, match="at least 6 blocks, but the model has 4 blocks"):
        _apply(pack, models["student"], "diff.safetensors", made_for=made_for)


# ---------------------------------------------------------------- the guard against the stock loader


@pytest.fixture(scope="module")
def toy_inputs(pack):
    toy = pack["toy"]
    latent, caption, _ = toy.ToyFirstFrameLatent.execute("blue", "square", "up", "textured", 5, "", 1).args
    return {"latent": latent, "positive": toy.ToyTextEncode.execute(caption).args[0],
            "negative": toy.ToyTextEncode.execute("").args[0]}


def _sample(pack, model, toy_inputs):
    sigmas = torch.tensor([1.0, 0.9375, 0.8333, 0.625, 0.0])
    return pack["sampling"].FastLightGenSampler.execute(model, toy_inputs["positive"], toy_inputs["latent"], SEED,
                                                        sigmas).args[0]["samples"]


def test_stock_lora_on_a_student_is_refused_at_sampling(pack, models, toy_inputs):
    import nodes

    error = pack["student"].MisappliedLoRAError
    stock = nodes.LoraLoaderModelOnly().load_lora_model_only(models["student"], "comfy_up_down.safetensors", 1.0)[0]
    with pytest.raises(error, match=r"blocks 0, 1, 2, 3 from a loader that does not know .*FastLightGen LoRA"):
        _sample(pack, stock, toy_inputs)
    with pytest.raises(error, match="4 of 6 blocks kept"):  # the stock KSampler too
        nodes.common_ksampler(stock, SEED, 2, 1.0, "euler", "simple", toy_inputs["positive"],
                              toy_inputs["negative"], toy_inputs["latent"])
    ours = _apply(pack, models["student"], "comfy_up_down.safetensors", strength=1.0).args[0]
    assert not torch.equal(_sample(pack, ours, toy_inputs), _sample(pack, models["student"], toy_inputs))
    after_ours = nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "diff.safetensors", 1.0)[0]
    with pytest.raises(error):
        _sample(pack, after_ours, toy_inputs)


def test_guard_passes_teachers_merges_and_non_block_loras(pack, models, files, toy_inputs):
    import nodes
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    from safetensors.torch import save_file

    on_teacher = nodes.LoraLoaderModelOnly().load_lora_model_only(models["teacher"], "diff.safetensors", 1.0)[0]
    assert not pack["student"].misapplied_blocks(on_teacher)  # nothing renumbered: the stock loader is right
    merged = ModelMergeSimple().merge(models["student"], models["student"], 0.5)[0]
    assert not pack["student"].misapplied_blocks(merged)
    save_file({"diffusion_model.head.head.diff_b": torch.ones(files["shapes"]["head.head.bias"])},
              str(files["loras"] / "head_only.safetensors"))
    head = nodes.LoraLoaderModelOnly().load_lora_model_only(models["student"], "head_only.safetensors", 1.0)[0]
    assert torch.isfinite(_sample(pack, head, toy_inputs)).all()


# ---------------------------------------------------------------- bad inputs


def test_bad_loras_fail_clearly(pack, models, files):
    from safetensors.torch import save_file

    from fastlightgen.lora_remap import LoRAKeyError

    width = files["shapes"]["blocks.0.norm3.weight"][0]
    bad = {
        "deeper.safetensors": ({"diffusion_model.blocks.9.norm3.diff": torch.ones(width)},
                               "made for a model of at least 10 blocks, but the student was pruned from a model of 6"),
        "unknown.safetensors": ({"unet.down_blocks.0.proj_in.lora_A.weight": torch.ones(2, 2)},
                                "is not one of the Wan LoRA key forms"),
        "narrower.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(128, 2),
                                  "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 128)},
                                 "another width"),
        "other_family.safetensors": ({"diffusion_model.blocks.0.attn.qkv.diff": torch.ones(2, 2)},
                                     "match no weight of this model"),
    }
    for name, (tensors, message) in bad.items():
        save_file(tensors, str(files["loras"] / name))
        with pytest.raises(LoRAKeyError, match=message):
            _apply(pack, models["student"], name)
    torch.save({"diffusion_model.blocks.0.norm3.diff": torch.ones(width)}, files["loras"] / "renamed_pickle.safetensors")
    with pytest.raises(ValueError, match=r"renamed_pickle\.safetensors: not a safetensors file .*is it a pickle"):
        _apply(pack, models["student"], "renamed_pickle.safetensors")


def test_missing_files_stop_at_validation(pack, files):
    """ComfyUI checks no V3 COMBO against its options: each file input of the pack checks its own."""
    lora = pack["lora"].StudentLoRA
    assert lora.validate_inputs("diff.safetensors", "(from the model)") is True
    assert "LoRA 'gone.safetensors' is not there: put it in models/loras" in lora.validate_inputs(
        "gone.safetensors", "(from the model)")
    assert "student checkpoint 'gone.safetensors' is not there" in lora.validate_inputs("diff.safetensors",
                                                                                        "gone.safetensors")


def test_the_student_it_received_is_unchanged(pack, models, toy_inputs):
    """ComfyUI caches the student between prompts: sampling the LoRA'd clone leaves it as it was. (A clone
    shares the weights, which ComfyUI patches in place while the clone is loaded and restores when another
    clone loads, as with the stock Load LoRA; the weights compared are those after unloading.)"""
    import comfy.model_management
    from test_nodes import _snapshot

    student = models["student"]
    comfy.model_management.unload_all_models()  # earlier tests' clones may still hold it patched
    before, plain = _snapshot(student), _sample(pack, student, toy_inputs)
    patched = _apply(pack, student, "comfy_lora_AB.safetensors")[0]
    assert not torch.equal(_sample(pack, patched, toy_inputs), plain)  # the LoRA is there
    comfy.model_management.unload_all_models()
    after = _snapshot(student)
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items()) and after[1:] == before[1:]
    assert torch.equal(_sample(pack, student, toy_inputs), plain)
