"""FastLightGen Apply Student Adapter inside ComfyUI's own modules (in process, CPU).

A random 4-block teacher (fp32 file, read by the stock Load Diffusion Model) and a student keeping blocks
0, 2, 3 with rank-2 deltas; its adapter at rank 2 and the library's student built from it, saved as a checkpoint.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from test_student_adapter import KEPT, SHAPE, make_student

RANK = 2


@pytest.fixture(scope="module")
def pack(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import adapter, loader, lora, student

    return {"adapter": adapter, "loader": loader, "lora": lora, "student": student}


@pytest.fixture(scope="module")
def files(pack, tmp_path_factory):
    import folder_paths
    from safetensors.torch import save_file

    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from fastlightgen.student_adapter import apply_adapter, make_adapter, save_adapter
    from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher

    models, adapters, loras = (tmp_path_factory.mktemp(n) for n in ("ad_models", "ad_adapters", "ad_loras"))
    teacher = build_toy_teacher(SHAPE, seed=3).float()
    # deltas of a tenth of the weights' size, as a distilled student's: fp8_scaled keeps the base's per-tensor scale,
    # so a delta beyond the base's range would be clipped there (as any LoRA's)
    adapter = make_adapter(teacher, make_student(teacher, size=0.005), KEPT, rank=RANK, dtype=torch.float32)
    save_adapter(adapters / "ad.safetensors", adapter)
    save_checkpoint(models / "ad_teacher.safetensors", teacher, CheckpointMeta(4, list(range(4))))
    save_checkpoint(models / "ad_student.safetensors", apply_adapter(teacher, adapter), CheckpointMeta(4, KEPT))
    other = build_toy_teacher(ToyTeacherShape(num_layers=5, num_attention_heads=1, ffn_dim=256))
    save_checkpoint(models / "ad_other.safetensors", other, CheckpointMeta(5, list(range(5))))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 128),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(128, 2)},
              str(adapters / "not_an_adapter.safetensors"))
    gen = torch.Generator().manual_seed(5)
    style = {}
    for b in range(4):
        style[f"diffusion_model.blocks.{b}.self_attn.q.lora_A.weight"] = 0.05 * torch.randn(2, 128, generator=gen)
        style[f"diffusion_model.blocks.{b}.self_attn.q.lora_B.weight"] = 0.05 * torch.randn(128, 2, generator=gen)
    save_file(style, str(loras / "ad_style.safetensors"))
    save_checkpoint(models / "ad_wrong.safetensors", build_toy_teacher(SHAPE, seed=4), CheckpointMeta(4, [0, 1, 2, 3]))
    _variants(models / "ad_teacher.safetensors", models)
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    folder_paths.add_model_folder_path("fastlightgen", str(models))
    folder_paths.add_model_folder_path(pack["adapter"].ADAPTER_FOLDER, str(adapters))
    folder_paths.add_model_folder_path("loras", str(loras))
    return models


def _variants(source, folder) -> None:
    """bf16 and ComfyUI fp8_scaled (per-tensor scale_weight + the scaled_fp8 marker) copies of a teacher file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / "ad_teacher_bf16.safetensors"))
    for key in [k for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2]:
        scale = tensors[key].float().abs().amax() / 448
        tensors[key] = (tensors[key].float() / scale).to(torch.float8_e4m3fn)
        tensors[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
    tensors["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    save_file(tensors, str(folder / "ad_teacher_fp8_scaled.safetensors"))


def _stock(name: str, weight_dtype: str = "default"):
    import nodes

    return nodes.UNETLoader().load_unet(name, weight_dtype)[0]


def _apply(pack, model, name="ad.safetensors"):
    return pack["adapter"].ApplyStudentAdapter.execute(model, name).args


def _weights(model) -> dict[str, torch.Tensor]:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    model.patch_model()
    try:
        return {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    finally:
        model.unpatch_model()


def _output(model, seed: int = 0) -> torch.Tensor:
    """The model's prediction on fixed noise, text and sigma, through ComfyUI's apply_model."""
    import comfy.model_management

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, 2, 8, 8, generator=gen)
    context = torch.randn(1, 8, 4096, generator=gen)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x.to(model.load_device), torch.tensor([0.7]).to(model.load_device),
                                       c_crossattn=context.to(model.load_device)).float().cpu()


def test_node_equals_the_library_student(pack, files):
    teacher = _stock("ad_teacher.safetensors")
    student, sigmas, info = _apply(pack, teacher)
    library = pack["loader"].LoadCheckpoint.execute("ad_student.safetensors").args[0]
    ours, theirs = _weights(student), _weights(library)
    assert set(ours) == set(theirs) and len(student.model.diffusion_model.blocks) == len(KEPT)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    torch.testing.assert_close(_output(student), _output(library), rtol=1e-5, atol=1e-5)
    mark = pack["student"].student_mark(student)
    assert list(mark.kept_blocks) == KEPT and mark.original_num_blocks == 4
    assert len(teacher.model.diffusion_model.blocks) == 4 and not teacher.patches  # the input is untouched
    assert student.model_size() == library.model_size() < teacher.model_size()  # the dropped block is gone
    assert sigmas[0] == 1.0 and len(sigmas) == 5 and "3 of 4 blocks kept [0, 2, 3]" in info
    assert "WARNING" not in info


@pytest.mark.parametrize("name, weight_dtype", [("ad_teacher_bf16.safetensors", "default"),
                                                ("ad_teacher.safetensors", "fp8_e4m3fn"),
                                                ("ad_teacher_fp8_scaled.safetensors", "default")])
def test_low_precision_bases_run_close_to_the_full_precision_result(pack, files, name, weight_dtype):
    student = _apply(pack, _stock("ad_teacher.safetensors"))[0]
    low, _, info = _apply(pack, _stock(name, weight_dtype))
    assert "WARNING" not in info
    if weight_dtype == "fp8_e4m3fn" or "fp8" in name:
        assert low.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    ref, got = _output(student), _output(low)
    base_ref, base_got = _output(_stock("ad_teacher.safetensors")), _output(_stock(name, weight_dtype))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(got).all()
    # ComfyUI re-rounds a patched fp8 weight stochastically: measured 0.020 (fp8_e4m3fn) and 0.028 (fp8_scaled)
    # against 0.012 and 0.011 for the teacher alone, and 0.001 for bf16
    assert rel(got, ref) < max(0.05, 1.5 * rel(base_got, base_ref))


def test_another_teacher_of_the_same_shape_is_warned_about(pack, files):
    _, _, info = _apply(pack, _stock("ad_wrong.safetensors"))
    assert "WARNING" in info and "sampled weights differ" in info


def test_foreign_base_and_foreign_file_are_refused(pack, files):
    from fastlightgen.student_adapter import AdapterError

    with pytest.raises(AdapterError, match="made for a wan with 4 blocks.*base model is a wan with 5 blocks"):
        _apply(pack, _stock("ad_other.safetensors"))
    with pytest.raises(AdapterError, match="not a FastLightGen student adapter"):
        _apply(pack, _stock("ad_teacher.safetensors"), "not_an_adapter.safetensors")


def test_style_lora_lands_on_the_right_blocks(pack, files):
    import nodes

    lora = pack["lora"]
    student = _apply(pack, _stock("ad_teacher.safetensors"))[0]
    library = pack["loader"].LoadCheckpoint.execute("ad_student.safetensors").args[0]
    apply = lambda m: lora.StudentLoRA.execute(m, "ad_style.safetensors", 0.8, lora.FULL_MODEL,
                                               lora.FROM_MODEL).args[0]
    ours, theirs = _weights(apply(student)), _weights(apply(library))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    stock = nodes.LoraLoaderModelOnly().load_lora_model_only(student, "ad_style.safetensors", 0.8)[0]
    assert pack["student"].misapplied_blocks(stock) == [0, 1, 2]


def test_object_patches_before_the_adapter_are_kept(pack, files):
    teacher = _stock("ad_teacher.safetensors").clone()
    sampling = object()  # as ModelSamplingSD3 sets model_sampling
    teacher.add_object_patch("model_sampling", sampling)
    student = _apply(pack, teacher)[0]
    assert student.object_patches["model_sampling"] is sampling


def _state(model) -> dict[str, torch.Tensor]:
    """The weights a MODEL's modules hold right now, as ComfyUI left them (no unload first)."""
    return {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def test_the_teacher_is_unchanged_and_a_rerun_equals_a_fresh_run(pack, files):
    """ComfyUI keeps the teacher MODEL and the last student loaded between prompts; neither may leak into the other."""
    teacher = _stock("ad_teacher.safetensors")
    weights, output = _state(teacher), _output(teacher)
    patches, object_patches = dict(teacher.patches), dict(teacher.object_patches)
    _output(pack["adapter"].ApplyStudentAdapter.execute(teacher, "ad.safetensors", 1.0).args[0])  # prompt 1
    rerun, _, info = pack["adapter"].ApplyStudentAdapter.execute(teacher, "ad.safetensors", 0.5).args  # prompt 2
    rerun_output = _output(rerun)
    assert "WARNING" not in info
    assert torch.equal(_output(teacher), output)  # the teacher sampled after both prompts
    assert all(torch.equal(v, weights[k]) for k, v in _state(teacher).items())
    assert teacher.patches == patches and teacher.object_patches == object_patches
    fresh = pack["adapter"].ApplyStudentAdapter.execute(_stock("ad_teacher.safetensors"), "ad.safetensors", 0.5)
    assert torch.equal(rerun_output, _output(fresh.args[0]))
