"""The `comfy` stage of bench_qwen_image.py: ComfyUI's own sampler against the pack, in the same process.

Needs a ComfyUI checkout (`--comfyui-dir`, or COMFYUI_DIR) whose requirements this Python has. Builds
Qwen-Image in ComfyUI's own class (60 layers, or one layer under --tiny; every width real, because
ComfyUI reads only the layer count and in_channels from the weights) and the Wan-2.1 VAE, random
weights drawn on the device, loaded through `comfy.sd` as UNETLoader would (weight_dtype default = bf16,
and fp8_e4m3fn), and loads THIS checkout as a custom node the way ComfyUI's startup does
(`nodes.load_custom_node`): the pack is used only through the node classes ComfyUI registered
(QwenImageAccelerate, QwenImageSampleFromEmbeds), next to ComfyUI's LoraLoaderModelOnly and TorchCompileModel.
All at the bench's size, steps and CFG, euler/simple with ModelSamplingAuraFlow shift 3.1 (ComfyUI's
Qwen-Image template), every timing including the VAE decode. Per weight dtype (bf16's at the top level,
fp8's under `weights_fp8_e4m3fn`):
  ksampler_one_image         ComfyUI's KSampler path (nodes.common_ksampler) + VAEDecode, one image, eager
  pack_one_image             QwenImageSampleFromEmbeds on the MODEL + VAE, one cell (= KSampler's image)
  accelerated.ksampler_one_image    QwenImageAccelerate's MODEL through KSampler: first call (compile
                             included) and a second call, image difference vs eager at the same seed
  accelerated.pack_node_one_image   QwenImageSampleFromEmbeds with speed "fast" (its own accelerator option)
  lightning.*                8 steps at CFG 1 with a random rank-16 LoRA through LoraLoaderModelOnly: eager
                             KSampler vs the LoRA applied after QwenImageAccelerate
  ksampler_grid_batched / accelerated.ksampler_grid_batched   the 3x3 α×seed grid as ONE KSampler call
  accelerated.pack_node_grid_auto   the grid through QwenImageSampleFromEmbeds on the accelerated MODEL
  (bf16 only) pack_grid_max_batch_auto/_4 and ksampler_grid_9_calls, the eager figures of earlier runs
and last `torch_compile_model`: ComfyUI's TorchCompileModel (whole-model compile) in a child process killed
after --comfy-torch-compile-limit-s (180 s on a GPU by default; its compile time, or that it did not finish).
Every measurement runs in its own try/except (an error is recorded as that entry's "error") and the JSON is
written after each one. The diffusers pipeline of earlier stages is released first.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _random_models import default_dtype_device, init_random_

SHIFT = 3.1                  # ModelSamplingAuraFlow in ComfyUI's Qwen-Image template
SAMPLER, SCHEDULER = "euler", "simple"
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn}   # UNETLoader's weight_dtype choices used
LIGHTNING_STEPS, LIGHTNING_CFG, LORA_RANK = 8, 1.0, 16


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


def load_node_classes() -> dict:
    """ComfyUI's NODE_CLASS_MAPPINGS after loading this checkout as a custom node (as ComfyUI's startup does)
    and ComfyUI's TorchCompileModel (comfy_extras). The bench calls the pack only through these classes."""
    import asyncio

    import nodes

    root = Path(__file__).resolve().parent.parent
    if "QwenImageAccelerate" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(root)))
    if "TorchCompileModel" not in nodes.NODE_CLASS_MAPPINGS:
        extras = Path(nodes.__file__).resolve().parent / "comfy_extras" / "nodes_torch_compile.py"
        asyncio.run(nodes.load_custom_node(str(extras), module_parent="comfy_extras"))
    missing = [n for n in ("QwenImageAccelerate", "QwenImageSampleFromEmbeds") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"ComfyUI did not load the pack's nodes {missing} from {root} (see the log above)")
    return nodes.NODE_CLASS_MAPPINGS


def run_node(cls, **inputs):
    """Call a node class as ComfyUI's executor does (V1: FUNCTION; V3: its normalised execute)."""
    out = getattr(cls(), cls.FUNCTION)(**inputs) if not hasattr(cls, "EXECUTE_NORMALIZED") else \
        cls.EXECUTE_NORMALIZED(**inputs)
    return tuple(out.result if hasattr(out, "result") else out)


def _random_state(build, b, seed: int) -> dict:
    """A ComfyUI module built on the bench's device and dtype with `init_random_` weights, as a state dict."""
    with torch.no_grad(), default_dtype_device(b.dtype, b.device):
        module = build()
    return init_random_(module, seed).state_dict()


def build_models(b, layers: int, weight_dtype: str = "default"):
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
    options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] is not None else {}
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)   # UNETLoader with weight_dtype
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


def select_rows(conditioning, rows) -> list:
    """CONDITIONING whose batch is `rows` of the input (batch-1 entries repeated), as a batched latent needs."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return [[c[torch.zeros_like(index) if c.shape[0] == 1 else index], dict(extra)] for c, extra in conditioning]


def ksampler(b, model, vae, positive, negative, batch: int, seed: int, steps: int, cfg: float | None = None):
    """ComfyUI's EmptySD3LatentImage -> KSampler -> VAEDecode, as its nodes run them."""
    import comfy.model_management
    import nodes

    latent = {"samples": torch.zeros([batch, 16, b.height // 8, b.width // 8],
                                     device=comfy.model_management.intermediate_device())}
    out = nodes.common_ksampler(model, seed, steps, b.cfg if cfg is None else cfg, SAMPLER, SCHEDULER, positive,
                                negative, latent)[0]
    return nodes.VAEDecode().decode(vae, out)[0]


def pack_node(b, node_classes, model, vae, positive, negative, seeds, steps, max_batch, cfg=None, speed="standard"):
    """QwenImageSampleFromEmbeds (the class ComfyUI registered) on the native MODEL + VAE."""
    return run_node(node_classes["QwenImageSampleFromEmbeds"], positive=positive, negative=negative,
                    seeds=",".join(map(str, seeds)), steps=steps, cfg=b.cfg if cfg is None else cfg, width=b.width,
                    height=b.height, max_batch=max_batch or 0, model=model, vae=vae, sampler_name=SAMPLER,
                    scheduler=SCHEDULER, speed=speed)[0]


def random_lora(model, path: Path, rank: int = LORA_RANK, seed: int = 3) -> None:
    """A random rank-`rank` LoRA in the diffusers/PEFT layout Lightning LoRAs use, for every Linear of the blocks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, w in model.get_model_object("diffusion_model").transformer_blocks.state_dict().items():
        if k.endswith(".weight") and w.ndim == 2:
            base = f"transformer.transformer_blocks.{k[:-len('.weight')]}"
            out_f, in_f = w.shape
            sd[f"{base}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * in_f ** -0.5).to(torch.bfloat16)
            sd[f"{base}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.02).to(torch.bfloat16)
    save_file(sd, str(path))


def with_lora(node_classes, model, name: str):
    return run_node(node_classes["LoraLoaderModelOnly"], model=model, lora_name=name, strength_model=1.0)[0]


def _seconds(b, fn):
    b.sync()
    t = time.perf_counter()
    out = fn()
    b.sync()
    return time.perf_counter() - t, out


def _diff(img, ref) -> dict:
    d = (img.float().cpu() - ref.float().cpu()).abs()
    return dict(max_abs=round(float(d.max()), 5), mean_abs=round(float(d.mean()), 6))


def _other(b, stage: str, *path):
    v = b.results["stages"].get(stage)
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


def _ratio(a, c):
    return round(a / c, 2) if a and c else None


class Recorder:
    """Each measurement in its own try/except: an error becomes that entry's {"error": ...}, the rest runs;
    the stage's results are written to the JSON after every entry."""

    def __init__(self, b, res: dict):
        self.b, self.res = b, res

    def __call__(self, where: dict, name: str, fn, need_s: float = 30.0):
        if self.b.out_of_time(need_s):
            where[name] = "skipped: time budget"
            self.b.save()
            return None
        self.b.reset_peak()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the next measurement still runs
            import traceback

            traceback.print_exc()
            where[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            out = None
        self.b.save()
        return out


def stage_comfy(b) -> dict:
    with torch.inference_mode():   # as ComfyUI's executor runs every node
        return _stage_comfy(b)


def _stage_comfy(b) -> dict:
    import_comfy(b.args.comfyui_dir, cpu=not b.cuda)
    import comfy.model_management as mm
    import folder_paths

    if b.pipe is not None:   # the diffusers copy of the transformer must leave the card first
        b.pipe = None
        b.flops = None
        torch._dynamo.reset()   # compiled code can hold the old weights
    left = b.reset_peak()
    node_classes = load_node_classes()
    layers = 1 if b.tiny else 60
    res: dict = dict(comfyui_dir=b.args.comfyui_dir or os.environ.get("COMFYUI_DIR"), layers=layers,
                     sampler=SAMPLER, scheduler=SCHEDULER, shift=SHIFT, gib_still_allocated_before=round(left, 2))
    b.results["stages"]["comfy"] = res   # written as it goes (the stage's return value replaces it at the end)
    try:
        import comfyui_version

        res["comfyui_version"] = comfyui_version.__version__
    except Exception:  # noqa: BLE001 - an older checkout without the file
        res["comfyui_version"] = None
    backend = getattr(b.args, "comfy_backend", None) or ("inductor" if b.cuda else "aot_eager")
    dtypes = [d for d in (getattr(b.args, "comfy_dtypes", None) or "default,fp8_e4m3fn").split(",") if d]
    res["accelerate"] = dict(backend=backend, mode="default", dynamic="auto")
    rec = Recorder(b, res)
    lora_dir = Path(tempfile.mkdtemp(prefix="qwen_identity_bench_loras_"))
    atexit.register(shutil.rmtree, lora_dir, True)   # removed when the process ends
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    x = inputs(b)
    for i, wd in enumerate(dtypes):
        if wd not in WEIGHT_DTYPES:
            res[f"weights_{wd}"] = {"error": f"unknown weight dtype {wd!r}: use {', '.join(WEIGHT_DTYPES)}"}
            continue
        if b.out_of_time(90):
            res[f"weights_{wd}"] = "skipped: time budget"
            continue
        torch._dynamo.reset()   # each weight dtype's compile is timed from scratch
        try:
            model, vae, nparams = build_models(b, layers, wd)
        except Exception as e:  # noqa: BLE001
            res[f"weights_{wd}"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            b.save()
            continue
        res["params"] = nparams
        # bf16 (the first) keeps its figures at the stage's top level, where earlier runs had them
        where = res if i == 0 and wd == "default" else res.setdefault(f"weights_{wd}", {})
        where["weight_dtype"] = wd
        _measure(b, rec, where, res, node_classes, model, vae, x, lora_dir, backend, first=(where is res))
        del model, vae
        gc.collect()
        mm.unload_all_models()
        mm.soft_empty_cache()
    limit = getattr(b.args, "comfy_torch_compile_limit_s", None)
    limit = (180.0 if b.cuda else 0.0) if limit is None else float(limit)
    if limit > 0 and b.args.budget_s is not None:   # never past the call's budget
        limit = min(limit, max(b.args.budget_s - b.elapsed() - 10, 0))
    if limit > 0:
        rec(res, "torch_compile_model", lambda: res.__setitem__(
            "torch_compile_model", torch_compile_model_subprocess(b, limit)), need_s=min(limit, 60))
    else:
        res["torch_compile_model"] = "skipped: --comfy-torch-compile-limit-s 0 (the default on a CPU)"
    _diffusers_ratios(b, res)
    shutil.rmtree(lora_dir, ignore_errors=True)
    return res


def _measure(b, rec, where, res, node_classes, model, vae, x, lora_dir, backend, first: bool):
    """Every figure for one weight dtype: eager KSampler vs the accelerated MODEL through KSampler and through
    QwenImageSampleFromEmbeds, for one image, the Lightning setting and the 3x3 grid."""
    n_alpha, seeds = len(b.alphas), list(b.seeds)
    cells = n_alpha * len(seeds)
    steps = b.steps
    acc_cls = node_classes["QwenImageAccelerate"]

    # warm-up: loads the model onto the card, first kernels, VAE
    t = time.perf_counter()
    ksampler(b, model, vae, x["pos"], x["neg"], 1, seeds[0], 2)
    b.sync()
    where["warmup_2_steps_s"] = round(time.perf_counter() - t, 2)
    # ComfyUI streams part of the weights per step when it thinks they do not fit: say whether it did
    where["model_fully_loaded"] = bool(model.model_size() <= model.loaded_size() + 1)
    where["unet_dtype"] = str(model.model.get_dtype())
    ref = {}

    def eager_one():
        dt, img = _seconds(b, lambda: ksampler(b, model, vae, x["pos"], x["neg"], 1, seeds[0], steps))
        where["ksampler_one_image"] = dict(s=round(dt, 3), s_per_step=round(dt / steps, 4),
                                           finite=bool(torch.isfinite(img).all()), **b.peak())
        ref["one"] = img.float().cpu()
        b.log(f"[{where['weight_dtype']}] ComfyUI KSampler one image: {dt:.2f}s")
    rec(where, "ksampler_one_image", eager_one)

    def pack_one():
        dt, img = _seconds(b, lambda: pack_node(b, node_classes, model, vae, x["pos"], x["neg"], [seeds[0]], steps, 1))
        where["pack_one_image"] = dict(s=round(dt, 3), **b.peak())
        if "one" in ref:
            where["pack_one_image"]["vs_ksampler_image_max_abs"] = _diff(img, ref["one"])["max_abs"]
        b.log(f"[{where['weight_dtype']}] pack native one image: {dt:.2f}s")
    rec(where, "pack_one_image", pack_one)

    acc = {}
    accel = where.setdefault("accelerated", {})

    def accelerated_one():
        acc["model"] = run_node(acc_cls, model=model, backend=backend, mode="default", dynamic="auto")[0]
        first_s, img = _seconds(b, lambda: ksampler(b, acc["model"], vae, x["pos"], x["neg"], 1, seeds[0], steps))
        dt, img = _seconds(b, lambda: ksampler(b, acc["model"], vae, x["pos"], x["neg"], 1, seeds[0], steps))
        state = acc["model"].model_options.get("qwen_identity_acceleration")
        r = dict(s=round(dt, 3), first_call_incl_compile_s=round(first_s, 2),
                 first_model_call_s=round(state.first_call_s, 2) if state and state.first_call_s else None,
                 eager_fallback_calls=state.eager_calls if state else None, **b.peak())
        if "one" in ref:
            r["vs_eager_ksampler"] = _diff(img, ref["one"])
            r["speedup_vs_eager_ksampler"] = _ratio(where["ksampler_one_image"]["s"], dt)
        accel["ksampler_one_image"] = r
        b.log(f"[{where['weight_dtype']}] accelerated KSampler one image: {dt:.2f}s (first call {first_s:.1f}s)")
    rec(accel, "ksampler_one_image", accelerated_one, need_s=90)

    def node_fast_one():
        # the node's own option: speed "fast" accelerates the native path on a GPU (eager elsewhere)
        node_speed = "fast" if b.cuda else "standard"
        m = model if b.cuda else acc.get("model", model)
        dt, img = _seconds(b, lambda: pack_node(b, node_classes, m, vae, x["pos"], x["neg"], [seeds[0]], steps, 1,
                                                speed=node_speed))
        dt2, img = _seconds(b, lambda: pack_node(b, node_classes, m, vae, x["pos"], x["neg"], [seeds[0]], steps, 1,
                                                 speed=node_speed))
        r = dict(s=round(dt2, 3), first_call_s=round(dt, 2), speed=node_speed, **b.peak())
        if "one" in ref:
            r["vs_eager_ksampler"] = _diff(img, ref["one"])
        accel["pack_node_one_image"] = r
        b.log(f"[{where['weight_dtype']}] QwenImageSampleFromEmbeds speed={node_speed} one image: {dt2:.2f}s")
    rec(accel, "pack_node_one_image", node_fast_one, need_s=60)

    # Lightning-style: 8 steps, CFG 1, a random LoRA through ComfyUI's LoraLoaderModelOnly
    lora_name = f"random_lora_{where['weight_dtype']}.safetensors"
    light = where.setdefault("lightning", dict(steps=LIGHTNING_STEPS, cfg=LIGHTNING_CFG, lora_rank=LORA_RANK))

    def lightning():
        random_lora(model, lora_dir / lora_name)
        eager_m = with_lora(node_classes, model, lora_name)
        ksampler(b, eager_m, vae, x["pos"], x["neg"], 1, seeds[0], 2, cfg=LIGHTNING_CFG)   # patches the LoRA in
        dt, img = _seconds(b, lambda: ksampler(b, eager_m, vae, x["pos"], x["neg"], 1, seeds[0], LIGHTNING_STEPS,
                                               cfg=LIGHTNING_CFG))
        light["ksampler_eager"] = dict(s=round(dt, 3), **b.peak())
        ref_l = img.float().cpu()
        b.save()
        base = acc.get("model") or run_node(acc_cls, model=model, backend=backend, mode="default", dynamic="auto")[0]
        fast_m = with_lora(node_classes, base, lora_name)        # LoRA applied after QwenImageAccelerate
        first_s, _ = _seconds(b, lambda: ksampler(b, fast_m, vae, x["pos"], x["neg"], 1, seeds[0], LIGHTNING_STEPS,
                                                  cfg=LIGHTNING_CFG))
        dt2, img = _seconds(b, lambda: ksampler(b, fast_m, vae, x["pos"], x["neg"], 1, seeds[0], LIGHTNING_STEPS,
                                                cfg=LIGHTNING_CFG))
        light["ksampler_accelerated"] = dict(s=round(dt2, 3), first_call_s=round(first_s, 2),
                                             vs_eager=_diff(img, ref_l), speedup=_ratio(dt, dt2), **b.peak())
        b.log(f"[{where['weight_dtype']}] Lightning 8 steps CFG 1 + LoRA: eager {dt:.2f}s, accelerated {dt2:.2f}s")
    rec(light, "ksampler_accelerated", lightning, need_s=60)

    # the 3x3 α×seed grid: eager KSampler batched (one call) vs accelerated, and the pack's node (auto batch)
    rows = [r for r in range(n_alpha) for _ in seeds]
    batched = select_rows(x["grid"], rows)
    grid = {}

    def grid_eager():
        dt, img = _seconds(b, lambda: ksampler(b, model, vae, batched, x["neg"], cells, seeds[0], steps))
        where["ksampler_grid_batched"] = dict(s=round(dt, 2), **b.peak())
        grid["ref"] = img.float().cpu()
        b.log(f"[{where['weight_dtype']}] ComfyUI KSampler grid, one batched call: {dt:.1f}s")
    rec(where, "ksampler_grid_batched", grid_eager, need_s=60)

    def grid_accelerated():
        m = acc.get("model") or run_node(acc_cls, model=model, backend=backend, mode="default", dynamic="auto")[0]
        first_s, _ = _seconds(b, lambda: ksampler(b, m, vae, batched, x["neg"], cells, seeds[0], steps))
        dt, img = _seconds(b, lambda: ksampler(b, m, vae, batched, x["neg"], cells, seeds[0], steps))
        r = dict(s=round(dt, 2), first_call_s=round(first_s, 2), **b.peak())
        if "ref" in grid:
            r["vs_eager"] = _diff(img, grid["ref"])
            r["speedup_vs_eager_batched"] = _ratio(where["ksampler_grid_batched"]["s"], dt)
        accel["ksampler_grid_batched"] = r
        b.log(f"[{where['weight_dtype']}] accelerated KSampler grid batched: {dt:.1f}s (first {first_s:.1f}s)")
    rec(accel, "ksampler_grid_batched", grid_accelerated, need_s=90)

    def grid_node_accelerated():
        m = acc.get("model") or model
        dt, img = _seconds(b, lambda: pack_node(b, node_classes, m, vae, x["grid"], x["neg"], seeds, steps, None))
        accel["pack_node_grid_auto"] = dict(s=round(dt, 2), images=int(img.shape[0]), **b.peak())
        b.log(f"[{where['weight_dtype']}] QwenImageSampleFromEmbeds grid (accelerated MODEL): {dt:.1f}s")
    rec(accel, "pack_node_grid_auto", grid_node_accelerated, need_s=60)

    if not first:
        return
    # the earlier (eager) figures of the first weight dtype, kept for comparison with earlier runs
    auto = importlib.import_module(node_classes["QwenImageSampleFromEmbeds"].__module__.rsplit(".", 1)[0]
                                   + ".native_sampling")._auto_max_batch   # the module ComfyUI loaded
    where["auto_max_batch"] = auto(model, (1, 16, 1, b.height // 8, b.width // 8), cells)
    for max_batch in (None, 4):
        name = f"pack_grid_max_batch_{max_batch or 'auto'}"

        def pack_grid(max_batch=max_batch, name=name):
            dt, img = _seconds(b, lambda: pack_node(b, node_classes, model, vae, x["grid"], x["neg"], seeds, steps,
                                                    max_batch))
            r = dict(s=round(dt, 2), images=int(img.shape[0]), **b.peak())
            r["speedup_vs_ksampler_batched"] = _ratio((where.get("ksampler_grid_batched") or {}).get("s"), dt)
            where[name] = r
            b.log(f"pack native grid, max_batch {max_batch or 'auto'}: {dt:.1f}s")
        rec(where, name, pack_grid, need_s=60)

    def grid_9_calls():
        grid_rows = [select_rows(x["grid"], [r]) for r in range(n_alpha)]
        t = time.perf_counter()
        for r in range(n_alpha):
            for s in seeds:
                ksampler(b, model, vae, grid_rows[r], x["neg"], 1, s, steps)
        b.sync()
        dt = time.perf_counter() - t
        where["ksampler_grid_9_calls"] = dict(s=round(dt, 2), **b.peak())
        for name in ("pack_grid_max_batch_auto", "pack_grid_max_batch_4"):
            if isinstance(where.get(name), dict) and "s" in where[name]:
                where[name]["speedup_vs_ksampler_9_calls"] = _ratio(dt, where[name]["s"])
        b.log(f"ComfyUI KSampler grid, {cells} calls: {dt:.1f}s")
    if getattr(b.args, "comfy_grid_9_calls", True):
        rec(where, "ksampler_grid_9_calls", grid_9_calls, need_s=120)


def _diffusers_ratios(b, res):
    """The diffusers path of this run against ComfyUI's own sampler (latents only there: add the decode)."""
    k1 = (res.get("ksampler_one_image") or {}).get("s") if isinstance(res.get("ksampler_one_image"), dict) else None
    stock1 = _other(b, "stock", "single", "s")
    vae1 = _other(b, "stock", "vae_decode_one_image_s") or 0.0
    ours_variants = b.results["stages"].get("ours")
    ours_times = [v["single"]["s"] for v in ours_variants.values()
                  if isinstance(v, dict) and isinstance(v.get("single"), dict)] if isinstance(ours_variants, dict) else []
    ours1 = min(ours_times) if ours_times else None   # the fastest variant that ran (compiled + graphs on a GPU)
    res["ksampler_one_image_vs_stock_diffusers"] = _ratio((stock1 or 0) + vae1, k1) if stock1 and k1 else None
    res["ours_diffusers_one_image_speedup_vs_ksampler"] = _ratio(k1, ours1 + vae1) if ours1 and k1 else None


# ------------------------------------------------------------------ ComfyUI's TorchCompileModel, time-limited
def torch_compile_model_subprocess(b, limit_s: float) -> dict:
    """ComfyUI's own TorchCompileModel (whole-model compile) in a child process killed after `limit_s`, so a
    compile that does not finish cannot eat the GPU call. The child builds the same model and samples one
    image twice (first call = compile)."""
    out = Path(tempfile.mkdtemp(prefix="qwen_identity_tcm_")) / "tcm.json"
    atexit.register(shutil.rmtree, out.parent, True)   # removed when the process ends
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-compile-model", "--out", str(out),
           "--comfyui-dir", str(b.args.comfyui_dir or os.environ.get("COMFYUI_DIR", "")), "--device", str(b.device),
           "--height", str(b.height), "--width", str(b.width), "--steps", str(b.steps)] + (["--tiny"] if b.tiny else [])
    b.log(f"ComfyUI TorchCompileModel in a child process, limit {limit_s:.0f}s")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    r = json.loads(out.read_text()) if out.exists() else {}
    r.update(limit_s=limit_s, wall_s=round(time.perf_counter() - t, 1), exit_code=rc,
             finished=rc == 0 and "second_call_s" in r)
    if rc is None:
        r["note"] = f"did not finish within {limit_s:.0f} s (killed); the figures present were reached before"
    shutil.rmtree(out.parent, ignore_errors=True)
    return r


def _torch_compile_model_child(argv) -> int:
    p = argparse.ArgumentParser()
    for a in ("--out", "--comfyui-dir", "--device"):
        p.add_argument(a)
    for a in ("--height", "--width", "--steps"):
        p.add_argument(a, type=int)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--torch-compile-model", action="store_true")
    a = p.parse_args(argv)
    r: dict = {}
    save = lambda: Path(a.out).write_text(json.dumps(r))   # noqa: E731 - after every figure

    class B:   # the few Bench members this stage's helpers use
        args = a
        device = torch.device(a.device)
        cuda = device.type == "cuda"
        dtype = torch.bfloat16
        tiny = a.tiny
        height, width, steps, cfg = a.height, a.width, a.steps, 4.5
        txt_len, neg_len = (7, 5) if a.tiny else (20, 13)
        alphas = [1.0]

        def sync(self):
            if self.cuda:
                torch.cuda.synchronize(self.device)

        def log(self, *m):
            print("[torch_compile_model]", *m, flush=True)

    b = B()
    from _pack import import_pack

    import_pack()   # `inputs` draws the α batch with the pack's core injection
    import_comfy(a.comfyui_dir, cpu=not b.cuda)
    node_classes = load_node_classes()
    with torch.inference_mode():
        t = time.perf_counter()
        model, vae, _ = build_models(b, 1 if a.tiny else 60)
        r["build_s"] = round(time.perf_counter() - t, 1)
        save()
        x = inputs(b)
        compiled = run_node(node_classes["TorchCompileModel"], model=model, backend="inductor")[0]
        r["started_first_call"] = True
        save()
        dt, _ = _seconds(b, lambda: ksampler(b, compiled, vae, x["pos"], x["neg"], 1, 1234, a.steps))
        r["first_call_incl_compile_s"] = round(dt, 1)
        save()
        dt, _ = _seconds(b, lambda: ksampler(b, compiled, vae, x["pos"], x["neg"], 1, 1234, a.steps))
        r["second_call_s"] = round(dt, 3)
        save()
    return 0


if __name__ == "__main__":   # the TorchCompileModel child (bench_qwen_image.py runs the stage itself)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(_torch_compile_model_child(sys.argv[1:]))
