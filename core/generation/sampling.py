"""Qwen-Image sampling from CONDITIONING on a diffusers `QwenImagePipeline` (the diffusers path).

`sample` is our own denoising loop over the pipeline's components (transformer, scheduler, VAE). At
the same seeds it equals diffusers' `QwenImagePipeline.__call__` (same sigmas and dynamic shift,
same true-CFG with its norm rescale, same Euler step, same VAE decode; a test checks latents and
images against the stock pipeline), and it is built for speed:
- several cells (one prompt item × one seed) share a transformer forward, up to `max_batch` cells, in
  batches of nearly equal size (9 cells at max_batch 4 go 3+3+3, not 4+4+1: `core/generation/cell_batches.py`);
- the positive and negative rows of those cells go through ONE forward: the text is padded to the
  longest row and masked (the transformer ignores masked text tokens, and padding at the end does not
  move the text RoPE positions of valid tokens);
- the padded text batches, masks, row maps, timesteps and RoPE shapes are built once per active
  entry set (usually once), never per step.

Each cell's initial noise comes from its own `torch.Generator("cpu").manual_seed(seed)`, drawn on the
CPU in the transformer's dtype and then moved, so a seed gives the same image alone or in a batch
(exactly the noise diffusers draws for `generator=torch.Generator().manual_seed(seed)`).

Step windows: step i of N has percent p = i / N (the fraction of steps done, which is 1 − the
unshifted sigma of diffusers' schedule; ComfyUI's "simple" scheduler maps its percents the same way).
An entry with `start_percent` / `end_percent` is active at step i when start <= p <= end (inclusive,
as in ComfyUI). When several entries of one side are active, their predictions are averaged, weighted
by their `strength` key (default 1), as ComfyUI combines conditionings. Every step must have at least
one active positive entry (and negative entry when CFG is on).

Regions: an entry with ComfyUI's conditioning `mask` (ConditioningSetMask with set_cond_area "default",
TwoPersonRegions) weighs its prediction per latent pixel by the mask (resized to the latent size as
ComfyUI does, bilinear; × `mask_strength`), so the active entries' predictions are blended pixel by
pixel: (a·v_A + b·v_B) / (a + b), as ComfyUI blends its denoised predictions (for a flow model the
same blend, since both are linear in the velocity at a shared x and sigma). Pixels that no active
entry covers are an error (ComfyUI would predict zero there). `core/generation/regions.py` explains.

Output order: for each conditioning batch item (α-major after InjectResidual), for each seed.

Speed options (`compile`, `cuda_graphs`, both off by default) live in `core/generation/acceleration.py`;
they change no arithmetic (outputs match the plain loop within bf16 noise).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .acceleration import (GraphedForward, PrecomputedModulation, compile_transformer, has_offload_hooks,
                           real_rope)
from .cell_batches import split_evenly
from .regions import entry_region, packed_weights
from .true_cfg import true_cfg_tokens
from ..residual.conditioning import entry_mask
from ..errors import NotEnoughMemoryError, UserInputError
from ..families import DEFAULT_FAMILY, FAMILIES, find_family
from ..pipeline.defaults import DEFAULT_NEGATIVE_PROMPT  # noqa: F401  (re-exported for the nodes)
from ..residual.injection import parse_number_list

DEFAULT_STEPS = 28
DEFAULT_CFG = 4.5
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 768
DEFAULT_SEEDS = "1234,5678,9999"
DEFAULT_MAX_BATCH = 4
OFFLOAD_CHOICES = ("none", "model_cpu_offload", "group", "sequential")
SIZE_MULTIPLE = 16  # VAE factor 8 × the transformer's 2x2 patches
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # KSampler's seed range; torch.Generator.manual_seed takes all of it


# --------------------------------------------------------------------------------------------- inputs
def parse_seeds(text: str | Iterable[int]) -> list[int]:
    """"1234, 5678" -> [1234, 5678]; empty, unparsable or out-of-range seeds are a UserInputError."""
    seeds = parse_number_list(text, int, "seed", DEFAULT_SEEDS)
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise UserInputError(f"seed {s} is out of range: use 0..{MAX_SEED}.")
    return seeds


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or v < SIZE_MULTIPLE:
            raise UserInputError(f"{name}={v} must be a whole number of at least {SIZE_MULTIPLE}.")
        if v % SIZE_MULTIPLE:
            lo, hi = v // SIZE_MULTIPLE * SIZE_MULTIPLE, (v // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE
            raise UserInputError(f"{name}={v} is not a multiple of {SIZE_MULTIPLE} (Qwen-Image's VAE factor 8 × 2x2 "
                                 f"patches): use {lo or SIZE_MULTIPLE} or {hi}.")


# -------------------------------------------------------------------------------------------- loading
@dataclass
class QwenImageBundle:
    """What LoadQwenImageDiffusers outputs (ComfyUI type QWEN_IMAGE_PIPELINE)."""

    pipeline: object
    model_id: str
    device: torch.device   # where computation runs (the execution device under offload)
    dtype: torch.dtype
    offload: str = "none"
    fp8_storage: bool = False


def load_qwen_image_pipeline(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                             offload: str = "none", search_dirs: Sequence = (), token: str | None = None,
                             cache_dir: str | None = None, fp8_storage: bool = False) -> QwenImageBundle:
    """A diffusers Qwen-Image pipeline from a folder, a models-folder name or a hub id.

    Memory options (bench/RESULTS.md has the measured peaks): `offload="group"` streams the transformer's
    blocks (and the text encoder's layers) from pinned CPU memory with CUDA-stream prefetch, 2.3 GiB peak
    for the transformer, no precision loss; `fp8_storage=True` keeps the transformer's weights in
    float8_e4m3fn and computes in `dtype` (diffusers layerwise casting): half the memory, some precision
    lost (twice the bf16 noise in the final latents); the weights are read into fp8 one tensor at a time, so
    loading needs no more CPU memory than the fp8 model."""
    from ..runtime.devices import resolve_device, resolve_dtype
    from ..runtime.model_sources import read_config, resolve_model_dir

    if offload not in OFFLOAD_CHOICES:
        raise UserInputError(f"unknown offload {offload!r}: use one of {', '.join(OFFLOAD_CHOICES)}.")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if offload != "none" and dev.type != "cuda":
        raise UserInputError(f"offload={offload!r} moves weights between CPU and a GPU; the device is {dev}. "
                             "Use offload none on CPU, or choose a CUDA device.")
    folder = resolve_model_dir(source, search_dirs=search_dirs, token=token, cache_dir=cache_dir,
                               what="Qwen-Image diffusers pipeline")
    index = read_config(folder)
    cls = index.get("_class_name", "")
    family = find_family(folder)
    if family is None or not family.matches_index(index):
        known = " or ".join(c for f in FAMILIES for c in f.pipeline_classes)
        raise UserInputError(f"{folder} holds a {cls or 'non-pipeline'} folder, not a {known} (its "
                             f"model_index.json must name one of them): point at Qwen/Qwen-Image's or "
                             "Qwen/Qwen-Image-2.1's folder.")
    try:   # safetensors only: no pickles. fp8: the transformer is read tensor by tensor into fp8 storage, so
        # its bf16 weights are never whole in memory (38 GiB for Qwen-Image)
        components = ({"transformer": family.load_transformer(folder, "cpu", dt, torch.float8_e4m3fn)}
                      if fp8_storage else {})
        pipe = family.load_pipeline(folder, dt, **components)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"cannot load the Qwen-Image pipeline from {folder} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the folder is incomplete or damaged.") from None
    pipe.set_progress_bar_config(disable=True)
    if offload == "group":
        from diffusers.hooks import apply_group_offloading

        pipe.transformer.enable_group_offload(onload_device=dev, offload_type="block_level", num_blocks_per_group=1,
                                              use_stream=True)
        apply_group_offloading(pipe.text_encoder, onload_device=dev, offload_type="leaf_level")
        pipe.vae.to(dev)
    elif offload == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    return QwenImageBundle(pipeline=pipe, model_id=str(source), device=dev, dtype=dt, offload=offload,
                           fp8_storage=bool(fp8_storage))


def _pipe_and_device(bundle) -> tuple[object, torch.device]:
    if isinstance(bundle, QwenImageBundle):
        return bundle.pipeline, bundle.device
    return bundle, bundle._execution_device


def encode_text(bundle, prompts: str | list[str], references: Sequence | None = None,
                reference_resolution: int = 1024) -> list:
    """CONDITIONING (ComfyUI layout, tensors on the CPU) from the pipeline's own text encoder. `references`
    (PIL images; Qwen-Image 2.1 only): the person's photos as the model's own reference images, encoded
    with the prompt as its stock pipeline does (`ModelFamily.encode_references`), at about
    `reference_resolution`² pixels each."""
    from ..residual.conditioning import make_conditioning
    from .prompt_encoding import PromptEmbeds, encode_prompts

    pipe, device = _pipe_and_device(bundle)
    if getattr(pipe, "text_encoder", None) is None:
        raise UserInputError("this Qwen-Image pipeline was loaded without its text encoder: load the full folder.")
    family = find_family(pipe) or DEFAULT_FAMILY
    if references:
        return family.encode_references(pipe, prompts, list(references), device, reference_resolution)
    text_encoder, tokenizer = family.pipeline_text_stack(pipe)
    enc = encode_prompts(text_encoder, tokenizer, prompts, device=device)
    return make_conditioning(PromptEmbeds(enc.embeds.cpu(), enc.mask.cpu()))


# ------------------------------------------------------------------------------------------- sampling
@dataclass
class _Entry:
    embeds: torch.Tensor  # [B, S, H] on the device, in the transformer dtype
    mask: torch.Tensor    # [B, S] bool
    start: float
    end: float
    strength: float
    region: torch.Tensor | None = None  # [L, C] per-feature weight of a masked entry (packed layout)

    def row(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = item if self.embeds.shape[0] > 1 else 0
        return self.embeds[i], self.mask[i]


def _entries(conditioning, side: str, device, dtype, width: int | None,
             latent: tuple[int, int, int] | None = None) -> tuple[list[_Entry], int]:
    """The side's entries; `latent` = (lat_h, lat_w, channels) to read region masks (else they are refused)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise UserInputError(f"the {side} conditioning is empty: connect a text-encode node.")
    entries, sizes = [], set()
    for item in conditioning:
        try:
            embeds, extra = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise UserInputError(f"the {side} conditioning is not in ComfyUI's format [[tensor, dict], ...].") from None
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise UserInputError(f"{side} conditioning tensors must be [B, S, H]; got {getattr(embeds, 'shape', None)}.")
        if width is not None and embeds.shape[-1] != width:
            from ..residual.head import describe_text_width

            raise UserInputError(
                f"the {side} conditioning has H={embeds.shape[-1]} ({describe_text_width(embeds.shape[-1])}) but this "
                f"Qwen-Image transformer takes H={width} ({describe_text_width(width)}): encode the prompt with the "
                "text encoder that belongs to this model.")
        for key in ("area", "control", "gligen") + (("mask",) if latent is None else ()):
            if extra.get(key) is not None:
                raise UserInputError(f"the {side} conditioning carries {key!r}, which the diffusers path does not "
                                     "support: use the native MODEL+VAE inputs for area/controlled conditioning.")
        region = None
        if latent is not None:
            lat_h, lat_w, channels = latent
            weights = entry_region(extra, lat_h, lat_w, f"the {side} conditioning")
            if weights is not None:
                region = packed_weights(weights, channels).to(device=device, dtype=torch.float32)
        mask = entry_mask(embeds, extra).bool()
        entries.append(_Entry(embeds.to(device=device, dtype=dtype), mask.to(device),
                              float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0)),
                              float(extra.get("strength", 1.0)), region))
        sizes.add(embeds.shape[0])
    batch = max(sizes)
    if sizes - {1, batch}:
        raise UserInputError(f"the {side} conditioning mixes batch sizes {sorted(sizes)}: every entry must have the "
                             f"same batch size (or 1).")
    return entries, batch


def step_percent(i: int, steps: int) -> float:
    """The percent ComfyUI's start_percent/end_percent refer to, for step i of `steps` (0-based)."""
    return i / steps


def active_entries(entries: list[_Entry], i: int, steps: int) -> tuple[int, ...]:
    p = step_percent(i, steps)
    return tuple(k for k, e in enumerate(entries) if e.start <= p <= e.end)


@dataclass
class _Plan:
    """Everything one transformer forward needs for a given set of active entries (built once)."""

    text: torch.Tensor
    mask: torch.Tensor | None
    row_cell: torch.Tensor      # [R] cell index of each row
    pos_rows: torch.Tensor      # indices of the positive rows
    pos_weight: torch.Tensor    # [n_cells, 1, 1] summed weights (positive), [n_cells, L, C] with regions
    neg_rows: torch.Tensor | None
    neg_weight: torch.Tensor | None  # [n_cells, 1, 1], or [n_cells, L, C] with regions
    row_weight: torch.Tensor    # [R, 1, 1], or [R, L, C] when an active entry has a region mask
    img_shapes: list = field(default_factory=list)
    graph: "GraphedForward | None" = None  # cuda_graphs: this plan's recorded forward


@dataclass
class SampleResult:
    images: torch.Tensor | None         # [N, H, W, 3] float32 0..1 on the CPU (ComfyUI IMAGE); None if not decoded
    latents: torch.Tensor | None        # packed final latents [N, L, C] on the CPU (when asked for)
    cells: list[tuple[int, int]]        # (conditioning item, seed) per image
    seconds: float


def sample(bundle, positive: list, negative: list | None, seeds: str | Sequence[int] = DEFAULT_SEEDS,
           steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, width: int = DEFAULT_WIDTH,
           height: int = DEFAULT_HEIGHT, max_batch: int = DEFAULT_MAX_BATCH,
           progress: Callable[[int, int], None] | None = None, interrupt: Callable[[], None] | None = None,
           return_latents: bool = False, decode: bool = True, compile: bool = False,
           cuda_graphs: bool = False) -> SampleResult:
    """Images for every (positive item, seed) cell, item-major, by the sampling loop of the pipeline's
    model family (core/families/; Qwen-Image 1.x: `sample_qwen_image_1`, the module docstring)."""
    pipe, _ = _pipe_and_device(bundle)
    family = find_family(pipe) or DEFAULT_FAMILY
    return family.sample(bundle, positive, negative, seeds=seeds, steps=steps, cfg=cfg, width=width, height=height,
                         max_batch=max_batch, progress=progress, interrupt=interrupt, return_latents=return_latents,
                         decode=decode, compile=compile, cuda_graphs=cuda_graphs)


def sample_qwen_image_1(bundle, positive: list, negative: list | None, seeds: str | Sequence[int] = DEFAULT_SEEDS,
                        steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, width: int = DEFAULT_WIDTH,
                        height: int = DEFAULT_HEIGHT, max_batch: int = DEFAULT_MAX_BATCH,
                        progress: Callable[[int, int], None] | None = None,
                        interrupt: Callable[[], None] | None = None, return_latents: bool = False,
                        decode: bool = True, compile: bool = False, cuda_graphs: bool = False) -> SampleResult:
    """Qwen-Image 1.x's loop (the MMDiT on 2x2-packed latents): see the module docstring."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline, calculate_shift

    t_start = time.perf_counter()
    seeds = parse_seeds(seeds)
    check_size(width, height)
    check_sampling_options(steps, max_batch, cfg)
    pipe, device = _pipe_and_device(bundle)
    transformer, vae = pipe.transformer, pipe.vae
    if transformer is None or vae is None:
        raise UserInputError("this Qwen-Image pipeline has no transformer or VAE: load the full pipeline folder.")
    if transformer.config.guidance_embeds:
        raise UserInputError("this transformer is guidance-distilled (guidance_embeds=True); the pack samples "
                             "Qwen-Image with true CFG only.")
    dtype = transformer.dtype
    text_width = transformer.config.joint_attention_dim
    vsf = pipe.vae_scale_factor
    lat_h, lat_w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
    channels = transformer.config.in_channels // 4
    latent = (lat_h, lat_w, channels)
    pos, neg, n_items, do_cfg = conditioning_entries(positive, negative, cfg, steps, device, dtype, text_width,
                                                     latent)

    if compile:
        compile_transformer(transformer)
    hooks = has_offload_hooks(transformer)
    use_graphs = bool(cuda_graphs) and torch.device(device).type == "cuda" and not hooks
    fast = (bool(compile) or use_graphs) and not hooks  # also: modulation precomputed once per chunk
    graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None

    img_shape = (1, height // vsf // 2, width // vsf // 2)
    image_seq_len = (lat_h // 2) * (lat_w // 2)
    sched_cfg = pipe.scheduler.config
    if steps == 1 and sched_cfg.get("shift_terminal"):  # diffusers' terminal stretch divides 0 by 0 at one step
        raise UserInputError("steps=1 does not work with Qwen-Image's scheduler (its shift_terminal stretch is "
                             "undefined for a single step and every image would be NaN): use at least 2 steps.")
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, sched_cfg.get("base_image_seq_len", 256), sched_cfg.get("max_image_seq_len", 4096),
                         sched_cfg.get("base_shift", 0.5), sched_cfg.get("max_shift", 1.15))

    cells = [(item, seed) for item in range(n_items) for seed in seeds]
    chunks = split_evenly(cells, max_batch)
    total, done = steps * len(chunks), 0
    images, finals = [], []
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)

    def denoise(chunk):   # its own frame: after an out-of-memory error its tensors go with it
        nonlocal done
        noise = [torch.randn((1, 1, channels, lat_h, lat_w), generator=torch.Generator("cpu").manual_seed(seed),
                             dtype=dtype) for _, seed in chunk]
        latents = torch.cat(noise).to(device)
        latents = QwenImagePipeline._pack_latents(latents, len(chunk), channels, lat_h, lat_w)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        plans: dict[tuple, _Plan] = {}
        modulation = PrecomputedModulation.enter(transformer, timesteps, latents.dtype) if fast else None
        try:
            for i, t in enumerate(timesteps):
                if interrupt is not None:
                    interrupt()
                key = (active_entries(pos, i, steps), active_entries(neg, i, steps) if do_cfg else ())
                plan = plans.get(key)
                if plan is None:
                    plan = plans[key] = _build_plan(chunk, pos, neg, key, device, dtype, img_shape)
                if modulation is not None:
                    modulation.set_step(i)
                rows = latents.index_select(0, plan.row_cell)
                timestep = t.expand(rows.shape[0]).to(latents.dtype)
                if use_graphs:
                    if plan.graph is None:
                        plan.graph = GraphedForward(lambda r, ts, _p=plan: _forward(transformer, _p, r, ts), rows,
                                                    timestep, graph_pool)
                        pred = plan.graph.first_output
                    else:
                        pred = plan.graph(rows, timestep)
                else:
                    pred = _forward(transformer, plan, rows, timestep)
                noise_pred = _combine(pred, plan, plan.pos_rows, plan.pos_weight, len(chunk))
                if do_cfg:
                    neg_pred = _combine(pred, plan, plan.neg_rows, plan.neg_weight, len(chunk))
                    noise_pred = true_cfg_tokens(noise_pred, neg_pred, cfg)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                done += 1
                if progress is not None:
                    progress(done, total)
        finally:
            if modulation is not None:
                modulation.exit()
        if return_latents:
            finals.append(latents.detach().float().cpu())
        if not decode:
            return
        lat = QwenImagePipeline._unpack_latents(latents, height, width, vsf).to(vae.dtype)
        lat = lat / latents_std.to(lat.device, lat.dtype) + latents_mean.to(lat.device, lat.dtype)
        with torch.no_grad():
            decoded = vae.decode(lat, return_dict=False)[0][:, :, 0]
        images.append((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu())

    oom_batch = 0
    try:
        for chunk in chunks:
            denoise(chunk)
    except torch.OutOfMemoryError:   # leave the handler first: the traceback holds denoise's frame
        oom_batch = len(chunk)
    if oom_batch:
        _raise_out_of_memory(oom_batch, max_batch, width, height, device)
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    return SampleResult(images=torch.cat(images) if decode else None, latents=torch.cat(finals) if return_latents else None,
                        cells=cells, seconds=time.perf_counter() - t_start)


sample_qwen_image_1 = torch.no_grad()(sample_qwen_image_1)


def _raise_out_of_memory(batch: int, max_batch: int, width: int, height: int, device) -> None:
    """A CUDA out-of-memory while sampling, as an error that says what to lower (the CLI exits 2 with it)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fix = (f"set max_batch lower (now {max_batch}; 1 uses the least memory)" if batch > 1 else
           "max_batch is already 1")
    raise NotEnoughMemoryError(
        f"{device} ran out of memory while denoising {batch} image(s) of {width}x{height} at once: {fix}, make the "
        "images smaller, or load the pipeline with offload 'group' or fp8_storage on (LoadQwenImageDiffusers; "
        "CLI --offload group / --fp8-storage), and close other programs using the GPU.")


def _forward(transformer, plan: _Plan, rows: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    with real_rope() if getattr(transformer, "_qwen_identity_compiled", False) else contextlib.nullcontext():
        return transformer(hidden_states=rows, timestep=timestep / 1000, guidance=None,
                           encoder_hidden_states_mask=plan.mask, encoder_hidden_states=plan.text,
                           img_shapes=plan.img_shapes, attention_kwargs={}, return_dict=False)[0]


def check_sampling_options(steps, max_batch, cfg) -> None:
    """The loop options every family's sampler takes: whole steps and max_batch of at least 1, a finite cfg."""
    if int(steps) != steps or steps < 1:
        raise UserInputError(f"steps={steps} must be a whole number of at least 1.")
    if int(max_batch) != max_batch or max_batch < 1:
        raise UserInputError(f"max_batch={max_batch} must be at least 1 (cells per transformer batch).")
    if not math.isfinite(cfg):
        raise UserInputError(f"cfg={cfg} must be a finite number.")


def conditioning_entries(positive: list, negative: list | None, cfg: float, steps: int, device, dtype,
                         text_width: int, latent: tuple[int, int, int] | None = None
                         ) -> tuple[list[_Entry], list[_Entry], int, bool]:
    """(positive entries, negative entries, positive items, true CFG on) for any family's sampler, checked before
    any work: the negative side is read only with true CFG (cfg > 1) and must have one item or as many as the
    positive; on each side some entry is active at every step, and with region masks every latent pixel is
    covered. `latent` = (lat_h, lat_w, channels) to read region masks (families without them pass None)."""
    pos, n_items = _entries(positive, "positive", device, dtype, text_width, latent)
    do_cfg = cfg > 1 and negative is not None
    neg, n_neg = _entries(negative, "negative", device, dtype, text_width, latent) if do_cfg else ([], 1)
    if do_cfg and n_neg not in (1, n_items):
        raise UserInputError(f"the negative conditioning has batch {n_neg} but the positive has {n_items}: give one "
                             "negative prompt, or one per positive item.")
    for side, entries in (("positive", pos), ("negative", neg)):
        for i in range(steps if entries else 0):
            active = active_entries(entries, i, steps)
            if not active:
                raise UserInputError(f"no {side} conditioning is active at step {i + 1} of {steps} (percent "
                                     f"{step_percent(i, steps):.3f}): the start_percent/end_percent windows leave a gap.")
            _check_coverage(entries, active, side, i, steps)
    return pos, neg, n_items, do_cfg


def _check_coverage(entries: list[_Entry], active: tuple, side: str, i: int, steps: int) -> None:
    """With region masks, every latent pixel needs some weight from the active entries (ComfyUI would
    predict zero where none covers it)."""
    regions = [entries[k] for k in active]
    if all(e.region is not None for e in regions):
        total = sum(e.region * e.strength for e in regions)
        if bool((total <= 0).any()):
            frac = float((total <= 0).float().mean())
            raise UserInputError(f"at step {i + 1} of {steps} the {side} conditioning's region masks leave {frac:.0%} "
                                 "of the picture uncovered (no prediction there): make the masks cover the whole "
                                 "picture (TwoPersonRegions does), or add an unmasked entry.")


def _combine(pred: torch.Tensor, plan: _Plan, rows: torch.Tensor, weight: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Weighted mean of the rows' predictions per cell (a plain slice when each cell has one row).

    Weights are per row ([R, 1, 1]) or, with region masks, per row and packed latent feature
    ([R, L, C]): the per-pixel blend of the entries' predictions."""
    if rows.shape[0] == n_cells:
        return pred.index_select(0, rows)
    picked = pred.index_select(0, rows) * plan.row_weight.index_select(0, rows).to(pred.dtype)
    out = torch.zeros((n_cells, *pred.shape[1:]), dtype=pred.dtype, device=pred.device)
    out.index_add_(0, plan.row_cell.index_select(0, rows), picked)
    return out / weight.to(pred.dtype)


def _build_plan(chunk, pos, neg, key, device, dtype, img_shape) -> _Plan:
    texts, masks, row_cell, weights, regions, sides = [], [], [], [], [], []
    for side, (entries, active) in enumerate(((pos, key[0]), (neg, key[1]))):
        for c, (item, _seed) in enumerate(chunk):
            for k in active:
                e, m = entries[k].row(item)
                texts.append(e)
                masks.append(m)
                row_cell.append(c)
                weights.append(entries[k].strength)
                regions.append(entries[k].region)
                sides.append(side)
    s_max = max(t.shape[0] for t in texts)
    text = torch.zeros((len(texts), s_max, texts[0].shape[-1]), dtype=dtype, device=device)
    mask = torch.zeros((len(texts), s_max), dtype=torch.bool, device=device)
    for r, (e, m) in enumerate(zip(texts, masks)):
        text[r, :e.shape[0]] = e
        mask[r, :m.shape[0]] = m
    row_cell_t = torch.tensor(row_cell, device=device)
    sides_t = torch.tensor(sides, device=device)
    w = torch.tensor(weights, dtype=torch.float32, device=device)[:, None, None]
    shape = next((r.shape for r in regions if r is not None), None)
    if shape is not None:  # region masks: a weight per row and packed latent feature
        w = torch.stack([w[r] * (reg if reg is not None else torch.ones(shape, device=device))
                         for r, reg in enumerate(regions)])
    n = len(chunk)

    def summed(side):
        out = torch.zeros((n, *w.shape[1:]), dtype=torch.float32, device=device)
        sel = sides_t == side
        return out.index_add_(0, row_cell_t[sel], w[sel])

    pos_rows = (sides_t == 0).nonzero(as_tuple=True)[0]
    neg_rows = (sides_t == 1).nonzero(as_tuple=True)[0]
    return _Plan(text=text, mask=None if bool(mask.all()) else mask, row_cell=row_cell_t, pos_rows=pos_rows,
                 pos_weight=summed(0), neg_rows=neg_rows if len(neg_rows) else None,
                 neg_weight=summed(1) if len(neg_rows) else None, row_weight=w,
                 img_shapes=[[img_shape]] * len(texts))
