"""The checkpoint format: round trip, ComfyUI layout, and one clear error per kind of bad file."""
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import comfy_weight_files, tiny_wan, wan_inputs

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import CheckpointError, CheckpointMeta, load_wan, read_checkpoint, save_checkpoint
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import FEW_STEP, Sampling

KEEP = [0, 2, 3, 5]
MODELS = Path(__file__).resolve().parent.parent / "models" / "fastlightgen"


@pytest.fixture()
def student(tmp_path):
    teacher = tiny_wan("ti2v", layers=6)
    adapter = adapt(teacher)
    plan = PrunePlan.from_blocks(adapter.fingerprint(), [1, 4])
    pruned = adapter.pruned_model(plan.kept)
    meta = CheckpointMeta(original_num_blocks=6, kept_blocks=plan.kept, head_dim=32,
                          provenance={"stage": "test"})
    path = save_checkpoint(tmp_path / "student.safetensors", pruned, meta)
    return teacher, plan, path


def test_round_trip_in_original_layout(student):
    teacher, plan, path = student
    raw = load_file(str(path))
    assert "blocks.3.self_attn.q.weight" in raw and "blocks.4.self_attn.q.weight" not in raw
    assert "head.modulation" in raw and not any(k.startswith("proj_out") for k in raw)
    model, meta = load_wan(path, plan)
    assert meta.kept_blocks == KEEP and meta.original_num_blocks == 6 and meta.provenance == {"stage": "test"}
    assert meta.recommended == FEW_STEP
    x, cond = wan_inputs(teacher)
    sigma = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(adapt(model)(x, sigma, cond), adapt(teacher)(x, sigma, cond, skip=plan.skip),
                                   rtol=1e-5, atol=1e-6)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_diffusers_layout_file_without_metadata_loads(tmp_path):
    model = tiny_wan("t2v", layers=2, heads=1, head_dim=128)  # no metadata: the Wan head width 128 applies
    path = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.meta is None and ckpt.config["num_layers"] == 2 and ckpt.config["in_channels"] == 16


def _rewrite(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def _metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_recommended_sampling_reads_back_as_itself_and_from_the_committed_files():
    teacher = CheckpointMeta(6, KEEP, recommended=Sampling(steps=50, shift=5.0, cfg_scale=2.0))
    assert CheckpointMeta.from_json(teacher.to_json()) == teacher
    old = {"cfg_scale": 2.0, "denoising_step_list": [], "shift": 5.0, "steps": 50}  # the JSON form of earlier files
    assert json.loads(teacher.to_json())["recommended"] == old
    found = {}
    for name in ("toy_teacher", "toy_student"):
        found[name] = CheckpointMeta.from_json(_metadata(MODELS / f"{name}.safetensors")["fastlightgen"]).recommended
    assert found["toy_student"] == FEW_STEP
    assert not found["toy_teacher"].is_few_step and found["toy_teacher"].steps == 50


def test_unreadable_recommended_sampling(student, tmp_path):
    _, _, path = student
    meta = json.loads(CheckpointMeta(6, KEEP).to_json())
    meta["recommended"]["cfg_scale"] = 3.0  # a few-step list with CFG
    bad = _rewrite(tmp_path / "rec.safetensors", load_file(str(path)), {"fastlightgen": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"rec\.safetensors: FastLightGen metadata is unreadable .*without CFG"):
        read_checkpoint(bad)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a safetensors file"):
        read_checkpoint(bad)


def test_truncated(student, tmp_path):
    _, _, path = student
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        read_checkpoint(cut)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="only 5 bytes"):
        read_checkpoint(tmp_path / "tiny.safetensors")
    header_len = struct.unpack("<Q", data[:8])[0]
    (tmp_path / "hdr.safetensors").write_bytes(data[: 8 + header_len // 2])
    with pytest.raises(CheckpointError, match="truncated: the header"):
        read_checkpoint(tmp_path / "hdr.safetensors")


def test_unknown_family(student, tmp_path):
    _, _, path = student
    tensors = load_file(str(path))
    meta = json.loads(CheckpointMeta(6, KEEP, family="sdxl").to_json())
    bad = _rewrite(tmp_path / "fam.safetensors", tensors, {"fastlightgen": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"fam\.safetensors: unknown model family 'sdxl'"):
        read_checkpoint(bad)
    not_wan = _rewrite(tmp_path / "unet.safetensors", {"down_blocks.0.weight": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: this is not a Wan 2.x diffusion model: its keys look like a diffusers UNet.*"
                                        r"load other models with ComfyUI's own loaders"):
        read_checkpoint(not_wan)


def test_gap_in_block_numbering(student, tmp_path):
    _, _, path = student
    tensors = {k.replace("blocks.3.", "blocks.7."): v for k, v in load_file(str(path)).items()}
    bad = _rewrite(tmp_path / "gap.safetensors", tensors, _metadata(path))
    with pytest.raises(CheckpointError, match=r"gap\.safetensors: .*numbered with gaps.*renumber"):
        read_checkpoint(bad)


def test_missing_tensors(student, tmp_path):
    _, _, path = student
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "blocks.1.ffn.0.weight"}
    bad = _rewrite(tmp_path / "missing.safetensors", tensors, _metadata(path))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: missing tensors \['blocks\.1\.ffn\.net\.0"):
        read_checkpoint(bad)


def test_shape_mismatch_with_plan(student):
    _, _, path = student
    fp = adapt(tiny_wan("ti2v", layers=8)).fingerprint()
    other = PrunePlan.from_blocks(fp, [1, 2, 3])
    with pytest.raises(CheckpointError, match="shape mismatch with the prune plan: the file holds 4 blocks"):
        read_checkpoint(path, other)


# ---------------------------------------------------------------- ComfyUI's weight formats


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare fp8 (which torch.equal does not take) and 0-dim tensors alike, bit for bit."""
    return t.reshape(-1).view(torch.uint8)


FORMATS = {"fp16": "fp16", "bf16": "bf16", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_scaled": "fp8_scaled (fp8_e4m3fn)",
           "fp8_mixed": "fp8 mixed precision (fp8_e4m3fn)", "all_in_one_prefixed": "fp32"}


@pytest.mark.parametrize("layout", FORMATS)
def test_every_comfyui_weight_format_reads_and_dequantizes(tmp_path, layout):
    model = tiny_wan("ti2v", layers=2, heads=1, head_dim=128)
    tensors, metadata = comfy_weight_files(model)[layout]
    path = _rewrite(tmp_path / f"{layout}.safetensors", {k: v.contiguous() for k, v in tensors.items()}, metadata)
    ckpt = read_checkpoint(path)
    assert ckpt.weight_format == FORMATS[layout]
    assert ckpt.left_out == (["first_stage_model.decoder.conv_in.weight", "text_encoders.umt5xxl.shared.weight"]
                             if layout == "all_in_one_prefixed" else [])
    # ComfyUI gets the file's own tensors back, scales and marker included, under the original names
    comfy = ckpt.comfy_state_dict()
    stored = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()
              if k.startswith("model.diffusion_model.") or layout != "all_in_one_prefixed"}
    assert set(comfy) == set(stored)
    assert all(comfy[k].dtype == v.dtype and torch.equal(_bits(comfy[k]), _bits(v)) for k, v in stored.items())
    # the library dequantizes: weight = stored * scale, computed in float32
    weights = ckpt.weights(torch.float32)
    q = "blocks.1.attn2.to_k.weight"
    scale = {"fp8_scaled": "scale_weight", "fp8_mixed": "weight_scale"}.get(layout)
    expected = stored["blocks.1.cross_attn.k.weight"].float()
    if scale:
        expected = expected * stored[f"blocks.1.cross_attn.k.{scale}"]
    assert torch.equal(weights[q], expected)
    # and the model it builds stays close to the original (fp8 keeps 3 mantissa bits)
    built, _ = load_wan(path, dtype=torch.float32)
    x, cond = wan_inputs(model)
    sigma = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        ours, reference = adapt(built)(x, sigma, cond), adapt(model)(x, sigma, cond)
    tolerance = {"fp16": 1e-3, "bf16": 1e-2, "all_in_one_prefixed": 1e-6}.get(layout, 0.1)
    assert (ours - reference).abs().max() <= tolerance * reference.abs().max()
    if layout.startswith("fp8"):  # no dtype asked: fp8 weights come out in bfloat16, which diffusers can run
        assert load_wan(path)[0].blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_fp8_scales_comfyui_would_ignore_are_refused(tmp_path, monkeypatch):
    import fastlightgen.checkpoint

    model = tiny_wan("ti2v", layers=2, heads=1, head_dim=128)
    layouts = comfy_weight_files(model)
    scaled, _ = layouts["fp8_scaled"]
    no_marker = _rewrite(tmp_path / "no_marker.safetensors", {k: v for k, v in scaled.items() if k != "scaled_fp8"}, {})
    with monkeypatch.context() as m:  # refused from the header alone, before a weight is read
        m.setattr(fastlightgen.checkpoint, "load_file", lambda *a: pytest.fail("weights were read"))
        with pytest.raises(CheckpointError, match=r"no_marker\.safetensors: fp8 scales \['scale_input', "
                                                  r"'scale_weight'\] but no 'scaled_fp8' marker"):
            read_checkpoint(no_marker)
    mixed, _ = layouts["fp8_mixed"]
    no_metadata = _rewrite(tmp_path / "no_meta.safetensors", mixed, {})
    with pytest.raises(CheckpointError, match="but no '_quantization_metadata' in the header"):
        read_checkpoint(no_metadata)
    nvfp4 = _rewrite(tmp_path / "nvfp4.safetensors", mixed,
                     {"_quantization_metadata": json.dumps({"layers": {"blocks.0.ffn.0": {"format": "nvfp4"}}})})
    with pytest.raises(CheckpointError, match=r"formats \['nvfp4'\] cannot be dequantized here"):
        read_checkpoint(nvfp4)
    nan = _rewrite(tmp_path / "nan.safetensors", {**scaled, "blocks.0.ffn.0.scale_weight": torch.tensor(float("nan"))},
                   {})
    with pytest.raises(CheckpointError, match=r"fp8 scale blocks\.0\.ffn\.net\.0\.proj\.scale_weight is nan"):
        read_checkpoint(nan)
    on_a_norm = _rewrite(tmp_path / "norm.safetensors", {**scaled, "blocks.0.norm3.scale_weight": torch.tensor(1.0)},
                         {})
    with pytest.raises(CheckpointError, match="unknown key 'blocks.0.norm3.scale_weight'"):
        read_checkpoint(on_a_norm)
