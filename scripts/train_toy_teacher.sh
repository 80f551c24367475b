#!/usr/bin/env bash
# The committed toy teacher (models/fastlightgen/toy_teacher.safetensors) by its recipe: the base teacher of
# configs/toy_teacher.yaml (skipped while models/fastlightgen/toy_teacher_base.safetensors exists; delete that file
# to retrain it, about 5 h 20 min on 2 CPU threads), then its T2V fine-tune, configs/toy_teacher_t2v.yaml in four
# pieces of 1500 steps, each continuing the previous piece's export (about 45 min each). Resumable: run it again
# after a stop; finished pieces are kept in runs/toy_t2v/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
BASE=models/fastlightgen/toy_teacher_base.safetensors

[ -f "$BASE" ] || "$PYTHON" -m train.toy_teacher -c configs/toy_teacher.yaml --resume
previous="$BASE"
for piece in 1 2 3 4; do
    out="runs/toy_t2v/$piece/toy_teacher.safetensors"
    [ -f "$out" ] || "$PYTHON" -m train.toy_teacher -c configs/toy_teacher_t2v.yaml --resume \
        --set "toy_teacher.init=$previous" --set "run.run_dir=runs/toy_t2v/$piece" --set "toy_teacher.out=$out"
    previous="$out"
done
cp "$previous" models/fastlightgen/toy_teacher.safetensors
