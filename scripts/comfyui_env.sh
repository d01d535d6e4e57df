#!/usr/bin/env bash
# The real-ComfyUI test environment of `./run test`, made once and reused (all under .comfyui/, ignored by git):
#   .comfyui/ComfyUI   the unmodified ComfyUI source, extracted from the vendored tarball
#   .comfyui/venv      ComfyUI's requirements + the pack's deps + pytest/playwright/comfy-cli
#                      (scripts/setup_comfyui.sh; kept apart from ./.venv so ComfyUI never changes the pack's pins)
# and Debian's chromium (browser tests) and curl when they are missing (needs root: CI runs as root; never
# `playwright install`).
#
#   scripts/comfyui_env.sh --find     print the tarball's path (nothing, exit 1, when there is none)
#   scripts/comfyui_env.sh            make or reuse the environment; prints COMFYUI_DIR and the venv's python
#
# The tarball: $QWEN_IDENTITY_COMFYUI_TARBALL, else ../shared/vendor/ComfyUI-*.tar.xz beside this checkout
# (where CI lays a read-only copy of the project's shared/; see its vendor/README.md). It is a test fixture:
# nothing of it is ever copied into the repository. Each step is redone only when its inputs change:
# extraction when the tarball's sha256 changes, the venv when the tarball, constraints.txt,
# requirements.txt, scripts/setup_comfyui.sh or the Python version change (stamps like ./run's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=.comfyui

find_tarball() {
  if [ -n "${QWEN_IDENTITY_COMFYUI_TARBALL:-}" ]; then
    [ -f "$QWEN_IDENTITY_COMFYUI_TARBALL" ] || { echo "QWEN_IDENTITY_COMFYUI_TARBALL=$QWEN_IDENTITY_COMFYUI_TARBALL: no such file" >&2; return 1; }
    echo "$QWEN_IDENTITY_COMFYUI_TARBALL"
    return 0
  fi
  local found
  found=$(ls -1 ../shared/vendor/ComfyUI-*.tar.xz 2>/dev/null | sort | tail -n 1 || true)
  [ -n "$found" ] || return 1
  echo "$(cd "$(dirname "$found")" && pwd)/$(basename "$found")"
}

if [ "${1:-}" = "--find" ]; then
  find_tarball
  exit $?
fi

log() { echo "[comfyui_env] $*" >&2; }
tarball=$(find_tarball) || { log "no ComfyUI tarball (../shared/vendor/ComfyUI-*.tar.xz or \$QWEN_IDENTITY_COMFYUI_TARBALL)"; exit 2; }
PY=${PYTHON:-python3}
mkdir -p "$WORK"

# 1. ComfyUI source
tar_sha=$(sha256sum "$tarball" | cut -c1-16)
if [ "$(cat "$WORK/ComfyUI/.extracted-from" 2>/dev/null)" != "$tar_sha" ]; then
  log "extracting $(basename "$tarball") into $WORK/ComfyUI"
  rm -rf "$WORK/ComfyUI" "$WORK/extract.tmp"
  mkdir -p "$WORK/extract.tmp"
  tar -xJf "$tarball" -C "$WORK/extract.tmp"
  [ -f "$WORK/extract.tmp/ComfyUI/main.py" ] || { log "$tarball has no ComfyUI/main.py"; exit 2; }
  echo "$tar_sha" > "$WORK/extract.tmp/ComfyUI/.extracted-from"
  mv "$WORK/extract.tmp/ComfyUI" "$WORK/ComfyUI"
  rm -rf "$WORK/extract.tmp"
fi

# 2. the ComfyUI test venv
venv_stamp=$( { echo "$tar_sha"; "$PY" -c 'import sys; print(sys.version)'; \
                cat constraints.txt requirements.txt scripts/setup_comfyui.sh; } | sha256sum | cut -c1-16)
if [ ! -x "$WORK/venv/bin/python" ] || [ "$(cat "$WORK/venv/.setup-stamp" 2>/dev/null)" != "$venv_stamp" ]; then
  log "setting up $WORK/venv (ComfyUI's requirements; a few minutes once)"
  rm -rf "$WORK/venv"
  bash scripts/setup_comfyui.sh "$WORK/ComfyUI" "$WORK/venv" 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
  echo "$venv_stamp" > "$WORK/venv/.setup-stamp"
fi

# 3. system tools the browser and README-command tests use
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ] || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${missing[@]}" >&2
  else
    log "missing ${missing[*]}: the tests that need them will fail; install with: sudo apt-get install -y ${missing[*]}"
  fi
fi

echo "COMFYUI_DIR=$ROOT/$WORK/ComfyUI"
echo "COMFYUI_PYTHON=$ROOT/$WORK/venv/bin/python"
