#!/usr/bin/env python3
"""GPU benchmark of the Qwen identity chain against stock diffusers, with real-dimension random-weight models.

One run, one card, side by side (ratios only mean something within one run):
  env       versions, card, SDPA backends at the sampling shapes, bf16 matmul ceiling
  extract   Qwen3-VL-2B/-8B identity features at 448x448: images/s at batch 1 and 16, peak memory
  train     residual-head training steps/s on cached features (Adam)
  textenc   Qwen-Image text encoder (Qwen2.5-VL-7B): encode peak memory, offload-after-encoding cost
  forward   one transformer forward in variants (batch, padding mask, attention backend, compile, CUDA graph)
  stock     stock QwenImagePipeline: one image (s, s/step, MFU), the 3x3 α×seed grid as 9 calls and batched
  ours      the pack's sampler (core/generation/sampling.py) on the same inputs and seeds; latent agreement with stock
  inject    the cost of injecting the residual (should be noise next to a step)
  profile   torch.profiler tables of one stock step and one step of ours
  memory    24 GB configurations: model/sequential/group offload, fp8 weight storage; peak VRAM each
  comfy     (only when asked; needs --comfyui-dir) ComfyUI's own KSampler vs the pack's native path:
            one image, the grid as 9 calls and batched, peak VRAM each (bench/comfy_stage.py)

Models are built on the GPU directly with random bf16 weights (std 0.02, norms 1): speed does not
depend on the values. Prompt embeddings are random ([1, S, 3584], S=20; negative S=13), so the text
encoder is only needed in `textenc`.

  python bench/bench_qwen_image.py --out results.json            # all stages, real sizes, on cuda
  python bench/bench_qwen_image.py --tiny --device cpu --out r.json   # the same code on tiny models (CI-safe)
  python bench/bench_qwen_image.py --stages env,stock,ours ...
  python bench/bench_qwen_image.py --stages env,stock,ours,comfy --comfyui-dir /path/to/ComfyUI

Prints a JSON summary last; writes it to --out after every stage (a killed run keeps what it had).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _pack import import_pack  # noqa: E402
from _random_models import default_dtype_device, init_random_  # noqa: E402

ALL_STAGES = ["env", "extract", "train", "textenc", "forward", "stock", "profile", "ours", "inject", "memory"]

# Dense bf16 tensor-core peaks (datasheet, SXM parts); MFU is reported against these.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}

# Real dimensions (hub config.json files of Qwen/Qwen-Image and Qwen/Qwen3-VL-*-Instruct).
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=3, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
QWEN3VL = {
    "2B": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[5, 11, 17]), tie=True),
    "8B": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128),
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]), tie=False),
}
QWEN25VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN25VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])

GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------- helpers

class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.results: dict = {"config": {}, "stages": {}, "errors": {}}
        self.t0 = time.perf_counter()
        self.pack = import_pack()
        self.pipe = None
        self.inputs = None
        self.flops = None
        self.stock_latents = {}
        self.profile_tables: list[str] = []
        # sizes
        self.height, self.width = (64, 64) if self.tiny else (args.height, args.width)
        self.steps = args.steps if args.steps else (3 if self.tiny else 28)
        self.cfg = 4.5
        self.alphas = [0.5, 1.0, 1.5]
        self.seeds = [1234, 5678, 9999]
        self.txt_len, self.neg_len = (7, 5) if self.tiny else (20, 13)
        self.hidden = TINY_TRANSFORMER["joint_attention_dim"] if self.tiny else QWEN_IMAGE_TRANSFORMER["joint_attention_dim"]
        self.results["config"] = dict(tiny=self.tiny, device=str(self.device), dtype="bfloat16", height=self.height,
                                      width=self.width, steps=self.steps, true_cfg_scale=self.cfg, alphas=self.alphas,
                                      seeds=self.seeds, prompt_tokens=self.txt_len, negative_tokens=self.neg_len)

    # -- bookkeeping
    def log(self, *a):
        print(f"[{time.perf_counter() - self.t0:7.1f}s]", *a, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.args.budget_s is not None and self.elapsed() + need > self.args.budget_s

    def save(self):
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=1, default=str))
        if self.args.profile_out and self.profile_tables:
            Path(self.args.profile_out).write_text("\n\n".join(self.profile_tables))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self.allocated()

    def allocated(self) -> float:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else 0.0

    def peak(self) -> dict:
        if not self.cuda:
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2)}

    def timed(self, fn, repeat: int = 1):
        """Median wall seconds of fn() over `repeat` runs (synchronised), and the last result."""
        times, out = [], None
        for _ in range(repeat):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    def peak_flops(self):
        if not self.cuda:
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, val in PEAK_BF16.items():
            if key in name:
                return val
        return None


def describe_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]


# --------------------------------------------------------------------------------------------- builders

def build_pipeline(b: Bench):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from qwen_identity.tiny_models.qwenimage import SCHEDULER_CONFIG

    cfg = TINY_TRANSFORMER if b.tiny else QWEN_IMAGE_TRANSFORMER
    t = time.perf_counter()
    with torch.no_grad(), default_dtype_device(b.dtype, b.device):
        transformer = QwenImageTransformer2DModel(**cfg)
        if b.tiny:
            z = 4
            vae = AutoencoderKLQwenImage(base_dim=z * 6, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1,
                                         temperal_downsample=[False, True], latents_mean=[0.0] * z,
                                         latents_std=[1.0] * z)
        else:
            vae = AutoencoderKLQwenImage()
    init_random_(transformer, seed=0)
    init_random_(vae, seed=1)
    transformer.eval()
    vae.eval()
    pipe = QwenImagePipeline(transformer=transformer, vae=vae,
                             scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                             text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    b.sync()
    nparams = sum(p.numel() for p in transformer.parameters())
    b.results["config"]["transformer_params"] = nparams
    b.results["config"]["build_s"] = round(time.perf_counter() - t, 2)
    b.log(f"built transformer {nparams / 1e9:.2f}B params + VAE on {b.device} in {time.perf_counter() - t:.1f}s")
    return pipe


def make_inputs(b: Bench) -> dict:
    """Random prompt embeddings (positive S=20, negative S=13) and a residual R [1, K, H]; fixed seeds."""
    g = torch.Generator().manual_seed(42)
    pos = torch.randn(1, b.txt_len, b.hidden, generator=g).to(b.device, b.dtype)
    neg = torch.randn(1, b.neg_len, b.hidden, generator=g).to(b.device, b.dtype)
    residual = (0.5 * torch.randn(1, 4, b.hidden, generator=g)).to(b.device, b.dtype)
    return dict(pos=pos, neg=neg, pos_mask=torch.ones(1, b.txt_len, dtype=torch.long, device=b.device),
                neg_mask=torch.ones(1, b.neg_len, dtype=torch.long, device=b.device), residual=residual)


def conditioning(b: Bench, embeds: torch.Tensor) -> list:
    """ComfyUI CONDITIONING of one unpadded prompt (what the pack's text-encode node outputs)."""
    return [[embeds.detach().cpu(), {"pooled_output": None}]]


def grid_conditioning(b: Bench) -> list:
    """The α batch through the pack's own injection (InjectResidual's core call), α-major."""
    from qwen_identity.core.residual.injection import inject

    return inject(conditioning(b, b.inputs["pos"]), b.inputs["residual"].cpu(), b.alphas)


def grid_embeds(b: Bench) -> list[torch.Tensor]:
    """The 9 positive embeddings of the α×seed grid, row-major (α outer, seed inner), on the device."""
    injected = grid_conditioning(b)[0][0].to(b.device)
    return [injected[r:r + 1] for r in range(len(b.alphas)) for _ in b.seeds]


def cell_seeds(b: Bench) -> list[int]:
    return [s for _ in b.alphas for s in b.seeds]


# --------------------------------------------------------------------------------------------- stages

def stage_env(b: Bench):
    import diffusers
    import transformers

    r = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
             diffusers=diffusers.__version__, pack=b.pack.__version__,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), tiny=b.tiny)
    if b.cuda:
        p = torch.cuda.get_device_properties(b.device)
        r.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / GIB, 1), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), peak_bf16_tflops=(b.peak_flops() or 0) / 1e12)
        with contextlib.suppress(Exception):
            import subprocess
            r["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                              "--format=csv,noheader"], capture_output=True, text=True,
                                             timeout=20).stdout.strip()
        # measured ceilings: bf16 matmul on random data, device-to-device copy
        n = 8192
        a, c = torch.randn(n, n, device=b.device, dtype=b.dtype), torch.randn(n, n, device=b.device, dtype=b.dtype)
        for _ in range(3):
            a @ c
        dt, _ = b.timed(lambda: [a @ c for _ in range(10)], repeat=3)
        r["matmul_8192_bf16_tflops"] = round(2 * n ** 3 * 10 / dt / 1e12, 1)
        x = torch.empty(2 * GIB // 2, dtype=torch.bfloat16, device=b.device).normal_()
        y = torch.empty_like(x)
        y.copy_(x)
        dt, _ = b.timed(lambda: [y.copy_(x) for _ in range(5)], repeat=3)
        r["copy_tb_s"] = round(2 * x.numel() * 2 * 5 / dt / 1e12, 2)
        del a, c, x, y
        r["sdpa"] = sdpa_backends(b)
    return r


def sdpa_backends(b: Bench) -> dict:
    """Each SDPA backend at the joint-attention shape of CFG-batched sampling, with and without a padding mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    img = (b.height // 16) * (b.width // 16)
    s = b.txt_len + img
    heads, hd = (3, 16) if b.tiny else (24, 128)
    q, k, v = (torch.randn(2, heads, s, hd, device=b.device, dtype=b.dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, s, dtype=torch.bool, device=b.device)
    mask[1, :, :, b.neg_len:b.txt_len] = False
    out = {"shape": [2, heads, s, hd]}
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("default", None)]:
        for use_mask in (False, True):
            key = f"{name}{'_mask' if use_mask else ''}_ms"
            try:
                ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
                with ctx:
                    fn = lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask if use_mask else None)  # noqa: E731
                                  for _ in range(20)]
                    fn()
                    dt, _ = b.timed(fn, repeat=3)
                out[key] = round(dt / 20 * 1e3, 3)
            except Exception as e:  # a backend that refuses this input
                out[key] = describe_exc(e)
    if b.cuda:  # which kernel the default picks with a mask
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            F.scaled_dot_product_attention(q, k, v)
            b.sync()
        out["kernels_default_mask_then_nomask"] = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"][:6]
    return out


def stage_extract(b: Bench):
    """Qwen3-VL identity features at 448x448 (tiny: 64x64): processor + vision tower (+ LLM forward)."""
    from PIL import Image
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from qwen_identity.tiny_models.qwen3vl import build_config, build_processor
    from qwen_identity.tiny_models.tokenizer import build_tokenizer, special_ids

    tok = build_tokenizer()
    processor = build_processor(tok)
    ids = special_ids(tok)
    side = 64 if b.tiny else 448
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=rng, dtype=torch.uint8).numpy())
              for _ in range(16)]
    photos = [Image.fromarray(torch.randint(0, 256, (side + 64, side + 16, 3), generator=rng, dtype=torch.uint8).numpy())
              for _ in range(16)]  # not square: the pack centre-crops to 448x448
    sizes = {"tiny": None} if b.tiny else QWEN3VL
    res = {"resolution": side}
    for name, spec in sizes.items():
        if b.out_of_time(60):
            res[name] = "skipped: time budget"
            continue
        base = b.reset_peak()
        t = time.perf_counter()
        if spec is None:
            config = build_config(tok)
        else:
            config = Qwen3VLConfig(
                text_config=dict(vocab_size=151936, max_position_embeddings=262144,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                                 **spec["text"]),
                vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                   num_position_embeddings=2304, **spec["vision"]),
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                tie_word_embeddings=spec["tie"])
        config._attn_implementation = "sdpa"
        with torch.no_grad(), default_dtype_device(b.dtype, b.device):
            model = Qwen3VLForConditionalGeneration(config)
        init_random_(model, seed=3)
        model.eval()
        b.sync()
        r = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
             "build_s": round(time.perf_counter() - t, 1), "weights_gib": round(b.allocated() - base, 2)}
        for bs in (1, 16):
            batch = images[:bs]
            msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this person."}]}]
                    for _ in batch]
            texts = [processor.apply_chat_template(m, add_generation_prompt=False, tokenize=False) for m in msgs]

            def preprocess():
                return processor(images=batch, text=texts, return_tensors="pt", padding=True)

            t_pre, enc = b.timed(preprocess, repeat=3)
            enc = enc.to(b.device)
            pv, thw = enc["pixel_values"].to(b.dtype), enc["image_grid_thw"]

            def vision():
                with torch.no_grad():
                    o = model.get_image_features(pixel_values=pv, image_grid_thw=thw)
                pooled = getattr(o, "pooler_output", o)
                pooled = pooled[0] if isinstance(pooled, tuple) and not torch.is_tensor(pooled[0]) else pooled
                return torch.stack([p.float().mean(0) for p in pooled])

            def full():
                with torch.no_grad():
                    o = model(**enc, output_hidden_states=True)
                return o.hidden_states[-1]

            for fn in (vision, full):
                fn()  # warm-up
            b.reset_peak()
            t_vis, feats = b.timed(vision, repeat=3)
            pk_vis = b.peak()["peak_allocated_gib"]
            b.reset_peak()
            t_full, hs = b.timed(full, repeat=3)
            pk_full = b.peak()["peak_allocated_gib"]
            assert torch.isfinite(feats).all() and torch.isfinite(hs.float()).all(), "non-finite features"
            r[f"batch{bs}"] = dict(
                image_tokens=int((enc["input_ids"][0] == ids["<|image_pad|>"]).sum()), feature_dim=feats.shape[-1],
                preprocess_s=round(t_pre, 4), vision_s=round(t_vis, 4), llm_forward_s=round(t_full, 4),
                images_per_s_vision=round(bs / t_vis, 1), images_per_s_vision_incl_preprocess=round(bs / (t_vis + t_pre), 1),
                images_per_s_llm_hidden=round(bs / t_full, 1),
                peak_gib_vision=pk_vis, peak_gib_llm_hidden=pk_full)
            b.log(f"extract {name} batch {bs}: vision {bs / t_vis:.1f} img/s, llm {bs / t_full:.1f} img/s, "
                  f"preprocess {t_pre * 1e3:.0f} ms")
        r["pack"] = pack_extraction(b, model, processor, name, photos)
        res[name] = r
        del model
        b.reset_peak()
    return res


def pack_extraction(b: Bench, model, processor, name: str, photos) -> dict:
    """The pack's own extraction (core/features.extract_features): 16 photos, batch 1 and 16, both sources."""
    from qwen_identity.core.identity.features import FeatureSettings, extract_features
    from qwen_identity.core.identity.qwen3vl import Qwen3VLBundle

    bundle = Qwen3VLBundle(model=model, processor=processor, model_id=f"random-Qwen3-VL-{name}", device=b.device,
                           dtype=b.dtype, feature_dim=model.config.text_config.hidden_size)
    out = {}
    for source in ("merger_pooled", "llm_hidden"):
        settings = FeatureSettings(source=source)
        for bs in (1, 16):
            extract_features(bundle, photos[:bs], settings, batch_size=bs)  # warm-up
            b.reset_peak()
            dt, feats = b.timed(lambda: extract_features(bundle, photos, settings, batch_size=bs))
            out[f"{source}_batch{bs}"] = dict(images_per_s=round(len(photos) / dt, 1), s=round(dt, 3),
                                              feature_dim=feats.feature_dim, **b.peak())
            b.log(f"pack extraction {name} {source} batch {bs}: {len(photos) / dt:.1f} img/s")
    return out


def stage_train(b: Bench):
    from qwen_identity.core.residual.head import ResidualHead

    H = b.hidden if b.tiny else 3584
    res = {}
    for D in ((64,) if b.tiny else (2048, 4096)):
        for K in (1, 4):
            for bs in (2, 32):
                b.reset_peak()
                head = ResidualHead(D, K, H).to(b.device)
                opt = torch.optim.Adam(head.parameters(), lr=1e-3)
                g = torch.Generator().manual_seed(0)
                feats = torch.nn.functional.normalize(torch.randn(256, D, generator=g), dim=-1).to(b.device)
                targets = torch.randn(256, K, H, generator=g).to(b.device)

                def step(i=[0]):
                    idx = torch.arange(i[0] * bs, (i[0] + 1) * bs) % feats.shape[0]
                    i[0] += 1
                    loss = torch.nn.functional.mse_loss(head(feats[idx]), targets[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return loss

                for _ in range(5):
                    step()
                n = 20 if b.tiny else 200
                dt, loss = b.timed(lambda: [step() for _ in range(n)][-1])
                res[f"D{D}_K{K}_B{bs}"] = dict(steps_per_s=round(n / dt, 1), **b.peak(), loss=round(float(loss), 4))
    return res


def stage_textenc(b: Bench):
    """The real-size text encoder: encode the prompts, then offload it (what the 24 GB chain does)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from qwen_identity.core.generation.prompt_encoding import encode_prompts
    from qwen_identity.tiny_models.tokenizer import build_tokenizer, special_ids

    tok = build_tokenizer()
    ids = special_ids(tok)
    if b.tiny:
        from qwen_identity.tiny_models.qwenimage import build_components
        te = build_components(tok)["text_encoder"].to(b.device, b.dtype)
    else:
        config = Qwen2_5_VLConfig(text_config=dict(QWEN25VL_7B_TEXT, bos_token_id=ids["<|endoftext|>"],
                                                   eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
                                  vision_config=QWEN25VL_7B_VISION, image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        config._attn_implementation = "sdpa"
        base = b.reset_peak()
        with torch.no_grad(), default_dtype_device(b.dtype, b.device):
            te = Qwen2_5_VLForConditionalGeneration(config)
        init_random_(te, seed=4)
    te.eval()
    weights = b.allocated()
    b.reset_peak()
    prompts = ["a portrait photo of a person, studio lighting, 85mm", "blurry, low quality, deformed, watermark"]
    with torch.no_grad():
        encode_prompts(te, tok, prompts, device=b.device)
        t_enc, pe = b.timed(lambda: encode_prompts(te, tok, prompts, device=b.device), repeat=3)
    pk = b.peak()
    t_off, _ = b.timed(lambda: te.to("cpu"))
    res = dict(weights_gib=round(weights, 2), encode_two_prompts_s=round(t_enc, 4), offload_to_cpu_s=round(t_off, 2),
               allocated_after_offload_gib=round(b.allocated(), 2), embeds_shape=list(pe.embeds.shape), **pk)
    del te
    b.reset_peak()
    return res


def ensure_pipeline(b: Bench):
    if b.pipe is None:
        b.pipe = build_pipeline(b)
        b.inputs = make_inputs(b)
    return b.pipe


def forward_args(b: Bench, batch: int, padded: bool, same_len: bool = False):
    """Transformer inputs for `batch` rows: CFG layout [pos…, neg…] padded to one length (mask only if padded)."""
    i = b.inputs
    pipe = b.pipe
    lat_h, lat_w = b.height // pipe.vae_scale_factor // 2, b.width // pipe.vae_scale_factor // 2
    ch = pipe.transformer.config.in_channels
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, lat_h * lat_w, ch, generator=g).to(b.device, b.dtype)
    if batch == 1 or same_len:
        txt = i["pos"].expand(batch, -1, -1).contiguous()
        mask = None
    else:
        half = batch // 2
        neg = torch.nn.functional.pad(i["neg"], (0, 0, 0, b.txt_len - b.neg_len))
        txt = torch.cat([i["pos"].expand(half, -1, -1), neg.expand(batch - half, -1, -1)])
        mask = torch.ones(batch, b.txt_len, dtype=torch.bool, device=b.device)
        mask[half:, b.neg_len:] = False
        if not padded:
            mask = None
    return dict(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                timestep=torch.full((batch,), 0.5, device=b.device, dtype=b.dtype),
                img_shapes=[[(1, lat_h, lat_w)]] * batch, return_dict=False)


def count_flops(b: Bench, kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        b.pipe.transformer(**kwargs)
    return int(fc.get_total_flops())


def ensure_flops(b: Bench):
    """FLOPs of the useful work of one CFG step at batch 1: the positive and the negative forward."""
    if b.flops is None:
        ensure_pipeline(b)
        i = b.inputs
        kp = forward_args(b, 1, False)
        kn = dict(kp, encoder_hidden_states=i["neg"])
        b.flops = dict(forward_pos=count_flops(b, kp), forward_neg=count_flops(b, kn))
        b.flops["cfg_step"] = b.flops["forward_pos"] + b.flops["forward_neg"]
        b.flops["image"] = b.flops["cfg_step"] * b.steps
        b.results["config"]["flops"] = b.flops
        b.log(f"FLOPs: one forward {b.flops['forward_pos'] / 1e12:.2f} TFLOP, one image {b.flops['image'] / 1e12:.0f} TFLOP")
    return b.flops


def mfu(b: Bench, flops: float, seconds: float):
    peak = b.peak_flops()
    return round(flops / seconds / peak, 3) if peak else None


def stage_forward(b: Bench):
    """One transformer forward in variants: what batching, masks, backends, compile and graphs buy."""
    from diffusers.models.attention_dispatch import attention_backend

    ensure_pipeline(b)
    ensure_flops(b)
    tr = b.pipe.transformer
    reps = 2 if b.tiny else 5
    res = {}
    outs = {}

    def same_len_of(kwargs):
        return kwargs["encoder_hidden_states_mask"] is None and kwargs is not k2m

    def run(name, kwargs, backend=None, flops=None):
        if b.out_of_time(30):
            res[name] = "skipped: time budget"
            return
        try:
            ctx = attention_backend(backend) if backend else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                f = lambda: tr(**kwargs)[0]  # noqa: E731
                t = time.perf_counter()
                f()
                b.sync()
                first = time.perf_counter() - t
                f()
                b.reset_peak()
                dt, out = b.timed(f, repeat=reps)
            finite = bool(torch.isfinite(out.float()).all())
            rows = kwargs["hidden_states"].shape[0]
            res[name] = dict(ms=round(dt * 1e3, 2), ms_per_row=round(dt * 1e3 / rows, 2), first_call_s=round(first, 2),
                             finite=finite, **b.peak())
            if flops:
                res[name]["mfu"] = mfu(b, flops, dt)
            if rows == 2 and not same_len_of(kwargs):
                ref = outs.setdefault("b2", out.float().cpu())
                res[name]["max_abs_diff_vs_first_b2"] = float((out.float().cpu() - ref).abs().max())
            b.log(f"forward {name}: {dt * 1e3:.1f} ms ({dt * 1e3 / rows:.1f} ms/row)")
        except Exception as e:
            res[name] = describe_exc(e)
            b.log(f"forward {name}: FAILED {describe_exc(e)}")

    lens = [b.txt_len, b.neg_len]
    f1 = b.flops["forward_pos"]
    step = b.flops["cfg_step"]
    k1, k2m, k2s = forward_args(b, 1, False), forward_args(b, 2, True), forward_args(b, 2, False, same_len=True)
    run("eager_b1", k1, flops=f1)
    run("eager_b2_padmask", k2m, flops=step)
    run("eager_b2_samelen_nomask", k2s, flops=2 * f1)
    for be in ("_native_cudnn", "_native_efficient", "flex"):
        run(f"eager_b2_padmask_{be.strip('_')}", k2m, backend=be, flops=step)
    run("eager_b2_samelen_nomask_native_flash", k2s, backend="_native_flash", flops=2 * f1)
    with split_attention(b, lens):
        run("eager_b2_split_nomask", k2m, flops=step)
    k18 = forward_args(b, 18, True)
    run("eager_b18_padmask", k18, flops=9 * step)
    if b.cuda and not b.out_of_time(60):
        res["cudagraph_eager_b2_padmask"] = cuda_graph_forward(b, k2m, step)
    if not b.args.no_compile:
        t = time.perf_counter()
        tr.compile_repeated_blocks(fullgraph=True, dynamic=False)
        res["compile_repeated_blocks_call_s"] = round(time.perf_counter() - t, 2)
        try:
            run("compiled_b2_padmask", k2m, flops=step)
            if b.cuda and not b.out_of_time(60):
                res["cudagraph_compiled_b2_padmask"] = cuda_graph_forward(b, k2m, step)
            with split_attention(b, lens):
                run("compiled_b2_split_nomask", k2m, flops=step)
            run("compiled_b1", k1, flops=f1)
            run("compiled_b18_padmask", k18, flops=9 * step)
        finally:  # undo: later stages time stock diffusers as shipped
            uncompile(tr)
    return res


def uncompile(module: torch.nn.Module):
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    if hasattr(module, "_qwen_identity_compiled"):
        del module._qwen_identity_compiled
    torch._dynamo.reset()


@contextlib.contextmanager
def split_attention(b: Bench, lengths: list[int]):
    """Joint attention without a padding mask: rows of equal text length attend together through the
    unmasked (flash) kernel, each group over its valid text tokens + the image tokens only.

    Exact: a padded text token is never a key, and its own output is unused (zeros here). `lengths` are
    the valid text lengths of the rows, known on the host, so nothing synchronises.
    """
    import diffusers.models.transformers.transformer_qwenimage as mod

    orig = mod.dispatch_attention_fn
    txt = max(lengths)
    groups = []  # (start row, end row, valid length)
    for r, n in enumerate(lengths):
        if groups and groups[-1][2] == n:
            groups[-1][1] = r + 1
        else:
            groups.append([r, r + 1, n])

    def attend(q, k, v, attn_mask=None, **kw):
        if attn_mask is None or q.shape[0] != len(lengths):
            return orig(q, k, v, attn_mask=attn_mask, **kw)
        outs = []
        for r0, r1, n in groups:
            if n == txt:
                outs.append(orig(q[r0:r1], k[r0:r1], v[r0:r1], attn_mask=None, **kw))
                continue
            qq, kk, vv = (torch.cat([x[r0:r1, :n], x[r0:r1, txt:]], dim=1) for x in (q, k, v))
            o = orig(qq, kk, vv, attn_mask=None, **kw)
            pad = o.new_zeros(o.shape[0], txt - n, *o.shape[2:])
            outs.append(torch.cat([o[:, :n], pad, o[:, n:]], dim=1))
        return torch.cat(outs)

    mod.dispatch_attention_fn = attend
    try:
        yield
    finally:
        mod.dispatch_attention_fn = orig


def cuda_graph_forward(b: Bench, kwargs, flops):
    """Capture one (compiled-blocks) forward in a CUDA graph and time its replays."""
    tr = b.pipe.transformer
    try:
        static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(s):
            for _ in range(2):
                tr(**static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g):
            out = tr(**static)[0]
        g.replay()
        dt, _ = b.timed(lambda: g.replay(), repeat=5)
        with torch.no_grad():
            ref = tr(**static)[0]
        diff = (out.float() - ref.float()).abs().max().item()
        b.log(f"forward cudagraph: {dt * 1e3:.1f} ms")
        return dict(ms=round(dt * 1e3, 2), mfu=mfu(b, flops, dt), max_abs_diff_vs_uncaptured=diff)
    except Exception as e:
        return describe_exc(e)


def stock_call(b: Bench, embeds: list[torch.Tensor], seeds: list[int], steps: int | None = None):
    """One stock QwenImagePipeline call over len(embeds) images (a CPU generator per image, like diffusers docs)."""
    i = b.inputs
    n = len(embeds)
    pos = torch.cat(embeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return b.pipe(prompt_embeds=pos, prompt_embeds_mask=torch.ones(pos.shape[:2], dtype=torch.long, device=b.device),
                  negative_prompt_embeds=i["neg"].expand(n, -1, -1),
                  negative_prompt_embeds_mask=i["neg_mask"].expand(n, -1),
                  true_cfg_scale=b.cfg, height=b.height, width=b.width, num_inference_steps=steps or b.steps,
                  generator=gens if n > 1 else gens[0], output_type="latent").images


def stage_stock(b: Bench):
    ensure_pipeline(b)
    flops = ensure_flops(b)
    i = b.inputs
    res = {}
    stock_call(b, [i["pos"]], [b.seeds[0]], steps=2)  # warm-up (cuBLAS handles, allocator)
    b.reset_peak()
    reps = 1 if b.tiny else 2
    dt, lat = b.timed(lambda: stock_call(b, [i["pos"]], [b.seeds[0]]), repeat=reps)
    b.stock_latents["single"] = lat.float().cpu()
    res["single"] = dict(s=round(dt, 3), s_per_step=round(dt / b.steps, 4), mfu=mfu(b, flops["image"], dt),
                         repeats=reps, finite=bool(torch.isfinite(lat).all()), **b.peak())
    b.log(f"stock one image: {dt:.2f}s")
    # VAE decode of one image (same for every path)
    with torch.no_grad():
        lat5 = b.pipe._unpack_latents(lat, b.height, b.width, b.pipe.vae_scale_factor).to(b.dtype)
        b.pipe.vae.decode(lat5, return_dict=False)
        dt_vae, _ = b.timed(lambda: b.pipe.vae.decode(lat5, return_dict=False), repeat=2)
    res["vae_decode_one_image_s"] = round(dt_vae, 3)
    embeds, seeds = grid_embeds(b), cell_seeds(b)
    if b.args.no_stock_grid:
        return res
    if not b.out_of_time(120):
        b.reset_peak()
        lats = []
        t = time.perf_counter()
        for e, s in zip(embeds, seeds):
            lats.append(stock_call(b, [e], [s]))
        b.sync()
        dt = time.perf_counter() - t
        b.stock_latents["grid"] = torch.cat(lats).float().cpu()
        res["grid_9_calls"] = dict(s=round(dt, 2), mfu=mfu(b, 9 * flops["image"], dt), **b.peak())
        b.log(f"stock grid, 9 calls: {dt:.1f}s")
    if not b.out_of_time(60):
        stock_call(b, embeds, seeds, steps=2)  # warm-up at the grid's batch shape, as ours gets one
        b.reset_peak()
        dt, lat = b.timed(lambda: stock_call(b, embeds, seeds))
        b.stock_latents.setdefault("grid", lat.float().cpu())
        res["grid_batched"] = dict(s=round(dt, 2), mfu=mfu(b, 9 * flops["image"], dt), warm_up_steps=2, **b.peak())
        if "grid" in b.stock_latents:
            d = (lat.float().cpu() - b.stock_latents["grid"]).abs()
            res["grid_batched_vs_9_calls"] = dict(max_abs=float(d.max()), mean_abs=float(d.mean()))
        b.log(f"stock grid, batched: {dt:.1f}s")
    return res


def ours_call(b: Bench, grid: bool, steps: int | None = None, **speed):
    from qwen_identity.core.generation.sampling import sample

    i = b.inputs
    pos = grid_conditioning(b) if grid else conditioning(b, i["pos"])
    seeds = b.seeds if grid else [b.seeds[0]]
    res = sample(b.pipe, pos, conditioning(b, i["neg"]), seeds=seeds, steps=steps or b.steps, cfg=b.cfg,
                 width=b.width, height=b.height, max_batch=len(b.alphas) * len(b.seeds), return_latents=True,
                 decode=False, **speed)
    return res.latents


def agreement(ours: torch.Tensor, ref: torch.Tensor | None) -> dict | None:
    if ref is None:
        return None
    d = (ours.float().cpu() - ref.float().cpu()).abs()
    return dict(max_abs=float(d.max()), mean_abs=float(d.mean()), ref_mean_abs=float(ref.float().abs().mean()))


def stage_ours(b: Bench):
    """The pack's sampler (core/sampling.sample) on the same embeddings and seeds as `stock`, in variants:
    eager (cond+uncond in one forward), + CUDA graphs, + regional compile, + both."""
    ensure_pipeline(b)
    flops = ensure_flops(b)
    res = {}
    stock_single = b.results["stages"].get("stock", {}).get("single", {}).get("s") if isinstance(
        b.results["stages"].get("stock"), dict) else None
    stock9 = (b.results["stages"].get("stock") or {}).get("grid_9_calls", {}) if isinstance(
        b.results["stages"].get("stock"), dict) else {}
    stockb = (b.results["stages"].get("stock") or {}).get("grid_batched", {}) if isinstance(
        b.results["stages"].get("stock"), dict) else {}
    variants = [("eager", {}, False), ("graphs", dict(cuda_graphs=True), False),
                ("compiled", dict(compile=True), False), ("compiled_graphs", dict(compile=True, cuda_graphs=True), True)]
    if b.args.ours_grid_all:
        variants = [(n, kw, True) for n, kw, _ in variants]
    for name, speed, do_grid in variants:
        if speed.get("compile") and b.args.no_compile:
            continue
        if b.args.ours_variants and name not in b.args.ours_variants.split(","):
            continue
        if b.out_of_time(60):
            res[name] = "skipped: time budget"
            continue
        r = {}
        try:
            # warm-up: 2 steps (compiles on first use of each shape; records graphs)
            t = time.perf_counter()
            ours_call(b, False, steps=2, **speed)
            b.sync()
            r["warmup_2_steps_s"] = round(time.perf_counter() - t, 2)
            b.reset_peak()
            dt, lat = b.timed(lambda: ours_call(b, False, **speed), repeat=1 if b.tiny else 2)
            r["single"] = dict(s=round(dt, 3), s_per_step=round(dt / b.steps, 4), mfu=mfu(b, flops["image"], dt),
                               speedup_vs_stock=round(stock_single / dt, 2) if stock_single else None,
                               vs_stock_latents=agreement(lat, b.stock_latents.get("single")),
                               finite=bool(torch.isfinite(lat).all()), **b.peak())
            b.log(f"ours {name} one image: {dt:.2f}s")
            if do_grid and not b.out_of_time(60):
                t = time.perf_counter()
                ours_call(b, True, steps=2, **speed)
                b.sync()
                r["grid_warmup_2_steps_s"] = round(time.perf_counter() - t, 2)
                b.reset_peak()
                dt, lat = b.timed(lambda: ours_call(b, True, **speed))
                r["grid"] = dict(s=round(dt, 2), mfu=mfu(b, 9 * flops["image"], dt),
                                 speedup_vs_9_stock_calls=round(stock9["s"] / dt, 2) if stock9.get("s") else None,
                                 speedup_vs_batched_stock=round(stockb["s"] / dt, 2) if stockb.get("s") else None,
                                 vs_stock_latents=agreement(lat, b.stock_latents.get("grid")), **b.peak())
                b.log(f"ours {name} grid: {dt:.1f}s")
        except Exception as e:
            traceback.print_exc()
            r["error"] = describe_exc(e)
        res[name] = r
        b.save()
    if b.cuda and getattr(b.pipe.transformer, "_qwen_identity_compiled", False):
        res["profile_compiled_b2"] = profile_forward(b, "ours: one CFG step as ONE forward (batch 2, padded+masked), "
                                                       "compiled blocks", [forward_args(b, 2, True)])
    return res


def stage_inject(b: Bench):
    ensure_pipeline(b)
    i = b.inputs
    n = 200 if not b.tiny else 10
    grid_conditioning(b)
    dt, _ = b.timed(lambda: [grid_conditioning(b) for _ in range(n)])
    per_grid = dt / n
    res = dict(grid_injection_ms=round(per_grid * 1e3, 4))
    fwd = b.results["stages"].get("stock", {}).get("single", {}).get("s_per_step")
    if isinstance(fwd, (int, float)):
        res["fraction_of_one_stock_step"] = round(per_grid / fwd, 6)
    return res


def profile_forward(b: Bench, title: str, calls: list[dict]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tr = b.pipe.transformer
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with torch.no_grad():
        for kw in calls:  # warm (no compilation inside the profile)
            tr(**kw)
        b.sync()
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            for kw in calls:
                tr(**kw)
            b.sync()
        wall = time.perf_counter() - t
    sort = "cuda_time_total" if b.cuda else "cpu_time_total"
    b.profile_tables.append(f"== {title}\n" + prof.key_averages().table(sort_by=sort, row_limit=30))
    out = summarise_profile(prof, b.cuda)
    out["wall_ms_under_profiler"] = round(wall * 1e3, 1)
    return out


def stage_profile(b: Bench):
    """Profiler table of one stock CFG step (two batch-1 forwards, eager): where the time goes."""
    ensure_pipeline(b)
    kp = forward_args(b, 1, False)
    kn = dict(kp, encoder_hidden_states=b.inputs["neg"])
    return {"stock_step": profile_forward(b, "stock: one CFG step (cond + uncond forwards, batch 1, eager)", [kp, kn])}


def summarise_profile(prof, cuda: bool) -> dict:
    """GPU time by kernel family: matmul / attention / everything else (elementwise, norms, copies)."""
    fam = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if cuda and e.device_type.name != "CUDA":
            continue
        if not cuda and e.device_type.name != "CPU":
            continue
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        k = e.key.lower()
        if any(s in k for s in ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "aten::mm", "aten::addmm")):
            fam["matmul"] += t
        elif any(s in k for s in ("flash", "attention", "fmha", "sdpa", "cudnn")):
            fam["attention"] += t
        else:
            fam["other"] += t
    tot = sum(fam.values()) or 1.0
    out = {k: dict(ms=round(v / 1e3, 2), share=round(v / tot, 3)) for k, v in fam.items()}
    out["busy_ms"] = round(tot / 1e3, 2)
    return out


def stage_memory(b: Bench):
    """24 GB configurations of the transformer: peak VRAM and seconds per step of stock and of ours
    (ours: cond+uncond in one forward; no compile/graphs, which offload hooks exclude)."""
    if b.pipe is not None:  # start from a clean, uncompiled bf16 model (same seeded weights)
        b.pipe = None
        torch._dynamo.reset()  # compiled code holds references to the old model
        b.reset_peak()
        b.log(f"memory: {b.allocated():.1f} GiB still allocated after dropping the old pipeline")
    pipe = ensure_pipeline(b)
    i = b.inputs
    res = {}
    ref = b.stock_latents.get("single")

    def run_stock(n):
        return stock_call(b, [i["pos"]], [b.seeds[0]], steps=n)

    def run_ours(n):
        return ours_call(b, False, steps=n)

    def measure(name, n_steps, who=("stock", "ours")):
        for label, fn in (("stock", run_stock), ("ours", run_ours)):
            if label not in who:
                continue
            key = f"{name}/{label}"
            if b.out_of_time(40):
                res[key] = "skipped: time budget"
                continue
            try:
                fn(1)  # first call moves / pins weights
                b.reset_peak()
                dt, _ = b.timed(lambda: fn(n_steps))
                res[key] = dict(steps=n_steps, s_per_step=round(dt / n_steps, 3),
                                est_one_image_s=round(dt / n_steps * b.steps, 1), **b.peak())
                b.log(f"memory {key}: {dt / n_steps:.2f} s/step, peak {res[key]['peak_allocated_gib']} GiB")
            except Exception as e:
                res[key] = describe_exc(e)
                b.log(f"memory {key}: FAILED {describe_exc(e)}")
                traceback.print_exc()
            b.save()

    # the resident bf16 baseline: weights + activations of one image
    res["bf16_resident_weights_gib"] = round(b.allocated(), 2)
    # fp8 weight storage (diffusers layerwise casting), everything on the GPU; quality against bf16
    if not b.out_of_time(60):
        try:
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
            res["fp8_weights_gib"] = round(b.allocated(), 2)
            measure("fp8_layerwise_storage_gpu", 2)
            if ref is not None and not b.out_of_time(40):
                lat = ours_call(b, False)
                res["fp8_layerwise_storage_gpu/ours_full_28_steps_vs_bf16_stock"] = agreement(lat, ref)
        except Exception as e:
            res["fp8_layerwise_storage_gpu"] = describe_exc(e)
        b.pipe = pipe = None
        b.reset_peak()
        pipe = ensure_pipeline(b)  # back to bf16 (same seeded values)
    if not b.cuda:
        return res

    def config(name, setup, n_steps, who=("stock", "ours")):
        if b.out_of_time(45):
            res[name] = "skipped: time budget"
            return
        try:
            t = time.perf_counter()
            setup()
            res[name + "/setup_s"] = round(time.perf_counter() - t, 1)
        except Exception as e:
            res[name] = "setup failed: " + describe_exc(e)
            traceback.print_exc()
            return
        measure(name, n_steps, who)

    def sequential():
        pipe.remove_all_hooks()
        pipe.enable_sequential_cpu_offload(device=b.device)

    def group():
        pipe.remove_all_hooks()
        pipe.to("cpu")
        pipe.transformer.enable_group_offload(onload_device=b.device, offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        pipe.vae.to(b.device)

    config("model_cpu_offload", lambda: pipe.enable_model_cpu_offload(device=b.device), 2)
    config("sequential_cpu_offload", sequential, 1, who=("ours",))
    config("group_offload_block_stream", group, 2)
    return res


def stage_comfy(b: Bench):
    from comfy_stage import stage_comfy as run

    return run(b)


STAGES = {"comfy": stage_comfy, "env": stage_env, "extract": stage_extract, "train": stage_train, "textenc": stage_textenc,
          "forward": stage_forward, "stock": stage_stock, "ours": stage_ours, "inject": stage_inject,
          "profile": stage_profile, "memory": stage_memory}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(ALL_STAGES), help=f"comma list of {ALL_STAGES + ['comfy']}")
    p.add_argument("--tiny", action="store_true", help="tiny models and 64x64 images (for CPU checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 28, tiny 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--ours-grid-all", action="store_true", help="time the grid for every variant of ours "
                   "(default: only the fastest, compiled + CUDA graphs)")
    p.add_argument("--ours-variants", default=None, help="comma list of the `ours` variants to run (eager, graphs, "
                   "compiled, compiled_graphs; default all)")
    p.add_argument("--no-stock-grid", action="store_true", help="stock: time one image only, not the grid")
    p.add_argument("--comfyui-dir", default=None, help="a ComfyUI checkout for the comfy stage (default: $COMFYUI_DIR)")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining work past this many seconds")
    p.add_argument("--out", default=None, help="write the JSON results here (after every stage)")
    p.add_argument("--profile-out", default=None, help="write profiler tables here")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {ALL_STAGES + ['comfy']}")
    torch.manual_seed(0)
    b = Bench(args)
    for name in stages:  # in the order given
        if b.out_of_time(10):
            b.results["stages"][name] = "skipped: time budget"
            continue
        b.log(f"== stage {name}")
        try:
            t = time.perf_counter()
            b.results["stages"][name] = STAGES[name](b)
            b.results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t, 1)
        except Exception as e:
            traceback.print_exc()
            b.results["errors"][name] = describe_exc(e)
        b.save()
    b.results["total_s"] = round(b.elapsed(), 1)
    b.save()
    print(json.dumps(b.results, default=str))
    return 1 if b.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
