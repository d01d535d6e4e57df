"""Residual injection into Qwen-Image prompt embeddings (ComfyUI CONDITIONING in, CONDITIONING out).

E' = E + α·r, where r [B, S, H] is the head's residual R [1, K, H] spread over the S prompt tokens by
the length policy (`core/length_policy.expand_to_tokens`: padded tokens get zero, so they stay
unchanged).

Strength semantics (`mode`):
- "absolute" (the default): r is R as the head outputs it. α = 1 adds exactly what the head was
  trained to produce (its targets are absolute differences of text-encoder embeddings, e.g. pooled
  caption − pooled base prompt), so at α = 1 the pooled prompt moves exactly onto the pooled target,
  for any prompt length. Qwen-Image RMS-normalises every text token (`txt_norm`) before `txt_in`,
  so what the transformer sees changes with |α·r_t| / |E_t|: the same α is weaker on tokens with a
  larger norm.
- "relative": r_t = R_t · rms(E_t) / ρ, i.e. the residual is measured in units of each token's own
  RMS. ρ is the head's reference token RMS (`meta.metrics["text_token_rms"]`, the mean valid-token RMS
  of the base prompt the head was trained for) when the head records it, else the mean valid-token
  RMS of the prompt being injected. With a recorded ρ, what the transformer sees after `txt_norm` no longer depends on the
  prompt's token norms (scaling E by c gives the identical transformer input); on tokens whose RMS
  equals ρ it equals absolute mode.
`tests/test_injection.py` shows both through the tiny transformer's own `txt_norm`.

Step window: with start_at > 0 or end_at < 1 each entry is split with ComfyUI's own keys
(`start_percent` / `end_percent`, as ConditioningSetTimestepRange sets them): the injected copy is
active inside [start_at, end_at], the original outside it. No model patching.

A list of α values gives one batched conditioning, α-major: item a·B + b is prompt b at α[a].
Inputs are never edited in place.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .conditioning import entry_mask
from ..errors import ModelMismatchError, UserInputError
from .head import describe_text_width
from .length_policy import expand_to_tokens

MODES = ("absolute", "relative")
DEFAULT_MODE = "absolute"
REFERENCE_RMS_KEY = "text_token_rms"
INJECTIONS_KEY = "qwen_identity_injections"   # in a CONDITIONING entry's dict: how its residuals were added


def parse_number_list(text: str | Iterable, convert=float, what: str = "alphas",
                      example: str = "0,0.5,1,1.5") -> list:
    """"0, 0.5,1" -> [0.0, 0.5, 1.0]; empty or unparsable lists are a UserInputError naming the list."""
    if not isinstance(text, str):
        values = [convert(v) for v in text]
        if not values:
            raise UserInputError(f"the {what} list is empty: give at least one value, e.g. {example}.")
        return values
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if not any(parts):
        raise UserInputError(f"the {what} list is empty: give comma-separated values such as {example}.")
    values = []
    for p in parts:
        if not p:
            raise UserInputError(f"the {what} list {text!r} has an empty item: remove the extra comma.")
        try:
            values.append(convert(p))
        except ValueError:
            raise UserInputError(f"cannot read {p!r} in the {what} list {text!r}: give comma-separated values "
                                 f"such as {example}.") from None
    return values


def parse_float_list(text: str | Iterable[float], what: str = "alphas") -> list[float]:
    """Finite floats; see `parse_number_list`."""
    values = parse_number_list(text, float, what)
    for v in values:
        if not math.isfinite(v):
            raise UserInputError(f"{what} value {v} is not a finite number.")
    return values


MAX_ABS_ALPHA = 100.0  # far past any useful strength; larger values overflow fp16/bf16 embeddings into NaN images


def parse_alphas(text: str | Iterable[float]) -> list[float]:
    values = parse_float_list(text, "alphas")
    for v in values:
        if abs(v) > MAX_ABS_ALPHA:
            raise UserInputError(f"alphas value {v:g} is outside -{MAX_ABS_ALPHA:g}..{MAX_ABS_ALPHA:g}: useful strengths "
                                 "are around 0..3; values this large only turn the prompt into noise (or NaN).")
    return values


def compute_residual(head, identity) -> torch.Tensor:
    """The head's residual R [1, K, H] (float32) for identity features (`.combined` [D]) or a tensor [D]."""
    combined = getattr(identity, "combined", identity)
    if not isinstance(combined, torch.Tensor):
        raise UserInputError(f"expected IDENTITY_FEATURES (with a .combined tensor), got {type(identity).__name__}.")
    if combined.ndim == 2 and combined.shape[0] == 1:
        combined = combined[0]
    if combined.ndim != 1:
        raise UserInputError(f"identity features must be one vector [D]; got shape {tuple(combined.shape)}.")
    param = next(head.parameters())
    with torch.no_grad():
        r = head(combined.to(device=param.device, dtype=param.dtype))
    return r.detach().float().cpu()


def check_widths(residual_h: int, text_h: int) -> None:
    if int(residual_h) != int(text_h):
        raise ModelMismatchError(
            f"the head outputs H={residual_h} ({describe_text_width(residual_h)}) but the conditioning has "
            f"H={text_h} ({describe_text_width(text_h)}): use a head trained for this text encoder, or encode the "
            "prompt with the Qwen-Image generation the head was trained on.")


def _token_rms(embeds: torch.Tensor) -> torch.Tensor:
    return embeds.float().pow(2).mean(-1, keepdim=True).sqrt()


def reference_rms(head_meta) -> float | None:
    """ρ recorded by the training code (`metrics["text_token_rms"]`), or None."""
    metrics = getattr(head_meta, "metrics", None) or {}
    value = metrics.get(REFERENCE_RMS_KEY)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def token_residual(residual: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, mode: str = DEFAULT_MODE,
                   rho: float | None = None) -> torch.Tensor:
    """Residual per token r [B, S, H] (float32) for embeds [B, S, H] with mask [B, S]; zero at padding."""
    if mode not in MODES:
        raise UserInputError(f"unknown strength mode {mode!r}: use one of {', '.join(MODES)}.")
    r = expand_to_tokens(residual[0].float().to(embeds.device), mask)
    if mode == "relative":
        rms = _token_rms(embeds)
        if rho is None:
            valid = mask.bool()
            # per prompt: the mean RMS of its valid tokens
            per_item = (rms[..., 0] * valid).sum(1) / valid.sum(1).clamp_min(1)
            r = r * rms / per_item.clamp_min(1e-12)[:, None, None]
        else:
            r = r * (rms / rho)
    return r


def _split_window(extra: dict, start: float, end: float) -> tuple[list[tuple[float, float]], tuple[float, float] | None]:
    """(windows for the original, window for the injected copy) within the entry's own window."""
    a, b = float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0))
    inside = (max(a, start), min(b, end))
    outside = [(a, min(b, start)), (max(a, end), b)]
    outside = [w for w in outside if w[0] < w[1]]
    return outside, (inside if inside[0] < inside[1] else None)


def _with_window(extra: dict, window: tuple[float, float]) -> dict:
    out = dict(extra)
    if window == (0.0, 1.0) and "start_percent" not in extra and "end_percent" not in extra:
        return out
    out["start_percent"], out["end_percent"] = float(window[0]), float(window[1])
    return out


def _repeat_extra(extra: dict, n: int, batch: int) -> dict:
    out = dict(extra)
    mask = extra.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = mask.reshape(batch, -1).repeat(n, 1)
    return out


def inject(conditioning: list, residual: torch.Tensor, alphas: Sequence[float], start_at: float = 0.0,
           end_at: float = 1.0, mode: str = DEFAULT_MODE, rho: float | None = None) -> list:
    """New CONDITIONING with E + α·r for every α (α-major batch), split by the step window."""
    alphas = parse_alphas(alphas)
    if not isinstance(conditioning, list) or not conditioning:
        raise UserInputError("the conditioning is empty: connect a text-encode node's CONDITIONING.")
    if not (0.0 <= start_at <= 1.0 and 0.0 <= end_at <= 1.0):
        raise UserInputError(f"start_at={start_at} and end_at={end_at} must lie in 0..1.")
    if start_at >= end_at:
        raise UserInputError(f"start_at={start_at} must be smaller than end_at={end_at}: the step window is empty.")
    if residual.ndim == 2:
        residual = residual.unsqueeze(0)
    if residual.ndim != 3 or residual.shape[0] != 1:
        raise UserInputError(f"the residual must be [1, K, H]; got shape {tuple(residual.shape)}.")
    n = len(alphas)
    recipe = {"residual": residual.detach().float().cpu(), "alphas": list(alphas), "start_at": float(start_at),
              "end_at": float(end_at), "mode": mode, "rho": rho}
    out: list = []
    for item in conditioning:
        try:
            embeds, extra = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise UserInputError("the conditioning is not in ComfyUI's format [[tensor, dict], ...].") from None
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise UserInputError(f"conditioning tensors must be [B, S, H]; got {getattr(embeds, 'shape', type(embeds))}.")
        check_widths(residual.shape[-1], embeds.shape[-1])
        batch = embeds.shape[0]
        mask = entry_mask(embeds, extra)
        r = token_residual(residual, embeds, mask, mode, rho)
        base = embeds.float()
        injected = torch.cat([(base + a * r).to(embeds.dtype) if a != 0 else embeds.clone() for a in alphas])
        extra = dict(extra)
        extra[INJECTIONS_KEY] = [*extra.get(INJECTIONS_KEY, ()), recipe]
        outside, inside = _split_window(extra, start_at, end_at)
        if inside is not None:
            out.append([injected, _with_window(_repeat_extra(extra, n, batch), inside)])
        for w in outside:
            out.append([embeds.repeat(n, 1, 1), _with_window(_repeat_extra(extra, n, batch), w)])
    return out


def _same_recipes(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x is y or (x["alphas"] == y["alphas"] and x["mode"] == y["mode"] and x["rho"] == y["rho"]
                   and (x["start_at"], x["end_at"]) == (y["start_at"], y["end_at"])
                   and torch.equal(x["residual"], y["residual"])) for x, y in zip(a, b))


def recorded_injections(conditioning: list) -> list[dict]:
    """The residuals `inject` added to a CONDITIONING (in order), as it records them in each entry. Entries
    that disagree (e.g. two injected prompts combined) are refused: the residual cannot be added again."""
    recipes = None
    for item in conditioning if isinstance(conditioning, list) else []:
        found = list(item[1].get(INJECTIONS_KEY, ()))
        if recipes is None:
            recipes = found
        elif not _same_recipes(recipes, found):
            raise UserInputError("the conditioning combines entries with different identity residuals; adding them "
                                 "again to other prompt embeddings needs ONE prompt through InjectResidual.")
    if not recipes:
        raise UserInputError("the positive conditioning has no identity residual: connect InjectResidual's output "
                             "(the head's residual is added again to the prompt read with the reference images).")
    return recipes


def reinject(source: list, target: list) -> list:
    """`target` with the same residuals, strengths, step windows and mode that `inject` gave `source`."""
    for r in recorded_injections(source):
        target = inject(target, r["residual"], r["alphas"], r["start_at"], r["end_at"], r["mode"], rho=r["rho"])
    return target


def format_alphas(alphas: Sequence[float]) -> str:
    return ",".join(f"{a:g}" for a in alphas)


def inject_identity(conditioning: list, head, identity, alphas: Sequence[float], start_at: float = 0.0,
                    end_at: float = 1.0, mode: str = DEFAULT_MODE) -> tuple[list, list[str]]:
    """Check head vs features and conditioning, then inject; returns (conditioning, warnings)."""
    from .head import check_head_features, check_head_hidden

    warnings = check_head_features(head, identity)
    for item in conditioning if isinstance(conditioning, list) else []:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor) and item[0].ndim == 3:
            check_head_hidden(head, item[0].shape[-1])
    residual = compute_residual(head, identity)
    return inject(conditioning, residual, alphas, start_at, end_at, mode, rho=reference_rms(head.meta)), warnings
