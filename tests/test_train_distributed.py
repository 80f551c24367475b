"""Stages II and III with 2 processes on gloo under DeepSpeed ZeRO-3 (CPU), against the plain single process.

ZeRO-3 is forced to partition every parameter (persistence threshold 0), so a parameter the adapters
read without running its module (Wan's top-level `scale_shift_table`) would be a 0-element shard unless
the wrapper gathers it. Rank 0 draws the same first batch as the single process, so the first loss
(computed before any update) must be equal.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import REPO, make_tiny_teacher, subprocess_env, train_args

from train.models.record import StageRecord

pytest.importorskip("deepspeed", reason="the distributed tests run DeepSpeed (pip install -e .[train])")

ZERO3 = {"dist.deepspeed": True, "dist.cpu_adam": False, "dist.param_persistence_threshold": 0,
         "dist.prefetch_bucket_size": 0, "dist.world_size": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], timeout: int = 240, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**subprocess_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_dist"))


def test_stage2_zero3_two_processes_matches_single_and_resumes(tiny, tmp_path):
    from fastlightgen.checkpoint import read_checkpoint
    from train import stage2
    from train.loop.run import CheckpointMismatch

    teacher, plan = tiny
    stage2.main(train_args(teacher, plan, tmp_path / "single", **{"stage2.iterations": 1}))
    ds_args = train_args(teacher, plan, tmp_path / "zero3", **ZERO3, **{"stage2.iterations": 2, "run.save_every": 1})
    torchrun("train.stage2", ds_args)
    resumed = torchrun("train.stage2", train_args(teacher, plan, tmp_path / "zero3", **ZERO3,
                                                  **{"stage2.iterations": 3, "run.save_every": 1}) + ["--resume"])
    assert "resumed stage2" in resumed.stderr and "step_0000002" in resumed.stderr

    single, zero3 = metrics(tmp_path / "single" / "stage2"), metrics(tmp_path / "zero3" / "stage2")
    assert [r["step"] for r in zero3] == [1, 2, 3]
    assert zero3[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    gathered = load_file(str(tmp_path / "zero3" / "stage2" / "model.safetensors"))
    full = read_checkpoint(teacher).state_dict
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in full.items()}

    with pytest.raises(CheckpointMismatch, match="world_size: 2 != 1"):
        stage2.main(train_args(teacher, plan, tmp_path / "zero3", **{"stage2.iterations": 4}) + ["--resume"])

    # --dry-run's disk figure for a step_* checkpoint (train/models/memory.py) against the files DeepSpeed wrote
    from train.config import load_config
    from train.models.memory import GIB, checkpoint_gib, count_params

    cfg = load_config(None, [a for a in ds_args if a != "--set"])
    step = tmp_path / "zero3" / "stage2" / "step_0000003"
    written = sum(f.stat().st_size for f in step.rglob("*.pt"))
    assert written / GIB == pytest.approx(checkpoint_gib(cfg, count_params(cfg))["stage2_step"], rel=0.1)


def test_stage2_zero3_frozen_target_partitioned_or_whole_matches_single(tiny, tmp_path):
    """stage2.target=frozen under ZeRO-3: loaded sharded (the default), the copy is read again as this rank's
    partitions and predicts through a DeepSpeed inference engine; with dist.sharded_load off it is copied before
    DeepSpeed partitions the trained weights and runs whole on each rank. Both give the same losses; with
    alpha < 1 the live unpruned path trains beside it."""
    from train import stage2

    teacher, plan = tiny
    settings = {"stage2.target": "frozen", "stage2.alpha": 0.5, "stage2.iterations": 2}
    stage2.main(train_args(teacher, plan, tmp_path / "single", **settings))
    torchrun("train.stage2", train_args(teacher, plan, tmp_path / "zero3", **ZERO3, **settings))
    torchrun("train.stage2", train_args(teacher, plan, tmp_path / "whole", **ZERO3, **settings,
                                        **{"dist.sharded_load": False}))
    single, zero3 = metrics(tmp_path / "single" / "stage2"), metrics(tmp_path / "zero3" / "stage2")
    assert [r["step"] for r in zero3] == [1, 2] and all(r["fm_unpruned"] > 0 for r in zero3)
    assert zero3[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert zero3[0]["distill"] == pytest.approx(single[0]["distill"], rel=1e-5)
    untimed = [[{k: v for k, v in r.items() if k != "s_per_step"} for r in records]
               for records in (metrics(tmp_path / "whole" / "stage2"), zero3)]
    assert untimed[0] == untimed[1]  # bit-identical: the same weights, whichever way they were loaded


def test_stage2_zero3_from_stage2_init_matches_single(tiny, tmp_path):
    """stage2.init under ZeRO-3: the weights are loaded before DeepSpeed partitions them, so both ranks start
    from the given run, not the teacher: the first loss (before any update) is the single process's from the
    same init and not the teacher's."""
    from train import stage2

    teacher, plan = tiny
    stage2.main(train_args(teacher, plan, tmp_path / "earlier", **{"stage2.lr": 1e-2, "stage2.iterations": 2}))
    settings = {"stage2.init": tmp_path / "earlier" / "stage2" / "model.safetensors", "stage2.iterations": 1}
    stage2.main(train_args(teacher, plan, tmp_path / "single", **settings))
    torchrun("train.stage2", train_args(teacher, plan, tmp_path / "zero3", **ZERO3, **settings))
    from_teacher = metrics(tmp_path / "earlier" / "stage2")[0]["loss"]  # the same first batch, the teacher's weights
    single, zero3 = metrics(tmp_path / "single" / "stage2"), metrics(tmp_path / "zero3" / "stage2")
    assert zero3[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert zero3[0]["loss"] != pytest.approx(from_teacher, rel=1e-3)
    assert StageRecord.load(tmp_path / "zero3" / "stage2").config["stage2"]["init"] == str(settings["stage2.init"])


def test_stage3_zero3_two_processes_matches_single(tiny, tmp_path):
    from train import stage2, stage3

    teacher, plan = tiny
    # gradient checkpointing: ZeRO-3 re-gathers the blocks (and the LoRA) when backward recomputes them
    settings = {"stage2.iterations": 1, "stage3.iterations": 2, "stage3.fake_updates": 1,
                "model.gradient_checkpointing": True}
    stage2.main(train_args(teacher, plan, tmp_path / "single", **settings))
    stage3.main(train_args(teacher, plan, tmp_path / "single", **settings))
    init = tmp_path / "single" / "stage2" / "model.safetensors"
    torchrun("train.stage3", train_args(teacher, plan, tmp_path / "zero3", **ZERO3, **settings,
                                        **{"stage3.init": init}))

    single, zero3 = metrics(tmp_path / "single" / "stage3"), metrics(tmp_path / "zero3" / "stage3")
    assert [r["step"] for r in zero3] == [1, 2]
    assert zero3[0]["fake_loss"] == pytest.approx(single[0]["fake_loss"], rel=1e-5)
    student = load_file(str(tmp_path / "zero3" / "stage3" / "model.safetensors"))
    assert sum(k.startswith("blocks.") and k.endswith("ffn.net.2.weight") for k in student) == 2


def test_gpu_bench_runs_the_real_stages_on_the_cpu(tmp_path):
    """`research.bench.gpu` measures a real-sized Wan on GPUs; with DS_ACCELERATOR=cpu and a tiny arch it runs the
    same path here (sampling too), so the GPU bench cannot silently rot between the sessions that have a GPU."""
    tiny_arch = {"model.arch.num_layers": 6, "model.arch.num_attention_heads": 2, "model.arch.attention_head_dim": 8,
                 "model.arch.ffn_dim": 32, "model.arch.text_dim": 32, "preprocess.frames": 5,
                 "preprocess.height": 16, "preprocess.width": 16, "dist.cpu_adam": False, "dist.bf16": False}
    sets = [a for k, v in tiny_arch.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "research.bench.gpu", "--gpus", "1", "--steps", "2", "--work",
                           str(tmp_path), "--json", str(tmp_path / "bench.json"), *sets], cwd=REPO,
                          env={**subprocess_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["dropped_blocks"] == [2, 3]  # the middle third of 6 blocks at keep ratio 0.7
    sampling = result["sampling"]
    assert sampling["teacher_s_per_video"] > 0 and sampling["student_s_per_video"] > 0
    assert sampling["block_evaluation_ratio"] == 50 * 2 * 6 / (4 * 4)
    for stage in ("stage2", "stage3"):
        row = result["stages"][stage]
        assert row["steps"] == 2 and row["s_per_step"] > 0 and row["gpu_peak_gib"] is None
        assert row["estimated_resident_gib"] > 0
    assert [line.split()[0] for line in proc.stdout.splitlines() if "|" in line][-2:] == ["stage2", "stage3"]


GUARDED_WORKER = """
import math, os, sys
from train import stage2

real_loss, real_rate, calls = stage2.stage2_loss, stage2.learning_rate, []


def loss(adapter, *args):  # from the second step, an infinite gradient behind a finite loss on rank 1 only
    value, parts = real_loss(adapter, *args)
    calls.append(1)
    if os.environ["GUARD"] == "gradient" and len(calls) == 2 and os.environ["RANK"] == "1":
        table = adapter.model.scale_shift_table  # the root's own weight: gathered for the whole call
        value = value + (table - table.detach()).sqrt().sum()
    return value, parts


stage2.stage2_loss = loss
if os.environ["GUARD"] == "update":  # a step that overflows: every weight non-finite after it
    stage2.learning_rate = lambda base, i, *a: math.inf if i >= 1 else real_rate(base, i, *a)
stage2.main(sys.argv[1:])
"""


def test_zero3_skips_a_non_finite_gradient_on_one_rank_and_stops_on_poisoned_weights(tiny, tmp_path):
    """ZeRO-3 partitions the gradients and the fp32 master weights: each rank checks its own partitions and all
    ranks take the same branch. A rank's infinite gradient skips the step everywhere and the run goes on; an
    update that makes the weights non-finite stops both ranks before any checkpoint holds them."""
    teacher, plan = tiny
    worker = tmp_path / "worker.py"
    worker.write_text(GUARDED_WORKER)

    def launch(guard: str, run_dir: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(worker),
               *train_args(teacher, plan, run_dir, **ZERO3, **{"stage2.iterations": 3, "run.save_every": 1})]
        return subprocess.run(cmd, cwd=REPO, env={**subprocess_env(), "DS_ACCELERATOR": "cpu", "GUARD": guard},
                              capture_output=True, text=True, timeout=300)

    skipped = launch("gradient", tmp_path / "gradient")
    assert skipped.returncode == 0, skipped.stderr[-4000:]
    assert "step 1 (rank 1): non-finite model gradients (norm inf) on batch" in skipped.stderr
    assert "step 2 " not in skipped.stderr  # the skip left no gradient behind for the next backward
    records = metrics(tmp_path / "gradient" / "stage2")
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["skipped"] == 1
    weights = load_file(str(tmp_path / "gradient" / "stage2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())

    poisoned = launch("update", tmp_path / "update")
    assert poisoned.returncode != 0
    assert "step 1: the update at learning rate inf made model weights non-finite" in poisoned.stderr
    stage_dir = tmp_path / "update" / "stage2"
    assert sorted(p.name for p in stage_dir.glob("step_*")) == ["step_0000001"]
    assert not (stage_dir / "model.safetensors").exists()
