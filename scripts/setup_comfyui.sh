#!/usr/bin/env bash
# Make a ComfyUI test environment for this pack's integration suite (tests/test_comfyui_integration.py).
#
#   scripts/setup_comfyui.sh COMFYUI_DIR VENV [BASE_VENV]
#
# COMFYUI_DIR: an existing ComfyUI checkout (git clone https://github.com/Comfy-Org/ComfyUI).
# VENV:        a virtual environment to create (or reuse) for ComfyUI + the pack's test deps. It is kept
#              apart from the pack's own ./.venv so ComfyUI's requirements never change the pack's pins.
# BASE_VENV:   optional, the pack's own venv (same Python): VENV then sees its packages *behind* its own
#              (a .pth line appends BASE_VENV's site-packages to sys.path), so torch and everything else
#              both need at the same pinned version is installed once, not once per ComfyUI (about 6 GB
#              and a minute or two each). Whatever ComfyUI needs at another version is installed into VENV
#              and shadows the base copy; nothing is ever installed into or removed from BASE_VENV.
#
# Installs: torch/torchvision pinned by constraints.txt and torchaudio (below), ComfyUI's requirements.txt
# minus torch/torchvision/torchaudio, the pack's runtime deps, pytest, the Playwright *Python package*
# (the browser is the system chromium: `apt-get install -y chromium`; never `playwright install`),
# comfy-cli, matplotlib (its sample Grace Hopper photo is the real face the workflows crop), and the `gguf`
# package (city96's ComfyUI-GGUF loader needs it; the GGUF tests link that pack in only when its vendored
# copy is beside the checkout). Then the integration suite runs with
#   COMFYUI_DIR=... VENV/bin/python -m pytest tests/test_comfyui_integration.py
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 COMFYUI_DIR VENV [BASE_VENV]" >&2
  exit 2
fi
PACK=$(cd "$(dirname "$0")/.." && pwd)
COMFYUI_DIR=$(cd "$1" && pwd)
VENV=$2
BASE_VENV=${3:-}
PY=${PYTHON:-python3}
[ -f "$COMFYUI_DIR/main.py" ] && [ -f "$COMFYUI_DIR/requirements.txt" ] || {
  echo "error: $COMFYUI_DIR is not a ComfyUI checkout (no main.py/requirements.txt); clone ComfyUI there first" >&2
  exit 2
}
# torchaudio: ComfyUI 0.33+ imports it at start-up (comfy/sd.py; older releases only lose their audio nodes
# without it). No torchaudio 2.14 exists; 2.11 is built on torch's stable ABI and declares torch>=2.11
# ("including all future releases"), so it is the one that runs beside the pinned torch 2.14.1.
TORCHAUDIO="torchaudio==2.11.1"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ -n "$BASE_VENV" ]; then
  [ -x "$BASE_VENV/bin/python" ] || { echo "error: $BASE_VENV is not a venv (no bin/python)" >&2; exit 2; }
  same=$("$BASE_VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')
  [ "$same" = "$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')" ] || {
    echo "error: $BASE_VENV runs Python $same, $VENV another; make both with the same python3" >&2; exit 2; }
  base_site=$(cd "$(site_of "$BASE_VENV")" && pwd)
  echo "$base_site" > "$(site_of "$VENV")/_qwen_identity_base_venv.pth"
  echo "[setup_comfyui] packages of $BASE_VENV are seen behind this venv's own ($base_site)" >&2
fi
PIP=("$VENV/bin/python" -m pip install -q -c "$PACK/constraints.txt")
req=$(mktemp)
trap 'rm -f "$req"' EXIT
grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$COMFYUI_DIR/requirements.txt" > "$req"
echo "[setup_comfyui] torch/torchvision (pinned by constraints.txt), $TORCHAUDIO" >&2
"${PIP[@]}" torch torchvision "$TORCHAUDIO"
echo "[setup_comfyui] ComfyUI requirements (without torch/torchvision/torchaudio)" >&2
"${PIP[@]}" -r "$req"
echo "[setup_comfyui] the pack's runtime deps + test tools" >&2
"${PIP[@]}" -r "$PACK/requirements.txt" pytest hypothesis playwright comfy-cli matplotlib "gguf==0.19.0"  # matplotlib: a real face photo
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "[setup_comfyui] note: no system chromium found; browser tests will skip." \
       "Install it with: apt-get install -y chromium   (do not run 'playwright install')" >&2
fi
"$VENV/bin/python" - "$COMFYUI_DIR" <<'PY'
import sys, importlib.metadata as md
print("[setup_comfyui] ready:", "ComfyUI", open(sys.argv[1] + "/comfyui_version.py").read().split('"')[1],
      "| frontend", md.version("comfyui-frontend-package"), "| torch", md.version("torch"),
      "| torchaudio", md.version("torchaudio"),
      "| playwright", md.version("playwright"), "| comfy-cli", md.version("comfy-cli"))
PY
