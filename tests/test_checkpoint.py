"""The checkpoint format: round trip, ComfyUI layout, and one clear error per kind of bad file."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_wan, wan_inputs

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import CheckpointError, CheckpointMeta, load_wan, read_checkpoint, save_checkpoint
from fastlightgen.plan import PrunePlan

KEEP = [0, 2, 3, 5]


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
    assert meta.recommended.denoising_step_list == [1000, 750, 500, 250] and meta.recommended.shift == 5.0
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


def _student_meta(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


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
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: .*neither a diffusers nor an original"):
        read_checkpoint(not_wan)


def test_gap_in_block_numbering(student, tmp_path):
    _, _, path = student
    tensors = {k.replace("blocks.3.", "blocks.7."): v for k, v in load_file(str(path)).items()}
    bad = _rewrite(tmp_path / "gap.safetensors", tensors, _student_meta(path))
    with pytest.raises(CheckpointError, match=r"gap\.safetensors: .*numbered with gaps.*renumber"):
        read_checkpoint(bad)


def test_missing_tensors(student, tmp_path):
    _, _, path = student
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "blocks.1.ffn.0.weight"}
    bad = _rewrite(tmp_path / "missing.safetensors", tensors, _student_meta(path))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: missing tensors \['blocks\.1\.ffn\.net\.0"):
        read_checkpoint(bad)


def test_shape_mismatch_with_plan(student):
    _, _, path = student
    fp = adapt(tiny_wan("ti2v", layers=8)).fingerprint()
    other = PrunePlan.from_blocks(fp, [1, 2, 3])
    with pytest.raises(CheckpointError, match="shape mismatch with the prune plan: the file holds 4 blocks"):
        read_checkpoint(path, other)
