"""Sequence parallelism (Ulysses, `dist.sequence_parallel`) with 2 processes on gloo (CPU).

The worker runs each model family twice on the same sample: whole in every process, then with the adapter's
tokens split over the 2 ranks (DeepSpeed's DistributedAttention around every self-attention). The predictions
and the gradients of every parameter must agree within float tolerance; the gradients of the split run are
the ranks' sum over 2 (what ZeRO's average over the ranks of a group gives, fastlightgen/sequence.py), so they
equal the whole sample's gradient only if every collective's backward is right. Stage II and III runs with
2 ranks in one group then give the single process's losses step after step, updates included.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from test_train import REPO, make_tiny_teacher, subprocess_env, train_args
from test_train_distributed import ZERO3, free_port, metrics, torchrun

pytest.importorskip("deepspeed", reason="sequence parallelism is DeepSpeed's (pip install -e .[train])")

WORKER = """
import json, os, sys
import torch
from fastlightgen.adapters import adapt
from fastlightgen.branches import Branch, run_branches
from train.config import load_config
from train.distributed.processes import init_dist
sys.path.insert(0, "tests")
from tiny_models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs

dist = init_dist(load_config(None, ["dist.deepspeed=true", "dist.sequence_parallel=2", "dist.world_size=2"]))


def cases():
    for variant in ("t2v", "i2v", "ti2v"):
        model = tiny_wan(variant, layers=3, heads=4, head_dim=8).train()
        x, cond = wan_inputs(model)
        # TI2V: per-frame sigmas (the first frame held at 0) become per-token timesteps, split with the tokens
        sigma = torch.tensor([[0.0, 0.6, 0.6], [0.3, 0.3, 0.3]]) if variant == "ti2v" else torch.tensor([0.6, 0.3])
        yield f"wan-{variant}", model, x, sigma, cond
    model = tiny_hunyuan(double=2, single=2).train()
    x, cond = hunyuan_inputs()
    yield "hunyuanvideo", model, x, torch.tensor([0.6, 0.3]), cond


def run(model, x, sigma, cond):
    # two branches from one prefix, one skipping block 1: the shared-prefix engine over the split tokens
    model.zero_grad()
    a = adapt(model)
    adapter_x = x.clone().requires_grad_(True)
    outs = run_branches(a, adapter_x, sigma, cond, [Branch(frozenset(), grad=True), Branch(frozenset({1}), grad=True)])
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads, adapter_x.grad


result = {}
for name, model, x, sigma, cond in cases():
    outs, grads, x_grad = run(model, x, sigma, cond)
    tokens = adapt(model).begin(x, sigma, cond).streams[0].shape[1]
    adapt(model).shard_sequence(dist.shards)
    local_tokens = adapt(model).begin(x, sigma, cond).streams[0].shape[1]  # any adapter of the model splits
    sp_outs, sp_grads, sp_x_grad = run(model, x, sigma, cond)
    for g in sp_grads.values():  # ZeRO averages the ranks' gradients
        torch.distributed.all_reduce(g)
        g /= 2
    torch.distributed.all_reduce(sp_x_grad)
    sp_x_grad /= 2
    floor = 1e-3 * max(g.abs().max().item() for g in grads.values())
    result[name] = {
        "out": max((a - b).abs().max().item() for a, b in zip(outs, sp_outs)),
        "scale": max(a.abs().max().item() for a in outs),
        # relative to each parameter's own gradient, floored where it is nil in exact arithmetic (a key's bias)
        "grad": max(((grads[k] - sp_grads[k]).abs().max() / grads[k].abs().max().clamp_min(floor)).item()
                    for k in grads),
        "x_grad": ((x_grad - sp_x_grad).abs().max() / x_grad.abs().max()).item(),
        "same_params": sorted(grads) == sorted(sp_grads),
        "halved": 2 * local_tokens == tokens,
    }
if dist.rank == 0:
    print("RESULT " + json.dumps(result))
dist.close()
"""


def test_split_forward_and_backward_equal_the_whole_sample(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env={**subprocess_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert sorted(result) == ["hunyuanvideo", "wan-i2v", "wan-t2v", "wan-ti2v"]
    for name, r in result.items():
        assert r["same_params"] and r["halved"], name
        assert r["out"] <= 1e-5 * max(1.0, r["scale"]), (name, r)
        assert r["grad"] < 1e-4 and r["x_grad"] < 1e-4, (name, r)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_sp"))


def test_stage1_as_one_sequence_parallel_group_scores_like_one_process(tiny, tmp_path):
    """Stage I as 2 processes in one group (each holds the whole teacher and half of each sample's tokens) writes
    the single process's scores and plan."""
    teacher, plan = tiny
    def sets(run_dir, **more):
        settings = {"model.teacher": teacher, "run.run_dir": run_dir, "stage1.samples": 2, "stage1.timesteps": 2}
        return [a for k, v in {**settings, **more}.items() for a in ("--set", f"{k}={v}")]

    subprocess.run([sys.executable, "-m", "train.stage1", *sets(tmp_path / "one")], cwd=REPO, env=subprocess_env(),
                   check=True, capture_output=True, timeout=300)
    torchrun("train.stage1", sets(tmp_path / "sp", **{"dist.deepspeed": True, "dist.sequence_parallel": 2,
                                                      "dist.world_size": 2}), timeout=300)
    one = list(csv.reader((tmp_path / "one" / "stage1" / "scores.csv").open()))
    sp = list(csv.reader((tmp_path / "sp" / "stage1" / "scores.csv").open()))
    assert [r[0] for r in one] == [r[0] for r in sp] and len(one) == 5
    for a, b in zip(one[1:], sp[1:]):
        assert float(b[1]) == pytest.approx(float(a[1]), rel=1e-4), (a, b)
    plans = [(tmp_path / run / "stage1" / "plan.json").read_text() for run in ("one", "sp")]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_stage_losses_with_a_sequence_parallel_group_equal_one_process(tiny, tmp_path, stage):
    """2 ranks in one group hold one sample between them, so every step (after updates too) repeats the single
    process's losses: same batch, same draws, and gradients averaged to the whole sample's."""
    teacher, plan = tiny
    steps = {"stage2.iterations": 3} if stage == "stage2" else {"stage3.iterations": 2, "stage3.init": "teacher"}
    single = {**ZERO3, "dist.world_size": 1, **steps}
    module = f"train.{stage}"
    torchrun(module, train_args(teacher, plan, tmp_path / "one", **single), timeout=300, processes=1)
    torchrun(module, train_args(teacher, plan, tmp_path / "sp", **ZERO3, **steps, **{"dist.sequence_parallel": 2}),
             timeout=300)
    one, sp = metrics(tmp_path / "one" / stage), metrics(tmp_path / "sp" / stage)
    keys = [k for k in one[0] if k.endswith("loss")]
    assert len(one) == len(sp) == (3 if stage == "stage2" else 2) and keys
    for a, b in zip(one, sp):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a["step"])


def test_sizes_are_checked_before_any_model_loads(tiny, tmp_path):
    from train import stage2
    from train.config import ConfigError

    teacher, plan = tiny
    with pytest.raises(ConfigError, match="dist.sequence_parallel > 1 needs dist.deepspeed"):
        _config(teacher, plan, tmp_path, deepspeed=False)
    with pytest.raises(ConfigError, match=r"dist.sequence_parallel \(3\) must divide dist.world_size \(2\)"):
        _config(teacher, plan, tmp_path, sp=3)
    # the toy teacher has 2 heads: 4 cannot split them
    with pytest.raises(ValueError, match="sequence-parallel size 4 does not divide the attention heads"):
        stage2.run(_config(teacher, plan, tmp_path, sp=4, world=4))
    assert not (tmp_path / "stage2").exists()


def _config(teacher, plan, run_dir, sp=2, world=2, deepspeed=True):
    from train.config import load_config

    args = train_args(teacher, plan, run_dir, **{"dist.deepspeed": deepspeed, "dist.sequence_parallel": sp,
                                                   "dist.world_size": world})
    return load_config(None, [a for a in args if a != "--set"])


def test_dry_run_splits_the_activations_and_names_the_smallest_size_that_fits():
    from train.config import load_config
    from train.models.memory import count_params, estimate, report, smallest_fitting_sequence_parallel

    hunyuan = load_config(str(REPO / "configs" / "hunyuanvideo.yaml"))
    counts = count_params(hunyuan)
    whole, split = estimate(hunyuan, counts), estimate(load_config(str(REPO / "configs" / "hunyuanvideo.yaml"),
                                                                  ["dist.sequence_parallel=4"]), counts)
    for stage in ("stage1", "stage2", "stage3"):
        assert split[stage]["activations"] == pytest.approx(whole[stage]["activations"] / 4)
        assert split[stage]["parameters"] == whole[stage]["parameters"]
    # 720p x 129 frames misses 80 GB by its Stage III activations; halving them fits
    assert whole["stage3"]["gpu_total"] > 74.5
    size, peak = smallest_fitting_sequence_parallel(hunyuan, counts)
    assert size == 2 and peak < 74.5
    assert "the smallest size that fits 80 GB per GPU is 2" in report(hunyuan)
    five_b = load_config(str(REPO / "configs" / "wan2.2-ti2v-5b.yaml"))
    assert smallest_fitting_sequence_parallel(five_b, count_params(five_b))[0] == 1


def test_bench_prints_per_rank_activations_side_by_side(tmp_path, capsys):
    from research.bench import sequence

    sequence.main(["--blocks", "1", "--frames", "2", "--side", "8", "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert "| rank | activations kept, whole (GiB)" in text
    records = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["rank"] for r in records) == [0, 1]
    for r in records:
        assert r["split"]["saved"] < r["whole"]["saved"]
        assert max(r["relative_difference"].values()) < 1e-4
