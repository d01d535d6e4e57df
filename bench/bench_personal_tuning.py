#!/usr/bin/env python3
"""GPU benchmark of personal identity-head tuning: the real `tune_head` loop of `qwen-identity tune`
(core/tuning), 200 steps with the CLI's defaults, through the real-size Qwen-Image 1.x transformer.

Why this shape. The step time of tuning does not depend on weight values, only on shapes, so the
transformer is built at the real size (diffusers `QwenImageTransformer2DModel`, 60 blocks, 20.4 B
parameters) with random bf16 weights directly on the GPU (seconds instead of a 40 GB download), and the
photos arrive already encoded: random latents of the family's VAE latent shape, random unit-norm Qwen3-VL
features of the width the CLI's default Qwen3-VL gives, random prompt embeddings of the default prompt's
length. The VAE, Qwen3-VL and the text encoder are skipped entirely (the JSON says so): the CLI runs them
once before tuning and caches their outputs, they are not part of the tuning loop. Everything timed is the
product: `PersonalData` (it takes tensors, no seam was needed), the transformer prepared by the CLI's own
`training.denoise_pipeline.prepare_transformer` (frozen, checkpointing and fp8 storage as the flags set
them), the family's Denoiser found by `detect_family`, and `tune_head` with the `TuneOptions` that
`cli.tune.run_config` builds from the CLI's own argument parser: held-out photo, held-out evaluations every
steps/20, face-weighted loss, warm-up + cosine schedule, keeping the best head.

Stages (in order; a stage starts only while the time budget leaves --min-stage-s):
  bf16      the CLI's defaults on one GPU (bf16, no gradient checkpointing, no fp8, not compiled).
  fp8_24gb  `--fp8-storage --gradient-checkpointing` (what docs/personalize.md gives for 24 GB cards),
            the allocator capped at --cap-gib (24 GiB) with torch.cuda.set_per_process_memory_fraction;
            an out-of-memory is a result (fits: false), not a crash. The random weights are built in bf16
            and cast to fp8 before the cap is set (the CLI's loader reads them one tensor at a time into a
            model that already stores fp8, so it never holds the bf16 weights whole).
A stage still running when the budget ends is stopped through tune_head's own `should_stop` (the CLI's
Ctrl-C path: the best head so far is kept) and recorded as partial with the steps it did.

Recorded per stage: seconds of the whole tune_head call, seconds per step (median over training-only steps
after --warmup; steps that end with a held-out evaluation are reported apart), the first step (from the
call's start: it includes the two held-out evaluations before the loop), peak GPU memory
(max_memory_allocated / reserved), the held-out losses and gains tune_head returns; card and versions.
The JSON is rewritten atomically after every stage (and at a failure); a summary is printed last.

  python bench/bench_personal_tuning.py --out r.json                       # real size, one GPU
  python bench/bench_personal_tuning.py --tiny --device cpu --steps 6 --out r.json   # same code, CPU (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # as `qwen-identity tune` sets it (cli/tune.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _pack import import_pack  # noqa: E402
from _random_models import default_dtype_device, init_random_  # noqa: E402
from bench_train_step import CARD_24GB_RESERVED_GIB as CARD_24GB_USABLE_GIB  # noqa: E402
from bench_train_step import QWEN_IMAGE_TRANSFORMER, TINY_TRANSFORMER, describe_exc, is_oom  # noqa: E402

GIB = 1024 ** 3
STAGES = {
    # name: (extra CLI flags, allocator cap?)  -- the flags go through the CLI's own parser
    "bf16": ([], False),
    "fp8_24gb": (["--fp8-storage", "--gradient-checkpointing"], True),
}
# The default prompt "a photo of a person" after Qwen-Image's chat template with its 34-token prefix dropped:
# 5 prompt tokens + "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n" (counted by hand from the template in
# diffusers' QwenImagePipeline, not tokenized here: no tokenizer travels). Unpadded, so no mask reaches the
# transformer, as in the CLI where every photo shares the one prompt.
DEFAULT_TEXT_TOKENS = 10
TINY_FEATURE_DIM = 64
FP8_SLOWDOWN_GUESS = 2.3   # fp8 storage + checkpointing vs bf16 without, per step (0.51 s vs 0.19-0.27 s, RESULTS.md)


def cli_run(extra: list[str], steps: int, resolution: str):
    """The PersonalRun `qwen-identity tune PHOTOS --out H --steps N --resolution R [extra]` would run: the CLI's
    own parser and run_config, so every default (lr, schedule, tokens, face weight, held-out, eval interval,
    checkpointing, fp8) is the CLI's and changes with it."""
    from qwen_identity.cli import tune as cli_tune

    p = argparse.ArgumentParser()
    cli_tune.add_arguments(p)
    args = p.parse_args(["photos", "--out", str(Path(tempfile.gettempdir()) / "bench_head.safetensors"),
                         "--steps", str(steps), "--resolution", resolution, *extra])
    return cli_tune.run_config(args)


class PersonalTuningBench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.pack = import_pack()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # set_per_process_memory_fraction refuses an index-less device: resolve it once
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.bfloat16
        self.cfg = dict(TINY_TRANSFORMER if args.tiny else QWEN_IMAGE_TRANSFORMER)
        if args.layers:
            self.cfg["num_layers"] = args.layers
        self.results: dict = {"bench": "personal_tuning", "config": {}, "env": {}, "inputs": {}, "stages": {},
                              "errors": {}}

    # ---------------------------------------------------------------- bookkeeping
    def log(self, *a):
        print(f"[{self.elapsed():7.1f}s]", *a, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - self.elapsed()

    def save(self):
        if not self.args.out:
            return
        self.results["total_s"] = round(self.elapsed(), 2)
        from qwen_identity.core.files.atomic import atomic_write_text

        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.results, indent=1, default=str))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def gib(self, n: int) -> float:
        return round(n / GIB, 3)

    # ---------------------------------------------------------------- set-up
    def env(self):
        import diffusers
        import transformers

        from qwen_identity.core.runtime.devices import resolve_dtype

        r = dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                 python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 device=str(self.device), threads=torch.get_num_threads(),
                 cli_auto_dtype=str(resolve_dtype("auto", self.device)).replace("torch.", ""),
                 pytorch_cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            r.update(device_name=torch.cuda.get_device_name(self.device), sms=p.multi_processor_count,
                     memory_gib=round(p.total_memory / GIB, 2), cuda=torch.version.cuda)
        self.results["env"] = r
        self.log("env:", {k: v for k, v in r.items() if k != "date"})

    def shapes(self) -> dict:
        """The shapes the CLI's encoders would hand tune_head, for this family and resolution."""
        from qwen_identity.core.denoising.latent_cache import Resolution
        from qwen_identity.core.families import QWEN_IMAGE_1
        from qwen_identity.core.pipeline.defaults import DEFAULT_QWEN3_VL
        from qwen_identity.core.residual.head import FEATURE_WIDTHS

        fam = QWEN_IMAGE_1
        res = Resolution.parse(self.args.resolution)
        h, w = fam.latent_size(res.width, res.height)
        channels = self.cfg["in_channels"] // (fam.patch_size ** 2)   # 16 real (the VAE's), 4 tiny
        vl_name = DEFAULT_QWEN3_VL.split("/")[-1].replace("-Instruct", "")
        d = TINY_FEATURE_DIM if self.args.tiny else next(k for k, v in FEATURE_WIDTHS.items() if v == vl_name)
        return dict(resolution=str(res), latent=[channels, h, w], image_tokens=(h // fam.patch_size) * (w // fam.patch_size),
                    feature_dim=d, feature_model=DEFAULT_QWEN3_VL if not self.args.tiny else "tiny",
                    text_tokens=self.args.text_tokens, hidden=self.cfg["joint_attention_dim"], family=fam.name)

    def make_data(self, s: dict, face_weight: float):
        """One person's encoded photos as the CLI builds PersonalData (training/personal.py): one latent per
        photo at its bucket, one feature per photo, the one prompt's embedding and mask for every photo, a
        face map per photo when face weighting is on (dlib's box there; a central box here)."""
        from qwen_identity.core.tuning import PersonalData

        g = torch.Generator().manual_seed(1234)
        n, (c, h, w) = self.args.photos, s["latent"]
        latents = [torch.randn(c, h, w, generator=g) for _ in range(n)]
        feats = torch.nn.functional.normalize(torch.randn(n, s["feature_dim"], generator=g), dim=-1)
        embeds = torch.randn(s["text_tokens"], s["hidden"], generator=g).to(self.dtype)
        mask = torch.ones(s["text_tokens"], dtype=torch.long)
        face_maps = None
        if face_weight > 0:
            m = torch.zeros(1, h, w)
            m[:, h // 6: h // 6 + h // 2, w // 3: w // 3 + w // 3] = 1.0
            face_maps = [m.clone() for _ in range(n)]
        return PersonalData(latents, feats, [embeds] * n, [mask] * n, face_maps,
                            [f"photo_{i + 1}.jpg" for i in range(n)], list(range(n)))

    def build(self):
        """The real-size (or tiny) transformer, random bf16 weights, built where it runs."""
        from diffusers import QwenImageTransformer2DModel

        with torch.no_grad(), default_dtype_device(self.dtype, self.device):
            tr = QwenImageTransformer2DModel(**self.cfg)
        init_random_(tr, seed=0)
        self.sync()
        return tr

    # ---------------------------------------------------------------- one stage
    def memory_cap(self, gib: float):
        bench = self

        class Cap:
            def __enter__(self):
                if bench.cuda:
                    total = torch.cuda.get_device_properties(bench.device).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), bench.device)

            def __exit__(self, *exc):
                if bench.cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
                return False

        return Cap()

    def stage(self, name: str, rec: dict):
        from qwen_identity.core.families import detect_family
        from qwen_identity.core.tuning import tune_head
        from qwen_identity.training.denoise_pipeline import prepare_transformer

        extra, capped = STAGES[name]
        run = cli_run(extra, self.args.steps, self.args.resolution)
        opts = run.options
        rec.update(cli_flags=extra, options=opts.to_dict(), eval_interval=opts.eval_interval(),
                   gradient_checkpointing=run.gradient_checkpointing, fp8_storage=run.fp8_storage,
                   compile=run.compile, dtype=str(self.dtype).replace("torch.", ""))
        cap = self.args.cap_gib if capped else None
        rec["cap_gib"] = cap if (cap and self.cuda) else None
        if cap and not self.cuda:
            rec["cap_note"] = "no allocator cap on the CPU"
        s = self.results["inputs"]
        data = self.make_data(s, opts.face_weight)

        t = time.perf_counter()
        tr = self.build()
        tr = prepare_transformer(tr, self.device, self.dtype, run.gradient_checkpointing, run.fp8_storage,
                                 "inductor" if run.compile else None)
        self.sync()
        family = detect_family(tr, "benchmark transformer")
        denoiser = family.denoiser(tr)
        alive = weakref.ref(tr)   # the next stage needs this stage's weights gone from the GPU
        rec.update(build_and_prepare_s=round(time.perf_counter() - t, 2), family=family.name,
                   compute_dtype=str(denoiser.dtype).replace("torch.", ""),
                   weight_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in tr.parameters()}))
        del tr
        self.free()
        if self.cuda:
            rec["weights_gib"] = self.gib(torch.cuda.memory_allocated(self.device))
        rec["status"] = "running"
        self.save()

        stamps: list[float] = []
        stopped = {"by_budget": False}

        def progress(step: int, total: int, loss: float) -> None:
            stamps.append(time.perf_counter())
            if step == 1 or step % max(1, total // 10) == 0 or step == total:
                self.log(f"  {name}: step {step}/{total} loss {loss:.4f}")

        def should_stop() -> bool:
            if self.left() <= 0:
                stopped["by_budget"] = True
                return True
            return False

        with self.memory_cap(cap) if cap else _null():
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            try:
                result = tune_head(data, denoiser, opts, progress=progress, should_stop=should_stop)
            except Exception as e:  # noqa: BLE001
                rec["steps_done"] = len(stamps)
                self.peaks(rec)
                if is_oom(e):
                    rec.update(status="oom", fits=False, oom=describe_exc(e))
                    self.log(f"  {name}: out of memory after {len(stamps)} steps")
                    return
                raise
            finally:
                del denoiser
            self.sync()
            total_s = time.perf_counter() - start
            self.peaks(rec)
        m = result.metrics
        rec.update(self.timings(start, stamps, opts, m["steps_done"], bool(m["held_out_photos"])))
        rec.update(tune_head_s=round(total_s, 3), steps=opts.steps, steps_done=m["steps_done"],
                   interrupted=m["interrupted"], stopped_by_budget=stopped["by_budget"],
                   status="done" if m["steps_done"] == opts.steps else "partial",
                   fits=True if cap and self.cuda else None,
                   train_loss_first=result.history[0] if result.history else None,
                   train_loss_last=result.history[-1] if result.history else None,
                   held_out_photos=m["held_out_photos"], held_out_loss=m["held_out_loss"],
                   held_out_loss_none=m["held_out_loss_none"], own_gain_relative=m.get("own_gain_relative"),
                   best_step=m["best_step"], held_out_evals=len(m["held_out_evals"]), head_tokens=result.head.tokens)
        if rec["status"] == "partial" and rec.get("step_s_median"):
            left = opts.steps - m["steps_done"]
            evals_left = sum(1 for k in range(m["steps_done"] + 1, opts.steps + 1)
                             if k % opts.eval_interval() == 0 or k == opts.steps)
            rec["full_run_s_estimate"] = round(total_s + left * rec["step_s_median"]
                                               + evals_left * (rec.get("held_out_eval_s_estimate") or 0), 1)
        del result
        self.free()
        rec["transformer_freed"] = alive() is None

    def peaks(self, rec: dict):
        if self.cuda:
            rec["peak_allocated_gib"] = self.gib(torch.cuda.max_memory_allocated(self.device))
            rec["peak_reserved_gib"] = self.gib(torch.cuda.max_memory_reserved(self.device))
            # a 24 GB card has 22.35 GiB, about 21.5 GiB once the CUDA context is in (bench_train_step's line)
            rec["peak_reserved_within_21_5_gib"] = rec["peak_reserved_gib"] <= CARD_24GB_USABLE_GIB

    def timings(self, start: float, stamps: list[float], opts, done: int, held: bool) -> dict:
        """Per-step seconds from the progress callback (called after each step; the loss it reports is read
        with float(), which waits for the GPU, so the stamps are honest). Steps that end with a held-out
        evaluation (every eval_interval and the last) are reported apart from the training-only steps."""
        if not stamps:
            return {}
        durs = [stamps[0] - start] + [b - a for a, b in zip(stamps, stamps[1:])]
        interval = opts.eval_interval()
        evals = {k for k in range(1, done + 1) if k % interval == 0 or k == opts.steps} if held else set()
        warm = min(self.args.warmup, max(0, done - 1))
        after = [d for k, d in enumerate(durs, 1) if k > warm]
        train = [d for k, d in enumerate(durs, 1) if k > warm and k not in evals]
        ev = [d for k, d in enumerate(durs, 1) if k > warm and k in evals]
        out = {"first_step_s": round(durs[0], 4), "warmup_steps": warm,
               "first_step_note": "from the tune_head call to step 1's callback: set-up, the held-out loss of "
                                  "the prompt alone and of the start head (eval_pairs forwards each), step 1"}
        if after:
            out["step_s_median_all"] = round(statistics.median(after), 4)   # evaluation steps included
        if train:
            med = statistics.median(train)
            out.update(step_s_median=round(med, 4), steps_per_s=round(1 / med, 3) if med > 0 else None,
                       step_s_min=round(min(train), 4), step_s_max=round(max(train), 4), timed_steps=len(train))
        if ev:
            out["eval_step_s_median"] = round(statistics.median(ev), 4)
            if train:
                out["held_out_eval_s_estimate"] = round(statistics.median(ev) - statistics.median(train), 4)
        out["step_s_all"] = [round(d, 4) for d in durs]
        return out

    # ---------------------------------------------------------------- the run
    def run(self) -> int:
        a = self.args
        wanted = [x.strip() for x in a.stages.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in STAGES]
        if unknown:
            raise SystemExit(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
        self.results["config"] = dict(stages=wanted, steps=a.steps, resolution=a.resolution, photos=a.photos,
                                      tiny=a.tiny, budget_s=a.budget_s, min_stage_s=a.min_stage_s, warmup=a.warmup,
                                      cap_gib=a.cap_gib, transformer=self.cfg, layers_override=a.layers,
                                      command="python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
        self.env()
        s = self.shapes()
        self.results["inputs"] = {
            **s, "photos": a.photos,
            "skipped_models": {
                "vae": f"skipped: random N(0,1) latents {s['latent']} per photo stand in for the VAE's normalised "
                       f"latents of a {s['resolution']} photo (all photos in that one aspect bucket)",
                "vlm": f"skipped: random unit-norm features D={s['feature_dim']} stand in for the photos' Qwen3-VL "
                       + ("features (tiny width)" if a.tiny else f"features ({s['feature_model']}, the CLI's default)"),
                "text_encoder": f"skipped: one random prompt embedding [{s['text_tokens']}, {s['hidden']}] (the "
                                "default prompt's length after the template prefix), all-ones mask, for every photo",
                "face_detector": "skipped: a central box stands in for dlib's face box (the CLI's --face-weight 2 "
                                 "weights the loss inside it)"},
            "transformer": "random bf16 weights at the real size, built on the device" if not a.tiny
                           else "tiny config (same code path), random weights",
        }
        self.log("inputs:", {k: v for k, v in s.items()})
        self.save()
        rc = 0
        for name in wanted:
            rec: dict = {}
            need = a.min_stage_s
            if self.left() < need:
                rec.update(status="skipped", reason=(
                    f"time budget: {max(0.0, self.left()):.1f} s left of --budget-s {a.budget_s}, a stage needs at "
                    f"least --min-stage-s {need}"))
                self.results["stages"][name] = rec
                self.log(f"== {name}: skipped ({rec['reason']})")
                self.save()
                continue
            bf = self.results["stages"].get("bf16", {})
            if name == "fp8_24gb" and bf.get("tune_head_s"):
                est = bf["tune_head_s"] * FP8_SLOWDOWN_GUESS
                rec["estimate_s"] = round(est, 1)
                if est > self.left():
                    rec["estimate_note"] = (f"estimated {est:.0f} s (bf16's time x {FP8_SLOWDOWN_GUESS}) > the "
                                            f"{self.left():.0f} s left: expected to stop early by the budget")
            self.results["stages"][name] = rec
            self.log(f"== {name}")
            try:
                self.stage(name, rec)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec["status"] = "error"
                self.results["errors"][name] = describe_exc(e)
                rc = 1
            self.free()   # also after an out-of-memory: the next stage starts from an empty card
            self.save()
        self.save()
        print(self.summary(), flush=True)
        return rc

    def summary(self) -> str:
        env = self.results["env"]
        lines = [f"personal tuning ({self.results['inputs'].get('resolution')}, {self.args.steps} steps, "
                 f"{env.get('device_name', env.get('device'))}, torch {env.get('torch')}, diffusers {env.get('diffusers')})"]
        for name, r in self.results["stages"].items():
            if r.get("status") in ("skipped",):
                lines.append(f"  {name:9s} skipped: {r['reason']}")
                continue
            if r.get("status") in ("error",):
                lines.append(f"  {name:9s} error: {self.results['errors'].get(name)}")
                continue
            parts = [f"{r.get('status')}", f"{r.get('steps_done')}/{r.get('steps', self.args.steps)} steps"]
            if r.get("tune_head_s") is not None:
                parts.append(f"tune_head {r['tune_head_s']:.1f} s")
            if r.get("step_s_median") is not None:
                parts.append(f"{r['step_s_median']:.3f} s/step (median)")
            elif r.get("step_s_median_all") is not None:
                parts.append(f"{r['step_s_median_all']:.3f} s/step (median, every step evaluated)")
            if r.get("weights_gib") is not None:
                parts.append(f"weights {r['weights_gib']:.2f} GiB")
            if r.get("first_step_s") is not None:
                parts.append(f"first {r['first_step_s']:.2f} s")
            if r.get("held_out_eval_s_estimate") is not None:
                parts.append(f"eval +{r['held_out_eval_s_estimate']:.3f} s")
            if r.get("peak_allocated_gib") is not None:
                parts.append(f"peak {r['peak_allocated_gib']:.2f} GiB alloc / {r.get('peak_reserved_gib', 0):.2f} reserved")
            if r.get("cap_gib"):
                parts.append(f"cap {r['cap_gib']} GiB: {'fits' if r.get('fits') else 'OOM'}")
            if r.get("held_out_loss") is not None:
                parts.append(f"held-out {r['held_out_loss']:.4f} (prompt alone {r['held_out_loss_none']:.4f})")
            if r.get("full_run_s_estimate"):
                parts.append(f"full run ~{r['full_run_s_estimate']:.0f} s")
            lines.append(f"  {name:9s} " + ", ".join(parts))
        return "\n".join(lines)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="JSON", help="results (rewritten atomically after every stage)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run: no stage starts with less than --min-stage-s left, and a "
                        "running tune_head is stopped (its own should_stop) when it is spent")
    p.add_argument("--stages", default="bf16,fp8_24gb", help=f"comma list, in order: {', '.join(STAGES)}")
    p.add_argument("--steps", type=int, default=200, help="tuning steps (the CLI's default 200)")
    p.add_argument("--resolution", default=None, help="WxH pixel budget (the CLI's default 768x512; tiny 64x48)")
    p.add_argument("--photos", type=int, default=5, help="photos of the person (3-20 in the docs; >=3 holds one out)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help=f"prompt tokens (default {DEFAULT_TEXT_TOKENS}: the default prompt; tiny 7)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the per-step median")
    p.add_argument("--cap-gib", type=float, default=24.0, help="allocator cap of the fp8_24gb stage (GiB)")
    p.add_argument("--min-stage-s", type=float, default=None,
                   help="a stage starts only with this many seconds of budget left (default 45; tiny 0)")
    p.add_argument("--tiny", action="store_true", help="the tiny test transformer (for the CPU test)")
    p.add_argument("--layers", type=int, default=None,
                   help="fewer transformer blocks (a CPU check of the real widths; never for timings)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = "64x48" if args.tiny else "768x512"
    if args.text_tokens is None:
        args.text_tokens = 7 if args.tiny else DEFAULT_TEXT_TOKENS
    if args.min_stage_s is None:
        args.min_stage_s = 0.0 if args.tiny else 45.0
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if args.tiny and torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)   # tiny matrices: threads only add synchronisation on a busy host
    bench = None
    try:
        bench = PersonalTuningBench(args)
        return bench.run()
    except BaseException as e:
        if bench is not None:   # a failure outside a stage still leaves its JSON
            bench.results["errors"]["run"] = describe_exc(e)
            bench.save()
        raise
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
