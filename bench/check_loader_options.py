"""CUDA check of LoadQwenImageDiffusers' memory options and the fast switch on the tiny pipeline."""
import json, os, sys, time
import torch
from qwen_identity.tiny_models import build_tiny_models
from qwen_identity.core.generation.acceleration import speed_options
from qwen_identity.core.generation.sampling import encode_text, load_qwen_image_pipeline, sample

tiny = build_tiny_models("/tmp/tm")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
ref = None
for offload in ("none", "model_cpu_offload", "group", "sequential"):
    for fp8 in (False, True):
        key = f"{offload}{'+fp8' if fp8 else ''}"
        try:
            t = time.time()
            b = load_qwen_image_pipeline(str(tiny.qwen_image), device="cuda", dtype="bf16", offload=offload, fp8_storage=fp8)
            pos, neg = encode_text(b, "a portrait photo"), encode_text(b, "blurry")
            torch.cuda.reset_peak_memory_stats()
            img = sample(b, pos, neg, [1234, 5678], steps=3, width=64, height=64).images.float().cpu()
            if ref is None:
                ref = img
            res[key] = {"ok": bool(torch.isfinite(img).all()), "shape": list(img.shape),
                        "max_abs_vs_none": float((img - ref).abs().max()), "s": round(time.time() - t, 2)}
        except Exception as e:
            res[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        print(key, res[key], flush=True)
        del b
        torch.cuda.empty_cache()
b = load_qwen_image_pipeline(str(tiny.qwen_image), device="cuda", dtype="bf16")
pos, neg = encode_text(b, "a portrait photo"), encode_text(b, "blurry")
t = time.time()
try:
    img = sample(b, pos, neg, [1234, 5678], steps=3, width=64, height=64, **speed_options(b, True)).images.float().cpu()
    res["fast"] = {"ok": bool(torch.isfinite(img).all()), "max_abs_vs_none": float((img - ref).abs().max()),
                   "s_incl_compile": round(time.time() - t, 2), "options": speed_options(b, True)}
except Exception as e:
    res["fast"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
print("fast", res["fast"])
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "loader_options.json"), "w"), indent=1)
