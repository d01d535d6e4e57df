"""The length policy: how a head's K identity slots meet a prompt of S tokens (S need not equal K).

The valid (unmasked) tokens of a prompt are cut into K contiguous segments of near-equal length
(token i of n belongs to slot floor(i*K/n)). Two maps use the same segments:
- `pool_to_slots`: tokens -> slots, the mean of each segment (training targets are pooled this way);
- `expand_to_tokens`: slots -> tokens, every token of a segment gets its slot's vector; padded
  tokens get zero.
So `pool_to_slots(expand_to_tokens(R)) == R` whenever n >= K: a residual trained on pooled caption
differences moves the pooled base prompt exactly onto the pooled caption at alpha = 1, whatever the
prompt's length. With K = 1 every token gets the same vector. When a prompt has fewer valid tokens
than slots (n < K), each token gets the mean of the slots it spans.
"""

from __future__ import annotations

import torch

POLICY_NAME = "segment-mean-v1"


def _slot_of_token(n: int, k: int, device=None) -> torch.Tensor:
    return (torch.arange(n, device=device) * k) // n


def pool_to_slots(tokens: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """tokens [S, H] (or [B, S, H]) with mask [S] ([B, S]) -> [K, H] ([B, K, H])."""
    if tokens.ndim == 3:
        return torch.stack([pool_to_slots(t, m, k) for t, m in zip(tokens, mask)])
    valid = tokens[mask.bool()]
    n = valid.shape[0]
    if n == 0:
        raise ValueError("a prompt with no valid tokens cannot be pooled")
    if n >= k:
        slot = _slot_of_token(n, k, tokens.device)
        out = torch.zeros(k, tokens.shape[-1], dtype=torch.float32, device=tokens.device)
        out.index_add_(0, slot, valid.float())
        counts = torch.bincount(slot, minlength=k).clamp_min(1).to(out)
        return (out / counts[:, None]).to(tokens.dtype)
    token_of_slot = (torch.arange(k, device=tokens.device) * n) // k
    return valid[token_of_slot]


def expand_to_tokens(slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """slots [K, H] with mask [S] -> [S, H]; or slots [B, K, H] with mask [B, S] -> [B, S, H]."""
    if mask.ndim == 2:
        if slots.ndim == 2:
            slots = slots.expand(mask.shape[0], *slots.shape)
        return torch.stack([expand_to_tokens(s, m) for s, m in zip(slots, mask)])
    k, h = slots.shape
    s = mask.shape[0]
    out = torch.zeros(s, h, dtype=slots.dtype, device=slots.device)
    idx = mask.bool().nonzero(as_tuple=True)[0]
    n = idx.shape[0]
    if n == 0:
        return out
    if n >= k:
        out[idx] = slots[_slot_of_token(n, k, slots.device)]
    else:
        start = (torch.arange(n, device=slots.device) * k) // n
        end = (torch.arange(1, n + 1, device=slots.device) * k) // n
        vals = torch.stack([slots[a:b].mean(0) for a, b in zip(start.tolist(), end.tolist())])
        out[idx] = vals
    return out
