#!/usr/bin/env bash
# One GPU call: personal identity-head tuning (`qwen-identity tune`'s tune_head loop, 200 steps, the CLI's
# defaults) through the real-size Qwen-Image transformer (random bf16 weights), first in bf16 on the whole
# card, then with --fp8-storage --gradient-checkpointing under a 24 GiB allocator cap (bench/bench_personal_tuning.py).
#
#   run(command="bash bench/run_personal_tuning_on_device.sh", carry=[".device_carry/whl"], timeout_s=300)
#
# Carry (.device_carry/whl/, ignored by git, cp312 / py3 wheels): the device image has torch 2.11, transformers
# 5.17, accelerate, peft, safetensors 0.8.0, pillow, numpy, huggingface_hub 1.33, regex, requests, tqdm, scipy,
# matplotlib (KINDS.md), which covers what `import qwen_identity` and core/tuning import; only
#   diffusers-0.42.1-py3-none-any.whl   (needs huggingface-hub>=1.32, safetensors>=0.8: the image's qualify)
# must travel. Any other *.whl put there is installed too (e.g. a newer transformers), after diffusers.
# Device time is short: the python run is stopped by `timeout` at LIMIT_S (default 250 s); no stage starts with
# less than 45 s of BUDGET_S (default LIMIT_S-40) left, and a running tune is stopped by its own should_stop
# when BUDGET_S is spent (recorded as partial, with the steps it did). Results: $OUT/personal_tuning.json, .log.
# CPU dry run (no GPU, tiny model): OUT=/tmp/pt PY=.venv/bin/python BENCH_ARGS="--tiny --device cpu --steps 6" \
#   bash bench/run_personal_tuning_on_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
LIMIT_S=${LIMIT_S:-250}
BUDGET_S=${BUDGET_S:-$((LIMIT_S - 40))}
STAGES=${STAGES:-bf16,fp8_24gb}
SITE=${SITE:-/tmp/site}
shopt -s nullglob
WHEELS=(.device_carry/whl/diffusers-*.whl)
OTHERS=()
for w in .device_carry/whl/*.whl; do [[ "$w" == .device_carry/whl/diffusers-* ]] || OTHERS+=("$w"); done
if [ ${#WHEELS[@]} -eq 0 ]; then echo "no .device_carry/whl/diffusers-*.whl: carry .device_carry/whl"; exit 2; fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "${WHEELS[@]}" "${OTHERS[@]}" || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import torch, diffusers, transformers, safetensors, PIL; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__, 'pillow', \
PIL.__version__, 'cuda', torch.cuda.is_available()); print('diffusers from', diffusers.__file__)"
J="$OUT/personal_tuning.json"
timeout -k 10 "$LIMIT_S" "$PY" bench/bench_personal_tuning.py --budget-s "$BUDGET_S" --stages "$STAGES" \
  --out "$J" ${BENCH_ARGS:-} > "$OUT/personal_tuning.log" 2>&1
echo "python exit code $?"
grep -E "^\[|^personal tuning|^  (bf16|fp8_24gb)|Error|error" "$OUT/personal_tuning.log" \
  | grep -v "should be kept in float32" | tail -40
[ -f "$J" ] && "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); keys = ('status', 'steps_done', \
'tune_head_s', 'step_s_median', 'step_s_median_all', 'eval_step_s_median', 'first_step_s', 'weights_gib', \
'peak_allocated_gib', 'peak_reserved_gib', 'fits', 'held_out_loss', 'full_run_s_estimate', 'reason'); \
print(json.dumps({k: {x: v.get(x) for x in keys if x in v} for k, v in d['stages'].items()}, indent=1)); \
print('errors', d['errors'], 'total_s', d.get('total_s'))" "$J"
