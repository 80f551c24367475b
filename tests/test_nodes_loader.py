"""Load FastLightGen Checkpoint against the stock Load Diffusion Model, on every Wan weight format ComfyUI reads.

A random 2-block toy teacher (a Wan 2.2 TI2V shape ComfyUI detects) is saved as ComfyUI distributes Wan: fp16,
bf16, fp8_e4m3fn, fp8_scaled (scale_weight/scale_input + the scaled_fp8 marker), mixed precision
(weight_scale + _quantization_metadata) and an all-in-one file with the model.diffusion_model. prefix. For each
file and each weight_dtype choice, the pack's MODEL must be the stock loader's: same state dict bit for bit,
same operations, same output on the same input.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from tiny_models import comfy_weight_files

LAYOUTS = ["fp16", "bf16", "fp8_e4m3fn", "fp8_scaled", "fp8_mixed", "all_in_one_prefixed"]
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
INFO = {"fp16": "weights fp16", "bf16": "weights bf16", "fp8_e4m3fn": "weights fp8_e4m3fn",
        "fp8_scaled": "weights fp8_scaled (fp8_e4m3fn)", "fp8_mixed": "weights fp8 mixed precision (fp8_e4m3fn)",
        "all_in_one_prefixed": "2 tensors of other components left out (e.g. first_stage_model."}


@pytest.fixture(scope="module")
def loader(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import loader

    return loader


@pytest.fixture(scope="module")
def files(loader, tmp_path_factory):
    import folder_paths
    from safetensors.torch import save_file

    from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher

    folder = tmp_path_factory.mktemp("weight_formats")
    teacher = build_toy_teacher(ToyTeacherShape(num_layers=2), seed=3)
    for name, (tensors, metadata) in comfy_weight_files(teacher).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"w_{name}.safetensors"),
                  metadata=metadata or None)
    folder_paths.add_model_folder_path("fastlightgen", str(folder))
    return folder


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A parameter as comparable bits: mixed precision holds QuantizedTensors, torch.equal takes no fp8."""
    if hasattr(t, "dequantize") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        t = t.dequantize()
    t = t.detach()
    return t.reshape(-1).view(torch.uint8) if t.dtype.itemsize == 1 or t.ndim == 0 else t.view(-1)


def _assert_same_model(ours, stock) -> None:
    a, b = ours.model.state_dict(), stock.model.state_dict()
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype for k in a), [k for k in a if a[k].dtype != b[k].dtype][:4]
    assert all(torch.equal(_plain(a[k]), _plain(b[k])) for k in a)
    assert type(ours.model) is type(stock.model)
    assert ours.model.manual_cast_dtype == stock.model.manual_cast_dtype
    assert ours.model.get_dtype() == stock.model.get_dtype()
    linear = lambda m: type(m.model.diffusion_model.blocks[0].self_attn.q).__qualname__  # noqa: E731
    assert linear(ours) == linear(stock)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 48, 2, 8, 8, generator=g), torch.randn(1, 5, 4096, generator=g)
    out = lambda m: m.model.apply_model(x, torch.tensor([0.6]), c_crossattn=context)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(out(ours), out(stock))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loader_equals_the_stock_loader_on_every_weight_format(loader, files, layout):
    import comfy.sd

    name = f"w_{layout}.safetensors"
    ours, sigmas, info = loader.LoadCheckpoint.execute(name, "default").args
    _assert_same_model(ours, comfy.sd.load_diffusion_model(str(files / name)))
    assert INFO[layout] in info and sigmas[-1] == 0


@pytest.mark.parametrize("layout", ["bf16", "fp8_scaled"])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES[1:])
def test_weight_dtype_choices_equal_the_stock_loaders(loader, files, layout, weight_dtype):
    import comfy.sd

    name = f"w_{layout}.safetensors"
    ours = loader.LoadCheckpoint.execute(name, weight_dtype).args[0]
    stock = comfy.sd.load_diffusion_model(str(files / name), model_options=loader.WEIGHT_DTYPES[weight_dtype])
    _assert_same_model(ours, stock)


def test_weight_dtype_choices_are_the_stock_ones(loader):
    from nodes import UNETLoader

    stock = UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert list(loader.WEIGHT_DTYPES) == stock == WEIGHT_DTYPES
