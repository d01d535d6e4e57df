"""The K-slot length policy: pool(expand(R)) == R for n >= K, padding untouched, any S."""

import pytest
import torch

from qwen_identity.core.residual.length_policy import expand_to_tokens, pool_to_slots


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 3), (12, 4), (5, 5), (100, 8)])
def test_pool_of_expand_is_identity(n, k):
    torch.manual_seed(0)
    slots = torch.randn(k, 6)
    mask = torch.zeros(n + 3, dtype=torch.long)
    mask[:n] = 1
    tokens = expand_to_tokens(slots, mask)
    assert torch.all(tokens[n:] == 0)
    assert torch.allclose(pool_to_slots(tokens, mask, k), slots, atol=1e-6)


def test_fewer_tokens_than_slots_averages_slots():
    slots = torch.arange(4.0).unsqueeze(1)  # 4 slots, H=1
    mask = torch.tensor([1, 1, 0])
    tokens = expand_to_tokens(slots, mask)
    assert tokens[:, 0].tolist() == [0.5, 2.5, 0.0]


def test_batched_forms_match_single():
    torch.manual_seed(1)
    slots = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    batched = expand_to_tokens(slots, mask)
    for b in range(2):
        assert torch.equal(batched[b], expand_to_tokens(slots[b], mask[b]))
    assert torch.allclose(pool_to_slots(batched, mask, 3), slots, atol=1e-6)


def test_segments_are_contiguous_and_balanced():
    mask = torch.ones(10, dtype=torch.long)
    slots = torch.arange(3.0).unsqueeze(1)
    t = expand_to_tokens(slots, mask)[:, 0].tolist()
    assert t == sorted(t) and {t.count(v) for v in (0.0, 1.0, 2.0)} <= {3, 4}
