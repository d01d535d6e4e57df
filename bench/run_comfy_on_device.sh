#!/usr/bin/env bash
# One GPU call for issues 7 and 13: ComfyUI's own sampler (0.3.64, in-process; eager, and its TorchCompileModel
# in a time-limited child) against the pack's nodes as ComfyUI loads them (QwenImageSampleFromEmbeds,
# QwenImageAccelerate), bf16 and fp8_e4m3fn weights, one image / Lightning + LoRA / 3x3 grid; optionally the
# diffusers-path stages first (STAGES). Same card, same process, same inputs.
# Needs, in the git-ignored .device_carry/ (carry it): whl/ with diffusers 0.42.1, transformers 5.24.0,
# regex, torchsde, trampoline, av (ComfyUI's requirements the GPU image lacks; cp312 manylinux wheels), and
# comfyui_src.tar.xz (the ComfyUI checkout without .git, models/, tests/). Writes $OUT/results_comfy.json.
#   run(command="bash bench/run_comfy_on_device.sh", carry=[".device_carry"])
# Issue 13's accelerator call (ComfyUI figures only, ~9 min): STAGES=env,comfy BUDGET_S=540 TCM_LIMIT_S=150
# Env: COMFY_DTYPES (default,fp8_e4m3fn), TCM_LIMIT_S (TorchCompileModel's limit, 0 = skip), GRID9=0 skips the
# eager grid as 9 calls.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device_carry/whl/*.whl || exit 1
mkdir -p /tmp/comfyui && tar -xJf .device_carry/comfyui_src.tar.xz -C /tmp/comfyui || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
python3 bench/bench_qwen_image.py --stages "${STAGES:-env,stock,ours,comfy}" --comfyui-dir /tmp/comfyui \
  --ours-variants "${OURS_VARIANTS:-compiled_graphs}" --no-stock-grid \
  --comfy-dtypes "${COMFY_DTYPES:-default,fp8_e4m3fn}" --comfy-torch-compile-limit-s "${TCM_LIMIT_S:-150}" \
  $([ "${GRID9:-1}" = 0 ] && echo --no-comfy-grid-9-calls) \
  --budget-s "${BUDGET_S:-540}" --out "$OUT/results_comfy.json" 2>&1 | grep -v "it/s\]" | tail -80
