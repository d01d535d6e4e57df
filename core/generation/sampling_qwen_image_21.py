"""Qwen-Image 2.1 sampling from CONDITIONING on a diffusers `QwenImage21Pipeline` (the diffusers path).

Our loop over the pipeline's components equals `QwenImage21Pipeline.__call__` at the same seeds (a test
checks images against the stock pipeline): the same sigmas (the model's `sample_sigmas` when it has
them and `steps` matches their count, else 1 → 1/steps) and dynamic shift, the same noise (each cell
from its own `torch.Generator("cpu").manual_seed(seed)`, as the stock pipeline draws it for one
image), the same transformer call (the text followed by the target image's slots, `img_mask`), the same
true CFG (`neg + cfg · (pos − neg)`, no rescale: that is what 2.1's pipeline does), the same Euler
step and VAE decode (RGBA; IMAGE keeps RGB).

KV cache, kept on as in the stock pipeline: with `causal_condition` the text tokens are modulated at
t = 0, so their keys and values do not change between steps; each conditioning entry's first forward
fills its cache ("extract") and later steps only compute the target image ("cached"). The identity
residual is part of the conditioning (InjectResidual adds E + α·R once, before sampling), so the cache
stays valid for the whole run.

Like the 1.x path: cells (conditioning item × seed) go through the transformer in batches of up to
`max_batch` (nearly equal sizes), entries with `start_percent`/`end_percent` are active on their step
window and several active entries are averaged by `strength`; output order is item-major. Not on this
path: region masks (ConditioningSetMask), and the speed options `compile` / `cuda_graphs` (refused
with a message, so nothing silently differs).

Reference images (2.1's own identity input): an entry encoded with them (`encode_text(..., references=)`,
QwenImage21.encode_references) carries their latent tokens and the text positions that stand for them;
its forwards put the reference tokens before the target's, as the stock pipeline's `image=` does, and
they are cached with the text (they are modulated at t = 0 too).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserInputError
from .cell_batches import split_evenly


def _check_size(family, width: int, height: int) -> None:
    m = family.size_multiple
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or v < m or v % m:
            lo, hi = max(m, v // m * m), (v // m + 1) * m
            raise UserInputError(f"{name}={v} must be a multiple of {m} for Qwen-Image 2.1 (16x VAE, 2x2 latent "
                                 f"tokens per slot): use {lo} or {hi}.")


def _sigmas(pipe, steps: int) -> np.ndarray:
    configured = getattr(pipe.config, "sample_sigmas", None) if hasattr(pipe, "config") else None
    if configured is not None and len(configured) == steps:
        return np.asarray(configured, dtype=np.float64)
    return np.linspace(1.0, 1 / steps, steps)


def _references(conditioning, entries, side: str, device, dtype) -> list[dict | None]:
    """Per entry, its reference images (QwenImage21.encode_references) on the device, or None."""
    from ..families.qwen_image_21 import REFERENCES_KEY

    out = []
    for (_, extra), entry in zip(conditioning, entries):
        refs = extra.get(REFERENCES_KEY)
        if refs is None:
            out.append(None)
            continue
        if refs["slots"].shape[0] != entry.embeds.shape[1]:
            raise UserInputError(f"the {side} conditioning's reference images do not match its text (slots for "
                                 f"{refs['slots'].shape[0]} tokens, text of {entry.embeds.shape[1]}): encode the "
                                 "prompt and the references together again.")
        out.append({"slots": refs["slots"].to(device), "tokens": refs["tokens"].to(device=device, dtype=dtype),
                    "shapes": [tuple(s) for s in refs["shapes"]]})
    return out


def sample_qwen_image_21(bundle, positive: list, negative: list | None, seeds: str | Sequence[int] = "1234",
                         steps: int = 40, cfg: float = 1.0, width: int = 1024, height: int = 1024,
                         max_batch: int = 4, progress: Callable[[int, int], None] | None = None,
                         interrupt: Callable[[], None] | None = None, return_latents: bool = False,
                         decode: bool = True, compile: bool = False, cuda_graphs: bool = False):
    """Images for every (positive item, seed) cell, item-major; see the module docstring."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    from ..denoising.flow_matching import attention_mask_or_none
    from ..families.qwen_image_21 import QWEN_IMAGE_21, target_slot_mask
    from .sampling import (SampleResult, _pipe_and_device, _raise_out_of_memory, active_entries,
                           check_sampling_options, conditioning_entries, parse_seeds)

    family = QWEN_IMAGE_21
    t_start = time.perf_counter()
    seeds = parse_seeds(seeds)
    _check_size(family, width, height)
    check_sampling_options(steps, max_batch, cfg)
    if compile or cuda_graphs:
        raise UserInputError("the compile / CUDA-graph speed options are not available for Qwen-Image 2.1 on the "
                             "diffusers path yet: turn them off (fast=False).")
    pipe, device = _pipe_and_device(bundle)
    transformer, vae, scheduler0 = pipe.transformer, pipe.vae, pipe.scheduler
    if transformer is None or vae is None:
        raise UserInputError("this Qwen-Image 2.1 pipeline has no transformer or VAE: load the full pipeline folder.")
    dtype = transformer.dtype
    text_width = transformer.config.context_in_dim
    lat_h, lat_w = family.latent_size(width, height)
    channels = transformer.config.in_channels
    pos, neg, n_items, do_cfg = conditioning_entries(positive, negative, cfg, steps, device, dtype, text_width)
    pos_refs = _references(positive, pos, "positive", device, dtype)
    neg_refs = _references(negative, neg, "negative", device, dtype) if do_cfg else []
    cache_on = bool(transformer.config.causal_condition)
    n_blocks = len(transformer.transformer_blocks)
    sched_cfg = scheduler0.config
    if steps == 1 and sched_cfg.get("shift_terminal"):
        raise UserInputError("steps=1 does not work with this scheduler (its shift_terminal stretch is undefined for "
                             "a single step): use at least 2 steps.")
    sigmas = _sigmas(pipe, steps)
    tokens = lat_h * lat_w
    mu = calculate_shift(tokens, sched_cfg.get("base_image_seq_len", 256), sched_cfg.get("max_image_seq_len", 4096),
                         sched_cfg.get("base_shift", 0.5), sched_cfg.get("max_shift", 1.15))
    img_shapes = [[(1, lat_h, lat_w)]]
    cells = [(item, seed) for item in range(n_items) for seed in seeds]
    chunks = split_evenly(cells, max_batch)
    total, done = steps * len(chunks), 0
    images, finals = [], []

    def forward(entry, refs, chunk, latents, timestep, cache, first):
        rows = [entry.row(item) for item, _ in chunk]
        text = torch.stack([e for e, _ in rows])
        mask = torch.stack([m for _, m in rows])
        if refs is not None:
            mask = mask | refs["slots"]   # the slots count as valid, as in the stock pipeline's mask
        mask = attention_mask_or_none(mask)
        b = len(chunk)
        img_mask = target_slot_mask(b, text.shape[1], tokens, latents.device)
        hidden, shapes = latents, img_shapes[0]
        if refs is not None:   # the reference images' tokens first, the target last (as the stock pipeline)
            img_mask[:, :text.shape[1]] = refs["slots"]
            hidden = torch.cat([refs["tokens"].expand(b, -1, -1), latents], dim=1)
            shapes = [*refs["shapes"], *shapes]
        kwargs = {}
        if cache is not None:
            kwargs = dict(kv_cache=cache, kv_cache_mode="extract" if first else "cached")
        out = transformer(hidden_states=hidden, timestep=timestep / 1000, encoder_hidden_states=text,
                          encoder_hidden_states_mask=mask, img_shapes=[shapes] * b, img_mask=img_mask,
                          attention_kwargs={}, return_dict=False, **kwargs)[0]
        return out[:, -tokens:]

    def side_prediction(entries, active, chunk, latents, timestep, caches, used):
        refs = pos_refs if entries is pos else neg_refs
        pred, weight = None, 0.0
        for k in active:
            cache = caches.setdefault(k, QwenImage21KVCache(n_blocks) if cache_on else None)
            p = forward(entries[k], refs[k], chunk, latents, timestep, cache, first=k not in used)
            used.add(k)
            w = entries[k].strength
            pred = p * w if pred is None else pred + p * w
            weight += w
        return pred if len(active) == 1 and weight == 1.0 else pred / weight

    def denoise(chunk):
        nonlocal done
        noise = [torch.randn((1, 1, channels, lat_h, lat_w), generator=torch.Generator("cpu").manual_seed(seed),
                             dtype=dtype) for _, seed in chunk]
        # [b, 1, C, h, w] flattened as QwenImage21Pipeline._pack_latents does (view, then tokens first)
        latents = torch.cat(noise).to(device).view(len(chunk), channels, tokens).transpose(1, 2)
        scheduler = copy.deepcopy(scheduler0)
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        pos_caches, neg_caches, pos_used, neg_used = {}, {}, set(), set()
        for i, t in enumerate(scheduler.timesteps):
            if interrupt is not None:
                interrupt()
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = side_prediction(pos, active_entries(pos, i, steps), chunk, latents, timestep, pos_caches,
                                         pos_used)
            if do_cfg:
                neg_pred = side_prediction(neg, active_entries(neg, i, steps), chunk, latents, timestep, neg_caches,
                                           neg_used)
                noise_pred = neg_pred + cfg * (noise_pred - neg_pred)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            done += 1
            if progress is not None:
                progress(done, total)
        if return_latents:
            finals.append(latents.detach().float().cpu())
        if not decode:
            return
        lat = latents.transpose(1, 2).reshape(len(chunk), channels, 1, lat_h, lat_w).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        decoded = vae.decode(lat * std + mean, return_dict=False)[0][:, :, 0]
        images.append((decoded[:, :3] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu())

    oom_batch = 0
    with torch.no_grad():
        try:
            for chunk in chunks:
                denoise(chunk)
        except torch.OutOfMemoryError:
            oom_batch = len(chunk)
    if oom_batch:
        _raise_out_of_memory(oom_batch, max_batch, width, height, device)
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    return SampleResult(images=torch.cat(images) if decode else None,
                        latents=torch.cat(finals) if return_latents else None, cells=cells,
                        seconds=time.perf_counter() - t_start)
