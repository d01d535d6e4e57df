"""Conditioning prompts -> Qwen-Image prompt embeddings, cached on disk.

`OUT/cache/prompts-<key>.safetensors`: the key covers the text encoder (its config's hash), the dtype,
the encoding layout version and every prompt's text, so another model, dtype or wording is never
reused (it has another name). Embeddings are stored float32, right-padded to the longest prompt, with
their masks; `text_token_rms` (the mean RMS of the valid tokens, InjectResidual's ρ) is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files.atomic import atomic_write
from ..files.dataset_fingerprint import cache_key
from ..files.safetensors_io import read_safetensors, safetensors_bytes
from ..errors import UserInputError

CACHE_FORMAT = "qwen-identity-prompt-cache-v1"


def prompt_key(text_encoder_source: dict[str, Any], dtype: str, prompts: Sequence[str]) -> str:
    return cache_key(CACHE_FORMAT, text_encoder_source, dtype, list(prompts))


def prompt_embeddings(prompts: Sequence[str], cache_dir: Path, key: str, load_text_encoder: Callable[[], Any],
                      say: Callable[[str], None] = lambda m: None, write: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(embeds [P, S, H] float32, mask [P, S] long, ρ) for the prompts, from the cache when it matches."""
    path = Path(cache_dir) / f"prompts-{key}.safetensors"
    if path.is_file():
        try:
            meta, t = read_safetensors(path, lambda e: "damaged")
            if meta.get("format") == CACHE_FORMAT and meta.get("key") == key and t["embeds"].shape[0] == len(prompts):
                return t["embeds"], t["mask"].long(), float(t["rho"][0])
        except (UserInputError, KeyError):
            pass  # a damaged cache is recomputed
    from ..generation.prompt_encoding import encode_prompts

    uniq = list(dict.fromkeys(prompts))
    say(f"encoding {len(uniq)} prompt(s) with Qwen-Image's text encoder (cached afterwards)")
    te, tok = load_text_encoder()
    encs = [encode_prompts(te, tok, [p]) for p in uniq]
    s = max(e.embeds.shape[1] for e in encs)
    h = encs[0].embeds.shape[-1]
    by_prompt = {}
    for p, e in zip(uniq, encs):
        emb = torch.zeros(s, h)
        m = torch.zeros(s, dtype=torch.long)
        n = e.embeds.shape[1]
        emb[:n], m[:n] = e.embeds[0].float().cpu(), e.mask[0].cpu()
        by_prompt[p] = (emb, m)
    embeds = torch.stack([by_prompt[p][0] for p in prompts])
    mask = torch.stack([by_prompt[p][1] for p in prompts])
    valid = embeds[mask.bool()]
    rho = float(valid.pow(2).mean(-1).sqrt().mean())
    if write:
        data = safetensors_bytes({"embeds": embeds.contiguous(), "mask": mask.contiguous(),
                                  "rho": torch.tensor([rho], dtype=torch.float64)},
                                 {"format": CACHE_FORMAT, "key": key, "prompts": json.dumps(list(prompts))})
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return embeds, mask, rho
