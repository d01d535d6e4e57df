"""The held-out denoising gain: does a head's residual help the frozen Qwen-Image denoise photos of
the person it was computed for, more than another person's residual does?

For every held-out photo x0 of person p, at fixed (σ, ε) pairs (the same pairs for all three
conditionings, so the comparison is paired):
    L_none = flow-matching loss with the prompt embedding E alone,
    L_own  = with E + α·R(p)      (R from the features of p's *other* photos, never x0's own),
    L_imp  = with E + α·R(q)      (q ≠ p, an impostor: the next person in the evaluated list).
own gain = L_none - L_own, impostor gain = L_none - L_imp, identity gain = own - impostor.
A head that carries identity has own gain > impostor gain; one that only adds a person-independent
push (a style, "a portrait") helps own and impostor alike (difference ≈ 0); an untrained head gives 0.

The σ are the midpoints of the training density's quantiles (logit-normal(0, 1) by default:
stratified, the same for every photo) and ε is drawn from a generator seeded by (seed, photo index),
so the figures do not depend on batching, device order or how many photos are evaluated.

Uncertainty: the 95 % interval of the mean identity gain is a bootstrap over persons (resample persons
with replacement, each contributing the mean over its photos; 2000 resamples, fixed seed) because
photos of one person are not independent; with a single person it falls back to a bootstrap over photos.
Figures are reported absolute (in loss units) and relative to L_none.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..denoising.flow_matching import condition_with_residual, flow_matching_loss

CI_METHOD = "95% bootstrap over persons (2000 resamples, seed 0); over photos when only one person"
BOOTSTRAP_RESAMPLES = 2000


def fixed_sigmas(pairs: int, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """σ_j = sigmoid(mean + std·Φ⁻¹((j + 0.5) / pairs)): stratified over the training density."""
    q = (torch.arange(pairs, dtype=torch.float64) + 0.5) / pairs
    return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(q)).float()


def fixed_noise(photo_index: int, pairs: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """ε [pairs, *shape] for one photo, independent of batching (seeded by (seed, photo index))."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(photo_index) * 7919 + 17) % (2**63 - 1))
    return torch.randn(pairs, *shape, generator=g)


def impostors(persons: Sequence[int]) -> dict[int, int]:
    """Each evaluated person's impostor: the next person in sorted order (cyclic). Needs ≥ 2 persons."""
    order = sorted(set(int(p) for p in persons))
    if len(order) < 2:
        raise ValueError("the impostor gain needs at least two persons")
    return {p: order[(i + 1) % len(order)] for i, p in enumerate(order)}


@torch.no_grad()
def photo_losses(transformer, latents: torch.Tensor, img_shape, embeds: torch.Tensor, mask: torch.Tensor,
                 residuals: Sequence[torch.Tensor | None], alpha: float, pairs: int = 4, seed: int = 0,
                 photo_ids: Sequence[int] | None = None, token_weights: torch.Tensor | None = None,
                 logit_mean: float = 0.0, logit_std: float = 1.0, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Loss [len(residuals), M] averaged over the fixed pairs, one row per conditioning (None = no residual).

    latents [M, N, 4C] (packed x0) with img_shape every photo's (1, h/2, w/2); or, with aspect buckets, a
    list of M tensors [N_i, 4C] with img_shape a list of M shapes (photos are batched per shape);
    embeds [M, S, H], mask [M, S] (each photo's prompt); residuals: tensors [M, K, H] or None;
    token_weights [M, N] (or a list of [N_i]) or None."""
    m = len(latents)
    photo_ids = list(range(m)) if photo_ids is None else list(photo_ids)
    sig = fixed_sigmas(pairs, logit_mean, logit_std)
    out = torch.zeros(len(residuals), m, dtype=torch.float64)
    dev = torch.device(device)
    per_photo = len(img_shape) > 0 and not isinstance(img_shape[0], int)  # aspect buckets: a shape per photo
    groups: dict[tuple, list[int]] = {}
    for i in range(m):
        groups.setdefault(tuple(img_shape[i]) if per_photo else tuple(img_shape), []).append(i)
    for shape, members in groups.items():  # a batch holds one shape; ε and σ are per photo, so batching is free
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            x0 = _rows(latents, idx).float()
            eps = torch.stack([fixed_noise(photo_ids[i], pairs, x0.shape[1:], seed) for i in idx])  # [b, pairs, N, C]
            b = len(idx)
            x0r = x0.unsqueeze(1).expand(-1, pairs, -1, -1).reshape(b * pairs, *x0.shape[1:]).to(dev)
            epsr = eps.reshape(b * pairs, *x0.shape[1:]).to(dev)
            sigr = sig.repeat(b).to(dev)
            e = embeds[idx].float().repeat_interleave(pairs, 0).to(dev)
            mk = mask[idx].repeat_interleave(pairs, 0).to(dev)
            tw = None if token_weights is None else _rows(token_weights, idx).repeat_interleave(pairs, 0).to(dev)
            for r_i, res in enumerate(residuals):
                cond = e if res is None else condition_with_residual(
                    e, mk, res[idx].float().repeat_interleave(pairs, 0).to(dev), alpha)
                loss = flow_matching_loss(transformer, x0r, epsr, sigr, cond, mk, [shape] * (b * pairs),
                                          token_weights=tw)
                out[r_i, idx] = loss.double().view(b, pairs).mean(1).cpu()
    return out


def _rows(x, idx: list[int]) -> torch.Tensor:
    """x[idx] of a tensor, or the stacked rows of a per-photo list of one shape."""
    return x[idx] if torch.is_tensor(x) else torch.stack([x[i] for i in idx])


def _bootstrap_ci(groups: list[list[float]], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95 % percentile interval of the mean: resample groups (persons) when there are ≥ 2, else the values."""
    if len(groups) >= 2:
        units = torch.tensor([sum(g) / len(g) for g in groups], dtype=torch.float64)
    else:
        units = torch.tensor(groups[0] if groups else [], dtype=torch.float64)
    n = units.numel()
    if n == 0:
        return (float("nan"), float("nan"))
    if n == 1:
        v = float(units[0])
        return (v, v)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = units[idx].mean(1)
    return (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))


def summarise(loss_none: torch.Tensor, loss_own: torch.Tensor, loss_imp: torch.Tensor, persons: Sequence[int],
              names: Sequence[str] | None = None) -> dict:
    """Per person and overall figures from per-photo losses [M] (see the module docstring)."""
    persons = [int(p) for p in persons]
    own = (loss_none - loss_own).double()
    imp = (loss_none - loss_imp).double()
    diff = own - imp
    by_person: dict[int, list[int]] = {}
    for i, p in enumerate(persons):
        by_person.setdefault(p, []).append(i)

    def stats(ix: list[int]) -> dict:
        ln = float(loss_none[ix].double().mean())
        o, q, d = float(own[ix].mean()), float(imp[ix].mean()), float(diff[ix].mean())
        rel = (lambda v: v / ln if ln > 0 else float("nan"))
        return {"photos": len(ix), "loss_none": ln, "loss_own": float(loss_own[ix].double().mean()),
                "loss_impostor": float(loss_imp[ix].double().mean()), "own_gain": o, "impostor_gain": q,
                "identity_gain": d, "own_gain_relative": rel(o), "impostor_gain_relative": rel(q),
                "identity_gain_relative": rel(d)}

    per = {}
    for p, ix in by_person.items():
        key = names[p] if names is not None else str(p)
        per[key] = stats(ix)
    overall = stats(list(range(len(persons)))) if persons else {}
    if persons:
        groups = [[float(diff[i]) for i in ix] for ix in by_person.values()]
        lo, hi = _bootstrap_ci(groups)
        overall.update({"identity_gain_ci95": [lo, hi], "persons": len(by_person), "ci_method": CI_METHOD})
    return {"overall": overall, "per_person": per}


def denoising_gain(transformer, latents: torch.Tensor, img_shape, persons: Sequence[int], embeds: torch.Tensor,
                   mask: torch.Tensor, residual_of: Callable[[int, int], torch.Tensor], alpha: float,
                   pairs: int = 4, seed: int = 0, photo_ids: Sequence[int] | None = None,
                   token_weights: torch.Tensor | None = None, names: Sequence[str] | None = None,
                   batch_size: int = 8, device: torch.device | str = "cpu",
                   logit_mean: float = 0.0, logit_std: float = 1.0, impostor_of: dict[int, int] | None = None) -> dict:
    """The held-out gain of one head on M photos.

    persons [M]: each photo's person index; embeds [M, S, H] / mask [M, S]: each photo's prompt;
    residual_of(photo index, person) -> R [K, H]: the residual of `person` for that photo (for the own
    person it must not use the photo itself); impostor_of: person -> impostor (default: `impostors`).
    Returns `summarise`'s dict plus the settings."""
    persons = [int(p) for p in persons]
    imp_of = impostor_of or impostors(persons)
    own = torch.stack([residual_of(i, p) for i, p in enumerate(persons)])
    imp = torch.stack([residual_of(i, imp_of[p]) for i, p in enumerate(persons)])
    losses = photo_losses(transformer, latents, img_shape, embeds, mask, [None, own, imp], alpha, pairs, seed,
                          photo_ids, token_weights, logit_mean, logit_std, batch_size, device)
    out = summarise(losses[0], losses[1], losses[2], persons, names)
    out["settings"] = {"alpha": alpha, "pairs": pairs, "seed": seed,
                       "sigmas": [round(float(s), 6) for s in fixed_sigmas(pairs, logit_mean, logit_std)],
                       "impostor": "the next evaluated person (cyclic)",
                       "own_residual": "features of the person's other photos"}
    return out
