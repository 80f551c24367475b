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

import pytest
from safetensors.torch import load_file
from test_train import REPO, make_tiny_teacher, subprocess_env, train_args

pytest.importorskip("deepspeed", reason="the distributed tests run DeepSpeed (pip install -e .[train])")

ZERO3 = {"dist.deepspeed": True, "dist.cpu_adam": False, "dist.param_persistence_threshold": 0,
         "dist.prefetch_bucket_size": 0, "dist.world_size": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
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
    from train.loop import CheckpointMismatch

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
