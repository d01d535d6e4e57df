"""QwenImageAccelerate against eager ComfyUI, uncapped and with the memory of a 24 GB card (one GPU call).

Two modes, each run in its own process (the 24 GB cap is per process):

--mode full   (the whole card) per weight dtype (bf16 = UNETLoader "default", and fp8_e4m3fn), 28 steps CFG 4.5:
              eager KSampler and the pack's eager native sampler (QwenImageSampleFromEmbeds) interleaved, the
              QwenImageAccelerate MODEL through KSampler, QwenImageSampleFromEmbeds speed=fast, eager KSampler
              again (drift), then 8 steps CFG 1 with a random LoRA through LoraLoaderModelOnly: eager, LoRA after
              QwenImageAccelerate, LoRA before it.
--mode card24 (ComfyUI told a 24 GB card: --reserve-vram = the rest of the card, and the process capped with
              torch.cuda.set_per_process_memory_fraction so nothing can use more): fp8 weights + a Lightning-style
              random LoRA + LoadQwen3VL (random weights of the real Qwen3-VL-2B config, saved as a hub folder) +
              ExtractIdentityFeatures + InjectResidual + KSampler + VAEDecode, eager and accelerated, 8 and 4 steps
              at CFG 1, and 28 steps CFG 4.5 without the LoRA.

Every entry records: seconds of the first call and of the repeats, peak allocated/reserved GiB, the dynamo
compiles during it (torch._dynamo's own counter), seconds inside ComfyUI's load_models_gpu (weights moving),
whether ComfyUI loaded the transformer partly, and the accelerator's own state (accelerated calls, eager
calls, why eager). The JSON is rewritten after every entry, so a call cut short keeps what it measured.

  python bench/comfy_accel_check.py --mode full --comfyui-dir DIR --out full.json [--tiny]
  python bench/comfy_accel_check.py --mode card24 --comfyui-dir DIR --out card24.json [--tiny]
--tiny: one transformer layer, a two-layer Qwen3-VL, 64x64 (a CPU check of the script itself).
Random weights: speed and memory depend on the shapes only. Figures are one run each (the repeats' median).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pack import import_pack  # noqa: E402

GIB = 1024 ** 3
LORA_RANK_FULL = 16        # as the earlier runs
LORA_RANK_CARD24 = 64      # Lightning LoRAs are rank 64
CARD_GIB = 23.99           # an RTX 4090 / 3090: 24564 MiB
CUDA_CONTEXT_GIB = 0.5     # what the CUDA context takes outside PyTorch's allocator on such a card
# The pack is used only through the node classes ComfyUI registered (bench/ never imports nodes/): the
# accelerator's state is read from the MODEL's options under this key.
ACCELERATION_KEY = "qwen_identity_acceleration"


def dynamo_compiles() -> int:
    """Graphs dynamo has compiled in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Bench:
    """The few members comfy_stage's helpers use, plus timing/memory bookkeeping."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.tiny = args.tiny
        self.height, self.width = (32, 32) if args.tiny else (args.height, args.width)
        self.steps = 1 if args.tiny else 28
        self.lora_steps = (1, 1) if args.tiny else (8, 4)
        self.cfg = 4.5
        self.txt_len, self.neg_len = (7, 5) if args.tiny else (20, 13)
        self.alphas = [1.0]
        self.seeds = [1234]
        self.t0 = time.perf_counter()
        self.results: dict = {"mode": args.mode, "config": dict(height=self.height, width=self.width, tiny=args.tiny)}
        self.load_s = 0.0

    def log(self, *m):
        print(f"[{time.perf_counter() - self.t0:6.1f}s]", *m, flush=True)

    def elapsed(self):
        return time.perf_counter() - self.t0

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.args.budget_s is not None and self.elapsed() + need > self.args.budget_s

    def save(self):
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        Path(self.args.out).write_text(json.dumps(self.results, indent=1, default=str))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else 0.0

    def peak(self) -> dict:
        if not self.cuda:
            return {}
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 2)}


def env(b: Bench) -> dict:
    import comfyui_version

    r = dict(python=sys.version.split()[0], torch=torch.__version__, comfyui=comfyui_version.__version__,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if b.cuda:
        p = torch.cuda.get_device_properties(b.device)
        r.update(device_name=p.name, memory_gib=round(p.total_memory / GIB, 1), sms=p.multi_processor_count)
    return r


def time_load_models(b: Bench) -> None:
    """Accumulate the seconds ComfyUI spends in load_models_gpu (loading, unloading, patching weights)."""
    import comfy.model_management as mm

    original = mm.load_models_gpu

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            b.sync()
            b.load_s += time.perf_counter() - t

    mm.load_models_gpu = timed


def transformer_state(model) -> dict:
    inner = model.model
    return dict(partly_loaded=bool(getattr(inner, "model_lowvram", False)),
                loaded_gib=round(model.loaded_size() / GIB, 2), size_gib=round(model.model_size() / GIB, 2))


def accel_state(model) -> dict | None:
    s = getattr(model, "model_options", {}).get(ACCELERATION_KEY)
    if s is None:
        return None
    return dict(calls=s.calls, eager_calls=s.eager_calls, compiles=s.compiles,
                unexpected_recompiles=s.unexpected_recompiles, fallback_reason=s.fallback_reason,
                disabled_reason=s.disabled_reason)


def measure(b: Bench, where: dict, name: str, fn, repeat: int = 1, first: bool = True, need_s: float = 20.0,
            state_of=None):
    """fn() once as the first call (when `first`), then `repeat` more times; everything into where[name]."""
    if b.out_of_time(need_s):
        where[name] = "skipped: time budget"
        b.save()
        return None
    b.reset_peak()
    r: dict = {}
    where[name] = r
    out = None
    try:
        c0, l0 = dynamo_compiles(), b.load_s
        times = []
        for i in range((1 if first else 0) + repeat):
            b.sync()
            t = time.perf_counter()
            out = fn()
            b.sync()
            times.append(time.perf_counter() - t)
            if i == 0 and first:
                r["first_call_s"] = round(times[0], 3)
                r["compiles_first_call"] = dynamo_compiles() - c0
                c0 = dynamo_compiles()
        rest = times[1:] if first else times
        if rest:
            r["s"] = round(statistics.median(rest), 3)
            r["runs_s"] = [round(t, 3) for t in rest]
            r["compiles_in_repeats"] = dynamo_compiles() - c0
        r["load_models_gpu_s"] = round(b.load_s - l0, 2)
        r.update(b.peak())
        if state_of is not None:
            r["transformer"] = transformer_state(state_of)
            st = accel_state(state_of)
            if st:
                r["accelerator"] = st
        b.log(name, {k: v for k, v in r.items() if k in ("first_call_s", "s", "peak_allocated_gib",
                                                            "compiles_first_call", "compiles_in_repeats")})
    except Exception as e:  # noqa: BLE001 - recorded; the rest still runs
        traceback.print_exc()
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        r.update(b.peak())
    b.save()
    return out


def ratio(where: dict, a: str, c: str):
    x, y = where.get(a), where.get(c)
    if isinstance(x, dict) and isinstance(y, dict) and x.get("s") and y.get("s"):
        return round(x["s"] / y["s"], 3)
    return None


# ------------------------------------------------------------------------------------------------ full card
def mode_full(b: Bench, cs, node_classes) -> None:
    import folder_paths

    backend = "inductor" if b.cuda else "aot_eager"
    lora_dir = Path(tempfile.mkdtemp(prefix="accel_loras_"))
    atexit.register(shutil.rmtree, lora_dir, True)   # removed when the process ends
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    acc_cls = node_classes["QwenImageAccelerate"]
    for wd in b.args.dtypes.split(","):
        if b.out_of_time(60):
            b.results[wd] = "skipped: time budget"
            continue
        where = b.results.setdefault(wd, {})
        b.reset_peak()
        t = time.perf_counter()
        model, vae, n = cs.build_models(b, 1 if b.tiny else 60, wd)
        where["build_s"] = round(time.perf_counter() - t, 1)
        x = cs.inputs(b)
        seed, steps = b.seeds[0], b.steps

        def eager():
            return cs.ksampler(b, model, vae, x["pos"], x["neg"], 1, seed, steps)

        def pack():
            return cs.pack_node(b, node_classes, model, vae, x["pos"], x["neg"], [seed], steps, 1)

        measure(b, where, "warmup_ksampler_2_steps", lambda: cs.ksampler(b, model, vae, x["pos"], x["neg"], 1, seed, 2),
                repeat=0, state_of=model)
        # eager KSampler and the pack's eager sampler interleaved (drift hits both alike)
        for k in range(2):
            measure(b, where, f"eager_ksampler_{k}", eager, repeat=1, first=False, state_of=model)
            measure(b, where, f"eager_pack_{k}", pack, repeat=1, first=False, state_of=model)
        ks = [where[f"eager_ksampler_{k}"].get("s") for k in range(2) if isinstance(where.get(f"eager_ksampler_{k}"), dict)]
        ps = [where[f"eager_pack_{k}"].get("s") for k in range(2) if isinstance(where.get(f"eager_pack_{k}"), dict)]
        ks, ps = [v for v in ks if v], [v for v in ps if v]
        if ks:
            where["eager_ksampler"] = dict(s=round(statistics.median(ks), 3), runs_s=ks)
        if ps:
            where["eager_pack"] = dict(s=round(statistics.median(ps), 3), runs_s=ps)
        acc = cs.run_node(acc_cls, model=model, backend=backend, mode="default", dynamic="auto")[0]
        measure(b, where, "accelerated_ksampler",
                lambda: cs.ksampler(b, acc, vae, x["pos"], x["neg"], 1, seed, steps), repeat=2, state_of=acc,
                need_s=40)
        node_speed = "fast" if b.cuda else "standard"

        def fast_node():
            return cs.pack_node(b, node_classes, model, vae, x["pos"], x["neg"], [seed], steps, 1, speed=node_speed)

        measure(b, where, "pack_speed_fast", fast_node, repeat=2, need_s=30, state_of=acc)   # the same shared state
        measure(b, where, "eager_ksampler_after", eager, repeat=1, first=False, state_of=model)
        for a, c in (("eager_pack", "eager_ksampler"), ("accelerated_ksampler", "eager_ksampler"),
                     ("pack_speed_fast", "eager_ksampler"), ("pack_speed_fast", "accelerated_ksampler")):
            where[f"ratio_{a}_over_{c}"] = ratio(where, a, c)
        # Lightning-style: 8 steps, CFG 1, a random LoRA through LoraLoaderModelOnly
        lname = f"lora_{wd}.safetensors"
        cs.random_lora(model, lora_dir / lname, rank=LORA_RANK_FULL)
        ls = b.lora_steps[0]
        light = where.setdefault("lora", dict(steps=ls, cfg=1.0, rank=LORA_RANK_FULL))
        eager_l = cs.with_lora(node_classes, model, lname)
        measure(b, light, "eager", lambda: cs.ksampler(b, eager_l, vae, x["pos"], x["neg"], 1, seed, ls, cfg=1.0),
                repeat=2, state_of=eager_l)
        after = cs.with_lora(node_classes, acc, lname)
        measure(b, light, "lora_after_accelerate",
                lambda: cs.ksampler(b, after, vae, x["pos"], x["neg"], 1, seed, ls, cfg=1.0), repeat=2, state_of=after)
        before = cs.run_node(acc_cls, model=cs.with_lora(node_classes, model, lname), backend=backend,
                             mode="default", dynamic="auto")[0]
        measure(b, light, "lora_before_accelerate",
                lambda: cs.ksampler(b, before, vae, x["pos"], x["neg"], 1, seed, ls, cfg=1.0), repeat=2,
                state_of=before)
        for a in ("lora_after_accelerate", "lora_before_accelerate"):
            light[f"ratio_{a}_over_eager"] = ratio(light, a, "eager")
        del model, vae, acc, eager_l, after, before
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.cleanup_models_gc()
        torch._dynamo.reset()
        b.save()


# --------------------------------------------------------------------------------------------- 24 GB card
def random_photos(n: int, side: int):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, side + 64, side, 3, generator=g)   # ComfyUI IMAGE [B, H, W, C] in 0..1


def build_qwen3vl_folder(b: Bench, out: Path, size: str) -> Path:
    """A random-weight Qwen3-VL hub folder (model + processor) with the real config of `size`."""
    from bench_qwen_image import QWEN3VL
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from _random_models import default_dtype_device, init_random_
    from qwen_identity.tiny_models.qwen3vl import build_config, build_processor
    from qwen_identity.tiny_models.tokenizer import build_tokenizer, special_ids

    tok = build_tokenizer()
    ids = special_ids(tok)
    if b.tiny:
        config = build_config(tok)
    else:
        spec = QWEN3VL[size]
        config = Qwen3VLConfig(
            text_config=dict(vocab_size=151936, max_position_embeddings=262144,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                             bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                             pad_token_id=ids["<|endoftext|>"], **spec["text"]),
            vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=2304, **spec["vision"]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=spec["tie"])
    with torch.no_grad(), default_dtype_device(torch.bfloat16, b.device):
        model = Qwen3VLForConditionalGeneration(config)
    init_random_(model, seed=3).eval()
    model.save_pretrained(out)
    build_processor(tok).save_pretrained(out)
    dim = int(config.text_config.hidden_size)
    del model
    b.reset_peak()
    return out, dim


def mode_card24(b: Bench, cs, node_classes) -> None:
    import comfy.model_management as mm
    import folder_paths

    from qwen_identity.core.residual.head import ResidualHead

    work = Path(tempfile.mkdtemp(prefix="accel_card24_"))
    atexit.register(shutil.rmtree, work, True)   # removed when the process ends
    lora_dir = work / "loras"
    lora_dir.mkdir()
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    backend = "inductor" if b.cuda else "aot_eager"
    res = b.results
    res["card"] = dict(card_gib=CARD_GIB, reserve_vram_gib=b.args.reserve_vram,
                       allocator_cap_gib=round(CARD_GIB - CUDA_CONTEXT_GIB, 2) if b.cuda else None)
    t = time.perf_counter()
    vl_dir, dim = build_qwen3vl_folder(b, work / "qwen3vl", b.args.vlm)
    res["qwen3vl"] = dict(size="tiny" if b.tiny else b.args.vlm, feature_dim=dim,
                          build_and_save_s=round(time.perf_counter() - t, 1))
    t = time.perf_counter()
    model, vae, n = cs.build_models(b, 1 if b.tiny else 60, "fp8_e4m3fn")
    res["transformer_build_s"] = round(time.perf_counter() - t, 1)
    b.save()
    if b.cuda:   # from here on the process has the memory of a 24 GB card
        mm.soft_empty_cache()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(b.device).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction((CARD_GIB - CUDA_CONTEXT_GIB) / total, b.device.index or 0)
    res["allocated_before_gib"] = round(b.reset_peak(), 2)
    head = ResidualHead(dim, 4, 3584)
    torch.nn.init.normal_(head.proj.weight, std=0.02)
    x = cs.inputs(b)
    photos = random_photos(4, 64 if b.tiny else 448)
    lname = "lightning_like.safetensors"
    cs.random_lora(model, lora_dir / lname, rank=LORA_RANK_CARD24)
    vl = cs.run_node(node_classes["LoadQwen3VL"], model="", model_path=str(vl_dir), dtype="auto", device="auto",
                     attention="sdpa", keep_loaded=False)[0]
    acc_cls = node_classes["QwenImageAccelerate"]
    lora_m = cs.with_lora(node_classes, model, lname)
    acc_lora = cs.with_lora(node_classes, cs.run_node(acc_cls, model=model, backend=backend, mode="default",
                                                       dynamic="auto")[0], lname)
    acc_plain = cs.run_node(acc_cls, model=model, backend=backend, mode="default", dynamic="auto")[0]
    side = 32 if b.tiny else b.args.card24_side
    b.height = b.width = side
    res["config"].update(height=side, width=side, lora_rank=LORA_RANK_CARD24)
    split: dict = {}

    def workflow(m, steps, cfg, cache: dict):
        """The first call runs the whole graph; later calls are a re-queue with a new seed, where ComfyUI's
        cache skips ExtractIdentityFeatures and InjectResidual (their inputs did not change)."""
        t0 = time.perf_counter()
        if "cond" not in cache:
            feats = cs.run_node(node_classes["ExtractIdentityFeatures"], qwen3vl=vl, images=photos)[0]
            b.sync()
            split["extract_s"] = round(time.perf_counter() - t0, 2)
            cache["cond"] = cs.run_node(node_classes["InjectResidual"], conditioning=x["pos"], head=head,
                                        identity=feats, strength=1.0)[0]
        t1 = time.perf_counter()
        cache["seed"] = cache.get("seed", b.seeds[0]) + 1
        img = cs.ksampler(b, m, vae, cache["cond"], x["neg"], 1, cache["seed"], steps, cfg=cfg)
        b.sync()
        split["sample_and_decode_s"] = round(time.perf_counter() - t1, 2)
        return img

    runs = [("lightning_8_steps", b.lora_steps[0], 1.0, lora_m, acc_lora),
            ("lightning_4_steps", b.lora_steps[1], 1.0, lora_m, acc_lora), ("steps_28_cfg_4.5", b.steps, 4.5, model, acc_plain)]
    for name, steps, cfg, eager_m, fast_m in runs:
        where = res.setdefault(name, dict(steps=steps, cfg=cfg))
        repeat = 0 if name.startswith("steps_28") else 1
        for label, m in (("eager", eager_m), ("accelerated", fast_m)):
            cache: dict = {}
            split.clear()
            measure(b, where, label, lambda m=m, cache=cache: workflow(m, steps, cfg, cache), repeat=repeat,
                    state_of=m, need_s=25 if steps <= 8 else 60)
            if isinstance(where.get(label), dict):
                where[label]["first_call_extract_s"] = split.get("extract_s")
        where["ratio_accelerated_over_eager"] = ratio(where, "accelerated", "eager")
        e, a = where.get("eager"), where.get("accelerated")
        if isinstance(e, dict) and isinstance(a, dict) and e.get("first_call_s") and a.get("first_call_s"):
            where["ratio_first_call_accelerated_over_eager"] = round(a["first_call_s"] / e["first_call_s"], 3)
        b.save()

# ------------------------------------------------------------------------- speed=fast vs KSampler, fp8 only
def mode_fastdiag(b: Bench, cs, node_classes) -> None:
    """Where QwenImageSampleFromEmbeds speed=fast loses against QwenImageAccelerate -> KSampler (fp8): the same
    accelerated MODEL through each sampler, and each sampler with the other's MODEL."""
    native_model_options = sys.modules[node_classes["QwenImageSampleFromEmbeds"].__module__].native_model_options

    backend = "inductor" if b.cuda else "aot_eager"
    wd = b.args.dtypes.split(",")[-1]
    where = b.results.setdefault(wd, {})
    model, vae, n = cs.build_models(b, 1 if b.tiny else 60, wd)
    x = cs.inputs(b)
    seed, steps = b.seeds[0], b.steps
    measure(b, where, "warmup_ksampler_2_steps", lambda: cs.ksampler(b, model, vae, x["pos"], x["neg"], 1, seed, 2),
            repeat=0)
    acc = cs.run_node(node_classes["QwenImageAccelerate"], model=model, backend=backend, mode="default",
                      dynamic="auto")[0]
    node_model = native_model_options(model, fast=True, true_cfg=False)   # what speed=fast samples with
    runs = [
        ("ksampler_accelerated", lambda: cs.ksampler(b, acc, vae, x["pos"], x["neg"], 1, seed, steps)),
        ("node_fast_on_plain_model", lambda: cs.pack_node(b, node_classes, model, vae, x["pos"], x["neg"], [seed],
                                                          steps, 1, speed="fast")),
        ("node_standard_on_accelerated_model", lambda: cs.pack_node(b, node_classes, acc, vae, x["pos"], x["neg"],
                                                                    [seed], steps, 1)),
        ("ksampler_on_node_fast_model", lambda: cs.ksampler(b, node_model, vae, x["pos"], x["neg"], 1, seed, steps)),
        ("ksampler_accelerated_again", lambda: cs.ksampler(b, acc, vae, x["pos"], x["neg"], 1, seed, steps)),
        ("node_fast_on_plain_model_again", lambda: cs.pack_node(b, node_classes, model, vae, x["pos"], x["neg"],
                                                                [seed], steps, 1, speed="fast")),
    ]
    for name, fn in runs:
        measure(b, where, name, fn, repeat=2, state_of=acc, need_s=15)
        r = where.get(name)
        if isinstance(r, dict) and isinstance(r.get("accelerator"), dict):
            r["model_calls_so_far"] = r["accelerator"]["calls"]



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("full", "card24", "fastdiag"), required=True)
    p.add_argument("--comfyui-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dtypes", default="default,fp8_e4m3fn", help="full mode: UNETLoader weight dtypes, in order")
    p.add_argument("--vlm", default="2B", choices=("2B", "8B"), help="card24: the Qwen3-VL config")
    p.add_argument("--card24-side", type=int, default=1328, help="card24: image side (ComfyUI's Qwen-Image template)")
    p.add_argument("--budget-s", type=float, default=None, help="skip what would end past this many seconds")
    args = p.parse_args(argv)
    b = Bench(args)
    import_pack()
    import comfy_stage as cs

    if args.mode == "card24" and b.cuda:   # ComfyUI plans for a 24 GB card (read when model_management imports)
        from pathlib import Path as _P

        sys.path.insert(0, str(_P(args.comfyui_dir).resolve()))
        from comfy.cli_args import args as comfy_args

        total = torch.cuda.get_device_properties(b.device).total_memory / GIB
        args.reserve_vram = round(total - CARD_GIB + 0.4, 2)   # 0.4 GiB: ComfyUI's own default reserve on Linux
        comfy_args.reserve_vram = args.reserve_vram
    else:
        args.reserve_vram = None
    cs.import_comfy(args.comfyui_dir, cpu=not b.cuda)
    node_classes = cs.load_node_classes()
    time_load_models(b)
    b.results["env"] = env(b)
    b.save()
    try:
        with torch.inference_mode():   # as ComfyUI's executor runs every node
            {"full": mode_full, "card24": mode_card24, "fastdiag": mode_fastdiag}[args.mode](b, cs, node_classes)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        b.results["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    b.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
