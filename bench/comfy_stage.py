"""The `comfy` stage of bench_qwen_image.py: ComfyUI's own sampler against the pack, in the same process.

Needs a ComfyUI checkout (`--comfyui-dir`, or COMFYUI_DIR) whose requirements this Python has. Builds
Qwen-Image in ComfyUI's own class (60 layers, or one layer under --tiny; every width real, because
ComfyUI reads only the layer count and in_channels from the weights) and the Wan-2.1 VAE, random
weights drawn on the device, loaded through `comfy.sd` as a Load Diffusion Model / Load VAE would.
Then, all at the bench's size, steps and true CFG, euler/simple with ModelSamplingAuraFlow shift 3.1
(ComfyUI's Qwen-Image template), every timing including the VAE decode:
  ksampler_one_image      ComfyUI's KSampler path (nodes.common_ksampler) + VAEDecode, one image
  ksampler_grid_9_calls   the 3x3 α×seed grid as 9 KSampler calls (what 9 queued prompts run, minus
                          the server's own per-prompt overhead)
  ksampler_grid_batched   the grid as ONE KSampler call (latent batch 9, the α rows repeated per seed)
  pack_one_image          the pack's native path (nodes/native_sampling.sample_native: what
                          QwenImageSampleFromEmbeds runs on a MODEL + VAE) on one cell
  pack_grid_max_batch_*   the pack's native grid at the node's default max_batch (0 = auto: as many cells as
                          ComfyUI's memory estimate allows, recorded as auto_max_batch) and at 4 (3+3+3)
and ratios against the diffusers-path figures of this run (`stock`, `ours`: the fastest variant that
ran) when those stages ran; their latents-only times get the `stock` stage's VAE decode added.
The diffusers pipeline is released first: both 20B models do not fit one 80 GB card together.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

from _random_models import default_dtype_device, init_random_

SHIFT = 3.1                  # ModelSamplingAuraFlow in ComfyUI's Qwen-Image template
SAMPLER, SCHEDULER = "euler", "simple"


def import_comfy(comfyui_dir: str | None, cpu: bool):
    """Put the checkout first on sys.path and import ComfyUI's modules (CPU forced when asked)."""
    d = comfyui_dir or os.environ.get("COMFYUI_DIR")
    if not d or not (Path(d) / "comfy").is_dir():
        raise RuntimeError("the comfy stage needs a ComfyUI checkout: pass --comfyui-dir or set COMFYUI_DIR")
    d = str(Path(d).resolve())
    if d not in sys.path:
        sys.path.insert(0, d)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args at import)
    import comfy.sd  # noqa: F401
    import comfy_extras.nodes_model_advanced  # noqa: F401
    import nodes  # noqa: F401  (ComfyUI's own nodes.py; the bench is not the pack)

    return d


def _random_state(build, b, seed: int) -> dict:
    """A ComfyUI module built on the bench's device and dtype with `init_random_` weights, as a state dict."""
    with torch.no_grad(), default_dtype_device(b.dtype, b.device):
        module = build()
    return init_random_(module, seed).state_dict()


def build_models(b, layers: int):
    import comfy.ldm.qwen_image.model
    import comfy.ldm.wan.vae
    import comfy.ops
    import comfy.sd
    import comfy_extras.nodes_model_advanced as adv

    t = time.perf_counter()
    sd = _random_state(lambda: comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
        num_layers=layers, operations=comfy.ops.disable_weight_init), b, seed=0)
    sd["proj_out.weight"] *= 0.5   # keeps the random velocity (and so the latents) moderate
    nparams = sum(v.numel() for v in sd.values())
    model = comfy.sd.load_diffusion_model_state_dict(sd)   # what UNETLoader does with the file's tensors
    del sd
    model = adv.ModelSamplingAuraFlow().patch_aura(model, SHIFT)[0]
    vae_sd = _random_state(lambda: comfy.ldm.wan.vae.WanVAE(
        dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0), b, seed=1)
    vae = comfy.sd.VAE(sd=vae_sd)
    del vae_sd
    b.sync()
    b.log(f"built ComfyUI Qwen-Image ({layers} layers, {nparams / 1e9:.2f}B params) + Wan VAE "
          f"in {time.perf_counter() - t:.1f}s")
    return model, vae, nparams


def inputs(b) -> dict:
    """Prompt embeddings at Qwen-Image's real text width (3584) even under --tiny, and the pack's α batch."""
    from qwen_identity.core.residual.injection import inject

    g = torch.Generator().manual_seed(42)
    width = 3584
    pos = torch.randn(1, b.txt_len, width, generator=g).to(b.dtype)
    neg = torch.randn(1, b.neg_len, width, generator=g).to(b.dtype)
    residual = 0.5 * torch.randn(1, 4, width, generator=g).to(b.dtype)
    pos_c = [[pos, {"pooled_output": None}]]
    return dict(pos=pos_c, neg=[[neg, {"pooled_output": None}]], grid=inject(pos_c, residual, b.alphas))


def ksampler(b, model, vae, positive, negative, batch: int, seed: int, steps: int):
    """ComfyUI's EmptySD3LatentImage -> KSampler -> VAEDecode, as its nodes run them."""
    import comfy.model_management
    import nodes

    latent = {"samples": torch.zeros([batch, 16, b.height // 8, b.width // 8],
                                     device=comfy.model_management.intermediate_device())}
    out = nodes.common_ksampler(model, seed, steps, b.cfg, SAMPLER, SCHEDULER, positive, negative, latent)[0]
    return nodes.VAEDecode().decode(vae, out)[0]


def pack_native(b, model, vae, positive, negative, seeds, steps, max_batch):
    from qwen_identity.nodes.native_sampling import sample_native

    return sample_native(model, vae, positive, negative, seeds, steps, b.cfg, b.width, b.height, SAMPLER,
                         SCHEDULER, progress=lambda done, total: None, max_batch=max_batch)


def _seconds(b, fn):
    b.sync()
    t = time.perf_counter()
    out = fn()
    b.sync()
    return time.perf_counter() - t, out


def _other(b, stage: str, *path):
    v = b.results["stages"].get(stage)
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


def _ratio(a, c):
    return round(a / c, 2) if a and c else None


def stage_comfy(b) -> dict:
    with torch.inference_mode():   # as ComfyUI's executor runs every node
        return _stage_comfy(b)


def _stage_comfy(b) -> dict:
    import_comfy(b.args.comfyui_dir, cpu=not b.cuda)
    import comfy.model_management as mm

    from qwen_identity.nodes.native_sampling import _auto_max_batch, select_conditioning

    if b.pipe is not None:   # the diffusers copy of the transformer must leave the card first
        b.pipe = None
        b.flops = None
        torch._dynamo.reset()   # compiled code can hold the old weights
    left = b.reset_peak()
    layers = 1 if b.tiny else 60
    model, vae, nparams = build_models(b, layers)
    x = inputs(b)
    res: dict = dict(comfyui_dir=b.args.comfyui_dir or os.environ.get("COMFYUI_DIR"), layers=layers,
                     params=nparams, sampler=SAMPLER, scheduler=SCHEDULER, shift=SHIFT,
                     gib_still_allocated_before=round(left, 2))
    try:
        import comfyui_version

        res["comfyui_version"] = comfyui_version.__version__
    except Exception:  # noqa: BLE001 - an older checkout without the file
        res["comfyui_version"] = None
    n_alpha, seeds = len(b.alphas), list(b.seeds)
    cells = n_alpha * len(seeds)
    steps = b.steps

    # warm-up: loads the model onto the card, first kernels, VAE
    t = time.perf_counter()
    ksampler(b, model, vae, x["pos"], x["neg"], 1, seeds[0], 2)
    b.sync()
    res["warmup_2_steps_s"] = round(time.perf_counter() - t, 2)
    # ComfyUI streams part of the weights per step when it thinks they do not fit: say whether it did
    res["model_fully_loaded"] = bool(model.model_size() <= model.loaded_size() + 1)
    res["unet_dtype"] = str(model.model.get_dtype())

    b.reset_peak()
    dt, img = _seconds(b, lambda: ksampler(b, model, vae, x["pos"], x["neg"], 1, seeds[0], steps))
    res["ksampler_one_image"] = dict(s=round(dt, 3), s_per_step=round(dt / steps, 4),
                                     finite=bool(torch.isfinite(img).all()), **b.peak())
    b.log(f"ComfyUI KSampler one image: {dt:.2f}s")
    one_ref = img.float().cpu()

    b.reset_peak()
    dt, img = _seconds(b, lambda: pack_native(b, model, vae, x["pos"], x["neg"], [seeds[0]], steps, 1))
    d = (img.float().cpu() - one_ref).abs()
    res["pack_one_image"] = dict(s=round(dt, 3), vs_ksampler_image_max_abs=float(d.max()), **b.peak())
    b.log(f"pack native one image: {dt:.2f}s")
    b.save()

    if not b.out_of_time(120):
        b.reset_peak()
        grid_rows = [select_conditioning(x["grid"], [r]) for r in range(n_alpha)]
        t = time.perf_counter()
        for r in range(n_alpha):
            for s in seeds:
                ksampler(b, model, vae, grid_rows[r], x["neg"], 1, s, steps)
        b.sync()
        dt = time.perf_counter() - t
        res["ksampler_grid_9_calls"] = dict(s=round(dt, 2), **b.peak())
        b.log(f"ComfyUI KSampler grid, {cells} calls: {dt:.1f}s")
        b.save()

    if not b.out_of_time(60):
        b.reset_peak()
        rows = [r for r in range(n_alpha) for _ in seeds]
        batched = select_conditioning(x["grid"], rows)
        dt, _ = _seconds(b, lambda: ksampler(b, model, vae, batched, x["neg"], cells, seeds[0], steps))
        res["ksampler_grid_batched"] = dict(s=round(dt, 2), **b.peak())
        b.log(f"ComfyUI KSampler grid, one batched call: {dt:.1f}s")
        b.save()

    latent_shape = (1, 16, 1, b.height // 8, b.width // 8)
    res["auto_max_batch"] = _auto_max_batch(model, latent_shape, cells)   # what the node's default, 0, picks
    for max_batch in (None, 4):
        name = f"pack_grid_max_batch_{max_batch or 'auto'}"
        if b.out_of_time(60):
            res[name] = "skipped: time budget"
            continue
        b.reset_peak()
        dt, img = _seconds(b, lambda: pack_native(b, model, vae, x["grid"], x["neg"], seeds, steps, max_batch))
        r = dict(s=round(dt, 2), images=int(img.shape[0]), **b.peak())
        r["speedup_vs_ksampler_batched"] = _ratio((res.get("ksampler_grid_batched") or {}).get("s"), dt)
        r["speedup_vs_ksampler_9_calls"] = _ratio((res.get("ksampler_grid_9_calls") or {}).get("s"), dt)
        res[name] = r
        b.log(f"pack native grid, max_batch {max_batch or 'auto'}: {dt:.1f}s")
        b.save()

    # the diffusers path of this run against ComfyUI's own sampler (latents only there: add the decode)
    k1 = res["ksampler_one_image"]["s"]
    stock1 = _other(b, "stock", "single", "s")
    vae1 = _other(b, "stock", "vae_decode_one_image_s") or 0.0
    ours_variants = b.results["stages"].get("ours")
    ours_times = [v["single"]["s"] for v in ours_variants.values()
                  if isinstance(v, dict) and isinstance(v.get("single"), dict)] if isinstance(ours_variants, dict) else []
    ours1 = min(ours_times) if ours_times else None   # the fastest variant that ran (compiled + graphs on a GPU)
    res["ksampler_one_image_vs_stock_diffusers"] = _ratio((stock1 or 0) + vae1, k1) if stock1 else None
    res["ours_diffusers_one_image_speedup_vs_ksampler"] = _ratio(k1, ours1 + vae1) if ours1 else None
    del model, vae
    gc.collect()
    mm.unload_all_models()
    mm.soft_empty_cache()
    return res
