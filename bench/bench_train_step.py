#!/usr/bin/env python3
"""GPU benchmark of ONE denoise training step of the identity head through the real-size Qwen-Image
transformer (random bf16 weights), beside a diffusers-style Qwen-Image LoRA training step measured in
the same process (issue 12, part 4).

The step is the product's (core/denoising/flow_matching.py):
  features f [B, D] -> ResidualHead -> R [B, K, 3584] -> E + α·R (condition_with_residual, E a random
  prompt embedding of --text-tokens tokens) -> flow_matching_loss through the FROZEN transformer
  (requires_grad False: input gradients through every block, no weight gradients) -> backward -> the
  head's gradients (all-reduced across processes under a launcher) -> AdamW step.
The anchor is what diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py trains: peft LoRA
(rank 16, alpha 16, gaussian init) on to_q/to_k/to_v/to_out.0 of every block, the prompt embedding
without residual, the same loss function, weight gradients only for the LoRA parameters, AdamW.
Both run at the same resolution, batch and memory policy (gradient checkpointing on/off).

Measured per configuration (resolution x batch x checkpointing x eager/compiled): median step time
over --repeat steps after --warmup steps (CUDA events), samples/s, peak memory (allocated and reserved),
MFU. FLOPs are analytic (`transformer_flops`, formula in the JSON; checked against torch's
FlopCounterMode on a forward of the same shape). Batch: 1, the largest that fits the card (predicted
from the peaks at batch 1 and 2, then tried; capped by --max-batch), and the largest that would fit an
80 GB card. The 24 GB stage tries fp8 weight storage (diffusers layerwise casting) and group offload
under a hard allocator cap, and says whether backpropagation through them works.

  python bench/bench_train_step.py --out r.json                          # real sizes, one GPU
  accelerate launch --multi_gpu --num_processes 2 bench/bench_train_step.py --out r2.json   # 2 GPUs
  python bench/bench_train_step.py --tiny --device cpu --out r.json      # same code, tiny model (CI)

Under a multi-process launcher each process holds the whole frozen transformer; only the head is
data-parallel. Each configuration is timed twice there: each process alone ("local", no
communication: a one-GPU step on this machine) and with the head's gradients all-reduced ("ddp").
The JSON is rewritten after every configuration (a killed run keeps what it had); a table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
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

GIB = 1024 ** 3
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
# Real dimensions (Qwen/Qwen-Image transformer/config.json); the tiny one keeps the code path.
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=3, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
VAE_SCALE = 8                       # Qwen-Image VAE: 8x spatial downsampling, then 2x2 patches
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]   # diffusers' train_dreambooth_lora_qwen_image.py default
CARD_80GB_RESERVED_GIB = 73.0       # 80 GB = 74.5 GiB, less the CUDA context and a margin
CARD_24GB_RESERVED_GIB = 21.5       # 24 GB = 22.35 GiB, less the CUDA context and a margin

FLOPS_FORMULA = (
    "per sample, d = heads*head_dim (3072), L = layers (60), n = image tokens (H/16*W/16), t = text tokens, S = n+t, "
    "r = LoRA rank, c_in = in_channels (64), c_out = patch^2*out_channels (64), j = joint_attention_dim (3584). "
    "forward F = L*(24*d^2*S + 4*d*S^2 + 24*d^2) + 2*c_in*d*n + 2*j*d*t + 2*(256*d + d^2) + 4*d^2 + 2*d*c_out*n "
    "[per block: q,k,v,out 8d^2 + MLP 16d^2 per token on both streams, attention QK^T and AV 4dS^2, img_mod/txt_mod "
    "24d^2; outside: img_in, txt_in, timestep MLP, norm_out, proj_out]. "
    "input-gradient backward Bi = L*24*d^2*S - 6*d^2*n + 2*L*4*d*S^2 + 2*j*d*t + 2*d*c_out*n "
    "[every token linear once more (grad wrt its input; block 0's image q,k,v inputs need none), attention backward "
    "2x its forward, txt_in and proj_out; no weight gradients; modulation/timestep/img_in inputs need none]. "
    "recompute (gradient checkpointing) Rc = L*(24*d^2*S + 4*d*S^2 + 24*d^2) (the blocks' forward again). "
    "LoRA extra = L*4*12*d*r*n (4 adapted d->d linears on the image stream: forward 4dr, input grad 4dr, weight "
    "grad 4dr per token) + L*4*4*d*r*n when checkpointing. "
    "step FLOPs = B*(F + Bi [+ Rc] [+ LoRA extra]); mfu = step FLOPs / step time / peak bf16 (989 TFLOP/s dense, "
    "H100/H200 datasheet); mfu_model excludes the recompute (the usual MFU); mfu_vs_measured_matmul divides by "
    "the card's measured 8192^3 bf16 matmul rate instead.")


def transformer_flops(cfg: dict, n_img: int, n_txt: int, lora_rank: int = 0) -> dict:
    """Analytic FLOPs of ONE sample (see FLOPS_FORMULA): forward, input-gradient backward, checkpoint
    recompute, LoRA's extra work. Matmuls and attention only (norms/elementwise are not counted)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    L = cfg["num_layers"]
    c_in, j = cfg["in_channels"], cfg["joint_attention_dim"]
    c_out = cfg["patch_size"] ** 2 * cfg["out_channels"]
    S = n_img + n_txt
    blocks = L * (24 * d * d * S + 4 * d * S * S + 24 * d * d)
    outer = 2 * c_in * d * n_img + 2 * j * d * n_txt + 2 * (256 * d + d * d) + 2 * d * 2 * d + 2 * d * c_out * n_img
    forward = blocks + outer
    backward_input = L * 24 * d * d * S - 6 * d * d * n_img + 2 * L * 4 * d * S * S + 2 * j * d * n_txt \
        + 2 * d * c_out * n_img
    lora = L * len(LORA_TARGETS) * 12 * d * lora_rank * n_img if lora_rank else 0
    lora_recompute = L * len(LORA_TARGETS) * 4 * d * lora_rank * n_img if lora_rank else 0
    return dict(forward=forward, backward_input=backward_input, recompute=blocks, lora_extra=lora,
                lora_extra_recompute=lora_recompute)


def step_flops(per_sample: dict, batch: int, checkpointing: bool, lora: bool) -> tuple[int, int]:
    """(hardware FLOPs incl. recompute, model FLOPs without recompute) of one step of `batch` samples."""
    model = per_sample["forward"] + per_sample["backward_input"] + (per_sample["lora_extra"] if lora else 0)
    extra = (per_sample["recompute"] + (per_sample["lora_extra_recompute"] if lora else 0)) if checkpointing else 0
    return batch * (model + extra), batch * model


def describe_exc(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Inputs:
    """One batch of cached training data (what the product reads from its latent / embedding caches)."""

    def __init__(self, bench: "TrainBench", batch: int, height: int, width: int, seed: int):
        from qwen_identity.core.denoising.flow_matching import pack_latents

        g = torch.Generator().manual_seed(seed)
        cfg, dev = bench.cfg, bench.device
        z = cfg["in_channels"] // 4                       # latent channels (16 real, 4 tiny)
        lat = torch.randn(batch, z, 1, height // VAE_SCALE, width // VAE_SCALE, generator=g)
        x0, self.img_shapes = pack_latents(lat)
        self.x0 = x0.to(dev, bench.dtype)
        self.features = torch.nn.functional.normalize(torch.randn(batch, bench.feature_dim, generator=g), dim=-1).to(dev)
        self.embeds = torch.randn(batch, bench.text_tokens, cfg["joint_attention_dim"], generator=g).to(dev, bench.dtype)
        self.mask = torch.ones(batch, bench.text_tokens, dtype=torch.long, device=dev)
        self.batch = batch


class TrainBench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # torch.cuda.set_per_process_memory_fraction (the 24 GB cap) and group offload's onload device
            # refuse an index-less torch.device("cuda"): resolve it to the current card once, here.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.bfloat16
        self.cfg = TINY_TRANSFORMER if self.tiny else QWEN_IMAGE_TRANSFORMER
        self.feature_dim = args.feature_dim if args.feature_dim else (64 if self.tiny else 2048)
        self.text_tokens = args.text_tokens
        self.t0 = time.perf_counter()
        self.pack = import_pack()
        self.dist = None
        self.world, self.rank = 1, 0
        self.results: dict = {"config": {}, "env": {}, "flops_check": {}, "runs": [], "stages": {}, "errors": {},
                              "summary": {}}
        self.transformer = None
        self.compiled = False
        self.lora_on = False
        self.pass_mask = False   # True: the all-ones prompt mask reaches the transformer (masked attention kernel)
        self.gen = torch.Generator().manual_seed(1234)
        self.matmul_tflops = None

    # ---------------------------------------------------------------- bookkeeping
    def log(self, *a):
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.t0:7.1f}s]", *a, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, need: float = 0.0) -> bool:
        return self.args.budget_s is not None and self.elapsed() + need > self.args.budget_s

    def save(self):
        if self.rank != 0 or not self.args.out:
            return
        self.results["total_s"] = round(self.elapsed(), 1)
        self.summarize()
        from qwen_identity.core.files.atomic import atomic_write_text

        atomic_write_text(Path(self.args.out), json.dumps(self.results, indent=1, default=str))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clean(self):
        if self.cuda:   # (on the CPU nothing is cached; a full collection per configuration only costs time)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def total_gib(self) -> float | None:
        return torch.cuda.get_device_properties(self.device).total_memory / GIB if self.cuda else None

    def peak_flops(self) -> float | None:
        if not self.cuda:
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)

    # ---------------------------------------------------------------- set-up
    def setup_distributed(self):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
            os.environ.setdefault(key, "0" if key == "NCCL_NVLS_ENABLE" else "1")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        from qwen_identity.training.distributed import make_dist

        self.dist = make_dist(self.device, mode="accelerate")   # the product's gradient reduction
        self.world, self.rank = self.dist.world, self.dist.rank

    def env(self):
        import diffusers
        import transformers

        r = dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), world=self.world)
        with contextlib.suppress(Exception):
            import peft
            r["peft"] = peft.__version__
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            r.update(device_name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / GIB, 1),
                     cuda=torch.version.cuda, peak_bf16_tflops=(self.peak_flops() or 0) / 1e12)
            n = 8192
            a = torch.randn(n, n, device=self.device, dtype=self.dtype)
            c = torch.randn(n, n, device=self.device, dtype=self.dtype)
            for _ in range(3):
                a @ c
            self.sync()
            t = time.perf_counter()
            for _ in range(10):
                a @ c
            self.sync()
            self.matmul_tflops = 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12
            r["matmul_8192_bf16_tflops"] = round(self.matmul_tflops, 1)
            del a, c
            self.clean()
        self.results["env"] = r
        self.log("env:", {k: v for k, v in r.items() if k != "date"})

    def build(self):
        from diffusers import QwenImageTransformer2DModel
        from qwen_identity.core.denoising.flow_matching import freeze_transformer

        t = time.perf_counter()
        with torch.no_grad(), default_dtype_device(self.dtype, self.device):
            tr = QwenImageTransformer2DModel(**self.cfg)
        init_random_(tr, seed=0)
        freeze_transformer(tr)
        self.sync()
        self.transformer = tr
        n = sum(p.numel() for p in tr.parameters())
        c = self.results["config"]
        c.update(transformer=self.cfg, transformer_params=n, build_s=round(time.perf_counter() - t, 1),
                 weights_gib=round(torch.cuda.memory_allocated(self.device) / GIB, 2) if self.cuda else None)
        self.log(f"built the transformer: {n / 1e9:.2f}B params in {time.perf_counter() - t:.1f}s")

    def new_head(self):
        from qwen_identity.core.residual.head import ResidualHead

        head = ResidualHead(self.feature_dim, self.args.tokens, self.cfg["joint_attention_dim"]).to(self.device)
        opt = torch.optim.Adam(head.parameters(), lr=1e-4)   # the product's optimizer (training/denoise.py)
        return head, opt

    # ---------------------------------------------------------------- LoRA anchor
    def add_lora(self):
        from peft import LoraConfig

        cfg = LoraConfig(r=self.args.lora_rank, lora_alpha=self.args.lora_rank, init_lora_weights="gaussian",
                         target_modules=LORA_TARGETS)
        self.transformer.add_adapter(cfg)
        params = [p for n, p in self.transformer.named_parameters() if "lora" in n]
        for p in params:
            p.requires_grad_(True)
        self.lora_on = True
        self.results["config"]["lora"] = dict(rank=self.args.lora_rank, alpha=self.args.lora_rank,
                                              targets=LORA_TARGETS, params=sum(p.numel() for p in params),
                                              param_dtype=str(params[0].dtype))
        return params

    def remove_lora(self):
        if self.lora_on:
            self.transformer.unload_lora()
            self.transformer.requires_grad_(False)
            self.lora_on = False

    # ---------------------------------------------------------------- the steps
    def make_step(self, mode: str, world_reduce: bool):
        """A closure doing one full training step on an Inputs; returns the detached loss."""
        from qwen_identity.core.denoising.flow_matching import (condition_with_residual, flow_matching_loss,
                                                                loss_weighting, sample_sigmas)

        tr = self.transformer
        w = self.args.weighting
        dev = self.device
        rope = self.rope_context

        if mode == "head":
            head, opt = self.new_head()
            params = list(head.parameters())

            def step(inp: Inputs):
                sig = sample_sigmas(inp.batch, self.gen, w)
                noise = torch.randn_like(inp.x0)
                residual = head(inp.features)                                  # [B, K, H] float32
                cond = condition_with_residual(inp.embeds, inp.mask, residual, self.args.alpha)
                with rope():     # spans the backward too: checkpointing recomputes the blocks there
                    per = flow_matching_loss(tr, inp.x0, noise, sig.to(dev), cond, inp.mask if self.pass_mask else None,
                                             inp.img_shapes, weights=loss_weighting(sig, w).to(dev))
                    loss = per.mean()
                    loss.backward()
                if world_reduce:
                    self.dist.reduce_grads(params)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            step.head = head
        else:
            params = [p for p in tr.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(inp: Inputs):
                sig = sample_sigmas(inp.batch, self.gen, w)
                noise = torch.randn_like(inp.x0)
                with rope():
                    per = flow_matching_loss(tr, inp.x0, noise, sig.to(dev), inp.embeds, None, inp.img_shapes,
                                             weights=loss_weighting(sig, w).to(dev))
                    loss = per.mean()
                    loss.backward()
                if world_reduce:
                    self.dist.reduce_grads(params)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            step.head = None
        step.params = params
        step.opt = opt
        return step

    def rope_context(self):
        if not self.compiled:
            return contextlib.nullcontext()
        from qwen_identity.core.generation.acceleration import real_rope as _real_rope

        # RoPE in real arithmetic inside compiled blocks, as the sampler does. It must also cover the backward:
        # with gradient checkpointing the blocks run again there, and a different RoPE function then (another
        # graph, other saved tensors) fails checkpoint's recompute check.
        return _real_rope()

    def grad_check(self, mode: str, inputs: Inputs) -> dict:
        """One step's gradients by hand: the head (or LoRA) gets them, no frozen weight does."""
        from qwen_identity.core.denoising.flow_matching import (condition_with_residual, flow_matching_loss,
                                                                sample_sigmas)

        tr = self.transformer
        head = None
        sig = sample_sigmas(inputs.batch, self.gen, self.args.weighting).to(self.device)
        noise = torch.randn_like(inputs.x0)
        if mode == "head":
            head, _ = self.new_head()
            cond = condition_with_residual(inputs.embeds, inputs.mask, head(inputs.features), self.args.alpha)
        else:
            cond = inputs.embeds
        with self.rope_context():
            flow_matching_loss(tr, inputs.x0, noise, sig, cond, None, inputs.img_shapes).mean().backward()
        frozen_with_grad = [n for n, p in tr.named_parameters() if p.grad is not None and "lora" not in n]
        lora = [p for n, p in tr.named_parameters() if "lora" in n]
        out = dict(transformer_params_with_grad=len(frozen_with_grad),
                   transformer_requires_grad=sum(p.requires_grad for n, p in tr.named_parameters() if "lora" not in n))
        if head is not None:
            out["head_weight_grad_norm"] = float(head.proj.weight.grad.norm())
            out["head_bias_grad_norm"] = float(head.proj.bias.grad.norm())
        else:
            out["lora_params_with_grad"] = sum(p.grad is not None for p in lora)
            out["lora_params"] = len(lora)
            out["lora_grad_norm"] = float(torch.stack([p.grad.float().norm() for p in lora if p.grad is not None]).norm())
        for p in tr.parameters():
            p.grad = None
        return out

    # ---------------------------------------------------------------- timing
    def time_steps(self, step, inputs: list[Inputs], warmup: int, repeat: int) -> dict:
        """Median step time over `repeat` steps (CUDA events; wall clock on the CPU) after `warmup` steps."""
        t = time.perf_counter()
        losses = []
        for i in range(warmup):
            losses.append(step(inputs[i % len(inputs)]))
        self.sync()
        first = time.perf_counter() - t
        if warmup and first / warmup > self.args.long_step_s:
            repeat = min(repeat, 3)    # a long step (large batch) varies little: fewer repeats save the budget
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        wall0 = time.perf_counter()
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
            for i, (a, b) in enumerate(events):
                a.record()
                losses.append(step(inputs[i % len(inputs)]))
                b.record()
            self.sync()
            times = [a.elapsed_time(b) / 1e3 for a, b in events]
        else:
            for i in range(repeat):
                s = time.perf_counter()
                losses.append(step(inputs[i % len(inputs)]))
                times.append(time.perf_counter() - s)
        wall = (time.perf_counter() - wall0) / repeat
        out = dict(warmup_s=round(first, 2), step_s=statistics.median(times), step_s_min=min(times),
                   step_s_max=max(times), wall_s_per_step=wall, repeat=repeat,
                   loss_finite=bool(torch.isfinite(torch.stack(losses)).all()),
                   peak_allocated_gib=None, peak_reserved_gib=None)
        if self.cuda:
            out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(self.device) / GIB, 2),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved(self.device) / GIB, 2))
        return out

    def probe_memory(self, step, inp: Inputs) -> float | None:
        """Peak reserved GiB of one step (after a clean allocator), or None on the CPU."""
        self.clean()
        step(inp)
        self.sync()
        return torch.cuda.max_memory_reserved(self.device) / GIB if self.cuda else None

    def run_config(self, mode: str, res: tuple[int, int], batch: int, ckpt: bool, label: str,
                   reduce: bool = False, warmup: int | None = None, repeat: int | None = None) -> dict:
        """Time one configuration; an out-of-memory error is a result ('oom'), not a failure."""
        h, w = res
        key = dict(mode=mode, resolution=f"{w}x{h}", width=w, height=h, batch=batch, checkpointing=ckpt,
                   compiled=self.compiled, label=label, world=self.world, reduce=reduce,
                   mask_to_transformer=self.pass_mask and mode == "head")
        warmup = self.args.warmup if warmup is None else warmup
        repeat = self.args.repeat if repeat is None else repeat
        rec = dict(key)
        step = None
        try:
            self.set_checkpointing(ckpt)
            self.clean()
            step = self.make_step(mode, reduce)
            inputs = [Inputs(self, batch, h, w, seed=s) for s in (11, 12)]
            rec.update(self.time_steps(step, inputs, warmup, repeat))
            self.add_rates(rec)
            self.log(f"{label:>10} {mode:4} {w}x{h} B={batch:<3} ckpt={'on ' if ckpt else 'off'} "
                     f"{'compiled' if self.compiled else 'eager   '} {rec['step_s'] * 1e3:8.1f} ms  "
                     f"{rec['samples_per_s']:7.2f} samples/s  peak {rec.get('peak_reserved_gib')} GiB  "
                     f"MFU {rec.get('mfu')}")
        except Exception as e:  # noqa: BLE001 - a failed configuration is a result
            rec["error"] = "oom" if is_oom(e) else describe_exc(e)
            if not is_oom(e):
                traceback.print_exc()
            self.log(f"{label:>10} {mode:4} {w}x{h} B={batch} ckpt={ckpt}: {rec['error']}")
        finally:
            if step is not None:
                step.opt.zero_grad(set_to_none=True)
                for p in self.transformer.parameters():
                    p.grad = None
            del step
            self.clean()
        self.results["runs"].append(rec)
        self.save()
        return rec

    def add_rates(self, rec: dict):
        n_img = (rec["height"] // 16) * (rec["width"] // 16)
        per = transformer_flops(self.cfg, n_img, self.text_tokens, self.args.lora_rank)
        hw, model = step_flops(per, rec["batch"], rec["checkpointing"], rec["mode"] == "lora")
        t = rec["step_s"]
        rec["samples_per_s"] = round(self.world * rec["batch"] / t, 3) if rec.get("reduce") else round(rec["batch"] / t, 3)
        rec["samples_per_s_per_gpu"] = round(rec["batch"] / t, 3)
        rec["step_tflop"] = round(hw / 1e12, 2)
        rec["step_model_tflop"] = round(model / 1e12, 2)
        rec["achieved_tflops"] = round(hw / t / 1e12, 1)
        peak = self.peak_flops()
        rec["mfu"] = round(hw / t / peak, 3) if peak else None
        rec["mfu_model"] = round(model / t / peak, 3) if peak else None
        rec["mfu_vs_measured_matmul"] = round(hw / t / (self.matmul_tflops * 1e12), 3) if self.matmul_tflops else None
        rec["gpu_hours_per_epoch_1000_people_x_5_photos"] = round(5000 / rec["samples_per_s_per_gpu"] / 3600, 4)
        for k in ("step_s", "step_s_min", "step_s_max", "wall_s_per_step"):
            rec[k] = round(rec[k], 4)

    def set_checkpointing(self, on: bool):
        from qwen_identity.core.denoising.flow_matching import freeze_transformer

        lora = [p for n, p in self.transformer.named_parameters() if "lora" in n] if self.lora_on else []
        freeze_transformer(self.transformer, gradient_checkpointing=on)
        for p in lora:      # freeze_transformer freezes everything; the anchor trains its LoRA weights
            p.requires_grad_(True)

    # ---------------------------------------------------------------- batch search
    def largest_batch(self, res: tuple[int, int], ckpt: bool, peak1: float | None) -> dict:
        """The largest batch that fits: the peak at batch 1 (from the timed run) and 2 give a linear memory
        model; its prediction (capped by --max-batch) is tried and stepped down on out-of-memory."""
        cap = self.args.max_batch
        if not self.cuda or peak1 is None:
            return dict(batch=cap, predicted=None, model=None, batch_80gb=None, limited_by="cap (no memory stats)")
        h, w = res
        self.set_checkpointing(ckpt)
        step = self.make_step("head", False)
        failed = None
        try:
            peak2 = self.probe_memory(step, Inputs(self, 2, h, w, seed=5))
        except Exception as e:  # noqa: BLE001
            failed = describe_exc(e)
        del step
        self.clean()
        if failed:
            return dict(batch=1, predicted=None, model=None, batch_80gb=None, limited_by=f"batch 2: {failed}")
        slope = max(peak2 - peak1, 1e-3)
        base = peak1 - slope
        limit = self.total_gib() * self.args.mem_fraction
        pred = int((limit - base) // slope)
        b80 = int((CARD_80GB_RESERVED_GIB - base) // slope)
        b24 = int((CARD_24GB_RESERVED_GIB - base) // slope)
        model = dict(base_gib=round(base, 2), per_sample_gib=round(slope, 3), limit_gib=round(limit, 1))
        limited = "memory" if pred <= cap else "cap (--max-batch)"
        batch = max(1, min(pred, cap))
        # verify: one step at the candidate; step down by 20 % on out-of-memory
        while batch > 2:
            self.set_checkpointing(ckpt)
            step = self.make_step("head", False)
            fits = True
            try:
                self.probe_memory(step, Inputs(self, batch, h, w, seed=6))
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                fits = False     # (freed below, once the exception and its frames are gone)
            del step
            self.clean()
            if fits:
                break
            self.log(f"batch {batch} does not fit ({w}x{h}, ckpt {ckpt}); trying less")
            batch = max(2, int(batch * 0.8))
            limited = "memory (prediction too high)"
        return dict(batch=batch, predicted=pred, model=model, batch_80gb=max(0, min(b80, cap)),
                    batch_80gb_uncapped=b80, batch_24gb_bf16=b24, limited_by=limited)

    # ---------------------------------------------------------------- stages
    def flops_check(self):
        """Analytic forward FLOPs against torch's FlopCounterMode at each resolution (batch 1)."""
        from torch.utils.flop_counter import FlopCounterMode

        for h, w in self.resolutions:
            inp = Inputs(self, 1, h, w, seed=3)
            n_img = (h // 16) * (w // 16)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                self.transformer(hidden_states=inp.x0, encoder_hidden_states=inp.embeds,
                                 timestep=torch.full((1,), 0.5, device=self.device, dtype=self.dtype),
                                 img_shapes=inp.img_shapes, return_dict=False)
            per = transformer_flops(self.cfg, n_img, self.text_tokens, self.args.lora_rank)
            counted = int(fc.get_total_flops())
            attention = self.cfg["num_layers"] * 4 * (n_img + self.text_tokens) ** 2 * \
                self.cfg["num_attention_heads"] * self.cfg["attention_head_dim"]
            self.results["flops_check"][f"{w}x{h}"] = dict(
                image_tokens=n_img, text_tokens=self.text_tokens, forward_counted=counted,
                forward_analytic=per["forward"], relative_diff=round((per["forward"] - counted) / counted, 6),
                # the CPU's SDPA kernel is not in FlopCounterMode's table (CUDA's flash/cuDNN/efficient are)
                attention_analytic=attention,
                relative_diff_without_attention=round((per["forward"] - attention - counted) / counted, 6),
                backward_input_analytic=per["backward_input"], recompute_analytic=per["recompute"],
                lora_extra_analytic=per["lora_extra"], forward_tflop=round(per["forward"] / 1e12, 3))
            self.log(f"FLOPs {w}x{h}: forward {counted / 1e12:.3f} TFLOP counted, {per['forward'] / 1e12:.3f} analytic")
        self.results["config"]["flops_formula"] = FLOPS_FORMULA
        self.save()

    def weights_fingerprint(self) -> list[float]:
        """Sums of every 7th frozen weight tensor (float64): equal before and after = nothing trained them."""
        with torch.no_grad():
            return [float(p.double().sum()) for i, (n, p) in enumerate(self.transformer.named_parameters())
                    if i % 7 == 0 and "lora" not in n]

    def stage_eager_and_lora(self):
        """Per resolution and memory policy: the head at batch 1, the largest batch, the 80 GB batch; then the
        LoRA anchor at batch 1 and the largest batch (same memory policy), adapter added and removed."""
        plan = self.results["stages"].setdefault("batches", {})
        for res in self.resolutions:
            for ckpt in self.checkpointing:
                key = f"{res[1]}x{res[0]}/ckpt_{'on' if ckpt else 'off'}"
                if self.out_of_time(30):
                    plan[key] = "skipped: time budget"
                    continue
                r1 = self.run_config("head", res, 1, ckpt, "b1")
                if r1.get("error"):
                    plan[key] = dict(error=r1["error"])
                    continue
                found = self.largest_batch(res, ckpt, r1.get("peak_reserved_gib"))
                plan[key] = found
                bmax = found["batch"]
                if bmax > 1 and not self.out_of_time(30):
                    rm = self.run_config("head", res, bmax, ckpt, "bmax")
                    while rm.get("error") == "oom" and bmax > 2:
                        bmax = max(2, int(bmax * 0.8))
                        found["batch"] = bmax
                        rm = self.run_config("head", res, bmax, ckpt, "bmax")
                b80 = found.get("batch_80gb")
                if b80 and b80 not in (1, bmax) and b80 < bmax and not self.out_of_time(30):
                    self.run_config("head", res, b80, ckpt, "b80gb")
                if "lora" in self.modes and not self.out_of_time(30):
                    try:
                        self.add_lora()
                        for b in sorted({1, bmax}):
                            if self.out_of_time(20):
                                break
                            self.run_config("lora", res, b, ckpt, "b1" if b == 1 else "bmax")
                        if "lora_grad_check" not in self.results["stages"]:
                            self.set_checkpointing(ckpt)
                            self.results["stages"]["lora_grad_check"] = self.grad_check("lora", Inputs(self, 1, *res, seed=9))
                    finally:
                        self.remove_lora()
                self.save()

    def stage_mask(self):
        """The head at the first resolution's fastest eager configuration again, with the all-ones prompt mask
        passed to the transformer as training/denoise.py's step_loss does (diffusers then takes the masked
        attention path; unpadded prompts could pass None)."""
        h, w = self.resolutions[0]
        rows = [r for r in self.results["runs"] if r["mode"] == "head" and not r.get("error") and not r["compiled"]
                and not r["reduce"] and r["width"] == w and r["height"] == h and not r["label"].startswith("24gb")]
        if not rows:
            return
        best = max(rows, key=lambda r: r["samples_per_s"])
        self.pass_mask = True
        try:
            rec = self.run_config("head", (h, w), best["batch"], best["checkpointing"], "mask")
        finally:
            self.pass_mask = False
        if not rec.get("error"):
            self.results["stages"]["mask"] = dict(resolution=f"{w}x{h}", batch=best["batch"],
                                                  checkpointing=best["checkpointing"], step_s_without_mask=best["step_s"],
                                                  step_s_with_mask=rec["step_s"],
                                                  slowdown=round(rec["step_s"] / best["step_s"], 3))

    def stage_compiled(self):
        """Regional torch.compile of the blocks (the sampler's compile_transformer), for the configurations
        in --compile (default: 768x512 at the largest batch with the faster memory policy, and batch 1)."""
        from qwen_identity.core.generation.acceleration import compile_transformer

        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        with contextlib.suppress(AttributeError):
            torch._dynamo.config.accumulated_cache_size_limit = max(512, torch._dynamo.config.accumulated_cache_size_limit)
        targets = self.compile_targets()
        self.results["stages"]["compile_targets"] = targets
        if not targets:
            return
        compile_transformer(self.transformer)
        self.compiled = True
        reserve = 100 if (self.world == 1 and self.args.mem24 != "none") else 0   # keep time for the 24 GB stage
        modes = [m for m in ("head", "lora") if m in self.modes and (m == "head" or self.world == 1)]
        # target-major (head then LoRA at each), so a cut budget still leaves complete pairs; adding or removing
        # the adapter changes the blocks' modules: a new compilation (the head's graphs are reused afterwards)
        for t in targets:
            res, ckpt, batch = (t["height"], t["width"]), t["checkpointing"], t["batch"]
            for mode in modes:
                if self.out_of_time(90 + reserve):
                    self.results["stages"].setdefault("compile_skipped", []).append(dict(t, mode=mode))
                    continue
                if mode == "lora":
                    self.add_lora()
                try:
                    local = self.run_config(mode, res, batch, ckpt, t["label"])
                    if self.world > 1 and not local.get("error"):
                        ddp = self.run_config(mode, res, batch, ckpt, t["label"] + "-ddp", reduce=True)
                        if not ddp.get("error"):
                            ddp["scaling_vs_one_gpu"] = round(ddp["samples_per_s"] / local["samples_per_s"], 3)
                            ddp["one_gpu_samples_per_s"] = local["samples_per_s"]
                            self.log(f"  {self.world} GPUs (compiled): x{ddp['scaling_vs_one_gpu']}")
                finally:
                    self.remove_lora()

    def compile_targets(self) -> list[dict]:
        spec = self.args.compile
        if not spec or spec == "none":
            return []
        out = []
        for item in spec.split(","):
            res_s, _, which = item.partition(":")
            w, h = (int(v) for v in res_s.lower().split("x"))
            which = which or "best"
            rows = [r for r in self.results["runs"] if r["mode"] == "head" and not r["compiled"] and not r["reduce"]
                    and r["width"] == w and r["height"] == h and not r.get("error") and r["label"] != "mask"
                    and not r["label"].startswith("24gb")]
            if not rows:
                continue
            if which == "best":
                best = max(rows, key=lambda r: r["samples_per_s"])
                out.append(dict(width=w, height=h, batch=best["batch"], checkpointing=best["checkpointing"],
                                label="best"))
            elif which == "b1":
                ck = [r for r in rows if r["batch"] == 1]
                best = max(ck, key=lambda r: r["samples_per_s"]) if ck else None
                if best:
                    out.append(dict(width=w, height=h, batch=1, checkpointing=best["checkpointing"], label="b1"))
            else:   # an explicit batch, both policies that ran eagerly at it
                for r in rows:
                    if r["batch"] == int(which):
                        out.append(dict(width=w, height=h, batch=r["batch"], checkpointing=r["checkpointing"],
                                        label=f"b{which}"))
        return out

    def stage_ddp(self):
        """Under a launcher: per resolution/policy the largest batch both processes fit, timed alone on every
        process ('local' = one GPU) and with the head's gradients all-reduced ('ddp')."""
        import torch.distributed as tdist

        plan = self.results["stages"].setdefault("batches", {})
        for res in self.resolutions:
            for ckpt in self.checkpointing:
                key = f"{res[1]}x{res[0]}/ckpt_{'on' if ckpt else 'off'}"
                if self.out_of_time(60):
                    plan[key] = "skipped: time budget"
                    continue
                r1 = self.run_config("head", res, 1, ckpt, "b1")
                found = self.largest_batch(res, ckpt, r1.get("peak_reserved_gib"))
                b = torch.tensor([found["batch"]], device=self.device)
                tdist.all_reduce(b, op=tdist.ReduceOp.MIN)        # every process the same batch
                found["batch"] = int(b.item())
                plan[key] = found
                for batch in sorted({1, found["batch"]}):
                    local = self.run_config("head", res, batch, ckpt, f"b{batch}-local") if batch > 1 else r1
                    ddp = self.run_config("head", res, batch, ckpt, f"b{batch}-ddp", reduce=True)
                    if not local.get("error") and not ddp.get("error"):
                        ddp["scaling_vs_one_gpu"] = round(ddp["samples_per_s"] / local["samples_per_s"], 3)
                        ddp["one_gpu_samples_per_s"] = local["samples_per_s"]
                        self.log(f"  {self.world} GPUs: {ddp['samples_per_s']:.2f} samples/s vs one "
                                 f"{local['samples_per_s']:.2f}: x{ddp['scaling_vs_one_gpu']}")
                self.save()

    def stage_24gb(self):
        """fp8 weight storage (layerwise casting) and group offload, under an allocator cap of a 24 GB card:
        does the backward through them work, what does one step cost, how far do the head's gradients move."""
        res24 = self.results["stages"].setdefault("mem24", {})
        if self.compiled:
            uncompile(self.transformer)
            self.compiled = False
        h, w = self.resolutions[0] if self.tiny else (512, 512)
        inp = Inputs(self, 1, h, w, seed=21)
        ref = self.head_grad(inp, ckpt=True)
        res24["resolution"] = f"{w}x{h}"
        res24["bf16_note"] = ("bf16 weights alone are 38 GiB: a 24 GB card needs fp8 storage or offload")
        tr = self.transformer
        try:
            tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            res24["fp8_layerwise"] = "setup failed: " + describe_exc(e)
            return
        self.clean()
        res24["fp8_weights_gib"] = round(torch.cuda.memory_allocated(self.device) / GIB, 2) if self.cuda else None
        with self.memory_cap(CARD_24GB_RESERVED_GIB):
            res24["fp8_layerwise"] = self.try_24gb("fp8", inp, ref, (h, w))
            if not self.tiny and self.cuda and not self.out_of_time(60):
                res24["fp8_layerwise_768x512"] = self.try_24gb("fp8", Inputs(self, 1, 768, 512, seed=22), None,
                                                               (768, 512))
        if self.cuda and not self.out_of_time(90) and "group" in self.args.mem24:
            try:
                t = time.perf_counter()
                tr.to("cpu")
                tr.enable_group_offload(onload_device=self.device, offload_device=torch.device("cpu"),
                                        offload_type="block_level", num_blocks_per_group=1, use_stream=True)
                res24["group_offload_setup_s"] = round(time.perf_counter() - t, 1)
                self.clean()
                with self.memory_cap(CARD_24GB_RESERVED_GIB):
                    res24["fp8_plus_group_offload"] = self.try_24gb("fp8+group", inp, ref, (h, w))
            except Exception as e:  # noqa: BLE001
                res24["fp8_plus_group_offload"] = "setup failed: " + describe_exc(e)
        self.save()

    @contextlib.contextmanager
    def memory_cap(self, gib: float):
        """The caching allocator refuses to grow past `gib` (a 24 GB card, less context and margin)."""
        if not self.cuda:
            yield
            return
        self.clean()
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib / self.total_gib()), self.device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self.clean()

    def head_grad(self, inp: Inputs, ckpt: bool, noise_seed: int = 0) -> torch.Tensor | None:
        """The head's weight gradient of one fixed step (fixed σ and noise), for agreement checks."""
        from qwen_identity.core.denoising.flow_matching import condition_with_residual, flow_matching_loss

        self.set_checkpointing(ckpt)
        head, _ = self.new_head()
        with torch.no_grad():
            head.proj.weight.normal_(0, 0.02, generator=torch.Generator(self.device).manual_seed(1))
        g = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(inp.x0.shape, generator=g).to(self.device, self.dtype)
        sig = torch.full((inp.batch,), 0.6, device=self.device)
        cond = condition_with_residual(inp.embeds, inp.mask, head(inp.features), self.args.alpha)
        flow_matching_loss(self.transformer, inp.x0, noise, sig, cond, None, inp.img_shapes).mean().backward()
        return head.proj.weight.grad.detach().float().cpu()

    def try_24gb(self, name: str, inp: Inputs, ref: torch.Tensor | None, res) -> dict:
        out = {}
        for attempt in ("product", "compute_dtype_shim"):
            try:
                if attempt == "compute_dtype_shim":
                    # flow_matching.predict_velocity casts inputs to the FIRST parameter's dtype, which is
                    # float8 under layerwise casting; the shim makes that bf16 so the measurement can go on.
                    original = self.transformer
                    self.transformer = ComputeDtypeView(original, self.dtype)
                try:
                    if ref is not None:
                        g = self.head_grad(inp, ckpt=True)
                        out["head_grad_rel_diff_vs_bf16"] = round(float((g - ref).norm() / ref.norm()), 4)
                    rec = self.run_config("head", (res[0], res[1]), 1, True, f"24gb-{name}", warmup=1,
                                          repeat=2 if self.tiny else 3)
                finally:
                    if attempt == "compute_dtype_shim":
                        self.transformer = original
                rec["mem24"] = name + ("" if attempt == "product" else " (shim)")
                if rec.get("error"):
                    out[attempt] = rec["error"]
                    if rec["error"] == "oom":
                        out["fits_24gb"] = False
                        break
                    continue
                out[attempt] = dict(step_s=rec["step_s"], samples_per_s=rec["samples_per_s"],
                                    peak_reserved_gib=rec.get("peak_reserved_gib"), mfu=rec.get("mfu"))
                out["fits_24gb"] = True if self.cuda else None
                out["backward_works"] = True
                break
            except Exception as e:  # noqa: BLE001
                out[attempt] = "oom" if is_oom(e) else describe_exc(e)
            self.clean()
        out.setdefault("backward_works", False)
        self.log(f"24 GB {name} {res[1]}x{res[0]}: {out}")
        return out

    # ---------------------------------------------------------------- summary
    def summarize(self):
        runs = [r for r in self.results["runs"] if not r.get("error")]
        pairs = []
        for r in runs:
            if r["mode"] != "lora":
                continue
            mate = [h for h in runs if h["mode"] == "head" and h["label"] not in ("mask",)
                    and not h["label"].startswith("24gb") and all(h[k] == r[k] for k in (
                "resolution", "batch", "checkpointing", "compiled", "world", "reduce"))]
            if mate:
                h = mate[-1]
                pairs.append(dict(resolution=r["resolution"], batch=r["batch"], checkpointing=r["checkpointing"],
                                  compiled=r["compiled"], head_step_s=h["step_s"], lora_step_s=r["step_s"],
                                  speed_ratio_ours_over_anchor=round(r["step_s"] / h["step_s"], 3),
                                  head_peak_reserved_gib=h.get("peak_reserved_gib"),
                                  lora_peak_reserved_gib=r.get("peak_reserved_gib")))
        s = self.results["summary"]
        s["ours_vs_lora_anchor"] = pairs
        heads = [r for r in runs if r["mode"] == "head" and not r["label"].startswith("24gb") and r["label"] != "mask"]
        if heads:
            best = max(heads, key=lambda r: r["samples_per_s"])
            s["best_head"] = {k: best.get(k) for k in ("resolution", "batch", "checkpointing", "compiled",
                                                       "samples_per_s", "step_s", "mfu", "mfu_model",
                                                       "peak_reserved_gib")}
            for res in sorted({r["resolution"] for r in heads}):
                rr = [r for r in heads if r["resolution"] == res]
                b = max(rr, key=lambda r: r["samples_per_s"])
                fit80 = [r for r in rr if (r.get("peak_reserved_gib") or 0) <= CARD_80GB_RESERVED_GIB]
                s[f"best_{res}"] = dict(samples_per_s=b["samples_per_s"], batch=b["batch"],
                                        checkpointing=b["checkpointing"], compiled=b["compiled"], mfu=b["mfu"])
                if fit80:
                    f = max(fit80, key=lambda r: r["samples_per_s"])
                    s[f"best_{res}_within_80gb"] = dict(samples_per_s=f["samples_per_s"], batch=f["batch"],
                                                        checkpointing=f["checkpointing"], compiled=f["compiled"],
                                                        peak_reserved_gib=f.get("peak_reserved_gib"))
        s["gpu_hours_formula"] = ("GPU-hours = people * photos * epochs / (3600 * samples_per_s_per_gpu) / "
                                  "scaling_efficiency; e.g. 1000 people x 5 photos x N epochs at s samples/s per GPU: "
                                  "5000*N/(3600*s); wall hours = GPU-hours / GPUs")
        ddp = [r for r in runs if r.get("scaling_vs_one_gpu")]
        if ddp:
            s["ddp"] = [{k: r.get(k) for k in ("resolution", "batch", "checkpointing", "compiled", "world",
                                               "samples_per_s", "one_gpu_samples_per_s", "scaling_vs_one_gpu")}
                        for r in ddp]

    def table(self) -> str:
        rows = ["| mode | res | B | ckpt | compiled | label | step ms | samples/s | peak GiB (res.) | MFU | MFU model |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.results["runs"]:
            if r.get("error"):
                rows.append(f"| {r['mode']} | {r['resolution']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} "
                            f"| {'yes' if r['compiled'] else 'no'} | {r['label']} | {r['error'][:40]} | | | | |")
                continue
            rows.append(f"| {r['mode']} | {r['resolution']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
                        f"{'yes' if r['compiled'] else 'no'} | {r['label']} | {r['step_s'] * 1e3:.1f} | "
                        f"{r['samples_per_s']:.2f} | {r.get('peak_reserved_gib')} | {r.get('mfu')} | {r.get('mfu_model')} |")
        for p in self.results["summary"].get("ours_vs_lora_anchor", []):
            rows.append(f"ratio LoRA/ours step time {p['resolution']} B={p['batch']} ckpt={p['checkpointing']} "
                        f"compiled={p['compiled']}: {p['speed_ratio_ours_over_anchor']}")
        return "\n".join(rows)

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        self.setup_distributed()
        self.resolutions = parse_resolutions(self.args.resolutions or ("64x64,96x64" if self.tiny else "768x512,512x512"))
        self.checkpointing = [v.strip() == "on" for v in self.args.checkpointing.split(",") if v.strip()]
        self.modes = [m.strip() for m in self.args.modes.split(",") if m.strip()]
        c = self.results["config"]
        c.update(tiny=self.tiny, device=str(self.device), dtype="bfloat16", feature_dim=self.feature_dim,
                 tokens=self.args.tokens, text_tokens=self.text_tokens, alpha=self.args.alpha,
                 weighting=self.args.weighting, warmup=self.args.warmup, repeat=self.args.repeat,
                 max_batch=self.args.max_batch, mem_fraction=self.args.mem_fraction, world=self.world,
                 resolutions=[f"{w}x{h}" for h, w in self.resolutions], checkpointing=self.checkpointing,
                 modes=self.modes, prompt_mask_passed_to_transformer=False,
                 note=("E is one unpadded prompt of --text-tokens tokens per sample; the all-ones mask is used for the "
                       "residual's spread (condition_with_residual) and None is passed to the transformer, as diffusers "
                       "does for unpadded prompts (a padded batch would take the masked attention kernel)"))
        def frozen_check():
            after = self.weights_fingerprint()
            self.results["stages"]["frozen_check"] = dict(tensors=len(after), unchanged=after == self.fingerprint)

        def fingerprint():
            self.fingerprint = self.weights_fingerprint()

        stages = [("env", self.env), ("build", self.build), ("fingerprint", fingerprint), ("flops", self.flops_check)]
        if self.world > 1:
            stages.append(("ddp", self.stage_ddp))
        else:
            stages.append(("eager", self.stage_eager_and_lora))
            stages.append(("head_grad_check", lambda: self.results["stages"].__setitem__(
                "head_grad_check", self.grad_check("head", Inputs(self, 1, *self.resolutions[0], seed=8)))))
        if self.args.mask_check and self.world == 1:
            stages.append(("mask", self.stage_mask))
        if self.args.compile and self.args.compile != "none":
            stages.append(("compiled", self.stage_compiled))
        stages.append(("frozen_check", frozen_check))
        if self.world == 1 and self.args.mem24 != "none":
            stages.append(("mem24", self.stage_24gb))
        core = ("env", "build", "fingerprint", "flops")
        if self.args.stages:
            wanted = {x.strip() for x in self.args.stages.split(",") if x.strip()}
            known = {n for n, _ in stages} | set(core) | {"eager", "head_grad_check", "mask", "compiled", "ddp",
                                                           "frozen_check", "mem24"}
            unknown = wanted - known
            if unknown:
                raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}; known: {sorted(known)}")
            stages = [(n, fn) for n, fn in stages if n in core or n in wanted]
            self.results["config"]["stages"] = sorted(wanted)
        for name, fn in stages:
            need = {"mem24": 80, "compiled": 90, "mask": 30}.get(name, 20)   # seconds a stage needs to be useful
            if self.out_of_time(need) and name not in ("env", "build", "fingerprint", "flops", "frozen_check"):
                self.results["stages"].setdefault("skipped", []).append(name)
                continue
            self.log(f"== {name}")
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.results["errors"][name] = describe_exc(e)
                if name == "build":
                    break
            self.save()
        self.summarize()
        self.save()
        if self.rank == 0:
            print(self.table())
            print(json.dumps(self.results["summary"], default=str))
        if self.world > 1:
            import torch.distributed as tdist

            with contextlib.suppress(Exception):
                tdist.barrier()
        return 1 if self.results["errors"] else 0


class ComputeDtypeView(torch.nn.Module):
    """The transformer as seen by a caller that reads the compute dtype off `next(parameters())`: a bf16
    marker parameter comes first; forward and everything else is the wrapped transformer's."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.marker = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=next(inner.parameters()).device),
                                         requires_grad=False)
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


def uncompile(module: torch.nn.Module):
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    if hasattr(module, "_qwen_identity_compiled"):
        del module._qwen_identity_compiled
    torch._dynamo.reset()


def print_report(path: str) -> int:
    """The table and summary of a (possibly partial) results file: what a killed run still tells."""
    res = json.loads(Path(path).read_text())
    view = TrainBench.__new__(TrainBench)
    view.results = res
    print(view.table())
    print(json.dumps(res.get("summary", {}), default=str))
    for key in ("batches", "mask", "mem24", "frozen_check", "head_grad_check", "lora_grad_check", "compile_skipped", "skipped"):
        if key in res.get("stages", {}):
            print(key, json.dumps(res["stages"][key], default=str))
    if res.get("errors"):
        print("errors", json.dumps(res["errors"]))
    return 0


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """"768x512,512x512" (width x height) -> [(height, width), ...]; multiples of 16."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        w, h = (int(v) for v in item.lower().strip().split("x"))
        if w % 16 or h % 16:
            raise SystemExit(f"resolution {item}: width and height must be multiples of 16")
        out.append((h, w))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny transformer and 64x64/96x64 images (CPU checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolutions", default=None, help="WxH list (default 768x512,512x512; tiny 64x64,96x64)")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing policies to time: off,on")
    p.add_argument("--modes", default="head,lora", help="head (ours) and/or lora (the anchor)")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (default 16; tiny 3)")
    p.add_argument("--mem-fraction", type=float, default=0.92, help="share of the card the batch search may fill")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 2; tiny 1)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps per configuration (default 5; tiny 2)")
    p.add_argument("--compile", default=None,
                   help="configurations to time again with regional torch.compile: comma list of WxH[:best|b1|N] "
                        "(default 768x512:best,768x512:b1 on a GPU, none on the CPU); 'none' to skip")
    p.add_argument("--mem24", default=None, help="24 GB stage: 'fp8', 'fp8,group' (default on a GPU) or 'none'")
    p.add_argument("--stages", default=None,
                   help="run only these stages (comma list; env, build, fingerprint and flops always run): eager, "
                        "head_grad_check, mask, compiled, frozen_check, mem24 (1 GPU), ddp (2+ GPUs); "
                        "e.g. --stages mem24 reruns the 24 GB stage alone")
    p.add_argument("--feature-dim", type=int, default=None, help="D of the identity features (default 2048; tiny 64)")
    p.add_argument("--tokens", type=int, default=4, help="K residual tokens of the head (default 4)")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens S of E (default 40; tiny 7)")
    p.add_argument("--alpha", type=float, default=1.0, help="α_train")
    p.add_argument("--weighting", default="logit_normal", help="σ density / loss weighting (flow_matching.WEIGHTINGS)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining work past this many seconds")
    p.add_argument("--mask-check", default=None, choices=["on", "off"],
                   help="time the fastest eager head configuration again with the all-ones prompt mask passed to the "
                        "transformer, as the training loop does (default on with a GPU)")
    p.add_argument("--long-step-s", type=float, default=1.5, help="steps longer than this are repeated 3 times only")
    p.add_argument("--out", default=None, help="write the JSON results here (rewritten after every configuration)")
    p.add_argument("--report", default=None, metavar="JSON", help="only print the table and summary of a results file")
    args = p.parse_args(argv)
    if args.report:
        return print_report(args.report)
    cuda = torch.device(args.device).type == "cuda"
    if args.max_batch is None:
        args.max_batch = 3 if args.tiny else 16
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.repeat is None:
        args.repeat = 2 if args.tiny else 5
    if args.text_tokens is None:
        args.text_tokens = 7 if args.tiny else 40
    if args.compile is None:
        args.compile = "768x512:best,768x512:b1" if cuda and not args.tiny else "none"
    args.mask_check = (cuda if args.mask_check is None else args.mask_check == "on")
    if args.mem24 is None:
        args.mem24 = "fp8,group" if cuda else "fp8"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if args.tiny and not cuda:
        torch.set_num_threads(1)   # tiny matrices: threads only add synchronisation (20-40x slower on a busy host)
    try:
        return TrainBench(args).run()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
