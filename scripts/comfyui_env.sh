#!/usr/bin/env bash
# The real-ComfyUI test environments of `./run test`, one per vendored ComfyUI release, made once and reused
# (all under .comfyui/, ignored by git). For a tarball NAME.tar.xz (e.g. ComfyUI-0.33.0-783545f6.tar.xz):
#   .comfyui/NAME/ComfyUI   the unmodified ComfyUI source, extracted from the tarball
#   .comfyui/NAME/venv      ComfyUI's requirements + the pack's deps + pytest/playwright/comfy-cli
#                           (scripts/setup_comfyui.sh; kept apart from ./.venv so ComfyUI never changes the pack's pins)
# and Debian's chromium (browser tests) and curl when they are missing (needs root: CI runs as root; never
# `playwright install`).
#
#   scripts/comfyui_env.sh --find       print every tarball's path, one a line, oldest ComfyUI first
#                                       (nothing, exit 1, when there is none)
#   scripts/comfyui_env.sh [TARBALL]    make or reuse the environment of TARBALL (default: the first found);
#                                       prints COMFYUI_DIR=, COMFYUI_PYTHON= and COMFYUI_VERSION= lines
#
# The tarballs: $QWEN_IDENTITY_COMFYUI_TARBALL (one path, or several separated by ':'), else every
# ../shared/vendor/ComfyUI-*.tar.xz and ../shared/vendor/*/ComfyUI-*.tar.xz beside this checkout (where CI
# lays a read-only copy of the project's shared/; see its vendor/README.md), ordered by version. They are
# test fixtures: nothing of them is ever copied into the repository. Each step is redone only when its
# inputs change: extraction when the tarball's sha256 changes, the venv when the tarball, constraints.txt,
# requirements.txt, scripts/setup_comfyui.sh or the Python version change (stamps like ./run's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

find_tarballs() {
  local found=() t
  if [ -n "${QWEN_IDENTITY_COMFYUI_TARBALL:-}" ]; then
    IFS=: read -r -a found <<<"$QWEN_IDENTITY_COMFYUI_TARBALL"
    for t in "${found[@]}"; do
      [ -f "$t" ] || { echo "QWEN_IDENTITY_COMFYUI_TARBALL: $t: no such file" >&2; return 1; }
      echo "$(cd "$(dirname "$t")" && pwd)/$(basename "$t")"
    done
    return 0
  fi
  shopt -s nullglob
  found=(../shared/vendor/ComfyUI-[0-9]*.tar.xz ../shared/vendor/*/ComfyUI-[0-9]*.tar.xz)
  shopt -u nullglob
  [ ${#found[@]} -gt 0 ] || return 1
  # oldest release first: sort on the file name's version (ComfyUI-0.3.64-… before ComfyUI-0.33.0-…)
  for t in "${found[@]}"; do
    echo "$(basename "$t")	$(cd "$(dirname "$t")" && pwd)/$(basename "$t")"
  done | sort -t '	' -k1,1V | cut -f2
}

if [ "${1:-}" = "--find" ]; then
  find_tarballs
  exit $?
fi

log() { echo "[comfyui_env] $*" >&2; }
if [ -n "${1:-}" ]; then
  tarball=$1
  [ -f "$tarball" ] || { log "$tarball: no such file"; exit 2; }
else
  tarball=$(find_tarballs | head -n 1) && [ -n "$tarball" ] || {
    log "no ComfyUI tarball (../shared/vendor/ComfyUI-*.tar.xz, ../shared/vendor/*/ComfyUI-*.tar.xz or \$QWEN_IDENTITY_COMFYUI_TARBALL)"
    exit 2; }
fi
name=$(basename "$tarball")
name=${name%.tar.xz}
WORK=.comfyui/$name
PY=${PYTHON:-python3}
mkdir -p "$WORK"

# 1. ComfyUI source
tar_sha=$(sha256sum "$tarball" | cut -c1-16)
if [ "$(cat "$WORK/ComfyUI/.extracted-from" 2>/dev/null)" != "$tar_sha" ]; then
  log "extracting $name.tar.xz into $WORK/ComfyUI"
  rm -rf "$WORK/ComfyUI" "$WORK/extract.tmp"
  mkdir -p "$WORK/extract.tmp"
  tar -xJf "$tarball" -C "$WORK/extract.tmp"
  [ -f "$WORK/extract.tmp/ComfyUI/main.py" ] || { log "$tarball has no ComfyUI/main.py"; exit 2; }
  echo "$tar_sha" > "$WORK/extract.tmp/ComfyUI/.extracted-from"
  mv "$WORK/extract.tmp/ComfyUI" "$WORK/ComfyUI"
  rm -rf "$WORK/extract.tmp"
fi

# 2. the ComfyUI test venv, layered on the pack's venv when $QWEN_IDENTITY_BASE_VENV names one (./run test does:
#    torch and the other shared pins are then installed once; scripts/setup_comfyui.sh says how)
base=${QWEN_IDENTITY_BASE_VENV:-}
if [ -n "$base" ] && [ ! -x "$base/bin/python" ]; then
  log "QWEN_IDENTITY_BASE_VENV=$base is not a venv; making a standalone one"
  base=
fi
[ -z "$base" ] || base=$(cd "$base" && pwd)
venv_stamp=$( { echo "$tar_sha"; "$PY" -c 'import sys; print(sys.version)'; \
                cat constraints.txt requirements.txt scripts/setup_comfyui.sh; \
                echo "base=$base"; [ -z "$base" ] || cat "$base/.setup-stamp" 2>/dev/null; } | sha256sum | cut -c1-16)
if [ ! -x "$WORK/venv/bin/python" ] || [ "$(cat "$WORK/venv/.setup-stamp" 2>/dev/null)" != "$venv_stamp" ]; then
  log "setting up $WORK/venv (ComfyUI's requirements; a few minutes once)"
  rm -rf "$WORK/venv"
  set +e
  bash scripts/setup_comfyui.sh "$WORK/ComfyUI" "$WORK/venv" ${base:+"$base"} 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || { log "scripts/setup_comfyui.sh failed for $name (exit $rc)"; exit 1; }
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
echo "COMFYUI_VERSION=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$WORK/ComfyUI/comfyui_version.py")"
