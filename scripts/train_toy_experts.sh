#!/usr/bin/env bash
# The two-expert toy teacher (issue #41): models/fastlightgen/toy_teacher_{high,low}.safetensors, each a copy of
# the committed toy teacher fine-tuned by configs/toy_teacher_expert.yaml on its part of the schedule (boundary
# sigma 0.875). The two runs are independent; with PARALLEL=1 they run at once, one thread each. Resumable: run it
# again after a stop; a finished expert is kept in runs/toy_experts/<expert>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

train_expert() {
    local expert=$1 out="runs/toy_experts/$1/toy_teacher_$1.safetensors"
    [ -f "$out" ] || "$PYTHON" -m train.toy_teacher -c configs/toy_teacher_expert.yaml --resume \
        --set "toy_teacher.expert=$expert" --set "run.run_dir=runs/toy_experts/$expert" --set "toy_teacher.out=$out"
    cp "$out" "models/fastlightgen/toy_teacher_$expert.safetensors"
}

if [ "${PARALLEL:-0}" = 1 ]; then
    train_expert high & high=$!
    train_expert low & low=$!
    wait "$high"; wait "$low"  # each wait returns its run's status, so set -e stops on a failed expert
else
    train_expert high
    train_expert low
fi
