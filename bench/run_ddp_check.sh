#!/usr/bin/env bash
# 2-GPU check of `qwen-identity train` under accelerate launch (issue 4), tiny offline models.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device_carry/whl/*.whl || exit 1
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/qwen_identity
export PYTHONPATH=/tmp/pk:/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L; python3 -c "import torch, transformers, diffusers, accelerate; print('torch', torch.__version__, 'tf', transformers.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
W=/tmp/w; mkdir -p $W
python3 - <<'PY'
from qwen_identity.tiny_models import build_tiny_models
from qwen_identity.tiny_models.dataset import make_seed_dirs
build_tiny_models("/tmp/w/models")
make_seed_dirs("/tmp/w/data", identities=8, views=4, size=(256, 320), captions={i: f"a person number {i} with short hair" for i in range(8)})
print("built")
PY
ARGS=(--seed-dirs "/tmp/w/data/seed_*" --qwen3-vl-model /tmp/w/models/tiny-qwen3-vl --qwen-image-model /tmp/w/models/tiny-qwen-image --epochs 5 --batch-size 4 --lr 1e-2 --device cuda --dtype fp32)
echo "=== single process"; s=$(date +%s)
python3 -m qwen_identity.cli train "${ARGS[@]}" --out-dir /tmp/w/one 2>&1 | tail -8; e=$(date +%s); echo "single wall $((e - s)) s"
echo "=== accelerate launch, 2 GPUs"; s=$(date +%s)
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m qwen_identity.cli train "${ARGS[@]}" --out-dir /tmp/w/two 2>&1 | tail -12; e=$(date +%s); echo "ddp wall $((e - s)) s"
python3 - <<'PY'
import json
from safetensors.torch import load_file
a = load_file("/tmp/w/one/checkpoints/one_head.safetensors"); b = load_file("/tmp/w/two/checkpoints/two_head.safetensors")
print("max |head one - head two|:", max(float((a[k] - b[k]).abs().max()) for k in a))
for n in ("one", "two"):
    m = json.load(open(f"/tmp/w/{n}/metrics.json"))
    print(n, {k: m.get(k) for k in ("epochs", "train_loss", "val_loss", "validation_loss", "train_identities", "val_identities")})
fa = load_file("/tmp/w/one/cache/features.safetensors"); fb = load_file("/tmp/w/two/cache/features.safetensors")
print("feature cache equal:", fa.keys() == fb.keys() and all(float((fa[k]-fb[k]).abs().max()) < 1e-5 for k in fa))
PY
mkdir -p $OUT && cp /tmp/w/one/metrics.json $OUT/metrics_one.json; cp /tmp/w/two/metrics.json $OUT/metrics_two.json
