"""CUDA check of the denoise step's speed flags on a small random Qwen-Image transformer (seconds, not a
benchmark): the product's `prepare_transformer` + `training_rope` with inductor compile (with and without
gradient checkpointing: the recompute must see the same RoPE function), fp8 storage, and fp8 + compile,
each compared with the eager bf16 step's loss and conditioning gradient (fp8 + compile is expected to fail:
dynamo refuses the layerwise-casting hooks under fullgraph, on the CPU dry run too; the CLI refuses the pair). Also: an all-ones mask vs None.

Run on a GPU machine from the repo root (any venv with torch + diffusers):
    python bench/check_denoise_speed_flags.py     # writes $OUT/denoise_speed_flags.json (default /tmp/out)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import import_pack  # noqa: E402

import_pack()
from qwen_identity.core.denoising.compiled_training import training_rope  # noqa: E402
from qwen_identity.core.denoising.flow_matching import (condition_with_residual, flow_matching_loss,  # noqa: E402
                                                        pack_latents)
from qwen_identity.training.denoise_pipeline import prepare_transformer  # noqa: E402

# DEVICE=cpu BACKEND=aot_eager DTYPE=float32: a dry run of this script without a GPU
DEV = torch.device(os.environ.get("DEVICE", "cuda"))
DT = getattr(torch, os.environ.get("DTYPE", "bfloat16"))
BACKEND, H = os.environ.get("BACKEND", "inductor"), 256


def transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                       attention_head_dim=128, num_attention_heads=4, joint_attention_dim=H,
                                       guidance_embeds=False, axes_dims_rope=(16, 56, 56)).to(DEV, DT)


def step(tr, mask, compiled):
    g = torch.Generator().manual_seed(1)
    x0, shapes = pack_latents(torch.randn(4, 16, 32, 32, generator=g))
    eps = torch.randn(x0.shape, generator=g)
    embeds = torch.randn(4, mask.shape[1], H, generator=g).to(DEV)
    residual = torch.full((4, 1, H), 0.05, device=DEV, requires_grad=True)
    cond = condition_with_residual(embeds, mask.to(DEV), residual, 1.0)
    with training_rope(compiled):
        for _ in range(2):  # second call: compiled code reused
            residual.grad = None
            loss = flow_matching_loss(tr, x0.to(DEV), eps.to(DEV), torch.tensor([0.2, 0.4, 0.6, 0.8], device=DEV),
                                      cond, mask.to(DEV), shapes).mean()
            loss.backward(retain_graph=True)
    return float(loss), residual.grad.float().cpu()


def main():
    out = {"gpu": torch.cuda.get_device_name(0) if DEV.type == "cuda" else str(DEV), "torch": torch.__version__,
           "backend": BACKEND, "dtype": str(DT)}
    unpadded = torch.ones(4, 12, dtype=torch.long)
    padded = unpadded.clone()
    padded[1, 8:] = 0
    ref = {}
    configs = [("eager", {}), ("eager_ckpt", {"gradient_checkpointing": True}),
               ("compile", {"compile_backend": BACKEND}),
               ("compile_ckpt", {"compile_backend": BACKEND, "gradient_checkpointing": True}),
               ("fp8", {"fp8_storage": True}), ("fp8_ckpt", {"fp8_storage": True, "gradient_checkpointing": True}),
               ("fp8_compile_ckpt", {"fp8_storage": True, "compile_backend": BACKEND, "gradient_checkpointing": True})]
    for name, kw in configs:
        for mname, mask in (("unpadded", unpadded), ("padded", padded)):
            key = f"{name}/{mname}"
            tr = None
            try:
                torch._dynamo.reset()
                tr = prepare_transformer(transformer(), DEV, DT, **kw)
                t = time.time()
                loss, grad = step(tr, mask, bool(kw.get("compile_backend")))
                rec = {"ok": True, "loss": loss, "s": round(time.time() - t, 2)}
                if name == "eager":
                    ref[mname] = (loss, grad)
                base_loss, base_grad = ref[mname]
                rec["loss_rel_diff_vs_eager"] = abs(loss - base_loss) / abs(base_loss)
                rec["grad_rel_diff_vs_eager"] = float((grad - base_grad).norm() / base_grad.norm())
            except Exception as e:  # noqa: BLE001 - the record says what failed
                rec = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-1500:]}
            out[key] = rec
            print(key, {k: v for k, v in rec.items() if k != "trace"}, flush=True)
            del tr
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    d = Path(os.environ.get("OUT", "/tmp/out"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "denoise_speed_flags.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
