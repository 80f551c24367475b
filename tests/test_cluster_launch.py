"""scripts/slurm_train.sh, the SLURM launch train/README.md gives, run with stand-ins for SLURM's commands and
torchrun: the command each node runs must be one the entry point accepts (checked with --dry-run)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from test_train import REPO, subprocess_env

STUBS = {
    "scontrol": 'printf "node-a\\nnode-b\\n"',
    # srun runs its command once per task; its own options come first
    "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
    "torchrun": 'echo "torchrun $*" >> "$LAUNCHED"',
}


def launch(tmp_path, *args: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    launched = tmp_path / "launched.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCHED": str(launched),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_train.sh"), *args], cwd=REPO, env=env, check=True,
                   timeout=60)
    return shlex.split(launched.read_text())


def test_slurm_launch_runs_the_stage_on_16_gpus_and_resumes(tmp_path):
    words = launch(tmp_path, "stage3", "configs/hunyuanvideo.yaml", "--set", "dist.sequence_parallel=2")
    assert words[:5] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"]
    assert "--rdzv_endpoint" in words and words[words.index("--rdzv_endpoint") + 1] == "node-a:29500"
    entry = words[words.index("-m") + 1:]
    assert entry[0] == "train.stage3" and entry[-1] == "--resume" and "dist.world_size=16" in entry
    # the same arguments, minus --resume, are a valid command of the entry point
    done = subprocess.run([sys.executable, "-m", *entry[:-1], "--dry-run"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world size 16" in done.stdout and "the smallest size that fits 80 GB per GPU is 2" in done.stdout


def test_slurm_launch_of_preprocessing_passes_no_training_flags(tmp_path):
    words = launch(tmp_path, "preprocess", "configs/wan2.2-ti2v-5b.yaml")
    entry = words[words.index("-m") + 1:]
    assert entry == ["train.preprocess", "-c", "configs/wan2.2-ti2v-5b.yaml"]
