#!/usr/bin/env bash
# One GPU call: bench/comfy_accel_check.py in its two modes, each in its own process, JSON written as it goes.
# The device machine receives the session's own checkout, so this branch's pack travels as a copy inside the
# git-ignored carry folder: .device_carry/accel/ = whl/ (diffusers 0.42.1, transformers 5.24.0, regex, torchsde,
# trampoline, av: cp312 manylinux wheels the GPU image lacks), comfyui_src.tar.xz (ComfyUI 0.3.64 without .git
# and tests) and pack/ (this checkout).
# Made in the session's checkout (58 MiB; remove it afterwards, other runs carry .device_carry/ too):
#   mkdir -p .device_carry/accel/pack && git -C <this worktree> archive HEAD | tar -x -C .device_carry/accel/pack
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .device_carry/accel/whl diffusers==0.42.1 transformers==5.24.0 regex torchsde trampoline av
#   (ComfyUI's tarball, minus tests/ and .git, repacked as .device_carry/accel/comfyui_src.tar.xz)
#   run(command="bash .device_carry/accel/pack/bench/run_accel_check_on_device.sh", carry=[".device_carry/accel"])
# Env: FULL_S (seconds for --mode full, default 300), CARD24_S (default 250).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
C=$(cd "$(dirname "$0")/../.." && pwd)          # .device_carry/accel
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$C"/whl/*.whl || exit 1
mkdir -p /tmp/comfyui && tar -xJf "$C/comfyui_src.tar.xz" -C /tmp/comfyui || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$C/pack" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv,noheader
FULL_S=${FULL_S:-300}; CARD24_S=${CARD24_S:-250}
timeout $((FULL_S + 15)) python3 bench/comfy_accel_check.py --mode full --comfyui-dir /tmp/comfyui \
  --out "$OUT/accel_full.json" --budget-s "$FULL_S" 2>&1 | grep -v "it/s\]" > "$OUT/accel_full_log.txt"
tail -25 "$OUT/accel_full_log.txt"
timeout $((CARD24_S + 15)) python3 bench/comfy_accel_check.py --mode card24 --comfyui-dir /tmp/comfyui \
  --out "$OUT/accel_card24.json" --budget-s "$CARD24_S" 2>&1 | grep -v "it/s\]" > "$OUT/accel_card24_log.txt"
tail -25 "$OUT/accel_card24_log.txt"
