#!/usr/bin/env bash
# One training entry point on a SLURM cluster: 2 nodes x 8 GPUs, one torchrun per node (no ssh between nodes).
#   sbatch scripts/slurm_train.sh stage3 configs/wan2.2-ti2v-5b.yaml [--set section.key=value ...]
# Stages II and III always pass --resume, so a requeued or resubmitted job continues from its newest checkpoint
# (a fresh run_dir starts at step 0). run.run_dir must be on a filesystem every node sees.
#SBATCH --job-name=fastlightgen
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

stage=${1:?usage: sbatch scripts/slurm_train.sh preprocess|stage2|stage3 CONFIG [--set section.key=value ...]}
config=${2:?usage: sbatch scripts/slurm_train.sh preprocess|stage2|stage3 CONFIG [--set section.key=value ...]}
shift 2
gpus_per_node=8
# read every name: `| head -n 1` would end scontrol with SIGPIPE, which pipefail turns into a failed job
readarray -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
extra=()
if [[ $stage == stage2 || $stage == stage3 ]]; then
    extra=(--set "dist.world_size=$((SLURM_NNODES * gpus_per_node))" --resume)
fi

srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus_per_node" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
    -m "train.$stage" -c "$config" "$@" "${extra[@]}"
