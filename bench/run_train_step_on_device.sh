#!/usr/bin/env bash
# Issue 12 part 4: one GPU call measures one denoise training step of the identity head through the real-size
# Qwen-Image transformer (random bf16 weights) beside the peft LoRA anchor, in the same process
# (bench/bench_train_step.py; results in bench/RESULTS.md, section "Denoise training step").
#
#   1 GPU  (kind nvidia-h200):     run(command="bash bench/run_train_step_on_device.sh", carry=[WHEEL])
#   2 GPUs (kind nvidia-h200-x2):  run(command="NGPU=2 bash bench/run_train_step_on_device.sh", carry=[WHEEL])
# WHEEL = ".device_carry/whl/diffusers-0.42.1-py3-none-any.whl" (the image has torch, transformers, accelerate,
# peft; only diffusers travels; a carried .device_carry/whl/peft-*.whl is used only if the image's peft fails).
# 1 GPU: both resolutions, checkpointing off/on, batch 1 / largest / 80 GB, head and LoRA, eager; then the best
# 768x512 configuration compiled (head and LoRA); then the 24 GB stage. 2 GPUs: the head under accelerate launch
# (each process the whole frozen transformer, the head's gradients all-reduced), 768x512, one GPU vs two.
# Python is stopped by `timeout` before the 10-minute limit; the JSON is rewritten after every configuration,
# and the table is printed from it last either way. Results: $OUT/train_step_<N>gpu.json and .log.
# The 24 GB stage alone (~3 min): TAG=_mem24 EXTRA="--stages mem24" bash bench/run_train_step_on_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NGPU=${NGPU:-1}
LIMIT_S=${LIMIT_S:-540}          # whole python run (the command's limit is 600 s)
BUDGET_S=${BUDGET_S:-$((LIMIT_S - 70))}   # new configurations start only before this
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device_carry/whl/diffusers-*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}   # large batches fit with less fragmentation
if ! python3 -c "import peft" 2>/dev/null; then
  ls .device_carry/whl/peft-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .device_carry/whl/peft-*.whl
fi
nvidia-smi -L
python3 -c "import torch, diffusers, transformers, accelerate, peft; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', \
peft.__version__, 'gpus', torch.cuda.device_count())"
N="train_step_${NGPU}gpu${TAG:-}"   # TAG=_mem24: a rerun of one stage keeps its own file names
J="$OUT/$N.json"
if [ "$NGPU" = 1 ]; then
  timeout -k 10 "$LIMIT_S" python3 bench/bench_train_step.py --budget-s "$BUDGET_S" --out "$J" ${EXTRA:-} \
    > "$OUT/$N.log" 2>&1
else
  timeout -k 10 "$LIMIT_S" accelerate launch --multi_gpu --num_processes "$NGPU" --num_machines 1 \
    --mixed_precision no --dynamo_backend no bench/bench_train_step.py --resolutions "${RES:-768x512}" \
    --modes head --compile "${COMPILE:-768x512:best}" --budget-s "$BUDGET_S" --out "$J" ${EXTRA:-} \
    > "$OUT/$N.log" 2>&1
fi
echo "python exit code $?"
grep -E "^\[|Error|error" "$OUT/$N.log" | grep -v "should be kept in float32" | tail -45
[ -f "$J" ] && python3 bench/bench_train_step.py --report "$J"
