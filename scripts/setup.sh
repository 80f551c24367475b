#!/usr/bin/env bash
# Everything a fresh machine needs for FastLightGen's main job and tests. Idempotent; a second run is fast.
#   scripts/setup.sh               python packages (torch pinned) + a real ComfyUI for the node tests
#   scripts/setup.sh --with-chromium   also Debian's chromium for the browser test
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# torch is pinned explicitly: an unpinned torch lets pip fetch a newer multi-GB build.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
if ! "$PYTHON" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "${TORCH_PINS[@]}"
fi
"$PYTHON" -m pip install --quiet "${TORCH_PINS[@]}" -r "$REPO_DIR/requirements.txt" -r "$REPO_DIR/requirements-dev.txt"

bash "$REPO_DIR/scripts/install_comfyui.sh" "$@"
