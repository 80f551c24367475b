"""train.export's fp8_scaled: the committed toy student (bf16) converted with `--convert`, read by ComfyUI's stock
Load Diffusion Model and the pack's Load FastLightGen Checkpoint (in process, CPU) against the bf16 file, its size,
and the inputs it refuses before writing anything."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastlightgen.checkpoint import CheckpointError, load_wan, save_checkpoint
from fastlightgen.fp8 import FP8_SCALED
from fastlightgen.toy.prompts import split_prompts
from fastlightgen.toy.teacher import conditioning

TOY = Path(__file__).resolve().parent.parent / "models" / "fastlightgen" / "toy_student.safetensors"
# ComfyUI's prediction from the fp8_scaled file against the bf16 file's, relative L2 error on `_prediction`'s
# inputs: measured 0.0507. (e4m3fn keeps 3 mantissa bits: each weight is off by 2.6% RMS; the velocity by 3.5%,
# reports/fp8_export.md, and apply_model's denoised latent, noise - velocity, has the smaller norm.)
PREDICTION_TOLERANCE = 0.07


def _convert(source: Path, out: Path, dtype: str = FP8_SCALED) -> None:
    from train import export

    export.main(["--convert", str(source), "--set", f"export.dtype={dtype}", "--set", f"export.out={out}"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A folder holding the committed bf16 toy student and its fp8_scaled export."""
    folder = tmp_path_factory.mktemp("fp8_export")
    shutil.copyfile(TOY, folder / "toy_bf16.safetensors")
    _convert(TOY, folder / "toy_fp8.safetensors")
    return folder


@pytest.fixture(scope="module")
def loader(pack_package, exported):
    import folder_paths

    extension = asyncio.run(pack_package.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
    from FastLightGen.nodes import loader

    folder_paths.add_model_folder_path("diffusion_models", str(exported))
    return loader


def _prediction(model) -> torch.Tensor:
    """ComfyUI's prediction (apply_model) at the student's first step: pure noise at sigma 1, the toy's text
    embeddings of two held-out prompts."""
    prompts = split_prompts("heldout", 1, 0, 2, t2v=True)
    noise = torch.randn((2, *prompts.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.model.apply_model(noise, torch.ones(2), c_crossattn=conditioning(prompts.captions).text).float()


def _tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_stock_and_pack_loaders_agree_exactly_and_stay_close_to_bf16(loader, exported):
    import nodes

    stock = nodes.UNETLoader().load_unet("toy_fp8.safetensors", "default")[0]
    ours, sigmas, info = loader.LoadCheckpoint.execute("toy_fp8.safetensors").args
    bf16 = nodes.UNETLoader().load_unet("toy_bf16.safetensors", "default")[0]
    for model in (stock, ours):
        head = model.model.diffusion_model.head.head  # outside the blocks: ComfyUI holds it in fp8 too
        assert head.weight.dtype == torch.float8_e4m3fn and head.scale_weight.item() != 1.0  # scaled, not cast
    assert stock.model.model_config.optimizations["fp8"] is False  # the 2-element marker: no fp8 activations
    assert "8 of 12 blocks kept [0, 5, 6, 7, 8, 9, 10, 11]" in info and "weights fp8_scaled (fp8_e4m3fn)" in info
    assert sigmas.tolist() == loader.LoadCheckpoint.execute("toy_bf16.safetensors").args[1].tolist()
    got, reference = _prediction(stock), _prediction(bf16)
    assert torch.equal(got, _prediction(ours))
    rel = ((got - reference).norm() / reference.norm()).item()
    assert 0 < rel < PREDICTION_TOLERANCE, rel


def test_linear_layers_are_fp8_with_a_scale_and_the_file_about_half(exported):
    bf16, fp8 = _tensors(exported / "toy_bf16.safetensors"), _tensors(exported / "toy_fp8.safetensors")
    linear = {k[: -len(".weight")] for k, (_, shape) in bf16.items() if k.endswith(".weight") and len(shape) == 2}
    quantized = {f"{m}.{leaf}" for m in linear for leaf in ("weight", "bias")}  # ComfyUI holds both in fp8
    assert {k for k, (dtype, _) in fp8.items() if dtype == "F8_E4M3"} == quantized | {"scaled_fp8"}
    assert {m: fp8[f"{m}.scale_weight"] for m in linear} == {m: ("F32", []) for m in linear}
    assert all(fp8[k] == v for k, v in bf16.items() if k not in quantized)  # norms, modulation, patch: bf16
    assert _metadata(exported / "toy_fp8.safetensors") == _metadata(exported / "toy_bf16.safetensors")
    ratio = (exported / "toy_fp8.safetensors").stat().st_size / (exported / "toy_bf16.safetensors").stat().st_size
    assert ratio < 0.55, ratio  # block weights halve exactly (1 byte instead of 2); the rest is a few percent


def test_bad_input_is_refused_before_any_file_is_written(tmp_path, capsys):
    model, meta = load_wan(TOY)
    with torch.no_grad():
        model.blocks[3].ffn.net[2].weight[0, 0] = float("nan")
    source = save_checkpoint(tmp_path / "in" / "nan.safetensors", model, meta)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match=r"blocks\.3\.ffn\.net\.2\.weight holds NaN"):
        _convert(source, out / "nan_fp8.safetensors")
    with pytest.raises(CheckpointError, match="unknown dtype 'fp4'"):
        save_checkpoint(out / "fp4.safetensors", model, meta, dtype="fp4")
    with pytest.raises(SystemExit) as usage:
        _convert(TOY, out / "fp4.safetensors", dtype="fp4")
    assert usage.value.code == 2
    assert "export.dtype must be one of bfloat16, float16, float32, fp8_scaled" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    from train import export_adapter

    with pytest.raises(SystemExit, match="an adapter's deltas are stored in bfloat16, float16, float32"):
        export_adapter.main(["-c", str(TOY.parents[2] / "configs" / "toy.yaml"), "--rank", "4",
                             "--set", "export.dtype=fp8_scaled", "--set", f"run.run_dir={out}"])
    assert list(out.iterdir()) == []
