"""Trainable tests of the training math (fastlightgen.distill, fastlightgen.lora) and the config, on tiny models."""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

from fastlightgen.adapters import adapt
from fastlightgen.branches import Branch, run_branches
from fastlightgen.distill import (
    backward_simulation,
    dmd_generator_loss,
    sample_skip,
    stage2_loss,
    teacher_scores,
)
from fastlightgen.guidance import mix_velocities
from fastlightgen.lora import add_lora, lora_enabled, lora_parameters, lora_state_dict
from fastlightgen.sampling import FEW_STEP, predict_x0, sample_few_step
from fastlightgen.toy.teacher import null_like
from train.config import load_config
from train.loop.identity import identity_diff, run_identity
from train.distributed.processes import step_generator
from train.loop.run import learning_rate
from train.models.loading import load_teacher, model_class, teacher_config


@pytest.fixture
def wan():
    model = tiny_wan("ti2v", layers=6)
    x, cond = wan_inputs(model)
    return adapt(model), x, torch.tensor([0.3, 0.7]), cond


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage3:\n  beta1: 2.0\nrun:\n  seed: 3\n")
    cfg = load_config(str(path), ["stage3.lr=1e-6", "stage1.protected=[0, 1]", "dist.bf16=true",
                                  "dist.deepspeed=true"])
    assert (cfg.stage3.beta1, cfg.stage3.lr, cfg.run.seed, cfg.stage1.protected, cfg.dist.bf16) == \
        (2.0, 1e-6, 3, [0, 1], True)
    with pytest.raises(ValueError, match="stage3.betaa"):
        load_config(None, ["stage3.betaa=1"])
    with pytest.raises(ValueError, match="must be a int"):
        load_config(None, ["run.seed=abc"])
    with pytest.raises(ValueError, match="stage2.sigma_law must be one of logit_normal, uniform, got 'normal'"):
        load_config(None, ["stage2.sigma_law=normal"])
    with pytest.raises(ValueError, match="stage3.plan_teacher must be one of pruned, unpruned"):
        load_config(None, ["stage3.plan_teacher=strong"])


def test_learning_rate_warms_up_then_holds_or_falls_to_zero_by_cosine():
    assert [learning_rate(1.0, i, 4) for i in (0, 3, 9)] == [0.25, 1.0, 1.0]
    cosine = [learning_rate(1.0, i, 4, "cosine", 14) for i in (0, 4, 9, 13)]
    assert cosine[:2] == [0.25, 1.0]
    assert cosine[2] == pytest.approx(0.5)
    assert 0 < cosine[3] < 0.03


def test_a_cycled_schedule_restarts_every_cycle_and_does_not_depend_on_the_run_length(tmp_path):
    one_cycle = [learning_rate(1.0, i, 4, "cosine", 14) for i in range(14)]
    assert [learning_rate(1.0, i, 4, "cosine", 28, cycle=14) for i in range(28)] == one_cycle * 2
    path = tmp_path / "c.yaml"
    path.write_text("toy_teacher: {iterations: 100, lr_decay: cosine, lr_cycle: 50}\n")
    short, longer = load_config(str(path), []), load_config(str(path), ["toy_teacher.iterations=150"])
    assert run_identity(short, "toy_teacher", 1) == run_identity(longer, "toy_teacher", 1)
    assert run_identity(short, "toy_teacher", 1, whole_run=True) != \
        run_identity(longer, "toy_teacher", 1, whole_run=True)


def test_a_cosine_run_cannot_be_resumed_at_another_length(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage2: {iterations: 100}\n")
    short, longer = load_config(str(path), []), load_config(str(path), ["stage2.iterations=200"])
    assert run_identity(short, "stage2", 1) == run_identity(longer, "stage2", 1)
    short.stage2.lr_decay = longer.stage2.lr_decay = "cosine"
    assert identity_diff(run_identity(short, "stage2", 1), run_identity(longer, "stage2", 1)) == \
        ["stage2.iterations: 100 != 200"]


def test_run_branches_equal_separate_passes_and_only_grad_branches_record(wan):
    adapter, x, sigma, cond = wan
    skip = frozenset({2, 4})
    adapter.block_evaluations = 0
    v_p, v_u = run_branches(adapter, x, sigma, cond, [Branch(skip, grad=True), Branch(frozenset())])
    assert adapter.block_evaluations == 2 + 2 + 4  # prefix 0-1, pruned 3,5, unpruned 2-5
    with torch.no_grad():
        torch.testing.assert_close(v_p, adapter.forward(x, sigma, cond, skip=skip))
        torch.testing.assert_close(v_u, adapter.forward(x, sigma, cond))
    assert v_p.requires_grad and not v_u.requires_grad


def test_run_branches_tree_runs_each_shared_block_once_and_cuts_rows(wan):
    """Branches parting at different blocks (Stage I's N + 1 passes and more) and a branch on fewer rows: each equals
    its own pass, and a block runs once for every group of branches that reach it from the same state."""
    adapter, x, sigma, cond = wan
    n = adapter.num_blocks
    branches = [Branch(), Branch(frozenset({1})), Branch(frozenset({1, 3})), Branch(frozenset({4}), rows=1)]
    adapter.block_evaluations = 0
    with torch.no_grad():
        outs = run_branches(adapter, x, sigma, cond, branches)
        counted = adapter.block_evaluations
        for branch, out in zip(branches, outs):
            want = adapter.forward(x, sigma, cond, skip=branch.skip)
            torch.testing.assert_close(out, want if branch.rows is None else want[:branch.rows])
    # block 0 for all; the two skipping 1 share block 2, then 3-5 for one and 4-5 for the other; the other two share
    # 1-3, then 5 for the one skipping 4 and 4-5 for the full pass
    assert counted == 1 + (1 + 3 + 2) + (3 + 1 + 2)
    assert outs[3].shape[0] == 1


def test_stage2_loss_alpha_one_distills_pruned_path_only(wan):
    adapter, x, sigma, cond = wan
    target = torch.randn_like(x)
    loss, parts = stage2_loss(adapter, x, sigma, cond, target, frozenset({3}), 1.0, True)
    loss.backward()
    grads = {n: p.grad for n, p in adapter.model.named_parameters()}
    assert set(parts) == {"distill"} and loss.item() > 0
    assert grads["blocks.3.ffn.net.2.weight"] is None  # skipped in the pruned path, unpruned path has no grad
    assert grads["blocks.4.ffn.net.2.weight"].abs().sum() > 0
    adapter.model.zero_grad()
    loss, parts = stage2_loss(adapter, x, sigma, cond, target, frozenset({3}), 0.5, True)
    loss.backward()
    assert set(parts) == {"distill", "fm_pruned", "fm_unpruned"}
    assert adapter.model.blocks[3].ffn.net[2].weight.grad.abs().sum() > 0
    expected = 0.5 * parts["distill"] + 0.5 * (parts["fm_pruned"] + parts["fm_unpruned"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sample_skip_is_seeded_and_bernoulli():
    draws = [sample_skip(range(10), 0.5, step_generator(0, "skip", s, None)) for s in range(400)]
    assert draws[7] == sample_skip(range(10), 0.5, step_generator(0, "skip", 7, None))
    assert 0.45 < sum(len(d) for d in draws) / 4000 < 0.55
    assert sample_skip(range(5), 1.0, step_generator(0, "s", 0, 0)) == frozenset(range(5))
    assert step_generator(0, "x", 1, 0).initial_seed() != step_generator(0, "x", 1, 1).initial_seed()


def test_lora_switch_shares_base_weights(wan):
    adapter, x, sigma, cond = wan
    with torch.no_grad():
        before = adapter.forward(x, sigma, cond)
    keys = set(adapter.model.state_dict())
    layers = add_lora(adapter.blocks()[3:], rank=4, alpha=4.0)
    assert keys <= set(adapter.model.state_dict()) and len(lora_state_dict(adapter.model)) == 2 * len(layers)
    with torch.no_grad():
        for p in lora_parameters(adapter.model):
            p.add_(0.1 * torch.randn_like(p))
        off = adapter.forward(x, sigma, cond)
        with lora_enabled(adapter.model):
            on = adapter.forward(x, sigma, cond)
    torch.testing.assert_close(off, before)
    assert (on - off).abs().max() > 1e-4


def test_teacher_scores_equal_eq9_and_lora_on_pruned_path(wan):
    adapter, x, sigma, cond = wan
    skip = frozenset({2, 3})
    add_lora(adapter.blocks(), rank=4, alpha=4.0)  # the fake score's LoRA sits on every block
    with torch.no_grad():
        for p in lora_parameters(adapter.model):
            p.add_(0.1 * torch.randn_like(p))
        null = null_like(cond)
        v_real, v_fake = teacher_scores(adapter, adapter.model, x, sigma, cond, null, skip, 3.5, 0.25)
        with lora_enabled(adapter.model, False):
            naive = mix_velocities(adapter.forward(x, sigma, cond, skip=skip),
                                   adapter.forward(x, sigma, null, skip=skip), adapter.forward(x, sigma, cond), 3.5, 0.25)
        torch.testing.assert_close(v_real, naive, rtol=1e-5, atol=1e-5)
        with lora_enabled(adapter.model):
            torch.testing.assert_close(v_fake, adapter.forward(x, sigma, cond, skip=skip))
    with pytest.raises(ValueError, match="carries a LoRA"):  # LoRA on/off branches cannot share a LoRA prefix
        run_branches(adapter, x, sigma, cond, [Branch(skip), Branch(skip, lora=True)], adapter.model)


def test_backward_simulation_is_the_few_step_sampler(wan):
    adapter, x, _, cond = wan
    sigmas = FEW_STEP.sigmas.tolist()
    first = x[:, :, :1]

    def student(xx, s):
        return adapter.forward(xx, s, cond)
    x_last = backward_simulation(student, x, sigmas, 3, torch.Generator().manual_seed(5), first)
    with torch.no_grad():
        ours = predict_x0(student, x_last, sigmas[3], first)
    ref = sample_few_step(adapter, x, cond, generator=torch.Generator().manual_seed(5), first_frame=first)
    torch.testing.assert_close(ours, ref)


def test_dmd_generator_loss_gradient_is_normalized_score_difference():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 2, 2, generator=g).requires_grad_()
    real, fake = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    dmd_generator_loss(x0, real, fake, skip_first_frame=True).backward()
    sl = slice(1, None)
    norm = (x0[:, :, sl] - real[:, :, sl]).abs().mean(dim=(1, 2, 3, 4), keepdim=True).detach()
    expected = (fake[:, :, sl] - real[:, :, sl]) / norm / x0[:, :, sl].numel()
    torch.testing.assert_close(x0.grad[:, :, sl], expected)
    assert x0.grad[:, :, 0].abs().sum() == 0


def test_teacher_loads_from_a_diffusers_folder(tmp_path):
    """The shipped Wan configs name a diffusers folder; its fp32-kept modules need accelerate to load."""
    model = tiny_wan("t2v", layers=2)
    model.save_pretrained(str(tmp_path / "transformer"))
    loaded = load_teacher(load_config(None, ["model.family=wan", f"model.teacher={tmp_path / 'transformer'}"]))
    assert loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_teacher_config_of_a_diffusers_folder_builds_the_teacher_shapes(tmp_path):
    """--dry-run and the Stage II export read the folder's config.json, never its weights."""
    model = tiny_wan("t2v", layers=2)
    model.save_pretrained(str(tmp_path / "transformer"))
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    cfg = load_config(None, ["model.family=wan", f"model.teacher={tmp_path / 'transformer'}"])
    with torch.device("meta"):
        rebuilt = model_class("wan").from_config(teacher_config(cfg))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# ---- --dry-run memory estimate ------------------------------------------------------------------

MEMORY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "wan2.1-t2v-1.3b.yaml"


@pytest.fixture(scope="module")
def wan21_counts():
    from train.models.memory import count_params
    return count_params(load_config(str(MEMORY_CONFIG), []))


def test_activations_grow_linearly_with_batch_size_and_frames(wan21_counts):
    from train.models.memory import estimate

    def act(*sets: str) -> list[float]:
        rows = estimate(load_config(str(MEMORY_CONFIG), list(sets)), wan21_counts)
        return [rows[s]["activations"] for s in ("stage1", "stage2", "stage3")]

    by_batch = [act(f"data.batch_size={b}") for b in (1, 2, 3, 4)]
    by_frames = [act(f"preprocess.frames={4 * k + 1}") for k in (20, 21, 22, 23)]  # one latent frame per step
    for series in (by_batch, by_frames):
        for stage in range(3):
            values = [row[stage] for row in series]
            steps = [b - a for a, b in pairwise(values)]
            assert values[0] > 0 and all(s > 0 for s in steps)
            assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-9)
    assert by_batch[1] == pytest.approx([2 * a for a in by_batch[0]], rel=1e-9)


def test_activations_count_block_inputs_and_one_recomputed_block(wan21_counts):
    from train.models.memory import GIB, activations, tokens

    cfg = load_config(str(MEMORY_CONFIG), [])
    t = tokens(cfg, wan21_counts)
    assert t == 21 * (480 // 16) * (832 // 16)  # (81 - 1) / 4 + 1 latent frames, VAE stride 8 x patch 2
    d, f, n = wan21_counts.width, wan21_counts.ffn, len(wan21_counts.per_block)
    assert (d, f, n) == (1536, 8960, 30)
    full = t * (13 * d + 2 * f) * 2
    assert activations(cfg, wan21_counts)["stage2"] == pytest.approx((n * t * d * 2 + full) / GIB)


def test_host_ram_is_the_processes_and_offloaded_optimizer_of_one_node(wan21_counts):
    """Sharded loading (the default): per rank the process and 20 bytes per trained parameter / W; loading whole
    models first (dist.sharded_load false) makes the fp32 models every rank loads the larger term."""
    from train.models.memory import GIB, GPUS_PER_NODE, PROCESS_GIB, estimate

    total = wan21_counts.total
    for world in (4, 16):
        rows = estimate(load_config(str(MEMORY_CONFIG), [f"dist.world_size={world}"]), wan21_counts)
        per_node = min(world, GPUS_PER_NODE)
        assert rows["stage2"]["host_ram_per_node"] == pytest.approx(
            per_node * (PROCESS_GIB + 20 * total / world / GIB), rel=1e-12)
        assert rows["stage3"]["host_ram_per_node"] == pytest.approx(
            per_node * (PROCESS_GIB + rows["stage3"]["optimizer"] * 20 / 12))
        r = rows["stage2"]
        assert r["gpu_total"] == pytest.approx(r["parameters"] + r["gradients"] + r["gathered"] + r["activations"])
    whole = estimate(load_config(str(MEMORY_CONFIG), ["dist.sharded_load=false"]), wan21_counts)
    assert whole["stage2"]["host_ram_per_node"] == pytest.approx(GPUS_PER_NODE * (PROCESS_GIB + 4 * total / GIB))
    on_gpu = estimate(load_config(str(MEMORY_CONFIG), ["dist.offload_optimizer=false"]), wan21_counts)
    assert on_gpu["stage2"]["host_ram_per_node"] == pytest.approx(GPUS_PER_NODE * PROCESS_GIB)
    plain = estimate(load_config(str(MEMORY_CONFIG), ["dist.deepspeed=false", "dist.bf16=false"]), wan21_counts)
    assert plain["stage2"]["host_ram_per_node"] == 0.0
