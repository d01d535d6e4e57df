"""Sampling on ComfyUI's native Qwen-Image MODEL/VAE through ComfyUI's public sampler API.

`sample_native(...)` is the native path of the QwenImageSampleFromEmbeds node: it turns positive and
negative CONDITIONING (ComfyUI's format, possibly a batch of prompts such as an α sweep) into an IMAGE
for every (conditioning item, seed) cell. It uses only what ComfyUI's own KSampler node uses:
`comfy.sample.fix_empty_latent_channels`, `comfy.sample.prepare_noise`, `comfy.sample.sample` and
`VAE.decode`, so a MODEL from any loader (fp8 `UNETLoader`, GGUF, LoRA-patched, ModelSamplingAuraFlow
with a shift) keeps working: the MODEL is never patched or cloned here.

Guarantees:
- output order: for each conditioning item (α-major), for each seed -> IMAGE [items*seeds, H, W, 3];
- a seed gives the same image alone or inside a batch: each cell's noise is drawn on its own with
  `prepare_noise(one_item_latent, seed)`, exactly what KSampler draws for batch item 0 of that seed
  (for samplers that add noise during sampling - ancestral/SDE - cells are sampled one at a time,
  since ComfyUI draws that noise for the whole batch from one seed);
- cells are batched at most `max_batch` at a time, in batches of nearly equal size (default: as many as
  fit the free memory, at most 16);
- regional conditioning (ConditioningSetMask, TwoPersonRegions) passes through untouched: the one
  `mask` of an entry applies to every cell of a batch, as in KSampler (a MASK batch is refused, and a
  mask of another size than the latent is noted in the log: ComfyUI resizes it);
- progress: `progress(done, total)` in sampler steps over all batches (a `comfy.utils.ProgressBar`
  when none is given); ComfyUI's interrupt (the Cancel button) is honoured after every step.

ComfyUI modules are imported inside the functions; this module imports without ComfyUI.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..core.generation.cell_batches import split_evenly
from ..core.generation.regions import mask_notes
from ..core.generation.sampling import MAX_SEED
from ..core.errors import ModelMismatchError, UserInputError

SIZE_MULTIPLE = 16            # VAE /8 times the transformer's 2x2 patches
log = logging.getLogger(__name__)
AUTO_MAX_BATCH = 16           # a 4x4 α×seed grid in one sampler call when memory allows
# Samplers that draw fresh noise while sampling (from one seed for the whole batch in ComfyUI):
# batching cells would make a seed's image depend on its batch neighbours, so they run one at a time.
_STOCHASTIC_MARKERS = ("ancestral", "sde", "ddpm", "lcm", "seeds_", "sa_solver")
# Conditioning extras that hold one value for the whole batch, never one per prompt row.
_BATCH_WIDE_KEYS = frozenset({"mask"})


def is_stochastic_sampler(sampler_name: str) -> bool:
    return any(m in sampler_name for m in _STOCHASTIC_MARKERS)


def _check_args(seeds, steps, width, height, denoise) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserInputError("no generation seeds were given; pass at least one seed, e.g. 1234")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UserInputError(f"seed(s) {bad} out of range; seeds must be integers in 0..{MAX_SEED}")
    if int(steps) < 1:
        raise UserInputError(f"steps must be at least 1 (got {steps})")
    for name, v in (("width", width), ("height", height)):
        if int(v) <= 0 or int(v) % SIZE_MULTIPLE:
            raise UserInputError(
                f"{name} {v} is not a positive multiple of {SIZE_MULTIPLE}; Qwen-Image needs both sides "
                f"divisible by {SIZE_MULTIPLE} (e.g. {max(SIZE_MULTIPLE, int(v) // SIZE_MULTIPLE * SIZE_MULTIPLE)})")
    if not 0.0 < float(denoise) <= 1.0:
        raise UserInputError(f"denoise must be in (0, 1] (got {denoise})")
    return seeds


def _batch_sizes(conditioning, what: str) -> set[int]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise UserInputError(f"{what} conditioning is empty; connect a CONDITIONING (e.g. from CLIPTextEncode)")
    sizes = set()
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])
                and isinstance(entry[1], dict)):
            raise UserInputError(f"{what} is not a ComfyUI CONDITIONING ([[tensor, dict], ...])")
        sizes.add(int(entry[0].shape[0]))
    return sizes


def conditioning_batch(positive, negative) -> int:
    """The number of conditioning items (rows of the output); batch-1 entries broadcast."""
    sizes = _batch_sizes(positive, "positive") | _batch_sizes(negative, "negative")
    n = max(sizes)
    if sizes - {1, n}:
        raise UserInputError(
            f"conditioning batch sizes {sorted(sizes)} do not agree; every positive/negative entry must have "
            f"the same batch ({n}) or batch 1 (broadcast)")
    return n


def select_conditioning(conditioning, rows: Sequence[int]) -> list:
    """A new CONDITIONING whose batch is `rows` of the input (batch-1 entries are repeated).

    Tensors in the entry's dict with the same batch (the attention mask) are indexed alike, except a
    region `mask` (ConditioningSetMask, TwoPersonRegions): ComfyUI applies that one mask to every image
    of the batch, so it is passed on as it is. The input is never modified.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out = []
    for cond, extra in conditioning:
        b = cond.shape[0]
        idx = torch.zeros_like(index) if b == 1 else index
        new_extra = {}
        for k, v in extra.items():
            if k not in _BATCH_WIDE_KEYS and torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == b:
                v = v[idx.to(v.device)]
            new_extra[k] = v
        out.append([cond[idx.to(cond.device)], new_extra])
    return out


def _text_width(model, family) -> Optional[int]:
    """The text width the diffusion model expects (3584 for Qwen-Image, 4096 for 2.1), if it can be read."""
    for key in family.comfy_text_width_keys:
        try:
            return int(model.get_model_object(key).shape[0])
        except Exception:  # noqa: BLE001 - a wrapper or another layout: skip the friendly check
            continue
    return None


def _check_model(model, vae, positive):
    """The MODEL's model family (core/families/, from its ComfyUI latent format), after checking that the
    MODEL, the VAE and the conditioning belong together."""
    from ..core.families import QWEN_IMAGE_1, find_family

    try:
        latent_format = model.get_model_object("latent_format")
        channels = latent_format.latent_channels
    except Exception:  # noqa: BLE001
        raise UserInputError("the MODEL input is not a ComfyUI diffusion model; connect the MODEL output of "
                             "UNETLoader (Load Diffusion Model) with a Qwen-Image file") from None
    family = find_family(type(latent_format).__name__)
    if family is None or channels != family.latent_channels:
        raise ModelMismatchError(
            f"the MODEL has {channels} latent channels, Qwen-Image has {QWEN_IMAGE_1.latent_channels}; load a "
            f"Qwen-Image diffusion model (e.g. qwen_image_fp8_e4m3fn.safetensors) with UNETLoader")
    vae_channels = getattr(vae, "latent_channels", family.latent_channels)
    if vae_channels != family.latent_channels:
        raise ModelMismatchError(
            f"the VAE has {vae_channels} latent channels, the MODEL's ({family.title}) has {family.latent_channels}; "
            f"load the VAE that belongs to it (qwen_image_vae.safetensors for Qwen-Image) with VAELoader")
    width = _text_width(model, family)
    hidden = int(positive[0][0].shape[-1])
    if width is not None and hidden != width:
        raise ModelMismatchError(
            f"the conditioning is {hidden} wide but the MODEL's text input is {width} wide; encode the prompt "
            f"with the text encoder of the same Qwen-Image generation (CLIPLoader type qwen_image)")
    return family


def _auto_max_batch(model, latent_shape, cells: int) -> int:
    """As many cells per batch as ComfyUI's own memory estimate says fit (1..AUTO_MAX_BATCH)."""
    try:
        per_cell = model.memory_required([2, *latent_shape[1:]])  # x2: cond + uncond
        getter = getattr(model, "get_free_memory", None)  # newer ComfyUI: the patcher's own view (dynamic VRAM)
        if callable(getter):
            free = getter(model.load_device)
        else:   # ComfyUI 0.3.64
            import comfy.model_management as mm

            free = mm.get_free_memory(model.load_device)
        if not (callable(getattr(model, "is_dynamic", None)) and model.is_dynamic()):
            free = free - model.model_size() + model.loaded_size()   # the weights still to load need room too
        fit = int(max(free, 0) // max(per_cell, 1))
    except Exception:  # noqa: BLE001 - an exotic MODEL wrapper: stay safe
        fit = 1
    return max(1, min(cells, AUTO_MAX_BATCH, fit))


def sample_native(model, vae, positive, negative, seeds, steps, cfg, width, height,
                  sampler_name: str = "euler", scheduler: str = "simple", denoise: float = 1.0,
                  progress: Optional[Callable[[int, int], None]] = None, *,
                  max_batch: Optional[int] = None) -> torch.Tensor:
    """Sample every (conditioning item, seed) cell with ComfyUI's sampler and decode with `vae`.

    model: ComfyUI MODEL (ModelPatcher) of Qwen-Image; vae: ComfyUI VAE; positive/negative: CONDITIONING
    with batch B (or 1); seeds: list of ints. Returns IMAGE [B*len(seeds), height, width, 3] in 0..1,
    ordered α-major (all seeds of item 0, then item 1, ...).
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils

    seeds = _check_args(seeds, steps, width, height, denoise)
    steps = int(steps)
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise UserInputError(f"unknown sampler_name {sampler_name!r}; use one of ComfyUI's: "
                             f"{', '.join(comfy.samplers.KSampler.SAMPLERS)}")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise UserInputError(f"unknown scheduler {scheduler!r}; use one of ComfyUI's: "
                             f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
    n_items = conditioning_batch(positive, negative)
    family = _check_model(model, vae, positive)
    for name, v in (("width", width), ("height", height)):
        if int(v) % family.size_multiple:
            m = family.size_multiple
            raise UserInputError(f"{name} {v} is not a multiple of {m}; {family.title} needs both sides divisible by "
                                 f"{m} (e.g. {max(m, int(v) // m * m)})")
    lat_h, lat_w = family.latent_size(int(width), int(height))
    for what, cond in (("positive", positive), ("negative", negative)):
        for note in mask_notes(cond, lat_h, lat_w, what):
            log.warning("QwenImageSampleFromEmbeds: %s", note)

    cells = [(item, seed) for item in range(n_items) for seed in seeds]
    one = torch.zeros([1, family.latent_channels, lat_h, lat_w],
                      device=comfy.model_management.intermediate_device())
    one = comfy.sample.fix_empty_latent_channels(model, one)  # -> [1, 16, 1, h, w] for Qwen-Image
    if is_stochastic_sampler(sampler_name):
        max_batch = 1
    elif max_batch is None:
        max_batch = _auto_max_batch(model, one.shape, len(cells))
    max_batch = max(1, int(max_batch))
    chunks = split_evenly(cells, max_batch)
    total = steps * len(chunks)
    if progress is None:
        bar = comfy.utils.ProgressBar(total)
        progress = lambda done, tot: bar.update_absolute(done, tot)  # noqa: E731
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED

    images = []
    for c, chunk in enumerate(chunks):
        comfy.model_management.throw_exception_if_processing_interrupted()
        latent = one.repeat(len(chunk), *([1] * (one.ndim - 1)))
        noise = torch.cat([comfy.sample.prepare_noise(one, seed) for _, seed in chunk])
        rows = [item for item, _ in chunk]
        base = c * steps

        def callback(step, x0, x, total_steps, _base=base):
            progress(_base + min(step + 1, steps), total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        samples = comfy.sample.sample(
            model, noise, steps, float(cfg), sampler_name, scheduler,
            select_conditioning(positive, rows), select_conditioning(negative, rows), latent,
            denoise=float(denoise), callback=callback, disable_pbar=disable_pbar, seed=chunk[0][1])
        decoded = vae.decode(samples)
        if decoded.ndim == 5:  # video VAE: [B, T, H, W, C] -> [B*T, H, W, C] (T = 1 here)
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        images.append(decoded.float().cpu())
        progress(base + steps, total)
    return torch.cat(images, dim=0)
