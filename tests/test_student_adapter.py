"""fastlightgen.student_adapter and train.export_adapter: the student as plan + low-rank deltas over the teacher.

A small random teacher (4 blocks, width 128) and a student keeping blocks 0, 2, 3 whose matrices differ from
the teacher's by rank-2 deltas and whose norms, modulation and biases get small full deltas.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from fastlightgen.adapters import adapt
from fastlightgen.student_adapter import (
    AdapterError,
    adapter_bytes,
    apply_adapter,
    delta_tensors,
    describe_ranks,
    layer_rank,
    make_adapter,
    module_delta,
    read_adapter,
    save_adapter,
)
from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher
from fastlightgen.wan_keys import diffusers_to_original

SHAPE = ToyTeacherShape(num_layers=4, num_attention_heads=1, ffn_dim=256)
KEPT = [0, 2, 3]
DELTA_RANK = 2


def make_student(teacher, seed: int = 1, size: float = 0.02):
    gen = torch.Generator().manual_seed(seed)
    student = adapt(teacher).pruned_model(KEPT)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.ndim == 2 and min(p.shape) >= 32:
                p += size * torch.randn(p.shape[0], DELTA_RANK, generator=gen) @ torch.randn(DELTA_RANK, p.shape[1],
                                                                                              generator=gen)
            else:
                p += size / 2 * torch.randn(p.shape, generator=gen)
    return student


@pytest.fixture(scope="module")
def pair():
    teacher = build_toy_teacher(SHAPE, seed=3).float()
    return teacher, make_student(teacher)


def _max_diff(a, b) -> float:
    return max((a.state_dict()[k].float() - v.float()).abs().max().item() for k, v in b.state_dict().items())


def test_full_rank_rebuilds_the_student_exactly(pair, tmp_path):
    teacher, student = pair
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        path = save_adapter(tmp_path / "a.safetensors", make_adapter(teacher, student, KEPT, dtype=dtype))
        rebuilt = apply_adapter(teacher, read_adapter(path))
        assert len(rebuilt.blocks) == len(KEPT)
        assert _max_diff(rebuilt, student) < tol


def test_low_rank_keys_are_comfyui_lora_keys_in_original_numbering(pair):
    teacher, student = pair
    adapter = make_adapter(teacher, student, KEPT, rank=DELTA_RANK, dtype=torch.float32)
    keys = adapter.tensors
    assert keys["diffusion_model.blocks.2.self_attn.q.lora_A.weight"].shape == (DELTA_RANK, 128)
    assert keys["diffusion_model.blocks.3.ffn.0.lora_B.weight"].shape == (256, DELTA_RANK)
    assert "diffusion_model.blocks.2.self_attn.q.diff_b" in keys and "diffusion_model.blocks.3.modulation.diff" in keys
    assert not any(k.startswith("diffusion_model.blocks.1.") for k in keys)
    assert _max_diff(apply_adapter(teacher, adapter), student) < 1e-4  # the deltas are rank 2: exact at rank 2


def test_energy_picks_the_rank_per_layer(pair):
    teacher, student = pair
    adapter = make_adapter(teacher, student, KEPT, energy=0.999999, dtype=torch.float32)
    assert adapter.tensors["diffusion_model.blocks.0.ffn.2.lora_A.weight"].shape[0] == DELTA_RANK
    assert layer_rank(torch.tensor([3.0, 1.0, 0.0]), 0, 0.9) == 1
    assert layer_rank(torch.tensor([3.0, 1.0, 0.0]), 0, 1.0) == 2


def _with_singular_values(singular: list[float], rows: int = 64, cols: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T


def test_the_energy_rule_keeps_the_smallest_rank_holding_the_share():
    # squared singular values 64, 16, 16, 4 of 100: the first r hold 0.64, 0.80, 0.96, 1.00
    singular = torch.tensor([8.0, 4.0, 4.0, 2.0])
    for energy, rank in ((0.5, 1), (0.64, 1), (0.65, 2), (0.8, 2), (0.9, 3), (0.96, 3), (0.97, 4), (1.0, 4)):
        assert layer_rank(singular, 0, energy) == rank, energy
    delta = _with_singular_values([8.0, 4.0, 4.0, 2.0]).float()
    for energy, rank in ((0.5, 1), (0.7, 2), (0.9, 3), (0.99, 4)):
        got = delta_tensors(delta, "m", "weight", 0, energy, torch.float32)
        assert got["m.lora_A.weight"].shape == (rank, 48) and got["m.lora_B.weight"].shape == (64, rank), energy
    # energy 1 keeps the float32 SVD's rounding-level tail too (or the whole delta): the delta itself
    rebuilt, _ = module_delta({k[2:]: v for k, v in delta_tensors(delta, "m", "weight", 0, 1.0, torch.float32).items()})
    assert (rebuilt - delta).abs().max() < 1e-5
    # capped: a full-rank delta whose kept rank would not make smaller factors is stored whole
    full = _with_singular_values([1.0] * 40, 40, 40).float()
    assert set(delta_tensors(full, "m", "weight", 0, 0.9, torch.float32)) == {"m.diff"}


def test_energy_one_rebuilds_the_student_exactly(pair, tmp_path):
    teacher, student = pair
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        path = save_adapter(tmp_path / "a.safetensors", make_adapter(teacher, student, KEPT, energy=1.0, dtype=dtype))
        assert _max_diff(apply_adapter(teacher, read_adapter(path)), student) < tol


def test_the_metadata_records_the_energy_and_each_layers_rank(pair, tmp_path):
    teacher, student = pair
    path = save_adapter(tmp_path / "a.safetensors", make_adapter(teacher, student, KEPT, energy=0.999999,
                                                                 dtype=torch.float32))
    adapter = read_adapter(path)
    meta, tensors = adapter.meta, adapter.tensors
    assert meta.energy == 0.999999 and meta.rank == 0
    assert meta.ranks["diffusion_model.blocks.0.ffn.2"] == DELTA_RANK
    lowrank = {k[:-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    assert lowrank and lowrank == {k for k, r in meta.ranks.items() if r}
    assert all(tensors[f"{k}.lora_A.weight"].shape[0] == r for k, r in meta.ranks.items() if r)
    assert all(tensors[f"{k}.diff"].ndim == 2 for k, r in meta.ranks.items() if not r)
    assert not any(k.startswith("diffusion_model.blocks.1.") for k in meta.ranks)
    assert "energy 0.999999: " in describe_ranks(meta) and f"ranks {DELTA_RANK}..{DELTA_RANK}" in describe_ranks(meta)
    fixed = make_adapter(teacher, student, KEPT, rank=4, dtype=torch.float32).meta
    assert fixed.energy is None and set(fixed.ranks.values()) <= {0, DELTA_RANK, 4}


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_a_bad_energy_is_refused_before_any_file_is_read(pair, tmp_path, energy):
    from train import export_adapter

    teacher, student = pair
    missing = {"student": tmp_path / "no_student.safetensors", "teacher": tmp_path / "no_teacher.safetensors"}
    with pytest.raises(AdapterError, match=r"energy must be a share in \(0, 1\]"):
        export_adapter.from_files(missing["student"], missing["teacher"], tmp_path / "a.safetensors", energy=energy)
    with pytest.raises(AdapterError, match=r"energy must be a share in \(0, 1\]"):
        make_adapter(teacher, student, KEPT, energy=energy)
    for where in (["--student", str(missing["student"]), "--teacher", str(missing["teacher"]), "--out",
                   str(tmp_path / "a.safetensors")], ["-c", str(tmp_path / "no_config.yaml")]):
        with pytest.raises(SystemExit, match=r"error: adapter energy must be a share in \(0, 1\]"):
            export_adapter.main([*where, "--energy", str(energy)])
    assert not (tmp_path / "a.safetensors").exists()


def test_a_rank_and_an_energy_together_are_refused(tmp_path):
    from train import export_adapter

    with pytest.raises(SystemExit, match="rank .8. or an energy .0.9., not both"):
        export_adapter.main(["-c", str(tmp_path / "no_config.yaml"), "--rank", "8", "--energy", "0.9"])


def test_file_size_formula_matches_the_file(pair):
    teacher, student = pair
    adapter = make_adapter(teacher, student, KEPT, rank=4, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_original(adapt(teacher).pruned_state_dict(KEPT)).items()}
    stored = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    assert adapter_bytes(shapes, 4) == stored


def test_a_base_of_another_shape_is_refused_naming_both(pair):
    teacher, student = pair
    adapter = make_adapter(teacher, student, KEPT, rank=4)
    other = build_toy_teacher(ToyTeacherShape(num_layers=5, num_attention_heads=1, ffn_dim=256))
    with pytest.raises(AdapterError, match="wan with 4 blocks of width 128.*wan with 5 blocks of width 128"):
        apply_adapter(other, adapter)


def test_another_checkpoint_of_the_same_shape_warns_but_fp8_of_the_teacher_passes(pair):
    teacher, student = pair
    adapter = make_adapter(teacher, student, KEPT, rank=4)
    with pytest.warns(UserWarning, match="sampled weights differ"):
        apply_adapter(build_toy_teacher(SHAPE, seed=4).float(), adapter)
    fp8 = build_toy_teacher(SHAPE, seed=3).float()
    fp8.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in teacher.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_adapter(fp8, adapter)


def test_corrupted_and_foreign_files_give_clear_errors(pair, tmp_path):
    teacher, student = pair
    good = save_adapter(tmp_path / "good.safetensors", make_adapter(teacher, student, KEPT, rank=4))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(AdapterError, match="damaged or cut short"):
        read_adapter(cut)
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 128)}, str(lora))
    with pytest.raises(AdapterError, match="not a FastLightGen student adapter"):
        read_adapter(lora)
    with pytest.raises(AdapterError, match="no such adapter file"):
        read_adapter(tmp_path / "missing.safetensors")
    adapter = read_adapter(good)
    adapter.tensors["diffusion_model.blocks.1.ffn.2.diff"] = torch.zeros(128, 256)
    stray = save_adapter(tmp_path / "stray.safetensors", adapter)
    with pytest.raises(AdapterError, match=r"blocks \[1\] that the plan drops"):
        read_adapter(stray)


def test_export_adapter_entry_point(pair, tmp_path):
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from train import export_adapter

    teacher, student = pair
    save_checkpoint(tmp_path / "t.safetensors", teacher, CheckpointMeta(4, list(range(4))))
    save_checkpoint(tmp_path / "s.safetensors", student, CheckpointMeta(4, KEPT), dtype=torch.float32)
    export_adapter.main(["--student", str(tmp_path / "s.safetensors"), "--teacher", str(tmp_path / "t.safetensors"),
                         "--rank", "2", "--dtype", "float32", "--out", str(tmp_path / "a.safetensors")])
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.meta.kept_blocks == KEPT and adapter.meta.rank == 2
    assert _max_diff(apply_adapter(teacher, adapter), student) < 1e-4
    export_adapter.main(["--student", str(tmp_path / "s.safetensors"), "--teacher", str(tmp_path / "t.safetensors"),
                         "--energy", "0.999999", "--dtype", "float32", "--out", str(tmp_path / "e.safetensors")])
    adapter = read_adapter(tmp_path / "e.safetensors")
    assert adapter.meta.energy == 0.999999 and set(adapter.meta.ranks.values()) <= {0, DELTA_RANK}
    assert _max_diff(apply_adapter(teacher, adapter), student) < 1e-4
    with pytest.raises(SystemExit, match="no FastLightGen metadata"):
        save_file({k: v.contiguous() for k, v in diffusers_to_original(student.state_dict()).items()},
                  str(tmp_path / "plain.safetensors"))
        export_adapter.main(["--student", str(tmp_path / "plain.safetensors"), "--teacher",
                             str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "b.safetensors")])
    assert not (tmp_path / "b.safetensors").exists()


def test_the_committed_toy_adapter_rebuilds_the_committed_student():
    from pathlib import Path

    from fastlightgen.checkpoint import load_wan

    models = Path(__file__).resolve().parent.parent / "models" / "fastlightgen"
    adapter_file = models.parent / "fastlightgen_adapters" / "toy_student_adapter.safetensors"
    adapter = read_adapter(adapter_file)
    teacher, _ = load_wan(models / "toy_teacher.safetensors", dtype=torch.float32)
    student, meta = load_wan(models / "toy_student.safetensors", dtype=torch.float32)
    assert adapter.meta.kept_blocks == meta.kept_blocks and adapter.meta.recommended == meta.recommended
    assert adapter.meta.energy == 0.98 and adapter_file.stat().st_size < 12 * 2**20
    rebuilt, base = apply_adapter(teacher, adapter).state_dict(), adapt(teacher).pruned_state_dict(meta.kept_blocks)
    left = sum((rebuilt[k] - v).pow(2).sum() for k, v in student.state_dict().items())
    total = sum((base[k] - v).pow(2).sum() for k, v in student.state_dict().items())
    assert left < 0.03 * total  # each low-rank layer keeps 98% of its change's squared singular values


def test_an_adapter_given_as_a_checkpoint_says_what_it_is(pair, tmp_path):
    from fastlightgen.checkpoint import CheckpointError, read_checkpoint

    teacher, student = pair
    path = save_adapter(tmp_path / "a.safetensors", make_adapter(teacher, student, KEPT, rank=4))
    with pytest.raises(CheckpointError, match="a FastLightGen student adapter, not a checkpoint"):
        read_checkpoint(path)
